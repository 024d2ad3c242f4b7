"""Exact resume of real torchrun runs (2 gloo ranks on CPU) after kills at random and chosen moments, after
a worker crash that torchrun repairs by itself, and across two torchrun agents ("nodes") on one machine.

Every test ends by comparing the run's final checkpoint with an uninterrupted reference run, bit for bit.
"""

from __future__ import annotations

import os
import random
import signal
import time
import uuid

import pytest

from trainer_helpers import (EVERY, MAX_STEPS, SLOW, STEPS_PER_EPOCH, assert_same_final, base_env,
                             committed_steps, events, free_port, kill_tree, resumed_from, torchrun_cmd,
                             wait_gone, wait_until)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sigkill_at_random_moment_resumes_bitwise(mode, runner, tmp_path, ref):
    """SIGKILL at a random moment after the first commit, then the same command again: the run finishes with
    exactly the reference's state. sync: kill -9 of the torchrun agent's process group only (the workers,
    in sessions of their own, must notice and exit by themselves); async (checkpoint.async=true): the
    whole process tree at once, as a node failure does."""
    seed = int(os.environ.get("HARNESS_TEST_KILL_SEED") or random.randrange(1 << 30))
    print(f"random kill seed: {seed} (replay: HARNESS_TEST_KILL_SEED={seed})")
    rng = random.Random(seed)
    sets = [f"checkpoint.async={'true' if mode == 'async' else 'false'}"]
    first = runner.start("killed", torchrun_cmd(tmp_path, SLOW, *sets))
    wait_until("the first committed checkpoint", lambda: committed_steps(tmp_path / "ck"), [first], timeout=90)
    delay = rng.uniform(0.0, 1.0)
    print(f"killing {delay:.3f} s after the first commit")
    time.sleep(delay)
    assert first.poll() is None, f"run ended before the kill:\n{first.tail()}"
    workers = first.workers()
    assert len(workers) == 2, workers
    if mode == "sync":
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(30)
        wait_gone(workers, timeout=10)  # the launcher watchdog (or the peer's exit) ends each worker
        assert "torchrun agent (pid" in first.log(), first.tail()
    else:
        pids = kill_tree(first, signal.SIGKILL)
        first.wait(30)
        wait_gone(pids)
    before = committed_steps(tmp_path / "ck")
    assert before and before[-1] < MAX_STEPS, f"kill came too late to interrupt anything: {before}"

    second = runner.run("rerun", torchrun_cmd(tmp_path, *sets))
    assert second.rc == 0, second.tail()
    resumed = resumed_from(second.log())
    assert resumed == [before[-1]] * 2, (resumed, before)
    assert_same_final(tmp_path, ref)


def test_fault_sigkill_one_rank_mid_epoch_resumes_bitwise(runner, tmp_path, ref):
    """HARNESS_FAULT kills rank 1 at step 63 (no checkpoint step, not an epoch boundary); torchrun tears the
    group down; the rerun resumes from step 50 (a checkpoint on an epoch's last batch) and ends bitwise equal."""
    step = 63
    assert step % EVERY and step % STEPS_PER_EPOCH
    env = base_env(HARNESS_FAULT=f"train.step:sigkill:step={step}:rank=1")
    first = runner.run("killed", torchrun_cmd(tmp_path), env=env)
    assert first.rc != 0, first.tail()
    assert committed_steps(tmp_path / "ck")[-1] == 50

    second = runner.run("rerun", torchrun_cmd(tmp_path))
    assert second.rc == 0, second.tail()
    assert resumed_from(second.log()) == [50, 50]  # rank 0 and rank 1
    assert_same_final(tmp_path, ref)


def test_worker_crash_torchrun_restarts_in_one_invocation(runner, tmp_path, ref):
    """rank 1 is SIGKILLed once at step 63; torchrun --max-restarts 2 restarts both workers, which resume from
    step 50 and finish: exit 0 from a single torchrun invocation, final state equal to the reference."""
    marker = tmp_path / "fault-fired"
    env = base_env(HARNESS_FAULT=f"train.step:sigkill:step=63:rank=1:once={marker}")
    proc = runner.run("restarted", torchrun_cmd(tmp_path, max_restarts=2), env=env)
    assert proc.rc == 0, proc.tail()
    assert marker.exists(), "the fault never fired"
    log = proc.log()
    assert resumed_from(log) == [50, 50], log[-3000:]  # rank 0 and rank 1 of the restarted group
    assert [e["step"] for e in events(tmp_path, "resume")] == [50]
    assert_same_final(tmp_path, ref)


def test_two_agents_killed_and_restarted_resume_bitwise(runner, tmp_path, ref):
    """Two torchrun agents (--nnodes 2, one worker each, c10d rendezvous on loopback) are SIGKILLed together
    after the first checkpoint, restarted, and finish with exactly the 2-rank reference state."""

    def launch(tag: str, *sets: str) -> list:
        port, rdzv = free_port(), f"harness-{uuid.uuid4().hex[:8]}"
        return [runner.start(f"{tag}-node{n}", torchrun_cmd(tmp_path, *sets, nproc=1, nnodes=2, port=port,
                                                             rdzv_id=rdzv, node_rank=n)) for n in (0, 1)]

    nodes = launch("first", SLOW)
    wait_until("the first committed checkpoint", lambda: committed_steps(tmp_path / "ck"), nodes, timeout=90)
    pids = [p for n in nodes for p in kill_tree(n, signal.SIGKILL)]
    for n in nodes:
        n.wait(30)
    wait_gone(pids)
    before = committed_steps(tmp_path / "ck")
    assert before[-1] < MAX_STEPS, before

    nodes = launch("second")
    for n in nodes:
        assert n.wait() == 0, n.tail()
    resumed = sorted(s for n in nodes for s in resumed_from(n.log()))
    assert resumed == [before[-1]] * 2, (resumed, before)
    assert_same_final(tmp_path, ref)
