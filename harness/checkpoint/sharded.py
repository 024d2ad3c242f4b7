"""Sharded state: ZeroRedundancyOptimizer shards, FSDP2/DTensor shards, split writes of replicated state,
and restore of any of them at the same or another world size.

Save side (used by :mod:`harness.checkpoint.save`):

* replicated tensors (DDP model weights, a plain optimizer, schedulers...) are written once: by rank 0, or
  with ``split_replicated`` by the rank :func:`assign_writers` picks (greedy by size, deterministic);
* a ZeroRedundancyOptimizer's state is written by the rank that owns each parameter, keyed by the
  parameter's GLOBAL index, so the checkpoint holds a standard torch optimizer state dict (``state``:
  global index -> per-parameter state, ``param_groups`` with global indices), assembled by rank 0 from the
  ranks' tree fragments without moving a tensor;
* a DTensor (FSDP2 ``fully_shard``) is written by each rank as its local shard: one tensor entry per shard
  with ``global_shape``/``global_offset`` (see docs/format.md).

Restore side: :func:`load` reads, per rank, only what that rank needs: the replicated tensors, the ZeRO
entries of the parameters it owns in the NEW partition, and for DTensors the box of the global tensor its
local shard covers (a row range of a dim-0 shard is one contiguous byte range, read and verified chunk by
chunk). For sharded targets the reads land straight in the live tensors: whole stored entries at once (at
the saving world size, every box), row ranges at another world size chunk by chunk through a bounded
scratch: parameters, buffers, FSDP2 local shards and existing optimizer state keep their memory and restore
holds no second copy of the state (:mod:`sharded_read`).
:func:`consolidate` assembles full tensors for export.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from harness.checkpoint import blobs, codec, kinds
from harness.checkpoint.kinds import MODELS, OPTIMIZERS, Targets, capture_plain
from harness.checkpoint.discovery import open_checkpoint
from harness.checkpoint.format import Manifest
from harness.checkpoint.sharded_read import Loader, Verified, guard, local_of
from harness.errors import CheckpointError, StateMismatchError
from harness.state import unwrap_model
from harness.storage import Storage

log = logging.getLogger("harness")

REPLICATED, ZERO, FSDP = "replicated", "zero", "fsdp"


# -- what kind of object is it ------------------------------------------------------------------------

def is_zero(opt: Any) -> bool:
    # Only look if the user imported it: importing torch.distributed.optim costs time and warnings.
    module = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")
    return module is not None and isinstance(opt, module.ZeroRedundancyOptimizer)


def inner_optimizer(opt: Any) -> Any:
    """The optimizer whose state ``opt`` holds: a ZeroRedundancyOptimizer's the one it partitions (AdamW's
    state is AdamW's however it is partitioned), any other optimizer itself."""
    return opt.optim if is_zero(opt) else opt


def is_fsdp(model: Any) -> bool:
    """A model whose parameters are DTensors (FSDP2 fully_shard, or a tensor-parallel plan)."""
    return isinstance(model, torch.nn.Module) and any(codec.is_dtensor(p) for p in model.parameters())


def _fsdp_model_of(opt: Any, models: dict[str, Any]) -> Any | None:
    """The FSDP model whose parameters ``opt`` optimizes, or None for an optimizer of plain tensors."""
    params = [p for g in getattr(opt, "param_groups", []) for p in g["params"]]
    if not params or not codec.is_dtensor(params[0]):
        return None
    first = params[0]
    for m in models.values():
        if any(p is first for p in m.parameters()):
            return m
    raise CheckpointError("an optimizer over DTensor parameters needs its FSDP model passed in models=")


def _model_state(model: Any) -> dict:
    """A model's state dict; an FSDP model's through torch.distributed.checkpoint.state_dict, imported only
    then: in a process with no optimizer (torch._dynamo not loaded) that import costs ~0.7 s."""
    if not is_fsdp(model):
        return unwrap_model(model).state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    return get_model_state_dict(model)


def _fsdp_optimizer_state(owner: Any, opt: Any) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    return get_optimizer_state_dict(owner, opt)


