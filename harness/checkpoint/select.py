"""Choosing one checkpoint to read: the newest valid one, the one at a step, or the best by a metric.

Shared by export, inspect, diff, ``harness.load_for_inference`` and ``harness.warm_start``. Every choice
walks the candidates in order of preference and takes the first one that loads (the ``load`` callback
validates and verifies what it reads), recording the ones passed over and why, as restore does.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Iterator, TypeVar

from harness.checkpoint import blobs, codec, foreign
from harness.checkpoint.discovery import CheckpointInfo, list_checkpoints, open_checkpoint, read_commits, scan
from harness.checkpoint.errors import is_resource_error
from harness.checkpoint.format import COMMIT_FILE, Manifest
from harness.checkpoint.retention import RetentionPolicy, best as best_of
from harness.errors import CheckpointError, HarnessError, NewerFormatError, NoCheckpointError, StorageError
from harness.storage import Storage, redact_url

log = logging.getLogger("harness")

T = TypeVar("T")

DEFAULT_METRIC = "loss"
DEFAULT_MODE = "min"


def run_config(manifest: Manifest) -> dict | None:
    """The run's config as a dict (``harness train`` records it as ``metadata["config"]``), or None."""
    meta = manifest.raw.get("metadata")
    if not isinstance(meta, dict):
        return None
    try:
        meta = codec.decode(meta, lambda key: None)
    except CheckpointError:
        return None
    cfg = meta.get("config") if isinstance(meta, dict) else None
    return cfg if isinstance(cfg, dict) else None


def best_policy(storage: Storage, infos: list[CheckpointInfo], metric: str | None,
                mode: str | None) -> tuple[str, str]:
    """The metric and mode used by ``--best``: the ones given, else the run config's
    ``checkpoint.best_metric``/``best_mode`` (from the newest checkpoint that opens), else loss/min."""
    if metric is not None and mode is not None:
        return metric, mode
    cfg_metric = cfg_mode = None
    for info in reversed(infos):
        try:
            cfg = run_config(open_checkpoint(storage, info.name))
        except (CheckpointError, OSError, EOFError):
            continue
        ck = cfg.get("checkpoint") if cfg else None
        if isinstance(ck, dict):
            cfg_metric, cfg_mode = ck.get("best_metric"), ck.get("best_mode")
        break
    if metric is None:
        metric = cfg_metric if isinstance(cfg_metric, str) and cfg_metric else DEFAULT_METRIC
        if mode is None and metric == cfg_metric and cfg_mode in ("min", "max"):
            mode = cfg_mode
    elif mode is None and metric == cfg_metric and cfg_mode in ("min", "max"):
        mode = cfg_mode
    return metric, mode or DEFAULT_MODE


def candidates(storage: Storage, *, step: int | None = None, best: bool = False, metric: str | None = None,
               mode: str | None = None) -> tuple[Iterable[CheckpointInfo], str]:
    """Committed checkpoints in order of preference, and a few words saying how they were ordered. The
    newest (or at a step) come from one listing with their commit records read as they are walked (a
    lazy iterable); the best needs every record."""
    if best and step is not None:
        raise HarnessError("choose either a step or the best checkpoint, not both")
    if mode is not None and mode not in ("min", "max"):
        raise HarnessError(f"mode must be 'min' or 'max', got {mode!r}")
    if not best:
        chosen = [i for i in reversed(scan(storage)) if i.committed and (step is None or i.step == step)]
        return read_commits(storage, chosen), (f"step {step}" if step is not None else "newest")
    infos = list_checkpoints(storage)
    where = redact_url(storage.url)
    metric, mode = best_policy(storage, infos, metric, mode)
    usable = [i for i in infos if i.problem is None]
    ranked = best_of(usable, RetentionPolicy(keep_last=0, keep_best=0, best_metric=metric, best_mode=mode),
                     len(usable))
    if infos and not ranked:
        raw = [i.commit.get("loss") if metric == "loss" else (i.commit.get("metrics") or {}).get(metric)
               for i in usable]
        if any(v is not None for v in raw):  # recorded, but never a finite number: a run that diverged
            raise NoCheckpointError(f"no checkpoint in {where} has a finite {metric!r} (the values recorded are "
                                    f"{', '.join(sorted({_shown(v) for v in raw if v is not None}))}): none is "
                                    "best; choose one with --step")
        raise NoCheckpointError(f"no checkpoint in {where} records the metric {metric!r} "
                                f"(use --metric with 'loss' or a key of the saved metrics)")
    how = f"best by {metric} ({mode})"
    return ranked, how


