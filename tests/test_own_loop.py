"""examples/own_loop.py is a model to copy: interrupted at 150 and rerun to 300 it ends bit for bit where a
run straight to 300 ends, and says where it resumed. README shows that very file. CheckpointManager in a
process torchrun launched without a process group refuses in one line instead of writing as a world of one."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ckpt_helpers import assert_bitwise
from harness import CheckpointManager
from harness.checkpoint.discovery import list_checkpoints
from harness.checkpoint.load import read_state
from harness.errors import ConfigError
from harness.storage import Storage

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "own_loop.py"


def _start(steps: int, ckdir: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "HARNESS_FAULT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, str(EXAMPLE), str(steps), str(ckdir)], cwd=ckdir.parent, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> str:
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out[-3000:]
    return out


def _final(ckdir: Path):
    storage = Storage(str(ckdir))
    name = list_checkpoints(storage)[-1].name
    manifest, state, ranks = read_state(storage, name, ranks=None)
    return name, manifest, state, ranks


def test_interrupted_run_ends_bitwise_equal_to_a_straight_one(tmp_path):
    straight = _start(300, tmp_path / "straight")  # runs meanwhile
    first = _finish(_start(150, tmp_path / "broken"))
    assert "resumed" not in first and "done at step 150" in first
    second = _finish(_start(300, tmp_path / "broken"))
    assert re.search(r"^resumed from step-000000150 at step 150$", second, re.M), second
    assert "done at step 300" in second
    _finish(straight)

    name_a, man_a, state_a, ranks_a = _final(tmp_path / "straight")
    name_b, man_b, state_b, ranks_b = _final(tmp_path / "broken")
    assert name_a == name_b == "step-000000300"
    assert_bitwise(state_b, state_a)   # model, optimizer, scheduler: raw bytes of every tensor
    assert_bitwise(ranks_b, ranks_a)   # RNG states and the data generator's state (the position)
    assert (man_a.loss, man_a.epoch) == (man_b.loss, man_b.epoch)
    sums = lambda m: sorted((t["key"], t["checksum"]) for t in m.raw["tensors"])  # noqa: E731
    assert sums(man_a) == sums(man_b)


def test_readme_shows_the_example_file():
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert EXAMPLE.read_text() in blocks, "README's own-loop snippet differs from examples/own_loop.py"


def test_manager_under_torchrun_without_process_group_refuses(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ConfigError) as err:
        CheckpointManager(str(tmp_path / "ck"))
    msg = str(err.value)
    assert "\n" not in msg and "torch.distributed.init_process_group(" in msg and "WORLD_SIZE=2" in msg
    assert not (tmp_path / "ck").exists()  # refused before touching the folder
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process (or torchrun --nproc-per-node 1) is fine
    CheckpointManager(str(tmp_path / "ck")).close()