def needs_collective(targets: Targets) -> bool:
    """Whether saving or restoring these objects needs every rank (sharded targets)."""
    return any(is_fsdp(m) for m in targets.models.values()) or any(is_zero(o) for o in targets.optimizers.values())


# -- save ---------------------------------------------------------------------------------------------

def capture(targets: Targets) -> tuple[dict, dict[str, dict], str]:
    """The state to save, split into (replicated-layout tree, {optimizer name: this rank's ZeRO state by
    global index}, sharding kind). DTensors stay in the tree (the encoder turns them into shards).
    Collective when an FSDP model or a ZeRO optimizer is present (all ranks call it)."""
    models = targets.models
    fsdp = any(is_fsdp(m) for m in models.values())
    model_sd = {n: _model_state(m) for n, m in models.items()}
    opt_sd, zero_parts = {}, {}
    for n, o in targets.optimizers.items():
        if is_zero(o):
            opt_sd[n] = {"state": {}, "param_groups": zero_param_groups(o)}
            zero_parts[n] = zero_local_state(o)
            continue
        owner = _fsdp_model_of(o, models)
        opt_sd[n] = _fsdp_optimizer_state(owner, o) if owner is not None else o.state_dict()
    state = {k.section: (model_sd if k is MODELS else opt_sd if k is OPTIMIZERS else capture_plain(k, targets.of(k)))
             for k in kinds.KINDS}
    kind = FSDP if fsdp else (ZERO if zero_parts else REPLICATED)
    return state, zero_parts, kind


def zero_param_groups(zero: Any) -> list[dict]:
    """The global param groups as torch's Optimizer.state_dict packs them: hyperparameters, and ``params``
    as global parameter indices."""
    out, start = [], 0
    for g in zero.param_groups:
        packed = {k: v for k, v in g.items() if k != "params"}
        packed["params"] = list(range(start, start + len(g["params"])))
        start += len(g["params"])
        out.append(packed)
    return out


def zero_local_state(zero: Any) -> dict[int, dict]:
    """This rank's optimizer state (the params of its partition), keyed by GLOBAL parameter index."""
    index = zero._param_to_index  # ZeRO's own global indexing: params in param_groups order
    out = {}
    for g in zero.optim.param_groups:
        for p in g["params"]:
            st = zero.optim.state.get(p)
            if st:
                out[index[p]] = dict(st)
    return dict(sorted(out.items()))


def zero_owned(zero: Any) -> set[int]:
    index = zero._param_to_index
    return {index[p] for g in zero.optim.param_groups for p in g["params"]}


def assign_writers(sizes: Mapping[str, int], world: int) -> dict[str, int]:
    """Which rank writes each replicated tensor: largest first, each to the least loaded rank so far (ties
    to the lower rank). Deterministic: every rank computes the same table from the same keys and sizes."""
    load = [0] * world
    out = {}
    for key in sorted(sizes, key=lambda k: (-sizes[k], k)):
        r = min(range(world), key=lambda i: (load[i], i))
        out[key] = r
        load[r] += sizes[key] + blobs.ALIGN
    return out


def nbytes(t: Any) -> int:
    return t.numel() * t.element_size()


def merge_zero(state_tree: dict, name: str, fragments: list[Any]) -> None:
    """Rank 0: put the ranks' encoded ZeRO state fragments ({"__dict__": [[gidx, tree], ...]} or {}) into
    the optimizer's ``state`` in the replicated tree, ordered by global index."""
    pairs = []
    for frag in fragments:
        if frag:
            pairs.extend(frag["__dict__"])
    pairs.sort(key=lambda kv: kv[0])
    seen = [k for k, _ in pairs]
    if len(set(seen)) != len(seen):
        raise CheckpointError(f"optimizer {name!r}: two ranks hold state of the same parameter")
    state_tree["optimizers"][name]["state"] = {"__dict__": pairs} if pairs else {}


# -- restore ------------------------------------------------------------------------------------------

class Ref:
    """A tensor not read yet: what decoding a tree yields before the loader fills it in."""

    def __init__(self, key: str, ndarray: bool = False) -> None:
        self.key, self.ndarray = key, ndarray

    def numpy(self) -> "Ref":  # codec decodes __ndarray__ references with .numpy()
        return Ref(self.key, True)


