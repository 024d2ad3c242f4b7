"""A background save's data files, written a few MB at a time so the work can move between threads.

Same files, offsets and checksums as :func:`harness.checkpoint.blobs.write_tensors` (the synchronous path):
the same grouping into files, 64-byte aligned offsets, an xxh3 of each tensor and, for shards, of each
block of rows. The difference is only how the work is cut: each data file is a :class:`FileTask` whose
``step()`` writes one piece (at most ``PIECE_BYTES``, ending on a page of the file, or one checksum block of a
shard) and hashes it, so a :class:`~harness.checkpoint.background.YieldingPool` can run it on low-priority
threads and hand it to normal ones between two pieces when the save is waited on.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
from typing import IO, Any

import torch
import xxhash

from harness import faults
from harness.checkpoint.background import YieldingPool
from harness.checkpoint.blobs import ALIGN, byte_view, chunk_rows, plan_files, write_all
from harness.checkpoint.codec import Shard
from harness.checkpoint.format import TensorEntry, checksum, data_file_name, dtype_name
from harness.storage import Storage
from harness.storage.direct_write import ALIGN as PAGE  # pieces of a whole tensor end on one (_piece_end)

PIECE_BYTES = 4 << 20  # the most one step writes: bounds what a starved low-priority thread still holds


class FileTask:
    """One data file: open, then one piece per step; :meth:`finish` (fsync and close) is left to a thread at
    normal priority: an fsync is one unbounded step (it waits for the whole file's writeback) but takes
    little CPU, so at idle priority it would only risk starving a save that is waited on."""

    def __init__(self, storage: Storage, path: str, fname: str, keys: list[str], tensors: dict[str, Any],
                 rank: int, chunk_bytes: int) -> None:
        self.storage, self.path, self.fname, self.rank, self.chunk_bytes = storage, path, fname, rank, chunk_bytes
        self._todo = [(k, tensors[k]) for k in keys]
        self.entries: list[TensorEntry] = []
        self.size = 0
        self.error: BaseException | None = None
        self._cm: Any = None
        self._f: IO[bytes] | None = None
        self._cur: _Tensor | None = None

    def step(self) -> bool:
        if self._f is None:
            self._cm = self.storage.open_write(self.path)
            self._f = self._cm.__enter__()
            return False
        if self._cur is None:
            if not self._todo:
                return True
            key, t = self._todo.pop(0)
            pad = -self.size % ALIGN
            if pad:
                write_all(self._f, memoryview(b"\0" * pad))
                self.size += pad
            self._cur = _Tensor(key, t, self.size, self.chunk_bytes)
        if self._cur.write_piece(self._f):
            self.entries.append(self._cur.entry(self.fname, self.rank))
            self.size += self._cur.length
            self._cur = None
        return False

    def finish(self) -> None:
        """fsync and close (local), complete the upload (object stores); a failure is the task's error."""
        cm, self._cm, self._f = self._cm, None, None
        try:
            cm.__exit__(None, None, None)
        except Exception as exc:  # noqa: BLE001 - reported like a write error, in file order
            self.error = exc

    def fail(self, exc: BaseException) -> None:
        self.error = exc
        cm, self._cm, self._f = self._cm, None, None
        if cm is not None:
            try:
                cm.__exit__(type(exc), exc, exc.__traceback__)  # closes the file; no fsync, no upload
            except BaseException:  # noqa: BLE001 - the first error is the one reported
                pass


class _Tensor:
    """One tensor being written: its bytes, the running checksum, and a shard's block checksums."""

    def __init__(self, key: str, t: Any, offset: int, chunk_bytes: int) -> None:
        self.key, self.offset = key, offset
        self.shard = t if isinstance(t, Shard) else None
        self.t = self.shard.local if self.shard is not None else t
        self.buf = byte_view(self.t)
        self.length = len(self.buf)
        self.done = 0
        self.hasher = xxhash.xxh3_64()
        # A shard is written one checksummed block of rows at a time (the blocks blobs' writer hashes).
        self.rows = chunk_rows(self.length, tuple(self.t.shape), chunk_bytes) if self.shard is not None else None
        self.piece = PIECE_BYTES if self.rows is None else self.rows * (self.length // self.t.shape[0])
        self.sums: list[str] = []

    def write_piece(self, f: IO[bytes]) -> bool:
        """Write and hash the next piece; True once the whole tensor is written."""
        piece = self.buf[self.done:self._piece_end()]
        write_all(f, piece)
        self.hasher.update(piece)
        if self.rows is not None:
            self.sums.append(checksum(piece))
        self.done += len(piece)
        return self.done >= self.length

    def _piece_end(self) -> int:
        """Where the next piece ends: at most ``piece`` bytes on, and (a whole tensor's piece, not the last) on
        a page of the file. Why: the local writer sends pieces laid out in memory as in the file straight to
        the disk, a page at a time (:mod:`harness.storage.direct_write`); a piece that ends mid-page leaves
        that page for the next piece to complete, one more small write each time."""
        end = min(self.length, self.done + self.piece)
        if self.rows is None and end < self.length:
            on_page = (self.offset + end) // PAGE * PAGE - self.offset
            if on_page > self.done:
                end = on_page
        return end

    def entry(self, fname: str, rank: int) -> TensorEntry:
        extra = {}
        if self.shard is not None:
            extra = dict(global_shape=tuple(self.shard.global_shape), global_offset=tuple(self.shard.global_offset),
                         chunk_rows=self.rows, chunk_checksums=tuple(self.sums) if self.rows else None)
        return TensorEntry(key=self.key, dtype=dtype_name(self.t.dtype), shape=tuple(self.t.shape), file=fname,
                           offset=self.offset, length=self.length, checksum=self.hasher.hexdigest(), rank=rank,
                           **extra)


def write_tensors(storage: Storage, folder: str, tensors: dict[str, "torch.Tensor | Shard"], *, rank: int,
                  step: int, max_file_bytes: int, chunk_bytes: int, pool: YieldingPool,
                  urgent: threading.Event, deadline: float | None = None) -> tuple[dict[str, dict], list[TensorEntry]]:
    """:func:`harness.checkpoint.blobs.write_tensors` on ``pool``: the same (files, entries), each file
    fsync'd; the first failure (in file order) is raised once every file is finished or abandoned."""
    groups = plan_files(tensors, max_file_bytes)
    tasks = [FileTask(storage, f"{folder}/{data_file_name(rank, i)}", data_file_name(rank, i), g, tensors, rank,
                      chunk_bytes) for i, g in enumerate(groups)]
    pool.run(tasks, urgent, deadline)
    written = [t for t in tasks if t.error is None]
    with cf.ThreadPoolExecutor(max_workers=max(1, min(pool.threads, len(written)))) as finishers:
        list(finishers.map(FileTask.finish, written))  # this thread's (normal) priority, in parallel
    files: dict[str, dict] = {}
    entries: list[TensorEntry] = []
    for task in tasks:
        if task.error is not None:
            raise task.error
        files[task.fname] = {"size": task.size, "rank": rank}
        entries.extend(task.entries)
        faults.point("save.data_file", step=step, rank=rank, file=task.fname)
    return files, entries
