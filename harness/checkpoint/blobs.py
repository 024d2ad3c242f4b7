"""Tensors to and from data files: raw bytes, packed into a few bounded files, each checksummed."""

from __future__ import annotations

import concurrent.futures as cf
from typing import IO

import torch

from harness import faults
from harness.checkpoint.format import TensorEntry, checksum, data_file_name, dtype_name, DTYPES
from harness.errors import CheckpointCorruptError
from harness.storage import Storage

ALIGN = 64  # tensor offsets are 64-byte aligned so files can later be read with direct I/O


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


def _write_file(storage: Storage, folder: str, fname: str, keys: list[str],
                tensors: dict[str, torch.Tensor], rank: int) -> tuple[int, list[TensorEntry]]:
    entries = []
    pos = 0
    with storage.open_write(f"{folder}/{fname}") as f:
        for key in keys:
            t = tensors[key]
            buf = byte_view(t)
            pad = -pos % ALIGN
            if pad:
                f.write(b"\0" * pad)
                pos += pad
            _write_all(f, buf)
            entries.append(TensorEntry(key=key, dtype=dtype_name(t.dtype), shape=tuple(t.shape), file=fname,
                                       offset=pos, length=len(buf), checksum=checksum(buf), rank=rank))
            pos += len(buf)
    return pos, entries


def _write_all(f: IO[bytes], buf: memoryview) -> None:
    done = 0
    while done < len(buf):  # raw (unbuffered) files may write less than asked
        n = f.write(buf[done:])
        done += len(buf) - done if n is None else n


def write_tensors(storage: Storage, folder: str, tensors: dict[str, torch.Tensor], *, rank: int,
                  step: int, max_file_bytes: int, threads: int) -> tuple[dict[str, dict], list[TensorEntry]]:
    """Write this rank's tensors into data files (in parallel), each fsync'd. Returns (files, entries)."""
    groups = plan_files(tensors, max_file_bytes)
    names = [data_file_name(rank, i) for i in range(len(groups))]
    files: dict[str, dict] = {}
    entries: list[TensorEntry] = []
    with cf.ThreadPoolExecutor(max_workers=max(1, min(threads, len(groups)))) as pool:
        futures = [pool.submit(_write_file, storage, folder, n, g, tensors, rank) for n, g in zip(names, groups)]
        for name, fut in zip(names, futures):
            size, es = fut.result()
            files[name] = {"size": size, "rank": rank}
            entries.extend(es)
            faults.point("save.data_file", step=step, rank=rank, file=name)
    return files, entries


def read_entries(storage: Storage, folder: str, fname: str, entries: list[TensorEntry],
                 verify: bool = True) -> dict[str, torch.Tensor]:
    """Read (and check) the given entries of one data file, in offset order, opening it once."""
    out: dict[str, torch.Tensor] = {}
    with storage.open_read(f"{folder}/{fname}") as f:
        for e in sorted(entries, key=lambda e: e.offset):
            t = torch.empty(e.shape, dtype=DTYPES[e.dtype])
            buf = byte_view(t) if e.length else memoryview(bytearray())
            f.seek(e.offset)
            got = 0
            while got < e.length:
                n = f.readinto(buf[got:])
                if not n:
                    raise CheckpointCorruptError(f"{folder}/{fname}: tensor {e.key!r} is truncated "
                                                 f"(got {got} of {e.length} bytes at offset {e.offset})")
                got += n
            if verify:
                got_sum = checksum(buf)
                if got_sum != e.checksum:
                    raise CheckpointCorruptError(f"{folder}/{fname}: checksum mismatch for tensor {e.key!r} "
                                                 f"(stored {e.checksum}, computed {got_sum})")
            out[e.key] = t
    return out


def read_tensors(storage: Storage, folder: str, entries: list[TensorEntry], *, threads: int,
                 verify: bool = True) -> dict[str, torch.Tensor]:
    """Read entries spread over several files, one thread per file (bounded)."""
    by_file: dict[str, list[TensorEntry]] = {}
    for e in entries:
        by_file.setdefault(e.file, []).append(e)
    out: dict[str, torch.Tensor] = {}
    if not by_file:
        return out
    with cf.ThreadPoolExecutor(max_workers=max(1, min(threads, len(by_file)))) as pool:
        for part in pool.map(lambda kv: read_entries(storage, folder, kv[0], kv[1], verify), by_file.items()):
            out.update(part)
    return out
