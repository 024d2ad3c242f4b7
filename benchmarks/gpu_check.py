#!/usr/bin/env python
"""The prepared GPU check (issue 13): one command, one H200, at most 8 minutes. Run it as
``benchmarks/gpu_check.sh``; ``--cpu-smoke`` runs every part a CPU can (tiny sizes, gloo, device cpu) so CI keeps
the script working between GPU runs.

Parts 1-3 run side by side (the device has room for all of them), part 4 alone after them; each has its own
time limit, and a part that no longer fits the budget is reported as not run:

1. ``cuda_tests``: ``pytest -m cuda tests/test_cuda.py`` (all skipped without CUDA).
2. ``gpt_deterministic``: a scaled-down gpt_small with dropout, bf16 autocast, async checkpoints and
   ``train.deterministic = true``, run uninterrupted and killed at a step (SIGKILL through the fault seam) then
   resumed; ``harness ckpt diff`` of the two final checkpoints must say identical.
2b. ``launch_gpu``: ``harness launch`` (its forked workers) on the device, a worker SIGTERMed at step 35: exit
   143, then the same command resumes from step 35 and exits 0.
3. ``two_ranks_<ddp|zero|fsdp>``: two ranks on the one GPU (NCCL, a distinct ``NCCL_HOSTID`` per rank so NCCL
   accepts two ranks on one device), rank 1 SIGKILLed mid-run, then resumed from that folder at 2 ranks and,
   from a copy, at 1 rank: both finish, resuming from the committed step, and the final checkpoint verifies.
4. ``benchmarks``: ``writer_contention.py --device cuda`` (what a background write takes from a loop of kernel
   launches; informational), ``train_overhead.py --device cuda`` and ``checkpoint_io.py --size-gb 8 --device
   cuda``, then the targets of issues 13, 14 and 15 that a GPU run judges, PASS/FAIL (n/a where one does not
   apply) each.

Writes ``gpu_check_<cuda|cpu-smoke>_<stamp>.json``, the same as ``_latest.json`` and a short
``gpu_check_<...>_latest.txt`` under ``--out`` (default benchmarks/results). Exit 0 when every part that ran
passed (targets are reported, and fail the exit code only on a GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

# A command at its time limit gets SIGTERM, then SIGKILL this much later; the budget's default (450 s) + these
# must stay under gpu_check.sh's hard stop (480 s), or the report is never written.
STOP_GRACE_S, KILL_WAIT_S = 15.0, 5.0

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the GPU machine runs a copied checkout, never pip-installed
    sys.path.insert(0, str(REPO))
GPT = REPO / "configs" / "gpt_small.toml"
QUICK = REPO / "configs" / "quickstart.toml"
RANK_WRAPPER = REPO / "benchmarks" / "gpu_check_rank.sh"


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Stopped(BaseException):
    """gpu_check itself got SIGTERM (gpu_check.sh's hard stop, or a person): write what ran, then leave."""


class Check:
    """Runs commands under a shared time budget and collects every part's result."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.smoke = args.cpu_smoke
        self.deadline = time.monotonic() + args.budget_s
        self.parts: list[dict] = []
        self.live: set[subprocess.Popen] = set()   # commands running now (each in a session of its own)
        self.stopping = False
        self.env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                    "HARNESS_DEBUG": "1", "PYTHON": sys.executable}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, cmd: list[str], log_name: str, timeout: float, env: dict | None = None) -> tuple[int, str]:
        """Run ``cmd`` with output to work/<log_name>.log; (exit code, output). At the time limit the command's
        process group gets SIGTERM, SIGKILL ``STOP_GRACE_S`` later. A command that then exits 0 by itself
        (checkpoint_io writes what it measured and says ``stopped`` in its JSON) keeps its 0; else the code is
        124, as it is for a command never started because the budget is spent or gpu_check is stopping."""
        path = self.work / f"{log_name}.log"
        if self.left() < 1.0 or self.stopping:
            path.write_text(f"not started: {'gpu_check stopping' if self.stopping else 'budget spent'}\n")
            return 124, path.read_text()
        with open(path, "w") as out:
            proc = subprocess.Popen(cmd, cwd=REPO, env={**self.env, **(env or {})}, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            self.live.add(proc)
            try:
                rc = proc.wait(timeout=min(timeout, self.left()))
            except subprocess.TimeoutExpired:
                rc = 0 if stop_group(proc, grace_s=STOP_GRACE_S) == 0 else 124
            finally:
                self.live.discard(proc)
        return rc, path.read_text(errors="replace")

    def kill_all(self) -> None:
        """SIGKILL every running command's process group: they run in sessions of their own, which
        gpu_check.sh's ``timeout`` does not reach, and would go on holding the GPU."""
        self.stopping = True
        for proc in list(self.live):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)

    def part(self, name: str, need_s: float, fn: Callable[[], dict]) -> None:
        if self.left() < need_s:
            self.parts.append({"part": name, "ok": None, "note": f"not run: {self.left():.0f} s of budget left, "
                                                                 f"needs ~{need_s:.0f} s"})
            log(f"{name}: not run (budget)")
            return
        t0 = time.monotonic()
        try:
            res = fn()
        except Exception as exc:  # noqa: BLE001 - one broken part must not hide the others
            res = {"ok": False, "note": f"{type(exc).__name__}: {exc}"}
        res = {"part": name, **res, "seconds": round(time.monotonic() - t0, 1)}
        self.parts.append(res)
        log(f"{name}: {'PASS' if res['ok'] else 'FAIL' if res['ok'] is False else 'n/a'} "
            f"({res['seconds']} s) {res.get('note', '')}")


