"""Reading a sharded checkpoint's tensors for one rank (:func:`harness.checkpoint.sharded.load`).

The :class:`Loader` collects the boxes of global tensors a rank needs. A box may come with the live tensor it
ends up in (``want(..., into=)``: a parameter, buffer or optimizer-state tensor, or an FSDP2 DTensor's local
shard). When the box is exactly covered by whole stored entries and that tensor is a contiguous CPU tensor of
the saved dtype and the box's shape, the entries are read straight into it (:func:`direct_read.read_into`,
checksummed on the same pass), so applying the state later copies a tensor onto itself and restore holds no
second copy of the rank's state. Anything else (row ranges for another world size, another dtype or device)
is read into new tensors through :mod:`blobs`, as before.

A read that fails part way leaves the live tensors it touched holding undefined bytes. The rule that keeps
that from going unnoticed while restore walks back to an older checkpoint (:func:`guard`): every key read in
place remembers that; an older candidate must give each of them a live destination again (ask for the same
key, into a tensor of that shape: it is then read in place again, or written whole when the state is
applied), otherwise restore stops with :class:`StrandedError` instead of keeping half-read tensors. (A
damaged checkpoint with no older committed one left is restore's "every committed checkpoint failed
verification" error, never a fresh start.)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from harness.checkpoint import blobs, direct_read
from harness.checkpoint.format import DTYPES, Manifest, TensorEntry
from harness.errors import CheckpointError
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


class Loader:
    """Collects the boxes of global tensors one rank needs, reads them (grouped by file, verified) and returns
    them; straight into their live tensors where :func:`_fits` allows."""

    def __init__(self, storage: Storage, name: str, manifest: Manifest, threads: int) -> None:
        self.storage, self.name, self.manifest, self.threads = storage, name, manifest, threads
        self.requests: list[_Request] = []
        self.read_whole: set[str] = set()   # idents of entries read whole and verified (by either path)

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
            r.in_place = []
            if r.into is None or not _fits(r, DTYPES[self.manifest.entries(r.key)[0].dtype]):
                continue
            idents = [e.ident for e, _, _, _ in r.reqs]
            if used.isdisjoint(idents) and len(set(idents)) == len(idents):
                used.update(idents)
                r.in_place = [(e, r.into[dst]) for e, _, dst, _ in r.reqs]
                if not r.reqs:
                    r.in_place = [(None, r.into)]  # an empty box: nothing to read, the live tensor is it

    def destined(self) -> set[str]:
        """Keys given a live destination of the box's shape (read in place, or written whole by apply)."""
        return {r.key for r in self.requests if r.into is not None}

    def placed(self) -> set[str]:
        """Keys :meth:`plan` chose to read in place."""
        return {r.key for r in self.requests if r.in_place}

    def run(self) -> list[torch.Tensor]:
        """Read every request; returns its tensor by ticket (the live tensor itself for a request read in place)."""
        inner = [(e, view) for r in self.requests for e, view in r.in_place if e is not None]
        if inner:  # entries as whole tensors of their own: each fills its view of the live tensor
            flat = [dataclasses.replace(e, key=e.ident, global_shape=None, global_offset=None, chunk_rows=None,
                                        chunk_checksums=None) for e, _ in inner]
            direct_read.read_into(self.storage, self.name, flat, {f.key: v for f, (_, v) in zip(flat, inner)},
                                  threads=self.threads)
            self.read_whole |= {e.ident for e, _ in inner}
        whole = {e.ident: e for r in self.requests if not r.in_place for e, rows, _, _ in r.reqs if rows is None}
        data = blobs.read_tensors(self.storage, self.name, list(whole.values()), threads=self.threads,
                                  assemble=False)
        self.read_whole |= set(whole)
        return [r.into if r.in_place else self._assemble(r, data) for r in self.requests]

    def _assemble(self, r: _Request, data: dict[str, torch.Tensor]) -> torch.Tensor:
        reqs = r.reqs
        if len(reqs) == 1 and reqs[0][1] is None and tuple(reqs[0][0].shape) == tuple(r.shape):
            return data[reqs[0][0].ident]  # the box is exactly one stored entry: no copy
        t = torch.empty(r.shape, dtype=DTYPES[self.manifest.entries(r.key)[0].dtype])
        for e, rows, dst, src in reqs:
            piece = data[e.ident] if rows is None else blobs.read_rows(self.storage, self.name, e, *rows)
            t[dst] = piece[src]
        return t

    def verify_rest(self, rank: int, world: int) -> None:
        """Check the entries that this rank's share of verification covers (written by a rank r with
        r % world == rank) and that were not read whole already: every byte of the checkpoint is verified
        by some rank. Read through a bounded scratch buffer, kept nowhere."""
        rest = [e for e in self.manifest.tensors.values() if e.rank % world == rank and e.ident not in self.read_whole]
        direct_read.verify_entries(self.storage, self.name, rest, threads=self.threads)


def _fits(r: _Request, dtype: torch.dtype) -> bool:
    """Whether request ``r`` can be read straight into ``r.into``: a contiguous CPU tensor of the saved dtype
    and the box's shape, the box covered exactly by whole stored entries (no row ranges, nothing sliced)."""
    t = r.into
    if not (type(t) is torch.Tensor and t.device.type == "cpu" and t.dtype == dtype and t.is_contiguous()
            and not t.is_conj() and not t.is_neg() and tuple(t.shape) == r.shape):
        return False
    for e, rows, _, src in r.reqs:
        if rows is not None or any((s.start, s.stop) != (0, n) for s, n in zip(src, e.shape)):
            return False
    return sum(math.prod(e.shape) for e, _, _, _ in r.reqs) == math.prod(r.shape)


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
