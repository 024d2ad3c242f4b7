"""Nested state <-> (JSON tree, flat tensor table), without pickle.

State dicts are trees of dicts, lists, tuples, scalars and tensors. Tensors are pulled out into a flat
table keyed by their path (stored as raw bytes elsewhere) and replaced by ``{"__tensor__": key}``. Types
JSON cannot express faithfully are tagged, so a round trip returns equal objects of equal types:
tuples, dicts with non-string keys (optimizer state uses int keys), non-finite floats, numpy arrays,
torch dtypes. Decoding accepts only these tags; anything else is refused.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from harness.errors import CheckpointFormatError

MAX_DEPTH = 64

_FLOAT_TAGS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


@dataclass
class Shard:
    """This rank's piece of a sharded tensor (a DTensor's local shard): stored as one tensor entry with
    ``global_shape`` and ``global_offset``. ``owner`` is False for a replica that another rank writes."""

    local: torch.Tensor
    global_shape: tuple[int, ...]
    global_offset: tuple[int, ...]
    owner: bool = True

    @property
    def shape(self) -> torch.Size:
        return self.local.shape

    def numel(self) -> int:
        return self.local.numel()

    def element_size(self) -> int:
        return self.local.element_size()

    @property
    def dtype(self) -> torch.dtype:
        return self.local.dtype


def is_dtensor(obj: Any) -> bool:
    # Importing torch.distributed.tensor costs most of a second; a DTensor can only exist once someone
    # imported it, so look it up instead of importing it (keeps ``import harness`` fast).
    mod = sys.modules.get("torch.distributed.tensor")
    dtensor = getattr(mod, "DTensor", None) if mod is not None else None
    return dtensor is not None and isinstance(obj, dtensor)


def dtensor_shard(t: Any) -> Shard:
    """The local shard of a DTensor with its place in the global tensor. Replicated mesh dimensions are
    written by their coordinate-0 member only; partial (pending reduction) placements are refused."""
    from torch.distributed.tensor import Replicate, Shard as ShardPlacement
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = t.device_mesh, t.placements
    for p in placements:
        if not isinstance(p, (Replicate, ShardPlacement)):
            raise TypeError(f"cannot checkpoint a DTensor with placement {p} (reduce it first)")
    _, offset = compute_local_shape_and_global_offset(t.shape, mesh, placements)
    coord = mesh.get_coordinate() or [0] * mesh.ndim
    owner = all(c == 0 for c, p in zip(coord, placements) if isinstance(p, Replicate))
    local = t.to_local()
    return Shard(local=local, global_shape=tuple(t.shape), global_offset=tuple(int(o) for o in offset), owner=owner)


def _plain_dict(d: dict) -> bool:
    return all(isinstance(k, str) and not k.startswith("__") for k in d)


class Encoder:
    """Encodes one tree; collects its tensors into ``self.tensors`` under unique keys."""

    def __init__(self, tensors: dict[str, torch.Tensor | Shard] | None = None) -> None:
        self.tensors: dict[str, torch.Tensor | Shard] = {} if tensors is None else tensors
        self._views: dict[tuple, str] = {}  # the same view seen twice (tied weights) is stored once

    def encode(self, obj: Any, path: str, depth: int = 0) -> Any:
        if depth > MAX_DEPTH:
            raise TypeError(f"state nested deeper than {MAX_DEPTH} levels at {path!r}")
        if obj is None or isinstance(obj, (bool, str)):
            return obj
        if isinstance(obj, int):
            return obj
        if isinstance(obj, float):
            if math.isfinite(obj):
                return obj
            return {"__float__": "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")}
        if is_dtensor(obj):
            return {"__tensor__": self._add(path, dtensor_shard(obj))}
        if isinstance(obj, torch.Tensor):
            return {"__tensor__": self._add(path, obj)}
        if isinstance(obj, np.ndarray):
            return {"__ndarray__": self._add(path, torch.from_numpy(np.ascontiguousarray(obj)))}
        if isinstance(obj, np.generic):
            return self.encode(obj.item(), path, depth)
        if isinstance(obj, torch.dtype):
            return {"__dtype__": str(obj).removeprefix("torch.")}
        if isinstance(obj, tuple):
            return {"__tuple__": [self.encode(v, f"{path}/{i}", depth + 1) for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [self.encode(v, f"{path}/{i}", depth + 1) for i, v in enumerate(obj)]
        if isinstance(obj, dict):
            if _plain_dict(obj):
                return {k: self.encode(v, f"{path}/{k}", depth + 1) for k, v in obj.items()}
            return {"__dict__": [[self.encode(k, f"{path}/key{i}", depth + 1),
                                  self.encode(v, f"{path}/{k}", depth + 1)]
                                 for i, (k, v) in enumerate(obj.items())]}
        raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {path!r}: use tensors, numbers, "
                        "strings, lists, tuples and dicts, or give the object state_dict()/load_state_dict()")

    def _add(self, path: str, tensor: torch.Tensor | Shard) -> str:
        view = _view_id(tensor)
        if view is not None and view in self._views:
            return self._views[view]
        key, n = path, 1
        while key in self.tensors:  # paths are unique unless a dict key contains "/"
            n += 1
            key = f"{path}#{n}"
        self.tensors[key] = tensor
        if view is not None:
            self._views[view] = key
        return key


def _view_id(t: Any) -> tuple | None:
    """Identity of a plain tensor's bytes: two names for one parameter (a head tied to the embedding)
    share storage, offset, shape and strides. None for shards, empty tensors and tensor subclasses."""
    if type(t) is not torch.Tensor or t.numel() == 0:
        return None
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def decode(tree: Any, tensor: Callable[[str], torch.Tensor], depth: int = 0) -> Any:
    """Inverse of :meth:`Encoder.encode`; ``tensor(key)`` supplies loaded tensors."""
    if depth > MAX_DEPTH:
        raise CheckpointFormatError(f"state tree nested deeper than {MAX_DEPTH} levels")
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    if isinstance(tree, list):
        return [decode(v, tensor, depth + 1) for v in tree]
    if not isinstance(tree, dict):
        raise CheckpointFormatError(f"unexpected JSON value of type {type(tree).__name__} in state tree")
    tags = [k for k in tree if k.startswith("__")]
    if not tags:
        return {k: decode(v, tensor, depth + 1) for k, v in tree.items()}
    if len(tree) != 1:
        raise CheckpointFormatError(f"malformed tagged value in state tree: keys {sorted(tree)[:5]}")
    tag, value = next(iter(tree.items()))
    return _decode_tagged(tag, value, tensor, depth)


def _decode_tagged(tag: str, value: Any, tensor: Callable[[str], torch.Tensor], depth: int) -> Any:
    if tag in ("__tensor__", "__ndarray__"):
        if not isinstance(value, str):
            raise CheckpointFormatError(f"{tag} reference must be a string")
        t = tensor(value)
        return t.numpy() if tag == "__ndarray__" else t
    if tag == "__float__" and value in _FLOAT_TAGS:
        return _FLOAT_TAGS[value]
    if tag == "__dtype__" and isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
        return getattr(torch, value)
    if tag == "__tuple__" and isinstance(value, list):
        return tuple(decode(v, tensor, depth + 1) for v in value)
    if tag == "__dict__" and isinstance(value, list):
        out = {}
        for pair in value:
            if not (isinstance(pair, list) and len(pair) == 2):
                raise CheckpointFormatError("malformed __dict__ entry in state tree")
            k = decode(pair[0], tensor, depth + 1)
            if not isinstance(k, (str, int, float, bool, tuple, type(None))) or not _hashable(k):
                raise CheckpointFormatError("unhashable dict key in state tree")
            out[k] = decode(pair[1], tensor, depth + 1)
        return out
    raise CheckpointFormatError(f"unknown or malformed tag {tag!r} in state tree")


def _hashable(k: Any) -> bool:
    try:
        hash(k)  # a tuple key may hold a list
    except TypeError:
        return False
    return True


def tensor_refs(tree: Any, depth: int = 0) -> list[str]:
    """All tensor keys referenced by an encoded tree (to check them against the manifest)."""
    if depth > MAX_DEPTH:
        raise CheckpointFormatError(f"state tree nested deeper than {MAX_DEPTH} levels")
    if isinstance(tree, list):
        return [k for v in tree for k in tensor_refs(v, depth + 1)]
    if isinstance(tree, dict):
        if len(tree) == 1:
            (tag, value), = tree.items()
            if tag in ("__tensor__", "__ndarray__") and isinstance(value, str):
                return [value]
        return [k for v in tree.values() for k in tensor_refs(v, depth + 1)]
    return []


def plain(value: Any, what: str) -> Any:
    """Summary values (loss, metrics, metadata) as JSON, tagged where JSON falls short (a nan loss, tuples,
    int keys); no tensors."""
    enc = Encoder()
    tree = enc.encode(value, what)
    if enc.tensors:
        raise TypeError(f"checkpoint {what} must hold numbers, strings, lists and dicts, not tensors "
                        f"({', '.join(enc.tensors)}): use extra= for tensors")
    return tree


def unplain(tree: Any) -> Any:
    return decode(tree, lambda key: None)  # parse_manifest made sure there are no tensor references
