"""Which committed checkpoints to keep: the newest N, the best K by a metric, always the newest."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from harness import faults
from harness.checkpoint.discovery import CheckpointInfo, CommitCache, list_checkpoints, read_commit, scan
from harness.checkpoint.format import COMMIT_FILE
from harness.errors import CheckpointError, StorageError
from harness.storage import Storage

log = logging.getLogger("harness")


@dataclass(frozen=True)
class RetentionPolicy:
    keep_last: int = 3            # 0 keeps every checkpoint
    keep_best: int = 0            # extra checkpoints kept for the best values of best_metric
    best_metric: str = "loss"     # "loss" or a key of the saved metrics
    best_mode: str = "min"        # "min" or "max"

    def __post_init__(self) -> None:
        if self.keep_last < 0 or self.keep_best < 0:
            raise ValueError("keep_last and keep_best must be >= 0")
        if self.best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {self.best_mode!r}")


def metric_value(info: CheckpointInfo, metric: str) -> float | None:
    commit = info.commit
    value = commit.get("loss") if metric == "loss" else (commit.get("metrics") or {}).get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def best(infos: list[CheckpointInfo], policy: RetentionPolicy, k: int) -> list[CheckpointInfo]:
    """The k best by the policy's metric; ties go to the newer checkpoint."""
    scored = [(metric_value(i, policy.best_metric), i) for i in infos]
    scored = [(v, i) for v, i in scored if v is not None]
    sign = 1.0 if policy.best_mode == "min" else -1.0
    scored.sort(key=lambda vi: (sign * vi[0], -vi[1].step, -vi[1].attempt))
    return [i for _, i in scored[:k]]


def select_deletions(infos: list[CheckpointInfo], policy: RetentionPolicy, protect: set[str],
                     damaged: set[str] = frozenset()) -> list[CheckpointInfo]:
    """Committed checkpoints (oldest first) that the policy lets go. Damaged ones (an unreadable commit
    record, or named in ``damaged``) are neither counted nor deleted: they stay for a human to look at.
    ``protect`` names are counted (the checkpoint just committed is one of the newest N) but never deleted."""
    healthy = [i for i in infos if i.committed and i.problem is None and i.name not in damaged]
    if policy.keep_last == 0 or not healthy:
        return []
    keep = {i.name for i in healthy[-policy.keep_last:]}
    keep |= {i.name for i in best(healthy, policy, policy.keep_best)}
    good = last_finite(healthy)
    if good - keep:
        log.warning("retention: the newest checkpoints record a non-finite loss; keeping %s, the newest with a "
                    "finite one", ", ".join(good))
    keep |= good | set(protect)
    return [i for i in healthy[:-1] if i.name not in keep]  # [:-1]: never the newest


def last_finite(healthy: list[CheckpointInfo]) -> set[str]:
    """The newest checkpoint whose loss is finite (or not recorded), when newer ones recorded nan or inf: a
    run that diverged must not push its last good state out with keep_last checkpoints of nan weights."""
    for info in reversed(healthy):
        if info.commit.get("loss") is None or metric_value(info, "loss") is not None:
            return {info.name}
    return set()


def stale_attempts(infos: list[CheckpointInfo]) -> list[str]:
    """Uncommitted folders older than the newest commit: dead attempts, never visible to readers (not those a
    rollback set aside: kept for a human)."""
    committed = [i for i in infos if i.committed]
    if not committed:
        return []
    newest = (committed[-1].step, committed[-1].attempt)
    return [i.name for i in infos if i.leftover and (i.step, i.attempt) < newest]


def apply(storage: Storage, policy: RetentionPolicy, protect: set[str],
          damaged: set[str] = frozenset(), cache: CommitCache | None = None) -> list[str]:
    """Delete what the policy lets go. A failed delete is logged, never raised: training goes on.
    ``cache``: the saving job's commit records read before (each is read once in its life)."""
    if policy.keep_last == 0:  # nothing committed goes: the listing alone finds the dead attempts, no record read
        everything = scan(storage)
    else:
        everything = list_checkpoints(storage, committed_only=False, cache=cache)  # one listing, both rules
    chosen = select_deletions([i for i in everything if i.committed], policy, protect, damaged)
    records = {i.name: i.commit for i in chosen}
    victims = [i.name for i in chosen]
    victims += [n for n in stale_attempts(everything) if n not in protect and n not in damaged]
    deleted = []
    for name in victims:
        try:
            faults.point("retention.delete", name=name)
            if name in records:  # committed: invisible first, so a half-deleted one never shows
                now = _record_now(storage, name, records[name])
                if now == "changed":
                    continue
                if now == "same":
                    storage.remove(f"{name}/{COMMIT_FILE}")
            storage.remove_tree(name)
            deleted.append(name)
        except Exception as exc:  # noqa: BLE001 - retention must never stop training
            log.warning("retention: could not delete %s: %s: %s", name, type(exc).__name__, exc)
    if cache is not None:  # a name deleted now may be used again by a later save: its record is read afresh
        cache.keep_only(i.name for i in everything if i.name not in deleted)
    if deleted:
        log.info("retention: deleted %s", ", ".join(deleted))
    return deleted


def _record_now(storage: Storage, name: str, ranked: dict) -> str:
    """A committed victim's record read now: "same" as the one it was ranked by (which may have come from the
    job's cache, read long ago), "gone", or "changed" (no longer parses, or says something else: damaged, kept
    for a human, as one found damaged at ranking is). The read stands in for the existence check a delete
    needs anyway: no request more."""
    try:
        now = read_commit(storage, name)
    except FileNotFoundError:
        return "gone"
    except StorageError:
        raise
    except CheckpointError:
        now = None
    if now != ranked:
        log.warning("retention: %s's commit record changed since it was read (now %s): kept, not deleted",
                    name, "unreadable" if now is None else "different")
        return "changed"
    return "same"
