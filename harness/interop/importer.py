"""Bringing plain-PyTorch checkpoints into harness: ``harness ckpt import FILE DIR`` and the readers
``harness.warm_start`` uses.

Accepted files:

- a ``torch.save`` *general checkpoint* with the keys of the PyTorch tutorial: ``model_state_dict``,
  ``optimizer_state_dict``, ``scheduler_state_dict``, ``epoch``, ``loss`` (also ``step``, ``metrics``,
  ``scaler_state_dict``, the plural ``*_state_dicts`` of a multi-model file and ``config``, as
  ``harness ckpt export --format pt`` writes them; ``state_dict`` is read as the model's weights);
- a bare ``state_dict`` (every value a tensor), read as the model's weights;
- a PyTorch Lightning checkpoint (``.ckpt``: ``state_dict``, ``optimizer_states``, ``lr_schedulers``,
  ``global_step``), translated by :mod:`harness.interop.lightning`;
- a ``.safetensors`` file (model weights), read by a small checked reader of our own
  (:func:`harness.interop.safetensors.read_safetensors`);
- a folder: a Hugging Face model folder (:mod:`harness.interop.hf`), an Accelerate ``save_state`` folder
  (:mod:`harness.interop.accelerate`) or a torch.distributed.checkpoint folder (:mod:`harness.interop.dcp`).

torch files are read with ``torch.load(FILE, weights_only=True)`` only (:mod:`harness.interop.torchload`): a
file that would call a function as it is unpickled (``os.system``: a lower-case global) is refused with
:class:`~harness.errors.CheckpointFormatError` before any of its code runs; an object of a class harness
does not import (a config dataclass, ``pathlib.Path``, ``argparse.Namespace`` in Lightning's
hyperparameters) is not built either: a stand-in takes its place and a note names it. A ``module.`` (DDP)
or ``_orig_mod.`` (torch.compile) prefix on every key is stripped. Reading the sources is
:mod:`harness.interop.sources`'s; understanding and writing them is this module's.

The checkpoint is written with :class:`harness.CheckpointManager` under the names ``harness train``
uses: model ``model``, optimizer ``optimizer``, scheduler ``scheduler``. Given the run's config
(``config=``, or the ``config`` a harness-exported file carries), the import builds that config's model,
optimizer and scheduler, loads the file's state into them (the model strictly, so a mismatch is reported
now rather than at resume), starts the optimizer fresh where the file has no optimizer state, puts the
config's learning-rate schedule at the imported step where the file's scheduler is not a harness
schedule, and records the config, so ``harness train --config ...`` resumes from the import exactly as
from its own checkpoint.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from harness import lease, recipe
from harness.checkpoint.discovery import list_checkpoints
from harness.checkpoint.load import load_model_state
from harness.errors import CheckpointError, CheckpointFormatError, ConfigError, HarnessError
from harness.interop import lightning, torchload
from harness.interop.sources import read_source
from harness.layout import free_name
from harness.state import capture_rng, restore_rng, strip_prefix
from harness.storage import Storage, redact_url

log = logging.getLogger("harness")

_PREFIXES = ("module.", "_orig_mod.")

# -- understanding what was loaded ------------------------------------------------------------------

@dataclass
class Imported:
    """A plain checkpoint, understood: state dicts by the names harness uses, and the counters."""

    models: dict[str, dict] = field(default_factory=dict)
    optimizers: dict[str, dict] = field(default_factory=dict)
    schedulers: dict[str, dict] = field(default_factory=dict)
    scaler: dict | None = None
    epoch: int | None = None
    step: int | None = None
    loss: float | None = None
    metrics: dict = field(default_factory=dict)
    config: dict | None = None
    bare: bool = False
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what reading the file involved (a Lightning checkpoint)


_SINGLE = {"model_state_dict": "models", "state_dict": "models", "optimizer_state_dict": "optimizers",
           "scheduler_state_dict": "schedulers", "lr_scheduler_state_dict": "schedulers"}
_DEFAULT_NAME = {"models": "model", "optimizers": "optimizer", "schedulers": "scheduler"}
_PLURAL = {"model_state_dicts": "models", "optimizer_state_dicts": "optimizers",
           "scheduler_state_dicts": "schedulers"}
_INFO = {"epoch", "step", "global_step", "loss", "metrics", "config", "scaler_state_dict", "checkpoint",
         "harness_version", "quantization"}


def understand(obj: Any, shown: str = "file", notes: list[str] | None = None) -> Imported:
    """Map a loaded general checkpoint or bare state dict onto harness's names; ``notes``: what reading
    it involved."""
    if not isinstance(obj, dict):
        raise CheckpointFormatError(f"{shown} holds a {type(obj).__name__}; expected a dict: a general checkpoint "
                                    "(model_state_dict, optimizer_state_dict, ...) or a state_dict")
    if "quantization" in obj:
        raise CheckpointFormatError(f"{shown} holds int8-quantized weights (an inference export): they cannot be "
                                    "trained from; import the float export instead")
    imp = Imported(notes=list(notes or []) + torchload.not_built_notes(obj))
    if lightning.is_lightning(obj):
        obj, said = lightning.translate(obj)
        imp.notes += said
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        imp.models["model"], imp.bare = _model_sd(obj, shown, "state_dict"), True
        return imp
    for key, value in obj.items():
        if key in _SINGLE:
            kind = _SINGLE[key]
            if not isinstance(value, dict):
                raise CheckpointFormatError(f"{shown}: {key} is a {type(value).__name__}, not a dict")
            if _DEFAULT_NAME[kind] in getattr(imp, kind):
                imp.ignored.append(key)  # model_state_dict wins over state_dict
                continue
            getattr(imp, kind)[_DEFAULT_NAME[kind]] = _model_sd(value, shown, key) if kind == "models" else value
        elif key in _PLURAL:
            kind = _PLURAL[key]
            if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
                raise CheckpointFormatError(f"{shown}: {key} must map names to state dicts")
            for name, sd in value.items():
                getattr(imp, kind)[str(name)] = _model_sd(sd, shown, f"{key}[{name!r}]") if kind == "models" else sd
        elif key not in _INFO:
            imp.ignored.append(str(key))
    if not imp.models:
        raise CheckpointFormatError(
            f"{shown} has no model weights: expected a bare state_dict (every value a tensor) or a general checkpoint "
            f"with model_state_dict (keys found: {', '.join(map(str, list(obj)[:12]))})")
    imp.epoch = _count(obj.get("epoch"), shown, "epoch")
    imp.step = _count(obj.get("step", obj.get("global_step")), shown, "step")
    imp.loss = _number(obj.get("loss"))
    metrics = obj.get("metrics")
    if isinstance(metrics, dict):
        imp.metrics = {str(k): v for k, v in ((k, _number(v)) for k, v in metrics.items()) if v is not None}
    if isinstance(obj.get("scaler_state_dict"), dict):
        imp.scaler = obj["scaler_state_dict"]
    if isinstance(obj.get("config"), dict):
        imp.config = obj["config"]
    return imp


def _model_sd(sd: dict, shown: str, what: str) -> dict:
    if not all(isinstance(k, str) for k in sd):
        raise CheckpointFormatError(f"{shown}: {what} has non-string keys; not a model state_dict")
    for prefix in _PREFIXES:
        sd = strip_prefix(sd, prefix)
    return dict(sd)


def _count(v: Any, shown: str, what: str) -> int | None:
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or v != int(v):
        raise CheckpointFormatError(f"{shown}: {what} must be a non-negative integer, got {v!r}")
    return int(v)


def _number(v: Any) -> float | None:
    if isinstance(v, torch.Tensor):
        v = v.item() if v.numel() == 1 else None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def optimizer_step(optimizers: dict[str, dict]) -> int | None:
    """The optimizer's own step counter (Adam-style ``state[i]["step"]``), if it keeps one."""
    steps = []
    for sd in optimizers.values():
        state = sd.get("state") if isinstance(sd, dict) else None
        for st in (state or {}).values():
            v = st.get("step") if isinstance(st, dict) else None
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                v = v.item()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0:
                steps.append(int(v))
    return max(steps) if steps else None


