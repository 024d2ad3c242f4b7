"""The export format registry: what a format is given, what it returns, and how it is registered.

A format is one module defining ``FORMAT = ExportFormat(name, write, ...)``; :func:`register` makes it
known to :func:`harness.interop.export.export_checkpoint` (the built-in ones are registered by that module).
``write`` receives an :class:`ExportJob` (the chosen checkpoint, already read and verified, and the request)
and returns :class:`Written`; it writes each output with :func:`harness.storage.local.atomic_write` or
:func:`~harness.storage.local.atomic_file`, so a file is either whole or absent.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable

from harness.checkpoint import codec


@dataclass
class ExportJob:
    """One export request, with the checkpoint it chose: decoded replicated state, every byte verified."""

    checkpoint: str                 # the checkpoint folder's name (step-000000004)
    manifest: Any                   # its validated Manifest (raw summary values, run config)
    state: dict                     # models / optimizers / schedulers / scaler / extra, full tensors
    out: str                        # absolute local output path
    model: str | None = None        # export only this model
    quantize: str | None = None     # "int8" (formats with quantizable=True only)
    modules: Any = None             # live module(s) given from Python, one or a dict by model name
    example_inputs: Any = None      # example input(s) for tracing, likewise

    @property
    def raw(self) -> dict:
        return self.manifest.raw

    @property
    def models(self) -> dict:
        return dict(self.state.get("models") or {})

    @property
    def names(self) -> list[str]:
        """The models to export: the one asked for, else all of them."""
        return [self.model] if self.model is not None else list(self.models)


@dataclass
class Written:
    """What a format wrote: one {model, out, bytes, check} per file, the tensor count, int8 sizes or None."""

    outputs: list[dict]
    tensors: int
    quantized: dict | None = None


@dataclass(frozen=True)
class ExportFormat:
    """A registered export format."""

    name: str
    write: Callable[[ExportJob], Written]
    quantizable: bool = False       # accepts quantize="int8"
    no_quantize_hint: str = ""      # appended to the refusal when it does not
    check: Callable[[], None] | None = None  # raise HarnessError early when a dependency is missing
    suffixes: tuple[str, ...] = ()  # file name endings of this format (another format's ending is refused)


_REGISTRY: dict[str, ExportFormat] = {}


def register(fmt: ExportFormat) -> ExportFormat:
    """Make ``fmt`` available to export (a later registration of the same name replaces it)."""
    _REGISTRY[fmt.name] = fmt
    return fmt


def get(name: str) -> ExportFormat | None:
    return _REGISTRY.get(name)


def registered() -> tuple[str, ...]:
    """Names of the registered formats, in registration order."""
    return tuple(_REGISTRY)


def suffix_mismatch(fmt: ExportFormat, out: str) -> str | None:
    """The format whose file name ending ``out`` has, when that is not ``fmt``'s: ``--format pt --out
    model.safetensors`` wrote a pickle that safetensors' loader then refuses, and the reverse."""
    ext = os.path.splitext(out)[1].lower()
    if not ext or ext in fmt.suffixes:
        return None
    return next((f.name for f in _REGISTRY.values() if ext in f.suffixes), None)


def format_for(out: str) -> str | None:
    """The format a file name ending names, for an export without a format: the one that lists it first
    (``.pt`` is pt's first ending and torchscript's second: the PyTorch tutorial's dict, not a traced model)."""
    ext = os.path.splitext(out)[1].lower()
    ranked = [(f.suffixes.index(ext), i, f.name) for i, f in enumerate(_REGISTRY.values()) if ext in f.suffixes]
    return min(ranked)[2] if ext and ranked else None


def known_suffixes() -> list[str]:
    return sorted({s for f in _REGISTRY.values() for s in f.suffixes})


def quantizable() -> tuple[str, ...]:
    return tuple(n for n, f in _REGISTRY.items() if f.quantizable)


# -- small things several formats share -------------------------------------------------------------

def summary_value(raw: dict, key: str) -> Any:
    """A summary value of the manifest (loss, metrics) with codec tags (nan, inf, tuples) decoded."""
    return codec.decode(raw.get(key), lambda _: None)


def named_path(out: str, name: str) -> str:
    """``out`` with the model name inserted before the suffix: gan.onnx -> gan.generator.onnx."""
    folder, base = os.path.split(out)
    stem, ext = os.path.splitext(base)
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in str(name)) or "model"
    return os.path.join(folder, f"{stem}.{safe}{ext}")


def quietly(fn: Callable, *args: Any) -> Any:
    """Call ``fn`` without torch's deprecation notices (torch.jit.save, quantized tensors' storages)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
        return fn(*args)
