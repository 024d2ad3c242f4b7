"""Export one verified checkpoint as a single file for inference or for plain-PyTorch users.

The driver: check the request, choose the checkpoint, read (or consolidate) it, and hand it to the
registered format (:mod:`harness.interop.formats`). Built-in formats, one module each:

``pt`` (:mod:`harness.interop.pt`)
    A dict with the PyTorch tutorial's keys (``epoch``, ``model_state_dict``, ``optimizer_state_dict``,
    ``scheduler_state_dict``, ``loss``, ...) that loads with ``torch.load(FILE, weights_only=True)``.
``safetensors`` (:mod:`harness.interop.safetensors`)
    The model weights only, written by a small writer of our own.
``torchscript`` and ``onnx`` (:mod:`harness.interop.torchscript`, :mod:`harness.interop.onnx`)
    A self-contained program of each model in eval mode, rebuilt from the run's config recorded in the
    checkpoint (or ``modules=``/``example_inputs=`` from Python, :mod:`harness.interop.live`) and checked
    against the eager model. One model is written to ``out``, several to ``out`` with the name inserted
    before the suffix (``gan.onnx`` -> ``gan.generator.onnx``, ``gan.discriminator.onnx``).

``quantize="int8"`` (``torchscript`` and ``pt`` only): dynamic int8 quantization of the ``nn.Linear``
layers (:mod:`harness.interop.quantize`).

The checkpoint used is the newest one that verifies completely (every checksum), walking back past
damaged ones as restore does, the newest valid one at ``step``, or with ``best=True`` the best valid one
by a metric (``metric``/``mode``; default: the run config's ``checkpoint.best_metric``/``best_mode``,
else ``loss``/``min``). Nothing from the checkpoint is ever unpickled: it is read with
:func:`harness.checkpoint.load.read_state`, or for a sharded checkpoint (ZeRO, FSDP/DTensor) consolidated
into full tensors by :func:`harness.checkpoint.sharded.consolidate`. Each output is written with the
project's atomic local writer, so it is either whole or absent (an existing file is replaced only by a
complete new one).
"""

from __future__ import annotations

import errno
import logging
import os
from typing import Any

from harness.checkpoint.discovery import open_checkpoint
from harness.checkpoint.load import read_state
from harness.checkpoint.select import choose
from harness.errors import HarnessError, cause_chain
from harness.interop import onnx, pt, safetensors, torchscript
from harness.interop.formats import (ExportFormat, ExportJob, format_for, get, quantizable, register, registered,
                                     suffix_mismatch, summary_value)
from harness.interop.quantize import QUANTIZE, quantize_available
from harness.storage import Storage, redact_url
from harness.storage.local import replaceable

log = logging.getLogger("harness")

# The registry's built-in entries: a new format is one module defining FORMAT and one entry here (or a
# register() call from outside).
for _module in (pt, safetensors, torchscript, onnx):
    register(_module.FORMAT)

FORMATS = registered()
__all__ = ["export_checkpoint", "FORMATS", "QUANTIZE"]


