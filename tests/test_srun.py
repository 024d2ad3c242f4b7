"""``srun --ntasks-per-node=N harness train`` (SLURM starting every rank itself, no torchrun): the tasks read
SLURM's variables into torchrun's (harness/srun.py) and train as one job. Before, every task was rank 0 of 1,
they took the folder's lease from each other (same job id) and all but one exited 3.

No SLURM here: the end-to-end test starts the two tasks with the environment srun gives its tasks, and
signals both at once, as ``scancel`` (or a time limit) does."""

from __future__ import annotations

import os
import signal
import socket

import pytest

from harness import srun
from harness.errors import ConfigError
from trainer_helpers import (SLOW, assert_same_final, base_env, committed_steps, launch_cmd, listening, resumed_from,
                             standalone_cmd, wait_until)

TASK_ENV = {"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "2", "SLURM_NODEID": "0",
            "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_STEP_NODELIST": "localhost", "SLURM_JOB_NODELIST": "localhost"}


def _task(rank: int, **more: str) -> dict[str, str]:
    return {**TASK_ENV, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_JOB_ID": "123456", **more}


# -- reading SLURM's variables ------------------------------------------------------------------------------

def test_a_task_of_a_step_becomes_a_rank_with_torchruns_variables():
    env = _task(1)
    task = srun.adopt(env)
    assert task == srun.SrunTask(rank=1, world=2, local_rank=1, local_world=2, master_addr="localhost",
                                 master_port=srun.PORT_BASE + 123456 % srun.PORT_SPAN)
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                                "MASTER_PORT")} == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
                                                    "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "localhost",
                                                    "MASTER_PORT": "18456"}
    assert srun.adopt(env) is None  # once torchrun's variables are there, nothing more to do


