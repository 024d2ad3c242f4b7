"""A disk that fills up, or a folder that cannot be written, as a user meets it: the kernel's own errors
(``/dev/full`` answers every write with ENOSPC; ``RLIMIT_FSIZE`` makes the kernel refuse a file past a size
with EFBIG, short write first), no injected exception. The error says what happened, in one line, with the
documented exit code; nothing committed is lost; the metrics file is a record, never a reason to stop."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap

import pytest

from harness.errors import StorageError
from harness.progress import MetricsLog
from harness.storage import Storage
from trainer_helpers import (SLOW, assert_same_final, base_env, committed_steps, kill_tree, launch_cmd,
                             resumed_from, torchrun_cmd, wait_until, worker_exit_codes)

needs_dev_full = pytest.mark.skipif(not os.access("/dev/full", os.W_OK), reason="no writable /dev/full")


def limited(cmd: list[str], max_file_bytes: int) -> list[str]:
    """``cmd`` in a process tree whose files cannot grow past ``max_file_bytes`` (``ulimit -f``; Python ignores
    SIGXFSZ, so a write past it returns EFBIG, as a full disk returns ENOSPC)."""
    wrap = ("import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]),) * 2); "
            "os.execv(sys.argv[2], sys.argv[2:])")
    return [sys.executable, "-c", wrap, str(max_file_bytes), *cmd]


@needs_dev_full
def test_a_full_disk_is_the_writes_error_not_one_from_closing_its_buffer(tmp_path):
    """The O_DIRECT writer's aligned block was still viewed by the failed write's traceback when the file was
    closed: ``mmap.close`` raised BufferError ("cannot close exported pointers exist") over the ENOSPC, and
    the user read that instead of "No space left on device"."""
    (tmp_path / "data.bin").symlink_to("/dev/full")
    storage = Storage(str(tmp_path))
    with pytest.raises(OSError) as err:
        with storage.open_write("data.bin") as f:
            f.write(bytes((4 << 20) + 10))  # more than a block: written before the file is finished
    assert err.value.errno == errno.ENOSPC, repr(err.value)


def test_a_save_that_fills_the_disk_exits_3_naming_it_and_a_rerun_resumes(runner, tmp_path, ref):
    """README's command, killed past its first checkpoint, started again where a data file cannot be written
    (the disk is full for it): one line naming the kernel's error, exit 3 (needs a human), no restart, the
    checkpoints committed before untouched. With space again, the same command resumes from them and ends
    bit for bit where an uninterrupted run ends."""
    first = runner.start("first", launch_cmd(tmp_path, SLOW))
    wait_until("a committed checkpoint", lambda: committed_steps(tmp_path / "ck"), [first], timeout=120)
    kill_tree(first)
    first.wait()
    before = committed_steps(tmp_path / "ck")
    # 128 KiB: the logs, manifests and lease fit; the replicated data file (~270 KB) does not
    full = runner.run("full", limited(launch_cmd(tmp_path, max_restarts=3), 128 << 10))
    log = full.log()
    assert full.rc == 3, full.tail()
    assert log.count("harness: checkpoint error: ") == 1, log[-3000:]
    line = next(s for s in log.splitlines() if s.startswith("harness: checkpoint error: "))
    assert "was not committed" in line and "File too large" in line, line
    assert "BufferError" not in log and "Traceback" not in log, log[-3000:]
    assert "will restart worker group" not in log, log[-3000:]
    assert resumed_from(log) == [before[-1]] * 2, log[-3000:]
    assert committed_steps(tmp_path / "ck") == before
    again = runner.run("again", launch_cmd(tmp_path))
    assert again.rc == 0, again.tail()
    assert resumed_from(again.log()) == [before[-1]] * 2
    assert_same_final(tmp_path, ref)


def test_an_output_folder_that_cannot_be_made_exits_3_before_any_worker_starts(tmp_path):
    """run.output_dir (metrics.jsonl's folder) under a file: the launcher says so in one line and exits 3
    before any worker (it was a traceback in rank 0, a lost peer in rank 1 and 3 restarts, exit 1)."""
    (tmp_path / "a-file").write_text("")
    out = subprocess.run(launch_cmd(tmp_path, f"run.output_dir='{tmp_path / 'a-file' / 'out'}'", max_restarts=3),
                         env=base_env(), capture_output=True, text=True, timeout=120)
    err = out.stderr.strip().splitlines()
    assert out.returncode == 3, (out.returncode, out.stderr)
    assert len(err) == 1 and err[0].startswith("harness: checkpoint error: the run's output folder "), err
    assert "run.output_dir" in err[0] and "NotADirectoryError" in err[0], err
    # no worker ran, and the checkpoint folder was not made either (it was left behind, empty)
    assert not (tmp_path / "ck").exists(), os.listdir(tmp_path / "ck")
    assert sorted(os.listdir(tmp_path)) == ["a-file"]


def test_a_checkpoint_dir_that_is_a_file_names_checkpoint_dir_not_run_output_dir(tmp_path):
    """checkpoint.dir = an existing file: metrics.jsonl's folder defaults to it and is checked first, so the
    refusal came from there, naming run.output_dir, a key the user never set."""
    (tmp_path / "a-file").write_text("")
    cmd = launch_cmd(tmp_path, f"checkpoint.dir='{tmp_path / 'a-file'}'")
    at = cmd.index(f"run.output_dir={tmp_path}")
    out = subprocess.run(cmd[:at - 1] + cmd[at + 1:], env=base_env(), capture_output=True, text=True,
                         timeout=120)
    err = out.stderr.strip().splitlines()
    assert out.returncode == 3, (out.returncode, out.stderr)
    assert len(err) == 1 and "checkpoint.dir" in err[0] and "NotADirectoryError" in err[0], err
    assert "run.output_dir is set" in err[0], err  # and how to move metrics.jsonl elsewhere
    # with metrics.jsonl elsewhere, the storage check says the same plainly (it was "File exists")
    out = subprocess.run(cmd, env=base_env(), capture_output=True, text=True, timeout=120)
    err = out.stderr.strip().splitlines()
    assert out.returncode == 3 and len(err) == 1, (out.returncode, out.stderr)
    assert err[0].endswith(f"is not writable: NotADirectoryError: {tmp_path / 'a-file'} is a file, not a folder")


def test_an_output_folder_that_cannot_be_made_is_a_storage_error_in_the_worker_too(tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(StorageError, match="output folder .* is not writable: NotADirectoryError"):
        MetricsLog(str(tmp_path / "a-file" / "out" / "metrics.jsonl"))


@needs_dev_full
def test_metrics_on_a_full_disk_are_dropped_with_one_warning_and_training_goes_on(tmp_path, caplog):
    (tmp_path / "metrics.jsonl").symlink_to("/dev/full")
    m = MetricsLog(str(tmp_path / "metrics.jsonl"))
    for step in range(3):
        m.write({"event": "log", "step": step})  # no exception: the run goes on
    warned = [r.getMessage() for r in caplog.records if "metrics" in r.getMessage()]
    assert len(warned) == 1 and "No space left on device" in warned[0], warned
    assert m.dropped == 3


METRICS_SCRIPT = textwrap.dedent("""
    import json, logging, resource, sys
    from harness.progress import MetricsLog
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    path, limit = sys.argv[1], int(sys.argv[2])
    m = MetricsLog(path)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    for step in range(10):
        m.write({"event": "log", "step": step, "pad": "x" * 100})
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    m.write({"event": "log", "step": 10})
""")


def test_a_metrics_record_cut_short_by_the_disk_leaves_no_half_line(tmp_path):
    """A record the kernel writes only in part (short write at the file-size limit, then EFBIG) is truncated
    away: every line of the file parses, the records that fit are there, and the first record written once
    there is room again says how many were lost."""
    path = tmp_path / "metrics.jsonl"
    out = subprocess.run([sys.executable, "-c", METRICS_SCRIPT, str(path), "500"], env=base_env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in path.read_text().splitlines()]  # a torn line would not parse
    fit = [r["step"] for r in records if r["step"] < 10]
    assert fit and fit == list(range(len(fit))) and len(fit) < 10, fit  # the ones below the limit, whole
    assert path.stat().st_size <= 500 + len(json.dumps(records[-1])) + 1
    assert records[-1]["step"] == 10
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 2 and "File too large" in lines[0], lines
    assert f"{10 - len(fit)} record(s) were dropped" in lines[1], lines


SHORT_WRITE_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import torch
    from harness.storage import Storage, atomic_write
    folder = sys.argv[1]
    resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, resource.RLIM_INFINITY))
    program = torch.jit.script(torch.nn.Linear(64, 64))
    attempts = {
        "atomic_write": lambda: atomic_write(f"{folder}/a.bin", lambda f: f.write(bytes(50_000))),
        "torch.jit.save": lambda: atomic_write(f"{folder}/b.pt", lambda f: torch.jit.save(program, f)),
        "buffered open_write": lambda: Storage(folder, {"harness_direct_io": False}).write_bytes("c.bin",
                                                                                            bytes(50_000)),
    }
    out = {}
    for name, attempt in attempts.items():
        try:
            attempt()
            out[name] = "no error"
        except OSError as exc:
            out[name] = exc.strerror
    print(json.dumps(out))
""")


