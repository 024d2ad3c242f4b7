"""CheckpointManager.hold_folder: one job per checkpoint folder for a loop of your own, as `harness train` has.

Two own-loop jobs pointed at one folder by mistake (a copied script, a requeued job whose old allocation still
runs) each applied retention to the other's checkpoints and resumed from them. A real second process here."""

from __future__ import annotations

import sys
import textwrap
import time

import pytest
import torch

from ckpt_helpers import simple_run
from harness import CheckpointManager
from harness.lease import LEASE_FILE, LeaseError
from trainer_helpers import wait_until

HOLDER = textwrap.dedent("""
    import os, sys, time
    import torch
    from harness import CheckpointError, CheckpointManager
    ck, go = sys.argv[1], sys.argv[2]
    mgr = CheckpointManager(ck)
    mgr.hold_folder(run_id="job-a")
    print("held", flush=True)
    while not os.path.exists(go):
        time.sleep(0.05)
    model = torch.nn.Linear(2, 2)
    try:
        mgr.save(1, models=model)
        print("saved", flush=True)
    except CheckpointError as exc:
        print("refused:", exc, flush=True)
    mgr.close()
""")


def test_a_second_job_is_refused_and_a_restart_of_the_same_job_takes_the_folder_back(runner, tmp_path):
    ck, go = tmp_path / "ck", tmp_path / "go"
    holder = runner.start("holder", [sys.executable, "-c", HOLDER, str(ck), str(go)])
    wait_until("the lease", lambda: "held" in holder.log(), [holder], timeout=60)

    other = CheckpointManager(ck)
    t0 = time.monotonic()
    with pytest.raises(LeaseError) as refused:
        other.hold_folder(run_id="job-b", lease_timeout_s=30)  # it beats: refused well before 30 s
    assert f"pid {holder.pid}" in str(refused.value) and time.monotonic() - t0 < 25, str(refused.value)
    model, opt, _ = simple_run()

    again = CheckpointManager(ck)
    assert again.hold_folder(run_id="job-a") is True  # the same job restarted: at once
    go.touch()
    assert holder.wait(60) == 0
    assert "refused:" in holder.log() and "was taken over by" in holder.log(), holder.tail()
    again.save(2, models=model, optimizers=opt)
    again.close()
    assert not (ck / LEASE_FILE).exists()  # released by close()
    assert [p.name for p in sorted(ck.glob("step-*"))] == ["step-000000002"]  # the refused job wrote nothing


def test_hold_folder_is_free_to_call_twice_and_a_closed_lease_is_free_for_another_job(tmp_path):
    ck = tmp_path / "ck"
    first = CheckpointManager(ck)
    assert first.hold_folder(run_id="one") is True and first.hold_folder(run_id="one") is True
    first.save(1, models=torch.nn.Linear(2, 2))
    first.close()
    second = CheckpointManager(ck)
    assert second.hold_folder(run_id="two") is True  # released: no watch, no wait
    second.close()
