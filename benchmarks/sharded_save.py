#!/usr/bin/env python
"""Save time of a replicated (DDP-style) state at 1, 2 and 4 ranks: rank 0 writes it all (the default) vs
``split_replicated=True`` (the ranks share the writes, greedy by size; rank 0 commits once all reported).

Ranks are real processes (torch.multiprocessing spawn, gloo on CPU). Each configuration saves the same state
``--repeats`` times into a fresh folder (durable: fsync'd files, folder and commit record); the time is from a
barrier before ``save()`` to a barrier after it returned on every rank (synchronous saves). Prints a table
and writes JSON (default benchmarks/results/sharded_save_cpu.json).

    python benchmarks/sharded_save.py --size-mb 64 --repeats 3
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp


def _state(size_mb: float, tensors: int) -> dict[str, torch.Tensor]:
    """``tensors`` fp32 tensors of mixed sizes adding up to about ``size_mb`` MB, the same on every rank."""
    g = torch.Generator().manual_seed(0)
    weights = [1 + (i % 4) for i in range(tensors)]  # a mix of sizes, as a model's layers are
    total = int(size_mb * 1e6 / 4)
    return {f"layer{i}.weight": torch.randn(max(1, total * w // sum(weights)), generator=g)
            for i, w in enumerate(weights)}


def _worker(rank: int, world: int, init: str, root: str, size_mb: float, tensors: int, repeats: int,
            split: bool, out: str) -> None:
    os.environ["RANK"] = str(rank)
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                             timeout=datetime.timedelta(seconds=300))
    from harness import CheckpointManager

    state = _state(size_mb, tensors)
    mgr = CheckpointManager(root, keep_last=1, split_replicated=split, timeout_s=300)
    times = []
    for i in range(repeats):
        tdist.barrier()
        t0 = time.perf_counter()
        mgr.save(i + 1, extra={"weights": state})
        tdist.barrier()
        times.append(time.perf_counter() - t0)
    mgr.close()
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    tdist.destroy_process_group()
    from harness.dist import leave
    leave(0)  # not through interpreter teardown, which a gloo thread can abort (harness.dist.leave)


def run(world: int, split: bool, size_mb: float, tensors: int, repeats: int, base: Path) -> list[float]:
    tag = f"w{world}-{'split' if split else 'rank0'}"
    root, out = base / tag, base / f"{tag}.json"
    mp.start_processes(_worker, args=(world, str(base / f"rdzv-{tag}"), str(root), size_mb, tensors, repeats,
                                      split, str(out)), nprocs=world, start_method="spawn", join=True)
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=float, default=64.0, help="replicated state size (default 64 MB)")
    ap.add_argument("--tensors", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--worlds", default="1,2,4")
    ap.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temp folder)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "sharded_save_cpu.json"))
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    base = Path(tempfile.mkdtemp(prefix="sharded-save-", dir=args.dir))
    rows = []
    try:
        for world in [int(w) for w in args.worlds.split(",")]:
            for split in (False, True):
                if world == 1 and split:
                    continue  # one rank: nothing to split
                times = run(world, split, args.size_mb, args.tensors, args.repeats, base)
                med = statistics.median(times)
                rows.append({"world_size": world, "mode": "split" if split else "rank0", "times_s": times,
                             "median_s": med, "mb_per_s": args.size_mb / med})
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"replicated state {args.size_mb:.0f} MB in {args.tensors} tensors, {args.repeats} saves each, "
          f"{os.cpu_count()} CPUs")
    print(f"{'ranks':>5}  {'writes':<7} {'median s':>9} {'MB/s':>8}  all (s)")
    for r in rows:
        print(f"{r['world_size']:>5}  {r['mode']:<7} {r['median_s']:>9.3f} {r['mb_per_s']:>8.1f}  "
              + " ".join(f"{t:.3f}" for t in r["times_s"]))
    result = {"benchmark": "sharded_save", "device": "cpu", "size_mb": args.size_mb, "tensors": args.tensors,
              "repeats": args.repeats, "cpus": os.cpu_count(), "torch": torch.__version__,
              "python": platform.python_version(), "when": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
