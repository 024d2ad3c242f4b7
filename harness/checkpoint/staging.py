"""An overlapped snapshot: the host copy of a save runs while training computes its next forward and backward.

``CheckpointManager.save(..., overlap=True)`` returns once the copies are scheduled. What the next step's
forward and backward may change themselves (module buffers such as BatchNorm statistics, a DDP buffer
broadcast, scheduler and RNG state, extras) is copied before save() returns (on a GPU: on a side stream the
caller's stream then waits for, so the host never blocks). Only what the optimizer step alone changes,
parameters and optimizer state, is copied late: on a side CUDA stream that starts after an event recorded on
each source device's current stream, or on the save's background thread for CPU tensors. Training must then
call ``before_mutation()`` before the optimizer step, the scaler update or the scheduler step: it orders
them after the copies (on a GPU the caller's streams wait on the copies' events, the host does not; on CPU
the caller waits for the copy thread).

Right by construction, and checked: each late-copied tensor's ``_version`` (bumped by every in-place change)
is recorded when the save is scheduled and compared when its copy has finished and at the wait point. Any
change before the wait point means the snapshot may hold a mix of two steps: the save fails with a
CheckpointError and nothing is committed. The commit waits for the wait point (or ``wait()``/``close()``), so
even a change still in flight while the copy ran is seen before anything is committed.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from harness.errors import CheckpointError

Pair = tuple[torch.Tensor, torch.Tensor]  # (host destination, source)


@dataclass
class Watched:
    key: str
    tensor: torch.Tensor
    version: int


@dataclass
class Staging:
    """The late copies of one save: CPU ones for the copy thread, CUDA ones already queued (their events)."""

    cpu: list[Pair] = field(repr=False)
    events: dict[torch.device, torch.cuda.Event] = field(repr=False)
    watched: list[Watched] = field(repr=False)
    caller: threading.Thread = field(default_factory=threading.current_thread)
    error: str | None = None
    copied_at: float | None = None  # time.perf_counter() when every copy had landed (for accounting)
    _released: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _cpu_done: threading.Event = field(default_factory=threading.Event)
    _settled: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def start(cls, cpu: list[Pair], cuda_now: list[Pair], cuda_late: list[Pair],
              watched: list[Watched]) -> "Staging":
        """Queue the CUDA copies, each device's on a side stream ordered after the work already queued on that
        device's current stream (this step's values). The current stream then waits for the ``cuda_now``
        copies (what the next forward may change) but not for the late ones; the host waits for neither."""
        events = {}
        by_dev: dict[torch.device, tuple[list[Pair], list[Pair]]] = {}
        for i, pairs in enumerate((cuda_now, cuda_late)):
            for dst, src in pairs:
                by_dev.setdefault(src.device, ([], []))[i].append((dst, src))
        for dev, (now, late) in by_dev.items():
            current, side = torch.cuda.current_stream(dev), _side_stream(dev)
            side.wait_stream(current)
            with torch.cuda.stream(side):
                _queue(now, side)
                if now:
                    current.wait_stream(side)
                _queue(late, side)
            events[dev] = torch.cuda.Event(blocking=True)  # the copy thread sleeps on it, not spins a core
            events[dev].record(side)
        return cls(cpu, events, watched)

    # -- the copy thread --------------------------------------------------------------------------------

    def copy(self) -> None:
        """Run the CPU copies, wait for the CUDA ones, then check that nothing changed meanwhile."""
        try:
            for dst, src in self.cpu:
                host_copy(dst, src)
        except Exception as exc:  # noqa: BLE001 - reported by settle(), after the wait point
            self._fail(f"the host copy failed: {type(exc).__name__}: {exc}")
        finally:
            self._cpu_done.set()
        for ev in self.events.values():
            ev.synchronize()
        self.copied_at = time.perf_counter()
        self._check("while it was being copied")

    def settle(self, poll_s: float = 0.2) -> None:
        """Before committing: wait for the wait point (or for the saving thread to end: it can then change
        nothing), and raise the CheckpointError of a change seen before it."""
        while not self._settled.wait(poll_s):
            if not self.caller.is_alive():
                self.before_mutation(from_caller=False)
        if self.error is not None:
            raise CheckpointError(self.error)

    # -- the caller's thread ----------------------------------------------------------------------------

    def before_mutation(self, from_caller: bool = True) -> None:
        """Order what comes next after the copies; the last moment a change of the saved tensors is a fault."""
        if self._released:
            return
        self._cpu_done.wait()
        if from_caller:
            for dev, ev in self.events.items():
                torch.cuda.current_stream(dev).wait_event(ev)
        else:
            for ev in self.events.values():
                ev.synchronize()
        self._check("before the wait point (call CheckpointManager.before_mutation() before the optimizer "
                    "step, scaler update or scheduler step)", release=True)
        self._settled.set()

    # -- checks ------------------------------------------------------------------------------------------

    def _check(self, when: str, release: bool = False) -> None:
        with self._lock:
            if self._released:  # past the wait point: changes are the next step's, allowed
                return
            changed = [w.key for w in self.watched if w.tensor._version != w.version]
            if changed:
                self._fail_locked(f"{len(changed)} saved tensor(s) changed in place {when}, e.g. {changed[0]!r}: "
                                  "the snapshot could mix two steps; nothing was committed")
            self._released = release

    def _fail(self, msg: str) -> None:
        with self._lock:
            self._fail_locked(msg)

    def _fail_locked(self, msg: str) -> None:
        if self.error is None:
            self.error = msg


def host_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` for a CPU source, on the calling thread alone: numpy's memcpy (it releases the GIL)
    when both are contiguous, of one dtype and without a lazy conj/neg bit; torch's ``copy_`` otherwise.
    Why: torch splits a large copy over an OpenMP team of its own for each calling thread, so a save thread
    would put as many threads as training has beside training's on the same cores, spinning between tensors;
    the copy is bound by memory bandwidth, and one thread copies about as fast (measured: 0.13 vs 0.12 s for
    640 MB on the 2-core machine)."""
    if (src.dtype == dst.dtype and src.numel() == dst.numel() and src.numel() and not src.is_quantized
            and src.is_contiguous() and dst.is_contiguous() and not src.is_conj() and not src.is_neg()):
        np.copyto(_raw(dst), _raw(src))
    else:
        dst.copy_(src)


def _raw(t: torch.Tensor) -> np.ndarray:
    return t.reshape(-1).view(torch.uint8).numpy()


def _queue(pairs: list[Pair], side: torch.cuda.Stream) -> None:
    for dst, src in pairs:
        dst.copy_(src, non_blocking=True)
        src.record_stream(side)  # a source freed meanwhile (a temporary) is not reused before its copy ran


_SIDE: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(dev: torch.device) -> torch.cuda.Stream:
    """One side stream per device for the process: created once, reused by every save."""
    if dev not in _SIDE:
        _SIDE[dev] = torch.cuda.Stream(dev)
    return _SIDE[dev]