def stop_group(proc: subprocess.Popen, grace_s: float) -> int | None:
    """SIGTERM to the process group, SIGKILL to what is left after ``grace_s``; the exit code, if it ended."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, KILL_WAIT_S)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            rc = proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        return rc if sig == signal.SIGTERM else None  # killed: whatever it exited with, it did not finish
    return None


# -- 1. CUDA tests ---------------------------------------------------------------------------------------

def cuda_tests(c: Check) -> dict:
    xml = c.work / "cuda_tests.xml"
    rc, out = c.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "--noconftest",
                     f"--junitxml={xml}", "tests/test_cuda.py"], "cuda_tests", timeout=240)
    counts = {}
    if xml.is_file():
        head = xml.read_text()[:2000]
        for key in ("tests", "failures", "errors", "skipped"):
            m = re.search(rf'{key}="(\d+)"', head)
            counts[key] = int(m.group(1)) if m else None
    failed = [ln for ln in out.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    ok = rc in (0, 5) if c.smoke else rc == 0  # 5: nothing collected/run; on CPU every test skips
    if not c.smoke and counts.get("skipped"):
        ok = False  # on the GPU machine no CUDA test may skip
    return {"ok": ok, "rc": rc, "counts": counts, "failed": failed[:20],
            "note": f"{counts}" + (f", failed: {failed[:3]}" if failed else "")}


# -- 2. small GPT: uninterrupted vs killed and resumed ---------------------------------------------------

def gpt_sets(c: Check, ck: Path) -> list[str]:
    if c.smoke:
        size = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "data.seq_len=16",
                "data.vocab_size=128", "train.batch_size=2", "train.device=\"cpu\""]
    else:
        size = ["model.d_model=256", "model.n_layers=4", "model.n_heads=4", "data.seq_len=128",
                "data.vocab_size=8192", "train.batch_size=8", "train.device=\"cuda\""]
    return size + ["model.dropout=0.1", "train.amp=true", "train.amp_dtype=\"bf16\"", "train.deterministic=true",
                   "train.max_steps=40", "train.log_every=10", "checkpoint.every_steps=10", "checkpoint.async=true",
                   "checkpoint.keep_last=2", f"checkpoint.dir=\"{ck}\"", f"run.id=\"gpucheck-{ck.name}\"",
                   "scheduler.warmup_steps=5"]


def train_cmd(config: Path, sets: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "harness", "train", "--config", str(config)]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def resumed_steps(out: str) -> list[int]:
    return [int(m) for m in re.findall(r"resumed from step-\d+(?:-a\d+)? at step (\d+)", out)]


def gpt_deterministic(c: Check) -> dict:
    a, b = c.work / "gpt_a", c.work / "gpt_b"
    kill = {"HARNESS_FAULT": "train.step:sigkill:step=25"}
    with ThreadPoolExecutor(2) as pool:  # the reference and the run to be killed share the device
        fa = pool.submit(c.run, train_cmd(GPT, gpt_sets(c, a)), "gpt_uninterrupted", 240)
        fb = pool.submit(c.run, train_cmd(GPT, gpt_sets(c, b)), "gpt_killed", 240, kill)
        (rc_a, _), (rc_b, _) = fa.result(), fb.result()
    rc_r, out_r = c.run(train_cmd(GPT, gpt_sets(c, b)), "gpt_resumed", 240)
    # --ranks: the RNG states (the CUDA generator's too) and the data position, not only the weights
    rc_d, out_d = c.run([sys.executable, "-m", "harness", "ckpt", "diff", str(a), str(b), "--ranks"], "gpt_diff", 120)
    resumed = resumed_steps(out_r)
    ok = rc_a == 0 and rc_b == -9 and rc_r == 0 and len(resumed) == 1 and rc_d == 0
    return {"ok": ok, "rc_uninterrupted": rc_a, "rc_killed": rc_b, "rc_resumed": rc_r, "resumed_at": resumed,
            "rc_diff": rc_d, "diff_tail": out_d.strip().splitlines()[-3:],
            "note": f"killed at step 25, resumed at {resumed}, ckpt diff exit {rc_d} (0: identical)"}


def launch_gpu(c: Check) -> dict:
    """``harness launch`` on the device: its workers are forks of a process that imported torch (CUDA must be
    untouched there, or the forks cannot use the GPU: the launcher then says the workers import torch
    themselves). A worker SIGTERMed at step 35 (fault seam) commits and the launcher exits 143 (the scheduler's
    contract); the same command resumes from step 35 and finishes, 0."""
    ck = c.work / "launch_gpu"
    sets = [f"train.device=\"{'cpu' if c.smoke else 'cuda'}\"", "train.max_steps=60", "checkpoint.every_steps=10",
            "train.log_every=10", "data.num_samples=2048", f"checkpoint.dir=\"{ck}\"", "run.id=\"gpucheck-launch\""]
    cmd = [sys.executable, "-m", "harness", "launch", "--nproc-per-node", "1", "--config", str(QUICK)]
    cmd += [a for s in sets for a in ("--set", s)]
    rc1, out1 = c.run(cmd, "launch_stopped", 180, {"HARNESS_FAULT": "train.step:sigterm:step=35"})
    rc2, out2 = c.run(cmd, "launch_resumed", 180)
    resumed = resumed_steps(out2)
    forked = "workers import torch themselves" not in out1 + out2
    ok = rc1 == 143 and rc2 == 0 and resumed == [35] and forked and last_committed(ck) == 60
    return {"ok": ok, "rc_stopped": rc1, "rc_resumed": rc2, "resumed_at": resumed, "forked_workers": forked,
            "note": f"SIGTERM at step 35: exit {rc1} (143 expected), resumed at {resumed}, exit {rc2}; workers "
                    f"{'forked from the preloaded process' if forked else 'imported torch themselves'}"}


# -- 3. two ranks on one device, kill one, resume at 2 and at 1 ------------------------------------------

def rank_sets(c: Check, ck: Path, parallel: str) -> list[str]:
    dev = "cpu" if c.smoke else "cuda"
    backend = "gloo" if c.smoke else "nccl"
    return [f"train.parallel=\"{parallel}\"", f"train.device=\"{dev}\"", f"dist.backend=\"{backend}\"",
            "train.max_steps=60", "train.log_every=10", "checkpoint.every_steps=10", "checkpoint.keep_last=2",
            "data.num_samples=2048", "dist.timeout_s=60", "checkpoint.timeout_s=60", f"checkpoint.dir=\"{ck}\"",
            f"run.id=\"gpucheck-{ck.name}\""]


def torchrun_cmd(nproc: int, sets: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "--max-restarts=0", "--no-python", "bash", str(RANK_WRAPPER), "--config", str(QUICK)]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def two_ranks(c: Check, modes: list[str]) -> list[dict]:
    """All modes at once (the device has room): first the killed runs, then the resumes."""
    kill = {"HARNESS_FAULT": "train.step:sigkill:step=35:rank=1"}
    dirs = {m: c.work / f"ranks_{m}" for m in modes}
    with ThreadPoolExecutor(len(modes) * 2) as pool:
        killed = {m: pool.submit(c.run, torchrun_cmd(2, rank_sets(c, dirs[m], m)), f"{m}_killed", 180, kill)
                  for m in modes}
        killed_rc = {m: f.result()[0] for m, f in killed.items()}
        for m in modes:  # the 1-rank resume gets a copy of the folder as the kill left it
            shutil.copytree(dirs[m], c.work / f"ranks_{m}_one")
        at2 = {m: pool.submit(c.run, torchrun_cmd(2, rank_sets(c, dirs[m], m)), f"{m}_resume2", 180)
               for m in modes}
        at1 = {m: pool.submit(c.run, torchrun_cmd(1, rank_sets(c, c.work / f"ranks_{m}_one", m)), f"{m}_resume1",
                              180) for m in modes}
        results = []
        for m in modes:
            rc2, out2 = at2[m].result()
            rc1, out1 = at1[m].result()
            final = [last_committed(dirs[m]), last_committed(c.work / f"ranks_{m}_one")]
            r2, r1 = resumed_steps(out2), resumed_steps(out1)
            ok = (killed_rc[m] != 0 and rc2 == 0 and rc1 == 0 and len(r2) == 2 and len(set(r2)) == 1
                  and len(r1) == 1 and r1[0] == r2[0] and 0 < r1[0] < 60 and final == [60, 60])
            results.append({"part": f"two_ranks_{m}", "ok": ok, "rc_killed": killed_rc[m], "rc_resume2": rc2,
                            "rc_resume1": rc1, "resumed_at_2": r2, "resumed_at_1": r1, "final_steps": final,
                            "note": f"rank 1 killed at step 35, resumed at {r2} (2 ranks) and {r1} (1 rank)"})
    return results


def last_committed(ckdir: Path) -> int | None:
    """Step of the newest committed checkpoint (its commit record read and parsed), or None."""
    from harness.checkpoint.discovery import list_checkpoints
    from harness.storage import Storage

    infos = list_checkpoints(Storage(str(ckdir)))
    return infos[-1].step if infos else None


def ranks_part(c: Check, modes: list[str]) -> None:
    try:
        results = two_ranks(c, modes)
    except Exception as exc:  # noqa: BLE001 - reported like any other part
        results = [{"part": f"two_ranks_{m}", "ok": False, "note": f"{type(exc).__name__}: {exc}"} for m in modes]
    for res in results:
        c.parts.append(res)
        log(f"{res['part']}: {'PASS' if res['ok'] else 'FAIL'} {res['note']}")


# -- 4. benchmarks against the issue's targets -----------------------------------------------------------

def benchmarks(c: Check) -> dict:
    out = Path(c.args.out)
    if c.smoke:
        # One round of the interleaved restore section: each round is ~13 gc.collect() calls of ~0.14 s with
        # torch loaded, and at this size its numbers mean nothing (the GPU run: --restore-repeat).
        io = ["--size-gb", "0.005", "--device", "cpu", "--restore-repeat", "1"]
        ov = ["--device", "cpu", "--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--seq-len", "16",
              "--vocab-size", "128", "--batch-size", "2", "--steps", "6", "--every", "3", "--warmup", "1",
              "--modes", "none,async"]
        wc = ["--device", "cpu", "--size-gb", "0.01", "--rounds", "1", "--idle-s", "0.2"]
    else:
        io = ["--size-gb", "8", "--device", "cuda", "--restore-repeat", str(c.args.restore_repeat)]
        # DCP's defaults are measured by checkpoint_io; here only the modes the targets compare (time budget).
        # Batch 32, not gpt_small's 16: on the H200 a batch-16 forward+backward (0.023 s) was shorter than the
        # snapshot's copy (0.028 s), where issue 15's stall target does not apply.
        # 160 steps: the checkpoint at 100 is a steady one with its whole interval (steps 100-149) in the run,
        # the window its background write's cost is judged on (at 110 steps the H200 run saw only 10 of them).
        # async_copied and async_gil_held: the A/Bs of the writers' uncopied writes and of their GIL-free copy
        # (the GIL, the suspected cause of the H200's slow steps after each checkpoint), on the whole-interval
        # cost.
        ov = ["--device", "cuda", "--steps", "160", "--every", "50", "--warmup", "5", "--batch-size", "32",
              "--modes", "none,async,async_copied,async_gil_held,dcp_best"]
        wc = ["--device", "cuda", "--size-gb", "2", "--rounds", "3"]
    groups = "limits,harness,dcp,safetensors" if c.smoke else c.args.io_groups
    bench_dir = ["--dir", str(c.work / "bench")]
    io_cmd = [sys.executable, "benchmarks/checkpoint_io.py", *io, "--groups", groups, "--out", str(out), *bench_dir]
    ov_cmd = [sys.executable, "benchmarks/train_overhead.py", *ov, "--recovery-modes", "async", "--out", str(out),
              *bench_dir]
    wc_cmd = [sys.executable, "benchmarks/writer_contention.py", *wc, "--out", str(out), *bench_dir]
    # On the GPU one after the other (they measure the machine), the short ones first: checkpoint_io takes what
    # is left and, stopped at the limit, still writes what it measured. At smoke sizes they share the machine.
    started = time.time()
    # What a background write takes from kernel launches; 2 GB x 3 modes x 3 rounds, each round one save beside
    # the loop and one alone: ~50 s at the H200 disk's 1.4 GB/s.
    rc_wc = c.run(wc_cmd, "writer_contention", 90)[0]
    with ThreadPoolExecutor(2 if c.smoke else 1) as pool:
        f_ov = pool.submit(c.run, ov_cmd, "train_overhead", 150)
        f_io = pool.submit(c.run, io_cmd, "checkpoint_io", 400)
        rc_io, rc_ov = f_io.result()[0], f_ov.result()[0]
    dev = "cpu" if c.smoke else "cuda"
    targets = evaluate_targets(out / f"checkpoint_io_{dev}_latest.json", out / f"train_overhead_{dev}_latest.json",
                               since=started)
    met = all(t["pass"] is not False for t in targets)  # None: does not apply to this run
    # checkpoint_io takes what is left and is stopped at the limit by design: it then exits 0 with what it
    # measured (run() keeps that 0), the rows it did not reach count as targets not met. writer_contention
    # is informational: its exit code is reported, never the part's verdict.
    ok = rc_io == 0 and rc_ov == 0 and (met or c.smoke)  # tiny CPU sizes: no target applies
    return {"ok": ok, "rc_checkpoint_io": rc_io, "rc_train_overhead": rc_ov, "rc_writer_contention": rc_wc,
            "checkpoint_io_stopped": stopped_note(out / f"checkpoint_io_{dev}_latest.json", since=started),
            "writer_contention": contention(out / f"writer_contention_{dev}_latest.json", since=started),
            "targets": targets,
            "note": ("targets (informational at smoke sizes): " if c.smoke else "targets: ")
            + ", ".join(f"#{t['issue']} {t['target']} {verdict(t['pass'])}" for t in targets)}


def stopped_note(path: Path, since: float) -> str | None:
    """checkpoint_io's own ``stopped`` line (its time limit reached: what it had not measured is missing)."""
    if not path.exists() or path.stat().st_mtime < since:
        return None
    with contextlib.suppress(ValueError, OSError):
        return json.loads(path.read_text()).get("stopped")
    return None


