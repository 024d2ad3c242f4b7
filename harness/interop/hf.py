"""Hugging Face model folders (what ``save_pretrained`` writes) as a source of weights for ``warm_start``,
``load_for_inference`` and ``checkpoint.init_from``: ``model.safetensors`` or ``pytorch_model.bin``, or the
shards their ``*.index.json`` lists, read into one state dict.

Shards are read with the same checked readers as any weights file (safetensors' header checked against the
file; torch files with ``weights_only=True``). The index is untrusted input: a shard name must be a plain file
name in the folder (no ``/``, no ``..``), and at most :data:`MAX_SHARDS` of them.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable

from harness.errors import CheckpointFormatError
from harness.storage import Storage

INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLES = ("model.safetensors", "pytorch_model.bin")
MAX_SHARDS = 10_000
MAX_INDEX_BYTES = 64 << 20
_SHARD_NAME = re.compile(r"[\w][\w.-]*")


def weight_files(storage: Storage, names: set[str] | None = None) -> list[str] | None:
    """The weight files of the model folder ``storage`` is (shards in order), or None when it is not one.
    ``names``: the folder's entries when they are listed already."""
    names = set(storage.listdir("")) if names is None else names
    for index in INDEXES:
        if index in names:
            return _shards(storage, index)
    return next(([single] for single in SINGLES if single in names), None)


def read_json(storage: Storage, name: str, max_bytes: int = MAX_INDEX_BYTES) -> Any:
    """A small JSON file another tool wrote (an index, the Trainer's state), at most ``max_bytes``; ValueError
    when it is larger or not JSON."""
    data = storage.read_bytes(name, 0, max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"more than {max_bytes} bytes")
    return json.loads(data)


def _shards(storage: Storage, index: str) -> list[str]:
    try:
        weight_map = read_json(storage, index)["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointFormatError(f"{index} is not a model index (a weight_map of tensor -> file): {exc}") from None
    bad = [s for s in shards if not isinstance(s, str) or not _SHARD_NAME.fullmatch(s) or ".." in s]
    if bad or not shards or len(shards) > MAX_SHARDS:
        raise CheckpointFormatError(f"{index} lists {len(shards)} shard file(s)"
                                    + (f", some not plain file names in the folder: {bad[:3]!r}" if bad else ""))
    return shards


def read_folder(source: str, files: list[str], load_file: Callable[[str], Any]) -> dict:
    """Every tensor of the folder's weight files, in one state dict; a tensor in two shards is refused."""
    merged: dict = {}
    for name in files:
        part = load_file(f"{source.rstrip('/')}/{name}")
        if not isinstance(part, dict):
            raise CheckpointFormatError(f"{name} holds a {type(part).__name__}, not a state dict")
        twice = set(part) & set(merged)
        if twice:
            raise CheckpointFormatError(f"{name} repeats tensors of another shard: {sorted(twice)[:3]}")
        merged.update(part)
    return merged
