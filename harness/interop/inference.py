"""Using trained weights outside the training loop: ``harness.load_for_inference`` and
``harness.warm_start``.

Both read weights from a harness checkpoint folder (any fsspec URL; only the models' tensors are read,
every byte verified, walking back past damaged checkpoints) or from a single file: a ``torch.save``
general checkpoint or bare state_dict (read with ``weights_only=True``: nothing is unpickled beyond
tensors and plain containers) or a ``.safetensors`` file, such as ``harness ckpt export`` writes.
Tensors are read on the CPU and copied into the model wherever it lives, so a checkpoint saved on a GPU
loads on a CPU-only machine and the reverse.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch

from harness import dist
from harness.checkpoint.discovery import as_step_of_its_folder, scan
from harness.checkpoint.load import LoadReport, load_model_state, refuse_meta
from harness.checkpoint.select import choose, pick_model, read_models
from harness.errors import CheckpointError, ConfigError, HarnessError
from harness.interop.importer import understand
from harness.interop.sources import foreign_folder, load_file
from harness.state import strip_prefix, unwrap_model
from harness.storage import Storage, redact_url

log = logging.getLogger("harness")

__all__ = ["load_for_inference", "warm_start", "WarmStartReport", "read_weights", "initial_weights"]


@dataclass
class WarmStartReport(LoadReport):
    """A LoadReport that also names what was loaded and from where."""

    source: str = ""
    model: str = ""
    loaded_keys: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """One line per key: loaded, skipped (shape), missing (kept the model's own), unexpected (ignored)."""
        out = [f"loaded      {k}" for k in self.loaded_keys]
        out += [f"shape       {k}: saved {list(a)}, model {list(b)} (kept the model's own)"
                for k, a, b in self.mismatched]
        out += [f"missing     {k} (not in the source; kept the model's own)" for k in self.missing]
        out += [f"unexpected  {k} (not in the model; ignored)" for k in self.unexpected]
        return out


def _check_model(model: object, what: str) -> None:
    """Before anything is read: a module, with memory to load into (not on the meta device)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{what} takes the model (a torch.nn.Module) to load into, got {type(model).__name__}")
    refuse_meta(model)


def _device(device: str | torch.device) -> torch.device:
    """``device`` checked before anything is read: torch said "Invalid device string" or, for "cuda" on a
    machine without one, "Torch not compiled with CUDA enabled" from deep inside ``Module.to``."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device={device!r} is not a device (cpu, cuda, cuda:1, mps, ...): {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but no CUDA device is available here: use device='cpu' (a "
                         "checkpoint saved on a GPU loads on the CPU)")
    return dev


def _is_folder(source: str, storage_options: dict | None) -> bool:
    return Storage(source, storage_options).is_dir()


def read_weights(source: str, *, name: str | None = None, step: int | None = None, best: bool = False,
                 metric: str | None = None, mode: str | None = None,
                 storage_options: dict | None = None) -> tuple[str, str, dict]:
    """One model's state dict from a checkpoint folder or a file: (description of the source, model
    name, state_dict). ``name`` picks a model when there are several."""
    source = os.fspath(source)  # a pathlib.Path too
    shown = redact_url(source)
    if _is_folder(source, storage_options):
        storage = Storage(source, storage_options)
        one = as_step_of_its_folder(storage, storage_options) if step is None and not best else None
        if one is not None:  # a step-N folder itself (Lightning's ckpt_path habit): that step of its folder
            (storage, step), shown = one, redact_url(one[0].url)
        ours = step is not None or best or any(i.committed for i in scan(storage))  # harness's own win: no read
        found = None if ours else foreign_folder(storage, source, shown, models_only=True)
        if found:  # another tool's folder, not a run's checkpoints
            obj, notes, files = found
            model_name, sd = pick_model(understand(obj, shown, notes).models, name, shown)
            return f"{shown} ({files})", model_name, sd
        ckpt, (_, models), skipped, how = choose(storage, lambda n: read_models(storage, n), step=step, best=best,
                                                 metric=metric, mode=mode)
        for n, reason in skipped:
            log.warning("skipped checkpoint %s: %s", n, reason)
        where = f"{shown}/{ckpt}"
        model_name, sd = pick_model(models, name, where)
        return f"{where} ({how})", model_name, sd
    if step is not None or best:
        raise HarnessError(f"{shown} is a file, not a checkpoint folder: step/best do not apply")
    imp = understand(load_file(source), shown)
    model_name, sd = pick_model(imp.models, name, shown)
    return shown, model_name, sd