def contention(path: Path, since: float) -> dict | None:
    """writer_contention.py's medians per mode (informational: no issue sets a target on it), if this run
    wrote them."""
    if not path.exists() or path.stat().st_mtime < since:
        return None
    rows = json.loads(path.read_text())["rows"]
    keys = ("rate_fraction", "lost_s", "write_s", "from_source", "write_alone_s", "writer_cpu_s")
    return {r["mode"]: {k: round(r[k], 4) for k in keys if k in r} for r in rows}


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else "PASS" if ok else "FAIL"


def evaluate_targets(io_json: Path, ov_json: Path, since: float = 0.0) -> list[dict]:
    """The targets of issues 13, 14 and 15 that a GPU run judges, from the benchmarks' result files written
    after ``since`` (an older one is an earlier run's: a benchmark stopped before writing is judged on
    nothing); ``pass`` None where a target does not apply to this run (the benchmark says so)."""
    io, ov = (json.loads(p.read_text()) if p.is_file() and p.stat().st_mtime >= since else {}
              for p in (io_json, ov_json))
    return [*_issue13(io, ov), *_issue14(io), *_issue15(ov)]


def _judged(issue: int, name: str, v: float | None, lim: float, op: str) -> dict:
    holds = {">=": lambda: v >= lim, "<=": lambda: v <= lim, "<": lambda: v < lim}[op]
    return {"issue": issue, "target": name, "value": None if v is None else round(v, 4), "limit": lim, "op": op,
            "pass": v is not None and holds()}


