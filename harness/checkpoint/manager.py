"""CheckpointManager: collective save/restore of complete training state, usable from any loop."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import math
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterator, Mapping

import torch

import harness
from harness import dist, faults
from harness.checkpoint import blobs, codec, retention, sharded
from harness.checkpoint.discovery import list_checkpoints, open_checkpoint
from harness.checkpoint.format import (CHECKSUM_ALGORITHM, COMMIT_FILE, DTYPES, FORMAT, FORMAT_VERSION, MANIFEST_FILE,
                                       ckpt_name, dumps, make_commit, parse_name)
from harness.checkpoint.load import LoadReport, class_name, decode_state, load_model_state
from harness.errors import (CheckpointCorruptError, CheckpointError, CheckpointFormatError, NoCheckpointError,
                            StorageError)
from harness.state import Stateful, capture_rng, restore_rng, unwrap_model
from harness.storage import Storage, redact_url

log = logging.getLogger("harness")

Named = Any  # one object, or a mapping name -> object


def _named(objs: Named, default: str) -> dict[str, Any]:
    if objs is None:
        return {}
    if isinstance(objs, Mapping):
        return dict(objs)
    return {default: objs}


@dataclass
class RestoreResult:
    """What restore found and applied; the loop continues from ``step``."""

    name: str
    step: int
    epoch: int
    position: Any                     # this rank's data cursor as saved (None for a rank the saving job lacked)
    loss: float | None
    metrics: dict
    metadata: dict
    extra: dict                       # saved extras that were not given as Stateful objects
    rank_state: Any                   # this rank's rank_state as saved
    world_size: int                   # world size at save time
    skipped: list[tuple[str, str]] = field(default_factory=list)  # newer checkpoints skipped, and why
    load_report: dict[str, LoadReport] = field(default_factory=dict)


class CheckpointManager:
    """Saves and restores checkpoints under one folder or URL.

    Collective under torch.distributed: every rank constructs it and calls save/restore/wait/close at the
    same points. Rank 0 writes replicated state and commits; each rank writes its own RNG and data
    cursor. With ``async_save`` the call returns after a host copy and persisting runs in the background.
    """

    def __init__(self, dir: str, *, keep_last: int = 3, keep_best: int = 0, best_metric: str = "loss",
                 best_mode: str = "min", async_save: bool = False, storage_options: dict | None = None,
                 max_file_bytes: int = 256 << 20, io_threads: int = 4, timeout_s: float = 600.0,
                 split_replicated: bool = False, shard_chunk_bytes: int = blobs.CHUNK_BYTES,
                 read_only: bool = False) -> None:
        self.storage = Storage(dir, storage_options)
        self.split_replicated = split_replicated  # ranks share the writes of replicated state (greedy by size)
        self.shard_chunk_bytes = shard_chunk_bytes
        self.policy = retention.RetentionPolicy(keep_last, keep_best, best_metric, best_mode)
        self.async_save = async_save
        self.max_file_bytes = max_file_bytes
        self.io_threads = io_threads
        self.rank, self.world_size = dist.rank(), dist.world_size()
        self._group = dist.new_cpu_group(timeout_s)
        self._check_storage(write=not read_only)
        self._pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="harness-ckpt") if async_save else None
        self._pending: cf.Future | None = None
        self._buffers: dict[str, torch.Tensor] = {}  # reused host snapshot buffers (async saves)
        self._damaged: set[str] = set()
        self.last_saved: str | None = None

    def _check_storage(self, write: bool) -> None:
        """Fail fast: an unwritable folder, a missing bucket, rejected credentials or a missing permission is a
        one-line StorageError on every rank now, not at the first save. Rank 0 checks; all ranks raise."""
        problem = None
        if self.rank == 0:
            try:
                self.storage.check_access(write=write)
            except StorageError as exc:
                problem = str(exc)
        problem = dist.broadcast(problem, self._group)
        if problem:
            raise StorageError(problem)

    # -- save -----------------------------------------------------------------------------------------

    def save(self, step: int, *, models: Named = None, optimizers: Named = None, schedulers: Named = None,
             scaler: Any = None, epoch: int = 0, position: Any = None, loss: float | None = None,
             metrics: dict | None = None, extra: Mapping[str, Any] | None = None, rank_state: Any = None,
             metadata: dict | None = None) -> None:
        """Checkpoint the given state as of ``step``. Collective. ``position`` and ``rank_state`` are this
        rank's own (data cursor, anything per rank); everything else is replicated and written once (by rank
        0, or split across ranks with ``split_replicated``), except sharded state: a ZeroRedundancyOptimizer in
        ``optimizers`` (each rank writes the state of the parameters it owns) and DTensor (FSDP2) models and
        their optimizers (each rank writes its local shards)."""
        self.wait()  # at most one save in flight; a failure of the previous one surfaces here
        t0 = time.perf_counter()
        models_d = _named(models, "model")
        meta = {"step": int(step), "epoch": int(epoch), "loss": _plain(None if loss is None else float(loss), "loss"),
                "metrics": _plain(dict(metrics or {}), "metrics"), "metadata": _plain(dict(metadata or {}), "metadata"),
                "model_classes": {n: class_name(m) for n, m in models_d.items() if isinstance(m, torch.nn.Module)}}
        opts_d = _named(optimizers, "optimizer")
        special = sharded.needs_collective(models_d, opts_d)
        enc, own = codec.Encoder(), codec.Encoder()  # replicated tensors; tensors only this rank holds
        rep_tree, zero_trees = None, {}
        if self.rank == 0 or special or (self.split_replicated and self.world_size > 1):
            state, zero_parts, meta["sharding"] = sharded.capture(
                models_d, opts_d, _named(schedulers, "scheduler"), scaler, extra)
            tree = enc.encode(state, "state")
            rep_tree = tree if self.rank == 0 else None
            zero_trees = {n: own.encode(st, f"state/optimizers/{n}/state") for n, st in zero_parts.items()}
        rank_tree = own.encode({"rng": capture_rng(), "position": position, "rank_state": rank_state},
                               f"ranks/{self.rank}")
        tensors = self._my_writes(enc.tensors, own.tensors)
        if self._pool is None:
            self._persist(meta, rep_tree, rank_tree, tensors, t0, zero_trees)
            return
        # Snapshot: the only blocking part. Training may change parameters as soon as we return.
        on_gpu = any((t.local if isinstance(t, codec.Shard) else t).device.type == "cuda" for t in tensors.values())
        tensors = {k: (codec.Shard(self._snapshot(k, t.local), t.global_shape, t.global_offset, t.owner)
                       if isinstance(t, codec.Shard) else self._snapshot(k, t)) for k, t in tensors.items()}
        if on_gpu:
            torch.cuda.current_stream().synchronize()  # the device-to-host copies were issued non-blocking
        blocked = time.perf_counter() - t0
        log.info("checkpoint step %d: snapshot taken in %.3f s, persisting in background", step, blocked)
        self._pending = self._pool.submit(self._persist, meta, rep_tree, rank_tree, tensors, t0, zero_trees)

    def _snapshot(self, key: str, t: torch.Tensor) -> torch.Tensor:
        """Copy ``t`` into a host buffer kept from the previous save (pinned when ``t`` is on a GPU).

        Allocating, page-faulting (and pinning, ~0.6 s/GiB) fresh memory every save costs several times the
        copy itself; buffers are reused as long as shape and dtype match. Safe: save() waits for the
        previous persist before overwriting them."""
        t = t.detach()
        buf = self._buffers.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.device.type == "cuda")
            self._buffers[key] = buf
        buf.copy_(t, non_blocking=t.device.type == "cuda")
        return buf

    def _my_writes(self, replicated: dict, own: dict) -> dict:
        """The tensors this rank writes: its own (per-rank state, its ZeRO state), its DTensor shards, and its
        share of the replicated ones (all of them on rank 0 unless split_replicated)."""
        out: dict = {}
        whole = {}
        for k, t in replicated.items():
            if isinstance(t, codec.Shard):
                empty_global = math.prod(t.global_shape) == 0
                if t.owner and (t.numel() > 0 or (empty_global and self.rank == 0)):
                    out[k] = t
            else:
                whole[k] = t
        if self.split_replicated and self.world_size > 1:
            writers = sharded.assign_writers({k: sharded.nbytes(t) for k, t in whole.items()}, self.world_size)
            out.update({k: t for k, t in whole.items() if writers[k] == self.rank})
        elif self.rank == 0:
            out.update(whole)
        out.update(own)
        return out

    @staticmethod
    def _replicated(models: dict, optimizers: Named, schedulers: Named, scaler: Any,
                    extra: Mapping[str, Any] | None) -> dict:
        return {
            "models": {n: unwrap_model(m).state_dict() for n, m in models.items()},
            "optimizers": {n: o.state_dict() for n, o in _named(optimizers, "optimizer").items()},
            "schedulers": {n: s.state_dict() for n, s in _named(schedulers, "scheduler").items()},
            "scaler": scaler.state_dict() if scaler is not None else None,
            "extra": {n: (o.state_dict() if isinstance(o, Stateful) else o) for n, o in (extra or {}).items()},
        }

    def _persist(self, meta: dict, rep_tree: Any, rank_tree: Any, tensors: dict, t0: float,
                 zero_trees: dict | None = None) -> str:
        step = meta["step"]
        name = dist.broadcast(self._free_name_or_error(step) if self.rank == 0 else None, self._group)
        if name.startswith("error:"):  # rank 0 could not even list the folder: nobody writes
            raise CheckpointError(f"checkpoint at step {step} was not started: {name[6:]}")
        try:
            self.storage.makedirs(name)
            files, entries = blobs.write_tensors(self.storage, name, tensors, rank=self.rank, step=step,
                                                 max_file_bytes=self.max_file_bytes, threads=self.io_threads,
                                                 chunk_bytes=self.shard_chunk_bytes)
            self.storage.sync_dir(name)
            frag = {"ok": True, "files": files, "entries": [e.to_json() for e in entries], "tree": rank_tree,
                    "zero": zero_trees or {}}
        except Exception as exc:  # noqa: BLE001 - reported to rank 0, which then does not commit
            log.error("checkpoint %s: rank %d failed to write: %s: %s", name, self.rank, type(exc).__name__, exc)
            frag = {"ok": False, "error": f"rank {self.rank}: {type(exc).__name__}: {exc}"}
        frags = dist.gather(frag, self._group)
        outcome = self._commit(name, meta, rep_tree, frags) if self.rank == 0 else None
        outcome = dist.broadcast(outcome, self._group)
        if not outcome["ok"]:
            raise CheckpointError(f"checkpoint at step {step} was not committed: {outcome['error']}")
        self.last_saved = name
        if self.rank == 0:
            log.info("checkpoint %s committed: %.1f MB in %.2f s", name, outcome["bytes"] / 1e6,
                     time.perf_counter() - t0)
        return name

    def _free_name_or_error(self, step: int) -> str:
        try:
            return self._free_name(step)
        except Exception as exc:  # noqa: BLE001 - the other ranks wait on this broadcast
            return f"error:{type(exc).__name__}: {exc}"

    def _free_name(self, step: int) -> str:
        """A folder name never used before: a checkpoint is never overwritten in place."""
        taken = {n for n in self.storage.listdir() if parse_name(n)}
        attempt = 0
        while ckpt_name(step, attempt) in taken:
            attempt += 1
        return ckpt_name(step, attempt)

    def _commit(self, name: str, meta: dict, rep_tree: Any, frags: list) -> dict:
        errors = [f["error"] for f in frags if not f["ok"]]
        if errors:
            return {"ok": False, "error": "; ".join(errors)}
        try:
            manifest = self._manifest(name, meta, rep_tree, frags)
            raw = dumps(manifest)
            faults.point("save.before_manifest", step=meta["step"])
            self.storage.write_bytes(f"{name}/{MANIFEST_FILE}", raw)
            self.storage.sync_dir(name)
            faults.point("save.after_manifest", step=meta["step"])
            commit = make_commit(manifest, raw)
            faults.point("save.before_commit", step=meta["step"])
            self._write_commit(name, commit)
        except Exception as exc:  # noqa: BLE001 - an uncommitted checkpoint does not exist; say why
            log.error("checkpoint %s: commit failed: %s: %s", name, type(exc).__name__, exc)
            return {"ok": False, "error": f"commit: {type(exc).__name__}: {exc}"}
        try:
            faults.point("save.after_commit", step=meta["step"])
        except Exception as exc:  # noqa: BLE001 - the record is written: the checkpoint exists, say so
            log.warning("checkpoint %s is committed, but a step after writing its commit record failed: %s: %s",
                        name, type(exc).__name__, exc)
        try:  # the checkpoint is committed: a retention failure must not fail the save (or hang the others)
            retention.apply(self.storage, self.policy, protect={name}, damaged=self._damaged)
        except Exception as exc:  # noqa: BLE001
            log.warning("retention after %s failed: %s: %s", name, type(exc).__name__, exc)
        return {"ok": True, "bytes": sum(f["size"] for f in manifest["files"].values())}

    def _write_commit(self, name: str, commit: bytes) -> None:
        """Write the commit record. If the write reports an error but the record is there, whole (the folder
        fsync after the rename failed, an S3 PUT landed but its reply was lost), the checkpoint IS committed:
        readers will use it, so the save must not be reported as failed."""
        rel = f"{name}/{COMMIT_FILE}"
        try:
            self.storage.commit_bytes(rel, commit)
        except Exception as exc:
            try:
                landed = self.storage.size(rel) == len(commit) and self.storage.read_bytes(rel) == commit
            except Exception:  # noqa: BLE001 - cannot tell: report the original failure
                landed = False
            if not landed:
                raise
            log.warning("checkpoint %s: writing the commit record reported %s: %s, but the record is in place: "
                        "committed", name, type(exc).__name__, exc)

    def _manifest(self, name: str, meta: dict, rep_tree: Any, frags: list) -> dict:
        now = time.time()
        for n in frags[0].get("zero") or {}:  # ZeRO: each rank's optimizer state, by global parameter index
            sharded.merge_zero(rep_tree, n, [f.get("zero", {}).get(n) for f in frags])
        written = {e["key"] for f in frags for e in f["entries"]}
        missing = [k for tree in [rep_tree, *(f["tree"] for f in frags)] for k in codec.tensor_refs(tree)
                   if k not in written]
        if missing:  # ranks disagreed about the replicated state (e.g. a rank-dependent key): refuse to commit
            raise CheckpointError(f"no rank wrote tensors {missing[:3]} (the ranks' replicated state differs?)")
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "name": name,
            "harness_version": harness.__version__, "torch_version": torch.__version__,
            "python_version": platform.python_version(), "checksum_algorithm": CHECKSUM_ALGORITHM,
            "created": datetime.fromtimestamp(now, timezone.utc).isoformat(), "created_unix": now,
            "world_size": len(frags), "sharding": "replicated", **meta,
            "files": {n: info for f in frags for n, info in f["files"].items()},
            "tensors": [e for f in frags for e in f["entries"]],
            "state": rep_tree,
            "ranks": [f["tree"] for f in frags],
        }

    def wait(self) -> None:
        """Block until the save in flight (if any) is committed; re-raise its failure."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Finish the save in flight and release the background thread. Collective."""
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    # -- restore --------------------------------------------------------------------------------------

    def restore(self, *, models: Named = None, optimizers: Named = None, schedulers: Named = None,
                scaler: Any = None, extra: Mapping[str, Any] | None = None, step: int | None = None,
                strict: bool = True, skip_mismatched: bool = False, rng: bool = True) -> RestoreResult | None:
        """Load the newest valid checkpoint (or the one at ``step``) into the given objects. Collective.

        Rank 0 walks back from the newest committed checkpoint, verifying every checksum, past any that
        fail (logging why; damaged ones are never deleted), and broadcasts its choice so all ranks load the
        same one. Returns None when there is no checkpoint at all (a first run)."""
        self.wait()
        t0 = time.perf_counter()
        # Sharded targets (FSDP model, ZeRO optimizer) or a sharded checkpoint: every rank reads (and
        # verifies) only what it needs, and the ranks walk back together past a damaged checkpoint.
        collective = sharded.needs_collective(_named(models, "model"), _named(optimizers, "optimizer"))
        exclude: list[str] = []
        skipped: list = []
        while True:
            decision, tensors = None, {}
            if self.rank == 0:
                try:
                    decision, tensors = self._choose(step, collective=collective, exclude=exclude)
                except Exception as exc:  # noqa: BLE001 - tell the other ranks instead of leaving them waiting
                    decision = {"name": None, "skipped": [], "error": f"{type(exc).__name__}: {exc}"}
            decision = dist.broadcast(decision, self._group)
            decision["skipped"] = skipped + list(decision["skipped"])
            self._damaged |= {n for n, _ in decision["skipped"]}
            if decision.get("error"):
                raise (NoCheckpointError if decision.get("none") else CheckpointError)(decision["error"])
            if decision["name"] is None:
                log.info("no checkpoint in %s: starting fresh", redact_url(self.storage.url))
                return None
            name = decision["name"]
            if decision.get("collective"):
                verdict, manifest, state, mine = self._load_collective(name, models, optimizers, schedulers,
                                                                       scaler, extra)
                if verdict is not None and verdict[0] == "damaged":
                    log.error("checkpoint %s is not usable, trying an older one: %s", name, verdict[1])
                    exclude.append(name)
                    skipped = decision["skipped"] + [(name, verdict[1])]
                    continue
                if verdict is not None:
                    raise CheckpointError(f"restore of {name} failed: {verdict[1]}")
                break
            try:
                manifest, tensors = self._load(name, tensors)
                ok = True
            except Exception as exc:  # noqa: BLE001 - every rank must learn that one failed, or others hang later
                log.error("rank %d could not load %s: %s", self.rank, name, exc)
                ok, err = False, exc
            if not dist.all_ok(ok, self._group):
                raise CheckpointError(f"restore of {name} failed on at least one rank") from (None if ok else err)
            state, mine = self._decode(manifest, self._share_replicated(manifest, tensors))
            break
        result = self._apply(manifest, state, mine, models, optimizers, schedulers, scaler, extra, strict,
                             skip_mismatched, rng)
        result.skipped = decision["skipped"]
        log.info("restored %s (step %d, epoch %d) in %.2f s", name, result.step, result.epoch,
                 time.perf_counter() - t0)
        return result

    def _choose(self, step: int | None, collective: bool = False, exclude: list[str] = ()) -> tuple[dict, dict]:
        """Rank 0: the newest checkpoint that verifies completely, and the tensors it read doing so. A sharded
        checkpoint (or sharded targets: ``collective``) is only opened here: the ranks then read and verify
        it together (:meth:`_load_collective`), and come back with ``exclude`` if it was damaged."""
        infos = [i for i in reversed(list_checkpoints(self.storage, committed_only=False))
                 if (step is None or i.step == step) and i.name not in exclude]
        skipped: list[tuple[str, str]] = []
        for info in infos:
            if not info.committed:  # an interrupted save, or a lost COMMIT: never used, kept for a look
                log.warning("checkpoint %s has no commit record (an interrupted save, or its COMMIT was lost): "
                            "ignored", info.name)
                skipped.append((info.name, "no commit record"))
                continue
            try:
                manifest = open_checkpoint(self.storage, info.name)
                if collective or manifest.raw.get("sharding", "replicated") != "replicated":
                    return {"name": info.name, "skipped": skipped, "collective": True}, {}
                entries = list(manifest.tensors.values())  # verify all ranks' bytes, not only ours
                tensors = blobs.read_tensors(self.storage, info.name, entries, threads=self.io_threads)
                return {"name": info.name, "skipped": skipped}, {"manifest": manifest, "tensors": tensors}
            except StorageError:
                raise  # the store is failing (retries exhausted, access lost): not a damaged checkpoint
            except (CheckpointError, OSError, EOFError) as exc:
                log.error("checkpoint %s is not usable, trying an older one: %s", info.name, exc)
                skipped.append((info.name, str(exc)))
        if step is not None:
            return {"name": None, "skipped": skipped, "none": True,
                    "error": f"no valid checkpoint at step {step} in {redact_url(self.storage.url)}"}, {}
        if any(i.committed for i in infos):
            return {"name": None, "skipped": skipped, "error": "no valid checkpoint: every committed checkpoint "
                    "failed verification (" + "; ".join(f"{n}: {r}" for n, r in skipped) + ")"}, {}
        return {"name": None, "skipped": skipped}, {}

    def _load_collective(self, name: str, models: Named, optimizers: Named, schedulers: Named, scaler: Any,
                         extra: Mapping[str, Any] | None) -> tuple[Any, Any, Any, Any]:
        """Every rank reads what it needs of ``name`` (and its share of verification). Returns (verdict,
        manifest, state, own per-rank state); verdict is None, ("damaged", why) or ("fatal", why), the same
        on every rank."""
        manifest = state = mine = None
        try:
            manifest = open_checkpoint(self.storage, name)
            state, mine = sharded.load(self.storage, name, manifest, rank=self.rank, world=self.world_size,
                                       models=_named(models, "model"), optimizers=_named(optimizers, "optimizer"),
                                       schedulers=_named(schedulers, "scheduler"), scaler=scaler, extra=extra,
                                       threads=self.io_threads)
            problem = None
        except StorageError as exc:
            problem = ("fatal", f"rank {self.rank}: {exc}")
        except (CheckpointCorruptError, CheckpointFormatError, OSError, EOFError) as exc:
            problem = ("damaged", f"rank {self.rank}: {exc}")
        except Exception as exc:  # noqa: BLE001 - every rank must learn that one failed, or others hang later
            problem = ("fatal", f"rank {self.rank}: {type(exc).__name__}: {exc}" if not isinstance(exc, CheckpointError)
                       else f"rank {self.rank}: {exc}")
        if problem:
            log.error("rank %d could not load %s: %s", self.rank, name, problem[1])
        problems = dist.gather(problem, self._group)
        verdict = None
        if problems is not None:
            found = [p for p in problems if p]
            verdict = next((p for p in found if p[0] == "fatal"), found[0] if found else None)
        verdict = dist.broadcast(verdict, self._group)
        if verdict is not None and problem and verdict[0] == "fatal" and problem[0] == "fatal":
            verdict = problem  # this rank's own message (e.g. which tensor does not fit)
        return verdict, manifest, state, mine

    def _load(self, name: str, prefetched: dict) -> tuple[Any, dict]:
        """Rank 0: what it read (and verified) choosing. Other ranks: the manifest and their own per-rank
        tensors only; the replicated state comes from rank 0 (:meth:`_share_replicated`), so N ranks do not
        download it N times."""
        if prefetched:
            return prefetched["manifest"], prefetched["tensors"]
        manifest = open_checkpoint(self.storage, name)
        own = manifest.raw["ranks"][self.rank] if self.rank < manifest.world_size else None
        keys = set(codec.tensor_refs(own))
        entries = [e for e in manifest.tensors.values() if e.key in keys]
        return manifest, blobs.read_tensors(self.storage, name, entries, threads=self.io_threads)

    def _share_replicated(self, manifest: Any, tensors: dict) -> dict:
        """Broadcast the replicated tensors from rank 0 (read once, checksums verified there). Collective."""
        if self.world_size == 1:
            return tensors
        for key in sorted(set(codec.tensor_refs(manifest.raw["state"]))):
            if self.rank != 0:
                e = manifest.tensors[key]
                tensors[key] = torch.empty(e.shape, dtype=DTYPES[e.dtype])
            t = tensors[key]
            if t.numel():  # as raw bytes: gloo has no collective for every dtype (bool, complex, float8)
                torch.distributed.broadcast(t.reshape(-1).view(torch.uint8), src=0, group=self._group)
        return tensors

    def _decode(self, manifest: Any, tensors: dict) -> tuple[dict, Any]:
        mine = [r for r in [self.rank] if r < manifest.world_size]
        state, per_rank = decode_state(manifest, tensors, mine)
        return state, per_rank[self.rank] if mine else None

    def _apply(self, manifest: Any, state: dict, mine: Any, models: Named, optimizers: Named,
               schedulers: Named, scaler: Any, extra: Mapping[str, Any] | None, strict: bool,
               skip_mismatched: bool, rng: bool) -> RestoreResult:
        report = {}
        for n, m in _named(models, "model").items():
            saved_cls = manifest.raw.get("model_classes", {}).get(n)
            if saved_cls and saved_cls != class_name(m):
                log.warning("model %r was saved from %s and is loaded into %s", n, saved_cls, class_name(m))
            if sharded.is_fsdp(m):
                saved = _pick(state["models"], n, "model")
                sharded.check_fsdp_keys(m, saved, strict, n)
                sharded.load_fsdp_model(m, saved, strict=strict, name=n)
                report[n] = LoadReport(loaded=len(saved))
                continue
            report[n] = load_model_state(m, _pick(state["models"], n, "model"), strict=strict,
                                         skip_mismatched=skip_mismatched, name=n)
        models_d = _named(models, "model")
        for n, o in _named(optimizers, "optimizer").items():
            saved = _pick(state["optimizers"], n, "optimizer")
            owner = None if sharded.is_zero(o) else sharded._fsdp_model_of(o, models_d)
            with _loading("optimizer", n):
                if sharded.is_zero(o):
                    sharded.load_zero(o, saved, n)
                elif owner is not None:
                    sharded.load_fsdp_optimizer(owner, o, saved)
                else:
                    o.load_state_dict(sharded.fqn_to_index(saved))  # an FSDP checkpoint into a plain optimizer
        for n, s in _named(schedulers, "scheduler").items():
            with _loading("scheduler", n):
                s.load_state_dict(_pick(state["schedulers"], n, "scheduler"))
        if scaler is not None and state.get("scaler") is not None:
            with _loading("scaler", "scaler"):
                scaler.load_state_dict(state["scaler"])
        saved_extra = dict(state.get("extra") or {})
        for n, o in (extra or {}).items():
            if isinstance(o, Stateful):
                with _loading("extra object", n):
                    o.load_state_dict(_pick(saved_extra, n, "extra object"))
                saved_extra.pop(n)
        if mine is None:
            log.warning("checkpoint was written by %d ranks; rank %d has no saved RNG or data position",
                        manifest.world_size, self.rank)
        elif rng:
            restore_rng(mine["rng"])  # last: nothing after this may draw random numbers
        raw = manifest.raw
        return RestoreResult(name=raw["name"], step=raw["step"], epoch=raw["epoch"],
                             position=None if mine is None else mine["position"], loss=_unplain(raw.get("loss")),
                             metrics=_unplain(raw.get("metrics")) or {}, metadata=_unplain(raw.get("metadata")) or {},
                             extra=saved_extra, rank_state=None if mine is None else mine["rank_state"],
                             world_size=raw["world_size"], load_report=report)

    def latest(self) -> str | None:
        """Name of the newest committed checkpoint (not verified), or None."""
        infos = list_checkpoints(self.storage)
        return infos[-1].name if infos else None


def _plain(value: Any, what: str) -> Any:
    """Summary values as JSON, tagged where JSON falls short (a nan loss, tuples, int keys); no tensors."""
    enc = codec.Encoder()
    tree = enc.encode(value, what)
    if enc.tensors:
        raise TypeError(f"checkpoint {what} must hold numbers, strings, lists and dicts, not tensors "
                        f"({', '.join(enc.tensors)}): use extra= for tensors")
    return tree


def _unplain(tree: Any) -> Any:
    return codec.decode(tree, lambda key: None)  # parse_manifest made sure there are no tensor references


@contextlib.contextmanager
def _loading(what: str, name: str) -> Iterator[None]:
    """A state dict that does not fit its object (another optimizer class, scheduler type...) is a clear
    CheckpointError naming the object, not a KeyError from deep inside torch."""
    try:
        yield
    except CheckpointError:
        raise
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as exc:
        raise CheckpointError(f"{what} {name!r} cannot take the saved state: {type(exc).__name__}: {exc}") from exc


def _pick(saved: dict, name: str, what: str) -> Any:
    if name not in saved:
        raise CheckpointError(f"checkpoint has no {what} named {name!r} (it has: {', '.join(map(str, saved)) or 'none'})")
    return saved[name]
