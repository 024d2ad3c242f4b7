"""Reads from S3: ranged GETs split into part-sized ranges fetched concurrently straight into the caller's
buffer, pinned to the object's ETag (``If-Match``) so an object replaced mid-read is an error, not a mix."""

from __future__ import annotations

import asyncio
from typing import Any

from harness.storage.seekable import SeekableRaw
from harness.storage.s3.client import S3Client
from harness.storage.s3.retry import ShortReadError, client_error_info


def cat(c: S3Client, path: str, start: int | None = None, end: int | None = None) -> bytes:
    """Bytes [start, end) of an object (all of it by default); FileNotFoundError if there is none."""
    bucket, key = c.split(path)
    if (start is not None and start < 0) or (end is not None and end < 0):
        return c.fs.cat_file(path, start=start, end=end)  # suffix ranges: rare, leave them to s3fs
    if start is None and end is None:
        return c.sync(_get, c, bucket, key)
    start = start or 0
    if end is None:
        h = c.head(path)
        if h is None:
            raise FileNotFoundError(c.where(bucket, key))
        end = h["size"]
    if end <= start:
        return b""
    buf = bytearray(end - start)
    got = c.sync(read_into_async, c, bucket, key, start, memoryview(buf), None, True)
    return bytes(buf[:got])


def read_into(c: S3Client, path: str, offset: int, buf: memoryview, etag: str | None = None) -> None:
    """Fill ``buf`` from ``offset`` with concurrent ranged GETs; EOFError if the object is shorter."""
    bucket, key = c.split(path)
    c.sync(read_into_async, c, bucket, key, offset, buf, etag, False)


def open_read(c: S3Client, path: str) -> "S3Reader":
    h = c.head(path)
    if h is None:
        raise FileNotFoundError(c.where(*c.split(path)))
    return S3Reader(c, path, h["size"], h["etag"])


async def read_into_async(c: S3Client, bucket: str, key: str, offset: int, buf: memoryview, etag: str | None,
                          short_ok: bool) -> int:
    buf = buf.cast("B") if buf.format != "B" or buf.ndim != 1 else buf
    n = len(buf)
    if n == 0:
        return 0
    if c.read_slots is None:
        c.read_slots = asyncio.Semaphore(c.tuning.max_concurrency)
    step = c.tuning.part_size
    ranges = [(a, min(n, a + step)) for a in range(0, n, step)]
    # return_exceptions: every range has finished (no task still writing into buf) before we raise
    got = await asyncio.gather(*(_read_range(c, bucket, key, offset + a, buf[a:b], etag) for a, b in ranges),
                               return_exceptions=True)
    for g in got:
        if isinstance(g, BaseException):
            raise g
    total = 0
    for (a, b), g in zip(ranges, got):
        if g < b - a:
            if short_ok:
                return a + g
            raise EOFError(f"{c.where(bucket, key)}: expected {n} bytes at offset {offset}, "
                           f"the object ends after {offset + a + g}")
        total += g
    return total


async def _read_range(c: S3Client, bucket: str, key: str, start: int, out: memoryview, etag: str | None) -> int:
    """GET bytes [start, start+len(out)) into ``out``; returns how many the object had (short at its end)."""
    last = start + len(out) - 1

    async def once() -> int:
        s3 = await c.client(bucket)
        kw: dict[str, Any] = {"Bucket": bucket, "Key": key, "Range": f"bytes={start}-{last}"}
        if etag:
            kw["IfMatch"] = etag
        try:
            r = await s3.get_object(**kw)
        except Exception as exc:  # noqa: BLE001
            info = client_error_info(exc)
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

    async with c.read_slots:
        return await c.run(f"GET {c.where(bucket, key)} bytes {start}-{last}", once)


async def _get(c: S3Client, bucket: str, key: str) -> bytes:
    async def once() -> bytes:
        s3 = await c.client(bucket)
        r = await s3.get_object(Bucket=bucket, Key=key)
        body = r["Body"]
        try:
            return await body.read()  # verifies Content-Length (IncompleteReadError: retried)
        finally:
            body.close()

    return await c.run(f"GET {c.where(bucket, key)}", once)


class S3Reader(SeekableRaw):
    """A seekable, read-only view of one object (pinned to its ETag). Reads of at least half a part go
    straight into the caller's buffer as concurrent ranged GETs; smaller reads are served from one
    part-sized block."""

    def __init__(self, c: S3Client, path: str, size: int, etag: str | None) -> None:
        super().__init__()
        self._c, self._path, self._size, self._etag = c, path, size, etag
        self._length = size
        self._block = b""
        self._block_at = 0

    def readinto(self, b: Any) -> int:
        mv = memoryview(b).cast("B")
        n = min(len(mv), self._size - self._pos)
        if n <= 0:
            return 0
        part = self._c.tuning.part_size
        in_block = self._block_at <= self._pos and self._pos + n <= self._block_at + len(self._block)
        if not in_block and n >= part // 2:
            read_into(self._c, self._path, self._pos, mv[:n], self._etag)
        else:
            if not in_block:
                length = min(self._size - self._pos, max(n, part))
                block = bytearray(length)
                read_into(self._c, self._path, self._pos, memoryview(block), self._etag)
                self._block, self._block_at = bytes(block), self._pos
            start = self._pos - self._block_at
            mv[:n] = self._block[start:start + n]
        self._pos += n
        return n

    def close(self) -> None:
        self._block = b""
        super().close()
