#!/usr/bin/env python
"""Restore of sharded state (ZeRO, FSDP2): time, warm and cold, and peak extra host memory per rank, harness
``CheckpointManager.restore`` beside torch.distributed.checkpoint (DCP), at the saving world size and at another.

What is restored. ``--layers`` square ``nn.Linear`` layers (weight + bias, fp32) and AdamW (exp_avg, exp_avg_sq,
step), sized so parameters + both moments come to about ``--size-mb`` MB (1e6 bytes) in all; one training step is
taken first, so every optimizer tensor exists. What one rank holds, and a restore fills:

- ZeRO (DDP + ZeroRedundancyOptimizer(AdamW)): the whole model (replicated: a third of the total) and the moments
  of the parameters the rank owns (ZeRO's partition: about half of the other two thirds), ~2/3 of --size-mb;
- FSDP2 (``fully_shard`` on each layer and on the root, AdamW over the DTensor parameters): the rank's row shard
  of every parameter and of both moments, ~1/2 of --size-mb at 2 ranks, all of it at 1 rank.

Rows (saved at -> restored at, ranks):
- harness_zero 2->2, harness_fsdp 2->2: ``CheckpointManager.restore(models=, optimizers=)`` at the saving world
  size, where each rank's boxes are whole stored entries, read straight into the live tensors;
- harness_fsdp_2to1, harness_fsdp_1to2: FSDP2 restored at another world size (the 2-rank checkpoint into a
  1-rank FSDP2 model; a 1-rank checkpoint into 2 ranks, which reads row ranges);
- dcp_fsdp (2->2), dcp_fsdp_2to1, dcp_fsdp_1to2, the rival: DCP's documented way for FSDP2, ``get_state_dict``
  -> ``dcp.load({"model": ..., "optim": ...}, checkpoint_id=DIR)`` -> ``set_state_dict``, saved with
  ``dcp.save`` of the same dict, both at their defaults. There is no faster DCP load configuration to measure:
  ``FileSystemReader`` takes only the path (no thread count, no read-ahead option); its ``read_data`` reads a
  rank's items one after another, each ``torch.load``-ed into a new tensor and copied into the target. The
  writer's options (``thread_count``, ``single_file_per_rank``) only change how many files that serial loop
  opens, so the default layout is DCP's best for loading too.

Method. Ranks are real processes (torch.multiprocessing spawn, gloo on CPU, file:// rendezvous), 1 intra-op
thread each; checkpoints in a temporary folder (``--dir``), removed at the end. Every restore goes into the
live model and optimizer (their state exists, as in a process that restores after building its objects), so
the extra memory measured is what the restore holds beyond the state itself. The first restore of each row is
untimed and checks the result: the live tensors are overwritten first and must come back bit for bit (an
exact integer checksum of every tensor, its shards summed, so it holds across world sizes). Then ``--repeat``
rounds, rows in an order rotated by one each round, each row cold (every file of its checkpoint fsync'd and
evicted with posix_fadvise(DONTNEED), as benchmarks/checkpoint_io.py does) and then warm (from the page cache
the cold read filled). Time: from a barrier on every rank before the call to one after it; medians. Memory:
the resident set's high-water mark above its size before the call, each rank (``peak_rss_during`` of
benchmarks/checkpoint_io.py: VmHWM reset through /proc/self/clear_refs), with glibc's mmap threshold fixed so
freed large blocks go back to the kernel (as tests/test_sharded_inplace.py does: a reused heap block would hide
a peak); reported as the maximum over ranks and rounds, beside the rank's state and issue 14's bound
max(largest tensor, 256 MiB).

    python benchmarks/sharded_restore.py --size-mb 128 --repeat 3

Writes sharded_restore_cpu_<stamp>.{json,png} and sharded_restore_cpu_latest.{json,png} under --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable from a checkout without installing
    sys.path.insert(0, str(REPO))

from _results import pyplot, save_figure, write_results  # noqa: E402  (benchmarks/ is the script's folder)
from _memory import fixed_malloc, peak_rss_during  # noqa: E402
from checkpoint_io import Bench, list_files, sum_resident  # noqa: E402

MIB = 1 << 20
BOUND_FLOOR = 256 * MIB  # issue 14: peak extra host memory <= max(largest tensor, 256 MiB)

# (row, tool, saved at, restored at, what is timed)
ROWS: list[tuple[str, str, int, int, str]] = [
    ("harness_zero", "harness", 2, 2, "CheckpointManager.restore, DDP + ZeroRedundancyOptimizer(AdamW)"),
    ("harness_fsdp", "harness", 2, 2, "CheckpointManager.restore, FSDP2 + AdamW"),
    ("dcp_fsdp", "dcp", 2, 2, "get_state_dict + dcp.load + set_state_dict, FSDP2 + AdamW"),
    ("harness_fsdp_2to1", "harness", 2, 1, "CheckpointManager.restore, FSDP2 saved at 2 ranks, restored at 1"),
    ("dcp_fsdp_2to1", "dcp", 2, 1, "DCP, FSDP2 saved at 2 ranks, restored at 1"),
    ("harness_fsdp_1to2", "harness", 1, 2, "CheckpointManager.restore, FSDP2 saved at 1 rank, restored at 2"),
    ("dcp_fsdp_1to2", "dcp", 1, 2, "DCP, FSDP2 saved at 1 rank, restored at 2"),
]
ROW_INFO = {r[0]: r for r in ROWS}


def log(msg: str) -> None:
    print(f"[sharded_restore {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- the state -----------------------------------------------------------------------------------------------

def _width(size_mb: float, layers: int) -> int:
    """Width of ``layers`` square Linear layers whose params + 2 AdamW moments are about ``size_mb`` MB."""
    per_layer = size_mb * 1e6 / 3 / 4 / layers  # fp32 elements of one layer's weight + bias
    return max(2, int((math.sqrt(1 + 4 * per_layer) - 1) / 2))


def build_sharded(kind: str, width: int, layers: int, seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    """``layers`` square Linear layers and AdamW, sharded: ``kind`` "zero" (DDP + ZeroRedundancyOptimizer) or
    "fsdp" (``fully_shard`` per layer). Also the model of tests/test_sharded_inplace.py."""
    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    if kind == "zero":
        from torch.distributed.optim import ZeroRedundancyOptimizer
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model)
        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=1e-3)
    else:
        from harness import torchcompat
        fully_shard = torchcompat.fully_shard()  # torch >= 2.6, else a ConfigError
        for layer in model:
            fully_shard(layer)
        fully_shard(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, opt


def _build(kind: str, width: int, layers: int, rank: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """:func:`build_sharded`, one AdamW step taken (every optimizer tensor exists)."""
    model, opt = build_sharded(kind, width, layers)
    x = torch.randn(4, width, generator=torch.Generator().manual_seed(1 + rank))
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()
    return model, opt


def _live(kind: str, model: nn.Module, opt: Any) -> dict[str, torch.Tensor]:
    """This rank's live state tensors by a key that is the same at every world size (DTensors as they are)."""
    if kind == "zero":
        from harness.checkpoint.sharded import zero_local_state

        out = {f"m/{k}": t for k, t in model.module.state_dict().items()}
        for gidx, st in zero_local_state(opt).items():
            out.update({f"o/{gidx}/{k}": t for k, t in st.items()})
        return out
    out = {f"m/{k}": t for k, t in model.state_dict().items()}
    for i, p in enumerate(model.parameters()):
        out.update({f"o/{i}/{k}": t for k, t in opt.state[p].items()})
    return out


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _fingerprint(kind: str, model: nn.Module, opt: Any) -> dict[str, int]:
    """An exact checksum of each tensor: the sum of its fp32 bit patterns as int64, summed over the shards of
    a DTensor (collective), so equal at every world size; ZeRO's is the rank's own (compared at the same size)."""
    live = _live(kind, model, opt)
    sums = {k: int(_local(t).detach().contiguous().view(torch.int32).sum(dtype=torch.int64)) for k, t in live.items()}
    dkeys = sorted(k for k, t in live.items() if hasattr(t, "to_local"))
    if dkeys:
        v = torch.tensor([sums[k] for k in dkeys], dtype=torch.int64)
        tdist.all_reduce(v)
        sums.update(zip(dkeys, v.tolist()))
    return sums