@pytest.mark.parametrize("env", [
    {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"},  # the batch script
    _task(0, SLURM_STEP_NUM_TASKS="1"),                                 # srun -n 1
    _task(0, RANK="0", WORLD_SIZE="2", LOCAL_RANK="0"),                 # torchrun (or harness launch) inside srun
    _task(0, TORCHELASTIC_RUN_ID="job"),
    {},                                                                 # no SLURM at all
])
def test_processes_srun_did_not_start_as_ranks_are_left_alone(env):
    before = dict(env)
    assert srun.adopt(env) is None
    assert env == before


def test_the_users_master_address_and_port_win():
    env = _task(0, MASTER_ADDR="10.0.0.5", MASTER_PORT="29511")
    task = srun.adopt(env)
    assert (task.master_addr, task.master_port) == ("10.0.0.5", 29511)


@pytest.mark.parametrize("nodelist, first", [
    ("gpu[07-09,12],cpu01", "gpu07"), ("rack[1-2]-n[01-04]", "rack1-n01"), ("node01", "node01"),
    ("a1,b2", "a1"), ("x[003]", "x003"), ("n[1-3],m[5-6]", "n1"), ("node-[10-12]", "node-10"),
])
def test_the_first_host_of_a_slurm_hostlist(nodelist, first):
    assert srun.first_host(nodelist) == first


@pytest.mark.parametrize("node, tasks", [("0", 4), ("1", 4), ("2", 3)])
def test_tasks_per_node_follow_slurms_compressed_counts(node, tasks):
    task = srun.detect(_task(0, SLURM_STEP_NUM_TASKS="11", SLURM_NODEID=node, SLURM_STEP_TASKS_PER_NODE="4(x2),3"))
    assert task.local_world == tasks


@pytest.mark.parametrize("env, words", [
    (_task(2), "SLURM_PROCID=2 is not below SLURM_STEP_NUM_TASKS=2"),
    (_task(0, SLURM_PROCID=""), "without a valid SLURM_PROCID"),
    (_task(0, SLURM_STEP_NODELIST="", SLURM_JOB_NODELIST=""), "set MASTER_ADDR"),
    (_task(0, MASTER_PORT="http"), "MASTER_PORT='http' is not a port number"),
    (_task(0, SLURM_JOB_ID=""), "set MASTER_PORT"),
])
def test_a_step_whose_variables_make_no_sense_is_a_config_error(env, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        srun.detect(env)


def test_a_checkpoint_manager_in_an_srun_task_without_a_process_group_warns(monkeypatch, tmp_path, caplog):
    """A loop of your own run by srun, no init_process_group: one job whose tasks would each write the folder
    alone, or a sweep of independent runs (a folder each), which harness cannot tell apart from one process."""
    from harness import CheckpointManager
    for key, value in _task(1).items():
        monkeypatch.setenv(key, value)
    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    mgr = CheckpointManager(str(tmp_path / "ck"))
    mgr.close()
    assert "is task 1 of 2 of an srun step and torch.distributed is not initialized" in caplog.text
    assert "harness.srun.adopt() and torch.distributed.init_process_group(...) first" in caplog.text
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun's world is one job: an error, as before
    with pytest.raises(ConfigError, match=r"launched as one of 2 \(WORLD_SIZE=2"):
        CheckpointManager(str(tmp_path / "ck2"))


# -- two real tasks ---------------------------------------------------------------------------------------

def _job_with_free_port() -> str:
    """A SLURM job id whose derived MASTER_PORT is free here (the tasks then find each other by it)."""
    for job in range(41000, 41000 + srun.PORT_SPAN, 97):
        port = srun.PORT_BASE + job % srun.PORT_SPAN
        if listening(port):
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return str(job)
    raise AssertionError("no free port in SLURM's derived range")


def _start_tasks(runner, name: str, tmp, job: str, *sets: str):
    return [runner.start(f"{name}-task{rank}", standalone_cmd(tmp, *sets),
                         env=base_env(**_task(rank, SLURM_JOB_ID=job))) for rank in (0, 1)]


def test_srun_tasks_train_as_one_job_stop_together_on_scancel_and_resume_bitwise_equal(runner, tmp_path, ref):
    job = _job_with_free_port()
    tasks = _start_tasks(runner, "first", tmp_path, job, SLOW)
    wait_until("the first checkpoint", lambda: committed_steps(tmp_path / "ck"), tasks, timeout=120)
    for task in tasks:  # scancel: SIGTERM to every task of the step at once
        os.kill(task.pid, signal.SIGTERM)
    assert [t.wait() for t in tasks] == [143, 143], "\n".join(t.tail() for t in tasks)
    head = tasks[0].log()
    assert "srun step of 2 tasks: rank 0 (SLURM_PROCID)" in head and "training on cpu: 2 rank(s)" in head, head
    step = committed_steps(tmp_path / "ck")[-1]
    assert all(f"checkpoint at step {step} committed; exiting with 143" in t.log() for t in tasks)

    again = _start_tasks(runner, "again", tmp_path, job)  # the requeued job: same id, so the same port
    assert [t.wait() for t in again] == [0, 0], "\n".join(t.tail() for t in again)
    assert [resumed_from(t.log()) for t in again] == [[step], [step]]
    assert_same_final(tmp_path, ref)  # the same bytes as a 2-rank torchrun run never interrupted


def _refused_launch(runner, tmp_path, step_nodes: str) -> str:
    """``harness launch`` as task 1 of a 2-task srun step on ``step_nodes`` nodes: exit 2, its one line, no folder."""
    env = base_env(**_task(1, SLURM_STEP_NUM_NODES=step_nodes, SLURM_JOB_ID=_job_with_free_port()))
    proc = runner.run("launch", launch_cmd(tmp_path), env=env, timeout=60)
    assert proc.rc == 2, proc.tail()
    lines = proc.log().strip().splitlines()
    assert len(lines) == 1 and not (tmp_path / "ck").exists(), lines
    return lines[0]


def test_harness_launch_as_several_srun_tasks_per_node_is_refused_before_any_worker(runner, tmp_path):
    """An sbatch header for ``srun python train.py`` (--ntasks-per-node=2) in front of the launcher."""
    line = _refused_launch(runner, tmp_path, "1")
    assert "harness launch runs as 2 srun tasks on 1 node(s)" in line, line
    assert "srun --ntasks-per-node=1 harness launch" in line


def test_harness_launch_on_several_nodes_each_a_job_of_one_node_is_refused(runner, tmp_path):
    """srun --ntasks-per-node=1 harness launch ... on 2 nodes without --nnodes: two jobs, one folder, one job id."""
    line = _refused_launch(runner, tmp_path, "2")
    assert "harness launch runs on the 2 nodes of this srun step" in line, line
    assert "with --nnodes 1: each node would be a job of its own; pass --nnodes 2" in line


def test_one_launcher_per_node_of_an_srun_step_meets_at_its_first_node(runner, tmp_path, ref):
    """srun --nodes=2 --ntasks-per-node=1 harness launch --nnodes 2 ...: no endpoint, no run id given; the
    launchers meet at the step's first node on the job's port, under the job's id (two launchers on loopback
    with the environment srun gives one task per node)."""
    job = _job_with_free_port()
    env = lambda node: base_env(**_task(node, SLURM_LOCALID="0", SLURM_NODEID=str(node), SLURM_JOB_ID=job,  # noqa: E731
                                        SLURM_STEP_NUM_NODES="2", SLURM_STEP_TASKS_PER_NODE="1(x2)"))
    nodes = [runner.start(f"node{n}", launch_cmd(tmp_path, nproc=1, nnodes=2), env=env(n)) for n in (0, 1)]
    assert [n.wait() for n in nodes] == [0, 0], "\n".join(n.tail() for n in nodes)
    port = srun.PORT_BASE + int(job) % srun.PORT_SPAN
    assert all(f"rendezvous at localhost:{port} (the srun step's first node)" in n.log() for n in nodes)
    assert "training on cpu: 2 rank(s)" in nodes[0].log() + nodes[1].log()
    assert_same_final(tmp_path, ref)


def test_the_launchers_rendezvous_of_an_srun_step_is_named_by_the_job_unless_given(monkeypatch):
    from harness.launch_args import several_nodes_endpoint
    for key, value in _task(0, SLURM_STEP_NODELIST="gpu[07-08]", SLURM_STEP_NUM_NODES="2").items():
        monkeypatch.setenv(key, value)
    for key in ("MASTER_ADDR", "MASTER_PORT", "PET_MASTER_ADDR", "PET_MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert several_nodes_endpoint("", "2", False, "") == ("gpu07:18456", "123456")
    assert several_nodes_endpoint("", "2", False, "mine") == ("gpu07:18456", "mine")
    assert several_nodes_endpoint("node9:29500", "2", False, "") == ("node9:29500", "")  # given: as it is
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.5")
    monkeypatch.setenv("MASTER_PORT", "29511")  # a scheduler's own variables come first
    assert several_nodes_endpoint("", "2", False, "") == ("10.0.0.5:29511", "")


@pytest.mark.parametrize("tasks, nodes, nnodes", [("2", "2", 2), ("2", "2", 4), ("1", "1", 1), ("", "", 1)])
def test_one_launcher_per_node_is_what_srun_should_start(tasks, nodes, nnodes):
    srun.check_launcher(nnodes, {"SLURM_STEP_NUM_TASKS": tasks, "SLURM_STEP_NUM_NODES": nodes})  # no error


def test_a_task_that_sees_one_gpu_trains_on_it_whatever_its_local_rank(monkeypatch):
    """srun --gpus-per-task=1 (or --gpu-bind) gives each task its own GPU, numbered 0 there."""
    import torch
    monkeypatch.setattr(srun, "_adopted", srun.detect(_task(1)))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert srun.cuda_index(1) == 0
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # every task sees the node's GPUs
    assert srun.cuda_index(1) == 1
    monkeypatch.setattr(srun, "_adopted", None)  # torchrun's workers: LOCAL_RANK as it is
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert srun.cuda_index(1) == 1