def load_for_inference(dir: str, model: torch.nn.Module, *, step: int | None = None, best: bool = False,
                       device: str | torch.device | None = None, name: str | None = None,
                       metric: str | None = None, mode: str | None = None, strict: bool = True,
                       storage_options: dict | None = None) -> torch.nn.Module:
    """Load the weights of the newest valid checkpoint in ``dir`` (or the one at ``step``, or the best by
    ``metric``/``mode`` with ``best=True``: default the run config's best_metric/best_mode, else loss/min)
    into ``model`` and return it in eval mode.

    ``device``: move the model there first (e.g. "cpu" for a checkpoint saved on a GPU, "cuda"); by
    default it stays where it is and the weights go to its device. ``name`` picks a model of a
    multi-model checkpoint. ``dir`` may also be a single exported file (pt or safetensors). The load is
    strict (every key and shape must match) unless ``strict=False``. DDP / torch.compile wrappers are
    fine: weights go into the wrapped module."""
    _check_model(model, "load_for_inference")
    if device is not None:
        model = model.to(_device(device))
    where, model_name, sd = read_weights(dir, name=name, step=step, best=best, metric=metric, mode=mode,
                                         storage_options=storage_options)
    load_model_state(model, sd, strict=strict, skip_mismatched=not strict, name=model_name)
    log.info("loaded %s weights from %s", model_name, where)
    return model.eval()


def warm_start(model: torch.nn.Module, source: str, *, name: str | None = None, step: int | None = None,
               storage_options: dict | None = None) -> WarmStartReport:
    """Partial loading from pretrained weights: copy into ``model`` every tensor of ``source`` whose key
    and shape match, keep the model's own values for the rest, and report key by key.

    ``source``: a checkpoint folder (newest valid, or ``step``) or a file (pt general checkpoint, bare
    state_dict, safetensors). ``name`` picks a model of a multi-model source. Returns a
    :class:`WarmStartReport` (a LoadReport): ``loaded_keys``, ``missing`` (in the model only),
    ``unexpected`` (in the source only), ``mismatched`` (key, saved shape, model shape); ``lines()``
    gives one line per key. Nothing is changed in training mode or device."""
    _check_model(model, "warm_start")
    where, model_name, sd = read_weights(source, name=name, step=step, storage_options=storage_options)
    base = load_model_state(model, sd, strict=False, skip_mismatched=True, name=model_name)
    bad = {k for k, _, _ in base.mismatched}
    own = set(unwrap_model(model).state_dict())
    loaded = [k for k in strip_prefix(sd) if k in own and k not in bad]
    report = WarmStartReport(missing=base.missing, unexpected=base.unexpected, mismatched=base.mismatched,
                             loaded=base.loaded, source=where, model=model_name, loaded_keys=loaded)
    log.info("warm start of %s from %s: %s", model_name, where, report)
    return report


def initial_weights(model: torch.nn.Module, source: str, *, storage_options: dict | None = None,
                    group: object = None) -> WarmStartReport | None:
    """``checkpoint.init_from``: rank 0 warm-starts ``model`` from ``source`` (:func:`warm_start`) and every
    rank takes rank 0's parameters and buffers. Collective; one read, as torchtnt reads and broadcasts.
    A source that does not exist or holds none of the model's tensors is a ConfigError on every rank (exit 2),
    one that cannot be read a CheckpointError (exit 3); anything else is re-raised by rank 0 as it is and
    told to the others. Returns rank 0's report, None on the other ranks."""
    report, problem = None, None
    shown = redact_url(source)
    if dist.rank() == 0:
        try:
            report = warm_start(model, source, storage_options=storage_options)
            if not report.loaded_keys:
                problem = ("config", f"checkpoint.init_from: {shown} holds none of the model's tensors ({report})")
        except FileNotFoundError:
            problem = ("config", f"checkpoint.init_from: {shown} does not exist")
        except HarnessError as exc:  # not a checkpoint or weights file, damaged, no valid checkpoint in it
            problem = ("checkpoint", f"checkpoint.init_from: {exc}")
        except Exception as exc:
            dist.broadcast(("other", f"rank 0 could not read checkpoint.init_from {shown}: {exc!r}"), group)
            raise
    problem = dist.broadcast(problem, group)
    if problem:
        kind, why = problem
        raise {"config": ConfigError, "checkpoint": CheckpointError}.get(kind, RuntimeError)(why)
    dist.broadcast_module(model)
    return report
