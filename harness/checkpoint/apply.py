"""Applying a read checkpoint to live objects, kind by kind, and what restore returns."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from harness import faults
from harness.checkpoint import codec, kinds, sharded
from harness.checkpoint.errors import is_resource_error
from harness.checkpoint.format import Manifest
from harness.checkpoint.kinds import EXTRA, MODELS, OPTIMIZERS, Kind, Targets
from harness.checkpoint.load import LoadReport, class_name, load_model_state, saved_class
from harness.errors import CheckpointError, StateMismatchError
from harness.state import Stateful, models_cuda_device, restore_rng

log = logging.getLogger("harness")


@dataclass(frozen=True)
class RestoreOptions:
    step: int | None = None         # the checkpoint at this step (None: the newest valid one)
    strict: bool = True             # model keys must match exactly
    skip_mismatched: bool = False   # with strict=False: leave tensors whose shapes differ
    rng: bool = True                # restore this rank's RNG states


@dataclass
class RestoreResult:
    """What restore found and applied; the loop continues from ``step``."""

    name: str
    step: int
    epoch: int
    position: Any                     # this rank's data cursor as saved (None for a rank the saving job lacked)
    loss: float | None
    metrics: dict
    metadata: dict
    extra: dict                       # saved extras that were not given as Stateful objects
    rank_state: Any                   # this rank's rank_state as saved
    world_size: int                   # world size at save time
    skipped: list[tuple[str, str]] = field(default_factory=list)  # newer checkpoints skipped, and why
    load_report: dict[str, LoadReport] = field(default_factory=dict)


@contextlib.contextmanager
def loading(what: str, name: str) -> Iterator[None]:
    """A state dict that does not fit its object (another optimizer class, scheduler type...) is a clear
    CheckpointError naming the object, not a KeyError from deep inside torch. Running out of memory, a
    failing accelerator or process group is not the checkpoint's fault: it keeps its type (retryable)."""
    try:
        faults.point("restore.apply", what=what, name=name)
        yield
    except CheckpointError:
        raise
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as exc:
        if is_resource_error(exc):
            raise
        raise StateMismatchError(f"{what} {name!r} cannot take the saved state: {type(exc).__name__}: {exc}") from exc


def pick(saved: dict, name: str, what: str) -> Any:
    if name not in saved:
        have = ", ".join(map(str, saved)) or "none"
        raise StateMismatchError(f"checkpoint has no {what} named {name!r} (it has: {have})")
    return saved[name]


def _models(manifest: Manifest, saved: dict, models: dict, strict: bool, skip_mismatched: bool) -> dict:
    report = {}
    for n, m in models.items():
        saved_cls = saved_class(manifest, "model_classes", n)
        if saved_cls and saved_cls != class_name(m):
            log.warning("model %r was saved from %s and is loaded into %s", n, saved_cls, class_name(m))
        sd = pick(saved, n, "model")
        with loading("model", n):
            if sharded.is_fsdp(m):
                sharded.check_fsdp_keys(m, sd, strict, n)
                sharded.load_fsdp_model(m, sd, strict=strict, name=n)
                report[n] = LoadReport(loaded=len(sd))
            else:
                report[n] = load_model_state(m, sd, strict=strict, skip_mismatched=skip_mismatched, name=n)
    return report


def _optimizers(manifest: Manifest, saved: dict, optimizers: dict, models: dict, skip_mismatched: bool) -> None:
    for n, o in optimizers.items():
        saved_cls = saved_class(manifest, "optimizer_classes", n)
        sd = pick(saved, n, "optimizer")
        check_hyperparameters(o, sd, n, saved_cls)
        if saved_cls and saved_cls != class_name(o):  # Adam's state into AdamW: torch takes the saved settings
            log.warning("optimizer %r was saved from %s and is loaded into %s (with the saved hyperparameters)",
                        n, saved_cls, class_name(o))
        owner = None if sharded.is_zero(o) else sharded._fsdp_model_of(o, models)
        with loading("optimizer", n):
            if sharded.is_zero(o):
                sharded.load_zero(o, sd, n)
            elif owner is not None:
                sharded.load_fsdp_optimizer(owner, o, sd)
            else:  # (an FSDP checkpoint into a plain optimizer: keyed by index first)
                o.load_state_dict(_fit_to_params(o, sharded.fqn_to_index(sd), n, skip_mismatched))


