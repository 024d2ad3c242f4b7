"""Checkpoints of other tools where harness's would be: torch.distributed.checkpoint folders (torchtitan's
``step-1000``, or ``checkpoint.dir`` itself) and PyTorch Lightning ``.ckpt`` files.

harness resumes only from its own checkpoints, so a ``checkpoint.dir`` that holds only these would be
started over from step 0, silently, with the user's previous training beside it. A user moving a run over
from torchtitan or Lightning means something else; :func:`refuse_fresh_start` says what (import it, or start
from its weights) as a config error on every rank.
"""

from __future__ import annotations

import re
from typing import Any

from harness import dist
from harness.errors import ConfigError
from harness.layout import NAME_PREFIX, parse_name
from harness.storage import Storage, redact_url

DCP_METADATA = ".metadata"
LIGHTNING_SUFFIX = ".ckpt"
_STEP = re.compile(r"\d+")


def foreign_checkpoints(storage: Storage, names: set[str] | None = None) -> list[str]:
    """What in the folder is another tool's checkpoint, newest last: "." for the folder itself, DCP
    ``step-N`` subfolders by N, then Lightning files (``last.ckpt`` last). ``names``: the folder's entries
    when they are listed already. The subfolders are listed only when there are step-N names not harness's."""
    top = set(storage.listdir("")) if names is None else names
    others = any(n.startswith(NAME_PREFIX) and parse_name(n) is None for n in top)
    dcp = [rel.partition("/")[0] for rel in (storage.list_tree(prefix=NAME_PREFIX) if others else {})
           if rel.partition("/")[2] == DCP_METADATA and parse_name(rel.partition("/")[0]) is None]
    dcp.sort(key=lambda name: [int(n) for n in _STEP.findall(name)] or [0])
    lightning = sorted((n for n in top if n.endswith(LIGHTNING_SUFFIX)), key=lambda n: (n == "last.ckpt", n))
    return (["."] if DCP_METADATA in top else []) + dcp + lightning


def refuse_fresh_start(storage: Storage, init_from: str, group: Any) -> None:
    """Raise ConfigError on every rank when the run would start over in a folder of another tool's
    checkpoints (no ``checkpoint.init_from``). Collective; rank 0 lists."""
    problem = None
    if dist.rank() == 0 and not init_from:
        found = foreign_checkpoints(storage)
        if found:
            problem = _why(redact_url(storage.url), found)
    problem = dist.broadcast(problem, group)
    if problem:
        raise ConfigError(problem)


def hint(storage: Storage) -> str:
    """For ``harness ckpt list``/``verify`` finding none of harness's checkpoints: what else is there, or ""."""
    found = foreign_checkpoints(storage)
    if not found:
        return ""
    newest, kind, names = _newest(redact_url(storage.url), found)
    if found == ["."]:
        return f" (it is a {kind} checkpoint: `harness ckpt import {newest} NEW_DIR` makes it a harness checkpoint)"
    return (f" (it holds {kind} checkpoints: {names}; `harness ckpt import {newest} NEW_DIR` makes one a harness "
            "checkpoint)")


def _newest(shown: str, found: list[str]) -> tuple[str, str, str]:
    newest = shown if found[-1] == "." else f"{shown.rstrip('/')}/{found[-1]}"
    kind = "PyTorch Lightning" if newest.endswith(LIGHTNING_SUFFIX) else "torch.distributed.checkpoint"
    return newest, kind, ", ".join("the folder itself" if f == "." else f for f in found[-3:])


def _why(shown: str, found: list[str]) -> str:
    newest, kind, names = _newest(shown, found)
    return (f"checkpoint.dir {shown} holds {kind} checkpoints ({names}) and none of harness's: harness does not "
            "resume from them, and starting over at step 0 beside them is refused. To continue that training, "
            f"`harness ckpt import {newest} NEW_DIR --config CONFIG` and set checkpoint.dir to NEW_DIR; to start "
            f"from its weights, set checkpoint.init_from = \"{newest}\" (with a checkpoint.dir of its own)")
