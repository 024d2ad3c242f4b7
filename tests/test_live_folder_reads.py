"""The folder of a job that is still training. Reading it: `harness ckpt export/inspect/diff`,
`harness.load_for_inference` and `warm_start` take "the newest checkpoint", and the job's retention may delete
that one while they read it, because it just committed a newer one. Before: the reader walked back to older
checkpoints (next in line for deletion, and on S3 all gone with keep_last=1) and failed ("no valid checkpoint
... deleted while it was read") in most exports of a live S3 run, or (inspect) with a bare FileNotFoundError.
Now it lists the folder again and reads the newer one. Writing into it: `harness ckpt import` is refused while
the job lives."""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from harness import CheckpointManager, load_for_inference
from harness.checkpoint.discovery import list_checkpoints
from harness.checkpoint.select import RELISTS
from harness.ckpt_cli import add_ckpt_parser, run_ckpt
from harness.interop.inspection import diff_checkpoints, inspect_checkpoint
from harness.storage import Storage
from trainer_helpers import CONFIG, REPO, Runner, base_env, kill_tree, wait_until

GONE = "deleted while it was read (the retention of the job writing this folder)"


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="harness")
    sub = parser.add_subparsers(dest="command", required=True)
    add_ckpt_parser(sub)
    return run_ckpt(parser.parse_args([str(a) for a in argv]))


def linear(seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(3, 3)


class LiveJob:
    """Stands in for the training job: at the ``nth`` read of the newest checkpoint's commit record by the
    reader (1: while listing candidates, 2: inside the load), it commits the next step and its retention
    (keep_last=1) deletes everything older. ``times`` bounds how often it does so."""

    def __init__(self, url: str, nth: int, times: int = 1):
        self.url, self.nth, self.times = url, nth, times
        self.step = 3
        self.reads: collections.Counter = collections.Counter()
        mgr = CheckpointManager(url, keep_last=1)
        for step in (1, 2, 3):  # keep_last=1: only step 3 is left
            mgr.save(step, models=linear(step))
        mgr.close()

    def __call__(self, point: str, info: dict) -> None:
        if point != "discovery.read_commit" or self.times == 0 or info["name"] != f"step-{self.step:09d}":
            return
        self.reads[info["name"]] += 1
        if self.reads[info["name"]] == self.nth:
            self.times -= 1
            self.step += 1
            mgr = CheckpointManager(self.url, keep_last=1)
            mgr.save(self.step, models=linear(self.step))
            mgr.close()


@pytest.mark.parametrize("nth", [1, 2], ids=["gone-at-listing", "gone-in-load"])
def test_export_inspect_and_inference_read_the_newer_checkpoint(tmp_path, capsys, nth):
    from harness import faults
    url = str(tmp_path / "ck")
    out = tmp_path / "m.pt"
    job = LiveJob(url, nth)
    faults.install(job)
    assert cli("ckpt", "export", url, "--format", "pt", "--out", out) == 0
    err = capsys.readouterr().err
    assert f"skipped step-000000003: {GONE}" in err, err
    saved = torch.load(out, weights_only=True)
    assert saved["epoch"] == 0 and torch.equal(saved["model_state_dict"]["weight"], linear(4).weight.detach())

    job.times = 1
    assert inspect_checkpoint(url)["checkpoint"] == "step-000000005"
    job.times = 1
    model = load_for_inference(url, nn.Linear(3, 3))
    assert torch.equal(model.weight, linear(6).weight)
    job.times = 1
    assert diff_checkpoints(url, url)["a"]["checkpoint"] == "step-000000007"
    assert [i.step for i in list_checkpoints(Storage(url))] == [7]


def test_a_job_that_always_wins_the_race_gets_a_plain_error(tmp_path, capsys):
    from harness import faults
    url = str(tmp_path / "ck")
    faults.install(LiveJob(url, nth=2, times=100))
    assert cli("ckpt", "export", url, "--format", "pt", "--out", tmp_path / "m.pt") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"harness: error: no checkpoint in {url} could be read before "
                                                   "the job writing it deleted it (step-000000003, "), err
    assert f"step-{3 + RELISTS:09d}, each in turn)" in err and "checkpoint.keep_last" in err, err
    assert not (tmp_path / "m.pt").exists()


def test_an_explicit_step_deleted_while_read_is_not_replaced_by_another(tmp_path, capsys):
    from harness import faults
    url = str(tmp_path / "ck")
    faults.install(LiveJob(url, nth=2))
    assert cli("ckpt", "export", url, "--step", "3", "--format", "pt", "--out", tmp_path / "m.pt") == 1
    err = capsys.readouterr().err
    assert err == f"harness: error: checkpoint step-000000003 in {url} was {GONE}\n", err
    assert not (tmp_path / "m.pt").exists()


# -- at the boundary: a real `harness train` and real `harness ckpt` processes ---------------------------

