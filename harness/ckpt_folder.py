"""``harness ckpt list``, ``verify`` and ``prune``: the commands that look after a checkpoint folder as a whole
(which checkpoints it holds, whether their bytes check out, what killed saves left behind), and the check every
``ckpt`` command makes first: DIR must be a reachable folder."""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
from typing import Any

from harness import lease
from harness.checkpoint import foreign
from harness.checkpoint.discovery import (READ_THREADS, CheckpointInfo, list_checkpoints, open_checkpoint,
                                         verify_checkpoint)
from harness.checkpoint.format import COMMIT_FILE, MANIFEST_FILE
from harness.checkpoint.prune import prune
from harness.checkpoint.rollback import roll_back
from harness.checkpoint.select import deleted_meanwhile
from harness.ckpt_render import dash, human_size, loss_text, print_table, short_time, without_name
from harness.errors import CheckpointError, HarnessError
from harness.layout import ROLLED_BACK_FILE
from harness.storage import Storage, redact_url


def require_folder(storage: Storage) -> None:
    """DIR must exist and be a folder; a missing one is an error, not an empty listing. A storage problem
    (missing bucket, rejected credentials, no endpoint) is the StorageError `harness train` would raise."""
    storage.check_access(write=False)
    if not storage.is_dir():
        what = "is not a folder" if storage.exists("") else "does not exist"
        raise HarnessError(f"checkpoint folder {redact_url(storage.url)} {what}")


# -- list -------------------------------------------------------------------------------------------

def run_list(storage: Storage, args: argparse.Namespace) -> int:
    require_folder(storage)
    infos = list_checkpoints(storage, committed_only=not args.all)
    if args.verify or storage.local_path() is not None:
        rows = [_row(storage, info, full=args.verify) for info in infos]
    else:  # the quick check reads a manifest per checkpoint: latency on S3, so several at a time
        with cf.ThreadPoolExecutor(READ_THREADS, thread_name_prefix="harness-list") as pool:
            rows = list(pool.map(lambda info: _row(storage, info, full=False), infos))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no {'checkpoint folders' if args.all else 'committed checkpoints'} in {redact_url(storage.url)}"
              f"{foreign.hint(storage)}")
        return 0
    header = ["NAME", "STEP", "EPOCH", "LOSS", "SIZE", "CREATED", "WORLD", "SHARDING", "STATUS"]
    table = [[r["name"], dash(r["step"]), dash(r["epoch"]), loss_text(r["loss"]), r["size"] or "-",
              short_time(r["created"]), dash(r["world_size"]), r["sharding"] or "-", r["status"]] for r in rows]
    print_table(header, table, right={1, 2, 3, 4, 6})
    return 0


def loss_json(v: Any) -> Any:
    """A commit record's loss for --json: a number, or "nan"/"inf"/"-inf" as ``ckpt inspect --json`` writes
    them (the record's own tag, {"__float__": "nan"}, is the codec's business)."""
    return v["__float__"] if isinstance(v, dict) and "__float__" in v else v


def _row(storage: Storage, info: CheckpointInfo, full: bool) -> dict:
    c = info.commit if isinstance(info.commit, dict) else {}
    row: dict[str, Any] = {
        "name": info.name, "step": info.step, "attempt": info.attempt, "epoch": c.get("epoch"),
        "loss": loss_json(c.get("loss")), "size_bytes": c.get("total_bytes"), "size": None, "created": c.get("created"),
        "world_size": c.get("world_size"), "sharding": c.get("sharding"), "committed": info.committed,
        "valid": False, "status": "",
    }
    if not info.committed:
        row["status"] = (f"rolled back (its {ROLLED_BACK_FILE} record renamed to {COMMIT_FILE} restores it)"
                         if info.rolled_back else "uncommitted")
        row["size_bytes"] = _folder_size(storage, info.name)
    elif info.problem is not None:
        row["status"] = without_name(info.name, info.problem)
    else:
        try:  # the quick check takes the commit record and file sizes from the listing
            verify_checkpoint(storage, info.name) if full else open_checkpoint(storage, info.name, listed=info)
            row["valid"], row["status"] = True, "valid"
        except (CheckpointError, OSError, EOFError) as exc:  # or deleted by a live job's retention meanwhile
            row["status"] = deleted_meanwhile(storage, info.name) or without_name(info.name, str(exc))
    if isinstance(row["size_bytes"], int):
        row["size"] = human_size(row["size_bytes"])
    return row