def _shown(value: object) -> str:
    """A summary value as the commit record tags it (a nan loss is {"__float__": "nan"})."""
    return str(value["__float__"]) if isinstance(value, dict) and "__float__" in value else repr(value)


def walk_back(infos: Iterable[CheckpointInfo], load: Callable[[str], T],
              level: int = logging.INFO) -> tuple[CheckpointInfo | None, T | None, list[tuple[str, str]]]:
    """The one walk-back loop (restore, export, inspect, inference): the first of ``infos`` (in order of
    preference) that is committed and that ``load(name)`` accepts: (info, what load returned, skipped).

    ``skipped`` lists (name, reason) for the folders passed over: no commit record, a damaged record, or a
    load that found the checkpoint damaged (truncated, bad checksum, malformed). A failing store
    (StorageError) or a resource failure (a lost connection, a timeout, out of memory) is not a damaged
    checkpoint: it propagates, as does anything else. So does a checkpoint of a newer harness's format
    (NewerFormatError): an older one in its place would silently undo the training since (a harness rolled
    back under a running job resumed 200 steps back, with an error line per checkpoint passed over).
    (None, None, skipped) when nothing is usable."""
    skipped: list[tuple[str, str]] = []
    for info in infos:
        if not info.committed:  # never used; a rollback's set-aside folder is no candidate either
            if info.leftover:  # an interrupted save, or a lost COMMIT: kept for a look
                log.warning("checkpoint %s has no commit record (an interrupted save, or its COMMIT was lost): "
                            "ignored", info.name)
                skipped.append((info.name, "no commit record"))
            continue
        try:
            if info.problem is not None:
                raise (NewerFormatError if info.newer else CheckpointError)(info.problem)
            return info, load(info.name), skipped
        except NewerFormatError as exc:
            why = str(exc).removeprefix(f"{info.name}: ")  # (the manifest's says whose it is)
            raise NewerFormatError(f"checkpoint {info.name}: {why}; an older checkpoint is not used in its place, "
                                   "which would undo the training since (to go back to one on purpose, move "
                                   f"{info.name} out of the folder; export and inspect take --step)") from None
        except StorageError:
            raise
        except (CheckpointError, OSError, EOFError) as exc:
            if is_resource_error(exc):  # a lost connection, a timeout: the checkpoint may be fine
                raise
            log.log(level, "checkpoint %s is not usable, trying the next one: %s", info.name, exc)
            skipped.append((info.name, str(exc)))
    return None, None, skipped


# A reader beside a live job (export, inspect, inference polling the newest) may lose the race with the job's
# retention: the newest it listed is deleted while it reads it, because a newer one was committed. It lists the
# folder again, this many times, rather than walking back to older ones that are next in line for deletion.
RELISTS = 4
GONE = "deleted while it was read (the retention of the job writing this folder)"


