"""torch.distributed.checkpoint (DCP) folders, as torchtitan and ``dcp.save`` write them, read into one
state dict: the source behind ``harness ckpt import``, ``warm_start``, ``load_for_inference`` and
``checkpoint.init_from`` for a DCP folder.

A DCP folder is a ``.metadata`` file (a pickle of DCP's ``Metadata``: every tensor's dtype, global shape and
chunks; where each chunk's bytes are; how the flattened keys nest) and ``*.distcp`` files holding each tensor
chunk and each non-tensor value as a ``torch.save`` record at an offset. torch reads ``.metadata`` with
``pickle.load``, so a hostile folder runs code on load. Here it goes through an unpickler that knows only
DCP's metadata records (read into plain stand-ins of ours, never torch's classes), ``torch.Size``, dtypes and
paths: any other global is refused and nothing from the file runs. Each record is read with
``torch.load(weights_only=True)``; a non-tensor value that needs more is left out and named.

The metadata is checked before any data is read: file names plain names in the folder, offsets and lengths
inside their file, a chunk's bytes no fewer than its elements need, and a tensor's chunks tiling its shape
exactly (sharded FSDP/DTensor checkpoints store one chunk per rank; they are put back together here, so a
checkpoint saved at any world size imports).
"""

from __future__ import annotations

import concurrent.futures as cf
import io
import pickle
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from harness.errors import CheckpointFormatError
from harness.interop import torchload
from harness.storage import Storage
from harness.storage.seekable import Window

REMOTE_THREADS = 8         # spans of records read at a time from a remote store
SPAN_BYTES = 16 << 20      # adjacent records read together from a remote store, up to this many bytes
SPAN_GAP = 64 << 10        # records further apart than this are not read together (the gap would be read too)

METADATA = ".metadata"
MAX_METADATA_BYTES = 256 << 20
_FILE_NAME = re.compile(r"[\w][\w.-]*")
_MAX_LIST_INDEX = 1 << 20

# -- the metadata pickle, read without running anything ---------------------------------------------

_RECORD_FIELDS = {"TensorProperties": ("dtype", "layout", "requires_grad", "memory_format", "pin_memory")}


class _Record:
    """A stand-in for one of DCP's metadata dataclasses: whatever fields the pickle sets, nothing else."""

    kind = "record"

    def __new__(cls, *args: Any, **kwargs: Any) -> "_Record":
        return object.__new__(cls)

    def __init__(self, *args: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], (dict, type(None))):
            state = {**(state[0] or {}), **(state[1] or {})}  # (__dict__, __slots__ values)
        if isinstance(state, tuple):  # TensorProperties pickles a tuple of its fields
            state = dict(zip(_RECORD_FIELDS.get(self.kind, ()), state))
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"unexpected state for {self.kind}: {type(state).__name__}")
        self.__dict__.update(state)


def _record(name: str) -> type:
    return type(name, (_Record,), {"kind": name})


_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                "torch.distributed._shard.sharded_tensor.metadata")
_DCP_NAMES = ("Metadata", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata",
              "ChunkStorageMetadata", "TensorProperties", "StorageMeta", "_StorageInfo")
