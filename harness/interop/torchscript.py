"""The torchscript export format: a self-contained program of each model in eval mode.

:func:`torch.jit.trace` (falling back to :func:`torch.jit.script` when the trace does not reproduce the
model on a batch of another size) saved with :func:`torch.jit.save`. With ``quantize="int8"`` the Linear
layers are quantized first (:mod:`harness.interop.quantize`).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from harness.errors import HarnessError
from harness.interop.formats import ExportFormat, ExportJob, Written, quietly
from harness.interop.live import check_inputs, max_abs_diff, tolerance, write_programs
from harness.storage.local import atomic_write


def to_torchscript(module: torch.nn.Module, args: tuple, what: str = "model") -> tuple[Any, dict]:
    """Trace ``module`` on ``args`` (script it when the trace does not reproduce it); returns the program
    and {method, max_abs_diff} measured on a batch of another size."""
    check_args = check_inputs(args)
    errors = []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarning / deprecation chatter; the result is checked below
        expected = module(*check_args)
        tol = tolerance(expected)
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


def _save(module: torch.nn.Module, args: tuple, path: str, what: str) -> dict:
    program, check = to_torchscript(module, args, what=what)
    atomic_write(path, lambda f: quietly(torch.jit.save, program, f))
    return check


def write(job: ExportJob) -> Written:
    return write_programs(job, "torchscript", _save)


FORMAT = ExportFormat("torchscript", write, quantizable=True, suffixes=(".ts", ".pt", ".pth"))
