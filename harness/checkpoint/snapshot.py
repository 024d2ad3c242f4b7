"""The host snapshot of a save: one flat buffer sized to the state, each tensor an aligned view into it.

Why one buffer: pinning memory per tensor goes through torch's caching host allocator, which rounds every
request up to a power of two (1.6x the state on a typical model) and keeps it after the tensors die. One
allocation of exactly the snapshot's size (plus 64-byte alignment per tensor), reused from save to save
while the layout (keys, dtypes, shapes) stays the same, and freed by :meth:`Snapshot.release`, costs the
state's bytes once. It is pinned only when a source tensor is on a GPU (pinned memory makes the
device-to-host copy fast and asynchronous; on CPU it would only cost), and pinned by page-locking an
ordinary allocation (``cudaHostRegister``, as torch.distributed.checkpoint's stager does) rather than through
the caching host allocator: that one would round the single buffer up to a power of two as well, and keep
it cached after release.

The copies are issued on the caller's thread, on each source device's current stream (the stream the
caller's work on those tensors is ordered on), and :meth:`Snapshot.take` returns only after every source
device's stream has finished them: the writer threads then read host memory that holds this step's values,
whatever devices the state lives on and whatever stream training runs on next. :meth:`Snapshot.stage` instead
returns once the copies are scheduled, and the copies overlap the next step (:mod:`~harness.checkpoint.staging`).
"""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import logging
from typing import Any, Callable

import torch

from harness.checkpoint.blobs import ALIGN  # views are packed as a data file packs its tensors: see plan()
from harness.checkpoint.codec import Shard
from harness.checkpoint.staging import Staging, Watched, host_copy
from harness.hostinfo import usable_cpus
from harness.storage.direct_write import ALIGN as PAGE  # the buffer and each data file's first tensor start on one

log = logging.getLogger("harness")

Layout = tuple[tuple[str, torch.dtype, tuple[int, ...]], ...]


