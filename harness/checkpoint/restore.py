"""Restore: choose a checkpoint, read it (or receive it), apply it. Collective.

One flow: rank 0 walks back from the newest committed checkpoint (:func:`select.walk_back`) over one
listing of the folder (sizes included: no HEAD per file), reading commit records only as the walk reaches
them, and broadcasts its :class:`Choice` with the chosen manifest (no other rank reads it again); the ranks
read the chosen one with the :class:`Strategy` it needs and agree on a verdict (:func:`errors.agree`); a
damaged checkpoint sends everyone back to the walk, anything else fails on every rank alike; then every
rank applies what it read to its objects, and they agree again.

Two strategies:

* :class:`Broadcast` (a replicated checkpoint into replicated objects): rank 0 reads and verifies every
  byte while choosing, so damage is found there; the other ranks read only their own per-rank tensors and
  receive the replicated state from rank 0, so N ranks do not download it N times. The replicated tensors
  land straight in the live parameters, buffers and optimizer state (:mod:`direct_read`, one pass with the
  checksums; on the other ranks by the broadcast itself), so ``load_state_dict`` finds its own tensors
  and copies nothing, and restore holds no second copy of the state. When every rank sees the folder as
  the same local folder of the same machine (one node, local disk), the other ranks read it themselves
  after rank 0 chose it, from the page cache rank 0's read filled: still one read of the disk, and a
  memory copy instead of a pass through the process group (gloo moves ~1.3 GB/s on loopback). Elsewhere,
  the other ranks' own state (RNG, data cursor: kilobytes), which rank 0 reads anyway to verify it, is sent
  to each rank with the replicated state (:data:`SHIP_BYTES` at most), so a rank reads nothing from storage
  at all during restore (on S3 that spares each rank a first connection on the restore's critical path).
* :class:`Together` (a sharded checkpoint, or FSDP/ZeRO objects): rank 0 only opens the manifest; every
  rank reads what it needs and its share of verification; damage found by any rank walks all back.
  Sharded targets are read straight into their live tensors where a box is whole stored entries
  (:mod:`sharded_read`, which also refuses an older candidate that would leave some of them half-read).
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from harness import dist, faults
from harness.checkpoint import blobs, codec, direct_io, direct_read, foreign, select, sharded
from harness.checkpoint.apply import RestoreOptions, RestoreResult, apply
from harness.checkpoint.context import Ctx
from harness.checkpoint.destinations import destinations
from harness.checkpoint.discovery import CheckpointInfo, open_checkpoint, read_commits, scan
from harness.checkpoint.errors import Problem, Severity, agree, is_resource_error, problem_of, raise_resource
from harness.checkpoint.format import DTYPES, Manifest, parse_name
from harness.checkpoint.kinds import Targets
from harness.checkpoint.load import decode_state
from harness.checkpoint.sharded_read import Verified
from harness.errors import CheckpointError, NewerFormatError, NoCheckpointError
from harness.storage import redact_url

log = logging.getLogger("harness")

SHIP_BYTES = 4 << 20   # rank 0 sends the other ranks their own state when all of it is this small

__all__ = ["RestoreOptions", "RestoreResult", "restore"]


@dataclass(frozen=True)
class Choice:
    """Rank 0 -> all: the checkpoint to load and how, or why there is none."""

    name: str | None = None
    skipped: tuple[tuple[str, str], ...] = ()   # passed over on this walk, and why
    together: bool = False                      # read by every rank (sharded checkpoint or objects)
    error: str | None = None                    # nothing usable where something had to be
    missing_step: bool = False                  # the error is "nothing valid at the step asked for"
    newer: bool = False                         # the error is a checkpoint of a newer harness's format
    problem: Problem | None = None              # rank 0 failed to choose for a reason that is not the store's
    each_reads: bool = False                    # Broadcast: every rank reads the (shared local) files itself
    shipped: bool = False                       # Broadcast: rank 0 read the ranks' own state and sends it
    # The chosen checkpoint's manifest as rank 0 opened and checked it (raw, files, tensors; a Manifest
    # itself does not pickle): the other ranks need not read commit record and manifest again.
    manifest: tuple[dict, dict, dict] | None = None


@dataclass
class Prefetched:
    """Rank 0: what it read while choosing: the manifest, and for Broadcast every tensor (verified)."""

    manifest: Manifest
    tensors: dict[str, torch.Tensor] | None   # None: Together (only opened; the ranks read it)
    others: dict[int, dict[str, torch.Tensor]] | None = None   # rank 0: each other rank's own tensors


@dataclass
class Loaded:
    """One rank's view of the chosen checkpoint: the replicated state and its own per-rank state."""

    manifest: Manifest
    state: dict
    mine: Any = None


