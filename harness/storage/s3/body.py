"""Upload bodies that aiohttp streams from a buffer without copying it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from harness.storage.seekable import SeekableRaw


@dataclass(frozen=True)
class Fresh:
    """An upload body to be wrapped in a new :class:`BufferBody` for every attempt."""

    buf: Any


class BufferBody(SeekableRaw):
    """A read-only, seekable file over a buffer, used as the body of an upload: aiohttp then streams it in
    small chunks instead of slicing and joining the whole buffer (two more copies of every part in flight).
    A fresh one is made for every attempt (a failed attempt leaves the position anywhere, or closes it)."""

    def __init__(self, buf: Any) -> None:
        super().__init__()
        self._mv = memoryview(buf).cast("B")
        self._length = len(self._mv)

    def __len__(self) -> int:
        return self._length

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