def _scramble(kind: str, model: nn.Module, opt: Any) -> None:
    with torch.no_grad():
        for t in _live(kind, model, opt).values():
            _local(t).fill_(7)


def _sizes(kind: str, model: nn.Module, opt: Any) -> dict[str, int]:
    live = _live(kind, model, opt)
    return {"state_bytes": sum(_local(t).numel() * _local(t).element_size() for t in live.values()),
            "largest_tensor_bytes": max(t.numel() * t.element_size() for t in live.values())}


# -- saving and restoring ------------------------------------------------------------------------------------

def _dcp_dicts(model: nn.Module, opt: Any) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd}


def _save(kind: str, model: nn.Module, opt: Any, root: Path, dcp_too: bool) -> None:
    from harness import CheckpointManager

    mgr = CheckpointManager(str(root / f"harness-{kind}"), keep_last=1, timeout_s=300)
    mgr.save(1, models=model, optimizers=opt)
    mgr.close()
    if dcp_too:
        import torch.distributed.checkpoint as dcp

        dcp.save(_dcp_dicts(model, opt), checkpoint_id=str(root / f"dcp-{kind}"))


def _harness_restore(url: str, model: nn.Module, opt: Any) -> Callable[[], Any]:
    from harness import CheckpointManager

    def restore() -> None:
        res = CheckpointManager(url, timeout_s=300).restore(models=model, optimizers=opt)
        assert res is not None and res.step == 1, res
    return restore


