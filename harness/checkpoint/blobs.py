"""Tensors to and from data files: raw bytes, packed into a few bounded files, each checksummed."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import math
from typing import IO, Sequence

import torch

from harness import faults
from harness.checkpoint.codec import Shard
from harness.checkpoint.format import TensorEntry, checksum, data_file_name, dtype_name, DTYPES
from harness.errors import CheckpointCorruptError, CheckpointError
from harness.storage import Storage

ALIGN = 64  # tensor offsets are 64-byte aligned so files can later be read with direct I/O
CHUNK_BYTES = 4 << 20  # shards get a checksum per block of rows of about this size (row-range reads)


def byte_view(t: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy when it is already a contiguous CPU tensor."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.resolve_conj().resolve_neg().contiguous().reshape(-1)  # lazy conj/neg views hold other bytes
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def plan_files(tensors: dict[str, torch.Tensor], max_file_bytes: int) -> list[list[str]]:
    """Group tensor keys into files of at most ``max_file_bytes`` (a larger tensor gets a file alone)."""
    groups: list[list[str]] = [[]]
    size = 0
    for key, t in tensors.items():
        n = t.numel() * t.element_size()
        if groups[-1] and size + n > max_file_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += n + ALIGN
    return [g for g in groups if g] or []


def file_starts(tensors: dict[str, torch.Tensor], max_file_bytes: int) -> frozenset[str]:
    """The keys that begin a data file (:func:`plan_files`): a host snapshot starts each on a page."""
    return frozenset(g[0] for g in plan_files(tensors, max_file_bytes))


def chunk_rows(nbytes: int, shape: Sequence[int], chunk_bytes: int) -> int | None:
    """Rows per checksummed block of a shard of ``nbytes`` (blocks of whole rows of about ``chunk_bytes``);
    None when the shard is one block."""
    if not shape or shape[0] <= 1 or not nbytes:
        return None
    rows = max(1, chunk_bytes // max(1, nbytes // shape[0]))
    return rows if rows < shape[0] else None


def _chunk_sums(buf: memoryview, shape: Sequence[int], chunk_bytes: int) -> tuple[int | None, tuple | None]:
    """(rows per chunk, checksums) for a shard with more than one chunk of rows; (None, None) otherwise."""
    rows = chunk_rows(len(buf), shape, chunk_bytes)
    if rows is None:
        return None, None
    step = rows * (len(buf) // shape[0])
    return rows, tuple(checksum(buf[i:i + step]) for i in range(0, len(buf), step))


def _write_file(storage: Storage, folder: str, fname: str, keys: list[str],
                tensors: dict[str, torch.Tensor | Shard], rank: int,
                chunk_bytes: int = CHUNK_BYTES) -> tuple[int, list[TensorEntry]]:
    entries = []
    pos = 0
    with storage.open_write(f"{folder}/{fname}") as f:
        for key in keys:
            t = tensors[key]
            shard = t if isinstance(t, Shard) else None
            if shard is not None:
                t = shard.local
            buf = byte_view(t)
            pad = -pos % ALIGN
            if pad:
                f.write(b"\0" * pad)
                pos += pad
            write_all(f, buf)
            extra = {}
            if shard is not None:
                rows, sums = _chunk_sums(buf, tuple(t.shape), chunk_bytes)
                extra = dict(global_shape=tuple(shard.global_shape), global_offset=tuple(shard.global_offset),
                             chunk_rows=rows, chunk_checksums=sums)
            entries.append(TensorEntry(key=key, dtype=dtype_name(t.dtype), shape=tuple(t.shape), file=fname,
                                       offset=pos, length=len(buf), checksum=checksum(buf), rank=rank, **extra))
            pos += len(buf)
    return pos, entries


def write_all(f: IO[bytes], buf: memoryview) -> None:
    done = 0
    while done < len(buf):  # raw (unbuffered) files may write less than asked
        n = f.write(buf[done:])
        done += len(buf) - done if n is None else n


def write_tensors(storage: Storage, folder: str, tensors: dict[str, torch.Tensor | Shard], *, rank: int,
                  step: int, max_file_bytes: int, threads: int,
                  chunk_bytes: int = CHUNK_BYTES) -> tuple[dict[str, dict], list[TensorEntry]]:
    """Write this rank's tensors (or shards) into data files (in parallel), each fsync'd.
    Returns (files, entries)."""
    groups = plan_files(tensors, max_file_bytes)
    names = [data_file_name(rank, i) for i in range(len(groups))]
    files: dict[str, dict] = {}
    entries: list[TensorEntry] = []
    if not groups:
        return files, entries
    with cf.ThreadPoolExecutor(max_workers=max(1, min(threads, len(groups)))) as pool:
        futures = [pool.submit(_write_file, storage, folder, n, g, tensors, rank, chunk_bytes)
                   for n, g in zip(names, groups)]
        for name, fut in zip(names, futures):
            size, es = fut.result()
            files[name] = {"size": size, "rank": rank}
            entries.extend(es)
            faults.point("save.data_file", step=step, rank=rank, file=name)
    return files, entries


def read_exactly(f: IO[bytes], buf: memoryview, offset: int, what: str) -> None:
    """Fill ``buf`` with the bytes at ``offset`` of ``f``; a file that ends early is a corrupt checkpoint."""
    f.seek(offset)
    got = 0
    while got < len(buf):
        n = f.readinto(buf[got:])
        if not n:
            raise CheckpointCorruptError(f"{what} is truncated (got {got} of {len(buf)} bytes at offset {offset})")
        got += n


def read_entries(storage: Storage, folder: str, fname: str, entries: list[TensorEntry],
                 verify: bool = True, f: IO[bytes] | None = None) -> dict[str, torch.Tensor]:
    """Read (and check) the given entries of one data file, in offset order, opening it once (``f``: the
    file already open, left open)."""
    out: dict[str, torch.Tensor] = {}
    with (contextlib.nullcontext(f) if f is not None else storage.open_read(f"{folder}/{fname}")) as f:
        for e in sorted(entries, key=lambda e: e.offset):
            t = torch.empty(e.shape, dtype=DTYPES[e.dtype])
            buf = byte_view(t) if e.length else memoryview(bytearray())
            read_exactly(f, buf, e.offset, f"{folder}/{fname}: tensor {e.key!r}")
            if verify:
                got_sum = checksum(buf)
                if got_sum != e.checksum:
                    raise CheckpointCorruptError(f"{folder}/{fname}: checksum mismatch for tensor {e.ident!r} "
                                                 f"(stored {e.checksum}, computed {got_sum})")
            out[e.ident] = t
    return out


def read_tensors(storage: Storage, folder: str, entries: list[TensorEntry], *, threads: int,
                 verify: bool = True, assemble: bool = True) -> dict[str, torch.Tensor]:
    """Read entries spread over several files, one thread per file (bounded). Results are keyed by entry
    ident (the key for a whole tensor); with ``assemble``, the shards of a sharded tensor that are all
    read are replaced by the full tensor under its plain key."""
    by_file: dict[str, list[TensorEntry]] = {}
    for e in entries:
        by_file.setdefault(e.file, []).append(e)
    out: dict[str, torch.Tensor] = {}
    if not by_file:
        return out
    with cf.ThreadPoolExecutor(max_workers=max(1, min(threads, len(by_file)))) as pool:
        for part in pool.map(lambda kv: read_entries(storage, folder, kv[0], kv[1], verify), by_file.items()):
            out.update(part)
    if assemble:
        shards: dict[str, list[TensorEntry]] = {}
        for e in entries:
            if e.global_shape is not None:
                shards.setdefault(e.key, []).append(e)
        for key, es in shards.items():
            if sum(math.prod(e.shape) for e in es) != math.prod(es[0].global_shape):
                continue  # not every shard was asked for: leave them by ident
            full = torch.empty(es[0].global_shape, dtype=DTYPES[es[0].dtype])
            for e in es:
                full[_box(e.global_offset, e.shape)] = out.pop(e.ident)
            out[key] = full
    return out


def _box(offset: Sequence[int], shape: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


def region_requests(entries: list[TensorEntry], offset: Sequence[int], shape: Sequence[int]) -> list[tuple]:
    """What to read to build the box (``offset``, ``shape``) of the global tensor stored in ``entries``
    (the shards of one key, or its one whole entry): a list of (entry, row range or None for the whole
    entry, destination box, source box inside what is read).

    A shard that holds full rows (sharded along dim 0 only) and has chunk checksums is read as a row range:
    only the chunks that hold the rows needed (each verified). Any other overlapping shard is read whole and
    sliced."""
    reqs = []
    for e in entries:
        goff = e.global_offset or (0,) * len(e.shape)
        lo = [max(o, g) for o, g in zip(offset, goff)]
        hi = [min(o + n, g + m) for o, n, g, m in zip(offset, shape, goff, e.shape)]
        if not math.prod(shape) or not math.prod(e.shape) or any(h <= a for a, h in zip(lo, hi)):
            continue
        dst = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, offset))
        rows = None
        if (e.chunk_rows and len(e.shape) >= 1 and all(g == 0 for g in goff[1:])
                and tuple(e.shape[1:]) == tuple((e.global_shape or e.shape)[1:])):
            first, last = (lo[0] - goff[0]) // e.chunk_rows, -(-(hi[0] - goff[0]) // e.chunk_rows)
            r0, r1 = first * e.chunk_rows, min(e.shape[0], last * e.chunk_rows)
            if (r0, r1) != (0, e.shape[0]):
                rows = (r0, r1)
        base = (rows[0] if rows else 0,) + (0,) * (len(e.shape) - 1)
        src = tuple(slice(a - g - b, c - g - b) for a, c, g, b in zip(lo, hi, goff, base))
        reqs.append((e, rows, dst, src))
    return reqs


def read_rows(storage: Storage, folder: str, e: TensorEntry, r0: int, r1: int, f: IO[bytes] | None = None,
              verify: bool = True, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows r0..r1 of entry ``e`` (chunk aligned, except at the end), each chunk verified; read into ``out``
    when given (a contiguous CPU tensor of those rows' shape and the saved dtype: it holds undefined bytes
    if this raises), else into a new tensor."""
    if e.chunk_rows is None or r0 % e.chunk_rows or (r1 % e.chunk_rows and r1 != e.shape[0]):
        raise CheckpointError(f"{folder}: rows {r0}..{r1} of {e.ident!r} are not chunk aligned")
    shape, dtype = (r1 - r0, *e.shape[1:]), DTYPES[e.dtype]
    if out is not None and (tuple(out.shape) != shape or out.dtype != dtype or out.device.type != "cpu"
                            or not out.is_contiguous()):
        raise ValueError(f"read_rows: out must be a contiguous CPU {dtype} tensor of shape {list(shape)}")
    t = out if out is not None else torch.empty(shape, dtype=dtype)
    row = e.length // e.shape[0]
    buf = byte_view(t) if t.numel() else memoryview(bytearray())
    own = f is None
    f = storage.open_read(f"{folder}/{e.file}") if own else f
    try:
        read_exactly(f, buf, e.offset + r0 * row, f"{folder}/{e.file}: tensor {e.ident!r}")
    finally:
        if own:
            f.close()
    if verify:
        step = e.chunk_rows * row
        for i, start in enumerate(range(0, len(buf), step)):
            c = r0 // e.chunk_rows + i
            got_sum = checksum(buf[start:start + step])
            if got_sum != e.chunk_checksums[c]:
                raise CheckpointCorruptError(f"{folder}/{e.file}: checksum mismatch for tensor {e.ident!r} "
                                             f"rows {c * e.chunk_rows}.. (stored {e.chunk_checksums[c]}, "
                                             f"computed {got_sum})")
    return t


def chunk_span(e: TensorEntry, c: int) -> tuple[int, int]:
    """The rows (first, end) of chunk ``c`` of entry ``e`` (one with chunk checksums)."""
    return c * e.chunk_rows, min(e.shape[0], (c + 1) * e.chunk_rows)

