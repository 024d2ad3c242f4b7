"""CUDA destinations for :mod:`harness.checkpoint.direct_read`: read -> checksum -> host-to-device copy through
rings of pinned host buffers, one ring, one side stream and one thread per share of the entries, so several
reads and checksums run at once and the copy of one block overlaps the read of the next.

One thread per ring, not one ring for all: on the H200 machine (torch 2.11, 8 GB of state, page cache warm)
a single reading thread spent 1.5 s in ``pread`` and 1.2 s in xxh3, one after the other, while the copy to the
device needed 0.15 s (benchmarks/results/checkpoint_io_cuda_20261130-112221.json). Runs only where
``torch.cuda.is_available()``; :func:`fill_run` takes any object with the ring's methods (tests drive it with
host buffers on a CPU machine)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
import xxhash

from harness.checkpoint.direct_io import Aborted, Reader, check_digest
from harness.checkpoint.format import DTYPES, TensorEntry

MIB = 1 << 20
RING_SLOTS, RING_SLOT_BYTES = 3, 8 * MIB  # per reading thread: one slot read, one copied, one spare
LOCAL_BLOCK_BYTES = 1 * MIB               # local reads fill a slot in blocks, each hashed while still in cache


class RingLike(Protocol):
    slot_bytes: int
    host: list[memoryview]

    def bind(self) -> None: ...
    def take(self) -> int: ...
    def staging(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor: ...
    def copy_out(self, slot: int, n: int, dst: torch.Tensor) -> None: ...
    def convert(self, view: torch.Tensor, staged: torch.Tensor) -> None: ...
    def drain(self) -> None: ...


class Ring:
    """Pinned host buffers cycled in order; each slot's event marks the end of the copy out of it.

    Its events block (sleep) rather than spin while waited for: every reading thread waits on its own ring, and
    CUDA's default with one context on a many-core host is to spin a core, which the other threads' reads and
    checksums need. The thread using a ring must have the ring's device current (:meth:`bind`): a stream
    context entered in a thread still on device 0 switches back to device 0 on exit, making a CUDA context
    there (~0.5 GB of GPU 0 per rank on an 8-GPU node). :func:`fill_run` calls :meth:`bind` first."""

    def __init__(self, device: torch.device, slots: int = RING_SLOTS, slot_bytes: int = RING_SLOT_BYTES) -> None:
        self.slot_bytes = slot_bytes
        self.bufs = [torch.empty(slot_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(slots)]
        self.host = [memoryview(b.numpy()) for b in self.bufs]
        # (an event never recorded is created on its first record: synchronizing it before returns at once)
        self.events = [torch.cuda.Event(blocking=True) for _ in range(slots)]
        self.stream = torch.cuda.Stream(device=device)
        self._next = 0

    @property
    def nbytes(self) -> int:
        return len(self.bufs) * self.slot_bytes

    def bind(self) -> None:
        """Make the ring's device current in the calling thread (a new thread starts on device 0; the
        destinations of one read may be on several devices, each with rings of its own)."""
        torch.cuda.set_device(self.stream.device)

    def take(self) -> int:
        """The next slot, once the copy that last used it has finished."""
        slot = self._next
        self._next = (slot + 1) % len(self.bufs)
        self.events[slot].synchronize()
        return slot

    def staging(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """A device tensor the copies fill before :meth:`convert`, allocated on the ring's stream: whatever
        the allocation queues (deterministic mode fills new memory with NaN) is ordered before the copies."""
        with torch.cuda.stream(self.stream):
            return torch.empty(tuple(shape), dtype=dtype, device=self.stream.device)

    def copy_out(self, slot: int, n: int, dst: torch.Tensor) -> None:
        """Queue the host-to-device copy of the slot's first ``n`` bytes into ``dst`` (uint8, contiguous)."""
        with torch.cuda.stream(self.stream):
            dst.copy_(self.bufs[slot][:n], non_blocking=True)
            self.events[slot].record(self.stream)

    def convert(self, view: torch.Tensor, staged: torch.Tensor) -> None:
        """Queue ``view.copy_(staged)`` (another dtype or layout) after the copies into ``staged``."""
        with torch.cuda.stream(self.stream), torch.no_grad():
            view.copy_(staged)

    def drain(self) -> None:
        done = torch.cuda.Event(blocking=True)  # (a stream's own synchronize spins)
        done.record(self.stream)
        done.synchronize()