# -- writing a harness checkpoint -------------------------------------------------------------------

class ImportedState:
    """A thin Stateful holder: the manager saves whatever state dict it holds."""

    def __init__(self, state: dict) -> None:
        self._state = state

    def state_dict(self) -> dict:
        return self._state

    def load_state_dict(self, state: dict) -> None:
        self._state = state

    @property
    def param_groups(self) -> list:
        """An optimizer's groups as saved (parameter indices, not tensors): for code that asks an optimizer
        which parameters it holds."""
        groups = self._state.get("param_groups") if isinstance(self._state, dict) else None
        return groups if isinstance(groups, list) else []



def import_checkpoint(src: str, url: str, *, step: int | None = None, epoch: int | None = None,
                      config: Any = None, fresh_optimizer: bool = False, dry_run: bool = False,
                      storage_options: dict | None = None, lease_timeout_s: float = 60.0) -> dict:
    """Write the plain checkpoint ``src`` (local path or fsspec URL) as a harness checkpoint under ``url``.

    ``step``: the global step to record (default: the file's ``step``, else the optimizer's own step
    counter, else 0). ``epoch``: default the file's ``epoch``, else 0. ``config``: a
    :class:`harness.config.Config` (or its dict form) of the run that will resume; see the module's
    documentation. ``fresh_optimizer``: ignore the file's optimizer state. ``dry_run``: everything but the
    write (the source read, the config's model, optimizer and schedule built and checked against it, the
    destination checked): the summary says what the import would write.

    Returns a summary: checkpoint, step, step_source, epoch, loss, models, optimizers, schedulers,
    config (bool), notes (list of lines), ignored (file keys not used). Refuses (HarnessError) when
    ``url`` already holds a checkpoint at this step or later: ``harness train`` would resume from that
    one instead; and (LeaseError, exit 3) while a live job holds ``url`` (its lease's heartbeat younger than
    ``lease_timeout_s``): the job's retention would count the import as its own newest, and its next
    restart would resume from it instead of from its own progress."""
    src, url = os.fspath(src), os.fspath(url)  # pathlib.Paths too
    shown = redact_url(src)
    storage = Storage(url, storage_options)
    lease.refuse_if_live(storage, lease_timeout_s, "not importing into it (its retention would take the import for "
                         "its newest checkpoint and a restart would resume from it, not from the job's own); "
                         "import into another folder, or once the job has stopped")
    obj, read_notes = read_source(src, shown, storage_options)
    imp = understand(obj, shown, read_notes)
    notes: list[str] = list(imp.notes)
    cfg = _as_config(config)
    if cfg is None and imp.config is not None:
        try:
            cfg = _as_config(imp.config)
            notes.append("using the run config recorded in the file")
        except ConfigError as exc:
            notes.append(f"the file's run config is not usable here ({exc}); importing without it")
    if fresh_optimizer and imp.optimizers:
        notes.append("optimizer state in the file ignored (fresh optimizer)")
        imp.optimizers = {}
    step, step_source = _step_of(step, imp)
    epoch = epoch if epoch is not None else (imp.epoch or 0)

    later = [i for i in list_checkpoints(storage) if i.step >= step]
    if later:
        raise HarnessError(f"{redact_url(url)} already holds checkpoint {later[-1].name} (step {later[-1].step} >= "
                           f"{step}): harness would resume from it, not from the import; use an empty folder or "
                           "a larger --step")

    metadata: dict[str, Any] = {"imported_from": os.path.basename(shown.rstrip("/")) or shown}
    rng = capture_rng()
    try:
        if cfg is not None:
            objects = _build_with_config(cfg, imp, step, notes)
            metadata.update(recipe.safe_metadata(cfg))
            recipe.seed_everything(cfg.train.seed)  # the RNG state a fresh `harness train` rank 0 starts from
        else:
            objects = _as_stored(imp, notes)
        name = (free_name(step, set(storage.listdir())) if dry_run
                else _write(url, step, epoch, objects, imp, metadata, storage_options))
    finally:
        restore_rng(rng)
    if imp.ignored:
        notes.append(f"keys not imported: {', '.join(imp.ignored)}")
    if not dry_run:
        log.info("imported %s into %s as %s (step %d)", shown, redact_url(url), name, step)
    return {"checkpoint": name, "step": step, "step_source": step_source, "epoch": epoch, "loss": imp.loss,
            "models": list(objects["models"]), "optimizers": list(objects["optimizers"]),
            "schedulers": list(objects["schedulers"]), "config": cfg is not None, "bare": imp.bare,
            "notes": notes, "ignored": imp.ignored}


