"""Local disk: the durability contract with fsync, and the one atomic local writer of the project.

Data files are fsync'd before ``open_write`` returns; a commit record is written to a temp file in the same
folder, fsync'd, renamed over the target (atomic on POSIX) and the folder fsync'd so the new name survives a
power cut. :func:`atomic_write` and :func:`atomic_file` do the same for any local file (export uses them).
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import uuid
from typing import IO, Any, Callable, Iterator

import fsspec

from harness import faults
from harness.storage.backend import probe_access
from harness.storage.direct_write import DirectWriter, open_direct
from harness.storage.fsspec_backend import FsspecBackend
from harness.storage.options import Tuning


def fsync_dir(folder: str) -> None:
    """Make the names in ``folder`` durable."""
    fd = os.open(folder or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems refuse fsync on folders; the data itself is synced
        if exc.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replaceable(path: str | os.PathLike) -> str:
    """The file an atomic write to ``path`` replaces: through a symlink to the file it names, as cp writes (the
    link stays a link). Anything there but a regular file is a FileExistsError: renaming over /dev/null (an
    export "to nowhere", run as root) replaced the device itself."""
    path = os.path.realpath(path)
    if os.path.lexists(path) and not os.path.isfile(path):
        raise FileExistsError(errno.EEXIST, "not a regular file (a folder, a device, a pipe): not replacing it", path)
    return path


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temp path in ``path``'s folder for the caller (or a library: torch.save, onnx) to write; on
    success it is fsync'd, renamed over ``path`` and the folder fsync'd; on failure it is removed and
    ``path`` is untouched."""
    path = replaceable(path)
    folder = os.path.dirname(path)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        faults.point("local.atomic_written", file=os.path.basename(path))
        _fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    fsync_dir(folder)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write(f)`` on a fresh temp file, then make it ``path`` atomically and durably.

    ``f`` is buffered on purpose: a raw file's ``write`` may write less than it was given (a disk filling up
    writes what fits, then fails the next call), and callers such as ``torch.jit.save`` ignore the count, so
    a raw file would be renamed into place cut short. A buffered file writes everything or raises (a large
    write still goes to the kernel from the caller's memory, not through the buffer)."""
    with atomic_file(path) as tmp, durable_file(tmp) as f:
        write(f)


@contextlib.contextmanager
def durable_file(path: str) -> Iterator[IO[bytes]]:
    """A new buffered file at ``path`` (see :func:`atomic_write` for why buffered), flushed and fsync'd when
    the block ends without an exception."""
    with open(path, "wb") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


class LocalBackend(FsspecBackend):
    """fsspec's LocalFileSystem for listings and removal; our own writes, for fsync and atomic rename.
    Data files go through :class:`~harness.storage.direct_write.DirectWriter` (``O_DIRECT``) unless
    ``direct`` is off (storage option ``harness_direct_io = false``). ``data_bytes`` counts the bytes written
    so (data files and manifests), ``from_source`` those of them written straight from the caller's memory."""

    def __init__(self, fs: Any, direct: bool = True) -> None:
        super().__init__(fs)
        self.direct = direct
        self.data_bytes = self.from_source = 0
        self._count_lock = threading.Lock()  # several writer threads finish files at once

    def check_access(self, root: str, write: bool) -> None:
        where = self.fs._strip_protocol(root)
        if os.path.exists(where) and not os.path.isdir(where):  # makedirs' "File exists" said it less plainly
            raise NotADirectoryError(f"{where} is a file, not a folder")
        probe_access(self, root, write)

    def list_tree(self, path: str, prefix: str = "") -> dict[str, int | None]:
        """As :meth:`FsspecBackend.list_tree`, with ``os.scandir``: one stat per file and none per folder,
        where fsspec's walk builds an info dict per entry (5x slower; the job saving lists its folder after
        every save, and a run that keeps its checkpoints has thousands of entries)."""
        out: dict[str, int | None] = {}
        todo = [("", self.fs._strip_protocol(path).rstrip("/") or "/")]
        while todo:
            rel, where = todo.pop()
            try:
                with os.scandir(where) as it:
                    entries = list(it)
            except (FileNotFoundError, NotADirectoryError):  # not there (or removed during the walk): empty
                continue
            for e in entries:
                if not rel and prefix and not e.name.startswith(prefix):
                    continue  # prune the top level: walk only what can match
                try:
                    if e.is_dir():
                        out[rel + e.name] = None
                        todo.append((f"{rel}{e.name}/", e.path))
                    else:
                        out[rel + e.name] = e.stat().st_size
                except FileNotFoundError:
                    continue  # removed since the folder was read
        return out

    def makedirs(self, path: str) -> None:
        self.fs.makedirs(path, exist_ok=True)
        fsync_dir(os.path.dirname(path) or ".")

    @contextlib.contextmanager
    def open_write(self, path: str) -> Iterator[IO[bytes]]:
        if not self.direct:
            with durable_file(path) as f:
                yield f
            return
        w = DirectWriter(*open_direct(path))
        try:
            yield w  # type: ignore[misc] - a raw write-only file: write() and fileno()
            w.finish()
            with self._count_lock:
                self.data_bytes += w.size
                self.from_source += w.from_source
        finally:
            w.close()

    def write(self, path: str, data: bytes) -> None:
        with self.open_write(path) as f:
            f.write(data)

    def commit(self, path: str, data: bytes) -> None:
        atomic_write(path, lambda f: f.write(data))

    def sync_dir(self, path: str) -> None:
        fsync_dir(path)

    def open_read(self, path: str) -> IO[bytes]:
        return open(path, "rb", buffering=0)

    def local_path(self, path: str) -> str | None:
        return path


def open_local(url: str, options: dict, tuning: Tuning, secrets: list[str]) -> tuple[LocalBackend, str]:
    fs, root = fsspec.core.url_to_fs(url, **options)  # file:// and relative paths made absolute
    return LocalBackend(fs, direct=tuning.direct_io), root
