"""The commit record: its summary is checksummed (listing and keep_best trust it), and a commit whose write
reports an error after the record landed is still a committed checkpoint."""

import json

import pytest
import torch

from harness import CheckpointManager, faults
from harness.checkpoint.discovery import list_checkpoints, verify_checkpoint
from harness.checkpoint.format import COMMIT_FILE, checksum, dumps
from harness.errors import CheckpointFormatError


def _save(url, steps_losses, **kw):
    mgr = CheckpointManager(url, **kw)
    model = torch.nn.Linear(3, 2)
    for step, loss in steps_losses:
        mgr.save(step, models=model, loss=loss)
    return mgr


def test_flipped_summary_in_commit_record_is_detected(ckpt_url):
    mgr = _save(ckpt_url, [(1, 0.125)], keep_last=0)
    rel = f"step-000000001/{COMMIT_FILE}"
    raw = mgr.storage.read_bytes(rel)
    mgr.storage.write_bytes(rel, raw.replace(b"0.125", b"9.125"))
    infos = list_checkpoints(mgr.storage)
    assert infos[0].problem and "commit record checksum mismatch" in infos[0].problem
    with pytest.raises(CheckpointFormatError, match="checksum mismatch"):
        verify_checkpoint(mgr.storage, "step-000000001")


def test_commit_summary_must_agree_with_manifest(ckpt_url):
    """Even a consistently re-checksummed record cannot lie about the loss: open compares it to the manifest."""
    mgr = _save(ckpt_url, [(1, 0.125)], keep_last=0)
    rel = f"step-000000001/{COMMIT_FILE}"
    obj = json.loads(mgr.storage.read_bytes(rel))
    obj.pop("commit_checksum")
    obj["loss"] = 9.125
    mgr.storage.write_bytes(rel, dumps({**obj, "commit_checksum": checksum(dumps(obj))}))
    with pytest.raises(CheckpointFormatError, match="disagrees with the manifest on 'loss'"):
        verify_checkpoint(mgr.storage, "step-000000001")


def test_error_after_commit_record_landed_counts_as_committed(ckpt_url, caplog):
    def fail_after_commit(name, info):
        if name == "save.after_commit" and info.get("step") == 2:
            raise OSError(5, "folder fsync failed (injected)")

    mgr = _save(ckpt_url, [(1, 1.0)], keep_last=0)
    faults.install(fail_after_commit)
    try:
        mgr.save(2, models=torch.nn.Linear(3, 2), loss=0.5)  # must not raise: the checkpoint exists
    finally:
        faults.install(None)
    assert [i.step for i in list_checkpoints(mgr.storage)] == [1, 2]
    assert "is committed, but a step after writing its commit record failed" in caplog.text


def test_a_damaged_commit_checksum_key_is_detected(ckpt_url):
    """A flipped byte in the key "commit_checksum" leaves a record with no checksum and an unknown key: refused,
    whichever byte of the key and whichever bit (found by the random fault campaign: COMMIT@369^0x40)."""
    mgr = _save(ckpt_url, [(1, 0.125)], keep_last=0)
    rel = f"step-000000001/{COMMIT_FILE}"
    raw = mgr.storage.read_bytes(rel)
    at = raw.index(b'"commit_checksum"') + 1
    for pos in range(at, at + len("commit_checksum")):
        for mask in (0x01, 0x20, 0x40, 0x80):
            bad = bytearray(raw)
            bad[pos] ^= mask
            mgr.storage.write_bytes(rel, bytes(bad))
            with pytest.raises(CheckpointFormatError, match="damaged|not valid JSON"):
                verify_checkpoint(mgr.storage, "step-000000001")
    mgr.storage.write_bytes(rel, raw)
    verify_checkpoint(mgr.storage, "step-000000001")


def test_a_record_from_before_the_commit_checksum_is_still_read(ckpt_url):
    """Records written before the commit record checksummed itself have none: read, as long as every key is one
    those records had."""
    mgr = _save(ckpt_url, [(1, 0.125)], keep_last=0)
    rel = f"step-000000001/{COMMIT_FILE}"
    obj = json.loads(mgr.storage.read_bytes(rel))
    obj.pop("commit_checksum")
    mgr.storage.write_bytes(rel, dumps(obj))
    verify_checkpoint(mgr.storage, "step-000000001")
    assert [i.step for i in list_checkpoints(mgr.storage)] == [1]
    mgr.storage.write_bytes(rel, dumps({**obj, "extra": 1}))
    with pytest.raises(CheckpointFormatError, match="no commit_checksum and unknown keys"):
        verify_checkpoint(mgr.storage, "step-000000001")