def _write(url: str, step: int, epoch: int, objects: dict, imp: Imported, metadata: dict,
           storage_options: dict | None) -> str:
    """The import as a committed harness checkpoint; its name."""
    from harness.checkpoint.manager import CheckpointManager

    mgr = CheckpointManager(url, keep_last=0, storage_options=storage_options)
    try:
        mgr.save(step, models=objects["models"], optimizers=objects["optimizers"], schedulers=objects["schedulers"],
                 scaler=ImportedState(imp.scaler) if imp.scaler is not None else None,
                 epoch=epoch, position={"epoch": epoch, "position": 0}, loss=imp.loss, metrics=imp.metrics,
                 metadata=metadata)
        mgr.wait()
        return mgr.last_saved
    finally:
        mgr.close()


def _step_of(step: int | None, imp: Imported) -> tuple[int, str]:
    """The global step to record and where it came from: given, the file's, the optimizer's counter, else 0."""
    if step is not None:
        source = "given"
    elif imp.step is not None:
        step, source = imp.step, "file's step"
    elif optimizer_step(imp.optimizers) is not None:
        step, source = optimizer_step(imp.optimizers), "optimizer's step counter"
    else:
        step, source = 0, "default"
    if step < 0:
        raise HarnessError(f"step must be >= 0, got {step}")
    return step, source


