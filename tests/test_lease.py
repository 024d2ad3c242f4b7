"""One job per checkpoint folder (harness/lease.py): a second job pointed at a folder a live job uses refuses
to start (exit 3, one line naming the other run's host and pid); a lease left by a job that is gone (kill -9
on this host, or no heartbeat for checkpoint.lease_timeout_s) is taken over; the same job restarting takes
its own lease back; a clean exit removes it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest
from fsspec.implementations.memory import MemoryFileSystem

from harness import config, lease
from harness.errors import ConfigError, StorageError
from harness.storage import Storage
from trainer_helpers import (MAX_STEPS, SLOW, all_checkpoint_folders, committed_steps, launch_cmd, standalone_cmd,
                             wait_until)


@pytest.fixture
def mem():
    st = Storage(f"memory://lease-{uuid.uuid4().hex}/run")
    st.makedirs("")
    yield st
    MemoryFileSystem.store.clear()
    MemoryFileSystem.pseudo_dirs[:] = [""]


def _plant(st: Storage, **fields) -> dict:
    rec = {"run_id": "other", "host": "elsewhere", "pid": 12345, "token": "t", "started": time.time(),
           "heartbeat": time.time(), **fields}
    st.commit_bytes(lease.LEASE_FILE, json.dumps(rec).encode())
    return rec


@pytest.fixture
def quick_watch(monkeypatch):
    monkeypatch.setattr(lease, "WATCH_POLL_S", 0.05)


class Beating:
    """Another job's lease, rewritten with a new heartbeat every 0.1 s (as its heartbeat thread would) until
    stopped: a live holder. ``fields`` as for _plant."""

    def __init__(self, st: Storage, **fields) -> None:
        self.st, self.fields, self.stop = st, fields, threading.Event()
        self.record = _plant(st, **{k: v for k, v in fields.items() if k != "clock_behind_s"},
                             heartbeat=time.time() - fields.get("clock_behind_s", 0.0))
        self.thread = threading.Thread(target=self._beat, daemon=True)
        self.thread.start()

    def _beat(self) -> None:
        fields = dict(self.fields)
        behind = fields.pop("clock_behind_s", 0.0)  # the holder's host's clock runs this far behind ours
        while not self.stop.wait(0.1):
            self.record = _plant(self.st, **fields, heartbeat=time.time() - behind)

    def __enter__(self) -> "Beating":
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def test_a_lease_whose_job_beats_is_refused_as_soon_as_it_beats(mem, quick_watch):
    with Beating(mem, host="node-7", pid=4242):
        t0 = time.monotonic()
        with pytest.raises(lease.LeaseError) as err:
            lease.Lease(mem, "mine", 60).acquire()
        assert time.monotonic() - t0 < 10  # one beat, not the 60 s staleness window
    msg = str(err.value)
    assert "node-7" in msg and "4242" in msg and "'other'" in msg and "heartbeat moved" in msg and "\n" not in msg
    assert isinstance(err.value, StorageError)
    assert lease.read_lease(mem)["run_id"] == "other"  # the refused job leaves the other's lease alone


def test_a_fresh_lease_that_never_beats_is_taken_over_after_the_watch(mem, quick_watch, caplog):
    """Fresh by this host's clock (a job on another node killed a moment ago, or a clock running ahead), but
    nobody rewrites it: taken over once it has not changed for the timeout, not refused (exit 3 needed a
    human for a job that a requeue onto another node would have resumed)."""
    _plant(mem, host="node-7", pid=4242)
    t0 = time.monotonic()
    with caplog.at_level("WARNING", logger="harness"):
        lease.Lease(mem, "mine", 1.0).acquire()
    assert time.monotonic() - t0 >= 1.0
    assert lease.read_lease(mem)["run_id"] == "mine"
    assert "waiting up to 1 s for it to beat" in caplog.text and "did not change for 1 s" in caplog.text


def test_a_stop_signal_ends_the_watch_and_leaves_the_lease(mem, quick_watch):
    theirs = _plant(mem, host="node-7", pid=4242)
    t0 = time.monotonic()
    with pytest.raises(lease.LeaseStopped) as stopped:
        lease.Lease(mem, "mine", 60).acquire(stopping=lambda: 15 if time.monotonic() - t0 > 0.3 else 0)
    assert stopped.value.signum == 15 and time.monotonic() - t0 < 5
    assert lease.read_lease(mem) == theirs


def test_a_job_with_a_shorter_timeout_than_the_holders_beat_does_not_take_a_live_lease(mem, quick_watch):
    """The holder beats every min(5 s, its timeout / 4) and says its timeout in its record: a second job started
    with a shorter lease_timeout_s than that beat (0.5 s here, against a beat every 1 s) watched for its own
    0.5 s, saw no change between two beats and took a live job's folder over. It now waits the holder's
    timeout, sees the beat and refuses."""
    holder = lease.Lease(mem, "other", 4.0)
    holder.acquire()
    try:
        assert holder.interval_s == 1.0 and lease.read_lease(mem)["timeout_s"] == 4.0
        t0 = time.monotonic()
        with pytest.raises(lease.LeaseError, match="heartbeat moved"):
            lease.Lease(mem, "mine", 0.5).acquire()
        assert time.monotonic() - t0 < 3.5
        assert lease.read_lease(mem)["run_id"] == "other"
    finally:
        holder.release()


def test_the_holders_timeout_lengthens_staleness_within_a_cap():
    now = time.time()
    rec = {"run_id": "other", "host": "elsewhere", "pid": 1, "heartbeat": now - 10, "timeout_s": 60}
    assert lease.stale_reason(rec, 3) is None  # 10 s without a beat: stale for us (3), not for the holder (60)
    assert lease.stale_reason({**rec, "timeout_s": 5}, 3) == "no heartbeat for 10 s"
    assert lease.stale_reason({**rec, "timeout_s": "60"}, 3) == "no heartbeat for 10 s"  # not a number: ours
    hostile = {**rec, "timeout_s": 1e12, "heartbeat": now - lease.MAX_DURATION_S - 5}
    assert lease.stale_reason(hostile, 3).startswith("no heartbeat for")
    assert lease.window_s({**rec, "timeout_s": float("inf")}, 3) == 3


def test_a_live_job_on_a_host_whose_clock_runs_behind_keeps_its_lease(mem, quick_watch):
    """Another host's clock two minutes behind: its live job's record looks stale here. It was taken over at once,
    and the live job, finding its lease replaced, stopped (exit 3). Now a record stale by this host's clock from
    another host is watched for three of its holder's beats first: it beats, so this job is the one refused."""
    with Beating(mem, host="node-7", pid=4242, timeout_s=2, clock_behind_s=120) as theirs:
        with pytest.raises(lease.LeaseError, match="heartbeat moved"):
            lease.Lease(mem, "mine", 60).acquire()
        assert lease.read_lease(mem)["token"] == theirs.record["token"] == "t"