def _folder_size(storage: Storage, name: str) -> int | None:
    try:
        return storage.du(name)
    except Exception:  # noqa: BLE001 - a size is nice to have for an uncommitted folder, not essential
        return None


# -- prune ------------------------------------------------------------------------------------------

def run_prune(storage: Storage, args: argparse.Namespace) -> int:
    """Leftovers of killed saves go, unless a live job holds the folder: its save in flight looks the same.
    On S3 a prefix with no object yet may still hold unfinished uploads (a first save killed mid-upload):
    billable parts, aborted too, where a missing folder was an error."""
    if storage.local_path() is None:  # an object store: a prefix exists once it holds an object
        storage.check_access(write=False)
    else:
        require_folder(storage)
    lease.refuse_if_live(storage, args.lease_timeout, "not pruning (its uncommitted folder may be the save in "
                         "flight; the job cleans up by itself when it starts)")
    report = prune(storage, dry_run=args.dry_run)
    print(report.line())
    return 1 if report.failed else 0


def run_rollback(storage: Storage, args: argparse.Namespace) -> int:
    """Continue from an earlier step for good: the newer checkpoints set aside, unless a live job holds the
    folder (it would go on saving after them, and its next restart resume from them)."""
    require_folder(storage)
    lease.refuse_if_live(storage, args.lease_timeout, "not rolling back (stop the job first: it would go on from "
                         "where it is)")
    print(roll_back(storage, args.step, dry_run=args.dry_run).line())
    return 0


# -- verify -----------------------------------------------------------------------------------------

def run_verify(storage: Storage, args: argparse.Namespace) -> int:
    require_folder(storage)
    where = redact_url(storage.url)
    for _ in range(3):  # the newest deleted while it was verified (a live job's retention): verify the next newest
        infos = list_checkpoints(storage)
        if args.step is not None:
            infos = [i for i in infos if i.step == args.step][-1:]
            if not infos:
                raise CheckpointError(f"no committed checkpoint at step {args.step} in {where}")
        elif not args.all:
            infos = infos[-1:]
        if not infos:
            raise CheckpointError(f"no committed checkpoint in {where}{foreign.hint(storage)}")
        ok, gone = _verify_each(storage, infos)
        if not gone or args.all or args.step is not None:
            return 0 if ok and not (gone and args.step is not None) else 1
    print(f"the newest checkpoint in {where} was deleted three times while it was read: nothing verified")
    return 1


def _verify_each(storage: Storage, infos: list[CheckpointInfo]) -> tuple[bool, bool]:
    """One line per checkpoint: OK, FAILED (damaged), or GONE (its commit record vanished while it was read: a
    live job's retention deleted it, which is not damage). (all verified, any gone)."""
    ok, gone = True, False
    for info in infos:
        try:
            if info.problem is not None:
                raise CheckpointError(info.problem)
            manifest = verify_checkpoint(storage, info.name)
        except (CheckpointError, OSError, EOFError) as exc:
            why = deleted_meanwhile(storage, info.name) if info.problem is None else None
            if why is not None:
                print(f"GONE {info.name}: {why}")
                gone = True
                continue
            print(f"FAILED {info.name}: {without_name(info.name, str(exc))}")
            ok = False
            continue
        total = sum(manifest.files.values()) + (storage.size(f"{info.name}/{MANIFEST_FILE}") or 0)
        print(f"OK {info.name} ({len(manifest.tensors)} tensors, {total / 1e6:.2f} MB)")
    return ok, gone
