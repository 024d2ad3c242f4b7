"""A rank dies in the middle of a checkpoint: nothing half-written becomes visible, nobody hangs, and the
next run resumes from the previous checkpoint and ends bitwise equal to an uninterrupted run."""

from __future__ import annotations

import pytest

from trainer_helpers import (all_checkpoint_folders, assert_same_final, base_env, committed_steps,
                             free_port, resumed_from, standalone_cmd, torchrun_cmd, wait_gone)

SHORT_TIMEOUTS = ("dist.timeout_s=20", "checkpoint.timeout_s=20")
BOUND_S = 90  # a run whose rank died must be over within this


@pytest.mark.parametrize("fault", [
    "save.data_file:sigkill:rank=1:step=50",     # rank 1 dies right after writing its data file of step 50
    "save.before_commit:sigkill:rank=0:step=50",  # rank 0 dies with the manifest written, COMMIT not yet
], ids=["rank1-data-file", "rank0-before-commit"])
def test_rank_dies_during_save(fault, runner, tmp_path, ref):
    """The run ends (bounded time, no hang) with step 25 the newest committed checkpoint and step 50's folder
    left uncommitted; the rerun removes that leftover (it holds the lease, so no live job can own it), resumes
    from 25, commits step 50 afresh and ends bitwise equal."""
    first = runner.run("crashed", torchrun_cmd(tmp_path, *SHORT_TIMEOUTS), env=base_env(HARNESS_FAULT=fault),
                       timeout=BOUND_S)
    assert first.rc != 0, first.tail()
    assert first.elapsed < BOUND_S
    assert committed_steps(tmp_path / "ck") == [25]
    assert "step-000000050" in all_checkpoint_folders(tmp_path / "ck")  # there, but not committed

    second = runner.run("rerun", torchrun_cmd(tmp_path))
    assert second.rc == 0, second.tail()
    assert resumed_from(second.log()) == [25, 25]
    assert "removed uncommitted checkpoint folder step-000000050" in second.log()  # no leaked save
    assert "checkpoint step-000000050 committed" in second.log()
    assert_same_final(tmp_path, ref)


def test_surviving_rank_exits_on_its_own_without_torchrun(runner, tmp_path):
    """Two ranks launched by hand (env:// rendezvous, no agent to tear the group down): rank 1 dies while
    writing step 50; rank 0 must notice and exit non-zero by itself within the bound, not hang, and
    nothing of step 50 is committed."""
    port = free_port()
    fault = "save.data_file:sigkill:rank=1:step=50"
    procs = []
    for rank in (0, 1):
        env = base_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port), HARNESS_FAULT=fault)
        procs.append(runner.start(f"rank{rank}", standalone_cmd(tmp_path, *SHORT_TIMEOUTS), env=env))
    assert procs[1].wait(BOUND_S) == -9, procs[1].tail()
    rc0 = procs[0].wait(BOUND_S)
    assert rc0 not in (0, 143, 138), procs[0].tail()
    assert procs[0].elapsed < BOUND_S
    wait_gone([p.pid for p in procs])
    assert committed_steps(tmp_path / "ck") == [25]
