"""Going back to an earlier checkpoint for good: the committed checkpoints after it are set aside.

A run whose loss spiked at step 12400 is continued from step 12000 (torchtitan's ``checkpoint.load_step``,
Megatron's ``--ckpt-step``). Loading step 12000 once is not enough on preemptible machines: the next restart
resumes from the newest committed checkpoint, the abandoned 12400, and retention ranks the new branch's
checkpoints (``step-000012100-a1``...) below the abandoned ones. So rolling back sets every newer committed
checkpoint aside: its commit record becomes ``ROLLED_BACK`` (the same bytes: renaming it back to ``COMMIT``
undoes it), which readers, restore and retention do not see as a checkpoint, and which neither retention nor
prune ever deletes (the files stay for a human, as damaged checkpoints do).

Oldest first, each record written before the ``COMMIT`` it replaces is removed: a rollback interrupted
half-way leaves the newest checkpoints committed (a job started then resumes from the newest, as if nothing
had happened) and the same command finishes it. The caller checks that no live job holds the folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from harness.checkpoint.discovery import CheckpointInfo, list_checkpoints, open_checkpoint
from harness.errors import CheckpointError, NoCheckpointError
from harness.layout import COMMIT_FILE, ROLLED_BACK_FILE
from harness.storage import Storage, redact_url


@dataclass
class RollbackReport:
    """The checkpoint rolled back to and the newer ones set aside (or, with ``dry_run``, to be set aside)."""

    where: str
    target: str
    dry_run: bool = False
    set_aside: list[str] = field(default_factory=list)

    def line(self) -> str:
        if not self.set_aside:
            return f"{self.where}: {self.target} is the newest committed checkpoint already: nothing to roll back"
        verb = "would set aside" if self.dry_run else "set aside"
        names = ", ".join(self.set_aside)
        then = "would resume" if self.dry_run else "resumes"
        return (f"{self.where}: {verb} {len(self.set_aside)} newer checkpoint{'s' if len(self.set_aside) != 1 else ''}"
                f" ({names}): a job started now {then} from {self.target}; their files stay, with "
                f"{ROLLED_BACK_FILE} in place of {COMMIT_FILE} (rename it back to undo)")


def roll_back(storage: Storage, step: int, dry_run: bool = False) -> RollbackReport:
    """Make the checkpoint of ``step`` (its newest attempt) the newest committed one. It must open cleanly
    (commit record, manifest, file sizes): rolling back to a damaged checkpoint would leave a job nothing
    to resume from but older ones."""
    where = redact_url(storage.url)
    infos = list_checkpoints(storage)
    at = [i for i in infos if i.step == step]
    if not at:
        have = ", ".join(str(i.step) for i in infos[-8:]) or "none"
        raise NoCheckpointError(f"no committed checkpoint at step {step} in {where} (newest steps: {have})")
    target = at[-1]
    if target.problem is not None:
        raise CheckpointError(f"{target.name} is damaged, not rolled back to: {target.problem}")
    open_checkpoint(storage, target.name, target)
    report = RollbackReport(where, target.name, dry_run)
    report.set_aside = [i.name for i in _newer(infos, target)]
    if not dry_run:
        for name in report.set_aside:
            set_aside(storage, name)
    return report


def _newer(infos: list[CheckpointInfo], target: CheckpointInfo) -> list[CheckpointInfo]:
    return [i for i in infos if (i.step, i.attempt) > (target.step, target.attempt)]


def set_aside(storage: Storage, name: str) -> None:
    """``name``'s commit record becomes its ``ROLLED_BACK`` record (durable first), then ``COMMIT`` goes."""
    record = storage.read_bytes(f"{name}/{COMMIT_FILE}")
    storage.commit_bytes(f"{name}/{ROLLED_BACK_FILE}", record)
    storage.remove(f"{name}/{COMMIT_FILE}")
