"""Reading a sharded checkpoint's tensors for one rank (:func:`harness.checkpoint.sharded.load`).

The :class:`Loader` collects the boxes of global tensors a rank needs. A box may come with the live tensor it
ends up in (``want(..., into=)``: a parameter, buffer or optimizer-state tensor, or an FSDP2 DTensor's local
shard). When the box is exactly covered by whole stored entries and that tensor is a contiguous CPU tensor of
the saved dtype and the box's shape, the entries are read straight into it (:func:`direct_read.read_into`,
checksummed on the same pass), so applying the state later copies a tensor onto itself and restore holds no
second copy of the rank's state. A box that such a tensor gets from parts of stored entries (row ranges at
another world size) is filled chunk by chunk: each checksummed chunk of rows (``chunk_checksums``) is read,
verified and its rows copied into the live tensor, straight into it when the chunk is one contiguous piece of
it, else through one chunk of scratch; an entry without chunk checksums is read whole, one entry at a time.
Boxes without such a tensor (another dtype or device, no live tensor) are built the same way in a new tensor.
Extra memory is a few chunks of scratch, or the largest entry read whole (:data:`SCRATCH_BYTES` bounds the
scratch of all threads together; one larger entry is read alone).

A read that fails part way leaves the live tensors it touched holding undefined bytes. The rule that keeps
that from going unnoticed while restore walks back to an older checkpoint (:func:`guard`): every key read in
place remembers that; an older candidate must give each of them a live destination again (ask for the same
key, into a tensor of that shape: it is then read in place again, or written whole when the state is
applied), otherwise restore stops with :class:`StrandedError` instead of keeping half-read tensors. (A
damaged checkpoint with no older committed one left is restore's "every committed checkpoint failed
verification" error, never a fresh start.)
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import math
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from harness.checkpoint import blobs, direct_read
from harness.checkpoint.direct_io import Aborted, Budget, is_local
from harness.checkpoint.format import DTYPES, Manifest, TensorEntry
from harness.errors import CheckpointCorruptError, CheckpointError
from harness.storage import Storage


class StrandedError(CheckpointError):
    """Live tensors hold part of a damaged checkpoint and the next candidate does not overwrite them all:
    the walk back stops here (a CheckpointError that is not damage, so every rank fails alike)."""


@dataclass
class _Request:
    key: str
    offset: tuple
    shape: tuple
    reqs: list                                  # blobs.region_requests: (entry, rows, dst box, src box)
    into: torch.Tensor | None = None            # the live tensor the box ends up in, when there is one
    in_place: list[tuple[TensorEntry, torch.Tensor]] = field(default_factory=list)  # entries read into it
    stream: bool = False                        # ``into`` is filled from parts of entries (see _read_parts)


@dataclass
class _Use:
    """One place an entry's bytes go: ``dest[dst] = entry[src]`` (``src`` in the entry's own coordinates)."""
    dest: torch.Tensor
    dst: tuple
    src: tuple


@dataclass
class Verified:
    """Entries (idents) read whole and verified, and the verified chunks of entries read in part."""
    whole: set[str] = field(default_factory=set)
    chunks: dict[str, set[int]] = field(default_factory=dict)

    @staticmethod
    def union(parts: list[Verified]) -> Verified:
        out = Verified()
        for v in parts:
            out.whole |= v.whole
            for ident, cs in v.chunks.items():
                out.chunks.setdefault(ident, set()).update(cs)
        out.chunks = {k: v for k, v in out.chunks.items() if k not in out.whole}
        return out


SCRATCH_BYTES = 32 << 20   # scratch of all reading threads together (one larger entry or chunk runs alone)


class Loader:
    """Collects the boxes of global tensors one rank needs, reads them (grouped by file, verified) and returns
    them; straight into their live tensors where :func:`_fits` allows."""

    def __init__(self, storage: Storage, name: str, manifest: Manifest, threads: int) -> None:
        self.storage, self.name, self.manifest, self.threads = storage, name, manifest, threads
        self.requests: list[_Request] = []
        self.read_whole: set[str] = set()   # idents of entries read whole and verified (by any path)
        self.chunks: dict[str, set[int]] = {}   # chunks of entries read and verified (row ranges)

    def global_shape(self, key: str) -> tuple[int, ...]:
        es = self.manifest.entries(key)
        return tuple(es[0].global_shape if es[0].global_shape is not None else es[0].shape)

    def want(self, key: str, offset: tuple | None = None, shape: tuple | None = None,
             into: torch.Tensor | None = None) -> int:
        """Register the box (``offset``, ``shape``; default: the whole tensor) of ``key``; ``into``: the live
        tensor of the box's shape it lands in (read in place when possible). Returns the ticket for :meth:`run`."""
        gshape = self.global_shape(key)
        offset = tuple(offset) if offset is not None else (0,) * len(gshape)
        shape = tuple(shape) if shape is not None else gshape
        if into is not None and tuple(into.shape) != shape:
            into = None
        reqs = blobs.region_requests(self.manifest.entries(key), offset, shape)
        self.requests.append(_Request(key, offset, shape, reqs, into))
        return len(self.requests) - 1

    def plan(self) -> None:
        """Decide which requests are read in place (each stored entry into one place at most)."""
        used: set[str] = set()
        for r in self.requests:
            r.in_place, r.stream = [], False
            dtype = DTYPES[self.manifest.entries(r.key)[0].dtype]
            if r.into is None or not _dest_ok(r.into, r.shape, dtype):
                continue
            idents = [e.ident for e, _, _, _ in r.reqs]
            if _fits(r, dtype) and used.isdisjoint(idents) and len(set(idents)) == len(idents):
                used.update(idents)
                r.in_place = [(e, r.into[dst]) for e, _, dst, _ in r.reqs]
                if not r.reqs:
                    r.in_place = [(None, r.into)]  # an empty box: nothing to read, the live tensor is it
            else:
                r.stream = True  # parts of entries (or entries another box reads whole): filled by _read_parts

    def destined(self) -> set[str]:
        """Keys given a live destination of the box's shape (read in place, or written whole by apply)."""
        return {r.key for r in self.requests if r.into is not None}

    def placed(self) -> set[str]:
        """Keys :meth:`plan` chose to read in place (whole entries, or streamed parts of entries)."""
        return {r.key for r in self.requests if r.in_place or r.stream}

    def run(self) -> list[torch.Tensor]:
        """Read every request; returns its tensor by ticket (the live tensor itself for a request read in place)."""
        inner = [(e, view) for r in self.requests for e, view in r.in_place if e is not None]
        if inner:  # entries as whole tensors of their own: each fills its view of the live tensor
            flat = [dataclasses.replace(e, key=e.ident, global_shape=None, global_offset=None, chunk_rows=None,
                                        chunk_checksums=None) for e, _ in inner]
            direct_read.read_into(self.storage, self.name, flat, {f.key: v for f, (_, v) in zip(flat, inner)},
                                  threads=self.threads)
            self.read_whole |= {e.ident for e, _ in inner}
        out: list[Any] = [r.into if r.in_place or r.stream else None for r in self.requests]
        # a box that is exactly one stored entry and has no live tensor: the entry read is the result (no copy)
        exact = {i: r.reqs[0][0] for i, r in enumerate(self.requests) if out[i] is None and len(r.reqs) == 1
                 and r.reqs[0][1] is None and tuple(r.reqs[0][0].shape) == tuple(r.shape)}
        data = blobs.read_tensors(self.storage, self.name, list({e.ident: e for e in exact.values()}.values()),
                                  threads=self.threads, assemble=False)
        self.read_whole |= set(data)
        uses: dict[str, tuple[TensorEntry, list[_Use]]] = {}
        for i, r in enumerate(self.requests):
            if r.in_place or i in exact:
                out[i] = data[exact[i].ident] if i in exact else out[i]
                continue
            if out[i] is None:
                out[i] = torch.empty(r.shape, dtype=DTYPES[self.manifest.entries(r.key)[0].dtype])
            for e, rows, dst, src in r.reqs:
                if rows:  # region_requests counts a row range's source rows from its first row
                    src = (slice(src[0].start + rows[0], src[0].stop + rows[0]), *src[1:])
                uses.setdefault(e.ident, (e, []))[1].append(_Use(out[i].detach(), dst, src))
        self._read_parts([(e, _needed(e, us), us) for e, us in uses.values()])
        return out

    def _read_parts(self, jobs: list[tuple[TensorEntry, list[int] | None, list[_Use]]]) -> None:
        """Read each job's entry (the chunks listed; None: the whole entry) into its uses, on a few threads
        (tasks of one data file each: :func:`_by_file`), scratch bounded by :data:`SCRATCH_BYTES`; records what
        was verified. When a read fails, every task has stopped before this raises (nothing writes into a live
        tensor afterwards)."""
        if not jobs:
            return
        budget, stop, errors = Budget(SCRATCH_BYTES), threading.Event(), []
        n = direct_read.local_streams(self.threads) if is_local(self.storage) else self.threads
        groups = _by_file(jobs, n)
        with cf.ThreadPoolExecutor(max_workers=max(1, min(n, len(groups))), thread_name_prefix="harness-read") as pool:
            futures = [pool.submit(_read_group, self.storage, self.name, group, budget, stop) for group in groups]
            for fut in cf.as_completed(futures):
                if fut.exception() is not None:
                    stop.set()
                    errors.append(fut.exception())
        errors = [e for e in errors if not isinstance(e, Aborted)]
        if errors:
            raise next((e for e in errors if isinstance(e, CheckpointCorruptError)), errors[0])
        for e, need, _ in jobs:
            if need is None:
                self.read_whole.add(e.ident)
                continue
            done = self.chunks.setdefault(e.ident, set())
            done.update(need)
            if len(done) == len(e.chunk_checksums):
                self.read_whole.add(e.ident)

    def verified(self) -> Verified:
        """What this rank's reads verified: entries read whole, and chunks of entries read in part."""
        return Verified(set(self.read_whole), {k: set(v) for k, v in self.chunks.items() if k not in self.read_whole})

    def verify_rest(self, rank: int, world: int, everyone: Verified | None = None) -> None:
        """Check the entries that this rank's share of verification covers (written by a rank r with
        r % world == rank) and that no rank's reads verified (``everyone``: the union of every rank's
        :meth:`verified`; None: this rank's own): every byte of the checkpoint is verified by some rank, once.
        Read through a bounded scratch buffer, kept nowhere; of an entry read in part, only the other chunks."""
        done = everyone if everyone is not None else self.verified()
        rest = [e for e in self.manifest.tensors.values() if e.rank % world == rank and e.ident not in done.whole]
        part = [(e, sorted(set(range(len(e.chunk_checksums))) - done.chunks[e.ident]))
                for e in rest if done.chunks.get(e.ident)]
        self._read_parts([(e, need, []) for e, need in part if need])
        whole = [e for e in rest if not done.chunks.get(e.ident)]
        direct_read.verify_entries(self.storage, self.name, whole, threads=self.threads)


