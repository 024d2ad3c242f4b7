"""Dynamic int8 quantization for export (``quantize="int8"``, pt and torchscript).

:func:`torch.ao.quantization.quantize_dynamic` on the ``nn.Linear`` layers: int8 weights, activations
quantized on the fly, CPU inference. A ``pt`` export then holds the quantized state dict, which loads into
``quantize_dynamic(Model(), {nn.Linear}, dtype=torch.qint8)``.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Callable

import torch

from harness.errors import HarnessError

QUANTIZE = ("int8",)


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


class Sizes:
    """float vs int8 bytes of the quantized models, for the summary (``file_bytes`` is added by export)."""

    def __init__(self) -> None:
        self.sizes = {"float_bytes": 0, "int8_bytes": 0}

    def quantize(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` quantized, its sizes before and after counted."""
        qmodule = quantize_int8(module)
        self.sizes["float_bytes"] += state_bytes(module.state_dict())
        self.sizes["int8_bytes"] += state_bytes(qmodule.state_dict())
        return qmodule
