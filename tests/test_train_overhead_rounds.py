"""benchmarks/train_overhead.py --rounds: the modes run interleaved, each run in its own folder, and a mode's
overhead is the median of its per-round overheads against the same round's none run. Checks the report's
structure and arithmetic, never timings."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_rounds_interleave_and_report_medians(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "train_overhead.py"), "--device", "cpu", "--d-model", "32",
         "--n-layers", "1", "--n-heads", "2", "--seq-len", "16", "--vocab-size", "128", "--batch-size", "2",
         "--steps", "4", "--every", "2", "--warmup", "1", "--modes", "none,async,async_normal", "--rounds", "2",
         "--no-recovery", "--out", str(out), "--dir", str(work)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)  # a hang guard, not a timing check
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    result = json.loads((out / "train_overhead_cpu_latest.json").read_text())
    assert result["env"]["rounds"] == 2
    rows = {r["mode"]: r for r in result["rows"]}
    assert list(rows) == ["none", "async", "async_normal"]
    order = [line.split("]")[1].split(":")[0].strip() for line in proc.stderr.splitlines()
             if line.startswith("[train_overhead") and " steps, checkpoint every " in line]
    assert order == [f"{m} (round {r})" for r in (1, 2) for m in ("none", "async", "async_normal")]  # interleaved
    for mode in ("async", "async_normal"):
        r = rows[mode]
        assert len(r["rounds"]) == 2 and r["async"] is True
        assert r["overhead_pct"] == statistics.median(x["overhead_pct"] for x in r["rounds"])
        assert len(r["per_checkpoint"]) == 2 and len(r["steady_checkpoints"]) == 2  # one checkpoint per run
        assert r["copy_s"] > 0
    assert rows["none"]["overhead_pct"] == 0.0
    assert "median +" in proc.stdout or "median -" in proc.stdout  # the per-round line was printed
    assert not any(p.is_file() for p in work.rglob("*"))  # every round's folder removed