def _needed(e: TensorEntry, uses: list[_Use]) -> list[int] | None:
    """The chunks of ``e`` that hold the rows its uses need; None when ``e`` has no chunk checksums."""
    if not (e.chunk_rows and e.chunk_checksums and e.shape and e.length and e.length % e.shape[0] == 0):
        return None
    rows = e.chunk_rows
    return sorted({c for u in uses for c in range(u.src[0].start // rows, -(-u.src[0].stop // rows))})


def _by_file(jobs: list, n: int) -> list[list]:
    """The jobs as tasks of one data file each, in offset order (a task opens its file once: on S3 an open
    is a HEAD), a file's jobs split into up to ``n`` / files runs so that a few files still keep ``n``
    threads busy."""
    files: dict[str, list] = {}
    for job in sorted(jobs, key=lambda j: (j[0].file, j[0].offset)):
        files.setdefault(job[0].file, []).append(job)
    per_file = max(1, -(-n // max(1, len(files))))
    groups = []
    for fjobs in files.values():
        size = -(-len(fjobs) // min(per_file, len(fjobs)))
        groups += [fjobs[i:i + size] for i in range(0, len(fjobs), size)]
    return groups


def _read_group(storage: Storage, folder: str, group: list, budget: Budget, stop: threading.Event) -> None:
    """Read a task's entries (all in one data file) through one open handle."""
    with storage.open_read(f"{folder}/{group[0][0].file}") as f:
        for e, need, uses in group:
            _read_entry(storage, folder, e, need, uses, budget, stop, f)


def _read_entry(storage: Storage, folder: str, e: TensorEntry, need: list[int] | None, uses: list[_Use],
                budget: Budget, stop: threading.Event, f: Any) -> None:
    """Read entry ``e`` (its file open as ``f``) into its uses: the chunks ``need``, each verified before its
    rows are copied out of the scratch (or read straight into a use's memory when the chunk is one contiguous
    piece of it, verified there); or, with ``need`` None, the whole entry into a staging tensor, verified,
    then copied."""
    if stop.is_set():
        raise Aborted()
    if need is None:
        with budget.hold(e.length), torch.no_grad():
            staging = blobs.read_entries(storage, folder, e.file, [e], f=f)[e.ident]
            for u in uses:
                u.dest[u.dst] = staging[u.src]
        return
    dtype, row = DTYPES[e.dtype], e.length // e.shape[0]
    with budget.hold(min(e.length, e.chunk_rows * row)), torch.no_grad():
        scratch = None
        for c in need:
            if stop.is_set():
                raise Aborted()
            r0, r1 = blobs.chunk_span(e, c)
            hit = [u for u in uses if u.src[0].start < r1 and u.src[0].stop > r0]
            into = _whole_chunk(hit[0], e, r0, r1) if len(hit) == 1 else None
            if into is not None:
                blobs.read_rows(storage, folder, e, r0, r1, f=f, out=into)
                continue
            scratch = torch.empty(e.chunk_rows * row, dtype=torch.uint8) if scratch is None else scratch
            piece = scratch[:(r1 - r0) * row].view(dtype).reshape(r1 - r0, *e.shape[1:])
            blobs.read_rows(storage, folder, e, r0, r1, f=f, out=piece)
            for u in hit:
                a, b = max(r0, u.src[0].start), min(r1, u.src[0].stop)
                d0 = u.dst[0].start + a - u.src[0].start
                u.dest[(slice(d0, d0 + b - a), *u.dst[1:])] = piece[(slice(a - r0, b - r0), *u.src[1:])]


def _whole_chunk(u: _Use, e: TensorEntry, r0: int, r1: int) -> torch.Tensor | None:
    """The contiguous piece of ``u.dest`` that rows r0..r1 of ``e`` land in, when the use takes all of them."""
    if not (u.src[0].start <= r0 and r1 <= u.src[0].stop):
        return None
    if any((s.start, s.stop) != (0, n) for s, n in zip(u.src[1:], e.shape[1:])):
        return None
    d0 = u.dst[0].start + r0 - u.src[0].start
    view = u.dest[(slice(d0, d0 + r1 - r0), *u.dst[1:])]
    return view if view.is_contiguous() and view.dtype == DTYPES[e.dtype] else None


def _fits(r: _Request, dtype: torch.dtype) -> bool:
    """Whether request ``r`` can be read straight into ``r.into``: a contiguous CPU tensor of the saved dtype
    and the box's shape, the box covered exactly by whole stored entries (no row ranges, nothing sliced)."""
    if not _dest_ok(r.into, r.shape, dtype):
        return False
    for e, rows, _, src in r.reqs:
        if rows is not None or any((s.start, s.stop) != (0, n) for s, n in zip(src, e.shape)):
            return False
    return sum(math.prod(e.shape) for e, _, _, _ in r.reqs) == math.prod(r.shape)


def _dest_ok(t: Any, shape: tuple, dtype: torch.dtype) -> bool:
    """Whether ``t`` can take the box's bytes as they are: a contiguous CPU tensor of the saved dtype and the
    box's shape."""
    return (type(t) is torch.Tensor and t.device.type == "cpu" and t.dtype == dtype and t.is_contiguous()
            and not t.is_conj() and not t.is_neg() and tuple(t.shape) == shape)


def guard(filled: set[str], loader: Loader, name: str) -> None:
    """Before reading ``name``: refuse it when tensors an earlier candidate of this restore read in place
    (``filled``, kept by the restore across its candidates) get no live destination from it; then add what
    it reads in place (before reading: a read that fails part way has written some of them)."""
    missing = filled - loader.destined()
    if missing:
        raise StrandedError(f"a damaged newer checkpoint was partly read into the live tensors and {name} does "
                            f"not hold {len(missing)} of them (e.g. {sorted(missing)[0]!r}) in a shape that "
                            "overwrites them: they hold undefined bytes now; rebuild the objects and restore again")
    filled |= loader.placed()


def local_of(template: Any) -> torch.Tensor | None:
    """The live tensor behind a state-dict value: a DTensor's local shard, a plain tensor itself."""
    if type(template) is torch.Tensor:
        return template
    to_local = getattr(template, "to_local", None)
    if to_local is None:
        return None
    with torch.no_grad():
        return to_local()
