"""Storage options named ``harness_*``: parsed here for every URL and removed before the rest goes to fsspec.

They tune the S3 backend and are accepted (and ignored) by every other backend, so one config works
everywhere:

``harness_part_size_mb`` (float, default 16)
    Multipart part size in MiB; also the size of each concurrent ranged GET. S3 requires >= 5 MiB for every
    part but the last; smaller values are for tests against servers that allow them (moto).
``harness_max_concurrency`` (int, default 8)
    Parts uploaded, and ranges downloaded, at the same time per Storage.
``harness_retry_budget_s`` (float, default 120)
    How long one S3 operation may keep retrying before it fails. The access check uses at most 30 s.
``harness_multipart_threshold_mb`` (float, default: the part size)
    Objects at least this large go up as multipart uploads; smaller ones as one PUT.
``harness_direct_io`` (bool, default true)
    Local disk: data files are written with ``O_DIRECT`` through a small aligned buffer, bypassing the page
    cache (see :mod:`harness.storage.local`); false: ordinary buffered writes. Other backends ignore it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MIB = 1 << 20
MAX_PART_BYTES = 5 << 30         # S3's limit on one part

OPTION_KEYS = ("harness_part_size_mb", "harness_max_concurrency", "harness_retry_budget_s",
               "harness_multipart_threshold_mb", "harness_direct_io")


@dataclass(frozen=True)
class Tuning:
    part_size: int = 16 * MIB
    max_concurrency: int = 8
    retry_budget_s: float = 120.0
    multipart_threshold: int = 0     # 0: the part size
    direct_io: bool = True           # local data files written with O_DIRECT

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


def split_options(storage_options: dict | None) -> tuple[Tuning, dict]:
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

    direct = raw.get("harness_direct_io", True)
    if not isinstance(direct, bool):
        raise ValueError(f"storage option harness_direct_io must be true or false, got {direct!r}")
    tuning = Tuning(part_size=int(num("harness_part_size_mb", float, 16.0) * MIB),
                    max_concurrency=num("harness_max_concurrency", int, 8),
                    retry_budget_s=num("harness_retry_budget_s", float, 120.0),
                    multipart_threshold=int(num("harness_multipart_threshold_mb", float, 0.0) * MIB),
                    direct_io=direct)
    return tuning, rest