def _dcp_restore(path: str, model: nn.Module, opt: Any) -> Callable[[], Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    def restore() -> None:
        sd = _dcp_dicts(model, opt)
        dcp.load(sd, checkpoint_id=path)
        set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    return restore


@dataclass
class Method:
    row: str
    fn: Callable[[], Any]
    path: Path            # the checkpoint folder: evicted before a cold sample
    expect: dict          # the saved state's fingerprint


def _sample(rank: int, m: Method, cold: bool, bench: Bench | None) -> dict:
    """One timed restore on every rank (collective): seconds (barrier to barrier) and each rank's peak extra RSS."""
    files = list_files(m.path) if rank == 0 else []
    if rank == 0 and cold:
        resident = bench.evict(m.path)["resident_frac"]
    elif rank == 0:
        n = sum(os.path.getsize(f) for f in files)
        got = sum_resident(files)
        resident = None if got is None or not n else got / n
    tdist.barrier()
    t0 = time.perf_counter()
    _, extra = peak_rss_during(m.fn)
    tdist.barrier()
    dt = time.perf_counter() - t0
    every: list = [None] * tdist.get_world_size()
    tdist.all_gather_object(every, (dt, extra))
    return {"seconds": max(s for s, _ in every), "extra_bytes": [e for _, e in every],
            "resident_before": resident if rank == 0 else None}


def _measure(rank: int, kind: str, model: nn.Module, opt: Any, methods: list[Method], repeat: int,
             cold: bool) -> dict[str, dict]:
    """Check each method once (scrambled live tensors must come back bit for bit), then ``repeat`` rounds in
    a rotated order, cold then warm. Returns per row: samples, sizes (every rank's)."""
    bench = Bench(torch.device("cpu"), "fadvise") if rank == 0 else None
    out: dict[str, dict] = {}
    for m in methods:
        _scramble(kind, model, opt)
        m.fn()
        got = _fingerprint(kind, model, opt)
        bad = sorted(k for k in m.expect if got.get(k) != m.expect[k])
        if bad:
            raise AssertionError(f"{m.row}: restored state differs from the saved one in {len(bad)} tensors, "
                                 f"e.g. {bad[0]!r}")
        sizes: list = [None] * tdist.get_world_size()
        tdist.all_gather_object(sizes, _sizes(kind, model, opt))
        out[m.row] = {"verified": True, "per_rank": sizes, "cold": [], "warm": []}
    for r in range(repeat):
        k = r % len(methods)
        for m in methods[k:] + methods[:k]:
            for temp in (("cold", "warm") if cold else ("warm",)):
                s = _sample(rank, m, temp == "cold", bench)
                out[m.row][temp].append(s)
                if rank == 0:
                    log(f"{m.row} {temp}: {s['seconds']:.3f} s, peak extra RSS "
                        f"{max(s['extra_bytes']) / MIB:.1f} MiB (max over ranks)")
    return out


# -- the three process groups --------------------------------------------------------------------------------

def _phase_save1(rank: int, world: int, a: dict) -> dict:
    """1 rank: FSDP2 saved by harness and by DCP, for the 1 -> 2 rows."""
    model, opt = _build("fsdp", a["width"], a["layers"], rank)
    _save("fsdp", model, opt, Path(a["root"]) / "w1", dcp_too=True)
    return {"fp_w1": _fingerprint("fsdp", model, opt)}


def _phase_two(rank: int, world: int, a: dict) -> dict:
    """2 ranks: ZeRO, then FSDP2 at the saving world size (harness and DCP interleaved) and from 1 rank."""
    root = Path(a["root"])
    model, opt = _build("zero", a["width"], a["layers"], rank)
    _save("zero", model, opt, root / "w2", dcp_too=False)
    fp = _fingerprint("zero", model, opt)
    methods = [Method("harness_zero", _harness_restore(str(root / "w2" / "harness-zero"), model, opt),
                      root / "w2" / "harness-zero", fp)]
    rows = _measure(rank, "zero", model, opt, methods, a["repeat"], a["cold"])
    del model, opt, methods

    model, opt = _build("fsdp", a["width"], a["layers"], rank)
    _save("fsdp", model, opt, root / "w2", dcp_too=True)
    fp2, fp1 = _fingerprint("fsdp", model, opt), a["fp_w1"]
    h2, d2, h1, d1 = (root / "w2" / "harness-fsdp", root / "w2" / "dcp-fsdp", root / "w1" / "harness-fsdp",
                      root / "w1" / "dcp-fsdp")
    methods = [Method("harness_fsdp", _harness_restore(str(h2), model, opt), h2, fp2),
               Method("dcp_fsdp", _dcp_restore(str(d2), model, opt), d2, fp2),
               Method("harness_fsdp_1to2", _harness_restore(str(h1), model, opt), h1, fp1),
               Method("dcp_fsdp_1to2", _dcp_restore(str(d1), model, opt), d1, fp1)]
    rows.update(_measure(rank, "fsdp", model, opt, methods, a["repeat"], a["cold"]))
    return {"rows": rows, "fp_w2": fp2}


def _phase_restore1(rank: int, world: int, a: dict) -> dict:
    """1 rank: the 2-rank FSDP2 checkpoints (harness, DCP) restored into a 1-rank FSDP2 model."""
    root = Path(a["root"])
    model, opt = _build("fsdp", a["width"], a["layers"], rank)
    h2, d2 = root / "w2" / "harness-fsdp", root / "w2" / "dcp-fsdp"
    methods = [Method("harness_fsdp_2to1", _harness_restore(str(h2), model, opt), h2, a["fp_w2"]),
               Method("dcp_fsdp_2to1", _dcp_restore(str(d2), model, opt), d2, a["fp_w2"])]
    return {"rows": _measure(rank, "fsdp", model, opt, methods, a["repeat"], a["cold"])}


PHASES = {"save1": _phase_save1, "two": _phase_two, "restore1": _phase_restore1}


def _worker(rank: int, world: int, phase: str, a: dict, out: str) -> None:
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world)
    fixed_malloc()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # DCP's and FSDP's notices would bury the log
    tdist.init_process_group("gloo", init_method=f"file://{a['root']}/rdzv-{phase}", rank=rank, world_size=world,
                             timeout=datetime.timedelta(seconds=300))
    try:
        res = PHASES[phase](rank, world, a)
        if rank == 0:
            Path(out).write_text(json.dumps(res))
    finally:
        tdist.destroy_process_group()
    from harness.dist import leave
    leave(0)  # not through interpreter teardown, which a gloo thread can abort (harness.dist.leave)


