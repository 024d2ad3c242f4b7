"""An environment in which ``import harness`` works only from a path the script itself adds: how the GPU machine
runs ``benchmarks/gpu_check.sh`` (the checkout copied there, never pip-installed). Benchmarks run under it in the
tests, so a script that silently relied on the developer's ``pip install -e .`` fails here and not there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HIDER = Path(__file__).resolve().parent / "uninstalled"


def uninstalled_env(**extra: str) -> dict[str, str]:
    """os.environ with PYTHONPATH = only the hider (tests/uninstalled/sitecustomize.py), plus ``extra``."""
    env = {**os.environ, "PYTHONPATH": str(HIDER), **extra}
    return env


def assert_hidden(env: dict[str, str], cwd: Path) -> None:
    """The hider works: from ``cwd`` (not the checkout) a plain ``import harness`` fails."""
    proc = subprocess.run([sys.executable, "-c", "import harness"], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and "No module named 'harness'" in proc.stderr, (proc.returncode, proc.stderr)
