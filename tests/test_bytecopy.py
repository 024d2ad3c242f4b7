"""harness/storage/bytecopy.py: the writers' copy into their buffers, by numpy (GIL released) above a size and
by slice assignment below it; the same bytes either way, and no export left on the buffer."""

from __future__ import annotations

import mmap
import os

import pytest

from harness.storage import bytecopy
from harness.storage.bytecopy import copy_into


@pytest.mark.parametrize("n", [0, 1, (64 << 10) - 1, 64 << 10, (1 << 20) + 3])
@pytest.mark.parametrize("kind", ["bytearray", "mmap"])
def test_copies_exactly_at_an_offset(kind, n):
    size, at = (2 << 20) + 100, 77
    dst = bytearray(size) if kind == "bytearray" else mmap.mmap(-1, size)
    src = os.urandom(n)
    copy_into(dst, at, memoryview(src))  # read-only source
    assert bytes(dst[:at]) == bytes(at) and bytes(dst[at:at + n]) == src
    assert bytes(dst[at + n:]) == bytes(size - at - n)  # nothing written past the piece
    if kind == "mmap":
        dst.close()  # refused while an export of the map is alive


def test_the_buffer_can_shrink_after_a_copy():
    """The S3 writer trims its last part in place (``del body[fill:]``): a resize a live export refuses."""
    body = bytearray(1 << 20)
    copy_into(body, 0, memoryview(os.urandom(300_000)))
    del body[300_000:]
    assert len(body) == 300_000


def test_the_threshold_picks_the_copy(monkeypatch):
    calls = []
    real = bytecopy.np.copyto
    monkeypatch.setattr(bytecopy.np, "copyto", lambda d, s: (calls.append(len(s)), real(d, s)))
    dst = bytearray(1 << 20)
    copy_into(dst, 0, memoryview(bytes(1000)))
    copy_into(dst, 0, memoryview(os.urandom(200_000)))
    assert calls == [200_000]  # only the large piece went through numpy