@dataclass
class Phases:
    """Where one reading thread's time went (``time.perf_counter`` seconds): so a slow GPU restore says whether
    it waited for the disk or page cache (read), the checksum (hash) or the copies to the device (slot: waiting
    for a ring slot to come back)."""

    read: float = 0.0
    hash: float = 0.0
    slot: float = 0.0
    total: float = 0.0

    def seconds(self) -> dict[str, float]:
        return {"read": self.read, "hash": self.hash, "slot_wait": self.slot,
                "other": max(0.0, self.total - self.read - self.hash - self.slot), "total": self.total}


def open_rings(device: torch.device, n: int) -> list[Ring]:
    """``n`` rings, allocated by the calling thread; their streams start after the work queued so far on its
    current stream (the destinations may still be in use there). Nothing closes them: each :func:`fill_run`
    drains its ring before it returns or raises, so once its thread has ended no copy is left in flight."""
    rings = [Ring(device) for _ in range(n)]
    current = torch.cuda.current_stream(device)
    for ring in rings:
        ring.stream.wait_stream(current)
    return rings


def fill_run(reader: Reader, run: Sequence[tuple[TensorEntry, torch.Tensor]], ring: RingLike, verify: bool,
             stop: threading.Event, phases: Phases | None = None) -> tuple[int, int]:
    """Fill the destinations of ``run`` in order, in the calling thread, through ``ring``: each slot is read
    (locally in 1 MiB blocks, each hashed while it is still in cache), then its copy to the device is queued,
    and the next slot is read meanwhile. Returns (read calls, bytes); ``phases`` gets where the time went.
    Every copy it queued has finished when it returns or raises. The ring's device is made current first."""
    ring.bind()
    keep: list[torch.Tensor] = []  # device staging tensors stay alive until the ring is drained
    reads = nbytes = 0
    block = LOCAL_BLOCK_BYTES if reader.local else ring.slot_bytes
    ph = phases if phases is not None else Phases()
    clock = time.perf_counter
    start = clock()
    try:
        for e, view in run:
            same = view.dtype == DTYPES[e.dtype] and view.is_contiguous()
            dst = view if same else ring.staging(e.shape, DTYPES[e.dtype])
            keep.append(dst)
            flat = dst.reshape(-1).view(torch.uint8) if e.length else None
            h = xxhash.xxh3_64()
            for a in range(0, e.length, ring.slot_bytes):
                n = min(ring.slot_bytes, e.length - a)
                t0 = clock()
                slot = ring.take()
                t1 = clock()
                ph.slot += t1 - t0
                for b in range(0, n, block):
                    if stop.is_set():
                        raise Aborted()
                    part = ring.host[slot][b:min(n, b + block)]
                    reader.read(e.file, e.offset + a + b, [part], e.ident)
                    reads += 1
                    t2 = clock()
                    ph.read += t2 - t1
                    if verify:
                        h.update(part)
                    t1 = clock()
                    ph.hash += t1 - t2
                ring.copy_out(slot, n, flat[a:a + n])
            if verify:
                check_digest(e, h.hexdigest(), reader.where(e.file))
            if not same:
                ring.convert(view, dst)
            nbytes += e.length
    finally:
        t0 = clock()
        ring.drain()
        ph.slot += clock() - t0  # the last copies: waited for like a slot
        ph.total += clock() - start
    return reads, nbytes
