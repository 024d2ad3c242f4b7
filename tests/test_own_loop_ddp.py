"""examples/own_loop_ddp.py under real torchrun (2 gloo ranks): a loop of your own stopped by a scheduler's
signal commits the step every rank agreed on (harness.StopSignals) and a rerun ends bit for bit where an
uninterrupted run ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from harness import StopSignals
from trainer_helpers import REPO, base_env, committed_steps, wait_until

EXAMPLE = REPO / "examples" / "own_loop_ddp.py"
STEPS = 3000


def _cmd(ck: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "--monitor-interval", "0.1", str(EXAMPLE), str(STEPS), str(ck)]


def _identical(a: Path, b: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness", "ckpt", "diff", str(a), str(b), "--step-a", str(STEPS),
                           "--step-b", str(STEPS), "--ranks"],  # every rank's RNG and data position too
                          env=base_env(), capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    ck = tmp_path_factory.mktemp("straight") / "ck"
    out = subprocess.run(_cmd(ck), cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    return ck


@pytest.mark.parametrize("how", ["SIGTERM to torchrun", "SIGUSR1 to rank 1 alone"])
def test_a_signal_stops_every_rank_at_one_step_and_the_rerun_ends_bitwise_equal(how, straight, runner, tmp_path):
    ck = tmp_path / "ck"
    first = runner.start("first", _cmd(ck))
    wait_until("the first checkpoint", lambda: committed_steps(ck), [first], timeout=120)
    if how.startswith("SIGTERM"):
        os.kill(first.pid, signal.SIGTERM)  # torchrun passes it on to its workers
    else:
        os.kill(first.worker_of_rank(1), signal.SIGUSR1)  # SLURM's warning, here to one process only
    assert first.wait(120) == 1, first.tail()  # torchrun's code for any worker that did not exit 0
    sig = 15 if how.startswith("SIGTERM") else 10
    lines = [ln for ln in first.log().splitlines() if f": signal {sig}: checkpoint of step " in ln]
    assert len(lines) == 2, first.tail()  # both ranks, the same step
    stopped = {int(ln.rsplit("step ", 1)[1].split()[0]) for ln in lines}
    assert len(stopped) == 1 and committed_steps(ck)[-1] == stopped.pop() < STEPS, (lines, committed_steps(ck))
    step = committed_steps(ck)[-1]

    second = runner.run("second", _cmd(ck), timeout=180)
    assert second.rc == 0, second.tail()
    assert second.log().count(f"resumed from step-{step:09d} at step {step}") == 2, second.tail()
    diff = _identical(straight, ck)
    assert diff.returncode == 0 and "identical" in diff.stdout, diff.stdout + diff.stderr


def test_stop_signals_in_one_process():
    """Without torch.distributed: the signal is its own agreement; after a stop, close() ignores more."""
    sigs = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)
    before = {sig: signal.getsignal(sig) for sig in sigs}
    stop = StopSignals()
    try:
        assert stop.requested() == 0 and stop.exit_code == 0
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.requested() == signal.SIGUSR2 and stop.exit_code == 128 + signal.SIGUSR2
        os.kill(os.getpid(), signal.SIGTERM)  # recorded, not fatal; the first signal stays the answer
        assert stop.requested() == signal.SIGUSR2
    finally:
        stop.close()
    assert all(signal.getsignal(sig) is signal.SIG_IGN for sig in sigs)
    for sig, handler in before.items():
        signal.signal(sig, handler)


def test_without_a_signal_close_gives_the_handlers_back():
    before = signal.getsignal(signal.SIGTERM)
    stop = StopSignals()
    assert signal.getsignal(signal.SIGTERM) is not before
    stop.close()
    assert signal.getsignal(signal.SIGTERM) is before and stop.exit_code == 0
