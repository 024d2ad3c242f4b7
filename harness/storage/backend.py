"""The storage backend protocol and the registry that picks a backend by URL scheme.

A backend works on full paths in its own namespace (the facade, :class:`harness.storage.Storage`, joins
them). Adding one (GCS, Azure, a local tier in front of S3) is a module with a factory plus one
:func:`register` call; modules are imported only when a URL of their scheme is opened, so ``import harness``
pulls in no cloud SDK.
"""

from __future__ import annotations

import importlib
import uuid
from typing import IO, Callable, ContextManager, Protocol, Union, runtime_checkable

from harness.storage.options import Tuning


@runtime_checkable
class Backend(Protocol):
    """What a checkpoint store must do. Durability is part of the contract: ``open_write``'s file and
    ``write`` are durable when they return, ``commit`` is atomic (old state or the whole new record)."""

    def check_access(self, root: str, write: bool) -> None:
        """Fail fast: raise (a one-line StorageError, or any exception) if ``root`` is not usable."""

    def makedirs(self, path: str) -> None: ...

    def open_write(self, path: str) -> ContextManager[IO[bytes]]:
        """A writable file; durable when the block exits without error, nothing visible when it raises."""

    def write(self, path: str, data: bytes) -> None: ...

    def commit(self, path: str, data: bytes) -> None:
        """Write a small record atomically: readers see the old state or the whole new record."""

    def sync_dir(self, path: str) -> None:
        """Make the names of files created in a folder durable (a no-op where names need no sync)."""

    def remove(self, path: str) -> None: ...

    def remove_tree(self, path: str) -> None: ...

    def refresh(self, path: str) -> None:
        """Forget any cached listing of ``path``."""

    def exists(self, path: str) -> bool: ...

    def is_dir(self, path: str) -> bool: ...

    def size(self, path: str) -> int | None:
        """Size in bytes, or None if there is no such file."""

    def du(self, path: str) -> int:
        """Total bytes of every file under ``path``."""

    def listdir(self, path: str) -> list[str]:
        """Sorted base names of the entries of a folder; empty if it does not exist."""

    def list_tree(self, path: str, prefix: str = "") -> dict[str, int | None]:
        """Everything under a folder in one listing (on object stores one paginated listing of the prefix):
        each entry's path relative to ``path`` ("/"-joined) -> its size in bytes, or None for a folder
        (object stores have none, only objects); empty if ``path`` does not exist. ``prefix``: only the
        entries whose relative path starts with it, and only those are listed (no walk of, or listing
        page for, anything else under ``path``)."""

    def read(self, path: str, start: int | None = None, end: int | None = None) -> bytes: ...

    def open_read(self, path: str) -> IO[bytes]:
        """A readable, seekable binary file."""

    def abort_incomplete_uploads(self, path: str) -> list[str]:
        """Drop unfinished uploads under ``path`` (invisible, but they cost storage); the names dropped."""

    def local_path(self, path: str) -> str | None:
        """``path`` as a file name ``os.open`` can use (for preadv and O_DIRECT readers), or None."""


# (url, fsspec options, tuning, secrets to scrub) -> (backend, root path in the backend's namespace)
BackendFactory = Callable[[str, dict, Tuning, list[str]], "tuple[Backend, str]"]

_REGISTRY: dict[str, Union[str, BackendFactory]] = {}
DEFAULT = "*"


def register(schemes: str | tuple[str, ...], factory: Union[str, BackendFactory]) -> None:
    """Serve URLs of these schemes (``"s3"``; ``"file"`` for plain paths; ``"*"`` for every other) with
    ``factory``, a callable or ``"module:name"`` imported on first use."""
    for scheme in (schemes,) if isinstance(schemes, str) else schemes:
        _REGISTRY[scheme.lower()] = factory


def scheme_of(url: str) -> str:
    if "::" in url:  # a chained URL (simplecache::s3://...): fsspec's business
        return DEFAULT
    return url.split("://", 1)[0].lower() if "://" in url else "file"


def open_backend(url: str, options: dict, tuning: Tuning, secrets: list[str]) -> "tuple[Backend, str]":
    factory = _REGISTRY.get(scheme_of(url), _REGISTRY[DEFAULT])
    if isinstance(factory, str):
        module, _, name = factory.partition(":")
        factory = getattr(importlib.import_module(module), name)
    return factory(url, options, tuning, secrets)


def probe_access(backend: Backend, root: str, write: bool) -> None:
    """The generic access check: create (or list) the root and, for writers, write and delete a probe."""
    if not write:
        backend.listdir(root)
        return
    backend.makedirs(root)
    probe = f"{root.rstrip('/')}/.harness-probe-{uuid.uuid4().hex}"
    backend.write(probe, b"probe")
    backend.remove(probe)


register("file", "harness.storage.local:open_local")
register(("s3", "s3a"), "harness.storage.s3.backend:open_s3")
register(DEFAULT, "harness.storage.fsspec_backend:open_fsspec")