def _spawn(phase: str, world: int, a: dict) -> dict:
    out = Path(a["root"]) / f"{phase}.json"
    mp.start_processes(_worker, args=(world, phase, a, str(out)), nprocs=world, start_method="spawn", join=True)
    return json.loads(out.read_text())


# -- report --------------------------------------------------------------------------------------------------

def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def summarize(raw: dict[str, dict]) -> list[dict]:
    rows = []
    for name, tool, saved, restored, what in ROWS:
        r = raw[name]
        state = max(p["state_bytes"] for p in r["per_rank"])
        largest = max(p["largest_tensor_bytes"] for p in r["per_rank"])
        row = {"row": name, "tool": tool, "saved_world": saved, "restored_world": restored, "what": what,
               "verified": r["verified"], "state_bytes_per_rank": [p["state_bytes"] for p in r["per_rank"]],
               "largest_tensor_bytes": largest, "bound_bytes": max(largest, BOUND_FLOOR)}
        for temp in ("warm", "cold"):
            samples = r[temp]
            if not samples:
                continue
            extra = max(max(s["extra_bytes"]) for s in samples)
            row[temp] = {"median_s": _median([s["seconds"] for s in samples]),
                         "seconds_all": [s["seconds"] for s in samples],
                         "peak_extra_bytes": extra, "extra_over_state": extra / state,
                         "within_bound": extra <= row["bound_bytes"],
                         "extra_bytes_all": [s["extra_bytes"] for s in samples],
                         "resident_before": [s["resident_before"] for s in samples]}
        rows.append(row)
    by = {r["row"]: r for r in rows}
    for r in rows:  # DCP's median over harness's: > 1 means harness is faster
        twin = by.get(r["row"].replace("harness_", "dcp_")) if r["tool"] == "harness" else None
        if twin is not None:
            r["dcp_over_harness"] = {t: twin[t]["median_s"] / r[t]["median_s"] for t in ("warm", "cold")
                                     if t in r and t in twin}
    return rows