def decode_refs(tree: Any) -> Any:
    return codec.decode(tree, Ref)


def _local_box(t: Any) -> tuple[tuple, tuple]:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return tuple(int(o) for o in offset), tuple(int(s) for s in shape)


def _plan(saved: Any, template: Any, loader: Loader, fills: list, path: str, live: bool = False) -> Any:
    """Walk a decoded tree, registering a read for every Ref (the local box when the template has a
    DTensor there); returns the tree with placeholders that ``fills`` completes. With ``live``, the tensor
    the template holds at a Ref's place (a DTensor's local shard) is the read's destination (in place)."""
    if isinstance(saved, Ref):
        gshape = loader.global_shape(saved.key)
        into = local_of(template) if live else None
        if codec.is_dtensor(template):
            if tuple(template.shape) != gshape:
                raise StateMismatchError(f"tensor {path!r} ({saved.key}): checkpoint has shape {list(gshape)}, "
                                         f"the model has {list(template.shape)}")
            offset, shape = _local_box(template)
            ticket = loader.want(saved.key, offset, shape, into=into)
            holder = _Holder()
            fills.append((ticket, holder, template, saved))
            return holder
        ticket = loader.want(saved.key, into=into)
        holder = _Holder()
        fills.append((ticket, holder, None, saved))
        return holder
    if isinstance(saved, dict):
        sub = template if isinstance(template, dict) else {}
        return {k: _plan(v, sub.get(k), loader, fills, f"{path}.{k}" if path else str(k), live)
                for k, v in saved.items()}
    if isinstance(saved, (list, tuple)):
        sub = template if isinstance(template, (list, tuple)) and len(template) == len(saved) else [None] * len(saved)
        items = [_plan(v, t, loader, fills, f"{path}.{i}", live) for i, (v, t) in enumerate(zip(saved, sub))]
        return tuple(items) if isinstance(saved, tuple) else items
    return saved


