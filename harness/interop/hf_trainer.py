"""Hugging Face Trainer checkpoints (``output_dir/checkpoint-500``, what ``Trainer`` saves every ``save_steps``)
read as a general checkpoint: for ``harness ckpt import``, and their weights for ``warm_start``,
``load_for_inference`` and ``checkpoint.init_from``.

Such a folder is a ``save_pretrained`` model folder (``model.safetensors``, or shards and their index) with the
training state beside it: ``optimizer.pt`` and ``scheduler.pt`` (the optimizer's and scheduler's
``state_dict()``), ``scaler.pt`` under fp16, and ``trainer_state.json`` (``global_step``, a fractional
``epoch``, ``log_history`` with the losses). Those are read, torch files with ``weights_only=True``, the JSON as
JSON. The RNG states (``rng_state*.pth``) and ``training_args.bin`` (a pickled ``TrainingArguments``) are named
and left out.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from harness.errors import CheckpointFormatError
from harness.interop import hf
from harness.storage import Storage

STATE = "trainer_state.json"
MAX_STATE_BYTES = 64 << 20
_STATES = (("optimizer.pt", "optimizer_state_dict"), ("scheduler.pt", "scheduler_state_dict"),
           ("scaler.pt", "scaler_state_dict"))
_LEFT_OUT = ("rng_state", "training_args.bin")


def is_trainer(names: set[str]) -> bool:
    return STATE in names


def read(folder: Storage, src: str, names: set[str], load_file: Callable[[str], Any], shown: str,
         models_only: bool = False) -> tuple[dict, list[str], str]:
    """The folder as a general checkpoint, notes, and the files read; ``models_only``: the weights alone."""
    files = hf.weight_files(folder, names)
    if files is None:
        adapter = sorted(n for n in names if n.startswith("adapter_model."))
        raise CheckpointFormatError(f"{shown} is a Hugging Face Trainer checkpoint without model weights"
                                    + (f" ({adapter[0]}: a PEFT adapter, not the model's weights)" if adapter else ""))
    out: dict[str, Any] = {"model_state_dict": hf.read_folder(src, files, load_file)}
    read_files = list(files)
    for name, key in () if models_only else _STATES:
        if name in names:
            out[key] = load_file(f"{src.rstrip('/')}/{name}")
            read_files.append(name)
    state = _trainer_state(folder, shown)
    out.update(_counters(state))
    notes = [f"a Hugging Face Trainer checkpoint (global_step {state.get('global_step', '?')}, "
             f"epoch {state.get('epoch', '?')})"]
    left = sorted(n for n in names if n.startswith(_LEFT_OUT))
    if left:
        notes.append(f"the Trainer's RNG states and arguments not imported: {', '.join(left[:6])}")
    return out, notes, ", ".join(read_files) if len(read_files) < 5 else f"{len(read_files)} files"


def _trainer_state(folder: Storage, shown: str) -> dict:
    try:
        state = hf.read_json(folder, STATE, MAX_STATE_BYTES)
        if not isinstance(state, dict):
            raise ValueError(f"a {type(state).__name__}, not an object")
    except ValueError as exc:
        raise CheckpointFormatError(f"{shown}/{STATE} is not the Trainer's state: {exc}") from None
    return state


def _counters(state: dict) -> dict:
    """step (global_step), epoch (the fractional epoch's whole part: the one being trained) and the last loss."""
    out: dict[str, Any] = {}
    if isinstance(state.get("global_step"), int):
        out["step"] = state["global_step"]
    epoch = state.get("epoch")
    if isinstance(epoch, (int, float)) and not isinstance(epoch, bool) and math.isfinite(epoch) and epoch >= 0:
        out["epoch"] = int(epoch)
    history = state.get("log_history")
    losses = [e["loss"] for e in history if isinstance(e, dict) and isinstance(e.get("loss"), (int, float))] \
        if isinstance(history, list) else []
    if losses:
        out["loss"] = losses[-1]
    return out
