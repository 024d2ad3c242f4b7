"""Save: capture the state, encode it, write each rank's part, commit once every rank reports.

The ranks tell each other typed records, never strings to parse: rank 0's :class:`NameDecision` (the
folder to write, or why none), each rank's :class:`Fragment` (what it wrote, or why it failed) and rank 0's
:class:`CommitOutcome`. A checkpoint exists once its commit record is written, last, by rank 0; anything
that fails before leaves an uncommitted folder that no reader trusts.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import math
import platform
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

import torch

from harness import dist, faults
from harness._version import __version__
from harness.checkpoint import blobs, codec, retention, shared, sharded, stepwrite
from harness.checkpoint.background import YieldingPool
from harness.checkpoint.context import Ctx
from harness.checkpoint.format import (CHECKSUM_ALGORITHM, COMMIT_FILE, FORMAT, FORMAT_VERSION, MANIFEST_FILE,
                                       TensorEntry, dumps, make_commit, parse_name)
from harness.checkpoint.kinds import MODELS, OPTIMIZERS, Targets, step_mutated, storage_key
from harness.checkpoint.load import class_name
from harness.checkpoint.snapshot import Snapshot
from harness.checkpoint.staging import Staging
from harness.errors import CheckpointError, is_storage_unavailable, storage_failure
from harness.layout import free_name
from harness.state import capture_rng, models_cuda_device

log = logging.getLogger("harness")

Tensors = dict[str, "torch.Tensor | codec.Shard"]

# A background save still writing this far (a fraction of the time since the previous save) into the interval
# to the next one goes on at normal priority: it must be done before the next save waits for it. Early, as
# the worst case is a machine with no idle CPU at all: the writing then competes with training as it did
# before there were idle-priority writers, and needs most of the interval (measured: a 0.5 deadline left
# 635 MB unfinished at the next save, 5 steps later, on the loaded 2-core machine).
HURRY_AFTER = 0.25


@dataclass(frozen=True)
class SaveSettings:
    max_file_bytes: int
    shard_chunk_bytes: int
    split_replicated: bool       # ranks share the writes of replicated state (greedy by size)
    policy: retention.RetentionPolicy
    # CPU priority of a background save's writers (checksums, writes, fsync): "idle" yields every core
    # training wants, "normal" competes with it. Either way a save that is waited on finishes at the
    # waiter's priority (see harness.checkpoint.background).
    writer_priority: str = "idle"


@dataclass
class Captured:
    """One rank's part of one save, encoded: the trees it reports and the tensors it writes."""

    meta: dict                   # step, epoch, loss, metrics, metadata, model classes, sharding kind
    rep_tree: Any                # the replicated state tree (rank 0; None elsewhere)
    rank_tree: Any               # this rank's own state: RNG, data position, rank_state
    zero_trees: dict[str, Any]   # this rank's ZeRO optimizer state, by optimizer name
    tensors: Tensors             # what this rank writes
    t0: float

    @property
    def step(self) -> int:
        return self.meta["step"]


@dataclass(frozen=True)
class NameDecision:
    """Rank 0 -> all: the never-used folder to write, or why no save was started."""

    name: str | None = None
    error: str | None = None
    unavailable: bool = False    # the error is the storage out of retries (retryable), not a refusal


@dataclass(frozen=True)
class Fragment:
    """Each rank -> rank 0: what it wrote (data files, tensor entries, its own state tree), or why not."""

    rank: int
    error: str | None = None
    unavailable: bool = False
    files: dict[str, dict] = field(default_factory=dict)
    entries: list[TensorEntry] = field(default_factory=list)
    tree: Any = None
    zero: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CommitOutcome:
    """Rank 0 -> all: committed (and how many bytes), or why not."""

    error: str | None = None
    bytes: int = 0
    unavailable: bool = False