def _local(t: Any) -> torch.Tensor:
    return t.local if isinstance(t, Shard) else t


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _bytes_of(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()


def plan(layout: Layout, file_starts: frozenset[str] = frozenset()) -> tuple[dict[str, int], int]:
    """Byte offset of each key in the flat buffer (from a page-aligned start), and the buffer's size.

    Why ``file_starts`` (the keys each data file begins with) start on a page: a data file lays out its tensors
    from offset 0 at the same 64-byte alignment, so a file's tensors then sit in the buffer at addresses equal to
    their file offsets modulo a page, and the local writer sends them to the disk straight from here, with no
    copy into its aligned block (:mod:`harness.storage.direct_write`)."""
    offsets, pos = {}, 0
    for key, dtype, shape in layout:
        pos += -pos % (PAGE if key in file_starts else ALIGN)
        offsets[key] = pos
        pos += _bytes_of(dtype, shape)
    return offsets, pos


PREFAULT_THREADS = 8          # most threads that write a new buffer's pages before it is page-locked
PREFAULT_MIN_CHUNK = 64 << 20  # bytes per thread at least: below that one thread is as quick


def _prefault(buf: torch.Tensor) -> None:
    """Write every page of a new buffer, from several threads, before it is page-locked. Why: page-locking
    memory nobody has touched yet faults each page in, one after another on the locking thread (the first save
    of 8 GB from the H200 spent 2.4 s in it, 1.3 GB 0.47 s); pages already present are only locked. PyTorch's
    host allocator does the same with ``pinned_use_cuda_host_register`` and ``pinned_num_register_threads``.
    ``ctypes.memset`` runs without the GIL, so the threads fault pages in parallel."""
    size = buf.numel()
    if not size:
        return
    n = max(1, min(PREFAULT_THREADS, usable_cpus(), size // PREFAULT_MIN_CHUNK))
    step = -(-size // n)
    spans = [(buf.data_ptr() + a, min(step, size - a)) for a in range(0, size, step)]
    if n == 1:
        ctypes.memset(spans[0][0], 0, spans[0][1])
        return
    with cf.ThreadPoolExecutor(n, thread_name_prefix="harness-prefault") as pool:
        list(pool.map(lambda span: ctypes.memset(span[0], 0, span[1]), spans))


def _page_lock(buf: torch.Tensor) -> bool:
    """Pin ``buf`` in place; False (and a warning: copies are then synchronous) if the driver refuses."""
    if not buf.numel():
        return False
    rt = torch.cuda.cudart()
    err = rt.cudaHostRegister(buf.data_ptr(), buf.numel(), 0)
    if err != rt.cudaError.success:
        log.warning("checkpoint snapshot: could not pin %.1f MB of host memory (%s): copying without pinning",
                    buf.numel() / 1e6, rt.cudaGetErrorString(err))
        return False
    return True


def _page_unlock(buf: torch.Tensor) -> None:
    rt = torch.cuda.cudart()
    err = rt.cudaHostUnregister(buf.data_ptr())
    if err != rt.cudaError.success:
        log.warning("checkpoint snapshot: unpinning failed (%s)", rt.cudaGetErrorString(err))


class Snapshot:
    """Host copies of the tensors one save writes, in one reused flat buffer."""

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None   # uint8, the one host allocation this snapshot holds
        self._planned: tuple[Layout, frozenset[str]] | None = None  # what the buffer is laid out for: see plan()
        self._views: dict[str, torch.Tensor] = {}
        self.pinned = False
        self._pin_asked = False
        self.state_bytes = 0                       # bytes of the tensors copied by the last take()

    @property
    def nbytes(self) -> int:
        """Host bytes held (the flat buffer), 0 after :meth:`release`."""
        return 0 if self._buffer is None else self._buffer.numel()

    @property
    def allocations(self) -> int:
        """Host allocations held: 0 or 1, never one per tensor."""
        return 0 if self._buffer is None else 1

    @property
    def views(self) -> dict[str, torch.Tensor]:
        return dict(self._views)

    def take(self, tensors: dict[str, Any], *, copy_all: bool,
             file_starts: frozenset[str] = frozenset()) -> dict[str, Any]:
        """``tensors`` with their device tensors (``copy_all``: every tensor) replaced by host copies in the
        buffer. Blocks until every copy has landed. CPU tensors not copied are returned as they are (a save
        that persists before returning may read them in place). ``file_starts``: see :func:`plan`."""
        need = self._prepare(tensors, copy_all, file_starts)
        devices = set()
        for key, src in need.items():
            dst = self._views[key]
            if src.device.type == "cuda":
                devices.add(src.device)
                dst.copy_(src, non_blocking=self.pinned)
            elif src.device.type == "cpu":
                host_copy(dst, src)
            else:
                dst.copy_(src)
        for dev in devices:  # every source device, not only the current one
            torch.cuda.current_stream(dev).synchronize()
        return self._swap(tensors, need)

    def stage(self, tensors: dict[str, Any], late: Callable[[torch.Tensor], bool],
              file_starts: frozenset[str] = frozenset()) -> tuple[dict[str, Any], Staging]:
        """Like ``take(copy_all=True)``, but returns once the copies are scheduled (see
        :mod:`~harness.checkpoint.staging`): the tensors ``late`` selects (those only the optimizer step
        changes) are copied by the returned :class:`Staging`, the others before this returns (CPU) or before
        the caller's stream goes on (CUDA)."""
        need = self._prepare(tensors, True, file_starts)
        cpu, cuda_now, cuda_late, watched = [], [], [], []
        for key, src in need.items():
            pair, on_cuda = (self._views[key], src), src.device.type == "cuda"
            if late(src):
                watched.append(Watched(key, src, src._version))
                (cuda_late if on_cuda else cpu).append(pair)
            elif on_cuda:
                cuda_now.append(pair)
            else:
                host_copy(*pair)
        return self._swap(tensors, need), Staging.start(cpu, cuda_now, cuda_late, watched)

    def _prepare(self, tensors: dict[str, Any], copy_all: bool,
                 file_starts: frozenset[str]) -> dict[str, torch.Tensor]:
        """The tensors to copy (detached local tensors), with a buffer laid out for them."""
        need = {k: _local(t).detach() for k, t in tensors.items() if copy_all or _local(t).device.type != "cpu"}
        self.state_bytes = sum(_nbytes(t) for t in need.values())
        if not need:
            return need
        pin = any(t.device.type == "cuda" for t in need.values())
        layout = tuple((k, t.dtype, tuple(t.shape)) for k, t in need.items())
        planned = (layout, frozenset(file_starts & need.keys()))
        if planned != self._planned or (pin and not self._pin_asked):
            self._allocate(*planned, pin)
        return need

    def _swap(self, tensors: dict[str, Any], need: dict[str, torch.Tensor]) -> dict[str, Any]:
        """``tensors`` with each copied one replaced by its view in the buffer (a shard keeps its place)."""
        out = dict(tensors)
        for key in need:
            t = tensors[key]
            view = self._views[key]
            out[key] = Shard(view, t.global_shape, t.global_offset, t.owner) if isinstance(t, Shard) else view
        return out

    def _allocate(self, layout: Layout, starts: frozenset[str], pin: bool) -> None:
        self.release()  # the old buffer goes before the new one comes: never both at once
        offsets, size = plan(layout, starts)
        buf = torch.empty(size + PAGE, dtype=torch.uint8)  # a page more: the views start on one
        base = -buf.data_ptr() % PAGE
        self._pin_asked = pin  # asked, even if the driver refused: not asked again every save
        if pin:
            _prefault(buf)
        self.pinned = pin and _page_lock(buf)
        self._views = {key: buf[base + offsets[key]:base + offsets[key] + _bytes_of(dtype, shape)].view(dtype)
                       .view(shape) for key, dtype, shape in layout}
        self._buffer, self._planned = buf, (layout, starts)
        log.debug("checkpoint snapshot buffer: %.1f MB %s for %d tensors", size / 1e6,
                  "pinned" if pin else "host", len(layout))

    def release(self) -> None:
        """Free the buffer (the views go with it), unpinning it first."""
        if self._buffer is not None and self.pinned:
            _page_unlock(self._buffer)
        self._views, self._buffer, self._planned, self.pinned, self._pin_asked = {}, None, None, False, False

    def describe(self) -> str:
        if not self.nbytes:
            return "no host copy"
        kind = "pinned" if self.pinned else "host"
        return f"{kind} snapshot {self.nbytes / 1e6:.1f} MB for {self.state_bytes / 1e6:.1f} MB of state"
