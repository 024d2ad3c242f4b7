"""A tiny storage protocol over fsspec: local paths, file://, memory://, s3:// (through s3fs).

Paths are strings relative to the storage root, joined with "/" (pathlib would break ``s3://``).
Durability is this module's job: local writes are fsync'd (file and folder); on object stores a closed
upload is durable, and :meth:`Storage.commit_bytes` is one PUT, which S3 makes atomic.
"""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from typing import IO, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

from harness.errors import StorageError


def _clean_rel(rel: str) -> str:
    # Relative names come from our own code or from a validated manifest; refuse escapes anyway.
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise StorageError(f"refusing path that leaves the checkpoint folder: {rel!r}")
    return "/".join(parts)


def redact_url(url: str) -> str:
    """The URL without any user:password@ part, for logs and errors."""
    if "://" in url and "@" in url.split("://", 1)[1].split("/", 1)[0]:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


class Storage:
    """One checkpoint root folder on some fsspec filesystem."""

    def __init__(self, url: str, storage_options: dict | None = None) -> None:
        self.url = url
        try:
            self.fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        except (ImportError, ValueError) as exc:
            raise StorageError(f"cannot open checkpoint storage {redact_url(url)}: {exc}") from exc
        self.root = root.rstrip("/") or "/"
        self.is_local = isinstance(self.fs, LocalFileSystem)

    def __repr__(self) -> str:
        return f"Storage({redact_url(self.url)!r})"

    def path(self, rel: str = "") -> str:
        rel = _clean_rel(rel)
        if not rel:
            return self.root
        return self.root + rel if self.root.endswith("/") else f"{self.root}/{rel}"

    # -- writing --------------------------------------------------------------------------------------

    def makedirs(self, rel: str = "") -> None:
        self.fs.makedirs(self.path(rel), exist_ok=True)
        if self.is_local:
            self._fsync_dir(os.path.dirname(self.path(rel)) or ".")

    @contextlib.contextmanager
    def open_write(self, rel: str) -> Iterator[IO[bytes]]:
        """A writable binary file; durable (flushed and fsync'd) when the block exits without error."""
        path = self.path(rel)
        if self.is_local:
            with open(path, "wb", buffering=0) as f:
                yield f
                os.fsync(f.fileno())
        else:
            with self.fs.open(path, "wb") as f:
                yield f

    def write_bytes(self, rel: str, data: bytes) -> None:
        if self.is_local:
            with self.open_write(rel) as f:
                f.write(data)
        else:
            self.fs.pipe_file(self.path(rel), data)

    def commit_bytes(self, rel: str, data: bytes) -> None:
        """Write a small record atomically: readers see the old state or the whole new record."""
        path = self.path(rel)
        if not self.is_local:
            self.fs.pipe_file(path, data)  # one PUT: atomic on S3; memory:// is atomic in-process
            return
        folder = os.path.dirname(path)
        tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb", buffering=0) as f:
                f.write(data)
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        self._fsync_dir(folder)

    def sync_dir(self, rel: str) -> None:
        """Make the names of files created in a folder durable (local only; a no-op elsewhere)."""
        if self.is_local:
            self._fsync_dir(self.path(rel))

    @staticmethod
    def _fsync_dir(folder: str) -> None:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError as exc:  # some filesystems refuse fsync on folders; the data itself is synced
            if exc.errno not in (errno.EINVAL, errno.EBADF):
                raise
        finally:
            os.close(fd)

    def remove(self, rel: str) -> None:
        self.fs.rm_file(self.path(rel))

    def remove_tree(self, rel: str) -> None:
        self.fs.rm(self.path(rel), recursive=True)

    # -- reading --------------------------------------------------------------------------------------

    def refresh(self, rel: str = "") -> None:
        """Forget cached listings (s3fs caches them) so another process's commit is seen."""
        self.fs.invalidate_cache(self.path(rel))

    def exists(self, rel: str) -> bool:
        return bool(self.fs.exists(self.path(rel)))

    def size(self, rel: str) -> int | None:
        """Size in bytes, or None if the file does not exist."""
        try:
            return int(self.fs.size(self.path(rel)))
        except FileNotFoundError:
            return None

    def listdir(self, rel: str = "") -> list[str]:
        """Base names of the entries of a folder; empty if it does not exist."""
        try:
            entries = self.fs.ls(self.path(rel), detail=False)
        except FileNotFoundError:
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def read_bytes(self, rel: str, start: int | None = None, end: int | None = None) -> bytes:
        return self.fs.cat_file(self.path(rel), start=start, end=end)

    def open_read(self, rel: str) -> IO[bytes]:
        """A readable, seekable binary file."""
        if self.is_local:
            return open(self.path(rel), "rb", buffering=0)
        return self.fs.open(self.path(rel), "rb")

    def read_into(self, rel: str, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the bytes at ``offset``; a short file raises EOFError."""
        n = len(buf)
        if self.is_local:
            with open(self.path(rel), "rb", buffering=0) as f:
                f.seek(offset)
                got = 0
                while got < n:
                    k = f.readinto(buf[got:])
                    if not k:
                        raise EOFError(f"{rel}: expected {n} bytes at offset {offset}, got {got}")
                    got += k
            return
        data = self.fs.cat_file(self.path(rel), start=offset, end=offset + n)
        if len(data) != n:
            raise EOFError(f"{rel}: expected {n} bytes at offset {offset}, got {len(data)}")
        buf[:] = data