def test_stale_heartbeat_from_another_host_is_taken_over_after_a_few_of_its_beats(mem, quick_watch, caplog):
    _plant(mem, heartbeat=time.time() - 120, timeout_s=2)  # beats every 0.5 s: watched 3 x 0.5 + 1 s
    held = lease.Lease(mem, "mine", 60, interval_s=0.05)
    t0 = time.monotonic()
    held.acquire()
    assert 2.4 < time.monotonic() - t0 < 10
    assert "which its host's may not agree with" in caplog.text
    assert "no heartbeat for 120 s and its record did not change for 2 s" in caplog.text, caplog.text
    time.sleep(0.2)
    rec = lease.read_lease(mem)
    assert rec["run_id"] == "mine" and rec["pid"] == os.getpid() and rec["heartbeat"] > rec["started"]
    held.release()
    assert lease.read_lease(mem) is None


def test_stale_heartbeat_on_this_host_is_taken_over_at_once(mem):
    _plant(mem, host=socket.gethostname(), pid=os.getpid(), heartbeat=time.time() - 120)  # one clock: believed
    t0 = time.monotonic()
    lease.Lease(mem, "mine", 60).acquire()
    assert time.monotonic() - t0 < 2 and lease.read_lease(mem)["run_id"] == "mine"


def test_dead_pid_on_this_host_is_taken_over(mem):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _plant(mem, host=socket.gethostname(), pid=dead.pid)
    lease.Lease(mem, "mine", 60).acquire()
    assert lease.read_lease(mem)["run_id"] == "mine"