def _as_stored(imp: Imported, notes: list[str]) -> dict:
    """Without a run config: the file's state dicts saved as they are, with notes on what resume will lack."""
    objects = {"models": {n: ImportedState(sd) for n, sd in imp.models.items()},
               "optimizers": {n: ImportedState(sd) for n, sd in imp.optimizers.items()},
               "schedulers": {n: ImportedState(sd) for n, sd in imp.schedulers.items()}}
    odd = [n for n, sd in imp.schedulers.items() if not {"lr_lambdas", "base_lrs", "last_epoch"} <= set(sd)]
    if odd:
        notes.append("the scheduler state is not a LambdaLR's (the scheduler `harness train` builds): to "
                     "resume with `harness train`, import with the run's --config")
    if not imp.optimizers or not imp.schedulers:
        missing = [k for k, v in (("optimizer", imp.optimizers), ("scheduler", imp.schedulers)) if not v]
        notes.append(f"no {' or '.join(missing)} state in the file: to resume with `harness train`, import "
                     "with the run's --config so they are created")
    return objects


def _as_config(config: Any) -> Any:
    if config is None:
        return None
    from harness.config import as_config

    if isinstance(config, dict):  # a recorded config: its storage options were another machine's
        config = copy.deepcopy(config)
        if isinstance(config.get("checkpoint"), dict):
            config["checkpoint"].pop("storage_options", None)
    try:
        return as_config(config, "import's config")
    except TypeError as exc:
        raise HarnessError(str(exc)) from None


