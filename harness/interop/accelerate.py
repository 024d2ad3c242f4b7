"""Hugging Face Accelerate ``save_state`` folders (``accelerator.save_state()``, ``checkpoints/checkpoint_N``)
read as a general checkpoint: the source behind ``harness ckpt import`` for them, and their weights for
``warm_start``, ``load_for_inference`` and ``checkpoint.init_from``.

``save_state`` writes each prepared model as ``model.safetensors`` (``pytorch_model.bin`` without safe
serialization; ``model_1.safetensors``... for the second and later), each optimizer's ``state_dict()`` as
``optimizer.bin`` (``optimizer_1.bin``...), each scheduler's as ``scheduler.bin``, the AMP scaler's as
``scaler.pt``, and per-process RNG states (``random_states_0.pkl``), sampler and dataloader states and custom
objects beside them. Under FSDP the model is ``pytorch_model_fsdp.bin`` (full state dict) or the DCP folder
``pytorch_model_fsdp_0/`` (sharded state dict, ``{"model": ...}``), and the optimizer's state, keyed by
parameter name, ``optimizer.bin`` or the DCP folder ``optimizer_0/`` (``{"optimizer": ...}``).

The models, optimizers, schedulers and scaler are read, with the same checked readers as any weights file
(torch files with ``weights_only=True``, DCP folders by :mod:`harness.interop.dcp`). The RNG states need numpy
objects unpickled, the sampler is a pickled object, and Accelerate's own step counter lives in the RNG file:
they are named in a note and left out (the step comes from the optimizer's counter, as for any file without
one).
"""

from __future__ import annotations

import re
from typing import Any, Callable

from harness.interop import dcp, dcp_general
from harness.storage import Storage

# save_state writes these beside the weights; save_pretrained never does
MARKERS = ("optimizer.bin", "scheduler.bin", "scaler.pt", "optimizer_0", "pytorch_model_fsdp_0")
_MODEL_FILES = (("model", ".safetensors"), ("pytorch_model", ".bin"), ("pytorch_model_fsdp", ".bin"))
_SHARDED = {"model": "pytorch_model_fsdp_", "optimizer": "optimizer_"}  # + index: DCP folders
_DCP_FOLDER = re.compile("(" + "|".join(map(re.escape, _SHARDED.values())) + r")\d+")
_LEFT_OUT = ("random_states_", "sampler", "dl_state_dict", "custom_checkpoint_")


def is_accelerate(names: set[str]) -> bool:
    return any(marker in names for marker in MARKERS)


def read(folder: Storage, names: set[str], load_file: Callable[[str], Any], shown: str,
         models_only: bool = False) -> tuple[dict, list[str], str]:
    """The folder as a general checkpoint, notes, and the files read; ``models_only``: the weights alone
    (warm_start and the like: the optimizer's files, twice the model's size for Adam, are not read)."""
    read_files: list[str] = []
    notes = ["an Accelerate save_state folder"]

    def load(name: str) -> Any:
        read_files.append(name)
        if _DCP_FOLDER.fullmatch(name):  # {"model": ...} or {"optimizer": ...}
            found = dcp.read_folder(folder.child(name), f"{shown}/{name}")
            if found.skipped:
                notes.append(f"{name}: values not read (they need unpickling Python objects): "
                             + ", ".join(list(found.skipped)[:6]))
            return found.state.get("model", found.state.get("optimizer", found.state))
        return load_file(f"{folder.url.rstrip('/')}/{name}")

    out: dict[str, Any] = {}
    models = [load(n) for n in _numbered(names, _MODEL_FILES, _SHARDED["model"])]
    dcp_general.put_numbered(out, models, "model")
    for stem in () if models_only else ("optimizer", "scheduler"):
        states = [load(n) for n in _numbered(names, ((stem, ".bin"),), _SHARDED.get(stem))]
        if stem == "optimizer":  # FSDP's optim_state_dict is keyed by parameter name
            states = [dcp_general.optimizer_by_ids(v, list(models[0] if models else {}), notes) for v in states]
        dcp_general.put_numbered(out, states, stem)
    if "scaler.pt" in names and not models_only:
        out["scaler_state_dict"] = load("scaler.pt")
    left = sorted(n for n in names if n.startswith(_LEFT_OUT))
    if left:
        notes.append(f"Accelerate's RNG, sampler and custom states not imported: {', '.join(left[:6])}")
    return out, notes, ", ".join(read_files)


def _n(i: int) -> str:
    return f"_{i}" if i else ""


def _numbered(names: set[str], candidates: tuple[tuple[str, str], ...], sharded: str | None) -> list[str]:
    """``stem.ext``, ``stem_1.ext``, ... as long as they follow on, for the first stem/ext present; else the
    DCP folders ``sharded0``, ``sharded1``, ..."""
    for stem, ext in candidates:
        found, i = [], 0
        while f"{stem}{_n(i)}{ext}" in names:
            found.append(f"{stem}{_n(i)}{ext}")
            i += 1
        if found:
            return found
    found = []
    while sharded and f"{sharded}{len(found)}" in names:
        found.append(f"{sharded}{len(found)}")
    return found
