"""Damaged checkpoints are detected, named in the log, skipped in favour of the previous one (bitwise),
and kept on storage for a human to look at, also through later saves' retention."""

from __future__ import annotations

import logging

import pytest
import torch

from ckpt_helpers import (Net, assert_bitwise, ckpt_names, data_files, flip_byte, read_manifest, simple_run,
                          snapshot, train_step)
from harness import CheckpointManager
from harness.checkpoint.discovery import verify_checkpoint
from harness.errors import CheckpointError
from harness.storage import Storage

NEW = "step-000000020"


def _flip_data(url):
    man = read_manifest(url, NEW)
    e = max(man["tensors"], key=lambda e: e["length"])
    flip_byte(url, f"{NEW}/{e['file']}", e["offset"] + e["length"] // 2)


def _truncate_data(url):
    st = Storage(url)
    rel = f"{NEW}/{data_files(url, NEW)[-1]}"
    st.write_bytes(rel, st.read_bytes(rel)[:-7])


def _remove(rel):
    return lambda url: Storage(url).remove(f"{NEW}/{rel}" if rel else f"{NEW}/{data_files(url, NEW)[0]}")


def _write(rel, data):
    return lambda url: Storage(url).write_bytes(f"{NEW}/{rel}", data(url) if callable(data) else data)


def _same_size_garbage(url):
    return b"\x07" * len(Storage(url).read_bytes(f"{NEW}/manifest.json"))


DAMAGE = {
    # kind: (how, what the log and the error say)
    "data_flipped_byte": (_flip_data, "checksum mismatch"),
    "data_truncated": (_truncate_data, "truncated"),
    "data_missing": (_remove(None), "missing"),
    "manifest_empty": (_write("manifest.json", b""), "manifest.json is 0 bytes"),
    "manifest_garbage": (_write("manifest.json", _same_size_garbage), "manifest checksum mismatch"),
    "manifest_short_garbage": (_write("manifest.json", b"{not json"), "manifest.json is 9 bytes"),
    "manifest_flipped_byte": (lambda url: flip_byte(url, f"{NEW}/manifest.json", 40), "manifest checksum mismatch"),
    "manifest_missing": (_remove("manifest.json"), "manifest.json is missing"),
    "commit_missing": (_remove("COMMIT"), "no commit record"),
    "commit_garbage": (_write("COMMIT", b"\x00\xffgarbage"), "commit record is not valid JSON"),
    "commit_empty": (_write("COMMIT", b""), "commit record is not valid JSON"),
    "commit_not_harness": (_write("COMMIT", b'{"format": "other"}'), "not a harness checkpoint"),
}


def _objects():
    model = Net()
    opt = torch.optim.AdamW(model.parameters())
    return model, opt


def _two_checkpoints(url, **kw):
    model, opt, sched = simple_run()
    mgr = CheckpointManager(url, **kw)
    mgr.save(10, models=model, optimizers=opt, loss=2.0)
    at_10 = snapshot((model.state_dict(), opt.state_dict()))
    train_step(model, opt, sched, seed=7)
    mgr.save(20, models=model, optimizers=opt, loss=1.0)
    return model, opt, at_10


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damage_is_detected_logged_skipped_and_kept(ckpt_url, kind, caplog):
    damage, problem = DAMAGE[kind]
    model, opt, at_10 = _two_checkpoints(ckpt_url, max_file_bytes=256)
    assert len(data_files(ckpt_url, NEW)) >= 2
    damage(ckpt_url)

    with pytest.raises(CheckpointError, match=problem):
        verify_checkpoint(Storage(ckpt_url), NEW)

    m2, o2 = _objects()
    mgr = CheckpointManager(ckpt_url, keep_last=1)
    with caplog.at_level(logging.WARNING, logger="harness"):
        res = mgr.restore(models=m2, optimizers=o2)
    assert res.step == 10 and res.name == "step-000000010"
    assert_bitwise(at_10, (m2.state_dict(), o2.state_dict()))
    assert [n for n, _ in res.skipped] == [NEW] and problem in res.skipped[0][1]
    logged = [r.getMessage() for r in caplog.records if NEW in r.getMessage()]
    assert logged and any(problem in m for m in logged), caplog.text

    # Training goes on from step 10; retention (keep_last=1) deletes old healthy ones, never the damaged.
    for step in (30, 40, 50):
        mgr.save(step, models=m2, optimizers=o2)
    names = ckpt_names(ckpt_url)
    assert NEW in names and "step-000000010" not in names and "step-000000030" not in names
    assert "step-000000050" in names
    assert CheckpointManager(ckpt_url).restore(models=Net()).step == 50


def test_damaged_newest_with_a_good_resave_of_the_same_step(ckpt_url, caplog):
    model, opt, _ = _two_checkpoints(ckpt_url)
    _flip_data(ckpt_url)
    m2, o2 = _objects()
    mgr = CheckpointManager(ckpt_url)
    assert mgr.restore(models=m2, optimizers=o2).step == 10
    train_step(m2, o2, seed=1)
    at_20 = snapshot(m2.state_dict())
    mgr.save(20, models=m2, optimizers=o2)
    m3, o3 = _objects()
    res = CheckpointManager(ckpt_url).restore(models=m3, optimizers=o3)
    assert res.name == "step-000000020-a1" and res.skipped == []
    assert_bitwise(at_20, m3.state_dict())


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(ckpt_url):
    _two_checkpoints(ckpt_url)
    for name in ("step-000000010", NEW):
        Storage(ckpt_url).write_bytes(f"{name}/manifest.json", b"")
    with pytest.raises(CheckpointError, match="every committed checkpoint failed verification"):
        CheckpointManager(ckpt_url).restore(models=Net())
    assert ckpt_names(ckpt_url) == ["step-000000010", NEW]


def test_damage_in_the_older_checkpoint_does_not_matter(ckpt_url):
    model, opt, _ = _two_checkpoints(ckpt_url)
    Storage(ckpt_url).remove("step-000000010/COMMIT")
    m2, o2 = _objects()
    res = CheckpointManager(ckpt_url).restore(models=m2, optimizers=o2)
    assert res.step == 20
    assert_bitwise(model.state_dict(), m2.state_dict())