def _build_with_config(cfg: Any, imp: Imported, step: int, notes: list[str]) -> dict:
    """The trainer's model, optimizer and scheduler for ``cfg``, holding the file's state."""
    if len(imp.models) != 1:
        raise HarnessError(f"the file holds {len(imp.models)} models ({', '.join(imp.models)}); a run config "
                           "builds one: import without --config")
    (saved_name, sd), = imp.models.items()
    workload = recipe.workload_from_dict(recipe.safe_metadata(cfg)["config"])
    model = workload.model
    try:
        load_model_state(model, sd, strict=True, name="model")
    except CheckpointError as exc:
        raise CheckpointError(f"the file's model weights do not fit the config's model "
                              f"({cfg.model.get('name')}): {exc}") from None
    optimizer = recipe.build_optimizer(cfg, model.parameters())
    scheduler = recipe.build_scheduler(cfg, optimizer)
    osd = next(iter(imp.optimizers.values()), None) if len(imp.optimizers) == 1 else None
    if len(imp.optimizers) > 1:
        notes.append(f"the file holds {len(imp.optimizers)} optimizers; the config's optimizer starts fresh")
    if osd is not None:
        _check_optimizer_fits(cfg, model, osd)
        try:
            optimizer.load_state_dict(osd)
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"the file's optimizer state does not fit the config's optimizer "
                                  f"({cfg.optim.name}): {exc}; pass --fresh-optimizer to start it fresh") from None
    elif len(imp.optimizers) <= 1:
        notes.append(f"no optimizer state in the file: the config's optimizer ({cfg.optim.name}) starts fresh")
    ssd = next(iter(imp.schedulers.values()), None) if len(imp.schedulers) == 1 else None
    if ssd is not None and {"lr_lambdas", "base_lrs", "last_epoch"} <= set(ssd):
        scheduler.load_state_dict(ssd)
    else:
        what = "the file's scheduler is not a harness schedule" if ssd is not None else "no scheduler state in the file"
        _schedule_at(scheduler, step)
        notes.append(f"{what}: using the config's schedule ({cfg.scheduler.name}) at step {step}, "
                     f"lr {scheduler.get_last_lr()[0]:.6g}")
    return {"models": {"model": model}, "optimizers": {"optimizer": optimizer},
            "schedulers": {"scheduler": scheduler}}


def _check_optimizer_fits(cfg: Any, model: torch.nn.Module, osd: dict) -> None:
    """The file's per-parameter optimizer state has what the config's optimizer keeps (Adam's moments,
    SGD's momentum buffer): one probe step on a copy tells which keys that is."""
    state = osd.get("state") if isinstance(osd, dict) else None
    if not isinstance(state, dict) or not isinstance(osd.get("param_groups"), list):
        raise CheckpointError("the file's optimizer_state_dict has no 'state'/'param_groups': not an optimizer "
                              "state; pass --fresh-optimizer to start it fresh")
    if not state:
        return
    probe_model = copy.deepcopy(model)
    probe = recipe.build_optimizer(cfg, probe_model.parameters())
    for p in probe_model.parameters():
        p.grad = torch.zeros_like(p)
    probe.step()
    need = set().union(*(set(s) for s in probe.state_dict()["state"].values())) if probe.state else set()
    for pid, st in state.items():
        missing = need - set(st) if isinstance(st, dict) else need
        if missing:
            raise CheckpointError(f"the file's optimizer state (parameter {pid}: {', '.join(sorted(map(str, st)))}) "
                                  f"lacks {', '.join(sorted(missing))}, which the config's optimizer "
                                  f"({cfg.optim.name}) keeps: set optim.name to the file's optimizer or pass "
                                  "--fresh-optimizer")


def _schedule_at(scheduler: Any, step: int) -> None:
    """Put a freshly built LambdaLR at ``step`` (as if it had been stepped ``step`` times)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scheduler.last_epoch = step - 1
        scheduler.step()
