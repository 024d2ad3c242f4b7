"""A tiny storage protocol over fsspec: local paths, file://, memory://, s3:// (through s3fs).

Paths are strings relative to the storage root, joined with "/" (pathlib would break ``s3://``).
Durability is this module's job: local writes are fsync'd (file and folder); on object stores a closed
upload is durable, and :meth:`Storage.commit_bytes` is one PUT, which S3 makes atomic.

On ``s3://`` every operation goes through :mod:`harness.s3` (bounded retries, concurrent multipart uploads
confirmed before ``open_write`` returns, concurrent ranged reads, uncached listings, :meth:`check_access`).
Storage options named ``harness_*`` tune it (see :mod:`harness.s3`) and are never passed to fsspec.
"""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from typing import IO, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

from harness import s3
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
            tuning, options = s3.split_options(storage_options)
            if s3.is_s3_url(url):
                options = s3.client_options(options, tuning)
            self.fs, root = fsspec.core.url_to_fs(url, **options)
        except (ImportError, ValueError) as exc:
            raise StorageError(f"cannot open checkpoint storage {redact_url(url)}: {exc}") from exc
        self.root = root.rstrip("/") or "/"
        self.is_local = isinstance(self.fs, LocalFileSystem)
        # S3 machinery (None elsewhere): it knows the option values only to scrub them from messages
        self.s3 = s3.S3Io(self.fs, tuning, _secret_values(storage_options)) if s3.is_s3fs(self.fs) else None

    def __repr__(self) -> str:
        return f"Storage({redact_url(self.url)!r})"

    def path(self, rel: str = "") -> str:
        rel = _clean_rel(rel)
        if not rel:
            return self.root
        return self.root + rel if self.root.endswith("/") else f"{self.root}/{rel}"

    # -- writing --------------------------------------------------------------------------------------

    def check_access(self, write: bool = True) -> None:
        """Fail fast, before training: a one-line StorageError now rather than at the first save an hour later.
        On S3: list the root and (``write``) PUT and DELETE a probe object (missing bucket, rejected credentials,
        missing permission). Elsewhere: create the root and (``write``) write and delete a probe file."""
        if self.s3 is not None:
            self.s3.check_access(self.root, write)
            return
        try:
            self.makedirs("") if write else self.listdir()
            if write:
                probe = f".harness-probe-{uuid.uuid4().hex}"
                self.write_bytes(probe, b"probe")
                self.remove(probe)
        except Exception as exc:  # noqa: BLE001 - any failure here means the folder is unusable
            raise StorageError(f"checkpoint storage {redact_url(self.url)} is not "
                               f"{'writable' if write else 'readable'}: {type(exc).__name__}: {exc}") from None

    def makedirs(self, rel: str = "") -> None:
        if self.s3 is not None:
            return  # object stores have no folders
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
        elif self.s3 is not None:
            with self.s3.open_write(path) as f:  # exit: upload completed and confirmed; error: aborted
                yield f
        else:
            with self.fs.open(path, "wb") as f:
                yield f

    def write_bytes(self, rel: str, data: bytes) -> None:
        if self.is_local:
            with self.open_write(rel) as f:
                f.write(data)
        elif self.s3 is not None:
            self.s3.put(self.path(rel), data)
        else:
            self.fs.pipe_file(self.path(rel), data)

    def commit_bytes(self, rel: str, data: bytes) -> None:
        """Write a small record atomically: readers see the old state or the whole new record."""
        path = self.path(rel)
        if self.s3 is not None:
            self.s3.put(path, data)  # one PUT: atomic on S3, retried (idempotent), confirmed when it returns
            return
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
        if self.s3 is not None:
            return self.s3.remove(self.path(rel))
        self.fs.rm_file(self.path(rel))

    def remove_tree(self, rel: str) -> None:
        if self.s3 is not None:
            return self.s3.remove_tree(self.path(rel))
        self.fs.rm(self.path(rel), recursive=True)

    # -- reading --------------------------------------------------------------------------------------

    def refresh(self, rel: str = "") -> None:
        """Forget cached listings (s3fs caches them) so another process's commit is seen."""
        self.fs.invalidate_cache(self.path(rel))

    def exists(self, rel: str) -> bool:
        if self.s3 is not None:
            return self.s3.exists(self.path(rel))
        return bool(self.fs.exists(self.path(rel)))

    def size(self, rel: str) -> int | None:
        """Size in bytes, or None if the file does not exist."""
        if self.s3 is not None:
            return self.s3.size(self.path(rel))
        try:
            return int(self.fs.size(self.path(rel)))
        except FileNotFoundError:
            return None

    def listdir(self, rel: str = "") -> list[str]:
        """Base names of the entries of a folder; empty if it does not exist."""
        if self.s3 is not None:
            return self.s3.listdir(self.path(rel))  # straight from S3: never a cached listing
        try:
            entries = self.fs.ls(self.path(rel), detail=False)
        except FileNotFoundError:
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def read_bytes(self, rel: str, start: int | None = None, end: int | None = None) -> bytes:
        if self.s3 is not None:
            return self.s3.cat(self.path(rel), start, end)
        return self.fs.cat_file(self.path(rel), start=start, end=end)

    def open_read(self, rel: str) -> IO[bytes]:
        """A readable, seekable binary file."""
        if self.is_local:
            return open(self.path(rel), "rb", buffering=0)
        if self.s3 is not None:
            return self.s3.open_read(self.path(rel))  # ranged, concurrent, pinned to the object's ETag
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
        if self.s3 is not None:
            return self.s3.read_into(self.path(rel), offset, buf)
        data = self.fs.cat_file(self.path(rel), start=offset, end=offset + n)
        if len(data) != n:
            raise EOFError(f"{rel}: expected {n} bytes at offset {offset}, got {len(data)}")
        buf[:] = data


_SECRET_WORDS = ("key", "secret", "token", "password", "credential")


def _secret_values(obj: object, secret: bool = False) -> list[str]:
    """String values of options whose name says credential (key, secret, token...), at any depth."""
    if isinstance(obj, dict):
        return [s for k, v in obj.items()
                for s in _secret_values(v, secret or any(w in str(k).lower() for w in _SECRET_WORDS))]
    if isinstance(obj, (list, tuple)):
        return [s for v in obj for s in _secret_values(v, secret)]
    return [obj] if secret and isinstance(obj, str) else []
