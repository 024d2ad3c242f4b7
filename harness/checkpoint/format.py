"""The on-storage format: names, manifest and commit record, and their strict validation.

See docs/format.md for the specification. Everything read from storage passes through
:func:`parse_commit` and :func:`parse_manifest` before any of it is used: sizes are capped, names are
checked against a whitelist pattern, dtypes against a table, and every offset/length against the data
file's recorded size, so a hostile checkpoint is refused before a byte of tensor data is read.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

import torch
import xxhash

from harness.checkpoint import codec
from harness._version import __version__
from harness.errors import CheckpointFormatError, NewerFormatError
from harness.layout import (COMMIT_FILE, MANIFEST_FILE, NAME_PREFIX, ckpt_name,  # noqa: F401 - re-exported
                            parse_name)

FORMAT = "harness.checkpoint"
FORMAT_VERSION = 1
CHECKSUM_ALGORITHM = "xxh3_64"

MAX_COMMIT_BYTES = 1 << 20
MAX_MANIFEST_BYTES = 64 << 20
MAX_TENSOR_BYTES = 1 << 46  # 64 TiB: anything larger is a hostile or corrupt length
MAX_NDIM = 32

_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_HEX16_RE = re.compile(r"^[0-9a-f]{16}$")

DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in ("float64", "float32", "float16", "bfloat16", "complex64", "complex128", "int64", "int32",
                 "int16", "int8", "uint8", "uint16", "uint32", "uint64", "bool", "float8_e4m3fn",
                 "float8_e5m2")
    if isinstance(getattr(torch, name, None), torch.dtype)
}


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise TypeError(f"tensors of dtype {dtype} cannot be checkpointed")
    return name


def checksum(buf: Any) -> str:
    """xxh3-64 of a bytes-like object, as 16 hex digits."""
    return xxhash.xxh3_64_hexdigest(buf)


def data_file_name(rank: int, index: int) -> str:
    return f"data-r{rank:05d}-{index:03d}.bin"


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor (or one shard of a tensor) lives, and how to check it."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    offset: int
    length: int
    checksum: str
    rank: int = 0
    # Sharded tensors: the full tensor's shape and this shard's offset in it (one entry per shard).
    global_shape: tuple[int, ...] | None = None
    global_offset: tuple[int, ...] | None = None
    # Optional: xxh3-64 of each block of ``chunk_rows`` rows (dim 0), so a reader can read and verify only
    # a row range of a large shard (restore at another world size).
    chunk_rows: int | None = None
    chunk_checksums: tuple[str, ...] | None = None

    @property
    def ident(self) -> str:
        """Unique name of the entry: the key, plus the shard's offset for a shard of a sharded tensor."""
        return entry_ident(self.key, self.global_offset)

    def to_json(self) -> dict:
        d = {"key": self.key, "dtype": self.dtype, "shape": list(self.shape), "file": self.file,
             "offset": self.offset, "length": self.length, "checksum": self.checksum, "rank": self.rank}
        if self.global_shape is not None:
            d["global_shape"] = list(self.global_shape)
            d["global_offset"] = list(self.global_offset or ())
        if self.chunk_rows is not None:
            d["chunk_rows"] = self.chunk_rows
            d["chunk_checksums"] = list(self.chunk_checksums or ())
        return d


def entry_ident(key: str, global_offset: tuple[int, ...] | None) -> str:
    return key if global_offset is None else f"{key}@{','.join(map(str, global_offset))}"


@dataclass
class Manifest:
    """A parsed, validated manifest."""

    raw: dict
    files: dict[str, int]
    tensors: dict[str, TensorEntry]   # by entry ident: the key, or "key@o0,o1" for each shard

    def entries(self, key: str) -> list[TensorEntry]:
        """The entries stored under ``key``: one for a whole tensor, one per shard for a sharded one."""
        index = self.__dict__.get("_by_key")
        if index is None:
            index = {}
            for e in self.tensors.values():
                index.setdefault(e.key, []).append(e)
            self.__dict__["_by_key"] = index
        return index.get(key, [])

    def __getattr__(self, item: str) -> Any:  # step, epoch, world_size, ... straight from the JSON
        try:
            return self.raw[item]
        except KeyError:
            raise AttributeError(item) from None


# -- encoding ---------------------------------------------------------------------------------------

