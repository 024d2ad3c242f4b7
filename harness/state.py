"""What a checkpoint captures besides tensors: the Stateful protocol, RNG states, model unwrapping."""

from __future__ import annotations

import logging
import random
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

log = logging.getLogger("harness")


@runtime_checkable
class Stateful(Protocol):
    """Anything with state_dict()/load_state_dict() can be checkpointed by name."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state_dict: dict) -> Any: ...


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The bare module under DDP/DataParallel and torch.compile wrappers, so keys carry no prefix.

    Other wrappers in DDP's style (their only state is one child named ``module``) are unwrapped too."""
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        elif _only_wraps_module(model):
            model = model.module
        else:
            return model


def _only_wraps_module(model: torch.nn.Module) -> bool:
    inner = getattr(model, "module", None)
    return (isinstance(model, torch.nn.Module) and isinstance(inner, torch.nn.Module)
            and not model._parameters and not model._buffers
            and [n for n, _ in model.named_children()] == ["module"])


def strip_prefix(state_dict: dict, prefix: str = "module.") -> dict:
    """Drop a wrapper prefix (from DDP models saved by other tools) when every key has it."""
    if state_dict and all(isinstance(k, str) and k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def capture_rng(device: torch.device | int | None = None) -> dict:
    """RNG states of python, numpy (global), torch CPU and the CUDA device this rank trains on.

    Only the rank's own CUDA generator is saved (``device``, default ``torch.cuda.current_device()``, which
    the trainer sets to its LOCAL_RANK's device), recorded by its role rather than by index: a rank sees one
    GPU under ``srun --gpus-per-task=1`` and eight under torchrun, and 2 nodes x 4 GPUs resumed as 1 x 8
    renumbers devices, so "generator #3" would hand a rank another rank's stream."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": {"version": py[0], "state": list(py[1]), "gauss": py[2]},
        "numpy": {"kind": np_state[0], "keys": np_state[1].tolist(), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        index = _cuda_index(device)
        state["cuda"] = {"role": "train_device", "index": index, "state": torch.cuda.get_rng_state(index)}
    return state


def models_cuda_device(models: Any) -> torch.device | None:
    """The CUDA device the first of ``models`` (a dict of them, or an iterable) trains on, or None: the
    generator a loop's dropout draws from is that device's. A loop of your own that moves its model to
    ``cuda:LOCAL_RANK`` without ``torch.cuda.set_device`` has device 0 current: the current device's generator
    would be GPU 0's on every rank, not the rank's own."""
    if not torch.cuda.is_available():
        return None
    for model in (models.values() if isinstance(models, dict) else models):
        tensors = getattr(model, "parameters", None)
        for t in (tensors() if callable(tensors) else ()):
            if t.device.type == "cuda":
                return t.device
    return None


def _cuda_index(device: torch.device | int | None) -> int:
    if device is None:
        return torch.cuda.current_device()
    if isinstance(device, int):
        return device
    return device.index if device.index is not None else torch.cuda.current_device()


def cuda_rng_for_rank(saved: Any, index: int) -> tuple[torch.Tensor | None, str]:
    """The saved CUDA generator state that belongs to the device with ``index`` (this rank's), and a note.

    Current format: ``{"role": "train_device", "index": i, "state": tensor}``, the rank's own generator,
    restored into the rank's own device whatever its index is now. Checkpoints written before this format
    stored a list with the generator of every visible device, by index: a one-element list is the rank's
    only GPU (``--gpus-per-task=1``); a longer one is the torchrun layout (every rank sees every GPU of its
    node and trains on LOCAL_RANK, the current device), so element ``index`` is taken; when there is no such
    element, nothing is restored (the note says so)."""
    if isinstance(saved, dict):
        return saved["state"], ""
    if isinstance(saved, (list, tuple)) and saved:
        if len(saved) == 1:
            return saved[0], "old checkpoint: one CUDA generator saved, restored into this rank's device"
        if index < len(saved):
            return saved[index], (f"old checkpoint: {len(saved)} CUDA generators saved by index, restored "
                                  f"the one of device {index} (this rank's)")
        return None, (f"old checkpoint: {len(saved)} CUDA generators saved by index, none for device {index}: "
                      "CUDA RNG not restored")
    return None, "no CUDA generator state in the checkpoint"


def restore_rng(state: dict, device: torch.device | int | None = None) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None or (isinstance(cuda, (list, tuple)) and not cuda):
        return
    if not torch.cuda.is_available():
        log.warning("checkpoint holds a CUDA RNG state but no CUDA device is available: not restored")
        return
    index = _cuda_index(device)
    gen, note = cuda_rng_for_rank(cuda, index)
    if note:
        log.warning("%s", note)
    if gen is not None:
        torch.cuda.set_rng_state(gen, index)
