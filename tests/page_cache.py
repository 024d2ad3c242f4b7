"""What of a file is in the page cache, and making it cold: for tests of O_DIRECT writes and of prefetch."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os


def resident_fraction(path: str) -> float:
    """Share of the file's pages in the page cache (mmap + mincore: looking does not fault them in)."""
    size = os.path.getsize(path)
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    page = mmap.PAGESIZE
    n = (size + page - 1) // page
    vec = (ctypes.c_ubyte * n)()
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    fd = os.open(path, os.O_RDONLY)
    try:
        a = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert a not in (None, ctypes.c_void_p(-1).value)
        try:
            assert libc.mincore(a, size, vec) == 0
            return sum(b & 1 for b in bytes(vec)) / n
        finally:
            libc.munmap(a, size)
    finally:
        os.close(fd)


def evict(path: str) -> None:
    """Drop the file's clean pages from the page cache (written back first: dirty pages cannot be dropped)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
