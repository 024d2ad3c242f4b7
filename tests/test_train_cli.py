"""`python -m harness train` as a single process: bad configuration fails fast with one line and a
documented exit code; a good one runs to completion."""

from __future__ import annotations

import subprocess
import time

import pytest

from trainer_helpers import (CONFIG, MAX_STEPS, Runner, base_env, committed_steps, events, final_state,
                             standalone_cmd)


@pytest.fixture
def runner(tmp_path):
    r = Runner(tmp_path)
    yield r
    r.close()


def test_config_errors_fail_fast_with_one_line(tmp_path):
    """Unknown key, bad value, bad type, a checkpoint dir under a regular file, a missing config file: each
    prints one line on stderr (no traceback) and exits 2 (config) or 3 (checkpoint dir), before training
    starts (no metrics, no checkpoint folder). The cases run concurrently to save time."""
    (tmp_path / "afile").write_text("not a folder")
    cases = {
        "unknown-key": (["train.max_stepz=5"], CONFIG, 2, "unknown config key 'train.max_stepz'"),
        "bad-value": (["train.max_steps=-1"], CONFIG, 2, "train.max_steps must be > 0"),
        "bad-type": (["checkpoint.every_steps='ten'"], CONFIG, 2, "checkpoint.every_steps must be int"),
        "ckpt-dir-under-file": ([f"checkpoint.dir={tmp_path / 'afile' / 'ck'}"], CONFIG, 3, "not writable"),
        "missing-config": ([], str(tmp_path / "nope.toml"), 2, "config file not found"),
    }
    procs = {}
    for name, (sets, config, _, _) in cases.items():
        out = tmp_path / name
        out.mkdir()
        procs[name] = (out, subprocess.Popen(standalone_cmd(out, *sets, config=config), env=base_env(),
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    t0 = time.monotonic()
    for name, (out, proc) in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            pytest.fail(f"{name}: still running after 60 s")
        _, _, code, text = cases[name]
        lines = stderr.strip().splitlines()
        assert proc.returncode == code, f"{name}: exit {proc.returncode}, stderr:\n{stderr}"
        assert len(lines) == 1 and "Traceback" not in stderr, f"{name}: stderr is not one line:\n{stderr}"
        prefix = "harness: config error: " if code == 2 else "harness: checkpoint error: "
        assert lines[0].startswith(prefix) and text in lines[0], f"{name}: {lines[0]}"
        assert not (out / "metrics.jsonl").exists(), f"{name}: training started"
        assert not (out / "ck").exists(), f"{name}: checkpoint folder created"
    print(f"5 config-error processes: {time.monotonic() - t0:.1f} s")


def test_standalone_quickstart_runs_to_completion(runner, tmp_path):
    """`python -m harness train --config configs/quickstart.toml --set ...` without torchrun: one process
    (world size 1) trains to max_steps, commits its final checkpoint and exits 0."""
    proc = runner.run("standalone", standalone_cmd(tmp_path))
    assert proc.rc == 0, proc.tail()
    assert committed_steps(tmp_path / "ck")[-1] == MAX_STEPS
    assert [e["step"] for e in events(tmp_path, "done")] == [MAX_STEPS]
    final = final_state(tmp_path / "ck")
    assert final.raw["world_size"] == 1 and final.raw["step"] == MAX_STEPS
