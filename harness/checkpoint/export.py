"""Export one verified checkpoint as a single file for inference or for plain-PyTorch users.

Two formats:

``pt``
    A dict saved with :func:`torch.save` that loads with ``torch.load(FILE, weights_only=True)``. It
    uses the keys of the PyTorch tutorial ("Saving and loading a general checkpoint"):

    - ``epoch``, ``step``, ``loss``, ``metrics``;
    - ``model_state_dict`` / ``optimizer_state_dict`` / ``scheduler_state_dict`` when the checkpoint
      holds exactly one object of that kind;
    - ``model_state_dicts`` / ``optimizer_state_dicts`` / ``scheduler_state_dicts`` (a dict
      name -> state dict) instead when it holds several (a GAN: ``{"generator": ..., "discriminator":
      ...}``). The singular key is then absent, so code written for one model fails loudly rather than
      silently picking one. Each kind is decided on its own: two models and one optimizer give
      ``model_state_dicts`` and ``optimizer_state_dict``. A kind the checkpoint does not hold is absent;
    - ``scaler_state_dict`` when an AMP grad scaler was saved;
    - ``checkpoint`` (the source folder name) and ``harness_version``.

    Per-rank state (RNG states, data cursors) and ``extra`` objects are not exported: they only make
    sense for resuming with harness itself.

``safetensors``
    The model weights only, in the safetensors format, written by a small writer of our own (no
    dependency on the ``safetensors`` package). Keys are the model's state_dict keys when the checkpoint
    holds one model, ``NAME.key`` when it holds several. ``__metadata__`` records step, epoch, loss,
    the source checkpoint and the harness version (all as strings, as the format requires).

The checkpoint used is the newest one that verifies completely (every checksum), walking back past
damaged ones as restore does, or the newest valid one at ``step``. Nothing from the checkpoint is ever
unpickled: it is read with :func:`harness.checkpoint.load.read_state`. The output is written to a
temporary file next to ``out``, fsync'd and renamed, so ``out`` is either whole or absent (an existing
``out`` is replaced only by a complete new file).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import struct
import uuid
from typing import Any, Callable, IO

import numpy as np
import torch

import harness
from harness.checkpoint import blobs
from harness.checkpoint.discovery import list_checkpoints
from harness.checkpoint.load import read_state
from harness.errors import CheckpointError, HarnessError, NoCheckpointError
from harness.storage import Storage, redact_url

log = logging.getLogger("harness")

FORMATS = ("pt", "safetensors")

SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.complex64: "C64",
}
for _name, _code in (("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"), ("float8_e4m3fn", "F8_E4M3"),
                     ("float8_e5m2", "F8_E5M2")):
    if isinstance(getattr(torch, _name, None), torch.dtype):
        SAFETENSORS_DTYPES[getattr(torch, _name)] = _code

_KINDS = (("models", "model_state_dict", "model_state_dicts"),
          ("optimizers", "optimizer_state_dict", "optimizer_state_dicts"),
          ("schedulers", "scheduler_state_dict", "scheduler_state_dicts"))


def export_checkpoint(url: str, out: str, *, fmt: str = "pt", step: int | None = None,
                      storage_options: dict | None = None, io_threads: int = 4) -> dict:
    """Write the newest valid checkpoint under ``url`` (or the newest valid one at ``step``) to the local
    file ``out`` as ``fmt`` ("pt" or "safetensors"). Returns a summary dict: checkpoint, step, epoch, loss,
    format, out, bytes, models, tensors, skipped (damaged newer checkpoints passed over, with reasons).

    Raises NoCheckpointError when no committed checkpoint (at ``step``) verifies, and HarnessError for a
    bad argument; ``out`` is then left untouched."""
    if fmt not in FORMATS:
        raise HarnessError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    out = _local_path(out)
    storage = Storage(url, storage_options)
    name, manifest, state, skipped = _load_newest_valid(storage, step, io_threads)
    raw = manifest.raw
    models = dict(state.get("models") or {})
    if fmt == "pt":
        payload = _pt_payload(raw, state)
        n_tensors = _count_tensors(payload)
        _atomic_write(out, lambda f: torch.save(payload, f))
    else:
        tensors = _safetensors_tensors(models, name)
        meta = {"format": "pt", "step": str(raw["step"]), "epoch": str(raw["epoch"]),
                "loss": "" if raw.get("loss") is None else repr(float(raw["loss"])),
                "checkpoint": name, "harness_version": harness.__version__}
        n_tensors = len(tensors)
        _atomic_write(out, lambda f: write_safetensors(f, tensors, meta))
    summary = {"checkpoint": name, "step": raw["step"], "epoch": raw["epoch"], "loss": raw.get("loss"),
               "format": fmt, "out": out, "bytes": os.path.getsize(out), "models": list(models),
               "tensors": n_tensors, "skipped": skipped}
    log.info("exported %s of %s to %s (%s, %d tensors)", name, redact_url(url), out, fmt, n_tensors)
    return summary


# -- choosing and reading ---------------------------------------------------------------------------

def _load_newest_valid(storage: Storage, step: int | None, threads: int) -> tuple[str, Any, dict, list]:
    infos = [i for i in reversed(list_checkpoints(storage)) if step is None or i.step == step]
    skipped: list[tuple[str, str]] = []
    for info in infos:
        try:
            # ranks=None: every referenced tensor is read and verified, like restore's choice
            manifest, state, _ = read_state(storage, info.name, ranks=None, threads=threads)
        except (CheckpointError, OSError, EOFError) as exc:
            log.warning("checkpoint %s is not usable, trying an older one: %s", info.name, exc)
            skipped.append((info.name, str(exc)))
            continue
        if any(e.global_shape is not None for e in manifest.tensors.values()):
            raise CheckpointError(f"{info.name} holds sharded tensors; exporting sharded checkpoints is not "
                                  "supported yet")
        return info.name, manifest, state, skipped
    where = redact_url(storage.url)
    at = f" at step {step}" if step is not None else ""
    if skipped:
        raise NoCheckpointError(f"no valid checkpoint{at} in {where}: "
                                + "; ".join(f"{n}: {r}" for n, r in skipped))
    raise NoCheckpointError(f"no committed checkpoint{at} in {where}")


# -- pt ---------------------------------------------------------------------------------------------

def _pt_payload(raw: dict, state: dict) -> dict:
    payload: dict[str, Any] = {"epoch": raw["epoch"], "step": raw["step"], "loss": raw.get("loss"),
                               "metrics": dict(raw.get("metrics") or {})}
    for kind, one, several in _KINDS:
        objs = dict(state.get(kind) or {})
        if len(objs) == 1:
            payload[one] = next(iter(objs.values()))
        elif objs:
            payload[several] = objs
    if state.get("scaler") is not None:
        payload["scaler_state_dict"] = state["scaler"]
    payload["checkpoint"] = raw["name"]
    payload["harness_version"] = raw.get("harness_version")
    return _weights_only_safe(payload)


def _weights_only_safe(obj: Any) -> Any:
    """numpy arrays (which torch.load(weights_only=True) refuses) become tensors; the rest of a decoded
    state is already made of types the weights-only unpickler accepts."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj)
    if isinstance(obj, dict):
        return {k: _weights_only_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_weights_only_safe(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_weights_only_safe(v) for v in obj)
    return obj


def _count_tensors(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return 1
    if isinstance(obj, dict):
        return sum(_count_tensors(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_count_tensors(v) for v in obj)
    return 0


# -- safetensors ------------------------------------------------------------------------------------

def _safetensors_tensors(models: dict, name: str) -> dict[str, torch.Tensor]:
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


def write_safetensors(f: IO[bytes], tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """Write ``tensors`` to ``f`` in the safetensors format; returns the bytes written.

    Layout: 8-byte little-endian header length N, N bytes of JSON header (padded with spaces to a
    multiple of 8), then the tensors' raw little-endian bytes back to back, in header order. The header
    maps each name to {dtype, shape, data_offsets: [begin, end]} relative to the end of the header, plus
    ``__metadata__`` (str -> str)."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    pos = 0
    views = []
    for key, t in tensors.items():
        code = SAFETENSORS_DTYPES.get(t.dtype)
        if code is None:
            raise CheckpointError(f"tensor {key!r} has dtype {t.dtype}, which safetensors cannot hold")
        buf = blobs.byte_view(t)
        header[key] = {"dtype": code, "shape": list(t.shape), "data_offsets": [pos, pos + len(buf)]}
        views.append(buf)
        pos += len(buf)
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for buf in views:
        _write_all(f, buf)
    return 8 + len(raw) + pos


def _write_all(f: IO[bytes], buf: memoryview) -> None:
    done = 0
    while done < len(buf):
        n = f.write(buf[done:])
        done += len(buf) - done if n is None else n


# -- output -----------------------------------------------------------------------------------------

def _local_path(out: str) -> str:
    if out.startswith("file://"):
        out = out[len("file://"):]
    elif "://" in out:
        raise HarnessError(f"export writes a local file; got {redact_url(out)!r}")
    if not out:
        raise HarnessError("export needs an output file name")
    return os.path.abspath(out)


def _atomic_write(out: str, write: Callable[[IO[bytes]], Any]) -> None:
    """Write through ``write`` into a temp file next to ``out``, fsync, rename over ``out``, fsync folder."""
    folder = os.path.dirname(out)
    if not os.path.isdir(folder):
        raise HarnessError(f"cannot write {out}: folder {folder} does not exist")
    if os.path.isdir(out):
        raise HarnessError(f"cannot write {out}: it is a folder")
    tmp = os.path.join(folder, f".{os.path.basename(out)}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # usual permissions (umask applies)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    dfd = os.open(folder, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            os.fsync(dfd)
    finally:
        os.close(dfd)
