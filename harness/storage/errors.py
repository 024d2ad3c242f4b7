"""Typed storage failures: the operation and step travel with the error, not as attributes set on someone
else's exception."""

from __future__ import annotations

from harness.errors import StorageError


class StorageOpError(StorageError):
    """One backend operation failed for good (not retryable, or out of retries).

    ``what`` names the operation (``"PUT s3://bucket/key"``), ``step`` the stage of a multi-step procedure
    it belonged to (``"list"``, ``"write"``, ``"delete"`` in the access check; None elsewhere), ``cause`` the
    backend's own exception."""

    def __init__(self, what: str, cause: BaseException, step: str | None = None, message: str | None = None) -> None:
        super().__init__(message if message is not None else f"{what}: {type(cause).__name__}: {cause}")
        self.what = what
        self.cause = cause
        self.step = step
