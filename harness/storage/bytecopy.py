"""Copying bytes into a writer's buffer without holding the GIL.

A memoryview or bytearray slice assignment is a memcpy made while holding the GIL. In a background writer
that stops the training thread for as long as the copy takes, and a GPU training step is mostly that thread
launching kernels from Python: measured on the 2-core machine, a loop of small torch ops kept 0.48-0.73 of
its idle rate while four writers copied 0.5 GB through slice assignments, and 0.81-0.87 with numpy's copy,
which releases the GIL (``benchmarks/writer_contention.py``, three runs). Pieces under ``GIL_FREE_COPY_MIN``
keep the slice assignment: they hold the GIL for less than numpy's call costs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

GIL_FREE_COPY_MIN = 64 << 10  # bytes; benchmarks/writer_contention.py raises it to time the slice copy


def copy_into(dst: Any, at: int, src: memoryview) -> None:
    """``dst[at:at + len(src)] = src`` (``dst``: a writable buffer such as a bytearray or an mmap; ``src``: a
    flat byte memoryview), the GIL released for pieces of at least ``GIL_FREE_COPY_MIN`` bytes."""
    n = len(src)
    if n < GIL_FREE_COPY_MIN:
        memoryview(dst)[at:at + n] = src
        return
    np.copyto(np.frombuffer(dst, dtype=np.uint8, count=n, offset=at), np.frombuffer(src, dtype=np.uint8))
