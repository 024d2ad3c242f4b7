"""S3 behind :class:`harness.storage.Storage`: retries, multipart uploads, ranged concurrent reads, fail-fast.

Storage hands every operation on an ``s3://`` root to :class:`S3Io`. s3fs supplies what it does well - the
credentials chain (environment, profile, instance role, or ``storage_options``), endpoint and region, and the
aiobotocore client with its event loop - while this module calls the S3 API on that client itself, so that
it controls what a checkpoint store needs:

* **Commit order.** A data object is *confirmed* when its PUT (or CompleteMultipartUpload) succeeded and a
  HEAD shows the expected size; the writer's ``close()`` returns only then, so the commit record (one PUT,
  which S3 makes atomic) is written after every data object exists whole. Nothing is ever renamed.
* **Fresh state.** Listings, HEADs and reads go to S3 every time: nothing is served from s3fs's listing
  cache, so discovery sees another process's commit at once (S3 is strongly read-after-write consistent).
* **Throughput with bounded memory.** Large objects go up as multipart uploads whose parts are copied into
  part-sized buffers and uploaded concurrently; at most ``harness_max_concurrency`` parts are in flight per
  Storage (shared by all its writers), and each part is streamed from its buffer (:class:`BufferBody`, no
  copies in botocore/aiohttp), so memory is bounded by ``(max_concurrency + open writers) x part_size``
  and never holds a second copy of the state. Part sizes double every 500 parts so an object
  of up to 5 TiB fits in S3's 10,000-part limit (objects over 5 GB need multipart; small ones are one PUT).
  Reads are ranged GETs, split into part-sized ranges fetched concurrently straight into the caller's
  buffer, pinned to the object's ETag (``If-Match``) so an object replaced mid-read is an error, not a mix.
* **Retries.** Throttling (503 SlowDown, 429, ...), 5xx, connection resets, read/connect timeouts and
  truncated bodies are retried with exponential backoff and full jitter, within a time budget per
  operation (``harness_retry_budget_s``); then a one-line :class:`StorageError`. botocore's own retries are
  switched off by default so the budget is the only bound (pass ``config_kwargs.retries`` to override).
* **Fail fast.** :meth:`S3Io.check_access` lists the prefix and (for writers) PUTs and DELETEs a probe
  object, turning a missing bucket, rejected credentials or a missing permission into one line naming the
  bucket - never a credential.

Options read from ``storage_options`` (``checkpoint.storage_options`` or ``harness ckpt ... --storage-option``)
and removed before the rest goes to s3fs (they are accepted, and ignored, for every other filesystem):

``harness_part_size_mb`` (float, default 16)
    Multipart part size in MiB; also the size of each concurrent ranged GET. S3 requires >= 5 MiB for every
    part but the last; smaller values are for tests against servers that allow them (moto).
``harness_max_concurrency`` (int, default 8)
    Parts uploaded, and ranges downloaded, at the same time per Storage.
``harness_retry_budget_s`` (float, default 120)
    How long one S3 operation may keep retrying before it fails. The access check uses at most 30 s.
``harness_multipart_threshold_mb`` (float, default: the part size)
    Objects at least this large go up as multipart uploads; smaller ones as one PUT.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import io
import logging
import os
import random
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, TypeVar

from harness import faults
from harness.errors import StorageError

log = logging.getLogger("harness")

T = TypeVar("T")

MIB = 1 << 20
MAX_PARTS = 10_000               # S3's limit on parts per multipart upload
MAX_PART_BYTES = 5 << 30         # S3's limit on one part
PARTS_PER_TIER = 500             # part size doubles after every this many parts
ACCESS_CHECK_BUDGET_S = 30.0

OPTION_KEYS = ("harness_part_size_mb", "harness_max_concurrency", "harness_retry_budget_s",
               "harness_multipart_threshold_mb")

# Error codes worth another try. Throttling gets a longer backoff than a plain 5xx.
THROTTLE_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "ThrottledException",
                            "RequestThrottled", "RequestThrottledException", "TooManyRequests",
                            "TooManyRequestsException", "RequestLimitExceeded", "BandwidthLimitExceeded",
                            "ProvisionedThroughputExceededException", "503"})
TRANSIENT_CODES = frozenset({"InternalError", "ServiceUnavailable", "RequestTimeout", "RequestTimeoutException",
                             "PriorRequestNotComplete", "InternalFailure", "500", "502", "504"})
CREDENTIAL_CODES = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
                              "TokenRefreshRequired", "InvalidSecurity", "AuthorizationHeaderMalformed"})


# -- options ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class S3Tuning:
    part_size: int = 16 * MIB
    max_concurrency: int = 8
    retry_budget_s: float = 120.0
    multipart_threshold: int = 0     # 0: the part size

    def __post_init__(self) -> None:
        if self.part_size < 1024:
            raise ValueError("harness_part_size_mb must be at least 1 KiB (S3 itself wants >= 5 MiB)")
        if self.part_size > MAX_PART_BYTES:
            raise ValueError("harness_part_size_mb must be at most 5120 (S3's largest part)")
        if self.max_concurrency < 1:
            raise ValueError("harness_max_concurrency must be >= 1")
        if not self.retry_budget_s >= 0:
            raise ValueError("harness_retry_budget_s must be >= 0")

    @property
    def threshold(self) -> int:
        return self.multipart_threshold or self.part_size


def split_options(storage_options: dict | None) -> tuple[S3Tuning, dict]:
    """(tuning, options for fsspec): the ``harness_*`` keys removed and parsed. ValueError when bad."""
    rest = dict(storage_options or {})
    raw = {k: rest.pop(k) for k in OPTION_KEYS if k in rest}
    unknown = [k for k in rest if isinstance(k, str) and k.startswith("harness_")]
    if unknown:
        raise ValueError(f"unknown storage option {unknown[0]!r} (known: {', '.join(OPTION_KEYS)})")

    def num(key: str, kind: type, default: Any) -> Any:
        if key not in raw:
            return default
        value = raw[key]
        try:
            if isinstance(value, bool):
                raise TypeError
            return kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"storage option {key} must be a number, got {type(value).__name__}") from None

    tuning = S3Tuning(part_size=int(num("harness_part_size_mb", float, 16.0) * MIB),
                      max_concurrency=num("harness_max_concurrency", int, 8),
                      retry_budget_s=num("harness_retry_budget_s", float, 120.0),
                      multipart_threshold=int(num("harness_multipart_threshold_mb", float, 0.0) * MIB))
    return tuning, rest


def is_s3_url(url: str) -> bool:
    return url.split("://", 1)[0].lower() in ("s3", "s3a") if "://" in url else False


def client_options(options: dict, tuning: S3Tuning) -> dict:
    """s3fs options with harness defaults: no botocore retries (ours are bounded by the budget) and a
    connection pool large enough for the configured concurrency. The caller's own settings win."""
    out = dict(options)
    config = dict(out.get("config_kwargs") or {})
    config.setdefault("retries", {"total_max_attempts": 1})
    config.setdefault("max_pool_connections", max(10, 2 * tuning.max_concurrency + 4))
    out["config_kwargs"] = config
    return out


