"""A torch.distributed.checkpoint state dict as a general checkpoint (``model_state_dict``,
``optimizer_state_dict``, ``scheduler_state_dict``, ``step``, ``epoch``) for the importer.

DCP keeps whatever nesting the saver chose. The layouts understood:

- the DCP tutorial's ``{"app": AppState}`` (one wrapper key; its ``model``/``optim`` state inside) and a
  plain ``{"model": ..., "optimizer": ...}``;
- torchtitan's: the model's keys at the top level beside ``optimizer``, ``lr_scheduler``, ``train_state``
  (its ``step``) and ``dataloader``; and its final model-only save (the model's keys alone).

Optimizer state comes in three shapes: ``optimizer.state_dict()`` (DCP turned its integer keys into strings),
``get_optimizer_state_dict`` (keyed by parameter name, ``param_groups`` listing names) and the flattened form
torchtitan writes (``state.<param>.<name>``, ``param_groups.<param>.<name>``, resolved against the model's
keys). Each becomes the id-keyed ``optimizer.state_dict()`` with parameters numbered in ``param_groups`` order,
the order a fresh optimizer over ``model.parameters()`` has.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from harness.errors import CheckpointFormatError
from harness.interop import dcp, lightning, torchload
from harness.storage import Storage

_MODEL = ("model", "model_state_dict", "state_dict", "module")
_OPTIMIZER = ("optimizer", "optim", "optimizer_state_dict")
_SCHEDULER = ("lr_scheduler", "scheduler", "lr_scheduler_state_dict", "scheduler_state_dict")
_COUNTERS = ("step", "epoch", "loss")
_NUMBERED_OPTIMIZER = re.compile(r"optimizer_\d+")
LIGHTNING_META = "meta.pt"
_TRAIN_STATE = "train_state"


def read(storage: Storage, shown: str, models_only: bool = False) -> tuple[dict, list[str], str]:
    """A DCP folder as a general checkpoint, notes on what reading it involved, and what was read.
    ``models_only``: optimizer and scheduler state is not read (warm_start needs the weights alone)."""
    skip = set(_OPTIMIZER) | set(_SCHEDULER) if models_only else set()

    def keep(path: tuple) -> bool:  # [:2]: under one wrapper key too
        return not models_only or not (skip & set(path[:2]) or _NUMBERED_OPTIMIZER.fullmatch(str(path[0])))
    found = dcp.read_folder(storage, shown, keep=keep)
    names = found.layout.files()
    files = ", ".join(names) if len(names) < 4 else f"{len(names)} files"
    notes = [f"a torch.distributed.checkpoint folder: {len(found.layout.tensors)} tensors in {files or 'no files'}"]
    if found.skipped:
        notes.append("values not read (loading them would need unpickling Python objects; nothing from them ran): "
                     + ", ".join(f"{k} ({why})" for k, why in list(found.skipped.items())[:8]))
    out = general(found.state, notes)
    if LIGHTNING_META in found.layout.listed:  # from the listing the metadata was checked against
        _with_lightning_meta(storage, out, notes, models_only)
    return out, notes, files


def general(state: dict, notes: list[str]) -> dict:
    """The general checkpoint ``state`` (a DCP state dict, nested as saved) amounts to."""
    state = _unwrapped(state, notes)
    out: dict[str, Any] = {}
    used = set(_COUNTERS) | {_TRAIN_STATE}
    model_key = next((k for k in _MODEL if isinstance(state.get(k), dict)), None)
    loose = {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and k not in _COUNTERS}
    model = state[model_key] if model_key else loose
    if model_key:
        used.add(model_key)
    elif loose:
        used |= set(loose)
        notes.append("model weights: the tensors at the top level (torchtitan keeps the model's keys there)")
    if model:
        out["model_state_dict"] = model
    optimizers = [k for k in _OPTIMIZER if isinstance(state.get(k), dict)][:1] or sorted(
        (k for k in state if _NUMBERED_OPTIMIZER.fullmatch(str(k)) and isinstance(state[k], dict)),
        key=lambda k: int(k.rpartition("_")[2]))  # else Lightning's sharded save: optimizer_0, ...
    used.update(optimizers)
    put_numbered(out, [optimizer_by_ids(state[k], list(model), notes) for k in optimizers], "optimizer")
    scheduler_key = next((k for k in _SCHEDULER if isinstance(state.get(k), dict)), None)
    if scheduler_key:
        used.add(scheduler_key)
        scheduler = _scheduler(state[scheduler_key], notes)
        if scheduler is not None:
            out["scheduler_state_dict"] = scheduler
    train_state = state.get(_TRAIN_STATE) if isinstance(state.get(_TRAIN_STATE), dict) else {}
    for key in _COUNTERS:
        value = state.get(key, train_state.get(key))
        if value is not None:
            out[key] = value
    rest = [str(k) for k in state if k not in used]
    if rest:
        notes.append(f"DCP state not imported: {', '.join(rest[:12])}")
    return out


def put_numbered(out: dict, states: list, kind: str) -> None:
    """One optimizer's (scheduler's) state under the tutorial's key, several by name (``optimizer_1``...)."""
    if len(states) == 1:
        out[f"{kind}_state_dict"] = states[0]
    elif states:
        out[f"{kind}_state_dicts"] = {kind if i == 0 else f"{kind}_{i}": sd for i, sd in enumerate(states)}


