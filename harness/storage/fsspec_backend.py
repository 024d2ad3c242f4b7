"""The generic backend: any fsspec filesystem (``memory://`` in tests, gcs, azure, ...) through fsspec's API.

A closed fsspec file is as durable as that filesystem makes it; :meth:`commit` is one ``pipe_file``, which
object stores make atomic (one PUT) and ``memory://`` is in-process.
"""

from __future__ import annotations

import contextlib
from typing import IO, Any, Iterator

import fsspec

from harness.storage.backend import probe_access
from harness.storage.options import Tuning


class FsspecBackend:
    def __init__(self, fs: Any) -> None:
        self.fs = fs

    def check_access(self, root: str, write: bool) -> None:
        probe_access(self, root, write)

    def makedirs(self, path: str) -> None:
        self.fs.makedirs(path, exist_ok=True)

    @contextlib.contextmanager
    def open_write(self, path: str) -> Iterator[IO[bytes]]:
        with self.fs.open(path, "wb") as f:
            yield f

    def write(self, path: str, data: bytes) -> None:
        self.fs.pipe_file(path, data)

    def commit(self, path: str, data: bytes) -> None:
        self.fs.pipe_file(path, data)

    def sync_dir(self, path: str) -> None:
        pass

    def remove(self, path: str) -> None:
        self.fs.rm_file(path)

    def remove_tree(self, path: str) -> None:
        self.fs.rm(path, recursive=True)

    def refresh(self, path: str) -> None:
        self.fs.invalidate_cache(path)

    def exists(self, path: str) -> bool:
        return bool(self.fs.exists(path))

    def is_dir(self, path: str) -> bool:
        return bool(self.fs.isdir(path))

    def size(self, path: str) -> int | None:
        try:
            return int(self.fs.size(path))
        except FileNotFoundError:
            return None

    def du(self, path: str) -> int:
        return int(self.fs.du(path, total=True))

    def listdir(self, path: str) -> list[str]:
        try:
            entries = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def list_tree(self, path: str, prefix: str = "") -> dict[str, int | None]:
        base = path.rstrip("/") + "/"
        top = self.fs._strip_protocol(path).rstrip("/")
        out: dict[str, int | None] = {}
        for where, dirs, files in self.fs.walk(path, detail=True, on_error=_raise_unless_gone):
            if prefix and where.rstrip("/") == top:  # prune the top level: walk only what can match
                for table in (dirs, files):
                    for name in [n for n in table if not n.startswith(prefix)]:
                        del table[name]
            for info in [*dirs.values(), *files.values()]:
                full = info["name"].rstrip("/")
                if full.startswith(base):
                    out[full[len(base):]] = None if info["type"] == "directory" else int(info["size"])
        return out

    def read(self, path: str, start: int | None = None, end: int | None = None) -> bytes:
        return self.fs.cat_file(path, start=start, end=end)

    def open_read(self, path: str) -> IO[bytes]:
        return self.fs.open(path, "rb")

    def abort_incomplete_uploads(self, path: str) -> list[str]:
        return []  # a closed fsspec file is whole; an unclosed one was never made visible

    def local_path(self, path: str) -> str | None:
        return None


def _raise_unless_gone(exc: OSError) -> None:
    """A folder that does not exist (or was removed during the walk) lists as empty; any other failure
    (permissions, a failing store) is not an empty folder."""
    if not isinstance(exc, FileNotFoundError):
        raise exc


def open_fsspec(url: str, options: dict, tuning: Tuning, secrets: list[str]) -> tuple[FsspecBackend, str]:
    fs, root = fsspec.core.url_to_fs(url, **options)
    return FsspecBackend(fs), root