class Strategy(Protocol):
    damage_possible: bool  # whether reading may find damage rank 0 did not rule out while choosing

    def read(self, ctx: Ctx, name: str, manifest: Manifest, prefetched: Prefetched | None,
             targets: Targets) -> Any: ...

    def finish(self, ctx: Ctx, got: Any, targets: Targets) -> Loaded: ...


class Broadcast:
    def __init__(self, each_reads: bool = False, shipped: bool = False) -> None:
        self.each_reads, self.shipped = each_reads, shipped
        # A rank reading the files itself verifies them itself: what it finds may be damage (files changed
        # since rank 0 read them), which sends everyone back to the walk like rank 0's own finding would.
        self.damage_possible = each_reads

    def read(self, ctx: Ctx, name: str, manifest: Manifest, prefetched: Prefetched | None,
             targets: Targets) -> Prefetched:
        if self.shipped:  # collective: rank 0 sends each rank its own state (nothing before it can fail)
            own_tensors = _scatter_own(ctx, prefetched)
            return prefetched if prefetched is not None else Prefetched(manifest, own_tensors)
        if prefetched is not None:
            return prefetched
        own = manifest.raw["ranks"][ctx.rank] if ctx.rank < manifest.world_size else None
        if self.each_reads:  # the replicated state too, straight into the live tensors, as rank 0 did
            entries, dests = _live_plan(manifest, own, targets)
            return Prefetched(manifest, direct_read.read_into(ctx.storage, name, entries, dests,
                                                              threads=ctx.io_threads))
        keys = set(codec.tensor_refs(own))
        entries = [e for e in manifest.tensors.values() if e.key in keys]
        return Prefetched(manifest, blobs.read_tensors(ctx.storage, name, entries, threads=ctx.io_threads))

    def finish(self, ctx: Ctx, got: Prefetched, targets: Targets) -> Loaded:
        tensors = got.tensors if self.each_reads else _share_replicated(ctx, got.manifest, got.tensors, targets)
        mine = [r for r in [ctx.rank] if r < got.manifest.world_size]
        state, per_rank = decode_state(got.manifest, tensors, mine)
        return Loaded(got.manifest, state, per_rank[ctx.rank] if mine else None)


class Together:
    """Sharded checkpoints: every rank reads its own boxes; then (second agreed phase, :meth:`settle`) the
    ranks pool what their reads verified and each checks what is left of its share, so no byte is read
    twice for verification (at another world size a rank's boxes cover chunks another rank wrote)."""

    damage_possible = True

    def __init__(self, filled: set[str]) -> None:
        self.filled = filled  # keys this rank read in place for earlier candidates of the same restore

    def read(self, ctx: Ctx, name: str, manifest: Manifest, prefetched: Prefetched | None,
             targets: Targets) -> sharded.Reading:  # rank 0 only opened it while choosing: it reads its share too
        return sharded.read(ctx.storage, name, manifest, rank=ctx.rank, world=ctx.world_size, targets=targets,
                            threads=ctx.io_threads, filled=self.filled)

    def pool(self, ctx: Ctx, got: sharded.Reading) -> Verified:
        """Collective (every rank, after the reads agreed): what all ranks' reads verified."""
        return Verified.union(dist.all_gather(got.verified(), ctx.group))

    def settle(self, ctx: Ctx, got: sharded.Reading, everyone: Verified) -> Loaded:
        state, mine = got.finish(everyone)
        return Loaded(got.loader.manifest, state, mine)

    def finish(self, ctx: Ctx, got: Loaded, targets: Targets) -> Loaded:
        return got