def export_checkpoint(url: str, out: str, *, fmt: str | None = None, step: int | None = None, best: bool = False,
                      metric: str | None = None, mode: str | None = None, model: str | None = None,
                      quantize: str | None = None, modules: Any = None, example_inputs: Any = None,
                      storage_options: dict | None = None, io_threads: int = 4) -> dict:
    """Write the newest valid checkpoint under ``url`` (or the newest valid one at ``step``, or the best
    one by ``metric``/``mode`` with ``best=True``) to the local file ``out`` as ``fmt``: "pt",
    "safetensors", "torchscript" or "onnx" (see the module's documentation); by default the one ``out``'s
    file name ending names (``.pt``/``.pth``/``.tar`` pt, ``.safetensors``, ``.ts`` torchscript, ``.onnx``),
    else pt.

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
    url, out = os.fspath(url), _local_path(os.fspath(out))  # pathlib.Paths too
    spec = _check_request(fmt or format_for(out) or "pt", quantize)
    other = suffix_mismatch(spec, out)
    if other is not None:
        raise HarnessError(f"{os.path.basename(out)} is named as a {other} file, but the format is {spec.name}: "
                           f"use --format {other} (fmt={other!r}), or a name that fits")
    _check_out_folder(out)
    storage = Storage(url, storage_options)
    name, (manifest, state), skipped, how = choose(storage, lambda n: _read(storage, n, io_threads), step=step,
                                                   best=best, metric=metric, mode=mode)
    models = dict(state.get("models") or {})
    if model is not None and model not in models:
        raise HarnessError(f"{name} has no model named {model!r} (it has: {', '.join(map(str, models)) or 'none'})")
    job = ExportJob(checkpoint=name, manifest=manifest, state=state, out=out, model=model, quantize=quantize,
                    modules=modules, example_inputs=example_inputs)
    written = _write(spec, job)
    outputs, raw = written.outputs, manifest.raw
    if written.quantized is not None:
        written.quantized["file_bytes"] = sum(o["bytes"] for o in outputs)
    summary = {"checkpoint": name, "step": raw["step"], "epoch": raw["epoch"], "loss": summary_value(raw, "loss"),
               "format": spec.name, "out": outputs[0]["out"] if len(outputs) == 1 else out,
               "bytes": sum(o["bytes"] for o in outputs), "models": list(models), "tensors": written.tensors,
               "skipped": skipped, "chosen": how, "outputs": outputs, "quantized": written.quantized}
    log.info("exported %s of %s (%s) to %s (%s, %d tensors)", name, redact_url(url), how,
             ", ".join(o["out"] for o in outputs), fmt, written.tensors)
    return summary


def _read(storage: Storage, name: str, threads: int) -> tuple[Any, dict]:
    """(manifest, full replicated state) of checkpoint ``name``, every byte verified."""
    manifest = open_checkpoint(storage, name)
    if manifest.raw.get("sharding", "replicated") != "replicated" or any(
            e.global_shape is not None for e in manifest.tensors.values()):
        return manifest, _consolidated(storage, name, threads)
    # ranks=None: every referenced tensor is read and verified, like restore's choice
    manifest, state, _ = read_state(storage, name, ranks=None, threads=threads)
    return manifest, state


def _consolidated(storage: Storage, name: str, threads: int) -> dict:
    """Full tensors of a sharded checkpoint (ZeRO, FSDP/DTensor), every byte verified."""
    try:
        from harness.checkpoint.sharded import consolidate
    except ImportError:
        raise HarnessError(f"{name} holds sharded state; this harness cannot consolidate it for export") from None
    state, _ = consolidate(storage, name, threads=threads)
    return state


def _check_request(fmt: str, quantize: str | None) -> ExportFormat:
    """The registered format, or a refusal of an impossible combination before anything is read."""
    spec = get(fmt)
    if spec is None:
        raise HarnessError(f"unknown export format {fmt!r}: use one of {', '.join(registered())}")
    if quantize is not None:
        if quantize not in QUANTIZE:
            raise HarnessError(f"unknown quantization {quantize!r}: use one of {', '.join(QUANTIZE)}")
        if not spec.quantizable:
            raise HarnessError(f"--quantize {quantize} works with --format {' or '.join(quantizable())}, "
                               f"not {fmt}{spec.no_quantize_hint}")
        quantize_available()
    if spec.check is not None:
        spec.check()
    return spec


def _local_path(out: str) -> str:
    out = os.path.expanduser(out) if out.startswith("~") else out  # as the checkpoint folder's ~ is the home
    if out.startswith("file://"):
        out = out[len("file://"):]
    elif "://" in out:
        raise HarnessError(f"export writes a local file; got {redact_url(out)!r}")
    if not out:
        raise HarnessError("export needs an output file name")
    return os.path.abspath(out)


FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # the disk, a quota or a file-size limit: no room for the file


def _write(spec: ExportFormat, job: ExportJob) -> Any:
    """``spec.write(job)``; no room for the output is one OSError naming the file, whatever the writing library
    wrapped it in (``torch.save``'s zip writer turns ENOSPC into RuntimeError "unexpected pos")."""
    try:
        return spec.write(job)
    except Exception as exc:
        full = next((e for e in cause_chain(exc) if isinstance(e, OSError) and e.errno in FULL), None)
        if full is None:
            raise
        raise OSError(full.errno, f"cannot write {job.out}: {full.strerror}") from None


def _check_out_folder(out: str) -> None:
    folder = os.path.dirname(out)
    if not os.path.isdir(folder):
        raise HarnessError(f"cannot write {out}: folder {folder} does not exist")
    if os.path.isdir(out):
        raise HarnessError(f"cannot write {out}: it is a folder")
    try:
        replaceable(out)  # what atomic_file will refuse, said before any checkpoint is read: /dev/null, a pipe
    except FileExistsError:
        raise HarnessError(f"cannot write {out}: it is not a regular file (export writes a file whole, then "
                           "renames it into place)") from None
