"""Going back to an earlier step for good (harness/checkpoint/rollback.py, `harness ckpt rollback`): the newer
committed checkpoints are set aside (COMMIT renamed ROLLED_BACK), so that a job and every restart of it resume
from the chosen step and the checkpoints saved from there are the newest; nothing is deleted, by retention or
prune either, and renaming the record back undoes it."""

from __future__ import annotations

import json
import logging
import os
import socket
import time

import pytest

from ckpt_helpers import Net, assert_bitwise, flip_byte, simple_run, snapshot, train_step
from export_helpers import cli
from harness import CheckpointManager, lease
from harness.checkpoint import rollback
from harness.checkpoint.discovery import list_checkpoints
from harness.checkpoint.prune import prune
from harness.errors import CheckpointError, NoCheckpointError
from harness.layout import COMMIT_FILE, ROLLED_BACK_FILE
from harness.storage import Storage


def _run(url: str, steps=(1, 2, 3, 4, 5), keep_last: int = 0) -> dict[int, dict]:
    """Checkpoints at ``steps`` of one model; the model's weights at each, by step."""
    model, opt, _ = simple_run()
    mgr = CheckpointManager(url, keep_last=keep_last)
    weights = {}
    for step in steps:
        train_step(model, opt)
        mgr.save(step, models=model, optimizers=opt)
        weights[step] = snapshot(model.state_dict())
    mgr.close()
    return weights


def _names(url: str) -> list[str]:
    return [i.name for i in list_checkpoints(Storage(url))]


def test_rollback_sets_newer_checkpoints_aside_and_the_new_branch_becomes_the_newest(ckpt_url, caplog):
    weights = _run(ckpt_url)
    st = Storage(ckpt_url)
    assert rollback.roll_back(st, 3, dry_run=True).set_aside == ["step-000000004", "step-000000005"]
    assert _names(ckpt_url)[-1] == "step-000000005"  # a dry run changes nothing
    report = rollback.roll_back(st, 3)
    assert report.set_aside == ["step-000000004", "step-000000005"] and report.target == "step-000000003"
    assert "a job started now resumes from step-000000003" in report.line()
    assert _names(ckpt_url) == ["step-000000001", "step-000000002", "step-000000003"]
    for name in report.set_aside:
        assert not st.exists(f"{name}/{COMMIT_FILE}") and st.exists(f"{name}/{ROLLED_BACK_FILE}")

    model = Net()
    mgr = CheckpointManager(ckpt_url, keep_last=2)
    caplog.clear()  # (the saves above log at INFO when an earlier test set the logger so)
    with caplog.at_level(logging.INFO, logger="harness"):
        res = mgr.restore(models=model)
    assert res.name == "step-000000003" and res.skipped == []
    assert "step-000000004" not in caplog.text and "step-000000005" not in caplog.text  # not "interrupted saves"
    assert_bitwise(weights[3], model.state_dict())
    for step in (4, 5, 6):  # the new branch: retention at keep_last=2 sets no set-aside folder's fate
        mgr.save(step, models=model)
    mgr.close()
    assert _names(ckpt_url) == ["step-000000005-a1", "step-000000006"]
    assert prune(st).folders == []  # set aside is not a leftover of a killed save
    every = list_checkpoints(st, committed_only=False)
    assert [i.name for i in every if i.rolled_back] == ["step-000000004", "step-000000005"]

    st.commit_bytes(f"step-000000004/{COMMIT_FILE}", st.read_bytes(f"step-000000004/{ROLLED_BACK_FILE}"))
    assert "step-000000004" in _names(ckpt_url)  # renamed back: a checkpoint again, as it was
    back = Net()
    assert CheckpointManager(ckpt_url).restore(models=back, step=4).name == "step-000000004"
    assert_bitwise(weights[4], back.state_dict())


def test_rollback_interrupted_leaves_the_newest_committed_and_finishes_when_run_again(ckpt_url, monkeypatch):
    """Oldest first: an interrupted rollback leaves the newest checkpoints committed (a job resumes from the
    newest, as if nothing happened), never a middle one as the newest; the same call finishes it."""
    _run(ckpt_url)
    st = Storage(ckpt_url)
    real, calls = rollback.set_aside, []

    def once_then_fail(storage, name):
        if calls:
            raise OSError("killed")
        calls.append(name)
        real(storage, name)

    monkeypatch.setattr(rollback, "set_aside", once_then_fail)
    with pytest.raises(OSError):
        rollback.roll_back(st, 2)
    assert calls == ["step-000000003"] and _names(ckpt_url)[-1] == "step-000000005"
    monkeypatch.setattr(rollback, "set_aside", real)
    assert rollback.roll_back(st, 2).set_aside == ["step-000000004", "step-000000005"]
    assert _names(ckpt_url) == ["step-000000001", "step-000000002"]


