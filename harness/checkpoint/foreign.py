"""Checkpoints of other tools where harness's would be: torch.distributed.checkpoint folders (torchtitan's
``step-1000``, or ``checkpoint.dir`` itself), Hugging Face Trainer ``checkpoint-500`` folders, Accelerate's
``checkpoint_3`` folders, DeepSpeed's ``global_step100`` folders and PyTorch Lightning ``.ckpt`` files.

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
# Folders of checkpoints other tools keep side by side: (folder name, prefix to list, file inside, tool).
NESTED = ((re.compile(r"step-\d+"), NAME_PREFIX, DCP_METADATA, "torch.distributed.checkpoint"),  # torchtitan
          (re.compile(r"checkpoint-\d+"), "checkpoint-", "trainer_state.json", "Hugging Face Trainer"),
          (re.compile(r"checkpoint_\d+"), "checkpoint_", "optimizer.bin", "Accelerate"),
          (re.compile(r"global_step\d+"), "global_step", "mp_rank_00_model_states.pt", "DeepSpeed"))


def foreign_checkpoints(storage: Storage, names: set[str] | None = None) -> list[str]:
    """What in the folder is another tool's checkpoint, newest last: "." for the folder itself (a DCP folder),
    then subfolders by the number in their name (torchtitan's ``step-N``, the Trainer's ``checkpoint-N``,
    Accelerate's ``checkpoint_N``), then Lightning's ``.ckpt`` (``last.ckpt`` last). ``names``: the folder's
    entries when they are listed already. Subfolders are listed only when there are names of that pattern."""
    top = set(storage.listdir("")) if names is None else names
    nested: list[str] = []
    for pattern, prefix, marker, _ in NESTED:
        if any(pattern.fullmatch(n) and parse_name(n) is None for n in top):
            inner = storage.list_tree(prefix=prefix)
            nested += sorted((n for n in top if pattern.fullmatch(n) and f"{n}/{marker}" in inner),
                             key=lambda name: int(_STEP.findall(name)[0]))
    lightning = sorted((n for n in top if n.endswith(LIGHTNING_SUFFIX)), key=lambda n: (n == "last.ckpt", n))
    return (["."] if DCP_METADATA in top else []) + nested + lightning


def tool(name: str) -> str:
    """Which tool writes a checkpoint named so (an entry :func:`foreign_checkpoints` found)."""
    if name.endswith(LIGHTNING_SUFFIX):
        return "PyTorch Lightning"
    return next((t for pattern, _, _, t in NESTED if pattern.fullmatch(name)), "torch.distributed.checkpoint")


def refuse_fresh_start(storage: Storage, init_from: str, group: Any, found: list[str] | None = None) -> None:
    """Raise ConfigError on every rank when the run would start over in a folder of another tool's
    checkpoints (no ``checkpoint.init_from``). Collective; rank 0 lists, unless ``found`` (what the restore
    that found nothing listed) says already."""
    problem = None
    if dist.rank() == 0 and not init_from:
        found = foreign_checkpoints(storage) if found is None else found
        if found:
            problem = _why(redact_url(storage.url), found)
    problem = dist.broadcast(problem, group)
    if problem:
        raise ConfigError(problem)


def refuse_before_workers(storage: Storage, init_from: str) -> None:
    """:func:`refuse_fresh_start` for ``harness launch``, before any worker starts (a config error is exit 2
    without a worker start, as the exit-code contract says), when the folder holds no harness checkpoint folder
    at all: one listing. Also a folder that is one harness checkpoint (:func:`inside_one_checkpoint`). A folder
    with some, committed or not, is left to the workers, which read their commit records."""
    inside = inside_one_checkpoint(storage)
    if inside:
        raise ConfigError(inside)
    if init_from:
        return
    names = set(storage.listdir(""))
    if any(parse_name(n) is not None for n in names):
        return
    found = foreign_checkpoints(storage, names)
    if found:
        raise ConfigError(_why(redact_url(storage.url), found))


def inside_one_checkpoint(storage: Storage) -> str | None:
    """Why ``storage`` cannot be a run's checkpoint folder when it is one checkpoint itself (Lightning's
    ``ckpt_path`` habit: ``checkpoint.dir = .../step-000000200``), else None. It started over at step 0 there,
    writing checkpoints and metrics inside a committed checkpoint."""
    from harness.checkpoint.discovery import one_checkpoint
    found = one_checkpoint(storage)
    if found is None:
        return None
    parent, name = found
    shown = redact_url(storage.url)
    return (f"{shown} is one harness checkpoint ({name}), not a folder of them: a run there would start over at "
            f"step 0 and write its checkpoints inside it. To resume that run, use its folder: checkpoint.dir = "
            f"\"{redact_url(parent)}\" (the newest checkpoint there is resumed; `harness ckpt rollback` makes it "
            f"{name}); to start a new run from its weights: checkpoint.init_from = \"{shown}\" with a "
            "checkpoint.dir of its own")


def hint(storage: Storage, found: list[str] | None = None) -> str:
    """For ``harness ckpt list``/``verify`` or a restore finding none of harness's checkpoints: what else is
    there (``found``, else listed now), or ""."""
    found = foreign_checkpoints(storage) if found is None else found
    if not found:
        return ""
    newest, kind, names = _newest(redact_url(storage.url), found)
    if found == ["."]:
        return f" (it is a {kind} checkpoint: `harness ckpt import {newest} NEW_DIR` makes it a harness checkpoint)"
    return (f" (it holds {kind} checkpoints: {names}; `harness ckpt import {newest} NEW_DIR` makes one a harness "
            "checkpoint)")


def _newest(shown: str, found: list[str]) -> tuple[str, str, str]:
    newest = shown if found[-1] == "." else f"{shown.rstrip('/')}/{found[-1]}"
    kind = tool(found[-1])
    return newest, kind, ", ".join("the folder itself" if f == "." else f for f in found[-3:])


def _why(shown: str, found: list[str]) -> str:
    newest, kind, names = _newest(shown, found)
    return (f"checkpoint.dir {shown} holds {kind} checkpoints ({names}) and none of harness's: harness does not "
            "resume from them, and starting over at step 0 beside them is refused. To continue that training, "
            f"`harness ckpt import {newest} NEW_DIR --config CONFIG` and set checkpoint.dir to NEW_DIR; to start "
            f"from its weights, set checkpoint.init_from = \"{newest}\" (with a checkpoint.dir of its own)")