def table(rows: list[dict]) -> str:
    head = (f"{'row':<19}{'ranks':>6}{'state/rank':>11}{'warm s':>8}{'cold s':>8}{'extra warm':>11}"
            f"{'extra cold':>11}{'x state':>8}  {'bound':<8}DCP/harness warm, cold")
    lines = [head, "-" * len(head)]
    for r in rows:
        w, c = r.get("warm", {}), r.get("cold", {})
        extra = max(w.get("peak_extra_bytes", 0), c.get("peak_extra_bytes", 0))
        ok = all(x.get("within_bound", True) for x in (w, c))
        lines.append(f"{r['row']:<19}{r['saved_world']:>3}->{r['restored_world']:<1}"
                     f"{max(r['state_bytes_per_rank']) / MIB:>8.1f}MiB"
                     + "".join(f"{x['median_s']:>8.3f}" if x else f"{'-':>8}" for x in (w, c))
                     + "".join(f"{x['peak_extra_bytes'] / MIB:>8.1f}MiB" if x else f"{'-':>11}" for x in (w, c))
                     + f"{extra / max(r['state_bytes_per_rank']):>8.2f}  {'met' if ok else 'NOT met':<8}"
                     + ", ".join(f"{v:.2f}x" for v in r.get("dcp_over_harness", {}).values()))
    return "\n".join(lines)


