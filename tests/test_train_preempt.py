"""Preemption: SIGTERM (and SIGUSR1) make the trainer commit a checkpoint at the current step and exit with
128+signal, under torchrun (signal to the agent, which forwards it, or to one worker) and standalone."""

from __future__ import annotations

import os
import signal

import pytest

from trainer_helpers import (MAX_STEPS, SLOW, assert_same_final, committed_steps, events, last_logged_step,
                             resumed_from, standalone_cmd, torchrun_cmd, wait_until, worker_exit_codes)

MID = 30  # signal once rank 0 has logged this step: past the first checkpoint (25), well before the end


def _signal_mid_run(proc, tmp_path, send) -> int:
    """Wait until the run is past its first checkpoint, send the signal, return the step logged by then."""
    wait_until(f"step {MID}", lambda: committed_steps(tmp_path / "ck") and last_logged_step(tmp_path) >= MID,
               [proc], timeout=90)
    at = last_logged_step(tmp_path)
    send()
    return at


def _preempted_checkpoint(tmp_path, at: int, signame: str) -> int:
    """The run recorded a preemption at or after step ``at`` and its checkpoint is committed."""
    pre = events(tmp_path, "preempted")
    assert len(pre) == 1 and pre[0]["signal"] == signame, pre
    step = pre[0]["step"]
    assert at <= step < MAX_STEPS, (at, step)  # zero steps lost: nothing done before the signal is redone
    assert committed_steps(tmp_path / "ck")[-1] == step
    assert not events(tmp_path, "done")
    return step


def test_sigterm_to_torchrun_agent_checkpoints_and_resumes_bitwise(runner, tmp_path, ref):
    """SIGTERM to the torchrun agent: it forwards SIGTERM to both workers, which commit a checkpoint at the
    current step and exit 143; the rerun resumes at exactly that step and ends bitwise equal."""
    proc = runner.start("preempted", torchrun_cmd(tmp_path, SLOW))
    at = _signal_mid_run(proc, tmp_path, lambda: proc.popen.send_signal(signal.SIGTERM))
    rc = proc.wait(60)
    assert rc != 0, proc.tail()  # bare torchrun exits 1 when signalled: its codes are its own (harness launch: 143)
    log = proc.log()
    assert log.count("exiting with 143 so the scheduler requeues") == 2, log[-3000:]
    step = _preempted_checkpoint(tmp_path, at, "SIGTERM")

    second = runner.run("rerun", torchrun_cmd(tmp_path))
    assert second.rc == 0, second.tail()
    assert resumed_from(second.log()) == [step, step]
    assert_same_final(tmp_path, ref)


def test_sigterm_to_one_worker_exits_143_with_checkpoint(runner, tmp_path):
    """SIGTERM to rank 1's process only (found as a child of the agent in /proc): the ranks agree on it at the
    next step, both commit one checkpoint and exit 143, as torchrun's failure report shows."""
    proc = runner.start("preempted", torchrun_cmd(tmp_path, SLOW))
    wait_until("both workers", lambda: len(proc.workers()) == 2, [proc], timeout=60)
    at = _signal_mid_run(proc, tmp_path, lambda: os.kill(proc.worker_of_rank(1), signal.SIGTERM))
    assert proc.wait(60) != 0, proc.tail()
    codes = worker_exit_codes(proc.log())
    assert codes.get(1) == 143, (codes, proc.tail())
    assert set(codes.values()) == {143}, codes
    _preempted_checkpoint(tmp_path, at, "SIGTERM")


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGUSR1, 138)], ids=["SIGTERM", "SIGUSR1"])
def test_standalone_signal_checkpoints_and_exits_128_plus_signal(sig, code, runner, tmp_path):
    """A single `python -m harness train` process (no torchrun) commits a checkpoint on SIGTERM/SIGUSR1 and
    exits 128+signal (143/138), so a scheduler requeues it."""
    proc = runner.start("standalone", standalone_cmd(tmp_path, SLOW))
    at = _signal_mid_run(proc, tmp_path, lambda: os.kill(proc.pid, sig))
    assert proc.wait(60) == code, proc.tail()
    _preempted_checkpoint(tmp_path, at, sig.name)
