"""Writing a benchmark's results: timestamped and ``_latest`` JSON, and a PNG chart when matplotlib is there."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any, Callable


def write_results(out: Path, prefix: str, stamp: str, result: dict, plot: Callable[[Path], str | None]) -> None:
    """``plot(path)`` draws the chart and returns None, or why it could not (then no stale chart is left)."""
    png_skip = plot(out / f"{prefix}_{stamp}.png")
    if png_skip is None:
        shutil.copyfile(out / f"{prefix}_{stamp}.png", out / f"{prefix}_latest.png")
    else:
        result["png_skipped"] = png_skip
        with contextlib.suppress(FileNotFoundError):  # a stale chart from an earlier run would mislead
            (out / f"{prefix}_latest.png").unlink()
    for stem in (f"{prefix}_{stamp}", f"{prefix}_latest"):
        (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")


def pyplot() -> tuple[Any, str | None]:
    """(matplotlib.pyplot on the Agg backend, None), or (None, why not) when matplotlib is not installed: a
    chart is optional (``pip install -e '.[bench]'``), the table and JSON are the results."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return None, f"matplotlib not installed ({exc}); pip install matplotlib"
    return plt, None


def save_figure(plt: Any, fig: Any, path: Path, **savefig: Any) -> None:
    """Lay out, write and close ``fig`` (every chart at the same resolution); returns None, as a plot does
    when it drew its chart."""
    fig.tight_layout()
    fig.savefig(path, dpi=110, **savefig)
    plt.close(fig)
