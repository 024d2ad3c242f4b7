"""An elastic job (`harness launch --nnodes MIN:MAX`) that a node joins while it trains.

torch's agent takes a new node in by stopping its workers with SIGTERM and starting the group again (a
membership change, not counted in --max-restarts). The workers took that SIGTERM for a preemption: they
committed, told the launcher, and it ended the job with 143 ("workers stopped on SIGTERM"); the new node then
lost the rendezvous its host had held. Now the launcher notes the restart before its agent signals
(harness/launch_folder.py), the workers commit the step and leave without ending the job, and the group of
two resumes from that checkpoint (harness/stopping.py).
"""

from __future__ import annotations

import logging
import threading
import time

import pytest

from harness import launch_folder, stopping
from harness.launch import agent_log_level
from harness.stepsync import StopVote
from sharded_helpers import run_ranks
from trainer_helpers import committed_steps, events, free_port, launch_cmd, metrics, resumed_from, wait_until

import torch.distributed as tdist

STEPS = 240


def _elastic(tmp_path, port: int) -> list[str]:
    cmd = launch_cmd(tmp_path, "train.step_sleep_s=0.04", f"train.max_steps={STEPS}", nproc=1, nnodes="1:2",
                     endpoint=f"127.0.0.1:{port}", rdzv_id="elastic-join", max_restarts=0)
    at = cmd.index("launch") + 1  # the first node starts alone after a second, not torch's 30 s last call
    return [*cmd[:at], "--rdzv-conf", "last_call_timeout=1", *cmd[at:]]


def test_a_node_joining_an_elastic_job_restarts_the_group_without_ending_it(runner, tmp_path):
    port = free_port()
    first = runner.start("first", _elastic(tmp_path, port))
    wait_until("the first node's first checkpoint", lambda: committed_steps(tmp_path / "ck"), [first], timeout=120)
    assert "1 rank(s)" in first.log(), first.tail()
    second = runner.start("second", _elastic(tmp_path, port))
    assert [first.wait(180), second.wait(180)] == [0, 0], (first.tail(), second.tail())
    restart = events(tmp_path, "restart")
    assert len(restart) == 1 and restart[0]["signal"] == "SIGTERM", metrics(tmp_path)
    assert not events(tmp_path, "preempted")
    step = restart[0]["step"]
    assert 0 < step < STEPS and resumed_from(first.log()) == [step] and resumed_from(second.log()) == [step]
    assert "the launcher restarts the workers" in first.log() and "2 rank(s)" in first.log(), first.tail()
    assert "workers stopped on" not in first.log() + second.log()
    assert events(tmp_path, "done")[-1]["step"] == STEPS


def vote(rank: int, world: int, votes: list[tuple[int, bool]]) -> dict:
    """Each rank casts votes[rank] (signum, is it its agent's restart) for one step; the next poll agrees."""
    v = StopVote(tdist.group.WORLD)
    signum, restart = votes[rank]
    assert v.poll(signum, restart=restart) == 0  # one step late
    return {"agreed": v.poll(0), "restart": v.agent_restart}


def test_the_vote_tells_an_agent_restart_from_a_stop_and_a_stop_wins(tmp_path):
    res = run_ranks(tmp_path, vote, 2, votes=[(15, True), (0, False)])
    assert [(r["agreed"], r["restart"]) for r in res] == [(15, True)] * 2  # the rank with no signal learns it too
    res = run_ranks(tmp_path, vote, 2, votes=[(15, True), (10, False)])
    assert [(r["agreed"], r["restart"]) for r in res] == [(10, False)] * 2  # a preemption meanwhile ends the job
    res = run_ranks(tmp_path, vote, 2, votes=[(0, False), (15, False)])
    assert [(r["agreed"], r["restart"]) for r in res] == [(15, False)] * 2


def test_one_process_votes_alone():
    v = StopVote(None)
    assert (v.poll(15, restart=True), v.agent_restart) == (15, True)
    assert (v.poll(15), v.agent_restart) == (15, False)
    assert (v.poll(0), v.agent_restart) == (0, False)


@pytest.mark.parametrize("loglevel, level", [(None, logging.INFO), ("WARNING", logging.INFO), ("error", logging.INFO),
                                             ("DEBUG", logging.DEBUG), ("nonsense", logging.INFO)])
def test_the_agents_restart_record_is_read_whatever_loglevel_says(monkeypatch, loglevel, level):
    """torch's LOGLEVEL=WARNING dropped the INFO record the restart note is made from: scaling up ended the job."""
    if loglevel is None:
        monkeypatch.delenv("LOGLEVEL", raising=False)
    else:
        monkeypatch.setenv("LOGLEVEL", loglevel)
    assert agent_log_level() == level


def test_a_rank_told_by_the_vote_waits_for_its_own_agents_restart(tmp_path, monkeypatch):
    """A rank whose agent has not noticed the new node yet learns of the restart from the vote; after its
    checkpoint it waits for its own agent's note (written right before that agent's SIGTERM), so its exit is a
    restart, not a failure that spends one of --max-restarts. A note older than the worker is not about it."""
    monkeypatch.setenv(launch_folder.LAUNCH_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(stopping, "_restarted", False)  # this process's record, put back after the test
    launch_folder.mark_agent_restart(str(tmp_path))  # an earlier restart's note
    time.sleep(0.01)
    launch_folder.worker_started()
    assert not launch_folder.agent_restarting()
    assert stopping.await_agent_restart(timeout_s=0.2) is False  # never came: the caller reports a stop
    assert not stopping.stopped_for_restart()
    threading.Timer(0.3, launch_folder.mark_agent_restart, [str(tmp_path)]).start()
    t0 = time.monotonic()
    assert stopping.await_agent_restart(timeout_s=10) is True
    assert 0.25 < time.monotonic() - t0 < 5
    assert launch_folder.agent_restarting() and stopping.stopped_for_restart()  # harness train: no stop reported
