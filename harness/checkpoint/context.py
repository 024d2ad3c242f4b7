"""What save and restore share on every rank: where checkpoints live, who this rank is, its group."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from harness.checkpoint.discovery import CommitCache
from harness.storage import Storage


@dataclass
class Ctx:
    storage: Storage
    group: Any                 # the gloo group of checkpoint collectives (None in one process)
    rank: int
    world_size: int
    io_threads: int
    timeout_s: float = 600.0   # of the group's collectives
    # Checkpoints restore found damaged: retention neither counts nor deletes them (kept for a human).
    damaged: set[str] = field(default_factory=set)
    # Rank 0, after a restore that found no checkpoint: other tools' checkpoints there (checkpoint.foreign).
    others: list[str] | None = None
    # Rank 0: commit records retention has read (each once; see CommitCache).
    commits: CommitCache = field(default_factory=CommitCache)
