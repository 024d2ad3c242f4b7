"""The first training step after a restore, harness's trainer against a plain DDP + AdamW loop, A/B in one run.

    python benchmarks/first_step_ab.py --size-gb 1.1 --repeat 4

resume_time.py found harness's first step after a restore of the 1.1 GB state slower than a plain loop's
(2.4-2.5 s against 1.4 s in single runs). This times the same step both ways under torchrun (2 gloo ranks),
alternating the two, split into forward, backward and optimizer step: ``harness`` builds harness's Trainer
(setup + resume from a checkpoint this script makes first) and runs its step's parts; ``plain`` builds the
model, DDP and AdamW with the optimizer state loaded (zeros), as resume_time's plain_first_step does. Rank 0's
times; medians over ``--repeat`` launches of each. JSON under benchmarks/results/ (first_step_ab_<stamp>.json
and first_step_ab_latest.json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _first_step import CONFIG, job_env, model_sets, run_steps  # noqa: E402

def make_checkpoint(sets: list[str]) -> None:
    cmd = [sys.executable, "-m", "harness", "launch", "--nproc-per-node", "2", "--config", CONFIG]
    for s in sets + ["train.max_steps=1", "checkpoint.every_steps=1"]:
        cmd += ["--set", s]
    subprocess.run(cmd, env=job_env(), check=True, capture_output=True, timeout=600)


def summary(runs: list[list[dict]]) -> dict:
    first = {k: round(statistics.median(r[0][k] for r in runs), 3) for k in runs[0][0]}
    later = round(statistics.median(s["total"] for r in runs for s in r[2:]), 3)
    return {"first_step": first, "later_step_total": later,
            "first_step_totals": [round(r[0]["total"], 3) for r in runs]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=1.1)
    ap.add_argument("--repeat", type=int, default=4)
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="first_step_ab_"))
    try:
        sets = model_sets(args.size_gb) + [f"checkpoint.dir={work / 'ck'}", f"run.output_dir={work}"]
        make_checkpoint(sets)
        runs: dict[str, list] = {"harness": [], "plain": []}
        for i in range(args.repeat):
            for mode in ("harness", "plain") if i % 2 == 0 else ("plain", "harness"):
                runs[mode].append(run_steps(mode, sets, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"size_gb": args.size_gb, "repeat": args.repeat, "command": "python benchmarks/first_step_ab.py "
              f"--size-gb {args.size_gb:g} --repeat {args.repeat}", "nproc": 2,
              "cpus": os.cpu_count(), **{m: summary(r) for m, r in runs.items()}, "runs": runs}
    print(f"{'':8} {'first step':>10} {'forward':>8} {'backward':>8} {'optimizer':>9} {'later step':>10}  runs")
    for m in ("harness", "plain"):
        s = result[m]
        f = s["first_step"]
        print(f"{m:8} {f['total']:10.3f} {f['forward']:8.3f} {f['backward']:8.3f} {f['optimizer']:9.3f} "
              f"{s['later_step_total']:10.3f}  {', '.join(f'{v:.2f}' for v in s['first_step_totals'])}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for name in (f"first_step_ab_{stamp}.json", "first_step_ab_latest.json"):
        (out / name).write_text(json.dumps(result, indent=1))
    print(f"results: {out / f'first_step_ab_{stamp}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
