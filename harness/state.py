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


def capture_rng() -> dict:
    """RNG states of python, numpy (global), torch CPU and every CUDA device of this process."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": {"version": py[0], "state": list(py[1]), "gauss": py[2]},
        "numpy": {"kind": np_state[0], "keys": np_state[1].tolist(), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if len(cuda) != count:
            log.warning("checkpoint holds RNG states of %d CUDA devices, this process sees %d: restoring %d",
                        len(cuda), count, min(len(cuda), count))
        for i, s in enumerate(cuda[:count]):
            torch.cuda.set_rng_state(s, i)
    elif cuda:
        log.warning("checkpoint holds CUDA RNG states but no CUDA device is available: not restored")