def plot(rows: list[dict], env: dict, path: Path) -> str | None:
    """Two panels per row: restore seconds (warm, cold) and peak extra RSS beside the rank's state."""
    plt, skip = pyplot()
    if plt is None:
        return skip
    names = [f"{r['row']}\n{r['saved_world']}->{r['restored_world']}" for r in rows]
    xs = range(len(rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    w = 0.38
    for i, (temp, color) in enumerate((("warm", "#a5a5a5"), ("cold", "#ed7d31"))):
        ys = [r.get(temp, {}).get("median_s") or 0 for r in rows]
        ax1.bar([x + (i - 0.5) * w for x in xs], ys, w, label=temp, color=color)
    ax1.set_ylabel("restore seconds (median, barrier to barrier)")
    ax1.legend(fontsize=8)
    state = [max(r["state_bytes_per_rank"]) / MIB for r in rows]
    extra = [max(r.get(t, {}).get("peak_extra_bytes", 0) for t in ("warm", "cold")) / MIB for r in rows]
    ax2.bar([x - w / 2 for x in xs], state, w, label="state per rank", color="#4472c4")
    ax2.bar([x + w / 2 for x in xs], extra, w, label="peak extra RSS (max over ranks)", color="#c00000")
    for x, y in zip(xs, extra):
        ax2.text(x + w / 2, y, f"{y:.1f}", ha="center", va="bottom", fontsize=7)
    bound = max(r["bound_bytes"] for r in rows) / MIB
    ax2.axhline(bound, color="0.4", ls="--", lw=1)
    ax2.text(len(rows) - 0.5, bound, "issue 14's bound: max(largest tensor, 256 MiB)", ha="right", va="bottom",
             fontsize=7, color="0.3")
    ax2.set_ylabel("MiB")
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.set_xticks(list(xs), names, fontsize=7, rotation=30, ha="right")
    fig.suptitle(f"Sharded restore, {env['size_mb']:.0f} MB state (params + AdamW), gloo on CPU, "
                 f"{env['date'][:10]}, median of {env['repeat']}", fontsize=10)
    return save_figure(plt, fig, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mb", type=float, default=256.0, help="params + AdamW moments, MB (1e6 bytes), in all")
    p.add_argument("--layers", type=int, default=8, help="square Linear layers")
    p.add_argument("--repeat", type=int, default=3, help="timed restores per row and page-cache state; medians")
    p.add_argument("--no-cold", action="store_true", help="warm samples only")
    p.add_argument("--dir", default=None, help="where checkpoints go (default: a temporary folder); a fresh "
                   "sub-folder is made and removed at the end")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="where JSON and PNG go")
    args = p.parse_args(argv)
    if args.repeat < 1 or args.size_mb <= 0 or args.layers < 2:
        p.error("--repeat >= 1, --size-mb > 0 and --layers >= 2 please")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.dir:
        Path(args.dir).mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix=f"sharded_restore_{stamp}_", dir=args.dir))
    width = _width(args.size_mb, args.layers)
    a = {"root": str(base), "width": width, "layers": args.layers, "repeat": args.repeat, "cold": not args.no_cold}
    t0 = time.perf_counter()
    try:
        log(f"width {width} x {args.layers} layers, work {base}")
        a["fp_w1"] = _spawn("save1", 1, a)["fp_w1"]
        two = _spawn("two", 2, a)
        a["fp_w2"] = two["fp_w2"]
        raw = {**two["rows"], **_spawn("restore1", 1, a)["rows"]}
    finally:
        shutil.rmtree(base, ignore_errors=True)
    rows = summarize(raw)
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
           "size_mb": args.size_mb, "layers": args.layers, "width": width, "repeat": args.repeat,
           "cold": "off" if args.no_cold else "fsync + posix_fadvise(POSIX_FADV_DONTNEED) on every file",
           "torch_threads_per_rank": 1, "bound": "peak extra RSS <= max(largest tensor, 256 MiB)"}
    result = {"benchmark": "sharded_restore", "device": "cpu", "env": env, "rows": rows}
    print(f"sharded restore: {args.size_mb:.0f} MB of Linear weights + AdamW moments ({args.layers} x {width}^2), "
          f"gloo on CPU, {os.cpu_count()} CPUs, median of {args.repeat}; extra = peak extra RSS, max over ranks")
    print(table(rows))
    write_results(out, "sharded_restore_cpu", stamp, result, lambda png: plot(rows, env, png))
    print(f"wrote {out / f'sharded_restore_cpu_{stamp}.json'} (and _latest) in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