def restore(ctx: Ctx, targets: Targets, opts: RestoreOptions) -> RestoreResult | None:
    """Load the newest valid checkpoint (or the one at ``opts.step``) into ``targets``; None when there is
    none at all (a first run). Collective."""
    t0 = time.perf_counter()
    sharded_targets = sharded.needs_collective(targets)
    # (Sharded targets are always read Together: no rank needs to know whether the others share the folder.)
    probe = _Probe(ctx, targets, sharded_targets, not sharded_targets and _one_local_folder(ctx))
    filled_together: set[str] = set()
    skipped: list[tuple[str, str]] = []
    while True:
        choice, prefetched = _decide(ctx, opts.step, probe, skipped)
        skipped += choice.skipped
        ctx.damaged |= {n for n, _ in skipped}  # retention keeps them for a human
        if choice.error is not None:
            kind = NoCheckpointError if choice.missing_step else NewerFormatError if choice.newer else CheckpointError
            raise kind(choice.error)
        if choice.name is None:
            ctx.others = foreign.foreign_checkpoints(ctx.storage) if ctx.rank == 0 else None  # torchtitan's...: say so
            other = foreign.hint(ctx.storage, ctx.others or [])
            log.log(logging.WARNING if other else logging.INFO, "no checkpoint in %s to restore%s",
                    redact_url(ctx.storage.url), other)
            return None
        strategy: Strategy = (Together(filled_together) if choice.together
                              else Broadcast(choice.each_reads, choice.shipped))
        manifest = _manifest(choice, prefetched)
        loaded = _read_agreed(ctx, strategy, choice.name, manifest, prefetched, targets)
        if isinstance(loaded, Loaded):
            break
        log.error("checkpoint %s is not usable, trying an older one: %s", choice.name, loaded.why)
        skipped.append((choice.name, loaded.why))
    result = _apply_agreed(ctx, loaded, targets, opts)
    result.skipped = skipped
    log.info("restored %s (step %d, epoch %d) in %.2f s", result.name, result.step, result.epoch,
             time.perf_counter() - t0)
    if opts.step is not None and ctx.rank == 0:
        _warn_newer(ctx, probe.listing or [], result.name)
    return result


def _warn_newer(ctx: Ctx, listing: list[CheckpointInfo], name: str) -> None:
    """A restore of an earlier step with newer committed checkpoints beside it: the next restart that takes
    the newest resumes from those, and retention ranks the checkpoints saved from here below them."""
    chosen = parse_name(name)
    newer = [i.name for i in listing if i.committed and chosen is not None and (i.step, i.attempt) > chosen]
    if newer:
        log.warning("restored %s, but %s %s newer: a restart resumes from %s, not from the checkpoints saved "
                    "from here; to continue from step %d for good, set the newer ones aside first: harness ckpt "
                    "rollback %s --step %d", name, ", ".join(newer[-3:]), "is" if len(newer) == 1 else "are",
                    newer[-1], chosen[0], redact_url(ctx.storage.url), chosen[0])


class _Stranded(Exception):
    """Live tensors hold part of a damaged checkpoint and the next candidate cannot overwrite them all.
    Not a CheckpointError on purpose: the walk back must stop here, not try the next one."""