@pytest.mark.parametrize("where", ["local", "s3"])
def test_ckpt_commands_beside_a_live_training_job(tmp_path, request, where):
    """A training job saving every 2 steps with keep_last=1, and `harness ckpt export` and `inspect`
    processes that stall 1.5 s between listing the folder and reading what they listed (the fault seam's
    sleep at the first commit-record read), long enough for the job to commit newer checkpoints and delete
    the listed one. Both exit 0 with the newer checkpoint; the job is not disturbed."""
    url = f"{request.getfixturevalue('s3_url')}/live" if where == "s3" else str(tmp_path / "ck")
    runner = Runner(tmp_path)
    try:
        job = runner.start("train", [sys.executable, "-m", "harness", "train", "--config", CONFIG,
                                     "--set", f"checkpoint.dir={url}", "--set", f"run.output_dir={tmp_path}",
                                     "--set", "train.max_steps=100000", "--set", "checkpoint.every_steps=2",
                                     "--set", "checkpoint.keep_last=1", "--set", "checkpoint.keep_best=0",
                                     "--set", "train.step_sleep_s=0.01"])
        storage = Storage(url)
        wait_until("two checkpoints", lambda: (list_checkpoints(storage) or [None])[-1] is not None
                   and list_checkpoints(storage)[-1].step >= 4, [job])
        env = base_env(HARNESS_FAULT="discovery.read_commit:sleep=1.5")
        export = subprocess.run([sys.executable, "-m", "harness", "ckpt", "export", url, "--format", "pt",
                                 "--out", str(tmp_path / "m.pt")], cwd=REPO, env=env, capture_output=True,
                                text=True, timeout=120)
        listed = [line for line in export.stderr.splitlines() if GONE in line]
        assert export.returncode == 0 and len(listed) >= 1, export.stderr[-3000:]
        skipped_step = int(listed[0].split("step-")[1][:9])
        exported = torch.load(tmp_path / "m.pt", weights_only=True)
        assert exported["step"] > skipped_step, (exported["step"], skipped_step)
        inspect = subprocess.run([sys.executable, "-m", "harness", "ckpt", "inspect", url, "--json"], cwd=REPO,
                                 env=env, capture_output=True, text=True, timeout=120)
        assert inspect.returncode == 0, inspect.stderr[-3000:]
        shown = json.loads(inspect.stdout)
        assert shown["skipped"] and all(r == GONE for _, r in shown["skipped"]), shown["skipped"]
        assert shown["step"] > max(int(n.split("-")[1]) for n, _ in shown["skipped"])
        assert job.poll() is None, job.tail()
        kill_tree(job, sig=15)
        assert job.wait() in (143, 0), job.tail()
    finally:
        runner.close()


def test_import_into_a_live_jobs_folder_is_refused_until_it_stops(tmp_path):
    """`harness ckpt import FILE DIR --step N` into the folder of a job that is training wrote there: the job's
    retention then counted the import among its newest (keep_last=3 kept two of its own) and a restart resumed
    from the import, not from the job's own progress. Now: exit 3, one line naming the job, nothing written
    (--dry-run says the same); once the job has stopped, the import goes in."""
    ck = tmp_path / "ck"
    runner = Runner(tmp_path)
    env = base_env()
    try:
        job = runner.start("train", [sys.executable, "-m", "harness", "train", "--config", CONFIG,
                                     "--set", f"checkpoint.dir={ck}", "--set", f"run.output_dir={tmp_path}",
                                     "--set", "train.max_steps=100000", "--set", "checkpoint.every_steps=5",
                                     "--set", "train.step_sleep_s=0.01"])
        wait_until("a checkpoint", lambda: list_checkpoints(Storage(str(ck))), [job])

        def harness_cli(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "harness", *map(str, args)], cwd=REPO, env=env,
                                  capture_output=True, text=True, timeout=120)
        exported = harness_cli("ckpt", "export", ck, "--format", "pt", "--out", tmp_path / "src.pt")
        assert exported.returncode == 0, exported.stderr[-3000:]
        for dry in ([], ["--dry-run"]):
            refused = harness_cli("ckpt", "import", tmp_path / "src.pt", ck, "--step", 10**7, "--config", CONFIG,
                                  *dry)
            assert refused.returncode == 3 and refused.stdout == "", (refused.returncode, refused.stderr[-3000:])
            assert refused.stderr.count("\n") == 1 and refused.stderr.startswith(
                f"harness: checkpoint error: {ck} is in use by a live job (run "), refused.stderr
            assert "not importing into it" in refused.stderr
        assert not (ck / "step-010000000").exists()
        assert job.poll() is None, job.tail()
        kill_tree(job, sig=15)
        assert job.wait() == 143, job.tail()
        done = harness_cli("ckpt", "import", tmp_path / "src.pt", ck, "--step", 10**7, "--config", CONFIG)
        assert done.returncode == 0 and "as step-010000000" in done.stdout, done.stderr[-3000:]
    finally:
        runner.close()


def test_list_beside_a_live_job_says_deleted_not_damaged(tmp_path, capsys):
    """`harness ckpt list` lists the folder, reads the commit records, then quick-checks each checkpoint; the
    job's retention may delete one in between. Its status said "manifest.json is missing", as if damaged."""
    import shutil

    from harness import faults
    ck = tmp_path / "ck"
    mgr = CheckpointManager(str(ck), keep_last=0)
    for step in (1, 2, 3):
        mgr.save(step, models=linear(step))
    mgr.close()

    def retention_elsewhere(point, info):  # step 1's record is read (oldest first): then the job deletes it
        if point == "discovery.read_commit" and info["name"] == "step-000000003" and (ck / "step-000000001").exists():
            shutil.rmtree(ck / "step-000000001")
    faults.install(retention_elsewhere)
    assert cli("ckpt", "list", ck, "--json") == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["step-000000001"]["status"] == GONE and not rows["step-000000001"]["valid"]
    assert [rows[f"step-00000000{s}"]["status"] for s in (2, 3)] == ["valid", "valid"]