def test_a_live_pid_on_this_host_is_watched_not_believed_and_the_same_run_takes_its_own_back(mem, quick_watch):
    """A process of that number on this host: in a new container (a pod restarted under the same name) it
    may be anyone's. Refused only if the record beats; its own run takes it back at once."""
    with Beating(mem, host=socket.gethostname(), pid=os.getpid(), run_id="job-1"):
        with pytest.raises(lease.LeaseError):
            lease.Lease(mem, "job-2", 60).acquire()
    _plant(mem, host=socket.gethostname(), pid=os.getpid(), run_id="job-1")
    t0 = time.monotonic()
    lease.Lease(mem, "job-1", 60).acquire()  # the same job restarted (torchrun restart, SLURM requeue)
    assert time.monotonic() - t0 < 5
    _plant(mem, host=socket.gethostname(), pid=os.getpid(), run_id="job-1")
    lease.Lease(mem, "job-2", 0.5).acquire()  # never beats: taken over after the watch
    assert lease.read_lease(mem)["run_id"] == "job-2"


def test_unreadable_lease_is_taken_over_and_release_keeps_a_foreign_one(mem):
    mem.commit_bytes(lease.LEASE_FILE, b"\x00not json")
    held = lease.Lease(mem, "mine", 60)
    held.acquire()
    _plant(mem, run_id="intruder")
    held.release()  # not ours any more: left alone
    assert lease.read_lease(mem)["run_id"] == "intruder"


@pytest.mark.parametrize("where", ["memory", "s3"])
def test_a_lease_is_read_in_one_bounded_request_and_an_oversized_one_taken_over(where, request, caplog):
    """None when absent; a hostile or broken RUN_LEASE (megabytes) is read up to the cap only, reported
    unreadable and taken over. On S3 (moto) too, where the bounded read is a ranged GET past the object's end."""
    st = request.getfixturevalue("mem") if where == "memory" else Storage(request.getfixturevalue("s3_url"))
    assert lease.read_lease(st) is None
    st.commit_bytes(lease.LEASE_FILE, b"{" + b" " * (4 * lease.MAX_LEASE_BYTES) + b"}")
    assert lease.read_lease(st) == {"unreadable": f"more than {lease.MAX_LEASE_BYTES} bytes"}
    held = lease.Lease(st, "mine", 60)
    with caplog.at_level("WARNING", logger="harness"):
        held.acquire()
    assert "is unreadable (more than" in caplog.text
    assert lease.read_lease(st)["run_id"] == "mine"
    held.release()
    assert lease.read_lease(st) is None


def test_run_id_sources(monkeypatch):
    for var in lease.RUN_ID_ENV:
        monkeypatch.delenv(var, raising=False)
    assert lease.run_id("explicit") == "explicit"
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    assert lease.run_id() == "slurm_job_id:77"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    assert lease.run_id() == "torchelastic_run_id:abc"


def test_lease_timeout_config_is_validated():
    assert config.load(None, ["checkpoint.lease_timeout_s=5"]).checkpoint.lease_timeout_s == 5.0
    with pytest.raises(ConfigError):
        config.load(None, ["checkpoint.lease_timeout_s=0"])
    assert config.load(None, ["run.id=job-9"]).run.id == "job-9"


# -- real processes ------------------------------------------------------------------------------------------

def _lease_holder(tmp_path) -> dict | None:
    path = tmp_path / "ck" / lease.LEASE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def test_second_job_on_same_folder_refuses_then_starts_after_first_leaves(runner, tmp_path):
    first = runner.start("first", standalone_cmd(tmp_path, "train.step_sleep_s=0.5"))
    holder = wait_until("the first job's lease", lambda: _lease_holder(tmp_path), [first], timeout=90)
    assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()

    second = runner.run("second", standalone_cmd(tmp_path / "other-out", "train.step_sleep_s=0.5")[:-2]
                        + ["--set", f"checkpoint.dir={tmp_path / 'ck'}"])
    assert second.rc == 3, second.tail()
    refusal = [line for line in second.log().splitlines() if line.startswith("harness: ")]
    assert len(refusal) == 1, second.log()
    assert "in use by another job" in refusal[0] and f"pid {first.pid}" in refusal[0] \
        and socket.gethostname() in refusal[0], refusal
    assert first.poll() is None, "the first job must be unaffected"
    assert _lease_holder(tmp_path)["pid"] == first.pid

    first.popen.send_signal(signal.SIGTERM)  # the first job leaves (preemption: checkpoint, exit 143)
    assert first.wait(60) == 143, first.tail()
    assert _lease_holder(tmp_path) is None, "a clean exit removes the lease"
    third = runner.run("third", standalone_cmd(tmp_path))
    assert third.rc == 0, third.tail()
    assert _lease_holder(tmp_path) is None


