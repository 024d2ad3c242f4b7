"""Removing what killed saves leave behind: uncommitted ``step-*`` folders and, on S3, unfinished uploads.

A save killed before its commit record (SIGKILL, OOM, node loss, preemption past the grace period) leaves
its data files behind. Readers never see them (no ``COMMIT``), retention only removes such a folder once a
newer checkpoint commits, and a job preempted at every save would pile them up without bound; on S3 a
multipart upload killed half-way also leaves invisible, billable parts.

Removing them is safe only when no live job can be writing them: the trainer calls :func:`clean_leftovers`
on rank 0 right after taking the run lease (harness/lease.py), and ``harness ckpt prune`` checks the lease
first. This module does not look at the lease itself: the caller vouches that nobody else writes here.
Committed checkpoints are never touched, damaged ones included (only retention deletes committed ones).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from harness.checkpoint.discovery import list_checkpoints
from harness.storage import Storage, redact_url

log = logging.getLogger("harness")


@dataclass(frozen=True)
class Leftover:
    """One uncommitted checkpoint folder and its size (None when it could not be measured)."""

    name: str
    bytes: int | None


@dataclass
class PruneReport:
    """What a prune found, removed (or with ``dry_run`` would remove), and what it could not remove."""

    where: str
    dry_run: bool = False
    folders: list[Leftover] = field(default_factory=list)
    uploads: int | None = 0  # unfinished multipart uploads aborted (S3); None: not looked for
    failed: list[str] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(f.bytes or 0 for f in self.folders)

    @property
    def empty(self) -> bool:
        return not self.folders and not self.uploads and not self.failed

    def line(self) -> str:
        """The one line that says it all."""
        verb = "would remove" if self.dry_run else "removed"
        if not self.folders and not self.uploads:
            head = self.where if self.failed else f"no leftovers of killed saves in {self.where}"
        else:
            parts = []
            if self.folders:
                names = ", ".join(f"{f.name} ({_size(f.bytes)})" for f in self.folders)
                if len(self.folders) == 1:
                    parts.append(f"{verb} uncommitted checkpoint folder {names}")
                else:
                    parts.append(f"{verb} {len(self.folders)} uncommitted checkpoint folders "
                                 f"({_size(self.bytes)}): {names}")
            if self.uploads:
                parts.append(f"aborted {self.uploads} unfinished "
                             f"multipart upload{'s' if self.uploads != 1 else ''}")
            head = f"{self.where}: " + "; ".join(parts)
        if self.uploads is None and self.dry_run:
            head += " (unfinished multipart uploads are not looked for in a dry run)"
        if self.failed:
            joint = ": " if head == self.where else "; "
            head += f"{joint}could not remove {len(self.failed)}: " + "; ".join(self.failed)
        return head


def find_leftovers(storage: Storage) -> list[Leftover]:
    """Uncommitted ``step-*`` folders, oldest first. A folder with a damaged commit record counts as committed;
    one a rollback set aside (harness/checkpoint/rollback.py) is no leftover."""
    return [Leftover(i.name, folder_bytes(storage, i.name))
            for i in list_checkpoints(storage, committed_only=False) if i.leftover]


def folder_bytes(storage: Storage, rel: str) -> int | None:
    """Total size of the files under ``rel``; None when it cannot be measured."""
    try:
        return int(storage.du(rel))
    except Exception:  # noqa: BLE001 - the size is for the log line; the removal does not depend on it
        return None


def prune(storage: Storage, dry_run: bool = False) -> PruneReport:
    """Remove (``dry_run``: only report) every uncommitted checkpoint folder and abort the unfinished
    multipart uploads under the folder (S3). The caller must hold the run lease or have checked that no live
    job holds it. A failed removal is reported, not raised."""
    report = PruneReport(redact_url(storage.url), dry_run)
    report.folders = find_leftovers(storage)
    if dry_run:
        # Unfinished uploads are only found by aborting them; say so rather than report none.
        report.uploads = None if storage.url.startswith("s3://") else 0
        return report
    for leftover in list(report.folders):
        try:
            storage.remove_tree(leftover.name)
        except Exception as exc:  # noqa: BLE001 - one stuck folder must not keep the others
            report.folders.remove(leftover)
            report.failed.append(f"{leftover.name}: {type(exc).__name__}: {exc}")
    try:  # after the folders: an upload killed before its first object leaves no folder to list
        report.uploads = len(storage.abort_incomplete_uploads(""))
    except Exception as exc:  # noqa: BLE001 - invisible leftovers: report, never fail the caller
        report.uploads = None
        report.failed.append(f"unfinished uploads: {type(exc).__name__}: {exc}")
    return report


def clean_leftovers(storage: Storage) -> PruneReport | None:
    """For a job that has just taken the run lease: prune, and log one line if anything was there. Never
    raises (cleaning up is worth a warning, not a failed start)."""
    try:
        report = prune(storage)
    except Exception as exc:  # noqa: BLE001 - e.g. the listing failed: training can start anyway
        log.warning("could not clean up after killed saves in %s: %s: %s", redact_url(storage.url),
                    type(exc).__name__, exc)
        return None
    if not report.empty:
        (log.warning if report.failed else log.info)("cleanup after killed saves: %s", report.line())
    return report


def _size(n: int | None) -> str:
    if n is None:
        return "size unknown"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"
