"""The onnx export format: each model in eval mode as an ONNX graph with a dynamic batch dimension.

:func:`torch.onnx.export`: the dynamo exporter when ``onnxscript`` is installed, else the TorchScript-based
one. The result is checked against the eager model with onnxruntime, when installed. Needs the ``onnx``
package (``pip install 'harness[onnx]'``); without it the export is refused before anything is read.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import logging
import warnings
from typing import Any

import numpy as np
import torch

from harness.errors import HarnessError
from harness.interop import torchload
from harness.interop.formats import ExportFormat, ExportJob, Written
from harness.interop.live import check_inputs, flat_outputs, max_abs_diff, tolerance, write_programs
from harness.storage.local import atomic_file

log = logging.getLogger("harness")

ONNX_INSTALL_HINT = "pip install 'harness[onnx]' (or: pip install onnx onnxruntime)"


def require_onnx() -> None:
    """Refuse (one clear line) when the onnx package is missing."""
    if importlib.util.find_spec("onnx") is None:
        raise HarnessError(f"--format onnx needs the onnx package, which is not installed: {ONNX_INSTALL_HINT}")


def _onnx_dynamo_available() -> bool:
    return importlib.util.find_spec("onnxscript") is not None


def to_onnx(module: torch.nn.Module, args: tuple, path: str, what: str = "model") -> dict:
    """Export ``module`` to the ONNX file ``path`` with a dynamic batch dimension; returns {exporter,
    max_abs_diff (from onnxruntime, when installed, else None)}."""
    require_onnx()
    with torch.no_grad():
        expected = module(*args)
    outs = flat_outputs(expected)
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
                errors.append(f"dynamo exporter: {type(exc).__name__}: {torchload.first_line(exc)}")
                log.info("ONNX dynamo export failed, using the TorchScript-based exporter: %s", errors[-1])
        if exporter is None:
            try:
                extra = {"dynamo": False} if has_dynamo_flag else {}
                torch.onnx.export(module, args, path, **extra, **kwargs)
                exporter = "torchscript"
            except Exception as exc:  # noqa: BLE001
                errors.append(f"TorchScript-based exporter: {type(exc).__name__}: {torchload.first_line(exc)}")
                hint = ("" if _onnx_dynamo_available()
                        else " (the dynamo exporter needs onnxscript: pip install onnxscript)")
                raise HarnessError(f"cannot export {what} to ONNX: " + "; ".join(errors) + hint) from None
    check = {"exporter": exporter, "max_abs_diff": None}
    if importlib.util.find_spec("onnxruntime") is not None:
        check["max_abs_diff"] = _onnxruntime_check(module, args, path, input_names, what)
    return check


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

    check_args = check_inputs(args)
    with torch.no_grad():
        expected = module(*check_args)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feed = {n: a.numpy() for n, a in zip(input_names, check_args)}
    got = [torch.from_numpy(np.asarray(o)) for o in session.run(None, feed)]
    diff = max_abs_diff(got, flat_outputs(expected))
    if diff > tolerance(expected):
        raise HarnessError(f"ONNX export of {what} does not reproduce the model: onnxruntime output differs by "
                           f"{diff:.3g}")
    return diff


def _save(module: torch.nn.Module, args: tuple, path: str, what: str) -> dict:
    with atomic_file(path) as tmp:  # torch.onnx.export wants a path: it writes the temp file, we rename it
        return to_onnx(module, args, tmp, what=what)


def write(job: ExportJob) -> Written:
    return write_programs(job, "onnx", _save)


FORMAT = ExportFormat("onnx", write, check=require_onnx, suffixes=(".onnx",),
                      no_quantize_hint=" (for ONNX, quantize the exported file with "
                                       "onnxruntime.quantization.quantize_dynamic)")