class _Probe:
    """Rank 0's look at one candidate while choosing (:func:`select.walk_back` calls it).

    A replicated checkpoint into replicated objects is read whole and verified here: the replicated state
    and rank 0's own go straight into the live tensors (one pass, checksummed), the other ranks' RNG and
    data cursors are only checked. A failed read leaves the live tensors it touched holding undefined
    bytes, so ``filled`` remembers them: an older candidate is usable only if it overwrites every one."""

    def __init__(self, ctx: Ctx, targets: Targets, sharded_targets: bool, each_reads: bool = False) -> None:
        self.ctx, self.targets, self.sharded_targets = ctx, targets, sharded_targets
        self.each_reads = each_reads     # rank 0: every rank sees the folder as the same local folder
        self.filled: set[str] = set()   # keys of live tensors a read has written into
        self.listing: list[CheckpointInfo] | None = None   # one listing per restore, walk-backs included

    def candidates(self, step: int | None, passed: set[str]) -> list[CheckpointInfo]:
        """The checkpoint folders (at ``step``) not ``passed`` over yet, newest first, from one listing;
        their commit records are not read yet."""
        if self.listing is None:
            self.listing = scan(self.ctx.storage)
        return [i for i in reversed(self.listing) if (step is None or i.step == step) and i.name not in passed]

    def __call__(self, name: str) -> Prefetched:
        ctx = self.ctx
        listed = next((i for i in self.listing or () if i.name == name), None)
        manifest = open_checkpoint(ctx.storage, name, listed)  # sizes from the listing: no HEADs
        if self.sharded_targets or manifest.raw.get("sharding", "replicated") != "replicated":
            self._must_cover(name, set())
            return Prefetched(manifest, None)
        own = manifest.raw["ranks"][0] if manifest.raw["ranks"] else None  # this rank's RNG and data cursor
        entries, dests = _live_plan(manifest, own, self.targets)
        live = {k for k, d in dests.items() if isinstance(d, torch.Tensor)}
        self._must_cover(name, live)
        self.filled |= live  # before reading: a read that fails part way has written some of them
        tensors = direct_read.read_into(ctx.storage, name, entries, dests, threads=ctx.io_threads)
        mine = {e.key for e in entries}
        rest = [e for e in manifest.tensors.values() if e.key not in mine]  # other ranks' RNG and cursors
        if self.each_reads or ctx.world_size == 1 or sum(e.length for e in rest) > SHIP_BYTES:
            # verified here, read by their own ranks (from the shared page cache, or too large to send)
            direct_read.verify_entries(ctx.storage, name, rest, threads=ctx.io_threads)
            return Prefetched(manifest, tensors)
        got = direct_read.read_into(ctx.storage, name, rest, {}, threads=ctx.io_threads)
        others = {r: {k: got[k] for k in codec.tensor_refs(manifest.raw["ranks"][r])}
                  for r in range(1, manifest.world_size)}
        return Prefetched(manifest, tensors, others)

    def _must_cover(self, name: str, live: set[str]) -> None:
        # (A rank > 0 reading for itself fills the same replicated keys: this check covers its tensors too.)
        missing = self.filled - live
        if missing:
            raise _Stranded(f"a damaged newer checkpoint was partly read into the live tensors and {name} "
                            f"does not hold {len(missing)} of them (e.g. {sorted(missing)[0]!r}): they hold "
                            "undefined bytes now; rebuild the objects and restore again")


def _decide(ctx: Ctx, step: int | None, probe: _Probe,
            passed: list[tuple[str, str]]) -> tuple[Choice, Prefetched | None]:
    """Rank 0 chooses, every rank learns the choice (a failure to choose too, so nobody waits)."""
    choice, prefetched, own = None, None, None
    if ctx.rank == 0:
        try:
            choice, prefetched = _choose(ctx, step, probe, passed)
        except Exception as exc:  # noqa: BLE001 - tell the other ranks instead of leaving them waiting
            own = exc
            problem = problem_of(exc, ctx.rank, damage_possible=False) if is_resource_error(exc) else None
            newer = isinstance(exc, NewerFormatError)  # its own words: a known refusal, not a failure
            choice = Choice(error=str(exc) if newer else f"{type(exc).__name__}: {exc}", problem=problem, newer=newer)
    with _rank0_waiting(ctx):
        choice = dist.broadcast(choice, ctx.group)
    if choice.problem is not None:
        raise_resource(choice.problem, own)
    return choice, prefetched


def _choose(ctx: Ctx, step: int | None, probe: _Probe,
            passed: list[tuple[str, str]]) -> tuple[Choice, Prefetched | None]:
    """Rank 0: the newest checkpoint (at ``step``) not ``passed`` over already that verifies: read whole
    and verified here (Broadcast), or only opened (Together: the ranks verify it reading it)."""
    matching = probe.candidates(step, {n for n, _ in passed})
    # Commit records are read as the walk reaches them: it stops at the first that verifies, so the
    # records of older checkpoints are never read. A failing store raises out of the walk (not damage).
    info, prefetched, skipped = select.walk_back(read_commits(ctx.storage, matching), probe,
                                                 level=logging.ERROR)
    if info is not None:
        m = prefetched.manifest
        return Choice(name=info.name, skipped=tuple(skipped), together=prefetched.tensors is None,
                      manifest=(m.raw, m.files, m.tensors), each_reads=probe.each_reads,
                      shipped=prefetched.others is not None), prefetched
    if step is not None:
        return Choice(skipped=tuple(skipped), missing_step=True,
                      error=f"no valid checkpoint at step {step} in {redact_url(ctx.storage.url)}"), None
    if any(i.committed for i in matching) or passed:  # passed: committed, found damaged by a rank's read
        why = "; ".join(f"{n}: {r}" for n, r in [*passed, *skipped])
        return Choice(skipped=tuple(skipped),
                      error=f"no valid checkpoint: every committed checkpoint failed verification ({why})"), None
    return Choice(skipped=tuple(skipped)), None


