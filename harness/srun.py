"""Ranks from SLURM's own task launch: ``srun --ntasks-per-node=N harness train ...`` without torchrun.

srun starts every task of a step itself and tells each one who it is (``SLURM_PROCID``, ``SLURM_LOCALID``,
``SLURM_STEP_NUM_TASKS``, ``SLURM_STEP_NODELIST``), not in torchrun's variables. A process that only read
torchrun's saw itself as rank 0 of 1: every task of the step trained alone on the same checkpoint folder (each
took the folder's lease from the others, since they share the job id) and all but one ended with exit 3.
Lightning reads SLURM's variables the same way, so ``srun python train.py`` is a habit users bring.

:func:`adopt` turns them into torchrun's (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
MASTER_PORT) before anything reads those, so the rest of harness sees an ordinary multi-process launch. It
acts only inside a step of several tasks (srun sets ``SLURM_STEP_NUM_TASKS`` for its tasks; a batch script
itself, with ``SLURM_NTASKS`` set, runs one process and is left alone) and never over torchrun's own
variables (``harness launch`` or torchrun inside srun: their workers are described by their agent).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import MutableMapping

from harness.errors import ConfigError

PORT_BASE = 15000   # MASTER_PORT = PORT_BASE + job id % PORT_SPAN unless set: what Lightning derives, so two
PORT_SPAN = 10000   # jobs sharing a node rarely pick the same port, and below Linux's ephemeral range (32768)
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID")

_adopted: "SrunTask | None" = None  # what adopt() set in this process, for the trainer's log line


@dataclass(frozen=True)
class SrunTask:
    """This process as one task of an srun step."""

    rank: int
    world: int
    local_rank: int
    local_world: int
    master_addr: str
    master_port: int

    def line(self) -> str:
        return (f"srun step of {self.world} tasks: rank {self.rank} (SLURM_PROCID), process group at "
                f"{self.master_addr}:{self.master_port}; no agent restarts in place: a failure ends the step "
                f"and the job's requeue resumes it (launch/slurm.sbatch runs harness launch instead)")


def step_tasks(env: MutableMapping[str, str] | None = None) -> int:
    """The number of tasks of the srun step this process is one of (0 when it is not an srun task)."""
    env = os.environ if env is None else env
    value = env.get("SLURM_STEP_NUM_TASKS", "").strip()
    return int(value) if value.isdigit() else 0


def detect(env: MutableMapping[str, str] | None = None) -> SrunTask | None:
    """This process as a task of a multi-task srun step, or None (not under srun, one task, or torchrun's
    variables already set). A step whose variables do not make sense is a ConfigError."""
    env = os.environ if env is None else env
    world = step_tasks(env)
    if world <= 1 or any(env.get(name) for name in TORCHRUN_VARS):
        return None
    rank, local = _number(env, "SLURM_PROCID"), _number(env, "SLURM_LOCALID")
    if rank >= world:
        raise ConfigError(f"SLURM_PROCID={rank} is not below SLURM_STEP_NUM_TASKS={world}")
    return SrunTask(rank, world, local, _local_world(env, local), *_master(env))


def adopt(env: MutableMapping[str, str] | None = None) -> SrunTask | None:
    """Set torchrun's variables from SLURM's when this process is an srun task (see :func:`detect`).
    Idempotent: once set, torchrun's variables are there and a second call does nothing."""
    global _adopted
    env = os.environ if env is None else env
    task = detect(env)
    if task is None:
        return None
    if env is os.environ:
        _adopted = task
    env.update({"RANK": str(task.rank), "WORLD_SIZE": str(task.world), "LOCAL_RANK": str(task.local_rank),
                "LOCAL_WORLD_SIZE": str(task.local_world), "MASTER_ADDR": task.master_addr,
                "MASTER_PORT": str(task.master_port)})
    return task