def dumps(obj: Any) -> bytes:
    return json.dumps(obj, allow_nan=False, separators=(",", ":"), sort_keys=False).encode()


def make_commit(manifest: dict, manifest_bytes: bytes) -> bytes:
    summary = {k: manifest.get(k) for k in ("name", "step", "epoch", "world_size", "created",
                                            "created_unix", "loss", "metrics", "harness_version")}
    summary["total_bytes"] = sum(f["size"] for f in manifest["files"].values()) + len(manifest_bytes)
    summary["sharding"] = manifest.get("sharding", "replicated")
    body = {"format": FORMAT, "format_version": FORMAT_VERSION, **summary,
            "manifest": {"file": MANIFEST_FILE, "size": len(manifest_bytes), "checksum": checksum(manifest_bytes)}}
    # The record checksums itself: listing and retention (keep_best reads `loss` here) trust its summary
    # without opening the manifest, so a flipped byte in it must not go unnoticed.
    return dumps({**body, "commit_checksum": checksum(dumps(body))})


COMMIT_SUMMARY_KEYS = ("name", "epoch", "world_size", "created", "loss", "metrics", "sharding")
# Every key a commit record held before it checksummed itself: without "commit_checksum", any other key means
# damage (a flipped byte in the name "commit_checksum" leaves a record with an unknown key and no checksum).
LEGACY_COMMIT_KEYS = frozenset({"format", "format_version", "name", "step", "epoch", "world_size", "created",
                                "created_unix", "loss", "metrics", "harness_version", "total_bytes", "sharding",
                                "manifest"})


# -- parsing and validation -------------------------------------------------------------------------