def capture(targets: Targets, step: int, *, epoch: int, position: Any, loss: float | None, metrics: dict | None,
            metadata: dict | None, rank_state: Any, ctx: Ctx, split: bool, t0: float) -> Captured:
    """Encode what this rank saves. Only ranks that write replicated state (or must join a sharded capture)
    capture the replicated state; every rank its own (RNG, data position, rank_state, ZeRO state)."""
    meta = {"step": int(step), "epoch": int(epoch),
            "loss": codec.plain(None if loss is None else float(loss), "loss"),
            "metrics": codec.plain(dict(metrics or {}), "metrics"),
            "metadata": codec.plain(dict(metadata or {}), "metadata"),
            "model_classes": {n: class_name(m) for n, m in targets.of(MODELS).items()
                              if isinstance(m, torch.nn.Module)},
            "optimizer_classes": {n: class_name(o) for n, o in targets.of(OPTIMIZERS).items()
                                  if isinstance(o, torch.optim.Optimizer)}}  # not an import's bare state holder
    enc, own = codec.Encoder(), codec.Encoder()  # replicated tensors; tensors only this rank holds
    rep_tree, zero_trees = None, {}
    if ctx.rank == 0 or sharded.needs_collective(targets) or (split and ctx.world_size > 1):
        state, zero_parts, meta["sharding"] = sharded.capture(targets)
        tree = enc.encode(state, "state")
        rep_tree = tree if ctx.rank == 0 else None
        zero_trees = {n: own.encode(st, f"state/optimizers/{n}/state") for n, st in zero_parts.items()}
    rng = capture_rng(models_cuda_device(targets.models))
    rank_tree = own.encode({"rng": rng, "position": position, "rank_state": rank_state},
                           f"ranks/{ctx.rank}")
    return Captured(meta, rep_tree, rank_tree, zero_trees, my_writes(enc.tensors, own.tensors, ctx, split), t0)


def my_writes(replicated: Tensors, own: Tensors, ctx: Ctx, split: bool) -> Tensors:
    """The tensors this rank writes: its own (per-rank state, its ZeRO state), its DTensor shards, and its
    share of the replicated ones (all of them on rank 0 unless split)."""
    out: Tensors = {}
    whole = {}
    for k, t in replicated.items():
        if isinstance(t, codec.Shard):
            empty_global = math.prod(t.global_shape) == 0
            if t.owner and (t.numel() > 0 or (empty_global and ctx.rank == 0)):
                out[k] = t
        else:
            whole[k] = t
    if split and ctx.world_size > 1:
        writers = sharded.assign_writers({k: sharded.nbytes(t) for k, t in whole.items()}, ctx.world_size)
        out.update({k: t for k, t in whole.items() if writers[k] == ctx.rank})
    elif ctx.rank == 0:
        out.update(whole)
    out.update(own)
    return out


