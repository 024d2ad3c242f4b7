"""PyTorch Lightning checkpoints (``trainer.save_checkpoint``, ``ModelCheckpoint``'s ``.ckpt``) read as
general checkpoints, for ``harness ckpt import``, ``warm_start`` and ``load_for_inference``.

A Lightning checkpoint keeps the LightningModule's weights under ``state_dict`` (keys prefixed with the
attribute that holds the network, ``model.0.weight`` for ``self.model``), its optimizers' and LR schedulers'
states as lists (``optimizer_states``, ``lr_schedulers``), ``epoch`` and ``global_step``. They become the
general checkpoint's model, ``optimizer``/``scheduler`` (``optimizer_1``... when there are several: a GAN),
epoch and step. Lightning's own loop, callback and hyperparameter state has no counterpart here and is
named in a note. The file is read with ``weights_only=True`` like any other (see the importer).
"""

from __future__ import annotations

from typing import Any

VERSION_KEY = "pytorch-lightning_version"
_MAPPED = {"state_dict", "optimizer_states", "lr_schedulers", "epoch", "global_step", VERSION_KEY}


def is_lightning(obj: Any) -> bool:
    return isinstance(obj, dict) and (VERSION_KEY in obj or {"state_dict", "optimizer_states"} <= set(obj))


def translate(obj: dict) -> tuple[dict, list[str]]:
    """The general checkpoint a Lightning one amounts to, and notes on what was done and left out."""
    notes = [f"a PyTorch Lightning checkpoint (Lightning {obj.get(VERSION_KEY, 'version unknown')})"]
    out = {k: obj[k] for k in ("epoch", "global_step") if k in obj}
    weights = obj.get("state_dict")
    if isinstance(weights, dict):
        weights, prefix = _without_module_attribute(weights)
        if prefix:
            notes.append(f"model weights: the LightningModule's attribute prefix {prefix!r} removed")
        out["state_dict"] = weights
    for key, plural, label in (("optimizer_states", "optimizer_state_dicts", "optimizer"),
                               ("lr_schedulers", "scheduler_state_dicts", "scheduler")):
        states = obj.get(key)
        if isinstance(states, list) and states:
            out[plural] = {label if i == 0 else f"{label}_{i}": s for i, s in enumerate(states)}
    rest = [str(k) for k in obj if k not in _MAPPED]
    if rest:
        notes.append(f"Lightning's own state not imported: {', '.join(rest)}")
    return out, notes


def _without_module_attribute(weights: dict) -> tuple[dict, str]:
    """Keys without the one attribute every key starts with (``model.``), when there is one such attribute."""
    heads = {k.split(".", 1)[0] for k in weights if isinstance(k, str)}
    if len(heads) != 1 or not all(isinstance(k, str) and "." in k for k in weights):
        return weights, ""
    prefix = f"{next(iter(heads))}."
    return {k[len(prefix):]: v for k, v in weights.items()}, prefix