def _issue13(io: dict, ov: dict) -> list[dict]:
    rows = {r["method"]: r for r in io.get("rows", [])}
    ov_rows = {r["mode"]: r for r in ov.get("rows", [])}

    def gbps(name: str) -> float | None:
        return rows.get(name, {}).get("GBps")

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    disk_w = max(filter(None, [gbps("disk_write_fsync"), gbps("disk_write_fsync_par")]), default=None)
    return [_judged(13, *t) for t in [
        ("durable save (steady state) >= 90% of the disk's write+fsync", ratio(gbps("harness_save_sync"), disk_w),
         0.90, ">="),
        ("async blocking <= 0.25 s (steady state)", rows.get("harness_save_async", {}).get("blocking_s"), 0.25,
         "<="),
        ("cold restore >= 95% of the disk's read", ratio(gbps("harness_restore_cold"), gbps("disk_read_cold")),
         0.95, ">="),
        ("warm restore >= 2x safetensors' warm load",
         ratio(gbps("harness_restore_warm"), gbps("safetensors_load_warm")), 2.0, ">="),
        ("async checkpoint every 50 steps <= 2% of step time", ov_rows.get("async", {}).get("overhead_pct"), 2.0,
         "<="),
    ]]


# Issue 14 on a GPU: CheckpointManager.restore (interleaved restore section of checkpoint_io.py) against the
# disk's cold read and a pinned host-to-device copy of the state, and its peak extra host memory.
ISSUE14 = [("cold restore >= 95% of the disk's cold read (restore section)", "cold_vs_disk_cold_read (>= 0.95)",
            0.95, ">="),
           ("warm restore >= 80% of pinned host-to-device bandwidth", "warm_vs_pinned_h2d (>= 0.8, GPU)", 0.8,
            ">="),
           ("peak extra host memory <= max(largest tensor, 256 MiB)", "peak_extra_over_max(largest, 256MiB) (<= 1)",
            1.0, "<=")]


