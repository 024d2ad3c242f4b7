"""`python -m harness train` as a single process: bad configuration fails fast with one line and a
documented exit code; a good one runs to completion."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from trainer_helpers import (CONFIG, EVERY, MAX_STEPS, RUN_TIMEOUT, base_env, committed_steps, events,
                             final_state, harness_args, metrics, standalone_cmd)


def test_config_errors_fail_fast_with_one_line(tmp_path):
    """Unknown key, bad value, bad type, a checkpoint dir under a regular file, a missing config file, one that
    is not UTF-8 or is a folder (tracebacks before), one with a byte-order mark (read past it): each
    prints one line on stderr (no traceback) and exits 2 (config) or 3 (checkpoint dir), before training
    starts (no metrics, no checkpoint folder). The cases run concurrently to save time."""
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "latin1.toml").write_bytes('[run]\nname = "café"\n'.encode("latin-1"))
    (tmp_path / "a-folder.toml").mkdir()
    (tmp_path / "bom.toml").write_bytes(b"\xef\xbb\xbf[optim]\nlr = -1.0\n")  # read past the BOM
    cases = {
        "unknown-key": (["train.max_stepz=5"], CONFIG, 2, "unknown config key 'train.max_stepz'"),
        "bad-value": (["train.max_steps=-1"], CONFIG, 2, "train.max_steps must be > 0"),
        "bad-type": (["checkpoint.every_steps='ten'"], CONFIG, 2, "checkpoint.every_steps must be int"),
        "ckpt-dir-under-file": ([f"checkpoint.dir={tmp_path / 'afile' / 'ck'}"], CONFIG, 3, "not writable"),
        "missing-config": ([], str(tmp_path / "nope.toml"), 2, "config file not found"),
        "nccl-on-cpu": (["dist.backend='nccl'"], CONFIG, 2, "dist.backend = 'nccl'"),
        "not-utf8": ([], str(tmp_path / "latin1.toml"), 2, "not UTF-8 text (TOML files are UTF-8): byte 0xe9"),
        "a-folder": ([], str(tmp_path / "a-folder.toml"), 2, "cannot be read: Is a directory"),
        "bom": ([], str(tmp_path / "bom.toml"), 2, "optim.lr must be > 0"),
        "nan": (["optim.lr=nan"], CONFIG, 2, "optim.lr must be a finite number, got nan"),
        "ms-timeout": (["dist.timeout_s=0.5"], CONFIG, 2, "dist.timeout_s is in seconds and must be >= 1"),
        # the manager refuses an empty best_metric: it must be a config error, not a worker's ValueError
        "empty-metric": (["checkpoint.best_metric=''"], CONFIG, 2, "checkpoint.best_metric is empty"),
        # one slash: it trained into a local folder named "s3:" in the working directory, exit 0
        "half-url": (["checkpoint.dir='s3:/bucket/run'"], CONFIG, 2, "did you mean 's3://bucket/run'?"),
        # two: it trained to keys under an empty folder name, which s3://bucket/run does not list, exit 0
        "empty-folder": (["checkpoint.dir='s3://bucket//run'"], CONFIG, 2, "did you mean 's3://bucket/run'?"),
    }
    procs = {}
    for name, (sets, config, _, _) in cases.items():
        out = tmp_path / name
        out.mkdir()
        procs[name] = (out, subprocess.Popen(standalone_cmd(out, *sets, config=config), env=base_env(), cwd=out,
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    t0 = time.monotonic()
    for name, (out, proc) in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            pytest.fail(f"{name}: still running after 120 s")
        _, _, code, text = cases[name]
        lines = stderr.strip().splitlines()
        assert proc.returncode == code, f"{name}: exit {proc.returncode}, stderr:\n{stderr}"
        assert len(lines) == 1 and "Traceback" not in stderr, f"{name}: stderr is not one line:\n{stderr}"
        prefix = "harness: config error: " if code == 2 else "harness: checkpoint error: "
        assert lines[0].startswith(prefix) and text in lines[0], f"{name}: {lines[0]}"
        assert not (out / "metrics.jsonl").exists(), f"{name}: training started"
        assert not (out / "ck").exists(), f"{name}: checkpoint folder created"
        assert sorted(p.name for p in out.iterdir()) == [], f"{name}: wrote {list(out.iterdir())}"
    print(f"{len(cases)} config-error processes: {time.monotonic() - t0:.1f} s")


def test_standalone_quickstart_runs_to_completion(runner, tmp_path):
    """`python -m harness train --config configs/quickstart.toml --set ...` without torchrun: one process
    (world size 1) trains to max_steps, commits its final checkpoint and exits 0."""
    proc = runner.run("standalone", standalone_cmd(tmp_path))
    assert proc.rc == 0, proc.tail()
    assert committed_steps(tmp_path / "ck")[-1] == MAX_STEPS
    assert [e["step"] for e in events(tmp_path, "done")] == [MAX_STEPS]
    final = final_state(tmp_path / "ck")
    assert final.raw["world_size"] == 1 and final.raw["step"] == MAX_STEPS
    assert "INFO training on cpu: 1 rank(s), ddp, 0.02M parameters, amp off\n" in proc.log(), proc.tail()


def test_a_diverged_run_says_so_and_its_records_stay_strict_json(runner, tmp_path):
    """optim.lr = 1e8: the loss is nan from the first log step. The run said nothing (a progress line "loss nan"),
    metrics.jsonl held bare NaN (refused by jq and JavaScript, line by line) and `ckpt list` showed the loss as
    "-", as if none was recorded. Now: one warning, null in metrics.jsonl, "nan" in the listing."""
    import json
    proc = runner.run("diverged", standalone_cmd(tmp_path, "optim.lr=1e8", f"train.max_steps={EVERY}"))
    assert proc.rc == 0, proc.tail()
    assert proc.log().count("training has diverged") == 1, proc.tail()

    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=refuse) for line in lines]
    assert any("loss" in r and r["loss"] is None for r in records), records
    listing = subprocess.run([sys.executable, "-m", "harness", "ckpt", "list", str(tmp_path / "ck"), "--json"],
                             env=base_env(), capture_output=True, text=True, timeout=60)
    assert {row["loss"] for row in json.loads(listing.stdout)} == {"nan"}, listing.stdout


def test_a_gpu_config_on_a_machine_without_one_says_where_it_trains(runner, tmp_path):
    """train.device = "auto" and train.amp on a CPU-only machine: it trains on the CPU, without autocast, and
    the first line says so (it was silent: a GPU config crawled on the CPU without a word)."""
    proc = runner.run("auto", standalone_cmd(tmp_path, "train.device='auto'", "train.amp=true",
                                             f"train.max_steps={EVERY}"))
    assert proc.rc == 0, proc.tail()
    assert "INFO training on cpu: 1 rank(s), ddp, 0.02M parameters, amp off (train.amp is for CUDA)" in proc.log()


def test_a_learning_rate_changed_for_a_resumed_run_is_warned_not_silently_ignored(runner, tmp_path):
    """torch's load_state_dict gives the optimizer and schedule their saved values, so an optim.lr changed
    between runs has no effect on a resumed one: rank 0 says so (the schedule in metrics.jsonl is the
    checkpoint's); the same lr resumes without the warning."""
    first = runner.run("first", standalone_cmd(tmp_path, f"train.max_steps={EVERY}"))
    assert first.rc == 0, first.tail()
    same = runner.run("same", standalone_cmd(tmp_path, f"train.max_steps={2 * EVERY}"))
    assert same.rc == 0 and "optim.lr" not in same.log(), same.tail()
    # a longer run under cosine: the schedule's shape is the config's, the LR jumps, and that is said
    assert (f"the LR schedule differs from the checkpoint's (train.max_steps {EVERY} -> {2 * EVERY}): from step "
            f"{EVERY} it follows this config, LR ") in same.log(), same.tail()
    changed = runner.run("changed", standalone_cmd(tmp_path, f"train.max_steps={3 * EVERY}", "optim.lr=0.5"))
    assert changed.rc == 0, changed.tail()
    assert "optim.lr = 0.5 in the config, 0.003 in the checkpoint: the checkpoint's schedule continues" in \
        changed.log(), changed.tail()
    lrs = [r["lr"] for r in metrics(tmp_path) if "lr" in r and r["step"] > 2 * EVERY]
    assert lrs and max(lrs) <= 0.003, lrs
    # lowered below the checkpoint's step: no schedule to speak of (it warned about LRs no step would use)
    past = runner.run("past", standalone_cmd(tmp_path, f"train.max_steps={EVERY}", "optim.lr=0.5"))
    assert past.rc == 0, past.tail()
    assert (f"the checkpoint is at step {3 * EVERY}, past train.max_steps = {EVERY}: nothing left to train"
            in past.log()) and "LR schedule differs" not in past.log(), past.tail()


def _positions(ck) -> list[dict]:
    return [r["position"] for r in final_state(ck).ranks]


def test_data_that_changed_since_the_checkpoint_carries_the_epochs_progress_over(runner, tmp_path):
    """A dataset whose length changed between runs (a user's data grew, or data.num_samples was edited) used to
    end every start with a ValueError (position past the epoch) and 3 restarts. Now the epoch's progress
    carries over, rescaled, with a warning: 800 of 3200 samples becomes 400 of 1600. An older checkpoint
    (no dataset_len recorded) of larger data skips the epoch's rest with a warning; a position no sampler
    wrote is the checkpoint's fault: one line, exit 3."""
    from ckpt_helpers import read_manifest, write_manifest

    ck = tmp_path / "ck"
    first = runner.run("first", standalone_cmd(tmp_path, f"train.max_steps={EVERY}"))
    assert first.rc == 0, first.tail()
    assert _positions(ck) == [{"epoch": 0, "position": EVERY * 32, "dataset_len": 3200}]
    smaller = runner.run("smaller", standalone_cmd(tmp_path, "data.num_samples=1600", f"train.max_steps={EVERY + 1}"))
    assert smaller.rc == 0, smaller.tail()
    assert "the data changed since the checkpoint (3200 samples then, 1600 now): data position rescaled" in \
        smaller.log(), smaller.tail()
    assert _positions(ck) == [{"epoch": 0, "position": 400 + 32, "dataset_len": 1600}]

    name = final_state(ck).name
    manifest = read_manifest(str(ck), name)
    manifest["ranks"][0]["position"] = {"epoch": 0, "position": 1500}   # as written before dataset_len
    write_manifest(str(ck), name, manifest)
    older = runner.run("older", standalone_cmd(tmp_path, "data.num_samples=640", f"train.max_steps={EVERY + 2}"))
    assert older.rc == 0, older.tail()
    assert "data position 1500 is past this data's epoch (640 samples per rank" in older.log(), older.tail()
    assert _positions(ck) == [{"epoch": 1, "position": 32, "dataset_len": 640}]  # the next epoch's first batch

    name = final_state(ck).name
    manifest = read_manifest(str(ck), name)
    manifest["ranks"][0]["position"] = {"epoch": 0, "position": "ten"}
    write_manifest(str(ck), name, manifest)
    hostile = runner.run("hostile", standalone_cmd(tmp_path, f"train.max_steps={EVERY + 3}"))
    assert hostile.rc == 3, hostile.tail()
    assert f"harness: checkpoint error: {name}: unusable data position" in hostile.log(), hostile.tail()
    assert "Traceback" not in hostile.log(), hostile.tail()


def test_signals_after_the_run_finished_do_not_change_its_exit_code(runner, tmp_path):
    """A finished run's exit code is decided: SIGTERM sent over and over from the moment it logs "training
    finished" until it has exited (a scheduler repeating itself) leaves it 0, not death by SIGTERM (the
    trainer gives back the default handler on its way out; the process then still runs atexit hooks and
    flushes files)."""
    proc = runner.start("standalone", standalone_cmd(tmp_path))
    deadline = time.monotonic() + RUN_TIMEOUT
    while "training finished at step" not in proc.log() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    sent = 0
    while proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
            sent += 1
        time.sleep(0.003)
    assert proc.wait() == 0, (sent, proc.tail())
    assert sent, "the run ended before it could be signalled"
    assert [e["step"] for e in events(tmp_path, "done")] == [MAX_STEPS]


def test_version():
    from harness._version import __version__
    out = subprocess.run([sys.executable, "-m", "harness", "--version"], capture_output=True, text=True,
                         env=base_env(), timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"harness {__version__}", out


def test_closed_pipe_ends_quietly_with_141(tmp_path):
    """`harness ckpt inspect DIR | head -1`: the reader goes away, the command ends without a word on stderr and
    with 141 (128+SIGPIPE), as `git log | head` does. Here the read end is closed before anything is written."""
    import torch

    from harness.checkpoint import CheckpointManager
    model = torch.nn.Linear(4, 4)
    mgr = CheckpointManager(str(tmp_path / "ck"))
    mgr.save(1, models={"model": model})
    mgr.close()
    cmd = [sys.executable, "-m", "harness", "ckpt", "inspect", str(tmp_path / "ck")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=base_env())
    proc.stdout.close()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 141 and err == b"", (proc.returncode, err.decode())
    # And through a real `| head -1`: the first line comes through, nothing on stderr.
    out = subprocess.run(["bash", "-c", 'set -o pipefail; "$@" | head -1', "-", *cmd], capture_output=True,
                         text=True, env=base_env(), timeout=60)
    assert out.returncode in (0, 141) and len(out.stdout.splitlines()) == 1 and out.stderr == "", out


OOM_AT_RESTORE = """
import sys, torch
from harness import cli, faults
def hook(name, info):
    if name == "restore.apply":
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
faults.install(hook)
sys.exit(cli.main(sys.argv[1:]))
"""


def test_out_of_memory_at_restore_is_retryable_exit_1_with_one_line(tmp_path):
    """An OOM while loading a checkpoint says nothing about the checkpoint: exit 1 (retryable), one line that
    names it, no traceback; not 3 ("checkpoint unusable")."""
    sets = ["train.max_steps=5", "checkpoint.every_steps=5"]
    first = subprocess.run(standalone_cmd(tmp_path, *sets), env=base_env(), capture_output=True, text=True,
                           timeout=120)
    assert first.returncode == 0, first.stderr[-2000:]
    cmd = [sys.executable, "-c", OOM_AT_RESTORE, *standalone_cmd(tmp_path, "train.max_steps=10")[3:]]
    out = subprocess.run(cmd, env=base_env(), capture_output=True, text=True, timeout=120)
    ours = [line for line in out.stderr.splitlines() if line.startswith("harness:")]
    assert out.returncode == 1, out.stderr[-2000:]
    assert len(ours) == 1 and ours[0].startswith("harness: out of memory (retryable, exit 1): OutOfMemoryError"), ours
    assert "Traceback" not in out.stderr, out.stderr[-2000:]


def test_exit_code_mapping():
    """One meaning per code: config -> 2, checkpoint/storage (lease included) -> 3, resource and communication
    failures and storage out of retries -> 1 even when a CheckpointError wraps them, anything else is not ours
    (traceback, 1)."""
    import torch

    from harness.errors import CheckpointError, ConfigError, StorageError
    from harness.exitcodes import classify
    from harness.lease import LeaseError

    def wrapped(cause):
        try:
            raise CheckpointError("restore failed") from cause
        except CheckpointError as exc:
            return exc

    assert classify(ConfigError("x")).code == 2
    assert classify(StorageError("x")).code == 3 and classify(LeaseError("x")).code == 3
    assert classify(CheckpointError("x")).code == 3
    assert classify(torch.OutOfMemoryError("x")).code == 1
    assert classify(torch.distributed.DistBackendError("x")).code == 1
    assert classify(wrapped(torch.OutOfMemoryError("x"))).code == 1
    if hasattr(torch, "AcceleratorError"):
        assert classify(torch.AcceleratorError("x")).code == 1
    assert classify(ValueError("x")) is None and classify(RuntimeError("x")) is None
    # the storage out of retries (an outage): retryable, also behind the checkpoint error it ended
    from harness.errors import StorageUnavailableError
    out = classify(wrapped(StorageUnavailableError("S3 LIST failed after 7 attempts")))
    assert out.code == 1 and out.line.startswith("harness: storage unreachable (retryable, exit 1): restore failed")


LEAVING_WL = textwrap.dedent("""
    import atexit, os, torch
    from harness.workloads import SyntheticVectors, Workload

    KEPT = []  # files held open to the end, as a user's logger might: only buffered until exit flushes them

    def build(model_cfg, data_cfg, seed):
        out = os.path.join(os.environ["LEAVE_OUT"], "rank" + os.environ.get("RANK", "0"))
        KEPT.append(open(out + ".log", "w"))
        KEPT[0].write("kept open\\n")
        atexit.register(lambda: KEPT.append(open(out + ".atexit", "w")) or KEPT[-1].write("ran"))
        torch.manual_seed(seed)
        return Workload(torch.nn.Linear(4, 2), SyntheticVectors(256, 4, 2, seed), torch.nn.functional.cross_entropy)
""")


def test_finished_workers_leave_with_their_hooks_run_and_files_flushed(tmp_path):
    """A `harness train` worker ends without the interpreter's teardown (harness.dist.leave: a gloo thread
    can abort it, SIGABRT, a finished job exiting -6); what a normal exit does for user code still happens:
    atexit hooks run and a file the workload kept open has its buffered lines on disk. Real `harness launch`,
    2 ranks, exit code 0."""
    (tmp_path / "leaving_wl.py").write_text(LEAVING_WL)
    cmd = [sys.executable, "-m", "harness", "launch", "--nproc-per-node", "2", "--max-restarts", "0",
           *harness_args(tmp_path, "train.entry='leaving_wl:build'", "train.max_steps=3")[1:]]
    env = base_env(LEAVE_OUT=str(tmp_path))
    env["PYTHONPATH"] += os.pathsep + str(tmp_path)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert out.returncode == 0, out.stderr[-3000:]
    for r in (0, 1):
        assert (tmp_path / f"rank{r}.log").read_text() == "kept open\n"
        assert (tmp_path / f"rank{r}.atexit").read_text() == "ran"


KEPT = """
import gc, sys, weakref
from harness import config, trainer
cfg = config.load(sys.argv[1], [f"checkpoint.dir={sys.argv[2]}", "train.max_steps=3", "checkpoint.every_steps=2"])
code = trainer.train(cfg, exit_after=sys.argv[3] == "1")
gc.collect()
print(code, [type(t).__name__ for t in trainer._LEAVING])
"""


@pytest.mark.parametrize("exit_after", [True, False])
def test_a_trainer_that_ends_its_process_is_never_torn_down(tmp_path, exit_after):
    """``train(exit_after=True)`` (what ``harness train`` runs) keeps its trainer, and so its process groups,
    until ``harness.dist.leave`` ends the process without teardown. Dropping it freed the groups, and torch
    2.4's ~ProcessGroupGloo joins gloo's threads holding the GIL one of them needs: finished workers hung
    (seen with torch 2.4.1 in 2 of 13 two-rank runs on a busy machine, py-spy --native: std::thread::join in
    ~ProcessGroupGloo against a worker thread waiting for the GIL in ~AsyncBroadcastWork; 0 in 14 after).
    A library caller's trainer (``exit_after=False``) is released as before."""
    proc = subprocess.run([sys.executable, "-c", KEPT, CONFIG, str(tmp_path / "ck"), "1" if exit_after else "0"],
                          env=base_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[-2] == ("0 ['Trainer']" if exit_after else "0 []"), proc.stdout


def test_a_newer_harness_format_checkpoint_stops_the_job_instead_of_resuming_an_older_one(runner, tmp_path):
    """A harness rolled back under a job (a bad release, an old image on the requeue) found the newest
    checkpoints in a newer format, passed over each with an error line and resumed 200 steps back, writing
    step-000000400-a1 beside the newer step-000000400. `harness launch` now exits 3 with one line naming the
    checkpoint and writes nothing; the newer checkpoints stay."""
    import json

    from trainer_helpers import launch_cmd
    first = runner.run("first", launch_cmd(tmp_path, f"train.max_steps={2 * EVERY}"))
    assert first.rc == 0, first.tail()
    ck = tmp_path / "ck"
    newest = sorted(p for p in os.listdir(ck) if p.startswith("step-"))[-1]
    commit = ck / newest / "COMMIT"
    commit.write_text(json.dumps({**json.loads(commit.read_text()), "format_version": 99}))
    before = sorted(os.listdir(ck))
    again = runner.run("again", launch_cmd(tmp_path, f"train.max_steps={3 * EVERY}"))
    assert again.rc == 3, again.tail()
    lines = [ln for ln in again.log().splitlines() if ln.startswith("harness: ")]
    assert lines == [f"harness: checkpoint error: checkpoint {newest}: commit record was written in format "
                     "version 99 by a newer harness (0.1.0); this harness (0.1.0) reads up to version 1: upgrade "
                     "harness to load it; an older checkpoint is not used in its place, which would undo the "
                     f"training since (to go back to one on purpose, move {newest} out of the folder; export and "
                     "inspect take --step)"], again.tail()
    assert "resumed from" not in again.log() and "is not usable, trying the next one" not in again.log()
    assert sorted(p for p in os.listdir(ck)) == before
