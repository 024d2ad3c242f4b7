"""The safetensors format: its dtype table, a writer, a checked reader, and the export format.

Written and read by our own code (no dependency on the ``safetensors`` package). Layout: 8-byte
little-endian header length N, N bytes of JSON header (padded with spaces to a multiple of 8), then the
tensors' raw little-endian bytes back to back, in header order. The header maps each name to {dtype, shape,
data_offsets: [begin, end]} relative to the end of the header, plus ``__metadata__`` (str -> str).

Export writes the model weights only. Keys are the model's state_dict keys when the checkpoint holds one
model (or ``model=NAME`` picks one), ``NAME.key`` when it holds several. ``__metadata__`` records step,
epoch, loss, the source checkpoint and the harness version (all as strings, as the format requires).
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import IO, Any

import torch

from harness._version import __version__
from harness.checkpoint import blobs
from harness.errors import CheckpointError, CheckpointFormatError
from harness.interop.formats import ExportFormat, ExportJob, Written, summary_value
from harness.storage.local import atomic_write

MAX_HEADER = 100 << 20  # a header larger than this is refused unread (hostile or not a safetensors file)

# The format's dtype codes; the optional ones only where this torch has the dtype.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "C64": torch.complex64,
}
for _name, _code in (("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"), ("float8_e4m3fn", "F8_E4M3"),
                     ("float8_e5m2", "F8_E5M2")):
    if isinstance(getattr(torch, _name, None), torch.dtype):
        DTYPES[_code] = getattr(torch, _name)
CODES: dict[torch.dtype, str] = {dtype: code for code, dtype in DTYPES.items()}


# -- writing ----------------------------------------------------------------------------------------

def write_safetensors(f: IO[bytes], tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """Write ``tensors`` to ``f`` in the safetensors format; returns the bytes written."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    pos = 0
    views = []
    for key, t in tensors.items():
        code = CODES.get(t.dtype)
        if code is None:
            raise CheckpointError(f"tensor {key!r} has dtype {t.dtype}, which safetensors cannot hold")
        buf = blobs.byte_view(t)
        header[key] = {"dtype": code, "shape": list(t.shape), "data_offsets": [pos, pos + len(buf)]}
        views.append(buf)
        pos += len(buf)
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    for buf in [memoryview(struct.pack("<Q", len(raw))), memoryview(raw), *views]:
        blobs.write_all(f, buf)  # unbuffered files may write less than asked
    return 8 + len(raw) + pos


# -- reading ----------------------------------------------------------------------------------------

def looks_like_safetensors(head: bytes) -> bool:
    """Whether a file's first 9 bytes look like a safetensors header (a sane length, then a JSON object)."""
    if len(head) < 9:
        return False
    n = struct.unpack("<Q", head[:8])[0]
    return 2 <= n <= MAX_HEADER and head[8:9] == b"{"


def read_safetensors(f: Any, shown: str = "file") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file from a binary file object, checking the header against the file's size
    (dtype, shape, offsets inside the data, no overlap). Returns (tensors, __metadata__)."""
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(0)

    def bad(msg: str) -> CheckpointFormatError:
        return CheckpointFormatError(f"{shown}: not a valid safetensors file: {msg}")

    if size < 8:
        raise bad("shorter than its 8-byte header length")
    n = struct.unpack("<Q", f.read(8))[0]
    if n > min(size - 8, MAX_HEADER):
        raise bad(f"header length {n} exceeds the file")
    try:
        header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad(f"header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise bad("__metadata__ is not an object")
    spans = _checked_spans(header, size - 8 - n, bad)
    tensors: dict[str, torch.Tensor] = {}
    for begin, end, key, dtype, shape in spans:
        f.seek(8 + n + begin)
        buf = _read_exact(f, end - begin)
        if len(buf) != end - begin:
            raise bad(f"entry {key!r} is truncated")
        t = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
        tensors[key] = t.reshape(shape)
    order = {k: i for i, k in enumerate(header)}
    return dict(sorted(tensors.items(), key=lambda kv: order[kv[0]])), {str(k): str(v) for k, v in meta.items()}


def _read_exact(f: Any, n: int) -> bytearray:
    """Up to ``n`` bytes, fewer only at the end of the file: an unbuffered file returns at most about 2 GiB
    per read, so one large tensor may take several."""
    buf = bytearray(n)
    view, done = memoryview(buf), 0
    while done < n:
        chunk = f.read(n - done)
        if not chunk:
            break
        view[done:done + len(chunk)] = chunk
        done += len(chunk)
    return buf if done == n else buf[:done]


def _checked_spans(header: dict, data_len: int, bad: Any) -> list[tuple]:
    """(begin, end, key, dtype, shape) of every entry, sorted by offset, each checked against the data."""
    spans = []
    for key, info in header.items():
        if not isinstance(info, dict):
            raise bad(f"entry {key!r} is not an object")
        dtype = DTYPES.get(info.get("dtype"))
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if dtype is None:
            raise bad(f"entry {key!r} has unsupported dtype {info.get('dtype')!r}")
        if (not isinstance(shape, list) or len(shape) > 32
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 46 for d in shape)):
            raise bad(f"entry {key!r} has a bad shape")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_len):
            raise bad(f"entry {key!r} has offsets outside the data")
        itemsize = torch.empty((), dtype=dtype).element_size()
        if offsets[1] - offsets[0] != math.prod(shape) * itemsize:
            raise bad(f"entry {key!r}: {offsets[1] - offsets[0]} bytes for shape {shape} of {info['dtype']}")
        spans.append((offsets[0], offsets[1], key, dtype, shape))
    spans.sort()
    for (_, end, k1, _, _), (start, _, k2, _, _) in zip(spans, spans[1:]):
        if start < end:
            raise bad(f"entries {k1!r} and {k2!r} overlap")
    return spans


# -- the export format ------------------------------------------------------------------------------

def model_tensors(models: dict, name: str) -> dict[str, torch.Tensor]:
    """The models' weights under safetensors keys (``key``, or ``MODEL.key`` for several models)."""
    if not models:
        raise CheckpointError(f"{name} holds no model: nothing to export as safetensors")
    out: dict[str, torch.Tensor] = {}
    for mname, sd in models.items():
        for key, value in sd.items():
            full = key if len(models) == 1 else f"{mname}.{key}"
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"{name}: model {mname!r} entry {key!r} is a {type(value).__name__}, not a "
                                      "tensor; safetensors holds tensors only: export with --format pt")
            if full in out:
                raise CheckpointError(f"{name}: two tensors would both be named {full!r} in the safetensors file")
            out[full] = value
    return out


def write(job: ExportJob) -> Written:
    raw, models = job.raw, job.models
    tensors = model_tensors({n: models[n] for n in job.names}, job.checkpoint)
    loss = summary_value(raw, "loss")
    meta = {"format": "pt", "step": str(raw["step"]), "epoch": str(raw["epoch"]),
            "loss": "" if loss is None else repr(float(loss)), "checkpoint": job.checkpoint,
            "harness_version": __version__}
    if job.model is not None:
        meta["model"] = job.model
    atomic_write(job.out, lambda f: write_safetensors(f, tensors, meta))
    return Written([{"model": job.model, "out": job.out, "bytes": os.path.getsize(job.out), "check": None}],
                   len(tensors))


FORMAT = ExportFormat("safetensors", write, suffixes=(".safetensors",),
                      no_quantize_hint=" (safetensors holds plain tensors, not int8 packed weights)")
