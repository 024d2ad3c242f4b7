"""What a run config builds: the workload (model, data, loss), the optimizer, the LR schedule and the seed.

One place for the trainer, ``harness ckpt export`` (rebuilding the model for TorchScript/ONNX) and
``harness ckpt import`` (building the optimizer and schedule a resumed run will use), so an imported or
exported checkpoint holds exactly the objects ``harness train`` makes. It depends on config and workloads
only; ``checkpoint/`` and ``storage/`` never import it.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import random
from typing import Any, Callable, Mapping

import numpy as np
import torch

from harness import torchcompat
from harness.config import Config
from harness.data import BatchLoader, ResumableSampler
from harness.errors import ConfigError, HarnessError
from harness.workloads import Workload, build_workload, load_entry_point

WorkloadBuilder = Callable[[dict, dict, int], Workload]

__all__ = ["WorkloadBuilder", "seed_everything", "build_optimizer", "build_scheduler", "fsdp_wrap",
           "safe_metadata", "schedule_changes", "workload", "materialize", "initialize", "workload_from_dict",
           "ddp_wrap", "loader", "training_state_bytes"]


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch: the RNG state a fresh rank starts from (the trainer seeds
    ``train.seed + rank``; the importer seeds as rank 0, so a run resumed from an import is reproducible)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(cfg: Config, params: Any, zero: bool = False) -> torch.optim.Optimizer:
    """The configured optimizer; with ``zero`` a ZeroRedundancyOptimizer wrapping that class (each rank keeps
    the state of its partition of the parameters)."""
    o = cfg.optim
    if o.name == "sgd":
        cls, kwargs = torch.optim.SGD, {"lr": o.lr, "momentum": o.momentum, "weight_decay": o.weight_decay}
    else:
        cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
        kwargs = {"lr": o.lr, "weight_decay": o.weight_decay}
    if zero:
        from torch.distributed.optim import ZeroRedundancyOptimizer
        return ZeroRedundancyOptimizer(params, optimizer_class=cls, **kwargs)
    return cls(params, **kwargs)


_SCHEDULE_KEYS = {"none": (), "cosine": (("scheduler", "min_lr_ratio"), ("train", "max_steps")),
                  "step": (("scheduler", "gamma"), ("scheduler", "step_size"))}


def schedule_changes(saved: Any, cfg: Config) -> list[str]:
    """The settings the LR schedule is drawn from that differ from the saved run config's (a checkpoint's
    ``metadata["config"]``), as ``"key old -> new"``; [] when none differ or nothing was saved. A resumed
    schedule keeps the checkpoint's step count but takes its shape from the config: a change moves the LR."""
    if not isinstance(saved, dict):
        return []
    now = dataclasses.asdict(cfg)
    names = {now["scheduler"]["name"], (saved.get("scheduler") or {}).get("name")}
    keys = [("scheduler", "name"), ("scheduler", "warmup_steps")]
    keys += sorted({key for name in names for key in _SCHEDULE_KEYS.get(name, ())})
    changes = []
    for section, key in keys:
        old = saved.get(section).get(key) if isinstance(saved.get(section), dict) else None
        if old is not None and old != now[section][key]:
            changes.append(f"{section}.{key} {old!r} -> {now[section][key]!r}")
    return changes


