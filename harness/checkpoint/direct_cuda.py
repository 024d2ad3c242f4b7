"""CUDA destinations for :mod:`harness.checkpoint.direct_read`: a bounded ring of pinned host buffers,
read -> checksum -> host-to-device copy on a side stream, so the copy of one block overlaps the read of the
next. Runs only where ``torch.cuda.is_available()``."""

from __future__ import annotations

import threading

import torch
import xxhash

from harness.checkpoint.direct_io import Aborted, Reader, check_digest
from harness.checkpoint.format import DTYPES, TensorEntry
from harness.errors import CheckpointError

MIB = 1 << 20
RING_SLOTS, RING_SLOT_BYTES = 4, 16 * MIB

# -- CUDA destinations -----------------------------------------------------------------------------------

class _Ring:
    """Pinned host buffers cycled in order; each slot's event marks the end of the copy out of it."""

    def __init__(self, device: torch.device, slots: int = RING_SLOTS, slot_bytes: int = RING_SLOT_BYTES) -> None:
        self.slot_bytes = slot_bytes
        self.bufs = [torch.empty(slot_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(slots)]
        self.host = [memoryview(b.numpy()) for b in self.bufs]
        self.events: list[torch.cuda.Event | None] = [None] * slots
        self.stream = torch.cuda.Stream(device=device)
        self._next = 0

    def take(self) -> int:
        """The next slot, once the copy that last used it has finished."""
        slot = self._next
        self._next = (slot + 1) % len(self.bufs)
        if self.events[slot] is not None:
            self.events[slot].synchronize()
        return slot

    def copy_out(self, slot: int, n: int, dst: torch.Tensor) -> None:
        """Queue the host-to-device copy of the slot's first ``n`` bytes into ``dst`` (uint8, contiguous)."""
        with torch.cuda.stream(self.stream):
            dst.copy_(self.bufs[slot][:n], non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        self.events[slot] = ev


def read_to_cuda(reader: Reader, targets: list[tuple[TensorEntry, torch.Tensor]], verify: bool,
                 stop: threading.Event) -> int:
    """CUDA destinations, in the calling thread: read -> checksum -> H2D on a side stream, overlapped through
    the ring. Returns the ring's size in bytes. Every queued copy has finished when this returns or raises."""
    if not torch.cuda.is_available():
        raise CheckpointError("CUDA destinations given but CUDA is not available")
    device = targets[0][1].device
    ring = _Ring(device)
    ring.stream.wait_stream(torch.cuda.current_stream(device))  # destinations may still be in use there
    keep: list[torch.Tensor] = []  # device staging tensors stay alive until the stream is synchronized
    try:
        for e, view in targets:
            if view.device != device:
                raise CheckpointError(f"tensor {e.key!r}: CUDA destinations on several devices in one read")
            same = view.dtype == DTYPES[e.dtype] and view.is_contiguous()
            dst = view if same else torch.empty(e.shape, dtype=DTYPES[e.dtype], device=device)
            keep.append(dst)
            flat = dst.reshape(-1).view(torch.uint8) if e.length else None
            h = xxhash.xxh3_64()
            for a in range(0, e.length, ring.slot_bytes):
                if stop.is_set():
                    raise Aborted()
                n = min(ring.slot_bytes, e.length - a)
                slot = ring.take()
                part = ring.host[slot][:n]
                reader.read(e.file, e.offset + a, [part], e.ident)
                if verify:
                    h.update(part)
                ring.copy_out(slot, n, flat[a:a + n])
            if verify:
                check_digest(e, h.hexdigest(), reader.where(e.file))
            if not same:
                with torch.cuda.stream(ring.stream), torch.no_grad():
                    view.copy_(dst)
    finally:
        ring.stream.synchronize()
        torch.cuda.current_stream(device).wait_stream(ring.stream)
    return len(ring.bufs) * ring.slot_bytes
