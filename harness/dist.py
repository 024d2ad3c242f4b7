"""Process-group helpers that also work without torch.distributed (one process, rank 0 of 1)."""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch.distributed as dist

from harness.errors import ConfigError


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def require_group_if_launched(what: str) -> None:
    """Refuse to act as a world of one inside a multi-process launch.

    torchrun (and SLURM/Kubernetes launchers) set WORLD_SIZE for every process they start. A process that
    never called ``init_process_group`` would see rank 0 of 1 here and, like each of its peers, save and
    apply retention on the same folder on its own: N uncoordinated writers instead of one collective save.
    """
    world = os.environ.get("WORLD_SIZE", "").strip()
    if initialized() or not world.isdigit() or int(world) <= 1:
        return
    raise ConfigError(
        f"{what}: this process was launched as one of {world} (WORLD_SIZE={world}, RANK="
        f"{os.environ.get('RANK', '?')}) but torch.distributed is not initialized; call "
        f"torch.distributed.init_process_group(...) first (e.g. init_process_group('gloo') on CPU, 'nccl' on "
        f"GPUs), then create {what} on every rank")


def new_cpu_group(timeout_s: float) -> Any:
    """A gloo group of all ranks for checkpoint coordination.

    A group of its own lets a background save run collectives while training runs NCCL/gloo collectives
    on the default group, and gives checkpoint barriers their own timeout. Collective: all ranks call it.
    """
    if not initialized():
        return None
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))


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


def all_ok(ok: bool, group: Any) -> bool:
    """True on every rank when every rank says ok."""
    if not initialized():
        return ok
    flags = gather(ok, group)
    return bool(broadcast(all(flags) if flags is not None else None, group))
