"""Turning a validated checkpoint back into state, and state into live objects."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from harness.checkpoint import blobs, codec
from harness.checkpoint.discovery import open_checkpoint
from harness.checkpoint.format import Manifest
from harness.errors import StateMismatchError
from harness.state import strip_prefix, unwrap_model
from harness.storage import Storage

log = logging.getLogger("harness")


@dataclass
class LoadReport:
    """How a saved state dict matched a model: reported by partial loading."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # key, saved shape, model shape
    loaded: int = 0

    def __str__(self) -> str:
        parts = [f"{self.loaded} tensors loaded"]
        if self.missing:
            parts.append(f"missing: {', '.join(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected: {', '.join(self.unexpected)}")
        if self.mismatched:
            parts.append("shape mismatch: " + ", ".join(f"{k} saved {list(a)} vs model {list(b)}"
                                                         for k, a, b in self.mismatched))
        return "; ".join(parts)


def state_keys(manifest: Manifest, ranks: list[int] | None) -> list:
    """Entries of the replicated state plus those of the given ranks' own state (None: all ranks)."""
    wanted = set(codec.tensor_refs(manifest.raw["state"]))
    for r, tree in enumerate(manifest.raw["ranks"]):
        if ranks is None or r in ranks:
            wanted |= set(codec.tensor_refs(tree))
    return [e for ident, e in manifest.tensors.items() if e.key in wanted]


def read_state(storage: Storage, name: str, *, ranks: list[int] | None = None, threads: int = 4,
               map_location: str | torch.device | None = None) -> tuple[Manifest, dict, list]:
    """Validate ``name`` and load its replicated state and the per-rank states of ``ranks``, verifying
    the checksum of every byte read. Returns (manifest, replicated state, [per-rank state or None])."""
    manifest = open_checkpoint(storage, name)
    tensors = blobs.read_tensors(storage, name, state_keys(manifest, ranks), threads=threads, verify=True)
    if map_location is not None and torch.device(map_location).type != "cpu":
        tensors = {k: t.to(map_location) for k, t in tensors.items()}
    return manifest, *decode_state(manifest, tensors, ranks)


def decode_state(manifest: Manifest, tensors: dict[str, torch.Tensor],
                 ranks: list[int] | None) -> tuple[dict, list]:
    get: Callable[[str], torch.Tensor] = tensors.__getitem__
    state = codec.decode(manifest.raw["state"], get)
    per_rank = [codec.decode(t, get) if ranks is None or r in ranks else None
                for r, t in enumerate(manifest.raw["ranks"])]
    return state, per_rank


def refuse_meta(model: torch.nn.Module, name: str = "model") -> None:
    """A model built on the meta device (``torch.device("meta")``, deferred init) has no memory: torch's
    ``load_state_dict`` skips such tensors with a warning, and the restore reported them loaded. ValueError."""
    meta = [k for k, v in unwrap_model(model).state_dict().items()
            if isinstance(v, torch.Tensor) and getattr(v, "_local_tensor", v).is_meta]
    if meta:
        raise ValueError(f"{name} has {len(meta)} tensor(s) on the meta device ({', '.join(meta[:3])}"
                         f"{', ...' if len(meta) > 3 else ''}): there is no memory to load them into; call "
                         "model.to_empty(device=...) first")


def load_model_state(model: torch.nn.Module, saved: dict, *, strict: bool = True,
                     skip_mismatched: bool = False, name: str = "model") -> LoadReport:
    """Load into a bare or wrapped model. strict=False tolerates missing/unexpected keys; mismatched
    shapes are an error unless skip_mismatched (fine-tuning: load only what fits)."""
    target = unwrap_model(model)
    saved = strip_prefix(saved)
    own = target.state_dict()
    report = LoadReport(missing=[k for k in own if k not in saved], unexpected=[k for k in saved if k not in own])
    report.mismatched = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in saved.items()
                         if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape]
    if strict and (report.missing or report.unexpected or report.mismatched):
        raise StateMismatchError(f"{name}: checkpoint does not match the model ({report})",
                                 "pass strict=False for partial loading")
    if report.mismatched and not skip_mismatched:
        raise StateMismatchError(f"{name}: {report}",
                                 "pass skip_mismatched=True to load only tensors whose shapes match")
    bad = {k for k, _, _ in report.mismatched}
    usable = {k: v for k, v in saved.items() if k in own and k not in bad}
    target.load_state_dict(usable, strict=False)
    report.loaded = len(usable)
    if report.missing or report.unexpected or report.mismatched:
        log.warning("%s: partial load: %s", name, report)
    return report


def class_name(obj: Any) -> str:
    from harness.checkpoint.sharded import inner_optimizer  # here: this module stays light for inference
    obj = inner_optimizer(obj)
    cls = type(unwrap_model(obj) if isinstance(obj, torch.nn.Module) else obj)
    # FSDP2's fully_shard swaps the class for a generated FSDP<Name>(FSDPModule, Name): name the model's own.
    # Recognised by name, not by importing FSDPModule: that import costs ~0.5 s to a process that has no
    # optimizer (load_for_inference), and FSDPModule lives elsewhere in torch 2.5.
    bases = cls.__bases__
    if len(bases) == 2 and bases[0].__name__ == "FSDPModule" and cls.__name__ == f"FSDP{bases[1].__name__}":
        cls = bases[1]
    return f"{cls.__module__}.{cls.__qualname__}"


def saved_class(manifest: Manifest, key: str, name: str) -> str | None:
    """The class an object was saved from, as the manifest records it (None when it does not, or not as a
    mapping of names to strings: informational, never an error)."""
    classes = manifest.raw.get(key)
    cls = classes.get(name) if isinstance(classes, dict) else None
    return cls if isinstance(cls, str) else None