def _issue14(io: dict) -> list[dict]:
    got = (io.get("direct_restore") or {}).get("targets") or {}
    return [_judged(14, name, got.get(key), lim, op) for name, key, lim, op in ISSUE14]


def _issue15(ov: dict) -> list[dict]:
    """train_overhead.py's own verdicts (stall against the copy and DCP at its best, staging, step cost)."""
    return [{"issue": 15, "target": t["target"], "value": None if t["value"] is None else round(t["value"], 4),
             "limit": t["limit"], "op": t["op"], "pass": t["ok"]} for t in ov.get("targets", [])]


# -- report ----------------------------------------------------------------------------------------------

LOGS_OF = {"cuda_tests": ("cuda_tests",), "gpt_deterministic": ("gpt_",), "benchmarks": ("checkpoint_io",
                                                                                           "train_overhead",
                                                                                           "writer_contention")}


def failed_logs(parts: list[dict], logs: dict[str, str]) -> dict[str, str]:
    """The log tails of the parts that failed (two_ranks_<mode> -> <mode>_*.log)."""
    prefixes = [pre for p in parts if p["ok"] is False
                for pre in LOGS_OF.get(p["part"], (p["part"].removeprefix("two_ranks_") + "_",))]
    return {name: text for name, text in logs.items() if name.startswith(tuple(prefixes))}