def _manifest(choice: Choice, prefetched: Prefetched | None) -> Manifest:
    """The chosen checkpoint's manifest: rank 0 opened it while choosing, the others received it."""
    if prefetched is not None:
        return prefetched.manifest
    assert choice.manifest is not None, "rank 0 names a checkpoint with its manifest"
    raw, files, tensors = choice.manifest
    return Manifest(raw=raw, files=files, tensors=tensors)


def _read_agreed(ctx: Ctx, strategy: Strategy, name: str, manifest: Manifest, prefetched: Prefetched | None,
                 targets: Targets) -> Loaded | Problem:
    """Every rank reads its part; all agree. A DAMAGED verdict is returned (walk back); a resource failure
    is re-raised with its type on every rank; any other failure is a CheckpointError on every rank."""
    def first() -> Any:
        faults.point("restore.read", name=name, rank=ctx.rank)
        return strategy.read(ctx, name, manifest, prefetched, targets)

    got, damaged = _agreed(ctx, name, strategy.damage_possible, first)
    if damaged is None and isinstance(strategy, Together):  # the same on every rank: all are here
        everyone = strategy.pool(ctx, got)
        got, damaged = _agreed(ctx, name, True, lambda: strategy.settle(ctx, got, everyone))
    return damaged if damaged is not None else strategy.finish(ctx, got, targets)


def _agreed(ctx: Ctx, name: str, damage_possible: bool, step: Any) -> tuple[Any, Problem | None]:
    """Run ``step`` on every rank and agree on the outcome: (its result, None) when all succeeded, (None, the
    DAMAGED verdict) to walk back; a resource failure is re-raised with its type on every rank, any other
    failure is a CheckpointError on every rank."""
    got, problem, own = None, None, None
    try:
        got = step()
    except Exception as exc:  # noqa: BLE001 - every rank must learn that one failed, or others hang later
        own, problem = exc, problem_of(exc, ctx.rank, damage_possible=damage_possible)
        log.error("rank %d could not load %s: %s", ctx.rank, name, problem.why)
    verdict = agree(problem, ctx.group)
    if verdict is None:
        return got, None
    if verdict.severity is Severity.DAMAGED:
        return None, verdict
    if verdict.severity is Severity.RESOURCE:
        raise_resource(verdict, own)
    raise CheckpointError(f"restore of {name} failed: {verdict.why}") from own


def _apply_agreed(ctx: Ctx, loaded: Loaded, targets: Targets, opts: RestoreOptions) -> RestoreResult:
    """Every rank applies; all agree, so a failure on one rank is a failure on all (none goes on to train
    alone). A rank's own error is raised as it is; a resource failure anywhere keeps its type everywhere."""
    result, problem, own = None, None, None
    try:
        result = apply(loaded.manifest, loaded.state, loaded.mine, targets, opts, ctx.rank)
    except Exception as exc:  # noqa: BLE001 - reported to the other ranks, then raised
        own, problem = exc, problem_of(exc, ctx.rank, damage_possible=False)
    verdict = agree(problem, ctx.group)
    if verdict is None:
        return result
    if verdict.severity is Severity.RESOURCE:
        raise_resource(verdict, own)
    if own is not None:
        raise own
    raise CheckpointError(f"restore of {loaded.manifest.raw['name']} failed on another rank: {verdict.why}")


