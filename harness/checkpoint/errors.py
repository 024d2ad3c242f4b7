"""Whose fault a failure is, and the verdict the ranks agree on.

Only a problem of a checkpoint's content (bad bytes, a malformed manifest, state that does not fit its
object) is a :class:`~harness.errors.CheckpointError`. Running out of memory on the device or the host, a
failed accelerator, a broken process group or connection is not: the checkpoint is fine and a retry
(once the killed attempt has released the GPU, once the network is back) will load it. Those keep their
type, on every rank, and nothing is marked damaged for them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, NoReturn

import torch

from harness import dist
from harness.errors import (CheckpointCorruptError, CheckpointError, CheckpointFormatError, StorageError,
                            StorageUnavailableError, is_accelerator_failure, is_host_out_of_memory,
                            is_transport_failure)


def _resource_types() -> tuple[type[BaseException], ...]:
    found: list[type[BaseException]] = [torch.OutOfMemoryError, MemoryError, ConnectionError, TimeoutError,
                                        StorageUnavailableError]  # an object store out of retries: later, maybe
    accel = getattr(torch, "AcceleratorError", None)  # CUDA/XPU errors since torch 2.8
    if isinstance(accel, type):
        found.append(accel)
    if torch.distributed.is_available():  # DistBackendError (NCCL), DistNetworkError, DistStoreError
        found.append(torch.distributed.DistError)
    return tuple(found)


RESOURCE_ERRORS = _resource_types()
_DIST_NETWORK = getattr(torch.distributed, "DistNetworkError", None) if torch.distributed.is_available() else None


def is_resource_error(exc: BaseException) -> bool:
    """A failure of resources or communication (device or host memory, the accelerator, the process group,
    the network), not of a checkpoint: retryable, never a reason to call a checkpoint damaged."""
    return (isinstance(exc, RESOURCE_ERRORS) or is_transport_failure(exc) or is_accelerator_failure(exc)
            or is_host_out_of_memory(exc))


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# Classes a rank may rebuild from a peer's report: the resource errors and their subclasses torch defines.
_REBUILDABLE = {_qualname(c): c for base in RESOURCE_ERRORS for c in (base, *base.__subclasses__())}


class Severity(enum.Enum):
    DAMAGED = "damaged"    # the checkpoint's content is bad: walk back to an older one
    FATAL = "fatal"        # the checkpoint cannot be loaded here (does not fit the objects, storage failing)
    RESOURCE = "resource"  # out of memory, accelerator or communication failure: retryable, re-raised as is


_ORDER = {Severity.RESOURCE: 0, Severity.FATAL: 1, Severity.DAMAGED: 2}  # which rank's problem wins


@dataclass(frozen=True)
class Problem:
    """What went wrong on one rank, as the ranks tell each other."""

    severity: Severity
    why: str
    rank: int
    types: tuple[str, ...] = ()   # RESOURCE: the exception's classes (most derived first), to re-raise it


def problem_of(exc: BaseException, rank: int, *, damage_possible: bool = True) -> Problem:
    """Classify one rank's failure. ``damage_possible``: whether bad content can show up at this stage (the
    ranks reading a sharded checkpoint together), rather than having been ruled out by rank 0's verification."""
    if is_resource_error(exc):
        # gloo's lost peer is a plain RuntimeError: the other ranks rebuild it as the DistError it stands for
        cls = _DIST_NETWORK if is_transport_failure(exc) and _DIST_NETWORK is not None else type(exc)
        return Problem(Severity.RESOURCE, f"rank {rank}: {type(exc).__name__}: {exc}", rank,
                       tuple(_qualname(c) for c in cls.__mro__))
    if damage_possible and not isinstance(exc, StorageError) and isinstance(
            exc, (CheckpointCorruptError, CheckpointFormatError, OSError, EOFError)):
        return Problem(Severity.DAMAGED, f"rank {rank}: {exc}", rank)
    what = str(exc) if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {exc}"
    return Problem(Severity.FATAL, f"rank {rank}: {what}", rank)


def agree(problem: Problem | None, group: Any) -> Problem | None:
    """The verdict of every rank's ``problem`` (collective): None when all succeeded, else the most severe
    (a resource failure anywhere makes the whole attempt retryable), the same on every rank; a rank that had
    a problem of the winning severity keeps its own (e.g. which of its tensors does not fit)."""
    problems = dist.gather(problem, group)
    verdict = None
    if problems is not None:
        found = sorted((p for p in problems if p is not None), key=lambda p: (_ORDER[p.severity], p.rank))
        verdict = found[0] if found else None
    verdict = dist.broadcast(verdict, group)
    if verdict is not None and problem is not None and problem.severity is verdict.severity:
        return problem
    return verdict


def raise_resource(verdict: Problem, own: BaseException | None) -> NoReturn:
    """Re-raise a RESOURCE verdict with its type: this rank's own exception if it had one, else the same
    class rebuilt from the report (the nearest class this process knows)."""
    if own is not None and is_resource_error(own):
        raise own
    cls = next((_REBUILDABLE[t] for t in verdict.types if t in _REBUILDABLE), RuntimeError)
    raise cls(f"{verdict.why} (reported by rank {verdict.rank})")