def summary(result: dict) -> str:
    lines = [f"gpu_check ({result['mode']}) {result['date']} on {result['device']}: "
             f"{'PASS' if result['ok'] else 'FAIL'} in {result['seconds']:.0f} s"]
    if result.get("stopped"):
        lines.append(f"  {result['stopped']}")
    for p in result["parts"]:
        mark = "PASS" if p["ok"] else "FAIL" if p["ok"] is False else "n/a "
        lines.append(f"  {mark} {p['part']}: {p.get('note', '')}")
        if p.get("checkpoint_io_stopped"):
            lines.append(f"       checkpoint_io {p['checkpoint_io_stopped']}: rows it did not reach are missing")
        for t in p.get("targets", []):
            lines.append(f"       {verdict(t['pass']):<4} #{t['issue']} {t['target']}: {t['value']} "
                         f"(limit {t['op']} {t['limit']})")
    return "\n".join(lines) + "\n"


def device_name(smoke: bool) -> str:
    if smoke:
        return "cpu (smoke)"
    import torch
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes, gloo, device cpu: the CPU-runnable parts")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="where the results go")
    p.add_argument("--budget-s", type=float, default=450.0,
                   help="total seconds for all parts (8 minutes less a margin for the report)")
    p.add_argument("--parts", default="cuda_tests,gpt,launch,ranks,benchmarks", help="comma-separated subset to run")
    p.add_argument("--modes", default="ddp,zero,fsdp", help="parallel modes for the two-rank part")
    p.add_argument("--restore-repeat", type=int, default=2,
                   help="repeats of checkpoint_io's restore section on the GPU (8 GB: ~60 s each)")
    p.add_argument("--io-groups", default="limits,harness,safetensors",
                   help="checkpoint_io's groups on the GPU (8 GB: dcp ~100 s, the others ~20-40 s each; the "
                        "restore section of issue 14 runs with harness and needs limits). dcp is left out by "
                        "default: the H200 run of 2026-11-30 measured it, train_overhead compares against DCP "
                        "at its best anyway, and its 100 s would leave the restore section unfinished")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs, checkpoints)")
    return p.parse_args(argv)


