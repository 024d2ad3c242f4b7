"""The ``s3://`` backend, split by job: :mod:`.retry` (which errors to retry, backoff within a budget),
:mod:`.client` (calls on s3fs's client, small objects, listings, deletes, unfinished uploads), :mod:`.writer`
(concurrent multipart uploads, confirmed before close returns), :mod:`.reader` (ranged ETag-pinned reads),
:mod:`.access` (the fail-fast check) and :mod:`.backend` (the Backend protocol on top). Nothing here is
imported until an ``s3://`` URL is opened; botocore and aiohttp are imported inside functions."""

from harness.storage.options import MAX_PART_BYTES, Tuning, split_options
from harness.storage.s3.retry import RetriesExhausted, RetryPolicy, describe, retry_kind
from harness.storage.s3.writer import MAX_PARTS, PARTS_PER_TIER, part_size_for, parts_needed

__all__ = ["MAX_PARTS", "MAX_PART_BYTES", "PARTS_PER_TIER", "RetriesExhausted", "RetryPolicy", "Tuning",
           "describe", "part_size_for", "parts_needed", "retry_kind", "split_options"]