def _live_plan(manifest: Manifest, own: Any, targets: Targets) -> tuple[list, dict]:
    """The entries of the replicated state and of one rank's own (``own``: its part of the manifest), and
    where each lands: the live parameter, buffer or optimizer tensor where one exists (read in place)."""
    keys = set(codec.tensor_refs(manifest.raw["state"])) | set(codec.tensor_refs(own))
    entries = [e for e in manifest.tensors.values() if e.key in keys]
    return entries, destinations(entries, targets.models, targets.optimizers)


def _scatter_own(ctx: Ctx, prefetched: Prefetched | None) -> dict:
    """Each rank's own tensors as rank 0 read them (a rank the checkpoint has no state for gets none)."""
    objs = None
    if ctx.rank == 0:
        others = prefetched.others if prefetched is not None and prefetched.others is not None else {}
        objs = [{}] + [others.get(r, {}) for r in range(1, ctx.world_size)]
    return dist.scatter(objs, ctx.group)


def _rank0_waiting(ctx: Ctx) -> Any:
    """Around restore's first collectives: rank 0 waits there only for ranks that never called restore
    (`if rank == 0:`), so it warns; the others may be waiting for rank 0's verification of a large
    checkpoint, so they do not."""
    return dist.late_peers_warning("CheckpointManager.restore()", ctx.timeout_s) if ctx.rank == 0 else nullcontext()


def _one_local_folder(ctx: Ctx) -> bool:
    """On rank 0: whether every rank sees the checkpoint folder as the same folder of the same running
    machine (boot id, device and inode agree), so any rank can read what rank 0 reads, from the same page
    cache. Collective (one gather) when the storage is local and there are several ranks; False elsewhere."""
    if ctx.world_size == 1 or not direct_io.is_local(ctx.storage):
        return False
    with _rank0_waiting(ctx):
        ids = dist.gather(_folder_identity(ctx.storage), ctx.group)
    return bool(ids) and ids[0] is not None and all(i == ids[0] for i in ids)


def _folder_identity(storage: Any) -> tuple | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        st = os.stat(storage.local_path())
    except (OSError, TypeError):  # not Linux, or no folder yet (then there is nothing to restore either)
        return None
    return boot, st.st_dev, st.st_ino


def _share_replicated(ctx: Ctx, manifest: Manifest, tensors: dict, targets: Targets) -> dict:
    """Broadcast the replicated tensors from rank 0 (read once, checksums verified there), straight into
    the live tensors where they can take the bytes as sent. Collective. The group is gloo: CUDA tensors
    travel through a CPU tensor, one at a time (bounded memory)."""
    if ctx.world_size == 1:
        return tensors
    keys = sorted(set(codec.tensor_refs(manifest.raw["state"])))
    dests = {} if ctx.rank == 0 else destinations([manifest.tensors[k] for k in keys], targets.models,
                                                  targets.optimizers)
    for key in keys:
        e = manifest.tensors[key]
        dtype = DTYPES[e.dtype]
        if ctx.rank == 0:
            final = tensors[key]
            wire = final if _receivable(final, dtype) else final.detach().to("cpu", dtype).contiguous()
        else:
            final = dests.get(key, torch.device("cpu"))
            wire = final if _receivable(final, dtype) else torch.empty(e.shape, dtype=dtype)
        if wire.numel():  # as raw bytes: gloo has no collective for every dtype (bool, complex, float8)
            torch.distributed.broadcast(wire.detach().reshape(-1).view(torch.uint8), src=0, group=ctx.group)
        if ctx.rank != 0:
            tensors[key] = _land(wire, final)
    return tensors


def _receivable(t: Any, dtype: torch.dtype) -> bool:
    """Whether the broadcast can write into (or send from) ``t`` itself: a contiguous CPU tensor of ``dtype``."""
    return (type(t) is torch.Tensor and t.device.type == "cpu" and t.dtype == dtype and t.is_contiguous()
            and not t.is_conj() and not t.is_neg())


def _land(wire: torch.Tensor, final: torch.Tensor | torch.device) -> torch.Tensor:
    """What was received, in its final place: the live tensor (copied in unless received there), or a new
    tensor on the device the state belongs on."""
    if isinstance(final, torch.Tensor):
        if final is not wire:
            with torch.no_grad():
                final.copy_(wire)
        return final
    return wire if final.type == "cpu" else wire.to(final)