def run_parts(c: Check, parts: list[str]) -> None:
    """The CUDA tests, the GPT runs and the two-rank runs share the device (it has room for all of them); the
    benchmarks run alone, last."""
    try:
        with ThreadPoolExecutor(4) as pool:
            futures = []
            if "cuda_tests" in parts:
                futures.append(pool.submit(c.part, "cuda_tests", 30, lambda: cuda_tests(c)))
            if "gpt" in parts:
                futures.append(pool.submit(c.part, "gpt_deterministic", 40, lambda: gpt_deterministic(c)))
            if "launch" in parts:
                futures.append(pool.submit(c.part, "launch_gpu", 30, lambda: launch_gpu(c)))
            if "ranks" in parts:
                futures.append(pool.submit(ranks_part, c, c.args.modes.split(",")))
            for f in futures:
                f.result()
        if "benchmarks" in parts:
            c.part("benchmarks", 60, lambda: benchmarks(c))
    except Stopped:
        c.kill_all()  # (again: a command a part's thread started while the signal was handled)
        raise


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.cpu_smoke:
        import torch
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device; use --cpu-smoke for the CPU-runnable parts", file=sys.stderr)
            return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    c = Check(args, work)
    parts = args.parts.split(",")
    t0 = time.monotonic()
    log(f"work folder {work}, budget {args.budget_s:.0f} s, parts {parts}")
    stopped = None

    def on_term(signum: int, _frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the report must be written
        c.kill_all()
        raise Stopped(f"stopped by signal {signum} after {time.monotonic() - t0:.0f} s: parts not finished are "
                      "missing or failed")

    signal.signal(signal.SIGTERM, on_term)
    try:
        run_parts(c, parts)
    except Stopped as exc:
        stopped = str(exc)
        log(stopped)
    finally:
        logs = {p.name: p.read_text(errors="replace")[-4000:] for p in sorted(work.glob("*.log"))}
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    mode = "cpu-smoke" if args.cpu_smoke else "cuda"
    ran = [p for p in c.parts if p["ok"] is not None]
    result = {"benchmark": "gpu_check", "mode": mode, "device": device_name(args.cpu_smoke),
              "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "seconds": round(time.monotonic() - t0, 1), "stopped": stopped,
              "ok": bool(ran) and all(p["ok"] for p in ran) and stopped is None,
              "parts": c.parts, "failed_logs": failed_logs(c.parts, logs)}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for stem in (f"gpu_check_{mode}_{stamp}", f"gpu_check_{mode}_latest"):
        (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    text = summary(result)
    (out / f"gpu_check_{mode}_latest.txt").write_text(text)
    print(text, end="")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