def _with_lightning_meta(storage: Storage, out: dict, notes: list[str], models_only: bool) -> None:
    """Lightning's sharded checkpoints (FSDPStrategy, ModelParallelStrategy) keep what is not a tensor in
    ``meta.pt`` beside the DCP files: epoch, global_step, LR schedulers (loops and callbacks are left out)."""
    try:
        with storage.open_read(LIGHTNING_META) as f:
            meta = torchload.load(f, stand_in_classes=True)
    except (torchload.NeedsObjects, torchload.NotReadable) as exc:
        notes.append(f"{LIGHTNING_META} not read ({exc})")
        return
    if not isinstance(meta, dict):
        return
    notes.append(f"a PyTorch Lightning sharded checkpoint (Lightning {meta.get(lightning.VERSION_KEY, 'version')}"
                 f"): epoch, step and LR schedulers from {LIGHTNING_META}")
    notes += torchload.not_built_notes(meta)
    for key, source in (("epoch", "epoch"), ("step", "global_step")):
        if meta.get(source) is not None:
            out.setdefault(key, meta[source])
    schedulers = meta.get("lr_schedulers")
    if not models_only and isinstance(schedulers, list) and "scheduler_state_dict" not in out:
        put_numbered(out, [s for s in schedulers if isinstance(s, dict)], "scheduler")


def _unwrapped(state: dict, notes: list[str]) -> dict:
    """The state inside a single wrapper key (``{"app": AppState}``), as the DCP tutorial saves it."""
    known = set(_MODEL) | set(_OPTIMIZER) | set(_SCHEDULER)
    while len(state) == 1:
        (key, inner), = state.items()
        if key in known or not isinstance(inner, dict) or not inner:
            break
        notes.append(f"the state saved under {key!r}")
        state = inner
    return state


def optimizer_by_ids(osd: Any, model_keys: list[str], notes: list[str]) -> Any:
    """``osd`` as ``optimizer.state_dict()`` has it: state keyed by parameter index."""
    if not isinstance(osd, dict):
        return osd
    flattened = "state" not in osd and any(str(k).startswith(("state.", "param_groups.")) for k in osd)
    if flattened:
        osd = _unflattened(osd, model_keys, notes)
    groups, state = osd.get("param_groups"), osd.get("state", {})
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups) or not isinstance(state, dict):
        return osd
    names = [p for g in groups for p in g.get("params", [])]
    if names and all(isinstance(p, str) for p in names):
        return _numbered(osd, groups, state, names, [] if flattened else notes)  # one note is enough
    if all(isinstance(k, str) and k.isdigit() for k in state):  # a plain state_dict(): DCP made its keys strings
        return {**osd, "state": {int(k): v for k, v in state.items()}}
    return osd


def _numbered(osd: dict, groups: list[dict], state: dict, names: list[str], notes: list[str]) -> dict:
    ids = {name: i for i, name in enumerate(names)}
    if len(ids) != len(names):
        raise CheckpointFormatError("the optimizer's param_groups name a parameter twice")
    stray = [k for k in state if k not in ids]
    if stray:
        raise CheckpointFormatError(f"the optimizer holds state for {stray[:3]}, which no param_group lists")
    notes.append("optimizer state keyed by parameter name: numbered in param_groups order "
                 "(the order of model.parameters() for an optimizer built over them)")
    return {**osd, "state": {ids[name]: value for name, value in state.items()},
            "param_groups": [{**g, "params": [ids[p] for p in g.get("params", [])]} for g in groups]}


def _unflattened(flat: dict, model_keys: list[str], notes: list[str]) -> dict:
    """torchtitan's flattened optimizer state (``flatten_optimizer_state_dict=True``) by parameter name;
    parameters with equal hyperparameters share a group, in the model's order."""
    longest_first = sorted(model_keys, key=len, reverse=True)
    state: dict[str, dict] = {}
    hyper: dict[str, dict] = {}
    for key, value in flat.items():
        head, _, rest = str(key).partition(".")
        fqn = next((k for k in longest_first if rest.startswith(f"{k}.")), None)
        if head not in ("state", "param_groups") or fqn is None:
            raise CheckpointFormatError(f"flattened optimizer key {key!r} names no parameter of the model")
        (state if head == "state" else hyper).setdefault(fqn, {})[rest[len(fqn) + 1:]] = value
    groups: list[dict] = []
    for fqn in (k for k in model_keys if k in hyper):
        group = next((g for g in groups if _same({k: v for k, v in g.items() if k != "params"}, hyper[fqn])), None)
        if group is None:
            groups.append({**hyper[fqn], "params": [fqn]})
        else:
            group["params"].append(fqn)
    notes.append(f"optimizer state flattened by parameter name: {len(groups)} param group(s) rebuilt")
    return {"state": state, "param_groups": groups}


def _same(a: dict, b: dict) -> bool:
    if set(a) != set(b):
        return False
    return all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) if isinstance(a[k], torch.Tensor)
               or isinstance(b[k], torch.Tensor) else a[k] == b[k] for k in a)


def _scheduler(sd: dict, notes: list[str]) -> dict | None:
    if "last_epoch" in sd:
        return sd
    inner = [v for v in sd.values() if isinstance(v, dict) and "last_epoch" in v]
    if inner and len(inner) == len(sd):  # torchtitan's container: one scheduler per model part, all alike
        if len(inner) > 1:
            notes.append(f"the first of {len(inner)} LR schedulers imported")
        return inner[0]
    notes.append("the LR scheduler state is not a torch scheduler's state_dict: not imported")
    return None
