"""The ``Storage`` facade: one checkpoint root folder on some backend.

Paths are strings relative to the root, joined with "/" (pathlib would break ``s3://``). The facade owns
paths (no escapes from the root), the durability contract every caller relies on (``open_write`` durable
on exit, ``commit_bytes`` atomic and written last by the checkpoint code) and the fail-fast access check;
the backend (:mod:`harness.storage.backend`, chosen by URL scheme) does the I/O.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import time
from typing import IO, Iterator

from harness.config import local_or_url
from harness.errors import StorageError
from harness.storage import redact
from harness.storage.backend import Backend, open_backend
from harness.storage.options import split_options
from harness.storage.redact import redact_url


# `harness launch` checks the storage before it starts any worker and records that here; the workers inherit
# it, and a CheckpointManager made soon after does not repeat the check (on S3 a PUT and a DELETE: ~0.3 s of
# every resume). Only for the same URL and options, and only while fresh: a worker restarted much later, or
# started by another launcher, checks for itself.
CHECKED_ENV = "HARNESS_STORAGE_CHECKED"
CHECKED_FRESH_S = 120.0


def _clean_rel(rel: str) -> str:
    # Relative names come from our own code or from a validated manifest; refuse escapes anyway.
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise StorageError(f"refusing path that leaves the checkpoint folder: {rel!r}")
    return "/".join(parts)


class Storage:
    """One checkpoint root folder on some backend (local disk, any fsspec filesystem, S3)."""

    def __init__(self, url: str | os.PathLike, storage_options: dict | None = None) -> None:
        url = os.fspath(url)  # a pathlib.Path is a local folder
        secrets = [*redact.secret_values(storage_options), *redact.url_secrets(url)]
        self.url = url
        try:
            # ~ is the home folder, S3:// is s3://; "s3:/bucket" (one slash) and "s3://bucket//run" ValueErrors
            self.url = url = local_or_url(url)
            tuning, options = split_options(storage_options)
            self.backend: Backend
            self.backend, root = open_backend(url, options, tuning, secrets)
        except (ImportError, ValueError) as exc:
            raise StorageError(f"cannot open checkpoint storage {redact_url(url)}: "
                               f"{redact.scrub(str(exc), secrets)}") from exc
        except Exception as exc:  # noqa: BLE001 - a filesystem that connects as it opens (ftp, sftp): no host
            raise StorageError(f"cannot open checkpoint storage {redact_url(url)}: {type(exc).__name__}: "
                               f"{redact.scrub(str(exc), secrets)}") from exc
        self.root = root.rstrip("/") or "/"
        # What the access check vouches for, without putting credentials in the environment: a digest.
        self._identity = hashlib.sha256(json.dumps([url, storage_options or {}], sort_keys=True,
                                                   default=repr).encode()).hexdigest()[:32]

    def __repr__(self) -> str:
        return f"Storage({redact_url(self.url)!r})"

    def path(self, rel: str = "") -> str:
        rel = _clean_rel(rel)
        if not rel:
            return self.root
        return self.root + rel if self.root.endswith("/") else f"{self.root}/{rel}"

    def child(self, rel: str) -> "Storage":
        """The folder ``rel`` inside this one as a Storage of its own, on the same backend (its credentials,
        its connections): a folder another tool nests in its checkpoint (Accelerate's DCP subfolders)."""
        inner = copy.copy(self)
        inner.root = self.path(rel)
        inner.url = f"{self.url.rstrip('/')}/{_clean_rel(rel)}"
        inner._identity = hashlib.sha256(f"{self._identity}/{_clean_rel(rel)}".encode()).hexdigest()[:32]
        return inner

    # -- fail fast ------------------------------------------------------------------------------------

    def check_access(self, write: bool = True) -> None:
        """Fail fast, before training: a one-line StorageError now rather than at the first save an hour later.
        Writers create the root and write and delete a probe; readers list the root. On S3 a missing bucket,
        rejected credentials, a missing permission or no endpoint is named in the message."""
        try:
            self.backend.check_access(self.root, write)
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure here means the folder is unusable
            raise self.access_error(exc, write) from None

    def access_error(self, exc: BaseException, write: bool = True) -> StorageError:
        """The one-line error for a folder that failed a fail-fast check (this one's, or the caller's own
        probe: the shared-folder marker)."""
        return StorageError(f"checkpoint storage {redact_url(self.url)} is not "
                            f"{'writable' if write else 'readable'}: {type(exc).__name__}: {exc}")

    def remember_access(self, write: bool) -> None:
        """Record in this process's environment (which the processes it starts inherit) that
        :meth:`check_access` just passed for this URL and these options."""
        os.environ[CHECKED_ENV] = json.dumps({"id": self._identity, "write": write, "at": time.time()})

    def access_remembered(self, write: bool, within_s: float = CHECKED_FRESH_S) -> bool:
        """Whether a parent process (``harness launch``) checked this URL and options, for writing if
        ``write``, less than ``within_s`` seconds ago."""
        try:
            rec = json.loads(os.environ.get(CHECKED_ENV, ""))
            return (rec["id"] == self._identity and (rec["write"] or not write)
                    and 0 <= time.time() - float(rec["at"]) < within_s)
        except (ValueError, KeyError, TypeError):
            return False

    # -- writing --------------------------------------------------------------------------------------

    def makedirs(self, rel: str = "") -> None:
        self.backend.makedirs(self.path(rel))

    @contextlib.contextmanager
    def open_write(self, rel: str) -> Iterator[IO[bytes]]:
        """A writable binary file; durable (flushed and fsync'd, or upload confirmed) when the block exits
        without error; nothing visible under the name when it raises (object stores)."""
        with self.backend.open_write(self.path(rel)) as f:
            yield f

    def write_bytes(self, rel: str, data: bytes) -> None:
        """A whole small file, durable when this returns."""
        self.backend.write(self.path(rel), data)

    def commit_bytes(self, rel: str, data: bytes) -> None:
        """Write a small record atomically: readers see the old state or the whole new record."""
        self.backend.commit(self.path(rel), data)

    def sync_dir(self, rel: str) -> None:
        """Make the names of files created in a folder durable (local only; a no-op elsewhere)."""
        self.backend.sync_dir(self.path(rel))

    def remove(self, rel: str) -> None:
        self.backend.remove(self.path(rel))

    def remove_tree(self, rel: str) -> None:
        self.backend.remove_tree(self.path(rel))

    def abort_incomplete_uploads(self, rel: str = "") -> list[str]:
        """Drop unfinished multipart uploads under ``rel`` (S3; none elsewhere); the keys they were for."""
        return self.backend.abort_incomplete_uploads(self.path(rel))

    # -- reading --------------------------------------------------------------------------------------

    def refresh(self, rel: str = "") -> None:
        """Forget cached listings so another process's commit is seen."""
        self.backend.refresh(self.path(rel))

    def exists(self, rel: str) -> bool:
        return self.backend.exists(self.path(rel))

    def is_dir(self, rel: str = "") -> bool:
        """Whether ``rel`` is a folder (on object stores: a prefix with objects under it, or the bucket)."""
        return self.backend.is_dir(self.path(rel))

    def size(self, rel: str) -> int | None:
        """Size in bytes, or None if the file does not exist."""
        return self.backend.size(self.path(rel))

    def du(self, rel: str = "") -> int:
        """Total bytes stored under ``rel``."""
        return self.backend.du(self.path(rel))

    def listdir(self, rel: str = "") -> list[str]:
        """Base names of the entries of a folder; empty if it does not exist."""
        return self.backend.listdir(self.path(rel))

    def list_tree(self, rel: str = "", prefix: str = "") -> dict[str, int | None]:
        """Everything under a folder in one listing (on S3 one paginated ListObjectsV2 of the prefix): each
        entry's path relative to ``rel`` -> its size in bytes, or None for a folder (S3 has none, only
        objects). Empty if the folder does not exist. Discovery finds every checkpoint, whether it is
        committed and the size of each of its files from this one call. ``prefix``: only entries whose
        relative path starts with it are listed at all (discovery: ``step-``; other files a user keeps in
        the folder, a TensorBoard tree say, are neither walked nor paged through)."""
        return self.backend.list_tree(self.path(rel), prefix)

    def read_bytes(self, rel: str, start: int | None = None, end: int | None = None) -> bytes:
        return self.backend.read(self.path(rel), start, end)

    def open_read(self, rel: str) -> IO[bytes]:
        """A readable, seekable binary file (on S3: ranged, concurrent, pinned to the object's ETag)."""
        return self.backend.open_read(self.path(rel))

    def local_path(self, rel: str = "") -> str | None:
        """A file name ``os.open`` can use for ``rel`` (local disk), or None (fast paths fall back to open_read)."""
        return self.backend.local_path(self.path(rel))


def is_dir(url: str, storage_options: dict | None = None) -> bool:
    """Whether ``url`` (local path or fsspec URL) is a folder."""
    return Storage(url, storage_options).is_dir()


def open_url(url: str, storage_options: dict | None = None) -> IO[bytes]:
    """A single file by URL (local path or fsspec URL), readable and seekable; FileNotFoundError if missing."""
    folder, _, name = url.rstrip("/").rpartition("/")
    if folder.endswith(":/"):      # memory://file.pt: a file at the filesystem's root
        folder += "/"
    return Storage(folder or (os.sep if url.startswith("/") else os.curdir), storage_options).open_read(name)