class Saver:
    """Saves of one CheckpointManager: capture on the caller's thread, then persist (inline, or on a background
    thread with ``async_save`` after a host snapshot, or with ``overlap`` after scheduling it: see
    :mod:`~harness.checkpoint.staging`). At most one save in flight. A background save's data files are
    written by low-priority threads until somebody waits for it (:mod:`~harness.checkpoint.background`)."""

    def __init__(self, ctx: Ctx, settings: SaveSettings, async_save: bool) -> None:
        self.ctx, self.settings = ctx, settings
        self.pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="harness-ckpt") if async_save else None
        self.writer = YieldingPool(ctx.io_threads, settings.writer_priority) if async_save else None
        self.pending: cf.Future | None = None
        self.urgent: threading.Event | None = None  # set once the save in flight is waited on
        self._last_save = time.monotonic()  # of the previous save() call, or of the start (the first interval)
        self.staging: Staging | None = None  # an overlapped snapshot before its wait point
        self.snapshot = Snapshot()
        self.last_saved: str | None = None
        self.guard: Callable[[], str | None] | None = None  # rank 0: why no save may start now (set_write_guard)

    def save(self, targets: Targets, step: int, *, overlap: bool = False, **summary: Any) -> None:
        self.wait()  # at most one save in flight; a failure of the previous one surfaces here
        t0 = time.perf_counter()
        captured = capture(targets, step, ctx=self.ctx, split=self.settings.split_replicated, t0=t0, **summary)
        starts = blobs.file_starts(captured.tensors, self.settings.max_file_bytes)  # laid out to write uncopied
        if self.pool is None:  # synchronous: committed on return, nothing to overlap
            captured.tensors = self.snapshot.take(captured.tensors, copy_all=False, file_starts=starts)
            self.persist(captured)
            return
        staging = None
        if overlap:  # the copy of what only the optimizer step changes overlaps the next forward and backward
            late = step_mutated(targets)
            captured.tensors, staging = self.snapshot.stage(captured.tensors, lambda t: storage_key(t) in late, starts)
        else:
            # Device tensors are copied to host memory here, on the caller's thread (its streams), into a
            # buffer reused from save to save: the writers then touch only host memory, and training may
            # change the parameters as soon as save() returns.
            captured.tensors = self.snapshot.take(captured.tensors, copy_all=True, file_starts=starts)
        log.info("checkpoint step %d: snapshot %s in %.3f s (%s), persisting in background", step,
                 "scheduled" if overlap else "taken", time.perf_counter() - t0, self.snapshot.describe())
        self.staging, self.urgent = staging, threading.Event()
        now = time.monotonic()
        deadline, self._last_save = now + HURRY_AFTER * (now - self._last_save), now
        self.pending = self.pool.submit(self.persist, captured, staging, self.urgent, deadline)

    def before_mutation(self) -> None:
        """The caller is about to change the saved tensors: order that after an overlapped snapshot's copies."""
        staging, self.staging = self.staging, None
        if staging is not None:
            staging.before_mutation()

    def wait(self) -> None:
        self.before_mutation()  # the caller changes nothing while it waits: the snapshot may commit
        pending, self.pending = self.pending, None
        if pending is not None:
            if not pending.done():  # somebody waits now: the rest of the writing leaves low priority
                self.urgent.set()
                self.writer.poke()
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True)
                self.pool = None
            if self.writer is not None:
                self.writer.close()
                self.writer = None
            self.snapshot.release()

    # -- persist (collective) -------------------------------------------------------------------------

    def persist(self, c: Captured, staging: Staging | None = None, urgent: threading.Event | None = None,
                deadline: float | None = None) -> str:
        """Write and commit ``c``. ``urgent`` (background saves): the data files go to the low-priority
        writers until it is set, or until ``deadline`` (``time.monotonic()``)."""
        ctx = self.ctx
        if staging is not None:  # this thread is the copy thread (normal priority): copy first, then write
            staging.copy()
        with dist.late_peers_warning(f"CheckpointManager.save(step={c.step})", ctx.timeout_s):
            decision = dist.broadcast(self._free_name(c.step) if ctx.rank == 0 else None, ctx.group)
        if decision.error is not None:  # rank 0 could not even list the folder: nobody writes
            raise storage_failure(f"checkpoint at step {c.step} was not started: {decision.error}",
                                  decision.unavailable)
        name = decision.name
        frags = dist.gather(self._write(name, c, staging, urgent, deadline), ctx.group)
        outcome = self._commit(name, c, frags) if ctx.rank == 0 else None
        outcome = dist.broadcast(outcome, ctx.group)
        if outcome.error is not None:
            raise storage_failure(f"checkpoint at step {c.step} was not committed: {outcome.error}",
                                  outcome.unavailable)
        self.last_saved = name
        if ctx.rank == 0:
            log.info("checkpoint %s committed: %.1f MB in %.2f s (%s)", name, outcome.bytes / 1e6,
                     time.perf_counter() - c.t0, self.snapshot.describe())
        return name

    def _free_name(self, step: int) -> NameDecision:
        """Rank 0: a folder name never used before (a checkpoint is never overwritten in place), or why not."""
        refused = self.guard() if self.guard is not None else None
        if refused:
            return NameDecision(error=refused)
        try:
            taken = {n for n in self.ctx.storage.listdir() if parse_name(n)}
        except Exception as exc:  # noqa: BLE001 - the other ranks wait on this broadcast
            return NameDecision(error=f"{type(exc).__name__}: {exc}", unavailable=is_storage_unavailable(exc))
        return NameDecision(name=free_name(step, taken))

    def _write(self, name: str, c: Captured, staging: Staging | None = None,
               urgent: threading.Event | None = None, deadline: float | None = None) -> Fragment:
        ctx, s = self.ctx, self.settings
        try:
            if staging is not None and staging.error is not None:  # a change seen already: write nothing
                staging.settle()
            ctx.storage.makedirs(name)
            if urgent is not None and self.writer is not None:
                files, entries = stepwrite.write_tensors(ctx.storage, name, c.tensors, rank=ctx.rank, step=c.step,
                                                         max_file_bytes=s.max_file_bytes,
                                                         chunk_bytes=s.shard_chunk_bytes, pool=self.writer,
                                                         urgent=urgent, deadline=deadline)
            else:
                files, entries = blobs.write_tensors(ctx.storage, name, c.tensors, rank=ctx.rank, step=c.step,
                                                     max_file_bytes=s.max_file_bytes, threads=ctx.io_threads,
                                                     chunk_bytes=s.shard_chunk_bytes)
            ctx.storage.sync_dir(name)
            if staging is not None:  # the data is written; it is reported (and committed) only past the wait point
                staging.settle()
            return Fragment(rank=ctx.rank, files=files, entries=entries, tree=c.rank_tree, zero=c.zero_trees)
        except Exception as exc:  # noqa: BLE001 - reported to rank 0, which then does not commit
            log.error("checkpoint %s: rank %d failed to write: %s: %s", name, ctx.rank, type(exc).__name__, exc)
            return Fragment(rank=ctx.rank, error=f"rank {ctx.rank}: {type(exc).__name__}: {exc}",
                            unavailable=is_storage_unavailable(exc))

    def _commit(self, name: str, c: Captured, frags: list[Fragment]) -> CommitOutcome:
        """Rank 0: manifest, then the commit record, last; then retention. Never raises: the other ranks wait."""
        failed = [f for f in frags if f.error is not None]
        if failed:  # retryable only if every rank's failure is (a full disk anywhere is not)
            return CommitOutcome(error="; ".join(f.error for f in failed),
                                 unavailable=all(f.unavailable for f in failed))
        storage = self.ctx.storage
        try:
            unseen = shared.unseen(storage, name, frags)  # another rank's files landed elsewhere: not whole
            if unseen:
                log.error("checkpoint %s: %s", name, unseen)
                return CommitOutcome(error=unseen)
            manifest = build_manifest(name, c, frags)
            raw = dumps(manifest)
            faults.point("save.before_manifest", step=c.step)
            storage.write_bytes(f"{name}/{MANIFEST_FILE}", raw)
            storage.sync_dir(name)
            faults.point("save.after_manifest", step=c.step)
            commit = make_commit(manifest, raw)
            faults.point("save.before_commit", step=c.step)
            self._write_commit(name, commit)
        except Exception as exc:  # noqa: BLE001 - an uncommitted checkpoint does not exist; say why
            log.error("checkpoint %s: commit failed: %s: %s", name, type(exc).__name__, exc)
            return CommitOutcome(error=f"commit: {type(exc).__name__}: {exc}",
                                 unavailable=is_storage_unavailable(exc))
        try:
            faults.point("save.after_commit", step=c.step)
        except Exception as exc:  # noqa: BLE001 - the record is written: the checkpoint exists, say so
            log.warning("checkpoint %s is committed, but a step after writing its commit record failed: %s: %s",
                        name, type(exc).__name__, exc)
        try:  # the checkpoint is committed: a retention failure must not fail the save (or hang the others)
            retention.apply(storage, self.settings.policy, protect={name}, damaged=self.ctx.damaged,
                            cache=self.ctx.commits)
        except Exception as exc:  # noqa: BLE001
            log.warning("retention after %s failed: %s: %s", name, type(exc).__name__, exc)
        return CommitOutcome(bytes=sum(f["size"] for f in manifest["files"].values()))

    def _write_commit(self, name: str, commit: bytes) -> None:
        """Write the commit record. If the write reports an error but the record is there, whole (the folder
        fsync after the rename failed, an S3 PUT landed but its reply was lost), the checkpoint IS committed:
        readers will use it, so the save must not be reported as failed."""
        storage, rel = self.ctx.storage, f"{name}/{COMMIT_FILE}"
        try:
            storage.commit_bytes(rel, commit)
        except Exception as exc:
            try:
                landed = storage.size(rel) == len(commit) and storage.read_bytes(rel) == commit
            except Exception:  # noqa: BLE001 - cannot tell: report the original failure
                landed = False
            if not landed:
                raise
            log.warning("checkpoint %s: writing the commit record reported %s: %s, but the record is in place: "
                        "committed", name, type(exc).__name__, exc)


