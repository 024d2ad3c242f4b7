"""What a checkpoint holds (``harness ckpt inspect``) and how two differ (``harness ckpt diff``).

Inspect reads only the commit record and the manifest (validated, data file sizes checked; no tensor
bytes): versions, counters, metrics, the run config, and every tensor with its dtype, shape and size,
grouped by model, optimizer, scheduler, scaler, extra object and rank. Diff reads the replicated state
of both checkpoints (every byte verified) and compares it entry by entry: tensors by value (max
absolute difference), everything else (optimizer hyperparameters, scheduler counters) by equality.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from harness.checkpoint import codec
from harness.checkpoint.discovery import open_checkpoint, read_commit
from harness.checkpoint.load import read_state, saved_class
from harness.checkpoint.select import choose, run_config
from harness.errors import CheckpointError
from harness.storage import Storage, redact_url

_KINDS = (("models", "model"), ("optimizers", "optimizer"), ("schedulers", "scheduler"), ("extra", "extra"))


# -- inspect ----------------------------------------------------------------------------------------

def inspect_checkpoint(url: str, *, step: int | None = None, storage_options: dict | None = None) -> dict:
    """A JSON-able description of the newest checkpoint whose manifest validates (or the one at ``step``)."""
    storage = Storage(url, storage_options)
    # The commit record is read with the manifest: beside a live job the checkpoint may be gone a moment later.
    name, (manifest, commit), skipped, how = choose(
        storage, lambda n: (open_checkpoint(storage, n), read_commit(storage, n)), step=step)
    raw = manifest.raw
    by_key = _entries_by_key(manifest)
    state = raw.get("state") if isinstance(raw.get("state"), dict) else {}
    groups = []
    for kind, label in _KINDS:
        for gname, tree in _named_trees(state.get(kind)):
            group = _group(label, gname, tree, by_key, f"state/{kind}/{gname}/")
            if label == "model":
                group["class"] = saved_class(manifest, "model_classes", gname)
            elif label == "optimizer":
                group["class"] = saved_class(manifest, "optimizer_classes", gname)
                group["hyperparameters"] = _hyperparameters(tree)
            elif label == "scheduler":
                group["summary"] = _scheduler_summary(tree)
            groups.append(group)
    if state.get("scaler") is not None:
        groups.append(_group("scaler", "scaler", state["scaler"], by_key, "state/scaler/"))
    for r, tree in enumerate(raw.get("ranks") or []):
        group = _group("rank", str(r), tree, by_key, f"ranks/{r}/")
        if isinstance(tree, dict):
            group["position"] = _plain(tree.get("position"))
        groups.append(group)
    return {
        "url": redact_url(url), "checkpoint": name, "chosen": how, "skipped": skipped,
        "step": raw.get("step"), "epoch": raw.get("epoch"), "loss": _plain(raw.get("loss")),
        "metrics": _plain(raw.get("metrics")) or {}, "created": raw.get("created"),
        "world_size": raw.get("world_size"), "sharding": raw.get("sharding"),
        "format": raw.get("format"), "format_version": raw.get("format_version"),
        "harness_version": raw.get("harness_version"), "torch_version": raw.get("torch_version"),
        "python_version": raw.get("python_version"), "checksum_algorithm": raw.get("checksum_algorithm"),
        "total_bytes": commit.get("total_bytes"), "data_bytes": sum(manifest.files.values()),
        "data_files": len(manifest.files), "tensors": len(by_key),
        "model_classes": raw.get("model_classes") if isinstance(raw.get("model_classes"), dict) else {},
        "config": run_config(manifest),
        "metadata": _plain(raw.get("metadata")) or {}, "groups": groups,
    }


def _entries_by_key(manifest: Any) -> dict[str, dict]:
    """Tensor key -> {dtype, shape (global for sharded), bytes, shards}."""
    out: dict[str, dict] = {}
    for e in manifest.tensors.values():
        cur = out.get(e.key)
        if cur is None:
            shape = list(e.global_shape) if e.global_shape is not None else list(e.shape)
            out[e.key] = {"dtype": e.dtype, "shape": shape, "bytes": e.length, "shards": 1}
        else:
            cur["bytes"] += e.length
            cur["shards"] += 1
    return out


def _named_trees(tree: Any) -> list[tuple[str, Any]]:
    if not isinstance(tree, dict):
        return []
    if any(k.startswith("__") for k in tree):  # names that needed a tag (non-string): one group
        try:
            decoded = codec.decode(tree, lambda key: None)
            return [(str(k), None) for k in decoded] if isinstance(decoded, dict) else []
        except CheckpointError:
            return []
    return list(tree.items())


def _group(kind: str, name: str, tree: Any, by_key: dict, prefix: str) -> dict:
    refs = codec.tensor_refs(tree) if tree is not None else []
    tensors = []
    for ref in refs:
        info = by_key.get(ref)
        if info is None:
            continue
        key = ref[len(prefix):] if ref.startswith(prefix) else ref
        tensors.append({"key": key, **info})
    params = sum(math.prod(t["shape"]) for t in tensors)
    return {"kind": kind, "name": name, "tensors": tensors, "count": len(tensors),
            "bytes": sum(t["bytes"] for t in tensors), "elements": params}


def _plain(tree: Any) -> Any:
    """A summary tree decoded (tagged floats, tuples) with tensors shown as None."""
    try:
        return _jsonable(codec.decode(tree, lambda key: None))
    except CheckpointError:
        return None


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, torch.dtype):
        return str(v)
    return v


def _hyperparameters(tree: Any) -> list[dict]:
    try:
        groups = codec.decode(tree.get("param_groups"), lambda key: None) if isinstance(tree, dict) else None
    except CheckpointError:
        return []
    if not isinstance(groups, list):
        return []
    return [_jsonable({k: v for k, v in g.items() if k != "params"}) for g in groups if isinstance(g, dict)]


def _scheduler_summary(tree: Any) -> dict:
    if not isinstance(tree, dict):
        return {}
    out = {}
    for key in ("last_epoch", "_last_lr", "base_lrs"):
        if key in tree:
            out[key] = _plain(tree[key])
    return out


# -- diff -------------------------------------------------------------------------------------------

def diff_checkpoints(url_a: str, url_b: str, *, step_a: int | None = None, step_b: int | None = None,
                     storage_options: dict | None = None, io_threads: int = 4, ranks: bool = False) -> dict:
    """Compare the replicated state (models, optimizers, schedulers, scaler, extra) and the summary (epoch,
    loss, metrics: ``summary/...``) of two checkpoints: the newest valid one of each side, or the ones at
    ``step_a``/``step_b``. With ``ranks``, also every rank's own state (RNG, data position: ``ranks/N/...``),
    which a resumed run must match too; without, it is not compared.

    Returns {a, b, identical, tensors_compared, tensors_identical, different (list of {key, what, ...}),
    only_a, only_b}: ``what`` is "values" (with max_abs_diff, elements_different), "shape", "dtype",
    "type" or "value" (a non-tensor entry, with a and b)."""
    sides = []
    for url, step in ((url_a, step_a), (url_b, step_b)):
        storage = Storage(url, storage_options)
        name, (manifest, state, mine), skipped, how = choose(
            storage, lambda n, s=storage: read_state(s, n, ranks=None if ranks else [], threads=io_threads),
            step=step)
        summary = {k: codec.unplain(manifest.raw.get(k)) for k in ("epoch", "loss", "metrics")}
        whole = {**state, "summary": summary, **({"ranks": dict(enumerate(mine))} if ranks else {})}
        sides.append(({"url": redact_url(url), "checkpoint": name, "step": manifest.raw.get("step"),
                       "chosen": how, "skipped": skipped}, _flatten(whole)))
    (info_a, flat_a), (info_b, flat_b) = sides
    keys = list(flat_a) + [k for k in flat_b if k not in flat_a]
    only_a = [k for k in keys if k not in flat_b]
    only_b = [k for k in keys if k not in flat_a]
    different: list[dict] = []
    compared = same = 0
    for key in keys:
        if key not in flat_a or key not in flat_b:
            continue
        va, vb = flat_a[key], flat_b[key]
        if isinstance(va, np.ndarray):
            va = torch.from_numpy(va)
        if isinstance(vb, np.ndarray):
            vb = torch.from_numpy(vb)
        ta, tb = isinstance(va, torch.Tensor), isinstance(vb, torch.Tensor)
        if ta and tb:
            compared += 1
            d = compare_tensors(va, vb)
            if d is None:
                same += 1
            else:
                different.append({"key": key, **d})
        elif ta or tb:
            different.append({"key": key, "what": "type", "a": _describe(va), "b": _describe(vb)})
        elif not _same_value(va, vb):
            different.append({"key": key, "what": "value", "a": _jsonable(va), "b": _jsonable(vb)})
    return {"a": info_a, "b": info_b, "identical": not (different or only_a or only_b),
            "tensors_compared": compared, "tensors_identical": same, "different": different,
            "only_a": only_a, "only_b": only_b}


def _flatten(obj: Any, path: str = "", out: dict | None = None) -> dict:
    out = {} if out is None else out
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{path}/{k}" if path else str(k), out)
        if not obj and path:
            out[path] = {}
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _flatten(v, f"{path}/{i}", out)
        if not obj and path:
            out[path] = type(obj)()
    else:
        out[path] = obj
    return out


def compare_tensors(a: torch.Tensor, b: torch.Tensor) -> dict | None:
    """None when ``a`` and ``b`` are identical (dtype, shape, bytes); else what differs."""
    if a.dtype != b.dtype:
        return {"what": "dtype", "a": _describe(a), "b": _describe(b)}
    if a.shape != b.shape:
        return {"what": "shape", "a": _describe(a), "b": _describe(b)}
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    if a.numel() == 0 or torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)):
        return None
    if a.is_complex():
        delta = (a.to(torch.complex128) - b.to(torch.complex128)).abs()
        nan_a, nan_b = torch.isnan(a.real) | torch.isnan(a.imag), torch.isnan(b.real) | torch.isnan(b.imag)
    elif a.is_floating_point():
        delta = (a.double() - b.double()).abs()
        nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    else:
        delta = (a.to(torch.float64) - b.to(torch.float64)).abs()
        nan_a = nan_b = torch.zeros_like(delta, dtype=torch.bool)
    delta = torch.where(nan_a & nan_b, torch.zeros_like(delta), delta)
    delta = torch.where(nan_a ^ nan_b, torch.full_like(delta, math.inf), delta)
    n_diff = int((delta != 0).sum())
    if n_diff == 0:  # e.g. 0.0 vs -0.0 only, or NaN payloads
        return {"what": "values", "dtype": str(a.dtype).replace("torch.", ""), "shape": list(a.shape),
                "max_abs_diff": 0.0, "elements_different": 0, "elements": a.numel()}
    return {"what": "values", "dtype": str(a.dtype).replace("torch.", ""), "shape": list(a.shape),
            "max_abs_diff": float(delta.max()), "elements_different": n_diff, "elements": a.numel()}


def _describe(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"{str(v.dtype).replace('torch.', '')}{list(v.shape)}"
    return f"{type(v).__name__} {v!r}"[:80]


def _same_value(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and math.isnan(a) and math.isnan(b):
        return True
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - exotic values: compare their text
        return repr(a) == repr(b)
