"""Checkpoint storage: the :class:`Storage` facade over a small :class:`Backend` protocol.

Backends, picked by URL scheme (:func:`register` adds one): ``local`` (plain paths and ``file://``; fsync
and atomic rename), ``fsspec_backend`` (any other fsspec URL, e.g. ``memory://``) and ``s3`` (``s3://``:
bounded retries, concurrent multipart uploads confirmed before ``open_write`` returns, ranged ETag-pinned
reads, uncached listings, a fail-fast access check). The S3 backend, s3fs and botocore are imported only
when an ``s3://`` URL is opened. Storage options named ``harness_*`` tune it (:mod:`harness.storage.options`)
and are never passed to fsspec.
"""

from harness.storage.backend import Backend, register
from harness.storage.errors import StorageOpError
from harness.storage.facade import Storage, is_dir, open_url
from harness.storage.local import atomic_file, atomic_write
from harness.storage.redact import redact_url

__all__ = ["Storage", "Backend", "register", "StorageOpError", "redact_url", "open_url", "is_dir",
           "atomic_file", "atomic_write"]