def check_launcher(max_nodes: int, env: MutableMapping[str, str] | None = None) -> None:
    """``harness launch`` started by srun the way it cannot work, a ConfigError before any worker starts:

    * several tasks per node (an sbatch header written for ``srun python train.py``, ``--ntasks-per-node=8``,
      in front of the launcher): each launcher would start its own workers, 8 jobs of 8 ranks on each node;
    * one per node on several nodes, each a job of one node (no ``--nnodes``): independent jobs on one folder
      under one job id, taking its lease from each other."""
    env = os.environ if env is None else env
    tasks, nodes = step_tasks(env), env.get("SLURM_STEP_NUM_NODES", "").strip()
    if tasks <= 1 or not nodes.isdigit() or int(nodes) < 1:
        return
    how = f"(SLURM_STEP_NUM_TASKS={tasks}, SLURM_STEP_NUM_NODES={nodes})"
    if int(nodes) < tasks:
        raise ConfigError(
            f"harness launch runs as {tasks} srun tasks on {nodes} node(s) {how}, each starting its own workers: "
            "start one launcher per node (srun --ntasks-per-node=1 harness launch ..., as launch/slurm.sbatch "
            "does), or let srun start the ranks (srun --ntasks-per-node=N harness train ...)")
    if max_nodes < int(nodes):
        raise ConfigError(
            f"harness launch runs on the {nodes} nodes of this srun step {how} with --nnodes {max_nodes}: each "
            f"node would be a job of its own; pass --nnodes {nodes} (the rendezvous is then at the step's first "
            "node, as in launch/slurm.sbatch)")


def adopted() -> SrunTask | None:
    """The srun task :func:`adopt` made this process, if it did."""
    return _adopted


def cuda_index(local_rank: int) -> int:
    """The CUDA device of a rank on its node: ``local_rank``, except for an srun task that sees one device
    (``--gpus-per-task=1`` or ``--gpu-bind`` give each task its own GPU, numbered 0 in that task)."""
    if _adopted is None or local_rank == 0:
        return local_rank
    import torch
    return 0 if torch.cuda.device_count() == 1 else local_rank


def first_host(nodelist: str) -> str:
    """The first host of a SLURM hostlist: ``gpu[07-09,12],cpu01`` -> ``gpu07``, ``rack[1-2]-n[01-04]`` ->
    ``rack1-n01`` (SLURM puts task 0 on the step's first node)."""
    text = nodelist.strip()
    depth, end = 0, len(text)
    for i, ch in enumerate(text):  # the first entry ends at a comma outside brackets
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            end = i
            break
    host = re.sub(r"\[([^\]\-,]*)[^\]]*\]", r"\1", text[:end])  # each range's first value, padding kept
    if not host or any(c in host for c in "[], "):
        raise ConfigError(f"cannot read the first host of SLURM's node list {nodelist!r}: set MASTER_ADDR")
    return host


def step_master(env: MutableMapping[str, str] | None = None) -> tuple[str, int]:
    """Where the ranks of this srun step meet: ``MASTER_ADDR``/``MASTER_PORT`` if set, else the step's first
    node, on a port derived from the job id."""
    return _master(os.environ if env is None else env)


def _master(env: MutableMapping[str, str]) -> tuple[str, int]:
    addr = env.get("MASTER_ADDR") or first_host(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
                                                or env.get("SLURM_NODELIST") or "")
    port = env.get("MASTER_PORT", "").strip()
    if port:
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"MASTER_PORT={port!r} is not a port number")
        return addr, int(port)
    job = env.get("SLURM_JOB_ID", "").strip()
    if not job.isdigit():
        raise ConfigError("an srun task without SLURM_JOB_ID: set MASTER_PORT")
    return addr, PORT_BASE + int(job) % PORT_SPAN


def _local_world(env: MutableMapping[str, str], local_rank: int) -> int:
    """Tasks on this node: SLURM_STEP_TASKS_PER_NODE (``4(x2),3``) at this node's index, else SLURM_NTASKS_PER_NODE."""
    node = env.get("SLURM_NODEID", "").strip()
    counts: list[int] = []
    for part in env.get("SLURM_STEP_TASKS_PER_NODE", "").split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if m:
            counts += [int(m.group(1))] * int(m.group(2) or 1)
    if node.isdigit() and int(node) < len(counts):
        return counts[int(node)]
    fallback = env.get("SLURM_NTASKS_PER_NODE", "").strip()
    return int(fallback) if fallback.isdigit() else local_rank + 1


def _number(env: MutableMapping[str, str], name: str) -> int:
    value = env.get(name, "").strip()
    if not value.isdigit():
        raise ConfigError(f"an srun task of {env.get('SLURM_STEP_NUM_TASKS')} without a valid {name} "
                          f"({value!r}): cannot tell which rank this process is")
    return int(value)