def _loads(raw: bytes, what: str) -> dict:
    try:
        obj = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointFormatError(f"{what} is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(obj, dict):
        raise CheckpointFormatError(f"{what} must be a JSON object")
    return obj


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _check_version(obj: dict, what: str) -> None:
    if obj.get("format") != FORMAT:
        raise CheckpointFormatError(f"{what} is not a harness checkpoint (format={str(obj.get('format'))[:40]!r})")
    version = obj.get("format_version")
    if not _is_int(version) or version < 1:
        raise CheckpointFormatError(f"{what} has an invalid format_version")
    if version > FORMAT_VERSION:
        by = obj.get("harness_version")
        by = f" ({str(by)[:40]})" if isinstance(by, str) and by else ""
        raise NewerFormatError(
            f"{what} was written in format version {version} by a newer harness{by}; this harness "
            f"({__version__}) reads up to version {FORMAT_VERSION}: upgrade harness to load it")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise CheckpointFormatError(msg)


def parse_commit(raw: bytes) -> dict:
    _require(len(raw) <= MAX_COMMIT_BYTES, f"commit record is {len(raw)} bytes, over the {MAX_COMMIT_BYTES} limit")
    obj = _loads(raw, "commit record")
    _check_version(obj, "commit record")
    _require(_is_int(obj.get("step")) and obj["step"] >= 0, "commit record: step must be a non-negative integer")
    m = obj.get("manifest")
    _require(isinstance(m, dict) and m.get("file") == MANIFEST_FILE, "commit record: bad manifest reference")
    _require(_is_int(m.get("size")) and 0 < m["size"] <= MAX_MANIFEST_BYTES,
             f"commit record: manifest size must be 1..{MAX_MANIFEST_BYTES} bytes")
    _require(isinstance(m.get("checksum"), str) and bool(_HEX16_RE.match(m["checksum"])),
             "commit record: bad manifest checksum")
    if "commit_checksum" in obj:
        body = {k: v for k, v in obj.items() if k != "commit_checksum"}
        _require(obj["commit_checksum"] == checksum(dumps(body)),
                 "commit record checksum mismatch (the record itself is damaged)")
    else:  # a record from before the checksum, or one whose "commit_checksum" key itself was damaged
        unknown = sorted(set(obj) - LEGACY_COMMIT_KEYS)
        _require(not unknown, f"commit record has no commit_checksum and unknown keys {str(unknown)[:80]} (the "
                              "record itself is damaged)")
    return obj


def parse_manifest(raw: bytes, commit: dict) -> Manifest:
    want = commit["manifest"]
    _require(len(raw) == want["size"], f"manifest is {len(raw)} bytes, commit record says {want['size']}")
    got = checksum(raw)
    if got != want["checksum"]:
        raise CheckpointFormatError(f"manifest checksum mismatch: stored {want['checksum']}, computed {got}")
    obj = _loads(raw, "manifest")
    _check_version(obj, "manifest")
    _require(obj.get("step") == commit["step"], "manifest step disagrees with commit record")
    _require(obj.get("checksum_algorithm") == CHECKSUM_ALGORITHM,
             f"unsupported checksum algorithm {str(obj.get('checksum_algorithm'))[:40]!r}")
    ws = obj.get("world_size")
    _require(_is_int(ws) and 1 <= ws <= 1 << 20, "manifest: world_size must be a positive integer")
    files = _parse_files(obj.get("files"))
    tensors = _parse_tensors(obj.get("tensors"), files)
    ranks = obj.get("ranks")
    _require(isinstance(ranks, list) and len(ranks) == ws, "manifest: 'ranks' must hold one entry per rank")
    _require(isinstance(obj.get("state"), dict) and all(isinstance(r, dict) for r in ranks),
             "manifest: 'state' and every entry of 'ranks' must be objects")
    _require(_is_int(obj.get("epoch")) and isinstance(obj.get("name"), str), "manifest: bad epoch or name")
    keys = {e.key for e in tensors.values()}
    for tree in [obj["state"], *ranks]:
        missing = [k for k in codec.tensor_refs(tree) if k not in keys]
        _require(not missing, f"manifest: state refers to unknown tensors {missing[:3]}")
        codec.decode(tree, lambda key: torch.empty(0))  # every tag is known, nesting is bounded
    for what in ("loss", "metrics", "metadata"):
        _require(not codec.tensor_refs(obj.get(what)), f"manifest: {what} refers to tensors")
        codec.decode(obj.get(what), lambda key: None)
    return Manifest(raw=obj, files=files, tensors=tensors)


def _parse_files(files: Any) -> dict[str, int]:
    _require(isinstance(files, dict), "manifest: 'files' must be an object")
    out = {}
    for name, info in files.items():
        _require(bool(_FILE_RE.match(name)) and name not in (COMMIT_FILE, MANIFEST_FILE),
                 f"manifest: refusing data file name {name[:80]!r} (only plain names inside the checkpoint)")
        _require(isinstance(info, dict) and _is_int(info.get("size")) and 0 <= info["size"] <= MAX_TENSOR_BYTES,
                 f"manifest: bad size for data file {name!r}")
        out[name] = info["size"]
    return out


def _parse_tensors(entries: Any, files: dict[str, int]) -> dict[str, TensorEntry]:
    _require(isinstance(entries, list), "manifest: 'tensors' must be a list")
    out: dict[str, TensorEntry] = {}
    kinds: dict[str, tuple] = {}  # key -> (sharded?, global shape, dtype): all entries of a key must agree
    for e in entries:
        entry = _parse_entry(e, files)
        ident = entry.ident
        _require(ident not in out, f"manifest: tensor {ident[:80]!r} listed twice")
        kind = (entry.global_shape is not None, entry.global_shape, entry.dtype)
        _require(kinds.setdefault(entry.key, kind) == kind,
                 f"manifest: tensor {entry.key[:80]!r} is listed both whole and sharded, or with different "
                 "global shapes or dtypes")
        out[ident] = entry
    _check_coverage(out)
    return out


def _check_coverage(tensors: dict[str, TensorEntry]) -> None:
    """The shards of each sharded tensor tile its global shape exactly: no gap, no overlap."""
    shards: dict[str, list[TensorEntry]] = {}
    for e in tensors.values():
        if e.global_shape is not None:
            shards.setdefault(e.key, []).append(e)
    for key, es in shards.items():
        total = math.prod(es[0].global_shape)
        _require(sum(math.prod(e.shape) for e in es) == total,
                 f"manifest: the shards of tensor {key[:80]!r} do not cover its global shape "
                 f"{list(es[0].global_shape)} exactly")
        boxes = sorted((e.global_offset, e.shape) for e in es if math.prod(e.shape))
        ndim = len(es[0].global_shape)
        # The common case, shards along one dimension d (the same extent in every other): contiguous runs.
        for d in range(ndim):
            if all(o[:d] + o[d + 1:] == boxes[0][0][:d] + boxes[0][0][d + 1:] and
                   s[:d] + s[d + 1:] == boxes[0][1][:d] + boxes[0][1][d + 1:] for o, s in boxes):
                ends = [o[d] + s[d] for o, s in boxes]
                _require(all(boxes[i + 1][0][d] >= ends[i] for i in range(len(boxes) - 1)),
                         f"manifest: shards of tensor {key[:80]!r} overlap")
                break
        else:
            _require(len(boxes) <= 4096, f"manifest: tensor {key[:80]!r} has {len(boxes)} shards in a layout "
                                         "this reader does not check beyond 4096 shards")
            for i, (oa, sa) in enumerate(boxes):  # sorted by offset: only neighbours in dim 0 order can overlap
                for ob, sb in boxes[i + 1:]:
                    if ob[0] >= oa[0] + sa[0]:
                        break
                    _require(not all(b < a + n and a < b + m for a, n, b, m in zip(oa, sa, ob, sb)),
                             f"manifest: shards of tensor {key[:80]!r} overlap")


def _int_list(v: Any, what: str) -> tuple[int, ...]:
    _require(isinstance(v, list) and len(v) <= MAX_NDIM and all(_is_int(x) and 0 <= x <= MAX_TENSOR_BYTES for x in v),
             f"manifest: {what} must be a list of at most {MAX_NDIM} non-negative integers")
    return tuple(v)


def _parse_entry(e: Any, files: dict[str, int]) -> TensorEntry:
    _require(isinstance(e, dict) and isinstance(e.get("key"), str) and len(e["key"]) <= 4096,
             "manifest: tensor entry without a valid key")
    key = e["key"]
    where = f"manifest: tensor {key[:80]!r}"
    dtype = e.get("dtype")
    _require(isinstance(dtype, str) and dtype in DTYPES, f"{where}: unknown dtype {str(dtype)[:40]!r}")
    shape = _int_list(e.get("shape"), f"tensor {key[:80]!r} shape")
    fname = e.get("file")
    _require(isinstance(fname, str) and fname in files, f"{where}: data file {str(fname)[:80]!r} is not listed")
    offset, length = e.get("offset"), e.get("length")
    _require(_is_int(offset) and _is_int(length) and offset >= 0 and length >= 0,
             f"{where}: offset and length must be non-negative integers")
    numel = math.prod(shape)
    itemsize = torch.empty((), dtype=DTYPES[dtype]).element_size()
    _require(numel * itemsize == length, f"{where}: shape {list(shape)} of {dtype} is {numel * itemsize} bytes, "
                                         f"but length says {length}")
    _require(offset + length <= files[fname], f"{where}: bytes {offset}..{offset + length} lie outside "
                                              f"{fname} ({files[fname]} bytes)")
    _require(isinstance(e.get("checksum"), str) and bool(_HEX16_RE.match(e["checksum"])), f"{where}: bad checksum")
    rank = e.get("rank", 0)
    _require(_is_int(rank) and rank >= 0, f"{where}: bad rank")
    gshape = goff = None
    if "global_shape" in e:
        gshape = _int_list(e["global_shape"], f"tensor {key[:80]!r} global_shape")
        goff = _int_list(e.get("global_offset"), f"tensor {key[:80]!r} global_offset")
        _require(len(gshape) == len(shape) == len(goff) and all(o + s <= g for o, s, g in zip(goff, shape, gshape)),
                 f"{where}: shard does not fit inside its global shape")
    crows = csums = None
    if "chunk_rows" in e:
        crows, csums = e["chunk_rows"], e.get("chunk_checksums")
        _require(_is_int(crows) and crows >= 1 and len(shape) >= 1, f"{where}: bad chunk_rows")
        _require(isinstance(csums, list) and len(csums) == -(-shape[0] // crows)
                 and all(isinstance(c, str) and _HEX16_RE.match(c) for c in csums), f"{where}: bad chunk_checksums")
        csums = tuple(csums)
    return TensorEntry(key=key, dtype=dtype, shape=shape, file=fname, offset=offset, length=length,
                       checksum=e["checksum"], rank=rank, global_shape=gshape, global_offset=goff,
                       chunk_rows=crows, chunk_checksums=csums)