def _finish(tree: Any) -> Any:
    if isinstance(tree, _Holder):
        return tree.value
    if isinstance(tree, dict):
        return {k: _finish(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_finish(v) for v in tree]
    if isinstance(tree, tuple):
        return tuple(_finish(v) for v in tree)
    return tree


class _Holder:
    value: Any = None


@dataclass
class Reading:
    """One rank's reads of a sharded checkpoint, before the rest of its share of verification
    (:meth:`finish`); :meth:`verified` is what its reads checked already, for the ranks to pool."""

    loader: Loader
    tensors: list
    fills: list
    out: dict
    mine: Any
    rank: int
    world: int

    def verified(self) -> Verified:
        return self.loader.verified()

    def finish(self, everyone: Verified | None = None) -> tuple[dict, Any]:
        """Verify what no rank's reads verified (``everyone``: every rank's :meth:`verified` pooled; None: this
        rank's own) of this rank's share, then (state tree, own per-rank state) as :func:`load` returns."""
        self.loader.verify_rest(self.rank, self.world, everyone)
        for ticket, holder, template, ref in self.fills:
            t = self.tensors[ticket]
            if template is not None:
                from torch.distributed.tensor import DTensor
                t = DTensor.from_local(t.to(template.device), template.device_mesh, template.placements,
                                       run_check=False, shape=template.shape, stride=template.stride())
            elif ref.ndarray:
                t = t.numpy()
            holder.value = t
        return _finish(self.out), _finish(self.mine)


def load(storage: Storage, name: str, manifest: Manifest, *, rank: int, world: int, targets: Targets,
         threads: int = 4, filled: set[str] | None = None) -> tuple[dict, Any]:
    """This rank's view of checkpoint ``name``: (state tree with the given targets materialized, this rank's
    own per-rank state or None). Reads only what this rank needs, plus its share of verification
    (:func:`read` then :meth:`Reading.finish`; restore pools what the ranks verified between the two)."""
    return read(storage, name, manifest, rank=rank, world=world, targets=targets, threads=threads,
                filled=filled).finish()


def read(storage: Storage, name: str, manifest: Manifest, *, rank: int, world: int, targets: Targets,
         threads: int = 4, filled: set[str] | None = None) -> Reading:
    """Read what this rank needs of checkpoint ``name`` (verified as read); :meth:`Reading.finish` completes it.

    Sharded targets (an FSDP model, a ZeRO optimizer) are read into where possible: their parameters,
    buffers, local shards and existing optimizer state are the destinations of the reads (see
    :mod:`sharded_read`), and the returned tree holds those same tensors, so applying it copies nothing.
    Replicated targets reading a sharded checkpoint get new tensors (restore's other path accounts for what
    it reads in place; this one must not write into tensors behind its back). ``filled``: the keys earlier
    candidates of the same restore read in place (see :func:`sharded_read.guard`), updated here."""
    saved = decode_refs(manifest.raw["state"])
    ranks = manifest.raw["ranks"]
    mine = decode_refs(ranks[rank]) if rank < len(ranks) else None
    loader, fills = Loader(storage, name, manifest, threads), []
    live = needs_collective(targets)
    out: dict = {k.section: ({} if not k.single else None) for k in kinds.KINDS}
    out["models"], out["optimizers"] = _plan_targets(saved, targets, loader, fills, live)
    for k in kinds.KINDS:  # kinds without a sharded form: read whole (small: schedulers, scaler, extras)
        if k not in (MODELS, OPTIMIZERS) and saved.get(k.section) is not None:
            out[k.section] = _plan(saved[k.section], None, loader, fills, "")
    mine = _plan(mine, None, loader, fills, "") if mine is not None else None
    loader.plan()
    guard(filled if filled is not None else set(), loader, name)
    return Reading(loader, loader.run(), fills, out, mine, rank, world)


def _plan_targets(saved: dict, targets: Targets, loader: Loader, fills: list, live: bool) -> tuple[dict, dict]:
    """Register the reads of the models' and optimizers' state; with ``live``, into their live tensors."""
    models, out_m, out_o = targets.models, {}, {}
    saved_models, saved_opts = saved.get("models") or {}, saved.get("optimizers") or {}
    for n, m in models.items():
        if n in saved_models:
            template = _model_state(m) if is_fsdp(m) or live else None
            out_m[n] = _plan(saved_models[n], template, loader, fills, "", live)
    for n, o in targets.optimizers.items():
        if n not in saved_opts:
            continue
        sd = saved_opts[n]
        template = None
        if is_zero(o) and isinstance(sd, dict) and isinstance(sd.get("state"), dict):
            owned = zero_owned(o)
            sd = {**sd, "state": {k: v for k, v in sd["state"].items() if k in owned}}
            template = {"state": zero_local_state(o)} if live else None  # existing state: read into it
        else:
            owner = _fsdp_model_of(o, models)
            if owner is not None:
                template = _fsdp_optimizer_state(owner, o)
                sd = _index_to_fqn(sd, template)
        out_o[n] = _plan(sd, template, loader, fills, f"optimizer {n}", live)
    return out_m, out_o


def load_zero(zero: Any, saved: dict, name: str = "optimizer") -> None:
    """Load a standard (global-index) optimizer state dict into a ZeroRedundancyOptimizer: the local
    optimizer gets the state of the parameters this rank owns, every group gets the saved hyperparameters."""
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if not isinstance(groups, list) or len(groups) != len(zero.param_groups):
        raise StateMismatchError(f"optimizer {name!r}: checkpoint has {len(groups or [])} parameter groups, the "
                                 f"optimizer has {len(zero.param_groups)}")
    for i, (g, sg) in enumerate(zip(zero.param_groups, groups)):
        if len(sg.get("params", ())) != len(g["params"]):
            raise StateMismatchError(f"optimizer {name!r}: group {i} has {len(sg.get('params', ()))} parameters "
                                     f"in the checkpoint, {len(g['params'])} in the optimizer")
    index = zero._param_to_index
    state, local_groups, li = {}, [], 0
    for gi, g in enumerate(zero.optim.param_groups):
        ids = []
        for p in g["params"]:
            gidx = index[p]
            if gidx in saved["state"]:
                st = saved["state"][gidx]
                for k, v in st.items():
                    if isinstance(v, torch.Tensor) and v.dim() and v.shape != p.shape:
                        raise StateMismatchError(f"optimizer {name!r}: state {k!r} of parameter {gidx} has "
                                                 f"shape {list(v.shape)} in the checkpoint, the parameter is "
                                                 f"{list(p.shape)}")
                state[li] = st
            ids.append(li)
            li += 1
        local_groups.append({**{k: v for k, v in groups[gi].items() if k != "params"}, "params": ids})
    zero.optim.load_state_dict({"state": state, "param_groups": local_groups})
    for g, sg in zip(zero.param_groups, groups):
        for k, v in sg.items():
            if k != "params":
                g[k] = v


def load_fsdp_model(model: Any, saved: dict, *, strict: bool = True, name: str = "model") -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    return set_model_state_dict(model, saved, options=StateDictOptions(strict=strict))


def load_fsdp_optimizer(model: Any, opt: Any, saved: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, opt, saved)


def check_fsdp_keys(model: Any, saved: dict, strict: bool, name: str) -> None:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    own = get_model_state_dict(model)
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    if strict and (missing or unexpected):
        raise StateMismatchError(f"{name}: checkpoint does not match the model (missing: "
                                 f"{', '.join(missing) or '-'}; unexpected: {', '.join(unexpected) or '-'})",
                                 "pass strict=False for partial loading")


# -- consolidation (export) ---------------------------------------------------------------------------

def consolidate(storage: Storage, name: str, *, threads: int = 4) -> tuple[dict, list]:
    """Full tensors from any checkpoint, sharded or not: (replicated state tree, [per-rank state]).

    ZeRO optimizer state is already a standard torch optimizer state dict with global parameter indices.
    FSDP (DTensor) state is assembled into full tensors; an optimizer saved by FSDP (keyed by parameter
    name, as torch.distributed.checkpoint.state_dict gives it) is converted to the standard form: ``state``
    keyed by parameter index in ``param_groups`` order, ``params`` as indices. Every byte read is verified."""
    from harness.checkpoint.load import decode_state

    manifest = open_checkpoint(storage, name)
    tensors = blobs.read_tensors(storage, name, list(manifest.tensors.values()), threads=threads)
    state, per_rank = decode_state(manifest, tensors, None)
    if manifest.raw.get("sharding") == FSDP:
        state["optimizers"] = {n: _fqn_to_index(sd) for n, sd in (state.get("optimizers") or {}).items()}
    return state, per_rank


def _index_to_fqn(sd: Any, template: dict) -> Any:
    """A standard (index-keyed) optimizer state dict re-keyed by the parameter names of an FSDP optimizer's
    state dict (``template``), matching parameters in param_groups order: a DDP/ZeRO checkpoint restored
    into an FSDP model."""
    if not (isinstance(sd, dict) and isinstance(sd.get("param_groups"), list)):
        return sd
    order = [p for g in sd["param_groups"] for p in g.get("params", ())]
    names = [p for g in template.get("param_groups", ()) for p in g.get("params", ())]
    if not order or not all(isinstance(p, int) for p in order) or len(order) != len(names):
        return sd
    to_name = dict(zip(order, names))
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [to_name[p] for p in g["params"]]}
              for g in sd["param_groups"]]
    return {"state": {to_name[k]: v for k, v in (sd.get("state") or {}).items() if k in to_name},
            "param_groups": groups}


def fqn_to_index(sd: Any) -> Any:
    """An FSDP optimizer state dict (keyed by parameter name) in the standard form (keyed by index)."""
    return _fqn_to_index(sd)


def _fqn_to_index(sd: Any) -> Any:
    if not (isinstance(sd, dict) and isinstance(sd.get("param_groups"), list)):
        return sd
    order = [p for g in sd["param_groups"] for p in g.get("params", ())]
    if not all(isinstance(p, str) for p in order):
        return sd
    pos = {p: i for i, p in enumerate(order)}
    groups, start = [], 0
    for g in sd["param_groups"]:
        n = len(g.get("params", ()))
        groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": list(range(start, start + n))})
        start += n
    state = {pos[k]: v for k, v in (sd.get("state") or {}).items() if k in pos}
    return {"state": dict(sorted(state.items())), "param_groups": groups}
