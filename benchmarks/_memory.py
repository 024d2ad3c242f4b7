"""Memory measurement shared by the benchmarks and the memory tests: a call's peak resident memory above where
it started, and glibc settings that make that peak honest. Stdlib only."""

from __future__ import annotations

import contextlib
import ctypes
import threading
from typing import Any, Callable


def fixed_malloc() -> None:
    """Every large allocation its own mmap, returned on free (glibc's dynamic threshold otherwise keeps freed
    memory in the heap, where a later allocation reuses it unseen by the high-water mark)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 256 * 1024)   # M_MMAP_THRESHOLD (fixed: no dynamic adjustment)
        libc.mallopt(-1, 256 * 1024)   # M_TRIM_THRESHOLD


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_rss_during(fn: Callable[[], Any]) -> tuple[Any, int]:
    """(fn(), peak resident bytes above the resident size before it). Exact where /proc/self/clear_refs
    resets the high-water mark (Linux >= 4.0); otherwise sampled every 2 ms from a thread."""
    before = _rss_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        exact = _rss_kb("VmHWM") <= before + 1024
    except OSError:
        exact = False
    peak = [before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.002):
            peak[0] = max(peak[0], _rss_kb("VmRSS"))

    sampler = None if exact else threading.Thread(target=sample, daemon=True)
    if sampler:
        sampler.start()
    try:
        r = fn()
    finally:
        stop.set()
        if sampler:
            sampler.join()
    hwm = _rss_kb("VmHWM") if exact else max(peak[0], _rss_kb("VmRSS"))
    return r, max(0, hwm - before) * 1024
