"""What ``CheckpointManager`` is given (its constructor, ``save``, ``restore``), checked and normalized before
the folder is touched or anything is captured.

A step of 6.5 was saved as step 6, ``True`` as step 1, ``-1`` as a folder named ``step--00000001``; a list of
models failed deep inside with ``'list' object has no attribute 'state_dict'``; a loss still attached to the
graph made torch warn, and a metric given as a 0-d tensor (what ``(pred == y).float().mean()`` is) was
refused; a ``pathlib.Path`` folder failed, ``io_threads=0`` was taken. Here: counters are non-negative integers
(numpy and 0-d integer tensors included), every object given has ``state_dict()``/``load_state_dict()`` and is
of its argument's kind, summary numbers given as tensors or numpy scalars become plain numbers, and the
constructor's settings are in range.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any, Mapping

import numpy as np
import torch

from harness.checkpoint.background import PRIORITIES as WRITER_PRIORITIES
from harness.checkpoint.kinds import EXTRA, KINDS
from harness.layout import MAX_STEP
from harness.state import Stateful


def counter(value: Any, what: str, minimum: int = 0) -> int:
    """``step``/``epoch`` (a setting: at least ``minimum``) as an int; TypeError or ValueError naming it."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"checkpoint {what} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"checkpoint {what} must be {'>= 0' if minimum == 0 else f'> {minimum - 1}'}, got {value}")
    if what == "step" and value > MAX_STEP:  # it saved "OK" as step-1000000000000, which no listing matches
        raise ValueError(f"checkpoint step must be at most {MAX_STEP} (12 digits in the folder name), got {value}")
    return int(value)


def loss_value(value: Any) -> float | None:
    """``loss`` as a number (after :func:`summary`): a string such as "0.05" was taken as one, "abc" raised a
    bare ValueError from deep inside save, a 2-element tensor torch's "only one element tensors" error."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        shown = f"a tensor of {value.numel()} elements" if isinstance(value, torch.Tensor) else \
            f"{type(value).__name__} {value!r}"[:80]
        raise TypeError(f"checkpoint loss must be a number (or a one-element tensor), got {shown}")
    return float(value)


def summary(value: Any) -> Any:
    """A loss or metrics as plain numbers: one-element tensors (detached, so torch does not warn about a
    value still in the graph) and numpy scalars become Python numbers, inside dicts and lists too."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.detach().item()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {k: summary(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(summary(v) for v in value)
    return value


def own_state(value: Any) -> Any:
    """``position``/``rank_state`` as saved: an object with ``state_dict()`` (a ``StatefulDataLoader``, a
    sampler of one's own) as its state dict, a ``torch.Generator`` as ``get_state()``; restore gives that back
    (``loader.load_state_dict(res.position)``, ``gen.set_state(res.position)``). Anything else as it is."""
    if isinstance(value, Stateful):
        return value.state_dict()
    if isinstance(value, torch.Generator):
        return value.get_state()
    return value


def check_objects(by_section: Mapping[str, Any]) -> None:
    """Every object given by keyword (other than ``extra=``, which also takes plain values) can be saved
    and restored, and is of its argument's kind: TypeError naming the argument and what it got (a list of
    models: name them in a dict; an optimizer given as ``models=``: pass it as ``optimizers=``)."""
    for kind in KINDS:
        objs = by_section.get(kind.section)
        if kind is EXTRA or objs is None:
            continue
        table = objs if isinstance(objs, Mapping) else {kind.label: objs}
        for name, obj in table.items():
            where = f"{kind.section}[{name!r}]" if isinstance(objs, Mapping) else f"{kind.section}="
            other = next((k for k in KINDS if k not in (kind, EXTRA) and k.accepts(obj)), None)
            if other is not None and not kind.accepts(obj):
                raise TypeError(f"{where} got {_a(other.label)} ({type(obj).__name__}): pass it as {other.section}=")
            if not isinstance(obj, Stateful):
                hint = (f": name them in a dict, {kind.section}={{'a': ..., 'b': ...}}"
                        if isinstance(obj, (list, tuple)) else "")
                raise TypeError(f"{where} takes {_a(kind.label)} (an object with state_dict() and "
                                f"load_state_dict()) or a dict of named ones, got {type(obj).__name__}{hint}")


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def optional_counter(value: Any, what: str) -> int | None:
    return None if value is None else counter(value, what)


def folder(value: Any) -> str:
    """The manager's folder: a path (``str`` or ``pathlib.Path``) or a URL, not empty."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise TypeError(f"CheckpointManager takes a folder or URL (str or pathlib.Path), got {type(value).__name__}")
    if not value.strip():
        raise ValueError("CheckpointManager's folder is empty: name the folder (or URL) the checkpoints go to")
    return value


def check_settings(**settings: Any) -> None:
    """The constructor's numbers and choices, before the folder is touched: ValueError/TypeError naming the
    argument (``io_threads=0`` or ``writer_priority='low'`` were taken without a word)."""
    for name in ("keep_last", "keep_best"):
        counter(settings[name], name)
    for name in ("max_file_bytes", "shard_chunk_bytes", "io_threads"):
        counter(settings[name], name, minimum=1)
    timeout = settings["timeout_s"]
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) or not 1 <= timeout < math.inf:
        raise ValueError(f"checkpoint timeout_s is in seconds and must be a finite number >= 1, got {timeout!r}")
    if settings["writer_priority"] not in WRITER_PRIORITIES:
        raise ValueError(f"checkpoint writer priority must be one of {', '.join(WRITER_PRIORITIES)}, "
                         f"got {settings['writer_priority']!r}")
    if settings["best_mode"] not in ("min", "max"):
        raise ValueError(f"best_mode must be 'min' or 'max', got {settings['best_mode']!r}")
    if not isinstance(settings["best_metric"], str) or not settings["best_metric"]:
        raise ValueError(f"best_metric must name a metric ('loss' or a key of the saved metrics), "
                         f"got {settings['best_metric']!r}")
