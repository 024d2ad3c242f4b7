#!/usr/bin/env python
"""Training overhead of checkpointing: the gpt_small workload through the real trainer, five ways.

Runs ``configs/gpt_small.toml`` single-process with ``harness.trainer.Trainer`` (config loaded with
``harness.config.load`` plus overrides) with

* ``none``:  no checkpoint during the run (``checkpoint.every_steps`` > ``train.max_steps``),
* ``sync``:  a checkpoint every ``--every`` steps, ``checkpoint.async = false``,
* ``async``: a checkpoint every ``--every`` steps, ``checkpoint.async = true`` (overlapped: save() schedules the
  copy, the trainer waits for it only at ``before_mutation()``, right before the optimizer step; the data files
  are written by threads at idle CPU priority),
* ``async_normal`` (only when asked for): ``async`` with the writers at normal priority, the A/B of that choice,
* ``async_copied`` (only when asked for): ``async`` with every piece copied into the O_DIRECT writer's block
  before its ``pwrite`` (``direct_write.FROM_SOURCE`` off), as before the evening of 2026-11-30: the A/B of
  writing the snapshot's bytes uncopied,
* ``async_gil_held`` (only when asked for): ``async_copied`` with that copy made while holding the GIL
  (``bytecopy.GIL_FREE_COPY_MIN`` raised above every piece), as before 2026-11-30: the A/B of that change,
* ``dcp``:   the same, with ``torch.distributed.checkpoint.async_save`` at its defaults,
* ``dcp_best``: with ``async_save(..., async_stager=DefaultStager(StagingOptions()))``, the wait point waiting for
  ``staging_completion``,

and times every step from inside the trainer (a ``Trainer`` subclass records when each ``train_step``
starts; a step lasts until the next one starts, so a checkpoint taken after step N is part of step N's time),
and per checkpoint the training-visible stall (time in save() plus time at the next wait point). Issue 15's
targets are printed as PASS/FAIL ratios under the table.

On a shared or noisy machine use ``--rounds N``: the modes run interleaved (none, async, ..., none, async, ...),
N times, each run in a fresh folder; the overhead of a mode is then the median over rounds of its mean step time
against the ``none`` run of the same round, and the 2% target is judged on that figure.
The trainer always saves a final checkpoint after the last step: that save is left out of every step figure.
After each run a fresh ``python -m harness train`` process restarts on the same checkpoint folder for one more
step, to measure restart-to-first-step recovery.

    python benchmarks/train_overhead.py                          # GPU: gpt_small at its natural size
    python benchmarks/train_overhead.py --device cpu --d-model 256 --n-layers 4 --seq-len 64 \\
        --batch-size 4 --steps 30 --every 10

See benchmarks/README.md for the definitions. Writes train_overhead_<device>_<timestamp>.{json,png} and
train_overhead_<device>_latest.{json,png} under --out, and the table on stdout (progress on stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable from a checkout without installing
    sys.path.insert(0, str(REPO))

from _dcp_best import single_process as dcp_single_process  # noqa: E402
from _dcp_best import unavailable as dcp_best_unavailable  # noqa: E402
from _results import pyplot, save_figure, write_results  # noqa: E402
from harness import config as hconfig  # noqa: E402
from harness.trainer import Trainer  # noqa: E402
from harness.storage import bytecopy, direct_write  # noqa: E402

MB = 1e6
MODES = ["none", "sync", "async", "async_normal", "async_copied", "async_gil_held", "dcp", "dcp_best"]
AB_MODES = ("async_normal", "async_copied", "async_gil_held")  # A/Bs of one choice each (see above)
DEFAULT_MODES = [m for m in MODES if m not in AB_MODES]
HARNESS_MODES = ["none", "sync", "async", *AB_MODES]  # the harness writes these (and can recover them)
ASYNC_MODES = ("async", *AB_MODES)
DCP_OF = {"dcp": "defaults", "dcp_best": "best"}


def log(msg: str) -> None:
    print(f"[train_overhead {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class TimedTrainer(Trainer):
    """The real trainer, with timestamps: the start of every ``train_step``, its own host-side duration (forward,
    backward, optimizer as launched: the trainer reads the loss only at log and checkpoint steps, so on a GPU this
    is launch time and the device's time lands in the step that next waits for it), the forward+backward part (up
    to the trainer's wait point, ``CheckpointManager.before_mutation()``), and per mid-run checkpoint the
    training-visible stall: the time in save() plus the time waiting at the next step's wait point. The moment
    the final save begins is the end of the step loop.

    ``dcp`` ("defaults" or "best") checkpoints with ``torch.distributed.checkpoint.async_save`` instead, at the
    same points: DCP's state may change only once staging completed, so the wait point waits for
    ``staging_completion`` (DCP at its best) and a save first waits for the previous upload (one in flight, as
    the harness). The final save is the harness's (it is in no step figure)."""

    def __init__(self, *args: Any, dcp: str | None = None, writer_priority: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.writer_priority = writer_priority
        self.step_starts: list[float] = []
        self.compute_s: list[float] = []
        self.fwd_bwd_s: list[float] = []
        self.ckpts: list[dict] = []          # per mid-run checkpoint: step, save_s, wait_s, t0, staged_at
        self.loop_end: float | None = None
        self.dcp, self._stager, self._dcp_resp, self._dcp_staged = dcp, None, None, None
        self._open: dict | None = None       # the checkpoint whose wait point is still ahead
        self._lib_save_s: float | None = None

    def setup(self) -> None:
        super().setup()
        writer = self.mgr._saver.writer
        if self.writer_priority is not None and writer is not None:  # its threads start at the first save
            writer.priority = self.writer_priority
        inner = self.mgr.before_mutation

        def timed() -> None:
            t = time.perf_counter()
            self.fwd_bwd_s.append(t - self.step_starts[-1])
            if self._dcp_staged is not None:  # DCP: tensors may change only once staging completed
                self._dcp_staged.result()
                self._dcp_staged = None
            inner()
            if self._open is not None:
                self._open["wait_s"] = time.perf_counter() - t
                self._open = None

        self.mgr.before_mutation = timed  # type: ignore[method-assign]
        save = self.mgr.save

        def timed_save(*a: Any, **kw: Any) -> None:  # the checkpoint library's own call, as DCP's is timed
            t = time.perf_counter()
            try:
                save(*a, **kw)
            finally:
                self._lib_save_s = time.perf_counter() - t

        self.mgr.save = timed_save  # type: ignore[method-assign]
        if self.dcp == "best":
            from _dcp_best import BestStager
            self._stager = BestStager(self.device)  # one stager for the run (its buffers reused) where torch can

    def train_step(self, batch: tuple) -> torch.Tensor:
        t = time.perf_counter()
        self.step_starts.append(t)
        loss = super().train_step(batch)
        self.compute_s.append(time.perf_counter() - t)
        return loss

    def save(self, *, final: bool = False) -> None:
        t = time.perf_counter()
        if final and self.loop_end is None:
            self.loop_end = t
        self._lib_save_s = None
        if final or self.dcp is None:
            self._dcp_drain()
            super().save(final=final)
        else:
            self._dcp_save()
            self._lib_save_s = time.perf_counter() - t
        if final or self._lib_save_s is None:
            return
        rec = {"step": self.step, "t0": t, "save_s": self._lib_save_s, "trainer_save_s": time.perf_counter() - t,
               "wait_s": 0.0, "staged_at": None}
        staging = None if self.dcp else self.mgr._saver.staging
        if staging is not None:
            rec["staging"] = staging           # copied_at is read at the end of the run
        elif self._dcp_staged is not None:
            self._dcp_staged.add_done_callback(lambda _f: rec.__setitem__("staged_at", time.perf_counter()))
        else:                                  # staged when save() returned (sync, DCP defaults)
            rec["staged_at"] = t + rec["save_s"]
        self.ckpts.append(rec)
        self._open = rec

    def _dcp_save(self) -> None:
        import torch.distributed.checkpoint as dcp
        self._dcp_drain()
        payload = {"model": self.model.state_dict(), "optim": self.optimizer.state_dict()}
        folder = os.path.join(self.cfg.checkpoint.dir, f"dcp-{self.step:09d}")
        kw = {"async_stager": self._stager.next()} if self._stager is not None else {}  # torch 2.4: no such arg
        resp = dcp.async_save(payload, checkpoint_id=folder, **kw, **dcp_single_process())
        self._dcp_resp, self._dcp_staged = resp, getattr(resp, "staging_completion", None)

    def _dcp_drain(self) -> None:
        if self._dcp_staged is not None:
            self._dcp_staged.result()
            self._dcp_staged = None
        if self._dcp_resp is not None:
            getattr(self._dcp_resp, "upload_completion", self._dcp_resp).result()
            self._dcp_resp = None

    def close(self) -> None:
        try:
            self._dcp_drain()
            if self._stager is not None:
                self._stager.close()
        finally:
            super().close()


def copy_seconds(model: torch.nn.Module, optimizer: torch.optim.Optimizer, repeats: int = 5) -> float:
    """The snapshot's copy time: the model and optimizer state into a reused host buffer on the caller's thread
    with nothing else running (the first, allocating, copy is left out; the fastest of the others: on a shared
    machine the others only add the load of other work)."""
    from harness.checkpoint.snapshot import Snapshot
    tensors = {f"m{i}": t for i, t in enumerate(model.state_dict().values())}
    for i, st in enumerate(optimizer.state.values()):
        tensors.update({f"o{i}.{k}": v for k, v in st.items() if torch.is_tensor(v)})
    snap, times = Snapshot(), []
    try:
        for _ in range(repeats + 1):
            t = time.perf_counter()
            snap.take(tensors, copy_all=True)
            times.append(time.perf_counter() - t)
    finally:
        snap.release()
    return min(times[1:])


# ---------------------------------------------------------------------------------------------------------

def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Unique tensor storage of model + optimizer state (a tied weight counts once)."""
    seen, total = set(), 0
    tensors = list(model.state_dict().values())
    for st in optimizer.state.values():
        tensors += [v for v in st.values() if torch.is_tensor(v)]
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def overrides(args: argparse.Namespace, mode: str, work: Path, max_steps: int, out_name: str,
              tag: str | None = None) -> list[str]:
    # train.log_every stays the config's (or --log-every): a log step reads the loss and, with a metric, copies
    # the logits to fp32 (1 GB for gpt_small); forcing it every step would inflate the base step.
    sub = work / (tag or mode)  # one folder per run: a later round must not resume from an earlier one
    ov = [f"train.max_steps={max_steps}", f"train.device=\"{args.device}\"",
          f"run.name=\"train_overhead_{mode}\"", f"run.id=\"train_overhead_{mode}\"",
          f"run.output_dir=\"{sub / out_name}\"", f"checkpoint.dir=\"{sub / 'ckpt'}\"",
          f"checkpoint.every_steps={args.steps + 1 if mode == 'none' else args.every}",
          f"checkpoint.async={'true' if mode in ASYNC_MODES else 'false'}",
          f"checkpoint.io_threads={args.io_threads}"]
    for key, val in (("model.d_model", args.d_model), ("model.n_layers", args.n_layers),
                     ("model.n_heads", args.n_heads), ("data.seq_len", args.seq_len),
                     ("data.vocab_size", args.vocab_size), ("train.batch_size", args.batch_size)):
        if val is not None:
            ov.append(f"{key}={val}")
    if args.log_every is not None:
        ov.append(f"train.log_every={args.log_every}")
    if args.amp is not None:
        ov.append(f"train.amp={'true' if args.amp else 'false'}")
    return ov


def run_mode(args: argparse.Namespace, mode: str, work: Path, rnd: int = 0) -> dict:
    tag = mode if rnd == 0 else f"{mode}.r{rnd}"
    cfg = hconfig.load(args.config, overrides(args, mode, work, args.steps, "run", tag))
    log(f"{mode}{f' (round {rnd + 1})' if args.rounds > 1 else ''}: {args.steps} steps, checkpoint every "
        f"{cfg.checkpoint.every_steps} steps, async={cfg.checkpoint.async_save}, ckpt dir {cfg.checkpoint.dir}")
    tr = TimedTrainer(cfg, dcp=DCP_OF.get(mode), writer_priority="normal" if mode == "async_normal" else None)
    t0 = time.perf_counter()
    shipped = direct_write.FROM_SOURCE, bytecopy.GIL_FREE_COPY_MIN
    if mode in ("async_copied", "async_gil_held"):
        direct_write.FROM_SOURCE = False
    if mode == "async_gil_held":
        bytecopy.GIL_FREE_COPY_MIN = 1 << 62
    try:
        rc = tr.run()
    finally:
        direct_write.FROM_SOURCE, bytecopy.GIL_FREE_COPY_MIN = shipped
    t_run = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"{mode}: trainer exited {rc}")
    n = len(tr.step_starts)
    assert n == args.steps and tr.loop_end is not None, (n, tr.loop_end)
    ends = tr.step_starts[1:] + [tr.loop_end]
    step_s = [e - s for s, e in zip(tr.step_starts, ends)]          # step k = index k-1
    ckpt_steps = [c["step"] for c in tr.ckpts]
    measured = list(range(args.warmup, n))                            # indices past the warm-up steps
    plain = [i for i in measured if (i + 1) not in ckpt_steps and i not in ckpt_steps]
    plain_mean = statistics.fmean(step_s[i] for i in plain) if plain else None
    per_ckpt = []
    every = cfg.checkpoint.every_steps
    median_all = statistics.median(step_s[i] for i in measured)
    for c in tr.ckpts:
        staged_at = c["staging"].copied_at if "staging" in c else c["staged_at"]
        k = c["step"]  # the checkpoint after step k lands in step k's time, its wait point in step k+1's
        cost = sum(step_s[i] for i in (k - 1, k) if i < n) - 2 * plain_mean if plain_mean is not None else None
        per_ckpt.append({"step": k, "save_s": c["save_s"], "trainer_save_s": c["trainer_save_s"], "wait_s": c["wait_s"],
                         "stall_s": c["save_s"] + c["wait_s"],
                         "staged_s": None if staged_at is None else staged_at - c["t0"], "step_cost_s": cost,
                         "window_cost_s": window_cost(step_s, k, every, args.warmup, median_all)})
    stalls = [c["stall_s"] for c in per_ckpt]
    steady = per_ckpt[1:] or per_ckpt  # the first save allocates buffers (and imports): left out when others exist
    staged = [c["staged_s"] for c in steady if c["staged_s"] is not None]
    ckpt_dir = Path(cfg.checkpoint.dir)
    latest = tr.mgr.latest()
    row = {
        "mode": mode, "steps": n, "warmup_steps_excluded": args.warmup,
        "every_steps": cfg.checkpoint.every_steps if mode != "none" else None,
        "async": cfg.checkpoint.async_save, "checkpoint_steps": ckpt_steps, "checkpoints": len(ckpt_steps),
        "median_step_s": statistics.median(step_s[i] for i in measured),
        "mean_step_s": statistics.fmean(step_s[i] for i in measured),
        "mean_plain_step_s": plain_mean,
        "mean_compute_s": statistics.fmean(tr.compute_s[i] for i in measured),
        "mean_fwd_bwd_s": statistics.fmean(tr.fwd_bwd_s[i] for i in measured),
        "loop_wall_s": tr.loop_end - tr.step_starts[0],
        "measured_wall_s": sum(step_s[i] for i in measured),
        "per_checkpoint": per_ckpt,
        "blocked_s_mean": statistics.fmean(c["stall_s"] for c in steady) if steady else None,
        "first_stall_s": stalls[0] if stalls else None,
        "blocked_s_max": max(stalls) if stalls else None,
        "blocked_s_all": stalls,
        "staged_s_mean": statistics.fmean(staged) if staged else None,
        "blocked_share_pct": 100 * sum(stalls) / sum(step_s[i] for i in measured) if measured else None,
        "final_save_s": None,
        "checkpoint_name": latest,
        "checkpoint_bytes": dir_bytes(ckpt_dir / latest) if latest else None,
        "state_bytes": state_bytes(tr.model, tr.optimizer),
        "run_wall_s": t_run,
        "step_times_s": [round(s, 5) for s in step_s],
        "compute_times_s": [round(s, 5) for s in tr.compute_s],
    }
    final = [e["blocked_s"] for e in read_jsonl(Path(cfg.output_dir) / "metrics.jsonl")
             if e.get("event") == "save" and e["step"] == args.steps]
    row["final_save_s"] = final[0] if final else None
    if mode in ASYNC_MODES:  # the reference of the stall target: the same state's copy, alone
        row["copy_s"] = copy_seconds(tr.model, tr.optimizer)
    if tr._stager is not None:  # how DCP at its best staged on this torch
        row["dcp_stager"] = tr._stager.note
    del tr
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if rnd == 0 and not args.no_recovery and mode in args.recovery_modes.split(",") and mode in HARNESS_MODES:
        row["recovery"] = recover(args, mode, work)
    if rnd > 0 and not args.keep:  # gigabytes per run at real sizes; round 0's goes with the work folder
        shutil.rmtree(work / tag, ignore_errors=True)
    return row


def window_cost(step_s: list[float], k: int, every: int, warmup: int, plain: float) -> float | None:
    """What the checkpoint after step ``k`` cost over its whole interval: the times of steps k .. k+every-1
    (its save, its wait point, and every step its background write ran beside) less ``every`` plain steps
    (the median step: valid while the writing ends within half the interval). None when that window is not
    all inside the measured steps. Why not just the next step: on the H200 the steps ran ~30% slower for the
    ~20 steps the data files took to write, a cost two steps do not see."""
    first, end = k - 1, k - 1 + every
    if first < warmup or end > len(step_s):
        return None
    return sum(step_s[first:end]) - every * plain


def combine(runs: list[dict]) -> dict:
    """One mode's row over several rounds: round 1's row (step series, recovery, sizes), with medians over the
    rounds of the step figures and overheads, the steady-state checkpoints of every round pooled, and the
    per-round figures under ``rounds``."""
    if len(runs) == 1:
        return runs[0]
    row = dict(runs[0])

    def med(key: str) -> float | None:
        vals = [r[key] for r in runs if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    for key in ("median_step_s", "mean_step_s", "mean_plain_step_s", "mean_compute_s", "mean_fwd_bwd_s",
                "blocked_share_pct", "first_stall_s", "overhead_pct", "median_overhead_pct", "final_save_s"):
        row[key] = med(key)
    steady = [c for r in runs for c in (r["per_checkpoint"][1:] or r["per_checkpoint"])]
    staged = [c["staged_s"] for c in steady if c["staged_s"] is not None]
    row.update(per_checkpoint=[c for r in runs for c in r["per_checkpoint"]], steady_checkpoints=steady,
               blocked_s_mean=statistics.fmean(c["stall_s"] for c in steady) if steady else None,
               blocked_s_all=[b for r in runs for b in r["blocked_s_all"]],
               blocked_s_max=max((r["blocked_s_max"] for r in runs if r["blocked_s_max"] is not None), default=None),
               staged_s_mean=statistics.fmean(staged) if staged else None,
               rounds=[{k: r.get(k) for k in ("mean_step_s", "median_step_s", "mean_plain_step_s", "overhead_pct",
                                              "blocked_s_mean", "staged_s_mean", "blocked_share_pct")}
                       for r in runs])
    if any("copy_s" in r for r in runs):
        row["copy_s"] = min(r["copy_s"] for r in runs if "copy_s" in r)  # the fastest: the others only add load
    return row


def recover(args: argparse.Namespace, mode: str, work: Path) -> dict:
    """A fresh process restarts on the run's checkpoint folder and trains one step: time from just before the
    process is spawned to its 'resume' event and to its first step's metrics record (wall clock, ms)."""
    last = args.steps
    cmd = [sys.executable, "-m", "harness", "train", "--config", str(args.config)]
    for o in overrides(args, mode, work, last + 1, "recover"):
        cmd += ["--set", o]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t_start = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.recovery_timeout)
    t_exit = time.time()
    if proc.returncode != 0:
        raise RuntimeError(f"{mode}: recovery process exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    events = read_jsonl(work / mode / "recover" / "metrics.jsonl")
    resume = next((e for e in events if e.get("event") == "resume"), None)
    first = next((e for e in events if "event" not in e and "step" in e), None)
    if resume is None or first is None:
        raise RuntimeError(f"{mode}: recovery metrics lack a resume event or a step record: {events}")
    rec = {
        "resumed_step": resume["step"], "checkpoint": resume.get("checkpoint"), "first_step": first["step"],
        "restore_s": resume["seconds"],
        "time_to_resume_s": resume["time"] - t_start,
        "time_to_first_step_s": first["time"] - t_start,
        "startup_s": resume["time"] - resume["seconds"] - t_start,
        "process_wall_s": t_exit - t_start,
    }
    log(f"{mode}: recovery resumed step {rec['resumed_step']} in {rec['restore_s']:.3f} s, first step "
        f"{rec['time_to_first_step_s']:.2f} s after spawn")
    if rec["resumed_step"] != last:
        raise RuntimeError(f"{mode}: recovery resumed at step {rec['resumed_step']}, expected {last}")
    return rec


# ---------------------------------------------------------------------------------------------------------

def _f(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _mean(r: dict, key: str) -> float | None:
    """Mean over the steady-state checkpoints (all but the first of each run, when there are others)."""
    per = r.get("per_checkpoint", [])
    steady = r["steady_checkpoints"] if "steady_checkpoints" in r else (per[1:] or per)
    vals = [c[key] for c in steady if c[key] is not None]
    return statistics.fmean(vals) if vals else None


def table(rows: list[dict]) -> str:
    head = (f"{'mode':<13}{'ckpts':>6}{'median step s':>15}{'mean step s':>13}{'overhead %':>12}"
            f"{'stall/ckpt s':>14}{'in save s':>11}{'at wait s':>11}{'staged s':>10}{'cost/ckpt s':>13}"
            f"{'window s':>10}{'1st stall s':>12}{'ckpt MB':>9}{'restore s':>11}{'1st step s':>12}")
    lines = [head, "-" * len(head)]
    for r in rows:
        rec = r.get("recovery") or {}
        lines.append(
            f"{r['mode']:<13}{r['checkpoints']:>6}{r['median_step_s']:>15.4f}{r['mean_step_s']:>13.4f}"
            f"{_f(r.get('overhead_pct'), '+.1f'):>12}{_f(r['blocked_s_mean'], '.4f'):>14}"
            f"{_f(_mean(r, 'save_s'), '.4f'):>11}{_f(_mean(r, 'wait_s'), '.4f'):>11}"
            f"{_f(r['staged_s_mean'], '.4f'):>10}{_f(_mean(r, 'step_cost_s'), '+.3f'):>13}"
            f"{_f(_mean(r, 'window_cost_s'), '+.3f'):>10}"
            f"{_f(r.get('first_stall_s'), '.4f'):>12}"
            f"{_f(r['checkpoint_bytes'] / MB if r['checkpoint_bytes'] else None, '.1f'):>9}"
            f"{_f(rec.get('restore_s'), '.3f'):>11}{_f(rec.get('time_to_first_step_s'), '.2f'):>12}")
    return "\n".join(lines)


def targets(rows: list[dict], device: str) -> list[dict]:
    """Issue 15's targets, as ratios of figures of this one run; ``ok`` None where a target does not apply."""
    by = {r["mode"]: r for r in rows}
    out = []
    h, best = by.get("async"), by.get("dcp_best")
    if h and h["blocked_s_mean"] is not None:
        copy, fb = h.get("copy_s"), h["mean_fwd_bwd_s"]
        ratio = h["blocked_s_mean"] / copy if copy else None
        out.append({"target": "visible stall <= 0.1x the snapshot's copy time (when forward+backward > copy)",
                    "value": ratio, "limit": 0.1, "op": "<=",
                    "ok": (ratio <= 0.1) if ratio is not None and fb > copy else None,
                    "detail": f"stall {h['blocked_s_mean']:.4f} s, copy {copy:.4f} s, forward+backward {fb:.3f} s"})
    if h and best and h["blocked_s_mean"] is not None and best["blocked_s_mean"] is not None:
        ratio = h["blocked_s_mean"] / best["blocked_s_mean"]
        out.append({"target": "visible stall lower than DCP at its best", "value": ratio, "limit": 1.0, "op": "<",
                    "ok": ratio < 1.0, "detail": f"{h['blocked_s_mean']:.4f} s vs {best['blocked_s_mean']:.4f} s"})
        if h["staged_s_mean"] and best["staged_s_mean"]:
            ratio = best["staged_s_mean"] / h["staged_s_mean"]
            note = ("; on CPU both are one copy of the state into a reused host buffer beside the same forward "
                    "and backward, so the ratio only measures DCP's overhead" if device == "cpu" else "")
            out.append({"target": "staging done >= 5x sooner than DCP at its best", "value": ratio, "limit": 5.0,
                        "op": ">=", "ok": ratio >= 5.0,
                        "detail": f"{h['staged_s_mean']:.4f} s vs {best['staged_s_mean']:.4f} s after save(){note}"})
    if h and h.get("every_steps") and h["mean_plain_step_s"]:
        out.append(_step_target(h, by.get("none"), device))
    return out


def excess_skew(h: dict, none: dict | None) -> list[float]:
    """Per round, in %: (mean step / median step - 1) of the run less the same of that round's none run.
    Why: on this shared machine a whole run drifts by +-10% against another run of the same mode (every step,
    not the ones near a checkpoint), which swamps a cost of a few %. A checkpoint's cost lands on the few
    steps after it (the copy, the writing), so it raises the run's mean above its median; drift moves both.
    Valid while the writing ends within half the interval (the median step stays a plain step)."""
    pairs = zip(h.get("rounds") or [], (none or {}).get("rounds") or [])
    return [100 * (a["mean_step_s"] / a["median_step_s"] - b["mean_step_s"] / b["median_step_s"])
            for a, b in pairs if a.get("median_step_s") and b.get("median_step_s")]


def _step_target(h: dict, none: dict | None, device: str) -> dict:
    """The step-time target. With interleaved rounds and a none run: the median over rounds of
    :func:`excess_skew` (the across-run figure, mean step / the same round's none run's - 1, is reported
    beside it: it holds everything the checkpoints cost, but also the drift between runs). With one round: the within-run cost of the steps around each checkpoint (a separate none
    run on a shared machine differs by more than the cost; that figure misses work spread over other steps).
    On CPU it applies to a model whose step (the none run's, when there is one) takes >= 0.5 s."""
    every, limit = h["every_steps"], (2.0 if device == "cpu" else 1.0)
    rounds = len(h.get("rounds") or [None])
    base = none["mean_step_s"] if none else h["mean_plain_step_s"]
    window = _mean(h, "window_cost_s")  # the whole interval after a checkpoint, where the run is long enough
    cost = window if window is not None else _mean(h, "step_cost_s")
    within = None if cost is None else 100 * cost / (every * h["mean_plain_step_s"])
    skew = excess_skew(h, none) if rounds > 1 else []
    if skew:
        pct = statistics.median(skew)
        per = ", ".join(f"{r['overhead_pct']:+.1f}" for r in h["rounds"] if r.get("overhead_pct") is not None)
        how = (f"median over {rounds} rounds of the within-run excess of mean over median step vs the none "
               f"run's ({', '.join(f'{x:+.2f}' for x in skew)} %); mean step vs that round's none run "
               f"{_f(h.get('overhead_pct'), '+.1f')}% ({per} %: drift between runs)")
    elif rounds > 1 and none and h.get("overhead_pct") is not None:
        pct = h["overhead_pct"]
        per = ", ".join(f"{r['overhead_pct']:+.1f}" for r in h["rounds"] if r.get("overhead_pct") is not None)
        how = f"median over {rounds} rounds of the mean step vs that round's none run ({per} %)"
    else:
        pct = within
        how = "within the run" + (f"; mean step vs the none run {h['overhead_pct']:+.1f}%" if none else "")
    applies = every <= (10 if device == "cpu" else 50) and (base >= 0.5 or device != "cpu")
    return {"target": f"checkpoint every {every} steps costs <= {limit:g}% of step time "
                      f"({'CPU: a step >= 0.5 s, every <= 10' if device == 'cpu' else 'GPU: every <= 50'})",
            "value": pct, "limit": limit, "op": "<=", "ok": (pct <= limit) if applies and pct is not None else None,
            "detail": f"{how}; step {base:.3f} s{' (none run)' if none else ''}; within-run cost/ckpt "
                      f"({'its whole interval' if window is not None else 'its step and the next'}) "
                      f"{_f(cost, '+.3f')} s = {_f(within, '.2f')}%; stalls alone {h['blocked_share_pct']:.2f}%"}


def targets_text(ts: list[dict]) -> str:
    lines = []
    for t in ts:
        verdict = "n/a " if t["ok"] is None else ("PASS" if t["ok"] else "FAIL")
        lines.append(f"{verdict} {t['target']}: {_f(t['value'], '.3f')} (limit {t['limit']:g}; {t['detail']})")
    return "\n".join(lines)


def plot(rows: list[dict], env: dict, path: Path) -> str | None:
    """Left: every step's time per mode, checkpoint steps marked. Right: mean step time, blocking per checkpoint
    and restart-to-first-step per mode. Returns a skip reason or None."""
    plt, skip = pyplot()
    if plt is None:
        return skip
    colors = {"none": "#7f7f7f", "sync": "#c00000", "async": "#4472c4", "dcp": "#ed7d31", "dcp_best": "#70ad47"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    for r in rows:
        xs = list(range(1, len(r["step_times_s"]) + 1))
        ax1.plot(xs, r["step_times_s"], label=r["mode"], color=colors.get(r["mode"]), lw=1.2, marker=".", ms=3)
        for s in r["checkpoint_steps"]:
            ax1.plot([s], [r["step_times_s"][s - 1]], marker="o", ms=7, mfc="none", color=colors.get(r["mode"]))
    ax1.set_xlabel("step (circles: steps followed by a checkpoint)")
    ax1.set_ylabel("seconds per step (incl. checkpoint blocking)")
    ax1.set_yscale("log")
    ax1.legend(fontsize=8)
    ax1.set_title("step times", fontsize=10)
    series = [("mean step s", lambda r: r["mean_step_s"]),
              ("blocked per ckpt s", lambda r: r["blocked_s_mean"] or 0.0),
              ("restart to 1st step s", lambda r: (r.get("recovery") or {}).get("time_to_first_step_s", 0.0))]
    w = 0.8 / len(series)
    for si, (label, fn) in enumerate(series):
        xs = [i + (si - (len(series) - 1) / 2) * w for i in range(len(rows))]
        ys = [fn(r) for r in rows]
        ax2.bar(xs, ys, w, label=label)
        for x, y in zip(xs, ys):
            ax2.text(x, y, f"{y:.2f}", ha="center", va="bottom", fontsize=7)
    ax2.set_xticks(range(len(rows)), [f"{r['mode']}\n{_f(r.get('overhead_pct'), '+.1f')} %" for r in rows])
    ax2.set_ylabel("seconds")
    ax2.legend(fontsize=8)
    ax2.set_title("per mode (overhead % of mean step time vs none)", fontsize=10)
    ck = next((r["checkpoint_bytes"] for r in rows if r.get("checkpoint_bytes")), 0)
    fig.suptitle(f"Checkpoint overhead in training on {env['device_name']}, checkpoint {ck / MB:.0f} MB every "
                 f"{env['every']} steps ({env['date'][:10]})\n{env['workload']}", fontsize=10)
    return save_figure(plt, fig, path)


def environment(args: argparse.Namespace, device: str, work: Path) -> dict:
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
    else:
        name = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    fs = None
    with contextlib.suppress(OSError):
        best, real = "", os.path.realpath(work)
        for line in open("/proc/mounts"):
            dev, mnt, typ = line.split()[:3]
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, fs = mnt, {"mount": mnt, "type": typ, "device": dev}
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "device": device, "device_name": name, "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(), "dir_filesystem": fs, "argv": sys.argv[1:],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "gpt_small.toml"), help="the workload's TOML")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--d-model", type=int, help="model.d_model (default: the config's)")
    p.add_argument("--n-layers", type=int, help="model.n_layers (default: the config's)")
    p.add_argument("--n-heads", type=int, help="model.n_heads (default: the config's, or d_model/64 when the "
                   "config's does not divide --d-model)")
    p.add_argument("--seq-len", type=int, help="data.seq_len (default: the config's)")
    p.add_argument("--vocab-size", type=int, help="data.vocab_size (default: the config's)")
    p.add_argument("--batch-size", type=int, help="train.batch_size (default: the config's)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="train.amp (default: the config's; it only acts on cuda)")
    p.add_argument("--log-every", type=int, help="train.log_every (default: the config's, 20 for gpt_small)")
    p.add_argument("--steps", type=int, default=60, help="training steps per mode")
    p.add_argument("--every", type=int, default=20, help="checkpoint every N steps (sync and async modes)")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of median/mean (not of loop wall)")
    p.add_argument("--modes", default=",".join(DEFAULT_MODES),
                   help=f"comma-separated subset of {', '.join(MODES)} (default: all but {' and '.join(AB_MODES)})")
    p.add_argument("--rounds", type=int, default=1, help="run the modes this many times, interleaved; overheads "
                   "are then medians of per-round figures (each run against its round's none run)")
    p.add_argument("--io-threads", type=int, default=4, help="checkpoint.io_threads")
    p.add_argument("--dir", default=None, help="where checkpoints go (default: a temporary folder); a fresh "
                   "sub-folder is made and removed at the end")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="where JSON and PNG go")
    p.add_argument("--no-recovery", action="store_true", help="skip the restart-to-first-step measurement")
    p.add_argument("--recovery-modes", default=",".join(MODES),
                   help="modes whose checkpoint folder gets the restart measurement (default: all)")
    p.add_argument("--recovery-timeout", type=float, default=600, help="seconds allowed per restart process")
    p.add_argument("--keep", action="store_true", help="keep the work folder (checkpoints, metrics)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch.cuda.is_available() is False")
    bad = (set(args.modes.split(",")) | set(args.recovery_modes.split(","))) - set(MODES)
    if bad:
        p.error(f"unknown --modes {sorted(bad)}; choose from {MODES}")
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    if args.steps < 2 or args.every < 1:
        p.error("--steps must be >= 2 and --every >= 1")
    if not 0 <= args.warmup < args.steps:
        p.error("--warmup must be in [0, steps)")
    if args.every >= args.steps and set(args.modes.split(",")) - {"none"}:
        p.error("--every must be < --steps, or the sync/async runs take no checkpoint before the final one")
    base = hconfig.load(args.config)
    d_model = args.d_model or base.model.get("d_model")
    heads = args.n_heads or base.model.get("n_heads")
    if args.n_heads is None and d_model and heads and d_model % heads:
        args.n_heads = max(1, d_model // 64) if d_model % max(1, d_model // 64) == 0 else 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    modes = [m for m in MODES if m in args.modes.split(",")]
    skipped = {}
    if "dcp_best" in modes and (why := dcp_best_unavailable()):
        modes.remove("dcp_best")
        skipped["dcp_best"] = why
        log(f"dcp_best skipped: {why}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if args.dir:
        Path(args.dir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"train_overhead_{stamp}_", dir=args.dir))
    log(f"device={args.device} modes={modes} work={work} out={out}")
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    t_all = time.perf_counter()
    try:
        for rnd in range(args.rounds):  # interleaved: machine noise lands on every mode alike
            for mode in modes:
                r = run_mode(args, mode, work, rnd)
                runs[mode].append(r)
                log(f"{mode}: median {r['median_step_s']:.4f} s, mean {r['mean_step_s']:.4f} s, loop "
                    f"{r['loop_wall_s']:.2f} s, blocked {r['blocked_s_all']}, checkpoint "
                    f"{_f(r['checkpoint_bytes'] and r['checkpoint_bytes'] / MB, '.1f')} MB")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    elapsed = time.perf_counter() - t_all
    for rnd in range(args.rounds):  # each run against the none run of its own round
        ref = runs["none"][rnd] if "none" in runs else None
        for mode in modes:
            r = runs[mode][rnd]
            r["overhead_pct"] = (100 * (r["mean_step_s"] / ref["mean_step_s"] - 1)) if ref else None
            r["median_overhead_pct"] = (100 * (r["median_step_s"] / ref["median_step_s"] - 1)) if ref else None
    rows = [combine(runs[m]) for m in modes]

    cfg = hconfig.load(args.config, overrides(args, "none", work, args.steps, "run"))
    env = environment(args, args.device, Path(args.dir or tempfile.gettempdir()))
    env.update(workload=f"{Path(args.config).stem} (d_model={cfg.model.get('d_model')}, "
                        f"n_layers={cfg.model.get('n_layers')}, n_heads={cfg.model.get('n_heads')}, "
                        f"seq_len={cfg.data.get('seq_len')}, vocab={cfg.data.get('vocab_size')}, "
                        f"batch={cfg.train.batch_size}, amp={cfg.train.amp and args.device == 'cuda'})",
               model=dict(cfg.model), data=dict(cfg.data), batch_size=cfg.train.batch_size,
               amp=cfg.train.amp and args.device == "cuda", steps=args.steps, every=args.every,
               warmup=args.warmup, rounds=args.rounds, io_threads=args.io_threads, log_every=cfg.train.log_every,
               elapsed_s=elapsed)
    result = {"benchmark": "train_overhead", "env": env, "rows": rows, "skipped_modes": skipped, "definitions": {
        "step time": "from the start of train_step(k) to the start of train_step(k+1): forward/backward/"
                     "optimizer, data loading, logging and any checkpoint save after step k; the last step ends "
                     "where the trainer's final save begins (the final save is in no step figure)",
        "median_step_s / mean_step_s": "over all steps but the first warmup_steps_excluded (mean includes the "
                                       "steps followed by a checkpoint)",
        "loop_wall_s": "start of step 1 to the start of the final save (all steps, warm-up included)",
        "overhead_pct": "mean_step_s of the mode / mean_step_s of 'none' - 1, in %; with --rounds > 1 the median "
                        "over rounds of that figure, each run against the none run of its own round (the other "
                        "step figures of a row are then medians over rounds too, stall and staged means pool the "
                        "steady-state checkpoints of every round, per-round figures are under 'rounds')",
        "rounds": "how many times the modes ran, interleaved (env.rounds)",
        "steady state": "stall/ckpt, in save, at wait, staged and cost/ckpt (and the targets) are means over the "
                        "mid-run checkpoints but the first (which allocates buffers) when there are two or more; "
                        "1st stall s is the first one's",
        "blocked_s (stall/ckpt)": "per mid-run checkpoint, the training-visible stall: seconds in save() (in save s) "
                                  "plus seconds at the next step's wait point, CheckpointManager.before_mutation() "
                                  "(at wait s; for DCP: waiting for staging_completion there)",
        "staged_s": "seconds from the start of save() until the snapshot's host copy had landed (DCP: until "
                    "staging_completion; sync and DCP defaults: when save() returned)",
        "step_cost_s (cost/ckpt)": "the times of the step a checkpoint follows and of the next step, less twice the "
                                   "mean step time of the run's steps away from checkpoints",
        "copy_s": "async row: the same state copied into a reused host buffer on the caller's thread, alone "
                  "(fastest of 5)",
        "save_s (in save)": "the checkpoint library's call: CheckpointManager.save, or the state_dict() calls and "
                            "dcp.async_save (trainer_save_s: the trainer's whole save, loss reduction and logging "
                            "included)",
        "window_cost_s": "per checkpoint after step k: the times of steps k .. k+every-1 (the whole interval: "
                         "the save, the wait point and the steps the background write ran beside) less every x "
                         "the run's median step; null when that window is not all inside the measured steps",
        "2% target": "within the async run (a separate none run on a shared machine differs by more than the "
                     "cost), with one round: window_cost_s where a steady checkpoint has a whole window, else "
                     "cost/ckpt, divided by every x the mean plain step; with rounds: see overhead_pct",
        "blocked_share_pct": "sum of the stalls / the sum of the measured step times of the same run, in %: the "
                             "part of overhead_pct that checkpointing itself costs, less sensitive to machine noise",
        "modes": "none: no checkpoint; sync/async: the harness (async: save(overlap=True), the trainer's default); "
                 "dcp: dcp.async_save at its defaults; dcp_best: dcp.async_save with "
                 "DefaultStager(StagingOptions()) (on CPU without pinning and with blocking copies, what it allows)",
        "checkpoint_bytes": "bytes of the files of the newest committed checkpoint folder",
        "state_bytes": "unique tensor storage of model + optimizer state",
        "recovery": "a new `python -m harness train` process on the same checkpoint folder with max_steps = "
                    "steps + 1: restore_s = its 'resume' event's seconds (restore into model/optimizer), "
                    "time_to_first_step_s = its first step record's time - the time just before it was spawned "
                    "(interpreter + imports + setup + restore + one step)"}}

    print()
    print(f"train overhead: {env['workload']} on {env['device_name']} ({args.device}), {args.steps} steps, "
          f"checkpoint every {args.every} steps, first {args.warmup} steps excluded from median/mean"
          + (f", {args.rounds} interleaved rounds (medians)" if args.rounds > 1 else ""))
    print(table(rows))
    if args.rounds > 1:
        none = next((r for r in rows if r["mode"] == "none"), None)
        for r in rows:
            if r["mode"] != "none" and r.get("rounds"):
                skew = excess_skew(r, none)
                r["excess_skew_pct_rounds"] = skew
                r["excess_skew_pct"] = statistics.median(skew) if skew else None
                print(f"{r['mode']}: overhead vs the same round's none run, per round: "
                      + ", ".join(_f(x["overhead_pct"], "+.1f") + "%" for x in r["rounds"])
                      + f"; median {_f(r['overhead_pct'], '+.1f')}%"
                      + ("; within-run (mean/median step, less the none run's), per round: "
                         + ", ".join(f"{x:+.2f}%" for x in skew) + f"; median {r['excess_skew_pct']:+.2f}%"
                         if skew else ""))
    result["targets"] = targets(rows, args.device)
    print()
    print(targets_text(result["targets"]))
    write_results(out, f"train_overhead_{args.device}", stamp, result, lambda png: plot(rows, env, png))
    if "png_skipped" in result:
        log(f"no chart: {result['png_skipped']}")
    print(f"\nwrote {out / f'train_overhead_{args.device}_{stamp}.json'} (and _latest) in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