def is_s3fs(fs: Any) -> bool:
    return any(c.__module__.split(".")[0] == "s3fs" and c.__name__ == "S3FileSystem" for c in type(fs).__mro__)


def part_size_for(part_number: int, base: int) -> int:
    """Size of part ``part_number`` (1-based): ``base``, doubled after every 500 parts, at most 5 GiB.
    Parts need not be equal in S3, only >= 5 MiB (but the last); growth keeps huge objects under 10,000 parts."""
    return min(MAX_PART_BYTES, base << ((part_number - 1) // PARTS_PER_TIER))


def parts_needed(total: int, base: int) -> int:
    """How many parts an object of ``total`` bytes takes with growing part sizes (for planning and tests)."""
    n, done = 0, 0
    while done < total:
        n += 1
        done += part_size_for(n, base)
    return max(n, 1)


# -- errors and retries -----------------------------------------------------------------------------

class ShortReadError(Exception):
    """A response body ended before its Content-Length (a dropped connection): retryable."""


def _client_error_info(exc: BaseException) -> tuple[str, int, str] | None:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict) or "Error" not in response:
        return None
    err = response.get("Error") or {}
    status = int((response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
    return str(err.get("Code") or status), status, str(err.get("Message") or "")


def retry_kind(exc: BaseException) -> str | None:
    """'throttle', 'transient' or None (do not retry)."""
    info = _client_error_info(exc)
    if info is not None:
        code, status, _ = info
        if code in THROTTLE_CODES or status in (429, 503):
            return "throttle"
        if code in TRANSIENT_CODES or status >= 500:
            return "transient"
        return None
    if isinstance(exc, ShortReadError):
        return "transient"
    try:
        from botocore import exceptions as bex
        from botocore.parsers import ResponseParserError  # throttling front ends sometimes send bad XML
    except ImportError:  # pragma: no cover - s3fs depends on botocore
        bex = None
    if bex is not None:
        if isinstance(exc, (bex.NoCredentialsError, bex.PartialCredentialsError, bex.ParamValidationError)):
            return None
        if isinstance(exc, (bex.ConnectionError, bex.HTTPClientError, bex.IncompleteReadError,
                            ResponseParserError)):
            return "transient"
    try:
        import aiohttp
        if isinstance(exc, aiohttp.ClientError):
            return "transient"
    except ImportError:  # pragma: no cover
        pass
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError, ConnectionError)):
        return "transient"
    return None


def describe(exc: BaseException) -> str:
    """A short one-line description of an S3 failure."""
    info = _client_error_info(exc)
    if info is not None:
        code, status, message = info
        text = f"{status} {code}" if status and str(status) != code else code
        return f"{text}: {message}"[:300] if message else text
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__


@dataclass
class RetryPolicy:
    """Exponential backoff with full jitter, bounded by a time budget per operation."""

    budget_s: float = 120.0
    base_s: float = 0.05          # first delay is drawn from [0, base_s * 2]
    cap_s: float = 8.0            # no single delay longer than this
    throttle_factor: float = 4.0  # SlowDown & co. back off this much harder

    def delay(self, attempt: int, kind: str, rng: random.Random | None = None) -> float:
        """Delay before attempt ``attempt + 1`` (``attempt`` >= 1 failed so far)."""
        base = self.base_s * (self.throttle_factor if kind == "throttle" else 1.0)
        return (rng or random).uniform(0, min(self.cap_s, base * 2 ** attempt))

    async def run(self, what: str, fn: Callable[[], Awaitable[T]], budget_s: float | None = None) -> T:
        budget = self.budget_s if budget_s is None else budget_s
        start = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                return await fn()
            except Exception as exc:  # noqa: BLE001 - classified below; anything else is re-raised
                kind = retry_kind(exc)
                if kind is None:
                    raise
                elapsed = time.monotonic() - start
                pause = self.delay(attempt, kind)
                if elapsed + pause > budget:
                    raise RetriesExhausted(what, attempt, elapsed, budget, exc) from exc
                log.log(logging.INFO if attempt >= 3 else logging.DEBUG, "S3 %s: %s; retry %d in %.2f s "
                        "(%.1f s of the %g s budget used)", what, describe(exc), attempt, pause, elapsed, budget)
                await asyncio.sleep(pause)


class RetriesExhausted(StorageError):
    def __init__(self, what: str, attempts: int, elapsed: float, budget: float, last: BaseException) -> None:
        super().__init__(f"S3 {what} failed after {attempts} attempt{'s' if attempts > 1 else ''} in "
                         f"{elapsed:.1f} s (retry budget {budget:g} s, storage option harness_retry_budget_s): "
                         f"{describe(last)}")
        self.last = last


# -- the S3 side of Storage -------------------------------------------------------------------------

@dataclass(frozen=True)
class _Fresh:
    """An upload body to be wrapped in a new :class:`BufferBody` for every attempt."""

    buf: Any


class S3Io:
    """S3 operations for one Storage, on s3fs's client and event loop. Thread-safe; methods are blocking."""

    def __init__(self, fs: Any, tuning: S3Tuning, secrets: list[str] = ()) -> None:
        self.fs = fs
        self.tuning = tuning
        self.policy = RetryPolicy(budget_s=tuning.retry_budget_s)
        self._part_slots = threading.BoundedSemaphore(tuning.max_concurrency)  # upload parts in flight
        self._read_slots: asyncio.Semaphore | None = None                      # ranged GETs in flight (loop)
        self._lock = threading.Lock()
        self.inflight_parts = 0          # for tests and benchmarks: bound on upload memory
        self.peak_inflight_parts = 0
        env = [os.environ.get(k, "") for k in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID",
                                                "AWS_SECURITY_TOKEN")]
        own = [str(getattr(fs, a, None) or "") for a in ("key", "secret", "token")]
        self._secrets = sorted({s for s in [*secrets, *env, *own] if len(s) >= 6}, key=len, reverse=True)

    # -- plumbing -------------------------------------------------------------------------------------

    def split(self, path: str) -> tuple[str, str]:
        bucket, key, _ = self.fs.split_path(path)
        return bucket, key

    def where(self, bucket: str, key: str = "") -> str:
        return f"s3://{bucket}/{key}" if key else f"s3://{bucket}"

    def scrub(self, text: str) -> str:
        for s in self._secrets:
            text = text.replace(s, "***")
        return text

    def _sync(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        import fsspec.asyn
        try:
            return fsspec.asyn.sync(self.fs.loop, fn, *args)
        except StorageError as exc:
            exc.args = (self.scrub(str(exc)),)
            raise
        except (FileNotFoundError, EOFError):
            raise
        except Exception as exc:  # noqa: BLE001 - non-retryable backend errors become one clear line
            raise self._error(exc, getattr(exc, "_harness_what", "request")) from exc

    async def _client(self, bucket: str) -> Any:
        await self.fs.set_session()
        return await self.fs.get_s3(bucket)

    async def _call(self, what: str, method: str, budget_s: float | None = None, **kw: Any) -> Any:
        async def once() -> Any:
            s3 = await self._client(kw["Bucket"])
            body = kw.get("Body")
            args = {**kw, "Body": BufferBody(body.buf)} if isinstance(body, _Fresh) else kw
            return await getattr(s3, method)(**args)
        try:
            return await self.policy.run(what, once, budget_s)
        except StorageError:
            raise
        except Exception as exc:
            exc._harness_what = what  # type: ignore[attr-defined]
            raise

    def _error(self, exc: BaseException, what: str) -> BaseException:
        """A non-retryable failure as FileNotFoundError (missing key) or a one-line StorageError."""
        info = _client_error_info(exc)
        if info is not None:
            code, status, _ = info
            if code in ("NoSuchKey", "NotFound", "404") and "bucket" not in code.lower():
                return FileNotFoundError(self.scrub(what))
            if code == "NoSuchBucket":
                return StorageError(self.scrub(f"S3 {what}: the bucket does not exist (NoSuchBucket)"))
            if code in CREDENTIAL_CODES:
                return StorageError(self.scrub(f"S3 {what}: credentials rejected ({code})"))
            if code in ("AccessDenied", "403", "AllAccessDisabled"):
                return StorageError(self.scrub(f"S3 {what}: access denied ({code})"))
            if code in ("PreconditionFailed", "412"):
                return StorageError(self.scrub(f"S3 {what}: the object changed while it was being read"))
        if type(exc).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
            return StorageError(f"S3 {what}: no AWS credentials found (set AWS_ACCESS_KEY_ID and "
                                "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or checkpoint.storage_options)")
        return StorageError(self.scrub(f"S3 {what}: {describe(exc)}"))

    # -- small objects --------------------------------------------------------------------------------

    def put(self, path: str, data: bytes) -> None:
        """One PUT: S3 makes it atomic (readers see no object or all of it). Confirmed when it returns."""
        bucket, key = self.split(path)
        self._sync(self._put, bucket, key, data)

    async def _put(self, bucket: str, key: str, data: Any) -> None:
        body = _Fresh(data) if len(data) > 65536 else bytes(data)  # large: streamed, no extra copies
        await self._call(f"PUT {self.where(bucket, key)}", "put_object", Bucket=bucket, Key=key, Body=body)

    def head(self, path: str) -> dict | None:
        """Size and ETag of an object, or None if there is none."""
        bucket, key = self.split(path)
        if not key:
            return None
        return self._sync(self._head, bucket, key)

    async def _head(self, bucket: str, key: str) -> dict | None:
        try:
            r = await self._call(f"HEAD {self.where(bucket, key)}", "head_object", Bucket=bucket, Key=key)
        except Exception as exc:  # noqa: BLE001
            info = _client_error_info(exc)
            if info is not None and info[0] in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return {"size": int(r["ContentLength"]), "etag": r.get("ETag")}

    def size(self, path: str) -> int | None:
        h = self.head(path)
        return None if h is None else h["size"]

    def exists(self, path: str) -> bool:
        """An object, or a "folder" (a prefix with objects under it), or the bucket itself."""
        bucket, key = self.split(path)
        if key and self.head(path) is not None:
            return True
        return bool(self._sync(self._list, bucket, key, True, 1))

    def listdir(self, path: str) -> list[str]:
        """Base names directly under a prefix (objects and sub-prefixes), straight from S3 (no cache)."""
        bucket, key = self.split(path)
        return sorted({n for n in self._sync(self._list, bucket, key, True, 0) if n})

    def list_keys(self, path: str) -> list[str]:
        """Every key under a prefix, recursively (full keys)."""
        bucket, key = self.split(path)
        return self._sync(self._list, bucket, key, False, 0)

    async def _list(self, bucket: str, key: str, shallow: bool, limit: int) -> list[str]:
        prefix = key.rstrip("/") + "/" if key.strip("/") else ""
        out: list[str] = []
        token = None
        while True:
            kw: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
            if shallow:
                kw["Delimiter"] = "/"
            if limit:
                kw["MaxKeys"] = limit
            if token:
                kw["ContinuationToken"] = token
            r = await self._call(f"LIST {self.where(bucket, prefix)}", "list_objects_v2", **kw)
            for p in r.get("CommonPrefixes") or []:
                out.append(p["Prefix"][len(prefix):].rstrip("/") if shallow else p["Prefix"])
            for o in r.get("Contents") or []:
                out.append(o["Key"][len(prefix):] if shallow else o["Key"])
            if limit and out:
                return out
            token = r.get("NextContinuationToken") if r.get("IsTruncated") else None
            if not token:
                return out

    def remove(self, path: str) -> None:
        bucket, key = self.split(path)
        self._sync(self._delete, bucket, key)

    async def _delete(self, bucket: str, key: str) -> None:
        await self._call(f"DELETE {self.where(bucket, key)}", "delete_object", Bucket=bucket, Key=key)

    def remove_tree(self, path: str) -> None:
        """Delete every object under a prefix (1,000 per request), and abort unfinished uploads there."""
        bucket, key = self.split(path)
        self._sync(self._remove_tree, bucket, key)

    async def _remove_tree(self, bucket: str, key: str) -> None:
        prefix = key.rstrip("/") + "/"
        keys = await self._list(bucket, key, False, 0)
        for i in range(0, len(keys), 1000):
            batch = {"Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True}
            r = await self._call(f"DELETE {len(batch['Objects'])} objects under {self.where(bucket, prefix)}",
                                 "delete_objects", Bucket=bucket, Delete=batch)
            errors = r.get("Errors") or []
            if errors:
                e = errors[0]
                raise StorageError(f"S3 delete under {self.where(bucket, prefix)}: {len(errors)} objects not "
                                   f"deleted, e.g. {e.get('Key')}: {e.get('Code')}")
        try:  # an upload killed half-way leaves invisible parts behind (storage cost): drop them too
            r = await self._call(f"LIST uploads {self.where(bucket, prefix)}", "list_multipart_uploads",
                                 Bucket=bucket, Prefix=prefix)
            for u in r.get("Uploads") or []:
                await self._call(f"ABORT upload {self.where(bucket, u['Key'])}", "abort_multipart_upload",
                                 Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"])
        except Exception as exc:  # noqa: BLE001 - cleanup of invisible leftovers is best effort
            log.debug("S3: could not abort unfinished uploads under %s: %s", self.where(bucket, prefix),
                      describe(exc))

    # -- reading --------------------------------------------------------------------------------------

    def cat(self, path: str, start: int | None = None, end: int | None = None) -> bytes:
        """Bytes [start, end) of an object (all of it by default); FileNotFoundError if there is none."""
        bucket, key = self.split(path)
        if (start is not None and start < 0) or (end is not None and end < 0):
            return self.fs.cat_file(path, start=start, end=end)  # suffix ranges: rare, leave them to s3fs
        if start is None and end is None:
            return self._sync(self._get, bucket, key, None, None, None)
        start = start or 0
        if end is None:
            h = self.head(path)
            if h is None:
                raise FileNotFoundError(self.where(bucket, key))
            end = h["size"]
        if end <= start:
            return b""
        buf = bytearray(end - start)
        got = self._sync(self._read_into, bucket, key, start, memoryview(buf), None, True)
        return bytes(buf[:got])

    def read_into(self, path: str, offset: int, buf: memoryview, etag: str | None = None) -> None:
        """Fill ``buf`` from ``offset`` with concurrent ranged GETs; EOFError if the object is shorter."""
        bucket, key = self.split(path)
        self._sync(self._read_into, bucket, key, offset, buf, etag, False)

    def open_read(self, path: str) -> "S3Reader":
        h = self.head(path)
        if h is None:
            raise FileNotFoundError(self.where(*self.split(path)))
        return S3Reader(self, path, h["size"], h["etag"])

    async def _read_into(self, bucket: str, key: str, offset: int, buf: memoryview, etag: str | None,
                         short_ok: bool) -> int:
        buf = buf.cast("B") if buf.format != "B" or buf.ndim != 1 else buf
        n = len(buf)
        if n == 0:
            return 0
        if self._read_slots is None:
            self._read_slots = asyncio.Semaphore(self.tuning.max_concurrency)
        step = self.tuning.part_size
        ranges = [(a, min(n, a + step)) for a in range(0, n, step)]
        # return_exceptions: every range has finished (no task still writing into buf) before we raise
        got = await asyncio.gather(*(self._read_range(bucket, key, offset + a, buf[a:b], etag) for a, b in ranges),
                                   return_exceptions=True)
        for g in got:
            if isinstance(g, BaseException):
                raise g
        total = 0
        for (a, b), g in zip(ranges, got):
            if g < b - a:
                if short_ok:
                    return a + g
                raise EOFError(f"{self.where(bucket, key)}: expected {n} bytes at offset {offset}, "
                               f"the object ends after {offset + a + g}")
            total += g
        return total

    async def _read_range(self, bucket: str, key: str, start: int, out: memoryview, etag: str | None) -> int:
        """GET bytes [start, start+len(out)) into ``out``; returns how many the object had (short at its end)."""
        what = f"GET {self.where(bucket, key)} bytes {start}-{start + len(out) - 1}"

        async def once() -> int:
            s3 = await self._client(bucket)
            kw: dict[str, Any] = {"Bucket": bucket, "Key": key, "Range": f"bytes={start}-{start + len(out) - 1}"}
            if etag:
                kw["IfMatch"] = etag
            try:
                r = await s3.get_object(**kw)
            except Exception as exc:  # noqa: BLE001
                info = _client_error_info(exc)
                if info is not None and info[0] in ("InvalidRange", "416"):
                    return 0  # starts at or past the end of the object
                raise
            body = r["Body"]
            try:
                want = int(r.get("ContentLength", len(out)))
                if want > len(out):
                    raise ShortReadError(f"server sent {want} bytes for a {len(out)}-byte range")
                got = 0
                while got < want:
                    k = await body.readinto(out[got:want])
                    if not k:
                        raise ShortReadError(f"body ended after {got} of {want} bytes")
                    got += k
                return got
            finally:
                body.close()

        async with self._read_slots:
            try:
                return await self.policy.run(what, once)
            except StorageError:
                raise
            except Exception as exc:
                exc._harness_what = what  # type: ignore[attr-defined]
                raise

    async def _get(self, bucket: str, key: str, start: Any, end: Any, etag: Any) -> bytes:
        what = f"GET {self.where(bucket, key)}"

        async def once() -> bytes:
            s3 = await self._client(bucket)
            r = await s3.get_object(Bucket=bucket, Key=key)
            body = r["Body"]
            try:
                return await body.read()  # verifies Content-Length (IncompleteReadError: retried)
            finally:
                body.close()

        try:
            return await self.policy.run(what, once)
        except StorageError:
            raise
        except Exception as exc:
            exc._harness_what = what  # type: ignore[attr-defined]
            raise

    # -- writing --------------------------------------------------------------------------------------

    def open_write(self, path: str) -> "S3Writer":
        return S3Writer(self, path)

    def _acquire_part_slot(self) -> None:
        self._part_slots.acquire()
        with self._lock:
            self.inflight_parts += 1
            self.peak_inflight_parts = max(self.peak_inflight_parts, self.inflight_parts)

    def _release_part_slot(self, _: Any = None) -> None:
        with self._lock:
            self.inflight_parts -= 1
        self._part_slots.release()

    # -- fail fast ------------------------------------------------------------------------------------

    def check_access(self, root: str, write: bool) -> None:
        """List the prefix and, for writers, PUT and DELETE a probe object; a one-line StorageError naming
        the bucket and prefix on a missing bucket, rejected credentials, no permission or no endpoint."""
        bucket, key = self.split(root)
        where = self.where(bucket, key)
        budget = min(self.policy.budget_s, ACCESS_CHECK_BUDGET_S)
        probe = f"{key.rstrip('/')}/.harness-access-check-{uuid.uuid4().hex}".lstrip("/")
        step = "list"
        try:
            self._sync(self._checked, bucket, key, probe, write, budget)
        except StorageError as exc:
            cause = exc.__cause__ if exc.__cause__ is not None else exc
            step = getattr(cause, "_harness_step", getattr(exc, "_harness_step", step))
            raise StorageError(self._access_message(where, bucket, step, cause, exc)) from None

    async def _checked(self, bucket: str, key: str, probe: str, write: bool, budget: float) -> None:
        step = "list"
        try:
            prefix = key.rstrip("/") + "/" if key.strip("/") else ""
            await self._call(f"LIST {self.where(bucket, prefix)}", "list_objects_v2", budget, Bucket=bucket,
                             Prefix=prefix, MaxKeys=1)
            if write:
                step = "write"
                await self._call(f"PUT {self.where(bucket, probe)}", "put_object", budget, Bucket=bucket,
                                 Key=probe, Body=b"")
                step = "delete"
                await self._call(f"DELETE {self.where(bucket, probe)}", "delete_object", budget, Bucket=bucket,
                                 Key=probe)
        except Exception as exc:
            exc._harness_step = step  # type: ignore[attr-defined]
            raise

    def _access_message(self, where: str, bucket: str, step: str, cause: BaseException,
                        exc: BaseException) -> str:
        head = f"checkpoint storage {where}:"
        info = _client_error_info(cause)
        code = info[0] if info else type(cause).__name__
        doing = {"list": "list", "write": "write to", "delete": "delete from"}[step]
        if code == "NoSuchBucket" or (info and info[1] == 404 and step == "list"):
            msg = f"{head} bucket '{bucket}' does not exist (check the bucket name, the region and AWS_ENDPOINT_URL)"
        elif code in CREDENTIAL_CODES:
            msg = (f"{head} S3 rejected the credentials ({code}) for bucket '{bucket}'; check AWS_ACCESS_KEY_ID/"
                   "AWS_SECRET_ACCESS_KEY, AWS_PROFILE or checkpoint.storage_options")
        elif code in ("AccessDenied", "AllAccessDisabled") or (info and info[1] == 403):
            need = {"list": "s3:ListBucket", "write": "s3:PutObject", "delete": "s3:DeleteObject"}[step]
            msg = (f"{head} access denied: no permission to {doing} bucket '{bucket}' ({code}; "
                   f"checkpoints need s3:ListBucket, s3:GetObject, s3:PutObject, s3:DeleteObject; this step needs {need})")
        elif type(cause).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
            msg = (f"{head} no AWS credentials found for bucket '{bucket}' (set AWS_ACCESS_KEY_ID and "
                   "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or checkpoint.storage_options)")
        elif isinstance(exc, RetriesExhausted):
            msg = f"{head} cannot {doing} bucket '{bucket}': {exc}"
        else:
            msg = f"{head} cannot {doing} bucket '{bucket}': {describe(cause)}"
        return self.scrub(" ".join(msg.split()))


class S3Reader(io.RawIOBase):
    """A seekable, read-only view of one object (pinned to its ETag). Reads of at least a part go straight
    into the caller's buffer as concurrent ranged GETs; smaller reads are served from one part-sized block."""

    def __init__(self, s3io: S3Io, path: str, size: int, etag: str | None) -> None:
        super().__init__()
        self._io, self._path, self._size, self._etag = s3io, path, size, etag
        self._pos = 0
        self._block = b""
        self._block_at = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def readinto(self, b: Any) -> int:
        mv = memoryview(b).cast("B")
        n = min(len(mv), self._size - self._pos)
        if n <= 0:
            return 0
        in_block = self._block_at <= self._pos and self._pos + n <= self._block_at + len(self._block)
        if not in_block and n >= self._io.tuning.part_size // 2:
            self._io.read_into(self._path, self._pos, mv[:n], self._etag)
        else:
            if not in_block:
                length = min(self._size - self._pos, max(n, self._io.tuning.part_size))
                block = bytearray(length)
                self._io.read_into(self._path, self._pos, memoryview(block), self._etag)
                self._block, self._block_at = bytes(block), self._pos
            start = self._pos - self._block_at
            mv[:n] = self._block[start:start + n]
        self._pos += n
        return n

    def close(self) -> None:
        self._block = b""
        super().close()


class S3Writer:
    """A write-only object upload. Small objects are one PUT at close; larger ones a multipart upload whose
    parts go up concurrently while the caller writes on (bounded by the Storage's part slots). ``close()``
    returns once the object is complete and confirmed by a HEAD; ``abort()`` drops an unfinished upload."""

    def __init__(self, s3io: S3Io, path: str) -> None:
        self._io = s3io
        self._bucket, self._key = s3io.split(path)
        self._name = self._key.rsplit("/", 1)[-1]
        self._buf: bytearray | None = None
        self._fill = 0
        self._written = 0
        self._upload_id: str | None = None
        self._part_no = 0
        self._futures: list[tuple[int, cf.Future]] = []
        self._done = False

    @property
    def where(self) -> str:
        return self._io.where(self._bucket, self._key)

    def writable(self) -> bool:
        return True

    def _capacity(self) -> int:
        if self._upload_id is None and self._part_no == 0:
            return max(self._io.tuning.threshold, part_size_for(1, self._io.tuning.part_size))
        return part_size_for(self._part_no + 1, self._io.tuning.part_size)

    def write(self, b: Any) -> int:
        if self._done:
            raise ValueError("write to a closed S3 upload")
        mv = memoryview(b).cast("B")
        n = len(mv)
        while len(mv):
            if self._buf is None:
                self._buf, self._fill = bytearray(self._capacity()), 0
            take = min(len(mv), len(self._buf) - self._fill)
            self._buf[self._fill:self._fill + take] = mv[:take]
            self._fill += take
            mv = mv[take:]
            if self._fill == len(self._buf):
                self._send_part()
        self._written += n
        return n

    def _send_part(self) -> None:
        """Hand the full buffer to the event loop as the next part; blocks while all part slots are busy."""
        s3io = self._io
        if self._upload_id is None:
            self._upload_id = s3io._sync(self._create)
        body, self._buf = self._buf, None
        if self._fill < len(body):
            del body[self._fill:]  # the last part: shrink in place, no copy
        self._fill = 0
        self._part_no += 1
        if self._part_no > MAX_PARTS:
            raise StorageError(f"{self.where}: more than {MAX_PARTS} parts; raise harness_part_size_mb")
        self._raise_failed()
        s3io._acquire_part_slot()
        try:
            fut = asyncio.run_coroutine_threadsafe(self._upload_part(self._part_no, body), s3io.fs.loop)
        except BaseException:
            s3io._release_part_slot()
            raise
        fut.add_done_callback(s3io._release_part_slot)
        self._futures.append((self._part_no, fut))
        faults.point("s3.part", file=self._name, part=self._part_no)

    def _raise_failed(self) -> None:
        for _, fut in self._futures:
            if fut.done() and fut.exception() is not None:
                self._reraise(fut.exception())

    def _reraise(self, exc: BaseException) -> None:
        if isinstance(exc, StorageError):
            raise StorageError(self._io.scrub(str(exc))) from exc
        raise self._io._error(exc, f"upload {self.where}") from exc

    async def _create(self) -> str:
        r = await self._io._call(f"CREATE upload {self.where}", "create_multipart_upload", Bucket=self._bucket,
                                 Key=self._key)
        return r["UploadId"]

    async def _upload_part(self, number: int, body: bytearray) -> str:
        r = await self._io._call(f"PUT {self.where} part {number}", "upload_part", Bucket=self._bucket,
                                 Key=self._key, UploadId=self._upload_id, PartNumber=number, Body=_Fresh(body))
        return r["ETag"]

    async def _complete(self, parts: list[dict]) -> None:
        sent = False

        async def once() -> None:
            nonlocal sent
            s3 = await self._io._client(self._bucket)
            try:
                await s3.complete_multipart_upload(Bucket=self._bucket, Key=self._key, UploadId=self._upload_id,
                                                   MultipartUpload={"Parts": parts})
            except Exception as exc:  # noqa: BLE001
                info = _client_error_info(exc)
                if sent and info is not None and info[0] == "NoSuchUpload":
                    return  # an earlier attempt completed it and its answer was lost: the HEAD below decides
                raise
            finally:
                sent = True

        await self._io.policy.run(f"COMPLETE upload {self.where}", once)

    async def _confirm(self) -> None:
        h = await self._io._head(self._bucket, self._key)
        if h is None or h["size"] != self._written:
            got = "no object" if h is None else f"{h['size']} bytes"
            raise StorageError(f"S3 upload {self.where}: wrote {self._written} bytes but S3 has {got}")

    def close(self) -> None:
        """Finish the upload and confirm it; the object exists whole when this returns."""
        if self._done:
            return
        try:
            if self._upload_id is None:
                body = self._buf if self._buf is not None else bytearray()
                if self._fill < len(body):
                    del body[self._fill:]
                self._buf = None
                self._io._sync(self._io._put, self._bucket, self._key, body)
            else:
                if self._buf is not None and self._fill:
                    self._send_part()
                parts = []
                for number, fut in self._futures:
                    try:
                        parts.append({"PartNumber": number, "ETag": fut.result()})
                    except BaseException as exc:  # noqa: BLE001
                        self._reraise(exc)
                self._io._sync(self._complete, parts)
            self._io._sync(self._confirm)
        except BaseException:
            self.abort()
            raise
        self._done = True

    @property
    def closed(self) -> bool:
        return self._done

    def __enter__(self) -> "S3Writer":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def abort(self) -> None:
        """Drop an unfinished upload (best effort): nothing of it becomes visible."""
        if self._done:
            return
        self._done = True
        self._buf = None
        for _, fut in self._futures:
            fut.cancel()
        for _, fut in self._futures:
            try:
                fut.result(timeout=60)
            except BaseException:  # noqa: BLE001
                pass
        if self._upload_id is not None:
            upload_id = self._upload_id

            async def drop() -> None:
                await self._io._call(f"ABORT upload {self.where}", "abort_multipart_upload", 10.0,
                                     Bucket=self._bucket, Key=self._key, UploadId=upload_id)
            try:
                self._io._sync(drop)
            except Exception as exc:  # noqa: BLE001 - invisible anyway; a lifecycle rule or retention cleans up
                log.debug("S3: could not abort upload of %s: %s", self.where, exc)



class BufferBody(io.RawIOBase):
    """A read-only, seekable file over a buffer, used as the body of an upload: aiohttp then streams it in
    small chunks instead of slicing and joining the whole buffer (two more copies of every part in flight).
    A fresh one is made for every attempt (a failed attempt leaves the position anywhere, or closes it)."""

    def __init__(self, buf: Any) -> None:
        super().__init__()
        self._mv = memoryview(buf).cast("B")
        self._pos = 0

    def __len__(self) -> int:
        return len(self._mv)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._mv)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), len(self._mv) - self._pos))
        b[:n] = self._mv[self._pos:self._pos + n]
        self._pos += n
        return n

    def read(self, n: int | None = -1) -> bytes:
        end = len(self._mv) if n is None or n < 0 else min(len(self._mv), self._pos + n)
        out = bytes(self._mv[self._pos:end])
        self._pos = max(self._pos, end)
        return out
