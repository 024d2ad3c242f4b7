"""Export one verified checkpoint as a single file for inference or for plain-PyTorch users.

Four formats:

``pt``
    A dict saved with :func:`torch.save` that loads with ``torch.load(FILE, weights_only=True)``. It
    uses the keys of the PyTorch tutorial ("Saving and loading a general checkpoint"):

    - ``epoch``, ``step``, ``loss``, ``metrics``;
    - ``model_state_dict`` / ``optimizer_state_dict`` / ``scheduler_state_dict`` when the checkpoint
      holds exactly one object of that kind;
    - ``model_state_dicts`` / ``optimizer_state_dicts`` / ``scheduler_state_dicts`` (a dict
      name -> state dict) instead when it holds several (a GAN: ``{"generator": ..., "discriminator":
      ...}``). The singular key is then absent, so code written for one model fails loudly rather than
      silently picking one. Each kind is decided on its own: two models and one optimizer give
      ``model_state_dicts`` and ``optimizer_state_dict``. A kind the checkpoint does not hold is absent.
      With ``model=NAME`` only that model is written (``model_state_dict``), with the optimizer and
      scheduler of the same name when there are such;
    - ``scaler_state_dict`` when an AMP grad scaler was saved;
    - ``config``: the run's config when ``harness train`` wrote the checkpoint (``harness ckpt import``
      uses it to rebuild the model);
    - ``checkpoint`` (the source folder name) and ``harness_version``.

    Per-rank state (RNG states, data cursors) and ``extra`` objects are not exported: they only make
    sense for resuming with harness itself.

``safetensors``
    The model weights only, in the safetensors format, written by a small writer of our own (no
    dependency on the ``safetensors`` package). Keys are the model's state_dict keys when the checkpoint
    holds one model (or ``model=NAME`` picks one), ``NAME.key`` when it holds several. ``__metadata__``
    records step, epoch, loss, the source checkpoint and the harness version (all as strings, as the
    format requires).

``torchscript`` and ``onnx``
    A self-contained program of one model in eval mode: :func:`torch.jit.trace` (falling back to
    :func:`torch.jit.script` when the trace does not reproduce the model) saved with
    :func:`torch.jit.save`, or :func:`torch.onnx.export` (the dynamo exporter when ``onnxscript`` is
    installed, else the TorchScript-based one) with a dynamic batch dimension. The model is rebuilt
    from the run's config recorded in the checkpoint (``[model]``/``[data]`` through
    :func:`harness.workloads.build_workload`, or ``train.entry`` for a user workload), its weights
    loaded strictly, and traced on a batch of two dataset items. A checkpoint written by another loop
    has no config: pass ``modules={name: module}`` and ``example_inputs={name: input}``. Every model
    of the checkpoint (or ``model=NAME``) is written: one model to ``out``, several to ``out`` with the
    name inserted before the suffix (``gan.onnx`` -> ``gan.generator.onnx``, ``gan.discriminator.onnx``).
    The result is checked against the eager model (and with onnxruntime, when installed).

``quantize="int8"`` (``torchscript`` and ``pt`` only) applies dynamic int8 quantization to the
``nn.Linear`` layers (:func:`torch.ao.quantization.quantize_dynamic`): int8 weights, activations
quantized on the fly, CPU inference. The ``pt`` file then holds the quantized state dict, which loads
into ``quantize_dynamic(Model(), {nn.Linear}, dtype=torch.qint8)``.

The checkpoint used is the newest one that verifies completely (every checksum), walking back past
damaged ones as restore does, the newest valid one at ``step``, or with ``best=True`` the best valid one
by a metric (``metric``/``mode``; default: the run config's ``checkpoint.best_metric``/``best_mode``,
else ``loss``/``min``). Nothing from the checkpoint is ever unpickled: it is read with
:func:`harness.checkpoint.load.read_state`, or for a sharded checkpoint (ZeRO, FSDP/DTensor) consolidated
into full tensors by :func:`harness.checkpoint.sharded.consolidate`. Each output is written to a
temporary file next to it, fsync'd and renamed, so it is either whole or absent (an existing file is
replaced only by a complete new one).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import inspect
import json
import logging
import os
import struct
import uuid
import warnings
from typing import Any, Callable, IO

import numpy as np
import torch

import harness
from harness.checkpoint import blobs, codec
from harness.checkpoint.discovery import open_checkpoint
from harness.checkpoint.load import load_model_state, read_state
from harness.checkpoint.select import choose, run_config
from harness.errors import CheckpointError, HarnessError
from harness.storage import Storage, redact_url

log = logging.getLogger("harness")

FORMATS = ("pt", "safetensors", "torchscript", "onnx")
QUANTIZE = ("int8",)
QUANTIZE_FORMATS = ("pt", "torchscript")
ONNX_INSTALL_HINT = "pip install 'harness[onnx]' (or: pip install onnx onnxruntime)"

SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.complex64: "C64",
}
for _name, _code in (("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"), ("float8_e4m3fn", "F8_E4M3"),
                     ("float8_e5m2", "F8_E5M2")):
    if isinstance(getattr(torch, _name, None), torch.dtype):
        SAFETENSORS_DTYPES[getattr(torch, _name)] = _code

_KINDS = (("models", "model_state_dict", "model_state_dicts"),
          ("optimizers", "optimizer_state_dict", "optimizer_state_dicts"),
          ("schedulers", "scheduler_state_dict", "scheduler_state_dicts"))


def export_checkpoint(url: str, out: str, *, fmt: str = "pt", step: int | None = None, best: bool = False,
                      metric: str | None = None, mode: str | None = None, model: str | None = None,
                      quantize: str | None = None, modules: Any = None, example_inputs: Any = None,
                      storage_options: dict | None = None, io_threads: int = 4) -> dict:
    """Write the newest valid checkpoint under ``url`` (or the newest valid one at ``step``, or the best
    one by ``metric``/``mode`` with ``best=True``) to the local file ``out`` as ``fmt``: "pt",
    "safetensors", "torchscript" or "onnx" (see the module's documentation).

    ``model``: export only the model of that name. ``quantize="int8"``: dynamic int8 quantization of the
    Linear layers (torchscript and pt). ``modules``/``example_inputs``: the live module(s) and example
    input(s) for torchscript/onnx (and quantized pt) when the checkpoint has no run config, as one object
    or a dict by model name; given modules get the checkpoint's weights loaded in place and are put in
    eval mode.

    Returns a summary dict: checkpoint, step, epoch, loss, format, out, bytes, models, tensors, skipped
    (damaged checkpoints passed over, with reasons), chosen (how the checkpoint was chosen), outputs
    (one {model, out, bytes, check} per file written) and quantized (sizes before/after, or None).

    Raises NoCheckpointError when no committed checkpoint (at ``step``) verifies, and HarnessError for a
    bad argument or a model that cannot be rebuilt; the output files are then left untouched."""
    _check_request(fmt, quantize)
    out = _local_path(out)
    _check_out_folder(out)
    storage = Storage(url, storage_options)

    def load(name: str) -> tuple[Any, dict]:
        manifest = open_checkpoint(storage, name)
        if manifest.raw.get("sharding", "replicated") != "replicated" or any(
                e.global_shape is not None for e in manifest.tensors.values()):
            return manifest, _consolidated(storage, name, io_threads)
        # ranks=None: every referenced tensor is read and verified, like restore's choice
        manifest, state, _ = read_state(storage, name, ranks=None, threads=io_threads)
        return manifest, state

    name, (manifest, state), skipped, how = choose(storage, load, step=step, best=best, metric=metric, mode=mode)
    raw = manifest.raw
    models = dict(state.get("models") or {})
    if model is not None and model not in models:
        raise HarnessError(f"{name} has no model named {model!r} (it has: {', '.join(map(str, models)) or 'none'})")
    names = [model] if model is not None else list(models)
    outputs: list[dict] = []
    quantized = None
    if fmt == "pt":
        if quantize:
            live = _live_modules(name, manifest, models, names, modules, example_inputs)
            qstates, quantized = {}, {"float_bytes": 0, "int8_bytes": 0}
            for n in names:
                module, _ = live[n]
                qmodule = quantize_int8(module)
                qstates[n] = qmodule.state_dict()
                quantized["float_bytes"] += state_bytes(module.state_dict())
                quantized["int8_bytes"] += state_bytes(qstates[n])
            payload = _pt_quantized_payload(raw, qstates)
        else:
            payload = _pt_payload(raw, state, only=model)
        cfg = run_config(manifest)
        if cfg is not None:
            payload["config"] = _weights_only_safe(cfg)
        n_tensors = _count_tensors(payload)
        _atomic_write(out, lambda f: _quietly(torch.save, payload, f))
        outputs.append({"model": model, "out": out, "bytes": os.path.getsize(out), "check": None})
    elif fmt == "safetensors":
        tensors = _safetensors_tensors({n: models[n] for n in names}, name)
        meta = {"format": "pt", "step": str(raw["step"]), "epoch": str(raw["epoch"]),
                "loss": "" if _value(raw, "loss") is None else repr(float(_value(raw, "loss"))),
                "checkpoint": name, "harness_version": harness.__version__}
        if model is not None:
            meta["model"] = model
        n_tensors = len(tensors)
        _atomic_write(out, lambda f: write_safetensors(f, tensors, meta))
        outputs.append({"model": model, "out": out, "bytes": os.path.getsize(out), "check": None})
    else:
        if not names:
            raise CheckpointError(f"{name} holds no model: nothing to export as {fmt}")
        live = _live_modules(name, manifest, models, names, modules, example_inputs)
        n_tensors = 0
        for n in names:
            module, args = live[n]
            path = out if len(names) == 1 else named_path(out, n)
            n_tensors += len(module.state_dict())
            if quantize:
                qmodule = quantize_int8(module)
                quantized = quantized or {"float_bytes": 0, "int8_bytes": 0}
                quantized["float_bytes"] += state_bytes(module.state_dict())
                quantized["int8_bytes"] += state_bytes(qmodule.state_dict())
                module = qmodule
            if fmt == "torchscript":
                program, check = to_torchscript(module, args, what=f"model {n!r}")
                _atomic_write(path, lambda f: _quietly(torch.jit.save, program, f))
            else:
                check = _atomic_produce(path, lambda tmp: to_onnx(module, args, tmp, what=f"model {n!r}"))
            outputs.append({"model": n, "out": path, "bytes": os.path.getsize(path), "check": check})
    if quantized is not None:
        quantized["file_bytes"] = sum(o["bytes"] for o in outputs)
    summary = {"checkpoint": name, "step": raw["step"], "epoch": raw["epoch"], "loss": _value(raw, "loss"),
               "format": fmt, "out": outputs[0]["out"] if len(outputs) == 1 else out,
               "bytes": sum(o["bytes"] for o in outputs), "models": list(models), "tensors": n_tensors,
               "skipped": skipped, "chosen": how, "outputs": outputs, "quantized": quantized}
    log.info("exported %s of %s (%s) to %s (%s, %d tensors)", name, redact_url(url), how,
             ", ".join(o["out"] for o in outputs), fmt, n_tensors)
    return summary


def _consolidated(storage: Storage, name: str, threads: int) -> dict:
    """Full tensors of a sharded checkpoint (ZeRO, FSDP/DTensor), every byte verified."""
    try:
        from harness.checkpoint.sharded import consolidate
    except ImportError:
        raise HarnessError(f"{name} holds sharded state; this harness cannot consolidate it for export") from None
    state, _ = consolidate(storage, name, threads=threads)
    return state


def named_path(out: str, name: str) -> str:
    """``out`` with the model name inserted before the suffix: gan.onnx -> gan.generator.onnx."""
    folder, base = os.path.split(out)
    stem, ext = os.path.splitext(base)
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in str(name)) or "model"
    return os.path.join(folder, f"{stem}.{safe}{ext}")


def _check_request(fmt: str, quantize: str | None) -> None:
    """Refuse impossible combinations before reading anything."""
    if fmt not in FORMATS:
        raise HarnessError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    if quantize is not None:
        if quantize not in QUANTIZE:
            raise HarnessError(f"unknown quantization {quantize!r}: use one of {', '.join(QUANTIZE)}")
        if fmt not in QUANTIZE_FORMATS:
            hint = (" (for ONNX, quantize the exported file with onnxruntime.quantization.quantize_dynamic)"
                    if fmt == "onnx" else " (safetensors holds plain tensors, not int8 packed weights)")
            raise HarnessError(f"--quantize {quantize} works with --format {' or '.join(QUANTIZE_FORMATS)}, "
                               f"not {fmt}{hint}")
        quantize_available()
    if fmt == "onnx" and importlib.util.find_spec("onnx") is None:
        raise HarnessError(f"--format onnx needs the onnx package, which is not installed: {ONNX_INSTALL_HINT}")


# -- rebuilding live models -------------------------------------------------------------------------

def build_from_config(cfg: dict) -> Any:
    """The Workload a run config builds (``train.entry``, else the built-in model/data), as training did."""
    from harness.workloads import build_workload, load_entry_point

    train = cfg.get("train") if isinstance(cfg.get("train"), dict) else {}
    model_cfg, data_cfg = cfg.get("model"), cfg.get("data")
    if not isinstance(model_cfg, dict) or not isinstance(data_cfg, dict):
        raise HarnessError("the run config has no [model]/[data] sections: cannot rebuild the model")
    seed = train.get("seed", 0)
    entry = train.get("entry") or ""
    try:
        builder = load_entry_point(entry) if entry else build_workload
        return builder(dict(model_cfg), dict(data_cfg), seed)
    except ValueError as exc:
        raise HarnessError(f"cannot rebuild the model from the run config: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - user workload code may raise anything
        raise HarnessError(f"cannot rebuild the model from the run config ({entry or 'built-in'}): "
                           f"{type(exc).__name__}: {exc}") from None


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


def _live_modules(ckpt: str, manifest: Any, models: dict, names: list[str], modules: Any,
                  example_inputs: Any) -> dict[str, tuple[torch.nn.Module, tuple]]:
    """name -> (module with the checkpoint's weights, in eval mode; example args)."""
    given = _by_name(modules, names, "module")
    inputs = _by_name(example_inputs, names, "example input")
    workload = None
    if any(n not in given or n not in inputs for n in names):
        cfg = run_config(manifest)
        if cfg is None:
            missing = [n for n in names if n not in given or n not in inputs]
            raise HarnessError(
                f"{ckpt} records no run config (it was not written by `harness train`), so model "
                f"{missing[0]!r} cannot be rebuilt here: export it from Python with harness.checkpoint.export."
                "export_checkpoint(..., modules={NAME: module}, example_inputs={NAME: input})")
        workload = build_from_config(cfg)
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


# -- torchscript, onnx, int8 ------------------------------------------------------------------------

def _flat_outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat_outputs(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _flat_outputs(o)]
    return []


def max_abs_diff(a: Any, b: Any) -> float:
    """Largest absolute difference between two outputs (tensors or nests of them); inf on a shape change."""
    fa, fb = _flat_outputs(a), _flat_outputs(b)
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


def _tolerance(expected: Any) -> float:
    scale = max((float(t.detach().abs().max()) for t in _flat_outputs(expected) if t.numel()), default=1.0)
    return 1e-4 * max(1.0, scale)


def _check_inputs(args: tuple) -> tuple:
    """A batch of another size (the example's first row appended), to catch a batch size baked in."""
    out = []
    for a in args:
        out.append(torch.cat([a, a[:1]]) if isinstance(a, torch.Tensor) and a.dim() > 0 and len(a) else a)
    return tuple(out)


def to_torchscript(module: torch.nn.Module, args: tuple, what: str = "model") -> tuple[Any, dict]:
    """Trace ``module`` on ``args`` (script it when the trace does not reproduce it); returns the program
    and {method, max_abs_diff} measured on a batch of another size."""
    check_args = _check_inputs(args)
    errors = []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarning / deprecation chatter; the result is checked below
        expected = module(*check_args)
        tol = _tolerance(expected)
        for method in ("trace", "script"):
            try:
                program = (torch.jit.trace(module, args, check_trace=False) if method == "trace"
                           else torch.jit.script(module))
                diff = max_abs_diff(program(*check_args), expected)
            except Exception as exc:  # noqa: BLE001 - try the other method, then report both
                errors.append(f"{method}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                continue
            if diff <= tol:
                return program, {"method": method, "max_abs_diff": diff}
            errors.append(f"{method}: output differs from the model by {diff:.3g}")
    raise HarnessError(f"cannot convert {what} to TorchScript: " + "; ".join(errors))


def _onnx_dynamo_available() -> bool:
    return importlib.util.find_spec("onnxscript") is not None


def to_onnx(module: torch.nn.Module, args: tuple, path: str, what: str = "model") -> dict:
    """Export ``module`` to the ONNX file ``path`` with a dynamic batch dimension; returns {exporter,
    max_abs_diff (from onnxruntime, when installed, else None)}."""
    if importlib.util.find_spec("onnx") is None:
        raise HarnessError(f"--format onnx needs the onnx package, which is not installed: {ONNX_INSTALL_HINT}")
    with torch.no_grad():
        expected = module(*args)
    outs = _flat_outputs(expected)
    input_names = ["input"] if len(args) == 1 else [f"input_{i}" for i in range(len(args))]
    output_names = ["output"] if len(outs) == 1 else [f"output_{i}" for i in range(len(outs))]
    axes = {n: {0: "batch"} for n in input_names + output_names}
    kwargs = dict(input_names=input_names, output_names=output_names, dynamic_axes=axes)
    has_dynamo_flag = "dynamo" in inspect.signature(torch.onnx.export).parameters
    errors = []
    exporter = None
    with warnings.catch_warnings(), _quiet_logger("torch.onnx"):
        warnings.simplefilter("ignore")
        if has_dynamo_flag and _onnx_dynamo_available():
            try:
                torch.onnx.export(module, args, path, dynamo=True, external_data=False, verbose=False, **kwargs)
                exporter = "dynamo"
            except Exception as exc:  # noqa: BLE001 - fall back to the TorchScript-based exporter
                errors.append(f"dynamo exporter: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                log.info("ONNX dynamo export failed, using the TorchScript-based exporter: %s", errors[-1])
        if exporter is None:
            try:
                extra = {"dynamo": False} if has_dynamo_flag else {}
                torch.onnx.export(module, args, path, **extra, **kwargs)
                exporter = "torchscript"
            except Exception as exc:  # noqa: BLE001
                errors.append(f"TorchScript-based exporter: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}")
                hint = ("" if _onnx_dynamo_available()
                        else " (the dynamo exporter needs onnxscript: pip install onnxscript)")
                raise HarnessError(f"cannot export {what} to ONNX: " + "; ".join(errors) + hint) from None
    check = {"exporter": exporter, "max_abs_diff": None}
    if importlib.util.find_spec("onnxruntime") is not None:
        check["max_abs_diff"] = _onnxruntime_check(module, args, path, input_names, what)
    return check


def _quietly(fn: Callable, *args: Any) -> Any:
    """Call ``fn`` without torch's deprecation notices (torch.jit.save, quantized tensors' storages)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
        return fn(*args)


@contextlib.contextmanager
def _quiet_logger(name: str, level: int = logging.ERROR) -> Any:
    """The exporter's own chatter (e.g. "torchvision is not installed") is not for our users."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


def _onnxruntime_check(module: torch.nn.Module, args: tuple, path: str, input_names: list[str], what: str) -> float:
    import onnxruntime as ort

    check_args = _check_inputs(args)
    with torch.no_grad():
        expected = module(*check_args)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feed = {n: a.numpy() for n, a in zip(input_names, check_args)}
    got = [torch.from_numpy(np.asarray(o)) for o in session.run(None, feed)]
    diff = max_abs_diff(got, _flat_outputs(expected))
    if diff > _tolerance(expected):
        raise HarnessError(f"ONNX export of {what} does not reproduce the model: onnxruntime output differs by "
                           f"{diff:.3g}")
    return diff


def quantize_available() -> Callable:
    """torch's dynamic quantization function, or a HarnessError saying why it cannot be used here."""
    ao = getattr(torch, "ao", None)
    quant = getattr(getattr(ao, "quantization", None), "quantize_dynamic", None) if ao is not None else None
    if quant is None:
        raise HarnessError(f"--quantize int8 needs torch.ao.quantization.quantize_dynamic, which torch "
                           f"{torch.__version__} does not have (see torchao): export without --quantize")
    engines = [e for e in torch.backends.quantized.supported_engines if e != "none"]
    if not engines:
        raise HarnessError(f"--quantize int8: this torch build ({torch.__version__}) has no quantized CPU "
                           "engine: export without --quantize")
    return quant


def quantize_int8(module: torch.nn.Module) -> torch.nn.Module:
    """Dynamic int8 quantization of the Linear layers of a copy of ``module`` (eval mode)."""
    quant = quantize_available()
    if not any(isinstance(m, torch.nn.Linear) for m in module.modules()):
        raise HarnessError("--quantize int8: the model has no torch.nn.Linear layer to quantize")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao deprecation notices: the feature works, and is checked
        q = quant(copy.deepcopy(module).cpu().eval(), {torch.nn.Linear}, dtype=torch.qint8)
    return q.eval()


def state_bytes(sd: Any) -> int:
    """Bytes of the tensors in a state dict (shared storages counted once; packed int8 params included)."""
    seen: set = set()

    def walk(v: Any) -> int:
        if isinstance(v, torch.Tensor):
            try:
                key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
            except (RuntimeError, NotImplementedError):  # quantized tensors: no plain storage view
                key = (id(v),)
            if key in seen:
                return 0
            seen.add(key)
            return v.numel() * v.element_size()
        if isinstance(v, dict):
            return sum(walk(x) for x in v.values())
        if isinstance(v, (list, tuple)):
            return sum(walk(x) for x in v)
        return 0

    return walk(sd)


# -- pt ---------------------------------------------------------------------------------------------

def _pt_payload(raw: dict, state: dict, only: str | None = None) -> dict:
    payload: dict[str, Any] = {"epoch": raw["epoch"], "step": raw["step"], "loss": _value(raw, "loss"),
                               "metrics": dict(_value(raw, "metrics") or {})}
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
    return _weights_only_safe(payload)


def _pt_quantized_payload(raw: dict, qstates: dict) -> dict:
    payload: dict[str, Any] = {"epoch": raw["epoch"], "step": raw["step"], "loss": _value(raw, "loss"),
                               "metrics": dict(_value(raw, "metrics") or {})}
    if len(qstates) == 1:
        payload["model_state_dict"] = next(iter(qstates.values()))
    else:
        payload["model_state_dicts"] = dict(qstates)
    payload["quantization"] = "dynamic int8 (torch.ao.quantization.quantize_dynamic, torch.nn.Linear, qint8)"
    payload["checkpoint"] = raw["name"]
    payload["harness_version"] = raw.get("harness_version")
    return payload


def _weights_only_safe(obj: Any) -> Any:
    """numpy arrays (which torch.load(weights_only=True) refuses) become tensors; the rest of a decoded
    state is already made of types the weights-only unpickler accepts."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj)
    if isinstance(obj, dict):
        return {k: _weights_only_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_weights_only_safe(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_weights_only_safe(v) for v in obj)
    return obj


def _count_tensors(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return 1
    if isinstance(obj, dict):
        return sum(_count_tensors(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_count_tensors(v) for v in obj)
    return 0


# -- safetensors ------------------------------------------------------------------------------------

def _safetensors_tensors(models: dict, name: str) -> dict[str, torch.Tensor]:
    if not models:
        raise CheckpointError(f"{name} holds no model: nothing to export as safetensors")
    out: dict[str, torch.Tensor] = {}
    for mname, sd in models.items():
        for key, value in sd.items():
            full = key if len(models) == 1 else f"{mname}.{key}"
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"{name}: model {mname!r} entry {key!r} is a {type(value).__name__}, not a "
                                      "tensor; safetensors holds tensors only: export with --format pt")
            if full in out:
                raise CheckpointError(f"{name}: two tensors would both be named {full!r} in the safetensors file")
            out[full] = value
    return out


def write_safetensors(f: IO[bytes], tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """Write ``tensors`` to ``f`` in the safetensors format; returns the bytes written.

    Layout: 8-byte little-endian header length N, N bytes of JSON header (padded with spaces to a
    multiple of 8), then the tensors' raw little-endian bytes back to back, in header order. The header
    maps each name to {dtype, shape, data_offsets: [begin, end]} relative to the end of the header, plus
    ``__metadata__`` (str -> str)."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    pos = 0
    views = []
    for key, t in tensors.items():
        code = SAFETENSORS_DTYPES.get(t.dtype)
        if code is None:
            raise CheckpointError(f"tensor {key!r} has dtype {t.dtype}, which safetensors cannot hold")
        buf = blobs.byte_view(t)
        header[key] = {"dtype": code, "shape": list(t.shape), "data_offsets": [pos, pos + len(buf)]}
        views.append(buf)
        pos += len(buf)
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for buf in views:
        _write_all(f, buf)
    return 8 + len(raw) + pos


def _write_all(f: IO[bytes], buf: memoryview) -> None:
    done = 0
    while done < len(buf):
        n = f.write(buf[done:])
        done += len(buf) - done if n is None else n


# -- output -----------------------------------------------------------------------------------------

def _local_path(out: str) -> str:
    if out.startswith("file://"):
        out = out[len("file://"):]
    elif "://" in out:
        raise HarnessError(f"export writes a local file; got {redact_url(out)!r}")
    if not out:
        raise HarnessError("export needs an output file name")
    return os.path.abspath(out)


def _check_out_folder(out: str) -> None:
    folder = os.path.dirname(out)
    if not os.path.isdir(folder):
        raise HarnessError(f"cannot write {out}: folder {folder} does not exist")
    if os.path.isdir(out):
        raise HarnessError(f"cannot write {out}: it is a folder")


def _atomic_produce(out: str, produce: Callable[[str], Any]) -> Any:
    """Let ``produce(tmp_path)`` write a file next to ``out`` (for writers that want a path, such as
    torch.onnx.export), then fsync it, rename it over ``out`` and fsync the folder. Returns what
    ``produce`` returned."""
    _check_out_folder(out)
    folder = os.path.dirname(out)
    tmp = os.path.join(folder, f".{os.path.basename(out)}.{uuid.uuid4().hex}.tmp")
    try:
        result = produce(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _fsync_folder(folder)
    return result


def _fsync_folder(folder: str) -> None:
    dfd = os.open(folder, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            os.fsync(dfd)
    finally:
        os.close(dfd)


def _atomic_write(out: str, write: Callable[[IO[bytes]], Any]) -> None:
    """Write through ``write`` into a temp file next to ``out``, fsync, rename over ``out``, fsync folder."""
    folder = os.path.dirname(out)
    if not os.path.isdir(folder):
        raise HarnessError(f"cannot write {out}: folder {folder} does not exist")
    if os.path.isdir(out):
        raise HarnessError(f"cannot write {out}: it is a folder")
    tmp = os.path.join(folder, f".{os.path.basename(out)}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # usual permissions (umask applies)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    dfd = os.open(folder, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            os.fsync(dfd)
    finally:
        os.close(dfd)


def _value(raw: dict, key: str) -> Any:
    """A summary value of the manifest (loss, metrics) with codec tags (nan, inf, tuples) decoded."""
    return codec.decode(raw.get(key), lambda _: None)
