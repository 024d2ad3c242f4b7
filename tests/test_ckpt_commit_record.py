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
