#!/usr/bin/env python
"""What a background checkpoint write takes from a training loop that launches work from Python.

On a GPU a training step is mostly the host thread launching kernels: Python and the GIL. While harness writes
a checkpoint in the background (threads at idle CPU priority: checksums, copies into the O_DIRECT buffer,
``pwrite``), any of that work done while holding the GIL stops the launching thread. On the H200
(benchmarks/results/train_overhead_cuda_20261130-112137.json) gpt_small's steps ran about 30% slower for the
second or so after each checkpoint, while its data files were being written.

This benchmark isolates that: a loop of small torch ops (``x.add_(1)`` on a tiny tensor: on a GPU each is a
kernel launch, on a CPU the same Python + dispatch cost) runs for ``--idle-s`` seconds alone, then right after
an async ``CheckpointManager.save()`` of a ``--size-gb`` state until the save has committed. Reported per mode:
the loop's rate during the background write as a fraction of its rate alone (1.0: the write costs the loop
nothing), and the loop seconds lost per checkpoint (write time x (1 - that fraction)).

Modes (``--modes``), interleaved over ``--rounds``:

* ``from_source``: harness as it is: the snapshot lays each data file's tensors out as the file does, page
  for page, and the O_DIRECT writer sends them to the disk straight from it (``direct_write.FROM_SOURCE``):
  the writers only hash and ``pwrite``;
* ``gil_free``: every piece copied into the 4 MiB O_DIRECT block first, by numpy's memcpy, which releases the
  GIL (``FROM_SOURCE`` off): how harness wrote from the morning of 2026-11-30 to its evening;
* ``gil_held``: the same with that copy made by a memoryview slice assignment, which holds the GIL
  (``bytecopy.GIL_FREE_COPY_MIN`` raised above every piece): how harness wrote before.

Per mode also the share of the data bytes written from the snapshot without a copy (``from_source``), and,
from one more save per round with the loop stopped, the write's time alone (``write_alone_s``) and the CPU
time the process spent on it (``writer_cpu_s``: writers, hashing, commit).

    python benchmarks/writer_contention.py --size-gb 0.5 --rounds 5 --out benchmarks/results
    python benchmarks/writer_contention.py --device cuda --size-gb 2 --rounds 3 --dir /local_nvme/bench

Writes ``writer_contention_<device>_<stamp>.json``/``.png`` (and ``_latest``; ``<device>_matmul`` with ``--loop
matmul``) under ``--out``, the table on stdout.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "benchmarks"):
    if str(p) not in sys.path:  # runnable from a checkout without installing
        sys.path.insert(0, str(p))

from _results import pyplot, save_figure, write_results  # noqa: E402
from checkpoint_io import build_state, state_tensors, unique_bytes  # noqa: E402
from train_overhead import environment  # noqa: E402

from harness import CheckpointManager  # noqa: E402
from harness.storage import bytecopy, direct_write  # noqa: E402

# mode: (direct_write.FROM_SOURCE, bytecopy.GIL_FREE_COPY_MIN)
MODES = {"from_source": (True, bytecopy.GIL_FREE_COPY_MIN), "gil_free": (False, bytecopy.GIL_FREE_COPY_MIN),
         "gil_held": (False, 1 << 62)}
OPS_PER_ITER = 50


def log(msg: str) -> None:
    print(f"[writer_contention] {msg}", file=sys.stderr, flush=True)


def launch_loop(x: torch.Tensor, until: Any) -> tuple[int, float]:
    """In-place ops on ``x`` until ``until()`` is true (checked every OPS_PER_ITER ops): (ops, seconds). A tiny
    ``x`` (``--loop launch``): Python and dispatch, a GPU step's kernel launches; a square matrix (``--loop
    matmul``): ``x @ x`` into ``x``'s twin, compute on torch's intra-op threads, a CPU training step."""
    n, t0 = 0, time.perf_counter()
    out = torch.empty_like(x) if x.dim() == 2 else None
    while not until():
        for _ in range(OPS_PER_ITER if out is None else 1):
            if out is None:
                x.add_(1)
            else:
                torch.mm(x, x, out=out)
        n += OPS_PER_ITER if out is None else 1
    if x.is_cuda:
        torch.cuda.synchronize(x.device)  # the launches queued, run: a rate of work done, not of calls made
    return n, time.perf_counter() - t0


def start_save(mgr: CheckpointManager, model: torch.nn.Module, opt: torch.optim.Optimizer,
               step: int) -> Callable[[], bool]:
    """Start one async save; returns a poll of whether it has committed. Polled, not waited on: a wait() would
    hurry the writers to normal priority."""
    mgr.save(step, models={"model": model}, optimizers={"optimizer": opt})
    pending = mgr._saver.pending
    return lambda: pending is None or pending.done()


def one_checkpoint(mgr: CheckpointManager, model: torch.nn.Module, opt: torch.optim.Optimizer, step: int,
                   x: torch.Tensor, idle_s: float) -> dict:
    """The loop alone for ``idle_s``, then during one async save until it has committed."""
    end = time.perf_counter() + idle_s
    n0, s0 = launch_loop(x, lambda: time.perf_counter() >= end)
    backend = mgr.storage.backend
    written0, uncopied0 = getattr(backend, "data_bytes", 0), getattr(backend, "from_source", 0)
    t0 = time.perf_counter()
    done = start_save(mgr, model, opt, step)
    blocking = time.perf_counter() - t0
    n1, s1 = launch_loop(x, done)
    mgr.wait()  # re-raises a failed save
    idle_rate, busy_rate = n0 / s0, n1 / s1
    written = getattr(backend, "data_bytes", 0) - written0  # local storage counts them (LocalBackend)
    return {"idle_ops_per_s": idle_rate, "busy_ops_per_s": busy_rate, "save_blocking_s": blocking,
            "write_s": s1, "rate_fraction": busy_rate / idle_rate, "lost_s": s1 * (1 - busy_rate / idle_rate),
            "from_source": (getattr(backend, "from_source", 0) - uncopied0) / written if written else 0.0}


def alone_checkpoint(mgr: CheckpointManager, model: torch.nn.Module, opt: torch.optim.Optimizer,
                     step: int) -> dict:
    """One async save with nothing else running (this thread sleeps while polling it): the background part's
    wall time and the CPU time the process spent on it (writers, hashing, commit), from save()'s return."""
    done = start_save(mgr, model, opt, step)
    t0, c0 = time.perf_counter(), time.process_time()  # process_time: every thread of this process
    while not done():
        time.sleep(0.002)
    out = {"write_alone_s": time.perf_counter() - t0, "writer_cpu_s": time.process_time() - c0}
    mgr.wait()
    return out