def build_manifest(name: str, c: Captured, frags: list[Fragment]) -> dict:
    """The manifest of checkpoint ``name`` from rank 0's trees and every rank's fragment."""
    now = time.time()
    rep_tree = c.rep_tree
    for n in frags[0].zero:  # ZeRO: each rank's optimizer state, by global parameter index
        sharded.merge_zero(rep_tree, n, [f.zero.get(n) for f in frags])
    written = {e.key for f in frags for e in f.entries}
    missing = [k for tree in [rep_tree, *(f.tree for f in frags)] for k in codec.tensor_refs(tree)
               if k not in written]
    if missing:  # ranks disagreed about the replicated state (e.g. a rank-dependent key): refuse to commit
        raise CheckpointError(f"no rank wrote tensors {missing[:3]} (the ranks' replicated state differs?)")
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "name": name,
        "harness_version": __version__, "torch_version": torch.__version__,
        "python_version": platform.python_version(), "checksum_algorithm": CHECKSUM_ALGORITHM,
        "created": datetime.fromtimestamp(now, timezone.utc).isoformat(), "created_unix": now,
        "world_size": len(frags), "sharding": "replicated", **c.meta,
        "files": {n: info for f in frags for n, info in f.files.items()},
        "tensors": [e.to_json() for f in frags for e in f.entries],
        "state": rep_tree,
        "ranks": [f.tree for f in frags],
    }
