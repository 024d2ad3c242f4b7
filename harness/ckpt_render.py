"""Text for ``harness ckpt``: sizes, cells, config and value summaries, tables and the one-line error format.
Pure formatting: nothing here reads storage, so every command prints numbers and errors the same way."""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from typing import Any

from harness.storage import redact

PROG = "harness"


def human_size(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


def dash(v: Any) -> str:
    return "-" if v is None else str(v)


def loss_text(v: Any) -> str:
    if isinstance(v, dict) and "__float__" in v:  # a commit record's nan/inf, as the codec tags it
        v = v["__float__"]
    if isinstance(v, str) and v.lstrip("-") in ("nan", "inf"):  # ckpt inspect's JSON form
        return v
    return f"{v:.6g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def num_text(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, list):
        return "[" + ", ".join(num_text(x) for x in v) + "]"
    return str(v)


def short_time(created: Any) -> str:
    if not isinstance(created, str):
        return "-"
    try:
        t = datetime.fromisoformat(created)
    except ValueError:
        return created[:25]
    if t.tzinfo is not None:
        t = t.astimezone(timezone.utc)
    return t.strftime("%Y-%m-%d %H:%M:%SZ" if t.tzinfo is not None else "%Y-%m-%d %H:%M:%S")


def without_name(name: str, reason: str) -> str:
    """A reason without the checkpoint's name repeated in front of it."""
    for prefix in (f"{name}: ", f"{name}/"):
        if reason.startswith(prefix):
            return reason[len(prefix):]
    return reason


def config_line(cfg: dict) -> str:
    parts = []
    for section in ("model", "data"):
        sec = cfg.get(section)
        if isinstance(sec, dict):
            opts = ", ".join(f"{k}={v}" for k, v in sec.items() if k != "name")
            parts.append(f"{section} {sec.get('name')}" + (f" ({opts})" if opts else ""))
    train = cfg.get("train") if isinstance(cfg.get("train"), dict) else {}
    if train.get("entry"):
        parts.append(f"entry {train['entry']}")
    optim = cfg.get("optim") if isinstance(cfg.get("optim"), dict) else {}
    if optim:
        parts.append(f"optim {optim.get('name')} lr={optim.get('lr')}")
    if train:
        parts.append(f"seed {train.get('seed')}, max_steps {train.get('max_steps')}, batch {train.get('batch_size')}")
    return "; ".join(parts)


def print_table(header: list[str], table: list[list[str]], right: set[int]) -> None:
    """Columns padded to the widest cell (those in ``right`` right-aligned), with no trailing spaces after the
    last column."""
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(len(header))]
    for row in [header, *table]:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        cells[-1] = row[-1]
        print("  ".join(cells))


def clean(msg: str, secrets: list[str]) -> str:
    """One line, with URL credentials and the given secrets (storage option values, the URL's
    user:password) blanked out."""
    return redact.one_line(msg, secrets)


def error(msg: str, secrets: list[str], prefix: str = "error") -> None:
    print(f"{PROG}: {prefix}: {clean(msg, secrets)}", file=sys.stderr)


def warn_skipped(skipped: list, secrets: list[str] | None = None, label: str = "") -> None:
    """One stderr warning per checkpoint passed over on the way to the one chosen (damaged, or filtered out)."""
    for name, reason in skipped:
        why = without_name(name, reason) if secrets is None else clean(without_name(name, reason), secrets)
        print(f"{PROG}: warning: {label}skipped {name}: {why}", file=sys.stderr)