def run(args: argparse.Namespace, work: Path) -> dict:
    device = torch.device(args.device)
    model, opt, desc = build_state("synthetic", args.size_gb, args.layers, device)
    nbytes = unique_bytes(state_tensors(model, opt))
    x = torch.zeros(16, device=device) if args.loop == "launch" else torch.rand(args.matmul_n, args.matmul_n,
                                                                                  device=device)
    modes = args.modes.split(",")
    samples: dict[str, list[dict]] = {m: [] for m in modes}
    mgr = CheckpointManager(str(work / "ckpt"), async_save=True, keep_last=1, io_threads=args.io_threads)
    try:
        step = 1
        mgr.save(step, models={"model": model}, optimizers={"optimizer": opt})  # allocates the snapshot buffer
        mgr.wait()
        for rnd in range(args.rounds):
            for mode in modes:
                step += 1
                direct_write.FROM_SOURCE, bytecopy.GIL_FREE_COPY_MIN = MODES[mode]
                s = one_checkpoint(mgr, model, opt, step, x, args.idle_s)
                step += 1
                s.update(alone_checkpoint(mgr, model, opt, step))
                samples[mode].append(s)
                log(f"round {rnd + 1} {mode}: loop at {s['rate_fraction']:.3f} of its idle rate for "
                    f"{s['write_s']:.2f} s of writing ({s['from_source']:.0%} of the data uncopied)")
    finally:
        direct_write.FROM_SOURCE, bytecopy.GIL_FREE_COPY_MIN = MODES["from_source"]
        mgr.close()
    rows = [summarize(m, samples[m]) for m in modes]
    return {"benchmark": "writer_contention", "loop": args.loop, "state": desc, "state_bytes": nbytes,
            "rows": rows}


