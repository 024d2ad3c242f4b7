"""What a checkpoint holds, by kind: models, optimizers, LR schedulers, the AMP grad scaler, extras.

``CheckpointManager.save``/``restore`` take ``state: dict[str, Stateful]`` (the protocol
torch.distributed.checkpoint uses: ``state_dict()``/``load_state_dict()``) beside the keyword arguments
``models=``, ``optimizers=``, ``schedulers=``, ``scaler=``, ``extra=``. Both become one :class:`Targets`:
every object sorted into its :class:`Kind`. A kind is one entry of :data:`KINDS`: the section of the saved
state tree it lives under and which objects belong to it. Models and optimizers have sharded forms (FSDP2,
ZeRO) that :mod:`harness.checkpoint.sharded` handles; every other kind is saved with ``state_dict()`` and
restored with ``load_state_dict()`` by the generic code below, so a new kind is one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, TypeVar, Union

import torch

from harness.state import Stateful

T = TypeVar("T")

# One object, or a table name -> object (the keyword arguments accept both).
Named = Union[T, Mapping[str, T], None]


@dataclass(frozen=True)
class Kind:
    """One kind of checkpointed state."""

    section: str                      # key in the saved state tree, and the keyword argument of save/restore
    label: str                        # one object of the kind: its default name and the word messages use
    accepts: Callable[[Any], bool]    # whether an entry of ``state=`` is of this kind
    single: bool = False              # stored as one state dict, not a table by name (the AMP grad scaler)


def _is_scheduler(obj: Any) -> bool:
    return isinstance(obj, torch.optim.lr_scheduler.LRScheduler)  # ReduceLROnPlateau included


def _is_scaler(obj: Any) -> bool:
    return isinstance(obj, torch.amp.GradScaler)  # torch.cuda.amp.GradScaler is a subclass


MODELS = Kind("models", "model", lambda o: isinstance(o, torch.nn.Module))
OPTIMIZERS = Kind("optimizers", "optimizer", lambda o: isinstance(o, torch.optim.Optimizer))
SCHEDULERS = Kind("schedulers", "scheduler", _is_scheduler)
SCALER = Kind("scaler", "scaler", _is_scaler, single=True)
EXTRA = Kind("extra", "extra object", lambda o: True)  # anything else: Stateful objects and plain values

# The order is the order of the saved state tree's sections and of restore (models first, extras last);
# the first kind that accepts an object gets it, so EXTRA stays last.
KINDS: tuple[Kind, ...] = (MODELS, OPTIMIZERS, SCHEDULERS, SCALER, EXTRA)


def named(objs: Any, default: str) -> dict[str, Any]:
    """A keyword argument as a table: None -> {}, a mapping as is, one object under ``default``."""
    if objs is None:
        return {}
    if isinstance(objs, Mapping):
        return dict(objs)
    return {default: objs}


def classify(obj: Any) -> Kind:
    return next(k for k in KINDS if k.accepts(obj))


@dataclass
class Targets:
    """The objects one save or restore is about: {kind section: {name: object}}, every kind present."""

    objects: dict[str, dict[str, Any]] = field(default_factory=lambda: {k.section: {} for k in KINDS})
    # (KINDS is looked up when a Targets is made, so a kind added to the table is gathered too)

    def of(self, kind: Kind) -> dict[str, Any]:
        return self.objects.get(kind.section, {})

    @property
    def models(self) -> dict[str, torch.nn.Module]:
        return self.objects[MODELS.section]

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return self.objects[OPTIMIZERS.section]

    def add(self, kind: Kind, name: str, obj: Any) -> None:
        table = self.objects.setdefault(kind.section, {})
        if name in table:
            raise ValueError(f"two {kind.label}s named {name!r} (state= and keyword arguments share names)")
        if kind.single and table:
            raise ValueError(f"a checkpoint holds one {kind.label}; got {next(iter(table))!r} and {name!r}")
        table[name] = obj


def gather(state: Mapping[str, Any] | None = None, **by_section: Any) -> Targets:
    """One :class:`Targets` from the keyword arguments (by section: ``models=``, ``scaler=``...) and the
    entries of ``state`` (each sorted by :func:`classify`). Keyword arguments come first, then ``state``
    in its order: the order of a section is the order its tensors are written."""
    unknown = set(by_section) - {k.section for k in KINDS}
    if unknown:
        raise TypeError(f"unknown kinds of state: {', '.join(sorted(unknown))}")
    targets = Targets()
    for kind in KINDS:
        for name, obj in named(by_section.get(kind.section), kind.label).items():
            targets.add(kind, name, obj)
    for name, obj in (state or {}).items():
        if not isinstance(name, str):
            raise TypeError(f"state names must be strings, got {name!r}")
        targets.add(classify(obj), name, obj)
    return targets


def state_of(obj: Any) -> Any:
    """What is saved for one object: its state dict, or the value itself (a plain extra)."""
    return obj.state_dict() if isinstance(obj, Stateful) else obj


def capture_plain(kind: Kind, objs: dict[str, Any]) -> Any:
    """A kind without a sharded form, as saved: {name: state dict}, or one state dict (None) when single."""
    if kind.single:
        return state_of(next(iter(objs.values()))) if objs else None
    return {n: state_of(o) for n, o in objs.items()}


def storage_key(t: torch.Tensor) -> tuple:
    """Which memory a tensor (or a DTensor's local shard) lives in: views of one storage share the key."""
    local = getattr(t, "_local_tensor", t)  # a DTensor's local shard; any other tensor as is
    return (local.device, local.untyped_storage().data_ptr())


def step_mutated(targets: Targets) -> set[tuple]:
    """The storage of what only the optimizer step changes: the models' parameters and the optimizers' state.
    A forward and backward leave them alone (module buffers, which a forward may update, are not in it),
    which is what lets an overlapped save copy them while the next step computes."""
    keys = set()
    for model in targets.models.values():
        keys.update(storage_key(p) for p in model.parameters())
    for opt in targets.optimizers.values():
        inner = getattr(opt, "optim", opt)  # ZeroRedundancyOptimizer keeps this rank's state in its .optim
        for st in getattr(inner, "state", {}).values():
            keys.update(storage_key(v) for v in st.values() if isinstance(v, torch.Tensor))
    return keys
