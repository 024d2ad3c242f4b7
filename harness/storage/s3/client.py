"""The S3 API on s3fs's aiobotocore client and event loop: bounded retries, typed errors, small objects,
uncached listings, deletes and the cleanup of unfinished uploads.

s3fs supplies what it does well - the credentials chain (environment, profile, instance role, or
``storage_options``), endpoint and region, the client and its event loop - while this module calls the S3
API itself so that it controls what a checkpoint store needs: listings, HEADs and reads go to S3 every time
(never s3fs's listing cache: S3 is strongly read-after-write consistent, so discovery sees another process's
commit at once), and every call is retried within a budget (:mod:`harness.storage.s3.retry`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, Awaitable, Callable, TypeVar

from harness.errors import StorageError
from harness.storage.errors import StorageOpError
from harness.storage.options import Tuning
from harness.storage.redact import Redactor, env_secrets
from harness.storage.s3.body import BufferBody, Fresh
from harness.storage.s3.retry import RetriesExhausted, RetryPolicy, client_error_info, describe

log = logging.getLogger("harness")

T = TypeVar("T")

CREDENTIAL_CODES = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
                              "TokenRefreshRequired", "InvalidSecurity", "AuthorizationHeaderMalformed"})
MISSING_CODES = ("404", "NoSuchKey", "NotFound")


class S3Client:
    """S3 operations for one Storage. Thread-safe; the public methods are blocking."""

    def __init__(self, fs: Any, tuning: Tuning, secrets: list[str] = ()) -> None:
        self.fs = fs
        self.tuning = tuning
        self.policy = RetryPolicy(budget_s=tuning.retry_budget_s)
        self._part_slots = threading.BoundedSemaphore(tuning.max_concurrency)  # upload parts in flight
        self.read_slots: asyncio.Semaphore | None = None                       # ranged GETs in flight (loop)
        self._lock = threading.Lock()
        self.inflight_parts = 0          # for tests and benchmarks: bound on upload memory
        self.peak_inflight_parts = 0
        own = [str(getattr(fs, a, None) or "") for a in ("key", "secret", "token")]
        self.scrub = Redactor([*secrets, *env_secrets(), *own])

    # -- plumbing -------------------------------------------------------------------------------------

    def split(self, path: str) -> tuple[str, str]:
        bucket, key, _ = self.fs.split_path(path)
        return bucket, key

    @staticmethod
    def where(bucket: str, key: str = "") -> str:
        return f"s3://{bucket}/{key}" if key else f"s3://{bucket}"

    def sync_raw(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run a coroutine on s3fs's loop; errors as they are (the access check explains them itself)."""
        import fsspec.asyn
        return fsspec.asyn.sync(self.fs.loop, fn, *args)

    def sync(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run a coroutine on s3fs's loop; a failure becomes FileNotFoundError, EOFError or a one-line
        StorageError with no secret in it."""
        try:
            return self.sync_raw(fn, *args)
        except RetriesExhausted as exc:
            exc.args = (self.scrub(str(exc)),)
            raise
        except StorageOpError as exc:
            raise self.error(exc.cause, exc.what) from exc.cause
        except StorageError as exc:
            exc.args = (self.scrub(str(exc)),)
            raise
        except (FileNotFoundError, EOFError):
            raise
        except Exception as exc:  # noqa: BLE001 - non-retryable backend errors become one clear line
            raise self.error(exc, "request") from exc

    async def client(self, bucket: str) -> Any:
        await self.fs.set_session()
        return await self.fs.get_s3(bucket)

    async def run(self, what: str, once: Callable[[], Awaitable[T]], budget_s: float | None = None) -> T:
        """``once()`` with retries; a final failure is a StorageOpError naming ``what``."""
        try:
            return await self.policy.run(what, once, budget_s)
        except StorageError:
            raise
        except Exception as exc:
            raise StorageOpError(what, exc) from exc

    async def call(self, what: str, method: str, budget_s: float | None = None, **kw: Any) -> Any:
        """One S3 API call with retries (a :class:`Fresh` body is re-wrapped for every attempt)."""
        async def once() -> Any:
            s3 = await self.client(kw["Bucket"])
            body = kw.get("Body")
            args = {**kw, "Body": BufferBody(body.buf)} if isinstance(body, Fresh) else kw
            return await getattr(s3, method)(**args)
        return await self.run(what, once, budget_s)

    def error(self, exc: BaseException, what: str) -> BaseException:
        """A non-retryable failure as FileNotFoundError (missing key) or a one-line StorageOpError."""
        info = client_error_info(exc)
        msg = f"S3 {what}: {describe(exc)}"
        if info is not None:
            code = info[0]
            if code in ("NoSuchKey", "NotFound", "404"):
                return FileNotFoundError(self.scrub(what))
            if code == "NoSuchBucket":
                msg = f"S3 {what}: the bucket does not exist (NoSuchBucket)"
            elif code in CREDENTIAL_CODES:
                msg = f"S3 {what}: credentials rejected ({code})"
            elif code in ("AccessDenied", "403", "AllAccessDisabled"):
                msg = f"S3 {what}: access denied ({code})"
            elif code in ("PreconditionFailed", "412"):
                msg = f"S3 {what}: the object changed while it was being read"
        elif type(exc).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
            msg = (f"S3 {what}: no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                   "AWS_PROFILE, or checkpoint.storage_options)")
        return StorageOpError(what, exc, message=self.scrub(msg))

    # -- small objects --------------------------------------------------------------------------------

    def put(self, path: str, data: bytes) -> None:
        """One PUT: S3 makes it atomic (readers see no object or all of it). Confirmed when it returns."""
        bucket, key = self.split(path)
        self.sync(self.put_async, bucket, key, data)

    async def put_async(self, bucket: str, key: str, data: Any) -> None:
        body = Fresh(data) if len(data) > 65536 else bytes(data)  # large: streamed, no extra copies
        await self.call(f"PUT {self.where(bucket, key)}", "put_object", Bucket=bucket, Key=key, Body=body)

    def head(self, path: str) -> dict | None:
        """Size and ETag of an object, or None if there is none."""
        bucket, key = self.split(path)
        if not key:
            return None
        return self.sync(self.head_async, bucket, key)

    async def head_async(self, bucket: str, key: str) -> dict | None:
        try:
            r = await self.call(f"HEAD {self.where(bucket, key)}", "head_object", Bucket=bucket, Key=key)
        except StorageOpError as exc:
            info = client_error_info(exc.cause)
            if info is not None and info[0] in MISSING_CODES:
                return None
            raise
        return {"size": int(r["ContentLength"]), "etag": r.get("ETag")}

    def list(self, path: str, shallow: bool = True, limit: int = 0) -> list[str]:
        bucket, key = self.split(path)
        return self.sync(self.list_async, bucket, key, shallow, limit)

    async def list_async(self, bucket: str, key: str, shallow: bool, limit: int) -> list[str]:
        """Names under a prefix: shallow (base names of objects and sub-prefixes) or every full key."""
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
            r = await self.call(f"LIST {self.where(bucket, prefix)}", "list_objects_v2", **kw)
            for p in r.get("CommonPrefixes") or []:
                out.append(p["Prefix"][len(prefix):].rstrip("/") if shallow else p["Prefix"])
            for o in r.get("Contents") or []:
                out.append(o["Key"][len(prefix):] if shallow else o["Key"])
            if limit and out:
                return out
            token = r.get("NextContinuationToken") if r.get("IsTruncated") else None
            if not token:
                return out

    def total_size(self, path: str) -> int:
        """Bytes of the object ``path`` plus every object under the prefix ``path/`` (straight from S3)."""
        own = self.head(path)
        return (own["size"] if own else 0) + sum(self.sizes_under(path).values())

    def sizes_under(self, path: str, name_prefix: str = "") -> dict[str, int]:
        """Every object under the prefix ``path/`` (and whose key after it starts with ``name_prefix``): its
        key relative to ``path/`` -> its size. One paginated ListObjectsV2 (1,000 keys a page), no HEAD per
        object."""
        bucket, key = self.split(path)
        return self.sync(self._sizes_under, bucket, key, name_prefix)

    async def _sizes_under(self, bucket: str, key: str, name_prefix: str = "") -> dict[str, int]:
        prefix = key.rstrip("/") + "/" if key.strip("/") else ""
        out: dict[str, int] = {}
        token = None
        while True:
            kw: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix + name_prefix,
                                  **({"ContinuationToken": token} if token else {})}
            r = await self.call(f"LIST {self.where(bucket, prefix + name_prefix)}", "list_objects_v2", **kw)
            for o in r.get("Contents") or []:
                out[o["Key"][len(prefix):]] = int(o.get("Size") or 0)
            token = r.get("NextContinuationToken") if r.get("IsTruncated") else None
            if not token:
                return out

    def remove(self, path: str) -> None:
        bucket, key = self.split(path)
        self.sync(self._delete, bucket, key)

    async def _delete(self, bucket: str, key: str) -> None:
        await self.call(f"DELETE {self.where(bucket, key)}", "delete_object", Bucket=bucket, Key=key)

    def remove_tree(self, path: str) -> None:
        """Delete every object under a prefix (1,000 per request), and abort unfinished uploads there."""
        bucket, key = self.split(path)
        self.sync(self._remove_tree, bucket, key)

    async def _remove_tree(self, bucket: str, key: str) -> None:
        prefix = key.rstrip("/") + "/"
        keys = await self.list_async(bucket, key, False, 0)
        for i in range(0, len(keys), 1000):
            batch = {"Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True}
            r = await self.call(f"DELETE {len(batch['Objects'])} objects under {self.where(bucket, prefix)}",
                                "delete_objects", Bucket=bucket, Delete=batch)
            errors = r.get("Errors") or []
            if errors:
                e = errors[0]
                raise StorageError(f"S3 delete under {self.where(bucket, prefix)}: {len(errors)} objects not "
                                   f"deleted, e.g. {e.get('Key')}: {e.get('Code')}")
        try:  # an upload killed half-way leaves invisible parts behind (storage cost): drop them too
            await self.abort_uploads_async(bucket, prefix)
        except Exception as exc:  # noqa: BLE001 - cleanup of invisible leftovers is best effort
            log.debug("S3: could not abort unfinished uploads under %s: %s", self.where(bucket, prefix),
                      describe(exc))

    def abort_uploads(self, path: str) -> list[str]:
        """Abort every unfinished multipart upload under a prefix; the ``s3://`` names they were for."""
        bucket, key = self.split(path)
        return self.sync(self.abort_uploads_async, bucket, key.rstrip("/") + "/" if key.strip("/") else "")

    async def abort_uploads_async(self, bucket: str, prefix: str) -> list[str]:
        dropped: list[str] = []
        markers: dict[str, str] = {}
        while True:
            r = await self.call(f"LIST uploads {self.where(bucket, prefix)}", "list_multipart_uploads",
                                Bucket=bucket, Prefix=prefix, **markers)
            for u in r.get("Uploads") or []:
                try:
                    await self.call(f"ABORT upload {self.where(bucket, u['Key'])}", "abort_multipart_upload",
                                    Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"])
                except StorageOpError as exc:
                    info = client_error_info(exc.cause)
                    if info is None or info[0] != "NoSuchUpload":  # finished or aborted meanwhile: fine
                        raise
                dropped.append(self.where(bucket, u["Key"]))
            if not r.get("IsTruncated"):
                return dropped
            markers = {"KeyMarker": r.get("NextKeyMarker") or "", "UploadIdMarker": r.get("NextUploadIdMarker") or ""}

    # -- upload part slots: bound on memory held by parts in flight -----------------------------------

    def acquire_part_slot(self) -> None:
        self._part_slots.acquire()
        with self._lock:
            self.inflight_parts += 1
            self.peak_inflight_parts = max(self.peak_inflight_parts, self.inflight_parts)

    def release_part_slot(self, _: Any = None) -> None:
        with self._lock:
            self.inflight_parts -= 1
        self._part_slots.release()