def summarize(mode: str, samples: list[dict]) -> dict:
    med = {k: statistics.median(s[k] for s in samples) for k in samples[0]}
    return {"mode": mode, **med, "rate_fraction_all": [round(s["rate_fraction"], 4) for s in samples],
            "samples": samples}


def table(result: dict) -> str:
    lines = [f"{'mode':<12}{'loop rate during write / alone':>32}{'write s':>9}{'lost s/ckpt':>13}"
             f"{'save() s':>10}{'uncopied':>10}{'alone s':>9}{'writer CPU s':>14}   per round"]
    for r in result["rows"]:
        lines.append(f"{r['mode']:<12}{r['rate_fraction']:>32.3f}{r['write_s']:>9.2f}{r['lost_s']:>13.3f}"
                     f"{r['save_blocking_s']:>10.3f}{r['from_source']:>10.0%}{r['write_alone_s']:>9.2f}"
                     f"{r['writer_cpu_s']:>14.3f}   "
                     f"{', '.join(f'{v:.2f}' for v in r['rate_fraction_all'])}")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> str | None:
    plt, why = pyplot()
    if plt is None:
        return why
    fig, ax = plt.subplots(figsize=(6, 3.5))
    rows = result["rows"]
    for i, r in enumerate(rows):
        ax.bar(i, r["rate_fraction"], color="tab:blue" if r["mode"] == "from_source" else "tab:gray")
        ax.plot([i] * len(r["rate_fraction_all"]), r["rate_fraction_all"], "k.", ms=4)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xticks(range(len(rows)), [r["mode"] for r in rows])
    ax.set_ylabel("loop rate while writing / alone")
    env = result["env"]
    ax.set_title(f"{result['state_bytes'] / 1e9:.2f} GB async save, {env['device']} ({env['cpu_count']} CPUs)",
                 fontsize=9)
    save_figure(plt, fig, path)
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--size-gb", type=float, default=0.5, help="model + AdamW state (default 0.5)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--idle-s", type=float, default=1.0, help="the loop alone before each save (default 1.0)")
    p.add_argument("--modes", default="from_source,gil_free,gil_held")
    p.add_argument("--loop", choices=["launch", "matmul"], default="launch",
                   help="launch: tiny ops (a GPU step's kernel launches, default); matmul: --matmul-n square "
                        "matmuls on torch's threads (a CPU training step)")
    p.add_argument("--matmul-n", type=int, default=512)
    p.add_argument("--io-threads", type=int, default=4)
    p.add_argument("--dir", default=None, help="where the temporary checkpoint folder goes")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args(argv)
    bad = set(args.modes.split(",")) - set(MODES)
    if bad:
        p.error(f"unknown modes {sorted(bad)}; choose from {sorted(MODES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        log("--device cuda but no CUDA device here")
        return 2
    if args.dir:
        Path(args.dir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="writer_contention_", dir=args.dir))
    try:
        result = run(args, work)
        result["env"] = environment(args, args.device, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    prefix = f"writer_contention_{args.device}" + ("" if args.loop == "launch" else f"_{args.loop}")
    write_results(out, prefix, stamp, result, lambda path: plot(result, path))
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
