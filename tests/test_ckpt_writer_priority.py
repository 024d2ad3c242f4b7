"""Issue 15: a background save's writers (checksums, writes, fsync) run at idle CPU priority so they only take
what training leaves unused, and a save somebody waits on still finishes promptly, even on saturated CPUs:
the rest of its writing moves to threads at the waiter's priority."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from ckpt_helpers import assert_bitwise
from harness import CheckpointManager
from harness.checkpoint.discovery import list_checkpoints
from harness.checkpoint.load import read_state
from harness.storage import Storage

linux = pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(os, "SCHED_IDLE"),
                           reason="SCHED_IDLE is Linux's")


def _model(width: int = 1024, layers: int = 8) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])  # 32 MB at the defaults


def _priorities(writer, n: int) -> dict[int, str]:
    """Each worker's thread id and the priority it set itself (workers start on the first save, unwaited)."""
    deadline = time.monotonic() + 30
    while len(writer.priorities) < n:
        assert time.monotonic() < deadline, writer.priorities
        time.sleep(0.01)
    return dict(writer.priorities)


def _policy_from_proc(tid: int) -> int:
    """Field 41 of /proc/self/task/TID/stat: the thread's scheduling policy, as the kernel reports it."""
    with open(f"/proc/self/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[38])  # fields after "(comm)" start at field 3


@linux
def test_writers_run_at_idle_priority_and_write_the_same_bytes(tmp_path):
    url = str(tmp_path / "ck")
    model = _model(256, 4)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    mgr = CheckpointManager(url, async_save=True, io_threads=3, max_file_bytes=300_000)  # several data files
    mgr.save(1, models=model, overlap=True)
    mgr.before_mutation()
    mgr.wait()
    writer = mgr._saver.writer
    got = _priorities(writer, 3)
    assert set(got.values()) == {"idle"}
    for tid in got:
        assert os.sched_getscheduler(tid) == os.SCHED_IDLE
        assert _policy_from_proc(tid) == os.SCHED_IDLE
    assert os.sched_getscheduler(threading.get_native_id()) == os.SCHED_OTHER  # the caller (training) is untouched
    mgr.close()
    storage = Storage(url)
    name = list_checkpoints(storage)[-1].name
    assert len([n for n in storage.listdir(name) if n.startswith("data-")]) > 1
    _, state, _ = read_state(storage, name, ranks=None)  # verifies every checksum
    assert_bitwise(state["models"]["model"], want)


def test_nobody_waiting_leaves_the_work_to_the_low_priority_writers(tmp_path):
    mgr = CheckpointManager(str(tmp_path / "ck"), async_save=True)
    mgr._saver._last_save -= 3600  # as if made an hour ago: the save's deadline is 15 minutes away
    mgr.save(1, models=_model(256, 2))
    deadline = time.monotonic() + 60
    while not mgr._saver.pending.done():  # not waited on: no hurry
        assert time.monotonic() < deadline, "the background save never finished"
        time.sleep(0.02)
    assert mgr._saver.writer.steps["normal"] == 0 and mgr._saver.writer.steps["low"] > 0
    mgr.wait()
    assert mgr.last_saved == "step-000000001"
    mgr.close()


@pytest.fixture
def busy_cpus():
    """A CPU-bound process per core, and one more: every core has a normal-priority thread that wants it."""
    n = len(os.sched_getaffinity(0)) + 1 if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2) + 1
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    time.sleep(0.3)
    yield n
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


@linux
def test_a_waited_save_finishes_while_every_cpu_is_busy(tmp_path, busy_cpus):
    url = str(tmp_path / "ck")
    model = _model()  # 32 MB: at idle priority behind busy cores this would crawl
    want = {k: v.clone() for k, v in model.state_dict().items()}
    mgr = CheckpointManager(url, async_save=True)
    t0 = time.perf_counter()
    mgr.save(1, models=model, overlap=True)
    mgr.before_mutation()
    mgr.wait()  # the final save / SIGTERM save / next save: the rest runs at this thread's priority
    took = time.perf_counter() - t0
    writer = mgr._saver.writer
    assert writer.steps["normal"] > 0  # the waiter's threads did (most of) the writing
    assert took < 30, took  # a hang guard: starved idle writers would take far longer
    mgr.save(2, models=model)  # and the next save, waited on by save(), too
    mgr.close()
    storage = Storage(url)
    assert [i.step for i in list_checkpoints(storage)] == [1, 2]
    _, state, _ = read_state(storage, "step-000000001", ranks=None)
    assert_bitwise(state["models"]["model"], want)


@linux
def test_a_save_not_waited_on_leaves_idle_priority_halfway_to_the_next(tmp_path, busy_cpus):
    """No idle CPU at all: the writers would starve until the next save waits. Halfway through the interval
    between saves the rest goes on at normal priority, so it is done before the next save comes."""
    model = _model()
    mgr = CheckpointManager(str(tmp_path / "ck"), async_save=True)
    mgr.save(1, models=model)  # its interval: since the manager was made
    mgr.save(2, models=model)  # waits for save 1 (hurried if still running), then sets its own deadline
    writer = mgr._saver.writer
    before = writer.steps["normal"]
    pending = mgr._saver.pending
    deadline = time.monotonic() + 60
    while not pending.done():  # nobody waits: only the deadline hurries it
        assert time.monotonic() < deadline, "the save never left idle priority"
        time.sleep(0.02)
    pending.result()
    assert writer.steps["normal"] > before
    mgr.close()
    assert [i.step for i in list_checkpoints(Storage(str(tmp_path / "ck")))] == [1, 2]


def test_normal_priority_writers_are_a_choice(tmp_path):
    mgr = CheckpointManager(str(tmp_path / "ck"), async_save=True, writer_priority="normal")
    mgr.save(1, models=_model(64, 1))
    mgr.wait()
    got = _priorities(mgr._saver.writer, 4)  # io_threads' default
    assert set(got.values()) == {"normal"}
    if hasattr(os, "sched_getscheduler"):
        assert all(os.sched_getscheduler(t) == os.SCHED_OTHER for t in got)
    mgr.close()
    with pytest.raises(ValueError, match="writer priority"):
        CheckpointManager(str(tmp_path / "ck2"), async_save=True, writer_priority="low")


@pytest.mark.parametrize("make", [
    lambda: torch.randn(33, 7),
    lambda: torch.randn(5, 6).to(torch.bfloat16),
    lambda: torch.randn(4, dtype=torch.complex64),
    lambda: torch.randn(4, dtype=torch.complex64).conj(),  # lazy conj bit: torch's copy resolves it
    lambda: torch.rand(9) > 0.5,
    lambda: torch.tensor(3.5, dtype=torch.float64),          # 0-dim
    lambda: torch.randn(6, 4).t(),                           # not contiguous
    lambda: torch.empty(0, 3),
], ids=["f32", "bf16", "complex", "conj", "bool", "scalar", "transposed", "empty"])
def test_the_snapshot_host_copy_equals_torch_copy(make):
    """The snapshot copies CPU tensors with one thread (numpy's memcpy) where it can: same values as copy_."""
    from harness.checkpoint.staging import host_copy
    src = make()
    want = torch.empty_like(src, memory_format=torch.contiguous_format).copy_(src)
    dst = torch.empty(src.shape, dtype=src.dtype)
    host_copy(dst, src)
    assert torch.equal(dst.resolve_conj(), want.resolve_conj())
