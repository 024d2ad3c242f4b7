"""Process-group helpers that also work without torch.distributed (one process, rank 0 of 1)."""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
import threading
import time
from typing import Any, Iterator

import torch.distributed as dist

from harness.errors import ConfigError
from harness.exiting import leave  # noqa: F401 - the documented name (README: harness.dist.leave)

_log = logging.getLogger("harness")


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def require_group_if_launched(what: str) -> None:
    """Refuse to act as a world of one inside a multi-process launch.

    torchrun (and the Kubernetes operator's launchers) set WORLD_SIZE for every process they start. A process
    that never called ``init_process_group`` would see rank 0 of 1 here and, like each of its peers, save and
    apply retention on the same folder on its own: N uncoordinated writers instead of one collective save.
    srun's tasks (SLURM_STEP_NUM_TASKS, harness/srun.py) get a warning instead.
    """
    world = os.environ.get("WORLD_SIZE", "").strip()
    if initialized():
        return
    if not world:
        _warn_srun_task(what)
        return
    if not world.isdigit() or int(world) <= 1:
        return
    raise ConfigError(
        f"{what}: this process was launched as one of {world} (WORLD_SIZE={world}, RANK="
        f"{os.environ.get('RANK', '?')}) but torch.distributed is not initialized; call "
        f"torch.distributed.init_process_group(...) first (e.g. init_process_group('gloo') on CPU, 'nccl' on "
        f"GPUs), then create {what} on every rank")


def _warn_srun_task(what: str) -> None:
    """srun's tasks may be one job (DDP the Lightning way) or independent runs (a sweep, a folder each): a
    warning, not torchrun's error, since harness cannot tell which from one process."""
    tasks = os.environ.get("SLURM_STEP_NUM_TASKS", "").strip()
    if tasks.isdigit() and int(tasks) > 1:
        _log.warning("%s: this process is task %s of %s of an srun step and torch.distributed is not "
                     "initialized, so it saves as a job of its own: if the tasks are one training job, call "
                     "harness.srun.adopt() and torch.distributed.init_process_group(...) first (tasks that "
                     "share a folder without it overwrite each other's checkpoints)", what,
                     os.environ.get("SLURM_PROCID", "?"), tasks)


STORE_WAIT_S = 30.0  # the longest wait_for_store_host polls before init_process_group takes over


def wait_for_store_host(timeout_s: float, poll_s: float = 0.01) -> None:
    """On a rank other than 0, before ``init_process_group``: wait until MASTER_ADDR:MASTER_PORT accepts
    connections (a plain connect, closed at once).

    Under ``harness launch`` every worker-group attempt gets a store of its own (harness/launch.py), hosted by
    rank 0 and opened only when rank 0 reaches ``init_process_group``. A peer that gets there first is refused,
    and torch's store client tries again only after a back-off: 0.2-0.7 s lost on about half of the (re)starts
    measured here. Polling the port every ``poll_s`` costs nothing. Best effort: when the port is still closed
    after ``timeout_s``, ``init_process_group`` reports whatever is wrong as usual."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    if os.environ.get("RANK", "0") == "0" or not addr or not port.isdigit():
        return
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((addr, int(port)), timeout=1.0).close()
            return
        except OSError:
            if time.monotonic() >= deadline:
                return
            time.sleep(poll_s)


def new_cpu_group(timeout_s: float) -> Any:
    """A gloo group of all ranks for checkpoint coordination.

    A group of its own lets a background save run collectives while training runs NCCL/gloo collectives
    on the default group, and gives checkpoint barriers their own timeout. Collective: all ranks call it.
    """
    if not initialized():
        return None
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))


def broadcast_module(module: Any, src: int = 0) -> None:
    """Rank ``src``'s parameters and buffers on every rank, in place, over the default group: what
    DistributedDataParallel's construction does unless ``init_sync=False``. Collective."""
    if not initialized():
        return
    for t in [*module.parameters(), *module.buffers()]:
        dist.broadcast(t.detach(), src=src)


@contextlib.contextmanager
def late_peers_warning(what: str, timeout_s: float) -> Iterator[None]:
    """Around a collective one rank may call alone (``CheckpointManager.save`` under ``if rank == 0:``, the
    habit ``torch.save`` teaches): if it has not completed after a quarter of its timeout (at most 30 s),
    say what is wrong now, not only when the timeout (10 minutes by default) ends in a transport error."""
    if not initialized() or world_size() < 2:
        yield
        return
    after = min(30.0, timeout_s / 4)
    timer = threading.Timer(after, lambda: _log.warning(
        "rank %d has waited %.0f s for the other ranks in %s: they are slow to get there, or do not call it; it is "
        "collective, every rank must call it (a rank that never does makes this one fail when its timeout, %.0f s, "
        "runs out)", rank(), after, what, timeout_s))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def broadcast(obj: Any, group: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (small, picklable objects between our own processes)."""
    if not initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def gather(obj: Any, group: Any, dst: int = 0) -> list | None:
    """Every rank's ``obj`` as a list on ``dst``; None elsewhere."""
    if not initialized():
        return [obj]
    out = [None] * world_size() if rank() == dst else None
    dist.gather_object(obj, out, dst=dst, group=group)
    return out


def all_gather(obj: Any, group: Any) -> list:
    """Every rank's ``obj``, as a list on every rank."""
    if not initialized():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj, group=group)
    return out


def scatter(objs: list | None, group: Any, src: int = 0) -> Any:
    """``objs[r]`` (a list on ``src``, one per rank) on each rank ``r``."""
    if not initialized():
        return objs[0] if objs else None
    out = [None]
    dist.scatter_object_list(out, objs if rank() == src else None, src=src, group=group)
    return out[0]


def all_ok(ok: bool, group: Any) -> bool:
    """True on every rank when every rank says ok."""
    if not initialized():
        return ok
    flags = gather(ok, group)
    return bool(broadcast(all(flags) if flags is not None else None, group))