def fsdp_wrap(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2: fully_shard each block (each child holding parameters of the root's ModuleList/Sequential
    containers: GPT's ``blocks``, the MLP's layers), then the root, which keeps the rest (embeddings, a
    head tied to them)."""
    fully_shard = torchcompat.fully_shard()  # a ConfigError (exit 2) on a torch too old for it
    for child in model.children():
        if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential)):
            for block in child.children():
                if any(True for _ in block.parameters()):
                    fully_shard(block)
    fully_shard(model)
    return model


def ddp_wrap(model: torch.nn.Module, device: torch.device, *, init_sync: bool = True) -> torch.nn.Module:
    """DistributedDataParallel around ``model``. ``init_sync=False`` skips DDP's broadcast of rank 0's weights
    at construction, for weights a restore or an explicit broadcast sets afterwards (the keyword exists from
    torch 2.6; older torch broadcasts anyway, which is only slower)."""
    ddp = torch.nn.parallel.DistributedDataParallel
    kwargs = {}
    if not init_sync and "init_sync" in inspect.signature(ddp.__init__).parameters:
        kwargs["init_sync"] = False
    return ddp(model, device_ids=[device.index] if device.type == "cuda" else None, **kwargs)


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """Warmup then cosine/step/constant, as one LambdaLR: its state is just counters (no closures saved)."""
    s, total = cfg.scheduler, cfg.train.max_steps

    def factor(step: int) -> float:
        if step < s.warmup_steps:
            return (step + 1) / s.warmup_steps
        if s.name == "cosine":
            progress = min(1.0, (step - s.warmup_steps) / max(1, total - s.warmup_steps))
            return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        if s.name == "step":
            return s.gamma ** ((step - s.warmup_steps) // s.step_size)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def safe_metadata(cfg: Config) -> dict:
    """The run's config as the manifest records it (``{"config": dict}``), minus ``checkpoint.storage_options``
    (they may hold credentials). The one config-to-dict: the trainer's checkpoints and imports both use it."""
    d = dataclasses.asdict(cfg)
    d["checkpoint"].pop("storage_options", None)
    return {"config": d}


def workload(cfg: Config, builder: WorkloadBuilder | None = None, *, deferred: bool = False) -> Workload:
    """The run's Workload: ``builder`` when given, else ``train.entry``'s, else the built-in model/data.
    A bad entry point or model/data section is a ConfigError (exit 2, found before any worker starts).

    ``deferred`` (built-in workloads only; a user's builder always builds for real): the model on the meta
    device, initial weights not drawn; :func:`materialize` and :func:`initialize` finish it."""
    if builder is None and cfg.train.entry:
        try:
            builder = load_entry_point(cfg.train.entry)
        except ValueError as exc:
            raise ConfigError(f"train.entry: {exc}") from None
    args = (dict(cfg.model), dict(cfg.data), cfg.train.seed)
    name = f"train.entry: {cfg.train.entry!r}" if cfg.train.entry else "the workload builder"
    if builder is not None:
        _check_callable_as_builder(builder, args, name)
    try:
        if builder is None:
            return build_workload(*args, deferred=deferred)
        return _checked_workload(builder(*args), name)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _check_callable_as_builder(builder: Callable, args: tuple, name: str) -> None:
    """A builder that cannot take ``(model_cfg, data_cfg, seed)`` is a ConfigError before it is called: every
    worker would fail the same way on every restart. (A TypeError from inside the builder stays the user's.)"""
    try:
        signature = inspect.signature(builder)
    except (TypeError, ValueError):  # some builtins and C callables have none: let the call decide
        return
    try:
        signature.bind(*args)
    except TypeError as exc:
        raise ConfigError(f"{name} cannot be called as build(model_cfg: dict, data_cfg: dict, "
                          f"seed: int): {exc}") from None


def _checked_workload(result: Any, name: str) -> Workload:
    """What a builder returned, if it is a usable Workload; else a ConfigError saying what is wrong (a bare
    AttributeError deep in the trainer, on every rank and every restart, was the alternative)."""
    if not isinstance(result, Workload):
        raise ConfigError(f"{name} returned {type(result).__name__}, not a harness.workloads.Workload")
    problems = []
    if not isinstance(result.model, torch.nn.Module):
        problems.append(f"model is {type(result.model).__name__}, not a torch.nn.Module")
    if not (hasattr(result.dataset, "__len__") and hasattr(result.dataset, "__getitem__")):
        problems.append(f"dataset ({type(result.dataset).__name__}) is not map-style (no __len__/__getitem__)")
    if not callable(result.loss_fn):
        problems.append("loss_fn is not callable")
    if result.metric_fn is not None and not callable(result.metric_fn):
        problems.append("metric_fn is neither None nor callable")
    if problems:
        raise ConfigError(f"{name} returned a Workload whose " + "; ".join(problems))
    return result


def training_state_bytes(cfg: Config, model: torch.nn.Module, world: int) -> int:
    """What one of ``world`` ranks holds for ``model`` (built on any device, the meta device included) before
    a single activation: weights, gradients and the optimizer's moments (AdamW/Adam two, SGD with momentum
    one), each the size of the weights; the moments split across ranks under ZeRO, everything under FSDP.
    A lower bound: activations, DDP's gradient buckets and a checkpoint's host copy come on top."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    moments = {"adamw": 2, "adam": 2}.get(cfg.optim.name, 1 if cfg.optim.momentum else 0)
    if cfg.train.parallel == "fsdp":
        return weights * (2 + moments) // max(1, world)
    if cfg.train.parallel == "zero":
        return weights * 2 + weights * moments // max(1, world)
    return weights * (2 + moments)


def loader(cfg: Config, dataset: Any, world: int, rank: int) -> BatchLoader:
    """Rank ``rank``'s resumable batches of ``dataset`` (its sampler is ``.sampler``). A batch the data cannot
    fill at this world size (every batch would be dropped) is a ConfigError: exit 2, never retried."""
    try:
        sampler = ResumableSampler(len(dataset), world, rank, shuffle=True, seed=cfg.train.seed)
        return BatchLoader(dataset, sampler, cfg.train.batch_size)
    except ValueError as exc:
        raise ConfigError(f"{exc} (train.batch_size; data: {len(dataset)} samples over {world} rank(s))") from None


def materialize(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A meta-device model's parameters and buffers as uninitialized memory on ``device``: what
    ``Module.to_empty`` does, except that a tensor two modules share (GPT's tied embedding and head) stays
    one tensor. The caller fills every value: a restore, or :func:`initialize`."""
    made: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for table, wrap in ((module._parameters, True), (module._buffers, False)):
            for name, t in list(table.items()):
                if t is None:
                    continue
                if id(t) not in made:
                    empty = torch.empty(t.shape, dtype=t.dtype, device=device)  # not empty_like: slow on meta
                    made[id(t)] = torch.nn.Parameter(empty, requires_grad=t.requires_grad) if wrap else empty
                table[name] = made[id(t)]
    return model


def initialize(cfg: Config, model: torch.nn.Module) -> None:
    """Give a deferred model (:func:`materialize`) the initial weights a normal build draws, bit for bit:
    the same seeded construction on the CPU, copied in place (the optimizer keeps its parameters)."""
    fresh = workload(cfg).model
    with torch.no_grad():
        for mine, theirs in ((model.named_parameters(), fresh.named_parameters()),
                             (model.named_buffers(), fresh.named_buffers())):
            for (name, t), (fresh_name, value) in zip(mine, theirs, strict=True):
                if name != fresh_name:  # one class built twice: the same names in the same order
                    raise RuntimeError(f"initial weights: {fresh_name!r} where {name!r} was built")
                t.copy_(value)


def workload_from_dict(cfg: Mapping[str, Any]) -> Workload:
    """The Workload a recorded run config (the dict of :func:`safe_metadata`, as a manifest holds it) builds,
    as training did. It may come from another version or a user's entry point, so any failure is a
    HarnessError naming the cause (the caller is export or import, not a starting run)."""
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
