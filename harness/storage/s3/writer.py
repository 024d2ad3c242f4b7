"""Uploads to S3. Large objects go up as multipart uploads whose parts are copied into part-sized buffers
and uploaded concurrently; at most ``harness_max_concurrency`` parts are in flight per Storage (shared by all
its writers), and each part is streamed from its buffer (no copies in botocore/aiohttp), so memory is bounded
by ``(max_concurrency + open writers) x part_size`` and never holds a second copy of the state. Part sizes
double every 500 parts so an object of up to 5 TiB fits in S3's 10,000-part limit; small objects are one PUT.

A data object is *confirmed* when its PUT (or CompleteMultipartUpload) succeeded and a HEAD shows the
expected size; ``close()`` returns only then, so the commit record (one PUT, which S3 makes atomic) is
written after every data object exists whole. Nothing is ever renamed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
from typing import Any

from harness import faults
from harness.errors import StorageError
from harness.storage.bytecopy import copy_into
from harness.storage.errors import StorageOpError
from harness.storage.options import MAX_PART_BYTES
from harness.storage.s3.body import Fresh
from harness.storage.s3.client import S3Client
from harness.storage.s3.retry import RetriesExhausted, client_error_info

log = logging.getLogger("harness")

MAX_PARTS = 10_000               # S3's limit on parts per multipart upload
PARTS_PER_TIER = 500             # part size doubles after every this many parts


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


class S3Writer:
    """A write-only object upload. Small objects are one PUT at close; larger ones a multipart upload whose
    parts go up concurrently while the caller writes on (bounded by the Storage's part slots). ``close()``
    returns once the object is complete and confirmed by a HEAD; ``abort()`` drops an unfinished upload."""

    def __init__(self, s3io: S3Client, path: str) -> None:
        self._c = s3io
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
        return self._c.where(self._bucket, self._key)

    def writable(self) -> bool:
        return True

    def _capacity(self) -> int:
        if self._upload_id is None and self._part_no == 0:
            return max(self._c.tuning.threshold, part_size_for(1, self._c.tuning.part_size))
        return part_size_for(self._part_no + 1, self._c.tuning.part_size)

    def write(self, b: Any) -> int:
        if self._done:
            raise ValueError("write to a closed S3 upload")
        mv = memoryview(b).cast("B")
        n = len(mv)
        while len(mv):
            if self._buf is None:
                self._buf, self._fill = bytearray(self._capacity()), 0
            take = min(len(mv), len(self._buf) - self._fill)
            copy_into(self._buf, self._fill, mv[:take])  # the GIL released: training goes on meanwhile
            self._fill += take
            mv = mv[take:]
            if self._fill == len(self._buf):
                self._send_part()
        self._written += n
        return n

    def _send_part(self) -> None:
        """Hand the full buffer to the event loop as the next part; blocks while all part slots are busy."""
        s3io = self._c
        if self._upload_id is None:
            self._upload_id = s3io.sync(self._create)
        body, self._buf = self._buf, None
        if self._fill < len(body):
            del body[self._fill:]  # the last part: shrink in place, no copy
        self._fill = 0
        self._part_no += 1
        if self._part_no > MAX_PARTS:
            raise StorageError(f"{self.where}: more than {MAX_PARTS} parts; raise harness_part_size_mb")
        self._raise_failed()
        s3io.acquire_part_slot()
        try:
            fut = asyncio.run_coroutine_threadsafe(self._upload_part(self._part_no, body), s3io.fs.loop)
        except BaseException:
            s3io.release_part_slot()
            raise
        fut.add_done_callback(s3io.release_part_slot)
        self._futures.append((self._part_no, fut))
        faults.point("s3.part", file=self._name, part=self._part_no)

    def _raise_failed(self) -> None:
        for _, fut in self._futures:
            if fut.done() and fut.exception() is not None:
                self._reraise(fut.exception())

    def _reraise(self, exc: BaseException) -> None:
        if isinstance(exc, StorageOpError) and not isinstance(exc, RetriesExhausted):
            raise self._c.error(exc.cause, f"upload {self.where}") from exc.cause
        if isinstance(exc, StorageError):
            raise StorageError(self._c.scrub(str(exc))) from exc
        raise self._c.error(exc, f"upload {self.where}") from exc

    async def _create(self) -> str:
        r = await self._c.call(f"CREATE upload {self.where}", "create_multipart_upload", Bucket=self._bucket,
                               Key=self._key)
        return r["UploadId"]

    async def _upload_part(self, number: int, body: bytearray) -> str:
        r = await self._c.call(f"PUT {self.where} part {number}", "upload_part", Bucket=self._bucket,
                               Key=self._key, UploadId=self._upload_id, PartNumber=number, Body=Fresh(body))
        return r["ETag"]

    async def _complete(self, parts: list[dict]) -> None:
        sent = False

        async def once() -> None:
            nonlocal sent
            s3 = await self._c.client(self._bucket)
            try:
                await s3.complete_multipart_upload(Bucket=self._bucket, Key=self._key, UploadId=self._upload_id,
                                                   MultipartUpload={"Parts": parts})
            except Exception as exc:  # noqa: BLE001
                info = client_error_info(exc)
                if sent and info is not None and info[0] == "NoSuchUpload":
                    return  # an earlier attempt completed it and its answer was lost: the HEAD below decides
                raise
            finally:
                sent = True

        await self._c.run(f"COMPLETE upload {self.where}", once)

    async def _confirm(self) -> None:
        h = await self._c.head_async(self._bucket, self._key)
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
                self._c.sync(self._c.put_async, self._bucket, self._key, body)
            else:
                if self._buf is not None and self._fill:
                    self._send_part()
                parts = []
                for number, fut in self._futures:
                    try:
                        parts.append({"PartNumber": number, "ETag": fut.result()})
                    except BaseException as exc:  # noqa: BLE001
                        self._reraise(exc)
                self._c.sync(self._complete, parts)
            self._c.sync(self._confirm)
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
                await self._c.call(f"ABORT upload {self.where}", "abort_multipart_upload", 10.0,
                                   Bucket=self._bucket, Key=self._key, UploadId=upload_id)
            try:
                self._c.sync(drop)
            except Exception as exc:  # noqa: BLE001 - invisible anyway; a lifecycle rule or retention cleans up
                log.debug("S3: could not abort upload of %s: %s", self.where, exc)

