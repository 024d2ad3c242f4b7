"""`harness train` with checkpoint.dir on S3: killed at a step and rerun, it ends bitwise identical to a run
never interrupted. Endpoint and credentials reach the processes only through the standard AWS environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ckpt_helpers import assert_bitwise
from harness.checkpoint.discovery import list_checkpoints
from harness.checkpoint.load import read_state
from harness.storage import Storage
from s3_server import SECRET_KEY

REPO = Path(__file__).resolve().parents[1]
SETS = ["train.max_steps=60", "checkpoint.every_steps=20", "train.log_every=1",
        "checkpoint.storage_options={harness_part_size_mb=0.03125, harness_max_concurrency=4}"]


def _train(url: str, out: Path, fault: str | None = None, wait: bool = True):
    env = {k: v for k, v in os.environ.items() if k != "HARNESS_FAULT"}
    if fault:
        env["HARNESS_FAULT"] = fault
    cmd = [sys.executable, "-m", "harness", "train", "--config", str(REPO / "configs/quickstart.toml"),
           "--set", f"checkpoint.dir={url}", "--set", f"run.output_dir={out}"]
    for s in SETS:
        cmd += ["--set", s]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return _wait(proc) if wait else proc


def _wait(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _final(url: str):
    storage = Storage(url)
    infos = list_checkpoints(storage)
    assert infos and infos[-1].step == 60, [i.name for i in infos]
    manifest, state, ranks = read_state(storage, infos[-1].name)
    return manifest, state, ranks


def test_trainer_killed_and_resumed_on_s3_is_bitwise_exact(s3_server, s3_bucket, tmp_path):
    straight, broken = f"s3://{s3_bucket}/straight", f"s3://{s3_bucket}/broken"
    uninterrupted = _train(straight, tmp_path / "a", wait=False)   # runs meanwhile (2 cores)
    killed = _train(broken, tmp_path / "b", fault="train.step:sigkill:step=30")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert [i.step for i in list_checkpoints(Storage(broken))] == [20]
    resumed = _train(broken, tmp_path / "b")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    events = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "resume" and e.get("step") == 20 for e in events)
    a = _wait(uninterrupted)
    assert a.returncode == 0, a.stderr[-3000:]

    ma, sa, ra = _final(straight)
    mb, sb, rb = _final(broken)
    assert_bitwise(sb, sa)      # model, optimizer, scheduler, extras: byte for byte
    assert_bitwise(rb, ra)      # every rank's RNG states and data position
    assert (ma.loss, ma.epoch, ma.metrics) == (mb.loss, mb.epoch, mb.metrics)
    for proc in (a, killed, resumed):
        assert SECRET_KEY not in proc.stdout + proc.stderr
        # the run's own lines only: botocore's INFO bookkeeping stays out of them (HARNESS_DEBUG=1 shows it)
        assert "Found credentials" not in proc.stderr, proc.stderr[-3000:]
    for key, body in s3_server.all_objects(s3_bucket):   # manifests hold the config, never a credential
        assert SECRET_KEY.encode() not in body, key


def test_aws_library_chatter_shows_with_harness_debug_only(monkeypatch):
    """The quieted libraries keep a level the user set, and HARNESS_DEBUG=1 leaves them all alone."""
    import logging

    from harness.trainer import QUIET_LOGGERS, setup_logging

    saved = {n: logging.getLogger(n).level for n in QUIET_LOGGERS}
    try:
        logging.getLogger("urllib3").setLevel(logging.DEBUG)     # the user's choice
        monkeypatch.delenv("HARNESS_DEBUG", raising=False)
        setup_logging(0)
        assert logging.getLogger("botocore.credentials").getEffectiveLevel() == logging.WARNING
        assert logging.getLogger("urllib3").level == logging.DEBUG
        assert logging.getLogger("harness").getEffectiveLevel() == logging.INFO
        for n in QUIET_LOGGERS:
            logging.getLogger(n).setLevel(logging.NOTSET)
        monkeypatch.setenv("HARNESS_DEBUG", "1")
        setup_logging(0)
        assert logging.getLogger("botocore.credentials").getEffectiveLevel() == logging.INFO
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)
