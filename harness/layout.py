"""Names in a checkpoint folder: checkpoint folders ``step-NNNNNNNNN[-aN]``, the commit record, the manifest.

Torch-free and dependency-free on purpose: :mod:`harness.prefetch` reads them in a restarting worker before
torch is imported. :mod:`harness.checkpoint.format` re-exports them with the rest of the format.
"""

from __future__ import annotations

import re

COMMIT_FILE = "COMMIT"
MANIFEST_FILE = "manifest.json"
ROLLED_BACK_FILE = "ROLLED_BACK"  # a commit record set aside by `harness ckpt rollback` (checkpoint/rollback.py)
NAME_PREFIX = "step-"  # every checkpoint folder's name starts so: discovery lists only those

_NAME_RE = re.compile(r"^step-(\d{9,12})(?:-a(\d{1,4}))?$")
MAX_STEP = 10**12 - 1  # the most a folder name holds (12 digits): a larger step's folder would never be found


def ckpt_name(step: int, attempt: int = 0) -> str:
    """Folder name: lexical order is (step, attempt) order."""
    return f"{NAME_PREFIX}{step:09d}" + (f"-a{attempt}" if attempt else "")


def parse_name(name: str) -> tuple[int, int] | None:
    """(step, attempt) of a checkpoint folder name, or None for anything else."""
    m = _NAME_RE.match(name)
    if not m:
        return None
    return int(m.group(1)), int(m.group(2) or 0)


def free_name(step: int, taken: set[str]) -> str:
    """The name a checkpoint of ``step`` gets in a folder holding ``taken``: never one already there (a
    checkpoint is never overwritten in place; a killed save's folder makes the next ``step-N-a1``)."""
    attempt = 0
    while ckpt_name(step, attempt) in taken:
        attempt += 1
    return ckpt_name(step, attempt)
