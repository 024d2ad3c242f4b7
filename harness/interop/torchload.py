"""``torch.load(weights_only=True)``, the one way harness reads torch.save bytes it did not write (plain
checkpoints, Lightning and Hugging Face files, the records inside DCP folders), and its refusals in words.

torch puts the reason for a refusal deep in a long message that also suggests ``weights_only=False``; the
exceptions here carry only the reason: :class:`NeedsObjects` when the bytes ask for a Python object that
weights_only will not build (nothing from them ran), :class:`NotReadable` when they are not torch.save bytes.
"""

from __future__ import annotations

import pickle
import re
import warnings
from typing import IO, Any

import torch


class NeedsObjects(Exception):
    """The bytes need unpickling an arbitrary Python object (named in the message); nothing was run."""


class NotReadable(Exception):
    """Not torch.save bytes, or damaged ones (why, in the message)."""


def load(f: IO[bytes]) -> Any:
    """What ``f`` holds, on the CPU, built from tensors and plain containers only."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")  # refused below if it matters
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if re.search(r"GLOBAL|global|[Cc]lass", str(exc)):
            raise NeedsObjects(reason(exc)) from None
        raise NotReadable(reason(exc)) from None  # no Python object asked for: not torch.save bytes
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bytes that are not its format
        raise NotReadable(f"{type(exc).__name__}: {first_line(exc)}") from None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


def reason(exc: BaseException) -> str:
    """The part of an unpickling error that says what was wrong (the global asked for, the bad opcode)."""
    text = str(exc)
    m = re.search(r"([^\n]*GLOBAL [\w.]+[^\n]*|Unsupported operand \d+|invalid load key[^\n]*)", text)
    return " ".join((m.group(1) if m else first_line(exc)).split())[:200]


def global_named(exc: BaseException) -> str:
    """The ``module.name`` a NeedsObjects refusal is about, or "a Python object"."""
    m = re.search(r"GLOBAL ([\w.]+)", str(exc))
    return m.group(1) if m else "a Python object"
