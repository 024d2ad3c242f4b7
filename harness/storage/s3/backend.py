"""The ``s3://`` backend: the Backend protocol on :mod:`client <harness.storage.s3.client>`,
:mod:`writer <harness.storage.s3.writer>`, :mod:`reader <harness.storage.s3.reader>` and
:mod:`access <harness.storage.s3.access>`. Imported only when an ``s3://`` URL is opened."""

from __future__ import annotations

import contextlib
from typing import IO, Iterator

import fsspec

from harness.storage.options import Tuning
from harness.storage.s3 import access, reader
from harness.storage.s3.client import S3Client
from harness.storage.s3.writer import S3Writer


class S3Backend:
    """Object-store semantics: no folders (makedirs and sync_dir are no-ops), a closed upload is durable,
    a commit is one PUT (atomic on S3), listings are never cached."""

    def __init__(self, client: S3Client) -> None:
        self.client = client

    def check_access(self, root: str, write: bool) -> None:
        access.check_access(self.client, root, write)

    def makedirs(self, path: str) -> None:
        pass  # object stores have no folders

    @contextlib.contextmanager
    def open_write(self, path: str) -> Iterator[IO[bytes]]:
        with S3Writer(self.client, path) as f:  # exit: upload completed and confirmed; error: aborted
            yield f  # type: ignore[misc]

    def write(self, path: str, data: bytes) -> None:
        self.client.put(path, data)

    def commit(self, path: str, data: bytes) -> None:
        self.client.put(path, data)  # one PUT: atomic on S3, retried (idempotent), confirmed when it returns

    def sync_dir(self, path: str) -> None:
        pass

    def remove(self, path: str) -> None:
        self.client.remove(path)

    def remove_tree(self, path: str) -> None:
        self.client.remove_tree(path)

    def refresh(self, path: str) -> None:
        pass  # nothing is cached: every listing goes to S3

    def exists(self, path: str) -> bool:
        """An object, or a "folder" (a prefix with objects under it), or the bucket itself."""
        return self.client.head(path) is not None or self.is_dir(path)

    def is_dir(self, path: str) -> bool:
        names = self.client.list(path, True, 1)   # a missing bucket raises here
        return bool(names) or not self.client.split(path)[1].strip("/")  # a bucket is a folder, even empty

    def size(self, path: str) -> int | None:
        h = self.client.head(path)
        return None if h is None else h["size"]

    def du(self, path: str) -> int:
        return self.client.total_size(path)

    def listdir(self, path: str) -> list[str]:
        return sorted({n for n in self.client.list(path, True, 0) if n})

    def list_tree(self, path: str, prefix: str = "") -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        for rel, size in self.client.sizes_under(path, prefix).items():
            if rel.endswith("/"):  # a "folder" marker object some tools create
                if rel.strip("/"):
                    out[rel.rstrip("/")] = None
            else:
                out[rel] = size
        return out

    def read(self, path: str, start: int | None = None, end: int | None = None) -> bytes:
        return reader.cat(self.client, path, start, end)

    def open_read(self, path: str) -> IO[bytes]:
        return reader.open_read(self.client, path)

    def abort_incomplete_uploads(self, path: str) -> list[str]:
        return self.client.abort_uploads(path)

    def local_path(self, path: str) -> str | None:
        return None


def client_options(options: dict, tuning: Tuning) -> dict:
    """s3fs options with harness defaults: no botocore retries (ours are bounded by the budget) and a
    connection pool large enough for the configured concurrency. The caller's own settings win."""
    out = dict(options)
    config = dict(out.get("config_kwargs") or {})
    config.setdefault("retries", {"total_max_attempts": 1})
    config.setdefault("max_pool_connections", max(10, 2 * tuning.max_concurrency + 4))
    out["config_kwargs"] = config
    return out


def open_s3(url: str, options: dict, tuning: Tuning, secrets: list[str]) -> tuple[S3Backend, str]:
    fs, root = fsspec.core.url_to_fs(url, **client_options(options, tuning))
    return S3Backend(S3Client(fs, tuning, secrets)), root
