"""``torch.load(weights_only=True)``, the one way harness reads torch.save bytes it did not write (plain
checkpoints, Lightning and Hugging Face files, the records inside DCP folders), and its refusals in words.

torch puts the reason for a refusal deep in a long message that also suggests ``weights_only=False``; the
exceptions here carry only the reason: :class:`NeedsObjects` when the bytes ask for a Python object that
weights_only will not build (nothing from them ran), :class:`NotReadable` when they are not torch.save bytes.
"""

from __future__ import annotations

import _compat_pickle
import contextlib
import functools
import io
import pickle
import re
import warnings
from typing import IO, Any

import torch


class NeedsObjects(Exception):
    """The bytes need unpickling an arbitrary Python object (named in the message); nothing was run."""


class NotReadable(Exception):
    """Not torch.save bytes, or damaged ones (why, in the message)."""


MAX_STAND_INS = 16  # each class met costs a read of the file again
_CLASS_NAME = re.compile(r"[A-Z]\w*")


class NotBuilt:
    """Stands in for an object of a class the file names but harness does not import (a config dataclass, a
    ``pathlib.Path``, ``argparse.Namespace`` in a Lightning checkpoint's hyperparameters): nothing of it is
    built and none of its code runs; ``harness_global`` says what it was."""

    harness_global = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<{self.harness_global}: not built>"


def load(f: IO[bytes], stand_in_classes: bool = False) -> Any:
    """What ``f`` holds, on the CPU, built from tensors and plain containers only. ``stand_in_classes``: an
    object of a class the file names (a CamelCase global) becomes a :class:`NotBuilt` instead of refusing
    the file; a function the file would call (``os.system``, a lower-case global) is refused all the same.
    ``f`` must be seekable then (it is read again for each class met)."""
    stand_ins: dict[str, type] = {}
    while True:
        try:
            return _load(f, stand_ins)
        except NeedsObjects as exc:
            name = global_named(exc)
            if (not stand_in_classes or name in stand_ins or len(stand_ins) >= MAX_STAND_INS
                    or not _CLASS_NAME.fullmatch(name.rpartition(".")[2]) or not can_stand_in()):
                raise
            stand_ins[name] = _stand_in(name)
            f.seek(0)


def _stand_in(name: str) -> type:
    """A :class:`NotBuilt` class for the global ``name``."""
    return type(name.rpartition(".")[2], (NotBuilt,), {"harness_global": _python3_name(name)})


def _python3_name(name: str) -> str:
    """The name as its users write it, for the note: torch.save's pickle protocol 2 writes some globals under
    their Python 2 names (``subprocess`` as ``commands``), and Python 3.13 pickles pathlib's classes from their
    private module (``pathlib._local.PosixPath``), whose trailing private parts are dropped (nothing is imported)."""
    module, _, attr = name.rpartition(".")
    module, attr = _compat_pickle.NAME_MAPPING.get((module, attr), (module, attr))
    parts = _compat_pickle.IMPORT_MAPPING.get(module, module).split(".")
    while len(parts) > 1 and parts[-1].startswith("_"):
        parts.pop()
    return f"{'.'.join(parts)}.{attr}"


@functools.lru_cache(maxsize=1)
def can_stand_in() -> bool:
    """Whether this torch maps a global to an object of ours (``safe_globals([(obj, "module.Name")])``, newer
    torch): tried once on a tiny pickle; without it such files are refused as before."""
    import argparse
    if not hasattr(torch.serialization, "safe_globals"):
        return False
    buf = io.BytesIO()
    torch.save({"x": argparse.Namespace()}, buf)
    buf.seek(0)
    probe = _stand_in("argparse.Namespace")
    try:
        with torch.serialization.safe_globals([(probe, "argparse.Namespace")]):
            return isinstance(torch.load(buf, weights_only=True)["x"], probe)
    except Exception:  # noqa: BLE001 - an older torch's way of not supporting it
        return False


def not_built(obj: Any, found: set[str] | None = None) -> set[str]:
    """The classes of every :class:`NotBuilt` in a loaded object (dicts, lists and tuples walked)."""
    found = set() if found is None else found
    if isinstance(obj, NotBuilt):
        found.add(obj.harness_global)
    elif isinstance(obj, dict):
        for v in obj.values():
            not_built(v, found)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            not_built(v, found)
    return found


def not_built_notes(obj: Any) -> list[str]:
    """The importer's note on the stand-ins in a loaded object, if there are any."""
    names = not_built(obj)
    if not names:
        return []
    return [f"objects of classes harness does not import were not built (nothing of them ran; they are not used): "
            f"{', '.join(sorted(names)[:6])}"]


def _load(f: IO[bytes], stand_ins: dict[str, type]) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")  # refused below if it matters
            mapped = (torch.serialization.safe_globals([(cls, name) for name, cls in stand_ins.items()])
                      if stand_ins else contextlib.nullcontext())
            with mapped:
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