def test_lease_of_sigkilled_job_is_taken_over(runner, tmp_path):
    first = runner.start("first", standalone_cmd(tmp_path, "train.step_sleep_s=0.05"))
    wait_until("a committed checkpoint", lambda: committed_steps(tmp_path / "ck"), [first], timeout=90)
    assert _lease_holder(tmp_path)["pid"] == first.pid
    os.kill(first.pid, signal.SIGKILL)
    first.wait(30)
    assert _lease_holder(tmp_path)["pid"] == first.pid  # kill -9 leaves it behind
    second = runner.run("second", standalone_cmd(tmp_path))
    assert second.rc == 0, second.tail()
    assert "taking over the stale lease" in second.log() and "that process is gone" in second.log()
    assert _lease_holder(tmp_path) is None


def test_a_job_whose_lease_was_taken_over_stops_writing_there(runner, tmp_path):
    """Another job took the folder over while this one still ran (it believed it gone: a heartbeat lost in a
    long storage outage, clocks that disagree across hosts). This job's next save writes nothing: it exits 3
    naming the job that holds the folder now, and leaves that job's lease in place. Before, it only logged
    the takeover and went on saving and pruning beside the new job."""
    proc = runner.start("first", launch_cmd(tmp_path, SLOW))
    wait_until("a committed checkpoint", lambda: committed_steps(tmp_path / "ck"), [proc], timeout=120)
    theirs = {"run_id": "the-new-job", "host": "elsewhere", "pid": 4242, "token": "theirs",
              "started": time.time(), "heartbeat": time.time()}
    tmp = tmp_path / "ck" / "lease.tmp"
    tmp.write_text(json.dumps(theirs))
    os.replace(tmp, tmp_path / "ck" / lease.LEASE_FILE)  # whole, as a job writes it
    before = set(all_checkpoint_folders(tmp_path / "ck"))
    assert proc.wait(120) == 3, proc.tail()
    log = proc.log()
    assert log.count("harness: checkpoint error: ") == 1 and "Traceback" not in log, log[-3000:]
    line = next(s for s in log.splitlines() if s.startswith("harness: checkpoint error: "))
    assert "was taken over by run 'the-new-job' on host elsewhere, pid 4242" in line, line
    assert len(set(all_checkpoint_folders(tmp_path / "ck")) - before) <= 1  # at most the save then in flight
    assert _lease_holder(tmp_path) == theirs


def _plant_file(tmp_path, **fields) -> dict:
    """Another job's lease in tmp_path/ck, written whole (as a job writes it)."""
    (tmp_path / "ck").mkdir(exist_ok=True)
    rec = {"run_id": "gone-job", "host": "node-lost", "pid": 4242, "token": "theirs", "started": time.time(),
           "heartbeat": time.time(), **fields}
    (tmp_path / "ck" / "lease.tmp").write_text(json.dumps(rec))
    os.replace(tmp_path / "ck" / "lease.tmp", tmp_path / "ck" / lease.LEASE_FILE)
    return rec


def test_a_lease_left_a_moment_ago_on_another_node_is_taken_over_after_the_watch(runner, tmp_path):
    """README's command where a job on another node died seconds ago (its heartbeat still fresh): the launch
    waits for the record to beat, it does not, and the run takes the folder over and finishes. It exited 3
    (needs a human) before, for a job a requeue onto another node would resume."""
    _plant_file(tmp_path)
    proc = runner.run("after", launch_cmd(tmp_path, "checkpoint.lease_timeout_s=3"))
    assert proc.rc == 0, proc.tail()
    log = proc.log()
    assert "waiting up to 3 s for it to beat" in log and "did not change for 3 s" in log, log[-3000:]
    assert committed_steps(tmp_path / "ck")[-1] == MAX_STEPS
    assert _lease_holder(tmp_path) is None  # released at the end


def test_a_stop_while_watching_a_lease_exits_128_plus_n_with_nothing_written(runner, tmp_path):
    theirs = _plant_file(tmp_path)
    proc = runner.start("watching", launch_cmd(tmp_path, "checkpoint.lease_timeout_s=40"))
    wait_until("the watch", lambda: "for it to beat" in proc.log(), [proc], timeout=90)
    proc.popen.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 143, proc.tail()
    assert "while waiting for the checkpoint folder's lease" in proc.log(), proc.log()[-3000:]
    assert not committed_steps(tmp_path / "ck") and _lease_holder(tmp_path) == theirs
