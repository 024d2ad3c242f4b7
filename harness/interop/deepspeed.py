"""DeepSpeed checkpoints (``engine.save_checkpoint(save_dir)``: ``save_dir/latest`` naming the tag folder,
``global_stepN/mp_rank_00_model_states.pt`` beside the ZeRO optimizer partitions) read as a general checkpoint
for ``harness ckpt import``, and their weights for ``warm_start``, ``load_for_inference`` and
``checkpoint.init_from``.

``mp_rank_00_model_states.pt`` holds the module's state dict (``module``), the LR scheduler's, the global step
and, without ZeRO, the optimizer's state; it is read like any torch file (``weights_only=True``; the
``argparse.Namespace`` DeepSpeed keeps is not built). Under ZeRO the optimizer state lives in
``*zero_pp_rank_*_optim_states.pt`` as flat fp32 partitions: named, not imported (the optimizer starts fresh
from the weights). Under ZeRO-3 the module's tensors are empty placeholders: refused, with the way out
(DeepSpeed's ``zero_to_fp32.py``, which writes a file harness reads). Tensor-parallel checkpoints
(``mp_rank_01``...) are refused too.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import torch

from harness.errors import CheckpointFormatError
from harness.interop import torchload
from harness.storage import Storage

MODEL_STATES = "mp_rank_00_model_states.pt"
LATEST = "latest"
_TAG = re.compile(r"[\w][\w.-]*")
_PARTITION = re.compile(r".*zero_pp_rank_\d+_mp_rank_\d+_optim_states\.pt")


def is_deepspeed(names: set[str]) -> bool:
    return MODEL_STATES in names


def latest_tag(folder: Storage, names: set[str]) -> tuple[str, set[str]] | None:
    """The tag ``save_dir/latest`` names and that folder's entries, when it is a folder of this one that holds
    a checkpoint."""
    if LATEST not in names:
        return None
    tag = folder.read_bytes(LATEST, 0, 256).decode("utf-8", "replace").strip()
    if not _TAG.fullmatch(tag) or ".." in tag or tag not in names:
        return None
    inner = set(folder.listdir(tag))
    return (tag, inner) if MODEL_STATES in inner else None


def read(src: str, names: set[str], load_file: Callable[[str], Any], shown: str,
         models_only: bool = False) -> tuple[dict, list[str], str]:
    """The tag folder as a general checkpoint, notes, and the file read."""
    if any(n.startswith("mp_rank_") and n.endswith("_model_states.pt") and n != MODEL_STATES for n in names):
        raise CheckpointFormatError(f"{shown} is a tensor-parallel DeepSpeed checkpoint (mp_rank_01...): its "
                                    "weights are split across ranks; harness reads mp_rank_00 checkpoints only")
    state = load_file(f"{src.rstrip('/')}/{MODEL_STATES}")
    module = state.get("module") if isinstance(state, dict) else None
    if not isinstance(module, dict):
        raise CheckpointFormatError(f"{shown}/{MODEL_STATES} holds no module state dict")
    _refuse_zero3(module, state.get("param_shapes"), shown)
    out: dict[str, Any] = {"model_state_dict": module}
    notes = [f"a DeepSpeed checkpoint (DeepSpeed {state.get('ds_version', 'version unknown')})",
             *torchload.not_built_notes(state)]
    half = sorted({str(t.dtype).removeprefix("torch.") for t in module.values()
                   if isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16)})
    if half:
        notes.append(f"weights in {', '.join(half)}: DeepSpeed keeps the fp32 master copy in its optimizer state")
    if isinstance(state.get("global_steps"), int):
        out["step"] = state["global_steps"]
    if not models_only:
        if isinstance(state.get("lr_scheduler"), dict):
            out["scheduler_state_dict"] = state["lr_scheduler"]
        if isinstance(state.get("optimizer"), dict) and "state" in state["optimizer"]:
            out["optimizer_state_dict"] = state["optimizer"]
        partitions = sorted(n for n in names if _PARTITION.fullmatch(n))
        if partitions:
            notes.append(f"ZeRO optimizer partitions not imported ({len(partitions)} files, flat fp32 "
                         f"partitions: {partitions[0]}...): the optimizer starts fresh from these weights")
    return out, notes, MODEL_STATES


def _refuse_zero3(module: dict, param_shapes: Any, shown: str) -> None:
    """ZeRO-3 saves empty placeholders for partitioned parameters (their shapes in ``param_shapes``)."""
    shapes: dict = {}
    for group in param_shapes if isinstance(param_shapes, list) else [param_shapes]:
        if isinstance(group, dict):
            shapes.update(group)
    empty = [k for k, t in module.items() if isinstance(t, torch.Tensor) and t.numel() == 0
             and k in shapes and any(int(d) != 0 for d in shapes[k])]
    if empty:
        raise CheckpointFormatError(
            f"{shown} is a ZeRO-3 DeepSpeed checkpoint: its weights ({empty[0]}, ...) are partitioned across the "
            "zero_pp_rank files; run DeepSpeed's zero_to_fp32.py on its folder first (it writes a "
            "pytorch_model.bin or model.safetensors harness reads)")
