"""The pt export format: a dict saved with :func:`torch.save` that loads with
``torch.load(FILE, weights_only=True)``, with the keys of the PyTorch tutorial ("Saving and loading a
general checkpoint"):

- ``epoch``, ``step``, ``loss``, ``metrics``;
- ``model_state_dict`` / ``optimizer_state_dict`` / ``scheduler_state_dict`` when the checkpoint holds
  exactly one object of that kind;
- ``model_state_dicts`` / ``optimizer_state_dicts`` / ``scheduler_state_dicts`` (a dict name -> state
  dict) instead when it holds several (a GAN: ``{"generator": ..., "discriminator": ...}``). The singular
  key is then absent, so code written for one model fails loudly rather than silently picking one. Each
  kind is decided on its own: two models and one optimizer give ``model_state_dicts`` and
  ``optimizer_state_dict``. A kind the checkpoint does not hold is absent. With ``model=NAME`` only that
  model is written (``model_state_dict``), with the optimizer and scheduler of the same name when there
  are such;
- ``scaler_state_dict`` when an AMP grad scaler was saved;
- ``config``: the run's config when ``harness train`` wrote the checkpoint (``harness ckpt import`` uses it
  to rebuild the model);
- ``checkpoint`` (the source folder name) and ``harness_version``.

Per-rank state (RNG states, data cursors) and ``extra`` objects are not exported: they only make sense for
resuming with harness itself. With ``quantize="int8"`` the file holds the int8 state dict(s) of the
models (and ``quantization``) instead of the float state.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from harness.checkpoint.select import run_config
from harness.interop.formats import ExportFormat, ExportJob, Written, quietly, summary_value
from harness.interop.live import live_modules
from harness.interop.quantize import Sizes
from harness.storage.local import atomic_write

_KINDS = (("models", "model_state_dict", "model_state_dicts"),
          ("optimizers", "optimizer_state_dict", "optimizer_state_dicts"),
          ("schedulers", "scheduler_state_dict", "scheduler_state_dicts"))


def write(job: ExportJob) -> Written:
    quantized = None
    if job.quantize:
        live, sizes = live_modules(job), Sizes()
        qstates = {n: sizes.quantize(live[n][0]).state_dict() for n in job.names}
        payload, quantized = _quantized_payload(job.raw, qstates), sizes.sizes
    else:
        payload = _payload(job.raw, job.state, only=job.model)
    cfg = run_config(job.manifest)
    if cfg is not None:
        payload["config"] = weights_only_safe(cfg)
    atomic_write(job.out, lambda f: quietly(torch.save, payload, f))
    return Written([{"model": job.model, "out": job.out, "bytes": os.path.getsize(job.out), "check": None}],
                   count_tensors(payload), quantized)


def _counters(raw: dict) -> dict[str, Any]:
    return {"epoch": raw["epoch"], "step": raw["step"], "loss": summary_value(raw, "loss"),
            "metrics": dict(summary_value(raw, "metrics") or {})}


def _payload(raw: dict, state: dict, only: str | None = None) -> dict:
    payload = _counters(raw)
    n_models = len(state.get("models") or {})
    for kind, one, several in _KINDS:
        objs = dict(state.get(kind) or {})
        if only is not None and (kind == "models" or n_models > 1):
            objs = {only: objs[only]} if only in objs else {}
        if len(objs) == 1:
            payload[one] = next(iter(objs.values()))
        elif objs:
            payload[several] = objs
    if state.get("scaler") is not None:
        payload["scaler_state_dict"] = state["scaler"]
    payload["checkpoint"] = raw["name"]
    payload["harness_version"] = raw.get("harness_version")
    return weights_only_safe(payload)


def _quantized_payload(raw: dict, qstates: dict) -> dict:
    payload = _counters(raw)
    if len(qstates) == 1:
        payload["model_state_dict"] = next(iter(qstates.values()))
    else:
        payload["model_state_dicts"] = dict(qstates)
    payload["quantization"] = "dynamic int8 (torch.ao.quantization.quantize_dynamic, torch.nn.Linear, qint8)"
    payload["checkpoint"] = raw["name"]
    payload["harness_version"] = raw.get("harness_version")
    return payload


def weights_only_safe(obj: Any) -> Any:
    """numpy arrays (which torch.load(weights_only=True) refuses) become tensors; the rest of a decoded
    state is already made of types the weights-only unpickler accepts."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj)
    if isinstance(obj, dict):
        return {k: weights_only_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [weights_only_safe(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(weights_only_safe(v) for v in obj)
    return obj


def count_tensors(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return 1
    if isinstance(obj, dict):
        return sum(count_tensors(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(count_tensors(v) for v in obj)
    return 0


FORMAT = ExportFormat("pt", write, quantizable=True, suffixes=(".pt", ".pth", ".tar"))
