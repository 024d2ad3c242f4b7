"""Live models for the program formats (torchscript, onnx, quantized pt): rebuilt from the run's config or
given from Python, holding the checkpoint's weights; and the checks that a converted program reproduces them.

The model is rebuilt from the run config recorded in the checkpoint (``[model]``/``[data]``, or
``train.entry`` for a user workload) by :func:`harness.recipe.workload_from_dict`, its weights loaded
strictly, and traced on a batch of two dataset items. A checkpoint written by another loop has no config:
pass ``modules={name: module}`` and ``example_inputs={name: input}``.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch

from harness import recipe
from harness.checkpoint.load import load_model_state
from harness.checkpoint.select import run_config
from harness.errors import CheckpointError, HarnessError
from harness.interop.formats import ExportJob, Written, named_path
from harness.interop.quantize import Sizes


def example_from_dataset(dataset: Any) -> tuple:
    """A batch of two items' inputs (the first field of each item), as the model's positional args."""
    try:
        n = min(2, len(dataset))
    except TypeError:
        n = 2
    items = [dataset[i] for i in range(max(n, 1))]
    inputs = [it[0] if isinstance(it, (tuple, list)) else it for it in items]
    if all(isinstance(x, torch.Tensor) for x in inputs):
        return (torch.stack(inputs),)
    if all(isinstance(x, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in x) for x in inputs):
        return tuple(torch.stack(list(fields)) for fields in zip(*inputs))
    raise HarnessError(f"cannot make an example input from a dataset item's input of type "
                       f"{type(inputs[0]).__name__}: pass example_inputs= from Python")


def _as_args(x: Any) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _by_name(obj: Any, names: list[str], what: str) -> dict:
    """A dict name -> object as given, or one object for the one model exported."""
    if obj is None:
        return {}
    if isinstance(obj, dict):
        return dict(obj)
    if len(names) != 1:
        raise HarnessError(f"the checkpoint holds several models ({', '.join(names)}): give {what}s as a dict "
                           "by model name")
    return {names[0]: obj}


def live_modules(job: ExportJob) -> dict[str, tuple[torch.nn.Module, tuple]]:
    """name -> (module with the checkpoint's weights, in eval mode; example args), for ``job.names``."""
    names, models = job.names, job.models
    given = _by_name(job.modules, names, "module")
    inputs = _by_name(job.example_inputs, names, "example input")
    workload = None
    if any(n not in given or n not in inputs for n in names):
        cfg = run_config(job.manifest)
        if cfg is None:
            missing = [n for n in names if n not in given or n not in inputs]
            raise HarnessError(
                f"{job.checkpoint} records no run config (it was not written by `harness train`), so model "
                f"{missing[0]!r} cannot be rebuilt here: export it from Python with harness.interop.export."
                "export_checkpoint(..., modules={NAME: module}, example_inputs={NAME: input})")
        workload = recipe.workload_from_dict(cfg)
    out = {}
    for n in names:
        module = given.get(n)
        if module is None:
            if n != "model" and len(models) > 1:
                raise HarnessError(f"the run config builds one model (the trainer's 'model'); {n!r} cannot be "
                                   "rebuilt from it: export it from Python with modules=/example_inputs=")
            module = workload.model
        if not isinstance(module, torch.nn.Module):
            raise HarnessError(f"module for {n!r} is a {type(module).__name__}, not a torch.nn.Module")
        args = _as_args(inputs[n]) if n in inputs else example_from_dataset(workload.dataset)
        module = module.cpu()
        load_model_state(module, models[n], strict=True, name=n)
        module.eval()
        out[n] = (module, tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args))
    return out


def write_programs(job: ExportJob, fmt: str, save: Callable[[torch.nn.Module, tuple, str, str], Any]) -> Written:
    """Each model of ``job`` as a program file: ``save(module, example_args, path, what)`` converts and
    writes one (atomically) and returns its check. One model goes to ``job.out``, several to ``job.out``
    with the model name inserted before the suffix."""
    names = job.names
    if not names:
        raise CheckpointError(f"{job.checkpoint} holds no model: nothing to export as {fmt}")
    live = live_modules(job)
    sizes = Sizes() if job.quantize else None
    outputs, n_tensors = [], 0
    for n in names:
        module, args = live[n]
        path = job.out if len(names) == 1 else named_path(job.out, n)
        n_tensors += len(module.state_dict())
        if sizes is not None:
            module = sizes.quantize(module)
        check = save(module, args, path, f"model {n!r}")
        outputs.append({"model": n, "out": path, "bytes": os.path.getsize(path), "check": check})
    return Written(outputs, n_tensors, sizes.sizes if sizes is not None else None)


# -- checking a converted program against the eager model -------------------------------------------

def flat_outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in flat_outputs(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in flat_outputs(o)]
    return []


def max_abs_diff(a: Any, b: Any) -> float:
    """Largest absolute difference between two outputs (tensors or nests of them); inf on a shape change."""
    fa, fb = flat_outputs(a), flat_outputs(b)
    if len(fa) != len(fb) or not fa:
        return float("inf")
    worst = 0.0
    for x, y in zip(fa, fb):
        x, y = torch.as_tensor(x).detach().cpu(), torch.as_tensor(y).detach().cpu()
        if x.shape != y.shape:
            return float("inf")
        if x.numel():
            worst = max(worst, float((x.double() - y.double()).abs().max()))
    return worst


def tolerance(expected: Any) -> float:
    scale = max((float(t.detach().abs().max()) for t in flat_outputs(expected) if t.numel()), default=1.0)
    return 1e-4 * max(1.0, scale)


def check_inputs(args: tuple) -> tuple:
    """A batch of another size (the example's first row appended), to catch a batch size baked in."""
    out = []
    for a in args:
        out.append(torch.cat([a, a[:1]]) if isinstance(a, torch.Tensor) and a.dim() > 0 and len(a) else a)
    return tuple(out)
