"""Low-level reads for :mod:`harness.checkpoint.direct_read`: positional reads into caller memory, a bound
on scratch memory, and checksum checks."""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator

import torch

from harness.checkpoint.blobs import read_exactly
from harness.checkpoint.format import TensorEntry
from harness.errors import CheckpointCorruptError
from harness.storage import Storage

MAX_IOV = 500                       # buffers per preadv (Linux allows 1024)
ADVICE: int | None = None           # posix_fadvise for local data files; None: the kernel's default readahead


class Aborted(Exception):
    """Another job failed: stop early (never surfaces)."""


class Reader:
    """Positional reads of the data files of one checkpoint: one descriptor per local file and thread;
    elsewhere one :meth:`Storage.open_read` handle per file and thread (on S3 a large ``readinto`` is a set of
    concurrent ranged GETs pinned to the object's ETag).

    Local descriptors are not shared between threads although ``preadv`` would allow it: the kernel keeps its
    readahead state per open file, and two threads reading different places through one descriptor make every
    read look random to it (small synchronous reads instead of a streaming window). No ``fadvise`` hint: on the
    disks measured (benchmarks/checkpoint_io.py), POSIX_FADV_SEQUENTIAL (a doubled window) and WILLNEED ahead of
    the reads were both slower than the kernel's default readahead."""

    def __init__(self, storage: Storage, folder: str) -> None:
        self.storage, self.folder = storage, folder
        self.local = is_local(storage)
        self._fds: list[int] = []
        self._handles: list = []
        self._mine = threading.local()
        self._lock = threading.Lock()

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self._fds:
            os.close(fd)
        for f in self._handles:
            with contextlib.suppress(Exception):
                f.close()
        self._fds.clear()
        self._handles.clear()

    def where(self, fname: str) -> str:
        return f"{self.folder}/{fname}"

    def _fd(self, fname: str) -> int:
        mine = self._mine.__dict__.setdefault("fds", {})
        fd = mine.get(fname)
        if fd is None:
            path = self.storage.local_path(self.where(fname))
            if path is None:
                raise RuntimeError(f"{self.where(fname)} is not a local file")  # only used when is_local
            fd = mine[fname] = os.open(path, os.O_RDONLY)
            if ADVICE is not None:
                with contextlib.suppress(OSError, AttributeError):
                    os.posix_fadvise(fd, 0, 0, ADVICE)
            with self._lock:
                self._fds.append(fd)
        return fd

    def _handle(self, fname: str):  # noqa: ANN202 - whatever Storage.open_read returns
        mine = self._mine.__dict__.setdefault("files", {})
        f = mine.get(fname)
        if f is None:
            f = mine[fname] = self.storage.open_read(self.where(fname))
            with self._lock:
                self._handles.append(f)
        return f

    def read(self, fname: str, offset: int, bufs: list[memoryview], key: str) -> None:
        """Fill ``bufs`` (back to back) with the bytes at ``offset``; a short file is a corrupt checkpoint."""
        what = f"{self.where(fname)}: tensor {key!r}"
        if self.local:
            return _preadv_full(self._fd(fname), bufs, offset, what)
        f = self._handle(fname)
        for buf in bufs:
            read_exactly(f, buf, offset, what)
            offset += len(buf)


def is_local(storage: Storage) -> bool:
    """Whether the storage's files are local files that ``os.open`` can read (``Storage.local_path``)."""
    return storage.local_path() is not None


def _preadv_full(fd: int, bufs: list[memoryview], offset: int, what: str) -> None:
    bufs = [b for b in bufs if len(b)]
    i = 0
    while i < len(bufs):
        n = os.preadv(fd, bufs[i:i + MAX_IOV], offset)
        if n <= 0:
            raise CheckpointCorruptError(f"{what} is truncated (the file ends at byte {offset})")
        offset += n
        while i < len(bufs) and n >= len(bufs[i]):
            n -= len(bufs[i])
            i += 1
        if n:
            bufs[i] = bufs[i][n:]


class Budget:
    """Bytes of staging/scratch memory in use, bounded; one request larger than the bound runs alone."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.used, self.peak = capacity, 0, 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, n: int) -> Iterator[None]:
        with self._cond:
            while self.used and self.used + n > self.capacity:
                self._cond.wait()
            self.used += n
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            with self._cond:
                self.used -= n
                self._cond.notify_all()


def byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, writable, without a copy."""
    if not t.numel():
        return memoryview(bytearray())
    return memoryview(t.detach().reshape(-1).view(torch.uint8).numpy())


def check_digest(e: TensorEntry, digest: str, where: str) -> None:
    """Raise CheckpointCorruptError naming file and tensor unless ``digest`` is the stored checksum."""
    if digest != e.checksum:
        raise CheckpointCorruptError(f"{where}: checksum mismatch for tensor {e.ident!r} (stored {e.checksum}, "
                                     f"computed {digest})")