def _fit_to_params(opt: Any, sd: Any, name: str, skip_mismatched: bool) -> Any:
    """The saved state of a torch.optim optimizer, whose per-parameter tensors have their parameter's shape,
    checked against the parameters now: torch loads a moment of another shape without a word (a fine-tuning
    head resized, restored with ``skip_mismatched``: the model skipped it, AdamW took its old [3, 4] moments for
    the new [5, 4] head) and the next ``step()`` fails deep inside. StateMismatchError naming them; with
    ``skip_mismatched`` their state is left out (they start fresh, as the model's skipped tensors do)."""
    if not (type(opt).__module__.startswith("torch.optim") and isinstance(sd, dict)):
        return sd  # another optimizer's state may be factored (Adafactor) or whole-matrix (Shampoo)
    params = [p for g in opt.param_groups for p in g["params"]]
    ids = [i for g in sd.get("param_groups", ()) for i in g.get("params", ())]
    state = sd.get("state")
    if len(ids) != len(params) or not isinstance(state, dict):
        return sd  # torch's load_state_dict names a count that differs
    by_id = dict(zip(ids, params))
    stale = {i: (k, tuple(v.shape), tuple(by_id[i].shape)) for i, st in state.items() if i in by_id
             for k, v in (st.items() if isinstance(st, dict) else ()) if torch.is_tensor(v) and v.dim() > 0
             and v.shape != by_id[i].shape}
    if not stale:
        return sd
    shown = "; ".join(f"parameter {i}: {k} saved {list(a)} vs parameter {list(b)}" for i, (k, a, b) in
                      list(stale.items())[:3])
    if not skip_mismatched:
        raise StateMismatchError(f"optimizer {name!r}: the saved state does not fit the parameters ({shown})",
                                 "pass strict=False, skip_mismatched=True to start those parameters' state afresh")
    log.warning("optimizer %r: state of %d parameter(s) of another shape left out, they start fresh (%s)", name,
                len(stale), shown)
    return {**sd, "state": {i: st for i, st in state.items() if i not in stale}}


def check_hyperparameters(opt: Any, saved: Any, name: str, saved_cls: str | None = None) -> None:
    """Before loading: torch takes another optimizer class's state without a word (AdamW's into SGD: the first
    step fails deep in torch, KeyError 'momentum'; under ZeRO or FSDP the groups are merged and SGD silently
    drops AdamW's moments). Every saved group must hold every hyperparameter of this optimizer (of the one a
    ZeroRedundancyOptimizer partitions), but those its own ``__setstate__`` fills for a state from an older torch."""
    inner = sharded.inner_optimizer(opt)
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if not isinstance(groups, list):
        return  # not an optimizer state at all: load_state_dict says so (loading())
    want = set(getattr(inner, "defaults", None) or {}) - _filled_on_load(inner)
    for i, group in enumerate(groups):
        lacking = sorted(want - set(group)) if isinstance(group, dict) else []
        if lacking:
            raise StateMismatchError(
                f"optimizer {name!r} cannot take the saved state: its saved parameter group {i} has no "
                f"{', '.join(map(repr, lacking))}, which {type(inner).__name__} needs (saved by "
                f"{saved_cls or 'another optimizer?'}; the saved group has "
                f"{', '.join(sorted(str(k) for k in group if k != 'params'))})")


def _filled_on_load(opt: Any) -> set[str]:
    """The group keys ``opt``'s class supplies itself when a loaded state lacks them (torch adds options over
    versions: Adam's 'decoupled_weight_decay', SGD's 'fused'), found on a bare instance, not on ``opt``."""
    probe = object.__new__(type(opt))
    try:
        type(opt).__setstate__(probe, {"defaults": dict(opt.defaults), "state": {},
                                       "param_groups": [{"params": []}]})
    except Exception:  # noqa: BLE001 - a class whose __setstate__ needs more: no key is excused
        return set()
    return set(probe.param_groups[0]) - {"params"}


def _plain_kind(kind: Kind, saved: Any, objs: dict[str, Any]) -> dict:
    """A kind without a sharded form: ``load_state_dict`` each given Stateful object; returns the saved
    entries nobody took (for extras: the plain values restore hands back)."""
    if kind.single:
        if objs and saved is not None:
            with loading(kind.label, kind.label):
                next(iter(objs.values())).load_state_dict(saved)
        return {}
    rest = dict(saved or {})
    for n, o in objs.items():
        if isinstance(o, Stateful):
            with loading(kind.label, n):
                o.load_state_dict(pick(rest, n, kind.label))
            rest.pop(n)
    return rest


def apply(manifest: Manifest, state: dict, mine: Any, targets: Targets, opts: RestoreOptions,
          rank: int) -> RestoreResult:
    """Load ``state`` into the objects of ``targets``, kind by kind in :data:`kinds.KINDS` order, then this rank's
    RNG (last: nothing after it may draw random numbers)."""
    report: dict[str, LoadReport] = {}
    leftover: dict = {}
    for kind in kinds.KINDS:  # read at call time: a kind added to the table is restored too
        objs = targets.of(kind)
        if kind is MODELS:
            report = _models(manifest, state["models"], objs, opts.strict, opts.skip_mismatched)
        elif kind is OPTIMIZERS:
            _optimizers(manifest, state["optimizers"], objs, targets.models, opts.skip_mismatched)
        else:
            rest = _plain_kind(kind, state.get(kind.section), objs)
            if kind is EXTRA:
                leftover = rest
    if mine is None:
        log.warning("checkpoint was written by %d ranks; rank %d has no saved RNG or data position",
                    manifest.world_size, rank)
    elif opts.rng:
        restore_rng(mine["rng"], models_cuda_device(targets.models))
    raw = manifest.raw
    return RestoreResult(name=raw["name"], step=raw["step"], epoch=raw["epoch"],
                         position=None if mine is None else mine["position"], loss=codec.unplain(raw.get("loss")),
                         metrics=codec.unplain(raw.get("metrics")) or {},
                         metadata=codec.unplain(raw.get("metadata")) or {}, extra=leftover,
                         rank_state=None if mine is None else mine["rank_state"], world_size=raw["world_size"],
                         load_report=report)