class _Gone(Exception):
    """The candidate ``name`` was deleted while it was read (not damaged)."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def choose(storage: Storage, load: Callable[[str], T], *, step: int | None = None, best: bool = False,
           metric: str | None = None, mode: str | None = None) -> tuple[str, T, list[tuple[str, str]], str]:
    """The first candidate that ``load(name)`` accepts: (name, what load returned, skipped, how).

    ``skipped`` lists (name, reason) for candidates that failed (damaged, truncated, bad checksum) or that
    the job writing the folder deleted while they were read (the folder is then listed again: a newer one
    exists). Raises NoCheckpointError when none is usable."""
    where = redact_url(storage.url)
    at = f" at step {step}" if step is not None else ""
    gone: list[tuple[str, str]] = []
    for _ in range(RELISTS + 1):
        infos, how = candidates(storage, step=step, best=best, metric=metric, mode=mode)
        try:
            info, loaded, skipped = walk_back(_unless_gone(infos), _load_unless_gone(storage, load))
        except _Gone as exc:
            if step is not None:  # that step is gone for good: nothing newer is what was asked for
                raise NoCheckpointError(f"checkpoint {exc.name} in {where} was {GONE}") from None
            log.info("checkpoint %s was %s: listing %s again", exc.name, GONE, where)
            gone.append((exc.name, GONE))
            continue
        skipped = gone + skipped
        if info is not None:
            return info.name, loaded, skipped, how
        if skipped:
            raise NoCheckpointError(f"no valid checkpoint{at} in {where}: "
                                    + "; ".join(f"{n}: {r}" for n, r in skipped))
        raise NoCheckpointError(f"no committed checkpoint{at} in {where}{foreign.hint(storage)}")
    raise NoCheckpointError(f"no checkpoint in {where} could be read before the job writing it deleted it "
                            f"({', '.join(n for n, _ in gone)}, each in turn): it replaces them faster than "
                            "they are read; choose one it keeps (--step of a kept one, --best) or let it keep "
                            "more (checkpoint.keep_last)")


def _unless_gone(infos: Iterable[CheckpointInfo]) -> Iterator[CheckpointInfo]:
    """``infos`` (listed with a commit record), stopping at one whose record was gone when read: deleted
    since the listing (retention removes the record first)."""
    for info in infos:
        if not info.committed:
            raise _Gone(info.name)
        yield info


def _load_unless_gone(storage: Storage, load: Callable[[str], T]) -> Callable[[str], T]:
    """``load``, raising _Gone instead of its error when the checkpoint failed because it is gone."""
    def guarded(name: str) -> T:
        try:
            return load(name)
        except Exception:
            if deleted_meanwhile(storage, name):  # one existence check, on failures only
                raise _Gone(name) from None
            raise
    return guarded


def deleted_meanwhile(storage: Storage, name: str) -> str | None:
    """Why a checkpoint listed as committed failed to load, when the reason is that it is gone: the job
    writing the folder deleted it (retention) while this process read it. Not damage, and not said as such."""
    try:
        gone = not storage.exists(f"{name}/{COMMIT_FILE}")
    except Exception:  # noqa: BLE001 - only an explanation: keep the original reason
        return None
    return GONE if gone else None


def read_models(storage: Storage, name: str, threads: int = 4) -> tuple[Manifest, dict[str, dict]]:
    """Validate ``name`` and read only its models' state dicts (every byte read is verified):
    {model name: state_dict}. Cheaper than reading the whole state when only weights are wanted."""
    manifest = open_checkpoint(storage, name)
    state = manifest.raw.get("state")
    tree = state.get("models") if isinstance(state, dict) else None
    if tree is None:
        return manifest, {}
    refs = set(codec.tensor_refs(tree))
    entries = [e for e in manifest.tensors.values() if e.key in refs]  # every shard of a sharded tensor
    tensors = blobs.read_tensors(storage, name, entries, threads=threads, verify=True)  # shards assembled
    models = codec.decode(tree, tensors.__getitem__)
    if not isinstance(models, dict):
        raise CheckpointError(f"{name}: models state is a {type(models).__name__}, not a dict")
    return manifest, models


def pick_model(models: dict[str, Any], name: str | None, where: str) -> tuple[str, dict]:
    """One model's state dict: the one named ``name``, or the only one."""
    if not models:
        raise CheckpointError(f"{where} holds no model weights")
    if name is None:
        if len(models) > 1:
            raise HarnessError(f"{where} holds several models ({', '.join(map(str, models))}): say which one")
        name = next(iter(models))
    if name not in models:
        raise HarnessError(f"{where} has no model named {name!r} (it has: {', '.join(map(str, models))})")
    return name, models[name]