_STAND_INS: dict[str, type] = {name: _record(name) for name in _DCP_NAMES}
# Python 3.13 moved pathlib's classes into pathlib._local: a metadata written there names them so.
_PATHS = {(m, n) for m in ("pathlib", "pathlib._local")
          for n in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")}


class _Refused(pickle.UnpicklingError):
    """A global the metadata has no business naming."""


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the globals a DCP ``.metadata`` pickle names; refuses every other one."""

    def find_class(self, module: str, name: str) -> Any:
        if module in _DCP_MODULES and name in _STAND_INS:
            return _STAND_INS[name]
        if module in _DCP_MODULES and name == "_MEM_FORMAT_ENCODING":
            return lambda value: value
        if module == "torch" and name == "Size":
            return lambda dims=(): tuple(int(d) for d in dims)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout)):
            return getattr(torch, name)
        if (module, name) == ("torch.serialization", "_get_layout"):
            return lambda name: str(name)
        if (module, name) in _PATHS:  # pickled as its parts
            return lambda *parts: "/".join(map(str, parts))
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        raise _Refused(f"global {module}.{name} is not part of DCP's metadata")


# -- the metadata, checked ---------------------------------------------------------------------------

@dataclass
class Chunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str = ""
    offset: int = 0
    length: int = 0


@dataclass
class Layout:
    """What ``.metadata`` says, in plain checked form."""

    tensors: dict[str, tuple[torch.dtype, tuple[int, ...], list[Chunk]]] = field(default_factory=dict)
    values: dict[str, Chunk] = field(default_factory=dict)  # non-tensor values: one torch.save record each
    paths: dict[str, tuple] = field(default_factory=dict)   # flattened key -> path in the nested state dict
    listed: dict[str, int | None] = field(default_factory=dict)  # the folder's entries and sizes

    def files(self) -> list[str]:
        """The data files the entries are stored in."""
        stored = [c for _, _, chunks in self.tensors.values() for c in chunks] + list(self.values.values())
        return sorted({c.file for c in stored})


def is_dcp(names: set[str]) -> bool:
    return METADATA in names


def read_layout(storage: Storage, shown: str) -> Layout:
    """``.metadata`` unpickled safely and checked against the folder's files (sizes from one listing, taken
    first: the metadata is read at its listed size, not into a buffer of the largest size allowed, which on S3
    meant 256 MiB allocated for a few kilobytes)."""
    listed = storage.list_tree("")
    size = listed.get(METADATA)
    if size is None:
        raise FileNotFoundError(f"{shown}/{METADATA}")
    if size > MAX_METADATA_BYTES:
        raise CheckpointFormatError(f"{shown}/{METADATA} is larger than {MAX_METADATA_BYTES >> 20} MiB")
    data = storage.read_bytes(METADATA)
    try:
        meta = _MetadataUnpickler(io.BytesIO(data)).load()
    except _Refused as exc:
        raise CheckpointFormatError(f"{shown}/{METADATA} is refused: {exc}; nothing from it was run") from None
    except Exception as exc:  # noqa: BLE001 - truncated or garbled pickles raise many types
        raise CheckpointFormatError(f"{shown}/{METADATA} is not a readable DCP metadata file: "
                                    f"{type(exc).__name__}: {exc}") from None
    try:
        return _checked(meta, listed)
    except (AttributeError, TypeError, ValueError, KeyError, IndexError, OverflowError) as exc:
        raise CheckpointFormatError(f"{shown}/{METADATA} does not describe a DCP checkpoint: {exc}") from None


def _checked(meta: Any, sizes: dict[str, int | None]) -> Layout:
    if getattr(meta, "kind", None) != "Metadata" or not isinstance(meta.state_dict_metadata, dict):
        raise ValueError(f"it holds a {getattr(meta, 'kind', type(meta).__name__)}, not DCP's Metadata")
    where = _locations(getattr(meta, "storage_data", None) or {}, sizes)
    layout = Layout(paths=_paths(getattr(meta, "planner_data", None) or {}), listed=sizes)
    for fqn, item in meta.state_dict_metadata.items():
        if not isinstance(fqn, str):
            raise ValueError(f"key {fqn!r} is not a string")
        if getattr(item, "kind", None) == "BytesStorageMetadata":
            layout.values[fqn] = _located(where, fqn, None)
        elif getattr(item, "kind", None) == "TensorStorageMetadata":
            layout.tensors[fqn] = _tensor(fqn, item, where)
        else:
            raise ValueError(f"{fqn}: unknown entry {getattr(item, 'kind', type(item).__name__)}")
    return layout


def _locations(storage_data: Any, sizes: dict[str, int | None]) -> dict[tuple, Chunk]:
    where: dict[tuple, Chunk] = {}
    for index, info in dict(storage_data).items():
        name, offset, length = info.relative_path, info.offset, info.length
        if getattr(info, "transform_descriptors", None):
            raise ValueError(f"{index.fqn} is stored through transforms {info.transform_descriptors!r} "
                             "(a DCP extension such as compression), which this reader does not undo")
        if not isinstance(name, str) or not _FILE_NAME.fullmatch(name) or ".." in name:
            raise ValueError(f"{index.fqn} is stored in {name!r}, not a plain file name in the folder")
        if name not in sizes:
            raise ValueError(f"{index.fqn} is stored in {name}, which is not in the folder")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (offset, length)) \
                or (sizes[name] is not None and offset + length > sizes[name]):
            raise ValueError(f"{index.fqn}: bytes {offset!r}+{length!r} are not inside {name} ({sizes[name]} bytes)")
        offsets = getattr(index, "offset", None)  # left out of the pickle when None (a class default)
        key = (index.fqn, None if offsets is None else tuple(offsets))
        where[key] = Chunk((), (), name, offset, length)
    return where


def _located(where: dict[tuple, Chunk], fqn: str, offsets: tuple | None) -> Chunk:
    if (fqn, offsets) not in where:
        raise ValueError(f"{fqn}{'' if offsets is None else f' chunk at {list(offsets)}'} has no stored bytes")
    return where[(fqn, offsets)]


def _tensor(fqn: str, item: Any, where: dict[tuple, Chunk]) -> tuple[torch.dtype, tuple[int, ...], list[Chunk]]:
    dtype, layout, shape = item.properties.dtype, item.properties.layout, _dims(item.size, fqn)
    if not isinstance(dtype, torch.dtype) or str(layout) not in ("torch.strided", "strided"):
        raise ValueError(f"{fqn}: a {layout} tensor of {dtype}; only dense (strided) tensors are read")
    chunks = []
    for c in item.chunks:
        offsets, sizes = _dims(c.offsets, fqn), _dims(c.sizes, fqn)
        stored = _located(where, fqn, offsets)
        if len(offsets) != len(shape) or len(sizes) != len(shape) \
                or any(o + s > n for o, s, n in zip(offsets, sizes, shape)):
            raise ValueError(f"{fqn}: chunk at {list(offsets)} of size {list(sizes)} is outside shape {list(shape)}")
        if _numel(sizes) * dtype.itemsize > stored.length:
            raise ValueError(f"{fqn}: chunk of {list(sizes)} {dtype} is stored in only {stored.length} bytes")
        chunks.append(Chunk(offsets, sizes, stored.file, stored.offset, stored.length))
    _check_tiling(fqn, shape, chunks)
    return dtype, shape, chunks


def _dims(value: Any, fqn: str) -> tuple[int, ...]:
    dims = tuple(value)
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims):
        raise ValueError(f"{fqn}: {dims!r} is not a list of sizes")
    return dims


def _numel(sizes: tuple[int, ...]) -> int:
    n = 1
    for s in sizes:
        n *= s
    return n


def _check_tiling(fqn: str, shape: tuple[int, ...], chunks: list[Chunk]) -> None:
    """The chunks cover the tensor exactly: as many elements as it has, and no two overlapping.

    Overlaps are looked for with a sweep along the dimension the chunks are cut most along (FSDP's dim 0,
    tensor parallelism's dim 1): each chunk is compared only with those it shares that dimension's extent
    with, so a checkpoint of thousands of ranks is checked in about as many steps, not their square."""
    if sum(_numel(c.sizes) for c in chunks) != _numel(shape):
        raise ValueError(f"{fqn}: its chunks hold {sum(_numel(c.sizes) for c in chunks)} elements, "
                         f"its shape {list(shape)} needs {_numel(shape)}")
    boxes = [c for c in chunks if _numel(c.sizes)]
    if len(boxes) < 2:
        return
    dim = max(range(len(shape)), key=lambda d: len({c.offsets[d] for c in boxes}))
    active: list[Chunk] = []
    for b in sorted(boxes, key=lambda c: c.offsets[dim]):
        active = [a for a in active if a.offsets[dim] + a.sizes[dim] > b.offsets[dim]]
        for a in active:
            if all(ao < bo + bs and bo < ao + as_ for ao, as_, bo, bs in zip(a.offsets, a.sizes, b.offsets, b.sizes)):
                raise ValueError(f"{fqn}: chunks at {list(a.offsets)} and {list(b.offsets)} overlap")
        active.append(b)


def _paths(planner_data: Any) -> dict[str, tuple]:
    paths = {}
    for fqn, path in dict(planner_data).items():
        path = tuple(path) if isinstance(path, (list, tuple)) else None
        if not path or not all(isinstance(p, str) or (type(p) is int and 0 <= p < _MAX_LIST_INDEX) for p in path):
            raise ValueError(f"{fqn!r} nests under {path!r}, not a path of keys and list indices")
        paths[fqn] = path
    return paths


# -- the data ----------------------------------------------------------------------------------------

@dataclass
class DcpState:
    """A DCP folder's state dict, nested as it was saved, and the values left out (with why)."""

    state: dict
    layout: Layout
    skipped: dict[str, str] = field(default_factory=dict)


def read_folder(storage: Storage, shown: str, keep: Callable[[tuple], bool] = lambda path: True) -> DcpState:
    """Every tensor (chunks put back together) and every value ``weights_only`` can read, nested by the
    metadata's planner data as the saver's state dict was; ``keep(path)`` False leaves an entry unread."""
    layout = read_layout(storage, shown)
    for entries in (layout.tensors, layout.values):
        for fqn in [f for f in entries if not keep(layout.paths.get(f, (f,)))]:
            del entries[fqn]
    out = DcpState(state={}, layout=layout)
    with _Files(storage, shown) as files:
        if files.remote:
            files.fetch([(fqn, c) for fqn, (_, _, chunks) in layout.tensors.items() for c in chunks])
        for fqn, (dtype, shape, chunks) in layout.tensors.items():
            _place(out.state, layout.paths.get(fqn, (fqn,)), _tensor_from(files, fqn, dtype, shape, chunks), shown)
        for fqn, c in layout.values.items():
            try:
                value = files.record(fqn, c)
            except torchload.NeedsObjects as exc:  # a BytesIO, an object: left out, not run
                out.skipped[fqn] = f"needs unpickling {torchload.global_named(exc)}"
                continue
            _place(out.state, layout.paths.get(fqn, (fqn,)), value, shown)
    return out


def _tensor_from(files: "_Files", fqn: str, dtype: torch.dtype, shape: tuple[int, ...],
                 chunks: list[Chunk]) -> torch.Tensor:
    """The tensor its chunks make up; a tensor stored whole is the one its record loads (no second copy)."""
    full = None
    for c in chunks:
        try:
            part = files.record(fqn, c)
        except torchload.NeedsObjects as exc:
            raise CheckpointFormatError(f"{files.shown}: {fqn}'s chunk in {c.file} at byte {c.offset} is refused: "
                                        f"it needs unpickling {torchload.global_named(exc)}; nothing from it was "
                                        "run") from None
        if not isinstance(part, torch.Tensor) or part.dtype != dtype or tuple(part.shape) != c.sizes:
            raise CheckpointFormatError(f"{files.shown}: {fqn}'s chunk in {c.file} at byte {c.offset} holds "
                                        f"{_what(part)}, the metadata says a {dtype} tensor of {list(c.sizes)}")
        if len(chunks) == 1:  # stored whole: the tensor as loaded, unless it holds on to a larger storage
            return part if part.untyped_storage().nbytes() == part.nbytes else part.clone()
        full = torch.empty(shape, dtype=dtype) if full is None else full
        _narrowed(full, c).copy_(part)
    return torch.empty(shape, dtype=dtype) if full is None else full  # no chunks: an empty tensor


class _Files:
    """The folder's data files and the torch.save records at offsets in them. On a local disk each file is
    opened once and a record loaded straight from it through a window (no copy of its bytes first). From a
    remote store (S3) :meth:`fetch` first reads the small records in spans of adjacent ones (up to
    SPAN_BYTES each), several spans at a time: through a window on the object, torch.load's reads at both
    ends of each record fetched a part-sized block (16 MiB) each time, one record after the other."""

    def __init__(self, storage: Storage, shown: str) -> None:
        self.storage, self.shown = storage, shown
        self.open: dict[str, Any] = {}
        self.remote = storage.local_path() is None
        self.fetched: dict[tuple[str, int], Any] = {}  # (file, offset) -> the record loaded, or its exception

    def fetch(self, wanted: list[tuple[str, Chunk]]) -> None:
        """Read and load the records up to SPAN_BYTES; larger ones are read when asked for, through a window
        (their bytes straight into the tensor, as the store's concurrent parts: no copy held first)."""
        small = [(fqn, c) for fqn, c in wanted if c.length <= SPAN_BYTES]
        with cf.ThreadPoolExecutor(REMOTE_THREADS, thread_name_prefix="harness-dcp") as pool:
            for loaded in pool.map(self._fetch_span, _spans(small)):
                self.fetched.update(loaded)

    def _fetch_span(self, span: list[tuple[str, Chunk]]) -> dict[tuple[str, int], Any]:
        file, start = span[0][1].file, span[0][1].offset
        end = max(c.offset + c.length for _, c in span)
        buf = io.BytesIO(self.storage.read_bytes(file, start, end))
        out: dict[tuple[str, int], Any] = {}
        for fqn, c in span:
            try:
                out[(c.file, c.offset)] = self._load(fqn, c, Window(buf, c.offset - start, c.length))
            except (CheckpointFormatError, torchload.NeedsObjects) as exc:  # raised when the record is asked for
                out[(c.file, c.offset)] = exc
        return out

    def __enter__(self) -> "_Files":
        return self

    def __exit__(self, *exc: Any) -> None:
        for f in self.open.values():
            f.close()

    def record(self, fqn: str, c: Chunk) -> Any:
        if (c.file, c.offset) in self.fetched:
            got = self.fetched.pop((c.file, c.offset))
            if isinstance(got, Exception):
                raise got
            return got
        if c.file not in self.open:
            self.open[c.file] = self.storage.open_read(c.file)
        return self._load(fqn, c, Window(self.open[c.file], c.offset, c.length))

    def _load(self, fqn: str, c: Chunk, source: Any) -> Any:
        try:
            return torchload.load(source)
        except torchload.NotReadable as exc:
            raise CheckpointFormatError(f"{self.shown}/{c.file}: {fqn} at byte {c.offset} is not a torch.save "
                                        f"record ({exc})") from None


def _spans(wanted: list[tuple[str, Chunk]]) -> list[list[tuple[str, Chunk]]]:
    """``wanted`` records in spans read by one ranged read each: adjacent records of one file, in file order,
    up to SPAN_BYTES."""
    spans: list[list[tuple[str, Chunk]]] = []
    for fqn, c in sorted(wanted, key=lambda fc: (fc[1].file, fc[1].offset)):
        last = spans[-1][-1][1] if spans else None
        if (last is not None and last.file == c.file and 0 <= c.offset - (last.offset + last.length) <= SPAN_GAP
                and c.offset + c.length - spans[-1][0][1].offset <= SPAN_BYTES):
            spans[-1].append((fqn, c))
        else:
            spans.append([(fqn, c)])
    return spans


def _what(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of {list(value.shape)}"
    return f"a {type(value).__name__}"


def _narrowed(full: torch.Tensor, c: Chunk) -> torch.Tensor:
    view = full
    for dim, (o, s) in enumerate(zip(c.offsets, c.sizes)):
        view = view.narrow(dim, o, s)
    return view


def _place(root: dict, path: tuple, value: Any, shown: str) -> None:
    """Put ``value`` at ``path`` (dict keys and list indices) in the nested state dict, making containers."""
    node: Any = root
    for key, nxt in zip(path, path[1:]):
        node = _child(node, key, [] if isinstance(nxt, int) else {}, path, shown)
    _set(node, path[-1], value, path, shown)


def _child(node: Any, key: Any, empty: Any, path: tuple, shown: str) -> Any:
    current = _get(node, key, path, shown)
    if current is None:
        _set(node, key, empty, path, shown)
        return empty
    if not isinstance(current, (dict, list)):
        raise CheckpointFormatError(f"{shown}: {'.'.join(map(str, path))} nests inside a value that is not a container")
    return current


def _get(node: Any, key: Any, path: tuple, shown: str) -> Any:
    if isinstance(key, int) != isinstance(node, list):
        raise CheckpointFormatError(f"{shown}: {'.'.join(map(str, path))} mixes list indices and keys")
    if isinstance(node, list):
        return node[key] if key < len(node) else None
    return node.get(key)


def _set(node: Any, key: Any, value: Any, path: tuple, shown: str) -> None:
    _get(node, key, path, shown)  # the same checks
    if isinstance(node, list):
        node.extend([None] * (key + 1 - len(node)))
    node[key] = value


def describe(storage: Storage, shown: str) -> dict:
    """What a DCP folder holds, from its ``.metadata`` alone (checked as for a read; no data read): every
    tensor's key, dtype, shape, bytes and number of chunks, the other values' keys, and the files."""
    layout = read_layout(storage, shown)
    tensors = [{"key": fqn, "dtype": str(dtype).removeprefix("torch."), "shape": list(shape),
                "bytes": _numel(shape) * dtype.itemsize, "chunks": len(chunks)}
               for fqn, (dtype, shape, chunks) in layout.tensors.items()]
    return {"format": "torch.distributed.checkpoint", "url": shown, "tensors": tensors, "values": list(layout.values),
            "bytes": sum(t["bytes"] for t in tensors), "files": layout.files()}
