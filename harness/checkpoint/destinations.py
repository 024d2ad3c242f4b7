"""Where each stored tensor of a checkpoint should land: the live tensors of the objects being restored.

:func:`destinations` maps manifest keys to the tensors that already hold that state (parameters, buffers,
existing optimizer state) by encoding the live state dicts with the same encoder and paths the save used, so
the keys agree by construction. A saved key with no live tensor (optimizer state that does not exist yet, in
a freshly built optimizer) maps to the device its parameter lives on, so the reader allocates it once there.
Feed the result to :func:`harness.checkpoint.direct_read.read_into`; decode the manifest's tree with the
tensors it returns and ``load_state_dict`` finds its own tensors already in place (``copy_`` onto itself and
``Optimizer.load_state_dict``'s ``.to(param.device)`` are no-ops).
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping

import torch

from harness.checkpoint import codec
from harness.checkpoint.format import DTYPES, TensorEntry
from harness.state import unwrap_model

Destination = torch.Tensor | torch.device


def live_tensors(models: Mapping[str, torch.nn.Module], optimizers: Mapping[str, torch.optim.Optimizer],
                 prefix: str = "state") -> dict[str, torch.Tensor]:
    """Manifest key -> live tensor for every parameter, buffer and existing optimizer-state tensor.

    The save path encodes ``{"models": ..., "optimizers": ..., ...}`` under ``prefix`` with
    :class:`codec.Encoder`; models and optimizers come first, so encoding just those two sections yields the
    same keys (ties between tensors resolve to the same first key too). Sharded tensors (DTensor) are left
    out: their shards are restored by the sharded path."""
    enc = codec.Encoder()
    enc.encode({"models": {n: unwrap_model(m).state_dict() for n, m in models.items()},
                "optimizers": {n: o.state_dict() for n, o in optimizers.items()}}, prefix)
    return {k: t for k, t in enc.tensors.items() if type(t) is torch.Tensor}


def destinations(entries: Iterable[TensorEntry], models: Mapping[str, torch.nn.Module],
                 optimizers: Mapping[str, torch.optim.Optimizer], prefix: str = "state") -> dict[str, Destination]:
    """For each entry: its live tensor (when it has the saved shape and dtype: anything else stays
    ``load_state_dict``'s business, which refuses, skips or casts it as it always did), or for optimizer state not created yet the device to allocate it on
    (the parameter's; ``step`` counters stay on the CPU as torch keeps them, unless the group is fused or
    capturable). Entries of other sections (scheduler, scaler, extra, per-rank RNG) are left out: the reader
    allocates them on its default device (the CPU)."""
    live = live_tensors(models, optimizers, prefix)
    out: dict[str, Destination] = {}
    pattern = re.compile(re.escape(prefix) + r"/optimizers/(.+)/state/(\d+)/([^/#]+)$")
    for e in entries:
        t = live.get(e.key)
        if t is not None and tuple(t.shape) == tuple(e.shape) and t.dtype == DTYPES[e.dtype]:
            out[e.key] = t
            continue
        if t is not None:
            continue  # another shape or dtype: load_state_dict decides (partial loading, casting)
        m = pattern.match(e.key)
        if m and m.group(1) in optimizers:
            device = _state_device(optimizers[m.group(1)], int(m.group(2)), m.group(3))
            if device is not None:
                out[e.key] = device
    return out


def _state_device(optimizer: torch.optim.Optimizer, index: int, field: str) -> torch.device | None:
    """Where ``Optimizer.load_state_dict`` would put state ``field`` of parameter number ``index``."""
    params = [(p, g) for g in optimizer.param_groups for p in g["params"]]
    if not 0 <= index < len(params):
        return None
    param, group = params[index]
    if field == "step" and not (group.get("fused") or group.get("capturable")):
        return torch.device("cpu")
    return param.device

