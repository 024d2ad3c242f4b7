"""Crash consistency: a save that dies at any point of its sequence leaves the previous checkpoint as the
newest valid one (bitwise), and never blocks a later save of the same step."""

from __future__ import annotations

import pytest
import torch

from ckpt_helpers import Net, assert_bitwise, ckpt_names, simple_run, snapshot, train_step
from harness import CheckpointManager, faults
from harness.checkpoint.discovery import list_checkpoints
from harness.checkpoint.format import data_file_name
from harness.errors import CheckpointError
from harness.storage import Storage

MAX_FILE_BYTES = 200  # several data files per checkpoint, so a crash can land between them
N_FILES = 9           # data files the step-20 save writes with that limit (checked below)

POINTS = ([("save.data_file", data_file_name(0, i)) for i in range(N_FILES)]
          + [(p, None) for p in ("save.before_manifest", "save.after_manifest", "save.before_commit",
                                 "save.after_commit")])


def _state(model, opt, sched):
    return snapshot((model.state_dict(), opt.state_dict(), sched.state_dict()))


def _restore(url):
    model = Net()
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    res = CheckpointManager(url, max_file_bytes=MAX_FILE_BYTES).restore(models=model, optimizers=opt,
                                                                         schedulers=sched)
    return res, _state(model, opt, sched)


@pytest.mark.parametrize("point,file", POINTS, ids=[f"{p}:{f}" if f else p for p, f in POINTS])
def test_crash_at_every_point_of_the_save(ckpt_url, point, file):
    model, opt, sched = simple_run()
    mgr = CheckpointManager(ckpt_url, max_file_bytes=MAX_FILE_BYTES)
    mgr.save(10, models=model, optimizers=opt, schedulers=sched, loss=1.0)
    at_10 = _state(model, opt, sched)
    for i in range(3):
        train_step(model, opt, sched, seed=50 + i)
    at_20 = _state(model, opt, sched)
    reached = []

    def crash(name, info):
        if name == point and info.get("step") == 20 and (file is None or info.get("file") == file):
            reached.append(name)
            raise faults.FaultInjected(f"crash at {name}")

    faults.install(crash)
    if point == "save.after_commit":  # the record is written: the save reports success (and logs the error)
        mgr.save(20, models=model, optimizers=opt, schedulers=sched, loss=0.5)
    else:
        with pytest.raises((CheckpointError, faults.FaultInjected)):
            mgr.save(20, models=model, optimizers=opt, schedulers=sched, loss=0.5)
    faults.install(None)
    assert reached == [point]  # the fault really fired where intended
    assert len([n for n in Storage(ckpt_url).listdir("step-000000020") if n.startswith("data-")]) >= 1

    # The restart: a new manager on the same folder.
    committed = point == "save.after_commit"
    res, got = _restore(ckpt_url)
    assert res.step == (20 if committed else 10)
    assert_bitwise(at_20 if committed else at_10, got)
    visible = [i.name for i in list_checkpoints(Storage(ckpt_url))]
    assert visible == (["step-000000010", "step-000000020"] if committed else ["step-000000010"])

    # Training resumes and saves step 20 again: the leftover folder neither blocks nor is overwritten.
    mgr2 = CheckpointManager(ckpt_url, max_file_bytes=MAX_FILE_BYTES)
    model2 = Net()
    opt2 = torch.optim.AdamW(model2.parameters())
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=1)
    model2.load_state_dict(at_20[0]), opt2.load_state_dict(at_20[1]), sched2.load_state_dict(at_20[2])
    mgr2.save(20, models=model2, optimizers=opt2, schedulers=sched2, loss=0.5)
    assert "step-000000020-a1" in ckpt_names(ckpt_url)
    res, got = _restore(ckpt_url)
    assert res.step == 20 and res.name == "step-000000020-a1"
    assert_bitwise(at_20, got)


def test_step_20_save_spans_the_expected_number_of_files(ckpt_url):
    model, opt, sched = simple_run()
    CheckpointManager(ckpt_url, max_file_bytes=MAX_FILE_BYTES).save(20, models=model, optimizers=opt,
                                                                    schedulers=sched)
    files = [n for n in Storage(ckpt_url).listdir("step-000000020") if n.startswith("data-")]
    assert files == [data_file_name(0, i) for i in range(N_FILES)]


def test_crash_during_the_very_first_save_is_a_fresh_start(ckpt_url):
    model, _, _ = simple_run()

    def crash(name, info):
        if name == "save.before_commit":
            raise faults.FaultInjected("crash")

    faults.install(crash)
    with pytest.raises(CheckpointError):
        CheckpointManager(ckpt_url).save(1, models=model)
    faults.install(None)
    assert CheckpointManager(ckpt_url).restore(models=Net()) is None


def test_enospc_while_writing_is_a_clean_checkpoint_error(ckpt_url):
    model, _, _ = simple_run()
    mgr = CheckpointManager(ckpt_url)
    mgr.save(1, models=model)

    def full(name, info):
        if name == "save.data_file":
            raise OSError(28, "No space left on device")

    faults.install(full)
    with pytest.raises(CheckpointError, match="No space left"):
        mgr.save(2, models=model)
    faults.install(None)
    assert CheckpointManager(ckpt_url).restore(models=Net()).step == 1


def test_stale_attempts_are_cleaned_once_a_later_checkpoint_commits(ckpt_url):
    """An interrupted save's folder is kept while it is the newest thing there (for a look), and removed
    by retention in a later run, once a newer checkpoint is committed."""
    model, _, _ = simple_run()
    mgr = CheckpointManager(ckpt_url)
    mgr.save(1, models=model)

    def crash(name, info):
        if name == "save.after_manifest":
            raise faults.FaultInjected("crash")

    faults.install(crash)
    with pytest.raises(CheckpointError):
        mgr.save(2, models=model)
    faults.install(None)
    mgr.save(3, models=model)  # same run: the dead attempt is older than the newest commit now
    assert "step-000000002" not in ckpt_names(ckpt_url)