def test_rollback_refuses_a_missing_or_damaged_step_and_changes_nothing(ckpt_url):
    _run(ckpt_url, steps=(10, 20, 30))
    st = Storage(ckpt_url)
    with pytest.raises(NoCheckpointError, match=r"no committed checkpoint at step 15 .*newest steps: 10, 20, 30"):
        rollback.roll_back(st, 15)
    flip_byte(ckpt_url, f"step-000000020/{COMMIT_FILE}", 30)
    with pytest.raises(CheckpointError, match="step-000000020 is damaged, not rolled back to"):
        rollback.roll_back(st, 20)
    st.write_bytes("step-000000010/manifest.json", b"{}")  # its commit record says another size
    with pytest.raises(CheckpointError, match="manifest.json is 2 bytes"):
        rollback.roll_back(st, 10)
    assert [i.name for i in list_checkpoints(st, committed_only=False) if i.rolled_back] == []
    assert rollback.roll_back(st, 30).set_aside == []
    assert "is the newest committed checkpoint already" in rollback.roll_back(st, 30).line()


def test_restoring_an_earlier_step_warns_that_a_restart_resumes_from_the_newer_ones(ckpt_url, caplog):
    _run(ckpt_url, steps=(1, 2, 3))
    with caplog.at_level(logging.WARNING, logger="harness"):
        CheckpointManager(ckpt_url).restore(models=Net(), step=1)
    assert "restored step-000000001, but step-000000002, step-000000003 are newer: a restart resumes from " \
           "step-000000003" in caplog.text and "harness ckpt rollback" in caplog.text and "--step 1" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="harness"):
        CheckpointManager(ckpt_url).restore(models=Net(), step=3)
        CheckpointManager(ckpt_url).restore(models=Net())
    assert "are newer" not in caplog.text and "is newer" not in caplog.text


def test_cli_rollback_refuses_while_a_live_job_holds_the_folder(tmp_path, capsys):
    url = str(tmp_path / "ck")
    _run(url, steps=(1, 2, 3))
    st = Storage(url)
    st.commit_bytes(lease.LEASE_FILE, json.dumps({
        "run_id": "other-job", "host": socket.gethostname(), "pid": os.getpid(), "token": "t",
        "started": time.time(), "heartbeat": time.time()}).encode())
    assert cli("ckpt", "rollback", url, "--step", "1") == 3
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "in use by a live job" in err and "not rolling back" in err, err
    assert _names(url)[-1] == "step-000000003"
    st.remove(lease.LEASE_FILE)
    assert cli("ckpt", "rollback", url, "--step", "1") == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "set aside 2 newer checkpoints (step-000000002, step-000000003)" in out
    assert cli("ckpt", "list", url, "--all") == 0
    table = capsys.readouterr().out
    assert table.count("rolled back (its ROLLED_BACK record renamed to COMMIT restores it)") == 2, table
    assert cli("ckpt", "rollback", url, "--step", "7") == 1
    assert "no committed checkpoint at step 7" in capsys.readouterr().err


def test_a_job_rolled_back_resumes_there_and_its_restarts_stay_on_the_new_branch(runner, tmp_path):
    """`harness launch` to step 120, `harness ckpt rollback --step 50`, launch again: it resumes from 50; that
    run SIGKILLed at step 88 (fault seam) and launched again resumes from 75-a1, the new branch's newest, not
    from the set-aside 100 or 120 (before the rollback it would have: they are newer), and finishes at 120."""
    import subprocess
    import sys

    from trainer_helpers import base_env, launch_cmd, resumed_from

    sets = ["checkpoint.keep_last=0"]
    first = runner.run("first", launch_cmd(tmp_path, *sets))
    assert first.rc == 0, first.tail()
    ck = tmp_path / "ck"
    out = subprocess.run([sys.executable, "-m", "harness", "ckpt", "rollback", str(ck), "--step", "50"],
                         env=base_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "set aside 3 newer checkpoints (step-000000075, step-000000100, " \
        "step-000000120)" in out.stdout, out.stdout + out.stderr
    killed = runner.run("killed", launch_cmd(tmp_path, *sets),
                        env=base_env(HARNESS_FAULT="train.step:sigkill:step=88:rank=1"))
    assert killed.rc != 0 and resumed_from(killed.log()) == [50, 50], killed.tail()
    again = runner.run("again", launch_cmd(tmp_path, *sets))
    assert again.rc == 0 and resumed_from(again.log()) == [75, 75], again.tail()
    assert "resumed from step-000000075-a1" in again.log(), again.tail()
    assert _names(str(ck))[-3:] == ["step-000000075-a1", "step-000000100-a1", "step-000000120-a1"]
    assert sorted(p.name for p in ck.glob(f"step-*/{ROLLED_BACK_FILE}")) == [ROLLED_BACK_FILE] * 3
