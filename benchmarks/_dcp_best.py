"""DCP at its best: ``dcp.async_save(..., async_stager=DefaultStager(StagingOptions(...)))``, set up the same way by
every benchmark (checkpoint_io.py, train_overhead.py) on every torch that has it.

Why a helper: torch 2.11's ``DefaultStager`` closes its own ``StateDictStager`` at the end of every stage (its
deepcopy dispatch table and its cached staging storages are cleared), so a second save through the same stager
fails with ``KeyError: <class 'type'>``; torch 2.13's keeps both, and reuses its staging buffers. The GPU machine
runs 2.11. Where a stager cannot be reused (found by trying, not by version), DCP at its best is a new stager per
save, its staging buffers allocated each time: what that torch can do."""

from __future__ import annotations

from typing import Any

import torch


def unavailable() -> str | None:
    """Why this torch has no DCP-at-its-best configuration (torch 2.4: no DefaultStager, and async_save takes no
    ``async_stager``), or None."""
    try:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions  # noqa: F401
    except ImportError as exc:
        return f"torch {torch.__version__} has no DefaultStager/StagingOptions ({exc})"
    return None


def single_process() -> dict[str, bool]:
    """The keyword that tells DCP's save, load and async_save there is no process group (``no_dist=True``); {}
    on a torch whose calls lack it (2.4: they fall back to one process by themselves when none exists)."""
    import inspect

    import torch.distributed.checkpoint as dcp

    calls = (dcp.save, dcp.load, getattr(dcp, "async_save", None))
    return {"no_dist": True} if all(f is None or "no_dist" in inspect.signature(f).parameters for f in calls) else {}


def options(device: torch.device) -> Any:
    """DCP's recommended staging for training on ``device``."""
    from torch.distributed.checkpoint.staging import StagingOptions

    if device.type == "cuda":
        return StagingOptions()  # pinned, shared memory, async staging, non-blocking copies
    # DCP refuses non-blocking copies (and cannot pin) without an accelerator: the best it allows here
    return StagingOptions(use_pinned_memory=False, use_shared_memory=True, use_async_staging=True,
                          use_non_blocking_copy=False)


def stager_reusable() -> bool:
    """Whether one DefaultStager can stage twice on this torch (two tiny synchronous stages)."""
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    probe = DefaultStager(StagingOptions(use_pinned_memory=False, use_shared_memory=False,
                                         use_async_staging=False, use_non_blocking_copy=False))
    try:
        probe.stage({"t": torch.zeros(2)})
        probe.stage({"t": torch.ones(2)})
        return True
    except KeyError:  # torch 2.11: the stager closed itself after the first stage
        return False
    finally:
        probe.close()


class BestStager:
    """The stager for each save of a run: one for the whole run where torch can reuse it (its staging buffers
    reused, as a trainer keeps it), else a new one per save. Call :meth:`next` only once the previous save's
    staging and upload are complete (both benchmarks wait for them before the next save)."""

    def __init__(self, device: torch.device) -> None:
        from torch.distributed.checkpoint.staging import DefaultStager

        self._new = lambda: DefaultStager(options(device))
        self.reuse = stager_reusable()
        self._stager: Any = None
        self.note = f"StagingOptions{vars(options(device))}" + (
            "" if self.reuse else f"; a new DefaultStager per save (torch {torch.__version__}'s closes itself "
                                  "after each stage, so its staging buffers are not reused)")

    def next(self) -> Any:
        if self._stager is not None and not self.reuse:
            self._stager.close()
            self._stager = None
        if self._stager is None:
            self._stager = self._new()
        return self._stager

    def close(self) -> None:
        if self._stager is not None:
            self._stager.close()
            self._stager = None