def test_a_write_the_kernel_cuts_short_raises_and_leaves_no_file(tmp_path):
    """The kernel writes what fits and returns a short count before it refuses (a disk filling up; here the
    file-size limit). Through a raw file that count was ignored (``torch.jit.save`` ignores it): the temp file
    was fsync'd and renamed into place cut short, and ``harness ckpt export --format torchscript`` said
    'exported' over a corrupt file. Now every such write raises, and an atomic one leaves nothing."""
    out = subprocess.run([sys.executable, "-c", SHORT_WRITE_SCRIPT, str(tmp_path)], env=base_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {k: "File too large" for k in
                                      ("atomic_write", "torch.jit.save", "buffered open_write")}
    # the atomic files are absent (a checkpoint's data file, c.bin, counts only once a commit record names it)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.bin"], list(tmp_path.iterdir())


@pytest.mark.parametrize("fmt", ["pt", "torchscript", "safetensors"])
def test_an_export_with_no_room_for_its_file_exits_1_naming_the_file(fmt, tmp_path, ref):
    """``harness ckpt export`` where its file cannot be written whole: one line naming the file and the
    kernel's reason, exit 1, no file and no temp file (pt was torch.save's 'unexpected pos' traceback,
    torchscript a corrupt file and exit 0)."""
    ref.get()
    out_file = tmp_path / f"model.{fmt}"
    cmd = [sys.executable, "-m", "harness", "ckpt", "export", str(ref.tmp / "ck"), "--format", fmt,
           "--out", str(out_file)]
    out = subprocess.run(limited(cmd, 16 << 10), env=base_env(), capture_output=True, text=True, timeout=120)
    err = out.stderr.strip().splitlines()
    assert out.returncode == 1, (out.returncode, out.stdout, out.stderr)
    assert err == [f"harness: error: OSError: [Errno {errno.EFBIG}] cannot write {out_file}: File too large"], err
    assert list(tmp_path.iterdir()) == []
    ok = subprocess.run(cmd, env=base_env(), capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and out_file.stat().st_size > 16 << 10, ok.stderr  # it fits without the limit


def test_under_bare_torchrun_every_rank_fails_on_an_output_folder_that_cannot_be_made(runner, tmp_path):
    """Without the launcher's check, rank 0 finds it: every rank now raises the same error at once (exit 3
    each). Before, rank 0 alone did, and rank 1 sat in its next collective until torchrun SIGKILLed it."""
    (tmp_path / "a-file").write_text("")
    proc = runner.run("torchrun", torchrun_cmd(tmp_path, f"run.output_dir='{tmp_path / 'a-file' / 'out'}'"))
    assert proc.rc == 1, proc.tail()  # torchrun's own code for any failure
    assert worker_exit_codes(proc.log()) == {0: 3, 1: 3}, proc.log()[-3000:]
    assert "harness: checkpoint error: the run's output folder" in proc.log(), proc.log()[-3000:]
