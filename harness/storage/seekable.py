"""Read-only, seekable raw files of a known length: the position bookkeeping shared by the S3 upload body, the
S3 object reader and :class:`Window` (a byte range of another seekable file, what the DCP importer hands
``torch.load`` for a record at an offset)."""

from __future__ import annotations

import io
from typing import Any


class SeekableRaw(io.RawIOBase):
    """A read-only, seekable raw file of a known length. Subclasses set ``_length`` and implement
    ``readinto``."""

    _length = 0

    def __init__(self) -> None:
        super().__init__()
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos


class Window(SeekableRaw):
    """Bytes ``start .. start+length`` of a seekable file ``f``, as a file of their own; reads go straight
    into the caller's buffer when ``f`` has ``readinto`` (no copy of the bytes first)."""

    def __init__(self, f: Any, start: int, length: int) -> None:
        super().__init__()
        self._f, self._start, self._length = f, start, length

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), self._length - self._pos))
        if n == 0:
            return 0
        self._f.seek(self._start + self._pos)
        view = memoryview(b).cast("B")[:n]
        if hasattr(self._f, "readinto"):
            got = self._f.readinto(view) or 0
        else:
            data = self._f.read(n)
            view[:len(data)] = data
            got = len(data)
        self._pos += got
        return got
