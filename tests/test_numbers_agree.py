"""The progress line, metrics.jsonl and the checkpoints report the same number (the global mean loss over ranks),
metrics.jsonl sits with the run's checkpoints, the last progress line says the run finished, and the step loop
reads device values only at log and checkpoint steps."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from harness import config
from harness.checkpoint.discovery import list_checkpoints, open_checkpoint
from harness.storage import Storage
from harness.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
QUICK = str(REPO / "configs" / "quickstart.toml")
SETS = ["train.max_steps=40", "train.log_every=10", "checkpoint.every_steps=20", "checkpoint.keep_last=5",
        "checkpoint.keep_best=0", "data.num_samples=1024", "dist.timeout_s=60", "checkpoint.timeout_s=60"]
PROGRESS = re.compile(r"step (\d+)/(\d+) \| loss ([0-9.]+) \| .*")


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _sets(*sets: str) -> list[str]:
    out = []
    for s in [*SETS, *sets]:
        out += ["--set", s]
    return out


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _checkpoint_losses(ck: Path) -> dict[int, float]:
    storage = Storage(str(ck))
    return {i.step: open_checkpoint(storage, i.name).raw["loss"] for i in list_checkpoints(storage)}


def test_two_ranks_report_one_global_loss_beside_their_checkpoints(tmp_path):
    ck = tmp_path / "ck"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "harness",
           "train", "--config", QUICK, *_sets(f"checkpoint.dir={ck}")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]

    metrics_file = ck / "metrics.jsonl"  # default: with the run's checkpoints, not runs/<run.name>/
    assert metrics_file.is_file() and not (tmp_path / "runs").exists()
    records = _metrics(metrics_file)
    logged = {r["step"]: r for r in records if "event" not in r}
    assert sorted(logged) == [10, 20, 30, 40]
    saves = {r["step"]: r["loss"] for r in records if r.get("event") == "save"}
    ckpt = _checkpoint_losses(ck)
    assert sorted(ckpt) == [20, 40]
    for step, loss in ckpt.items():  # the checkpoint's loss is exactly the logged one (both global means)
        assert saves[step] == loss == logged[step]["loss"], (step, saves, logged[step], loss)

    lines = [m for m in (PROGRESS.search(ln) for ln in proc.stderr.splitlines()) if m]
    assert lines, proc.stderr[-2000:]
    for m in lines:  # every progress line shows the logged (global) loss of its step
        assert f"{logged[int(m.group(1))]['loss']:.4f}" == m.group(3), m.group(0)
    last = lines[-1].group(0)
    assert last.startswith("step 40/40") and last.endswith("| finished"), last
    assert "next checkpoint" not in last


def test_runs_with_different_checkpoint_folders_never_share_a_metrics_file(tmp_path):
    for name in ("a", "b"):
        cmd = [sys.executable, "-m", "harness", "train", "--config", QUICK,
               *_sets(f"checkpoint.dir={tmp_path / name}", "train.max_steps=10")]
        proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("a", "b"):  # same run.name ("quickstart"), one file each, one start each
        records = _metrics(tmp_path / name / "metrics.jsonl")
        assert [r["event"] for r in records if r.get("event") in ("start", "resume")] == ["start"]


class CountingTrainer(Trainer):
    """The real trainer, counting the reads of device values (StepStats.reduce: one all-reduce and one copy)."""

    def setup(self) -> None:
        super().setup()
        self.reads: list[int] = []
        reduce = self.stats.reduce

        def counted(*args, **kwargs):
            self.reads.append(self.step)
            return reduce(*args, **kwargs)

        self.stats.reduce = counted

    def train_step(self, batch: tuple) -> torch.Tensor:
        loss = super().train_step(batch)
        assert isinstance(loss, torch.Tensor) and not loss.requires_grad  # left on the device, not read
        return loss


def test_loss_is_read_only_at_log_and_checkpoint_steps(tmp_path):
    cfg = config.load(QUICK, [f"checkpoint.dir={tmp_path / 'ck'}", "train.max_steps=12", "train.log_every=5",
                              "checkpoint.every_steps=4", "checkpoint.keep_best=0", "data.num_samples=1024"])
    trainer = CountingTrainer(cfg)
    assert trainer.run() == 0
    # log steps 5, 10 and the last (12); checkpoint steps 4 and 8 read the loss they save; nothing else
    assert trainer.reads == [4, 5, 8, 10, 12], trainer.reads
    assert trainer.scaler is None  # no AMP on CPU; with bf16 on CUDA there is no scaler either
