"""`harness launch` end to end: torchrun's real elastic agent (in the launcher process) with real worker
processes, 2 gloo ranks on CPU. The exit code is the contract: 143/138 after a committed checkpoint when the
launcher is signalled, 2 and 3 with zero worker starts (or none restarted) for permanent errors, 0 after the
agent restarted a worker killed with SIGKILL (bitwise equal to an uninterrupted run), and the same with two
agents (two launchers, c10d rendezvous on loopback)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest

from trainer_helpers import (EVERY, MAX_STEPS, SLOW, assert_same_final, base_env, committed_steps, events, free_port,
                             kill_tree, last_logged_step, launch_cmd, listening, resumed_from, wait_gone, wait_until)
from torch_features import SIGNALS_TO_HANDLE

MID = 30  # act once rank 0 has logged this step: past the first checkpoint (25), well before the end


def run_quick(cmd, timeout=60, cwd=None, **env):
    """A launch that must end before any worker starts: (exit code, stderr lines, stdout)."""
    out = subprocess.run(cmd, env=base_env(**env), capture_output=True, text=True, timeout=timeout, cwd=cwd)
    return out.returncode, out.stderr.strip().splitlines(), out.stdout


def _past_first_checkpoint(proc, tmp_path):
    wait_until(f"step {MID}", lambda: committed_steps(tmp_path / "ck") and last_logged_step(tmp_path) >= MID,
               [proc], timeout=120)
    return last_logged_step(tmp_path)


def _preempted_at(tmp_path, at, signame):
    pre = events(tmp_path, "preempted")
    assert len(pre) == 1 and pre[0]["signal"] == signame, pre
    step = pre[0]["step"]
    assert at <= step < MAX_STEPS, (at, step)
    assert committed_steps(tmp_path / "ck")[-1] == step
    assert not events(tmp_path, "done")
    return step


# -- permanent errors: one line, documented code, no (re)start -------------------------------------------

def test_config_errors_exit_2_before_any_worker_starts(tmp_path):
    """A typo, a combination the config refuses (nccl on CPU), a model option the workload refuses and a batch
    larger than a rank's share of the data: one line, exit 2, with --max-restarts 3 and no worker started (no output, no metrics, no checkpoint folder).
    The cases run concurrently to save time."""
    cases = {
        "typo": ("train.max_stepz=5", "unknown config key 'train.max_stepz'"),
        "nccl-on-cpu": ("dist.backend='nccl'", "dist.backend = 'nccl'"),  # quickstart trains on the CPU
        "model-option": ("model.hiden=3", "unknown model option(s) 'hiden'"),
        # the test config's 3200 samples over 2 ranks: every batch of a rank would be dropped
        "batch-over-data": ("train.batch_size=5000", "exceeds the 1600 samples per rank"),
        # an empty folder was the working directory; memory:// one store per rank, all gone at exit
        "empty-dir": ("checkpoint.dir=", "checkpoint.dir is empty"),
        "memory-dir": ("checkpoint.dir='memory://ck'", "lives in one process's memory"),
    }
    procs = {}
    for name, (override, _) in cases.items():
        (tmp_path / name).mkdir()
        procs[name] = subprocess.Popen(launch_cmd(tmp_path / name, override, max_restarts=3), env=base_env(),
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        lines = err.strip().splitlines()
        assert proc.returncode == 2, (name, proc.returncode, err)
        assert len(lines) == 1 and lines[0].startswith("harness: config error: "), (name, err)
        assert cases[name][1] in lines[0], (name, lines[0])
        assert not out.strip(), (name, out)
        run = tmp_path / name
        assert not (run / "metrics.jsonl").exists() and not (run / "ck").exists(), name  # no worker ran


SMALL_DATA_WL = """
import torch
from harness.workloads import Workload

def build(model_cfg, data_cfg, seed):
    data = [(torch.zeros(4), torch.tensor(0)) for _ in range(6)]   # 3 samples per rank at 2 ranks
    return Workload(model=torch.nn.Linear(4, 2), dataset=data, loss_fn=torch.nn.functional.cross_entropy)
"""


def test_a_users_data_too_small_for_the_batch_exits_2_without_restart(runner, tmp_path):
    """A train.entry's dataset is only known to the workers: they raise the same config error, the launcher
    stops the agent (no restart although --max-restarts is 3), prints the line once and exits 2."""
    (tmp_path / "small_wl.py").write_text(SMALL_DATA_WL)
    env = base_env()
    env["PYTHONPATH"] += os.pathsep + str(tmp_path)
    proc = runner.start("small", launch_cmd(tmp_path, "train.entry='small_wl:build'", "train.batch_size=4",
                                            max_restarts=3), env=env)
    assert proc.wait(120) == 2, proc.tail()
    log = proc.log()
    assert log.count("harness: config error: ") == 1, log[-3000:]
    assert "exceeds the 3 samples per rank" in log and "Traceback" not in log, log[-3000:]
    assert "will restart worker group" not in log, log[-3000:]
    assert not events(tmp_path, "start") and not committed_steps(tmp_path / "ck")


def test_a_users_builder_with_the_wrong_signature_exits_2_without_restart(runner, tmp_path):
    """A train.entry that cannot take (model_cfg, data_cfg, seed) failed every worker with a TypeError
    traceback, restarted 3 times, exit 1: now one config error line, exit 2, no restart."""
    (tmp_path / "wrongsig_wl.py").write_text("def build(model_cfg):\n    return None\n")
    env = base_env()
    env["PYTHONPATH"] += os.pathsep + str(tmp_path)
    proc = runner.start("wrongsig", launch_cmd(tmp_path, "train.entry='wrongsig_wl:build'", max_restarts=3),
                        env=env)
    assert proc.wait(120) == 2, proc.tail()
    log = proc.log()
    assert log.count("harness: config error: train.entry: 'wrongsig_wl:build' cannot be called as build(") == 1, \
        log[-3000:]
    assert "Traceback" not in log and "will restart worker group" not in log, log[-3000:]


@pytest.mark.parametrize("spec", ["garbage", "save.before_commit:boom", "save.before_commit:raise:step"])
def test_a_malformed_fault_spec_is_a_config_error_before_any_worker(tmp_path, spec):
    """The test seam's variable (harness/faults.py): a typo was exit 3, "could not take RUN_LEASE: ValueError"
    (the first fault point a worker reached), or for an unknown action a fault that never fired."""
    rc, err, _ = run_quick(launch_cmd(tmp_path, max_restarts=3), HARNESS_FAULT=spec)
    assert rc == 2 and len(err) == 1 and err[0].startswith("harness: config error: HARNESS_FAULT "), (rc, err)
    assert not (tmp_path / "ck").exists()


def test_missing_bucket_exits_3_before_any_worker_starts(tmp_path, s3_server):
    """... and makes no folder: the metrics folder derived from the URL (run.output_dir unset) was made first,
    leaving runs/remote/s3/<bucket>/run behind in the working directory."""
    rc, err, _ = run_quick(launch_cmd(tmp_path, "checkpoint.dir='s3://no-such-bucket-for-launch/run'",
                                      "run.output_dir=''", max_restarts=3), cwd=tmp_path)
    assert rc == 3, (rc, err)
    assert len(err) == 1 and err[0].startswith("harness: checkpoint error: "), err
    assert "no-such-bucket-for-launch" in err[0] and "Traceback" not in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_a_storage_that_fails_as_it_opens_exits_3_before_any_worker_starts(tmp_path):
    """fsspec filesystems that connect in their constructor (ftp, sftp): a refused connection was a traceback
    from the launcher, exit 1."""
    url = f"ftp://127.0.0.1:{free_port()}/ck"
    rc, err, _ = run_quick(launch_cmd(tmp_path, f"checkpoint.dir='{url}'", max_restarts=3))
    assert rc == 3, (rc, err)
    assert err == [f"harness: checkpoint error: cannot open checkpoint storage {url}: ConnectionRefusedError: "
                   "[Errno 111] Connection refused"], err


def test_folder_held_by_another_job_exits_3_without_restart(runner, tmp_path):
    """The lease check runs in the workers: they record the error for the launcher instead of exiting, the
    launcher stops the agent (no restart although --max-restarts is 3), prints the line once and exits 3."""
    ck = tmp_path / "ck"
    ck.mkdir()
    stop = threading.Event()

    def beat() -> None:  # the other job's heartbeat: a starting job watches the record before refusing
        while True:
            now = time.time()
            (ck / "lease.tmp").write_text(json.dumps({"run_id": "someone-else", "host": socket.gethostname(),
                                                      "pid": os.getpid(), "token": "t", "started": now,
                                                      "heartbeat": now}))
            os.replace(ck / "lease.tmp", ck / "RUN_LEASE")
            if stop.wait(0.5):
                return

    beating = threading.Thread(target=beat, daemon=True)
    beating.start()
    try:
        proc = runner.start("held", launch_cmd(tmp_path, max_restarts=3))
        assert proc.wait(120) == 3, proc.tail()
    finally:
        stop.set()
        beating.join()
    log = proc.log()
    assert log.count("harness: checkpoint error: ") == 1, log[-3000:]
    assert "in use by another job" in log and "Traceback" not in log, log[-3000:]
    assert "will restart worker group" not in log, log[-3000:]
    assert not events(tmp_path, "start") and not committed_steps(ck)


@pytest.mark.parametrize("parallel", ["ddp", "zero"])
def test_resuming_with_another_optimizer_exits_3_without_restart(parallel, runner, tmp_path):
    """The config's optimizer changed since the checkpoint (AdamW's state into SGD, which torch would take and
    then fail at the first step, every restart; under ZeRO it would merge the groups and train on, AdamW's
    moments dropped): the checkpoint is unusable for this run, so one line, exit 3, no restart, and the
    checkpoint is left as it was."""
    first = runner.start("adamw", launch_cmd(tmp_path, f"train.max_steps={EVERY}"))
    assert first.wait(120) == 0, first.tail()
    before = committed_steps(tmp_path / "ck")
    proc = runner.start("sgd", launch_cmd(tmp_path, "optim.name='sgd'", f"train.parallel='{parallel}'",
                                          max_restarts=3))
    assert proc.wait(120) == 3, proc.tail()
    log = proc.log()
    assert log.count("harness: checkpoint error: optimizer 'optimizer' cannot take the saved state") == 1, log[-3000:]
    assert "which SGD needs (saved by torch.optim.adamw.AdamW" in log and "Traceback" not in log, log[-3000:]
    assert "The config differs from the one the run in " in log and "start a new checkpoint.dir" in log, log[-3000:]
    assert "will restart worker group" not in log, log[-3000:]
    assert committed_steps(tmp_path / "ck") == before == [EVERY]


def test_a_worker_that_cannot_write_its_record_keeps_its_outcome(tmp_path, monkeypatch):
    """report_outcome on a launch folder it cannot write into (here the record's name is taken by a folder):
    False at once, no exception, so the worker still prints its line and exits with its own code."""
    from harness.exitcodes import Outcome
    from harness.launch_folder import LAUNCH_DIR_ENV, report_outcome

    (tmp_path / "error-0.json").mkdir()
    monkeypatch.setenv(LAUNCH_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("RANK", "0")
    t0 = time.monotonic()
    assert report_outcome(Outcome(143, "stopped")) is False
    assert time.monotonic() - t0 < 1.0  # did not wait for a launcher that never saw a record


# -- signals to the launcher ------------------------------------------------------------------------------

# SIGUSR2: submitit's signal before a time limit or preemption (the launcher died of it, 140 by the shell's count,
# while its orphaned workers committed a checkpoint no launcher waited for)
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGUSR1, 138), (signal.SIGUSR2, 140)],
                         ids=["SIGTERM", "SIGUSR1", "SIGUSR2"])
def test_signal_to_launcher_commits_and_exits_128_plus_n(sig, code, runner, tmp_path):
    proc = runner.start("launch", launch_cmd(tmp_path, SLOW))
    at = _past_first_checkpoint(proc, tmp_path)
    os.kill(proc.pid, sig)
    time.sleep(0.2)
    os.kill(proc.pid, sig)  # a repeated signal must not make the agent abandon the workers' checkpoint
    # ... nor, once the launcher has decided its exit code, replace that code by death by the signal: keep
    # signalling from its verdict line to its exit (interpreter teardown would reset the handlers to SIG_DFL).
    deadline = time.monotonic() + 90
    while "harness launch: stopped by" not in proc.log() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    sent = 0
    while proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
            sent += 1
        time.sleep(0.005)
    assert proc.wait(90) == code, (sent, proc.tail())
    _preempted_at(tmp_path, at, sig.name)
    log = proc.log()
    assert log.count(f"exiting with {code} so the scheduler requeues") == 2, log[-3000:]
    assert "Traceback" not in log and "ChildFailedError" not in log, log[-3000:]


def test_a_stop_whose_checkpoint_no_worker_committed_says_so(runner, tmp_path):
    """SIGTERM, and rank 0 dies in the stop's save (SIGKILL before its commit record, as the kernel's OOM
    killer or the agent's kill after the grace period would): still 143 (a restart resumes), but the line no
    longer implies a checkpoint was committed for the stop."""
    env = base_env(HARNESS_FAULT="save.before_commit:sigkill:rank=0")
    proc = runner.start("launch", launch_cmd(tmp_path, SLOW, "checkpoint.every_steps=100000"), env=env)
    wait_until("step 3", lambda: last_logged_step(tmp_path) >= 3, [proc], timeout=120)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(90) == 143, proc.tail()
    assert "harness launch: stopped by SIGTERM, but no worker confirmed a checkpoint for this stop; exit 143 " \
           "(retryable: a restart resumes)" in proc.log(), proc.tail()
    assert not committed_steps(tmp_path / "ck")


def test_signal_after_the_workers_finished_exits_0(runner, tmp_path):
    """A SIGTERM that reaches the launcher after every worker finished training (final checkpoint committed)
    but before they are gone is not a preemption: exit 0, not 143 (a requeue that would only find the job
    done). The workers linger after finishing through the fault seam (``train.finished``), which holds them
    exactly in that window."""
    env = base_env(HARNESS_FAULT="train.finished:sleep=4")
    proc = runner.start("launch", launch_cmd(tmp_path), env=env)
    wait_until("both workers finished", lambda: proc.log().count("training finished at step") == 2, [proc],
               timeout=120)
    time.sleep(0.5)  # the markers are written right after that line; the workers now sleep for 4 s
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(90) == 0, proc.tail()
    log = proc.log()
    assert "got SIGTERM after every worker had finished training; exit 0" in log, log[-3000:]
    assert "stopped by" not in log and len(events(tmp_path, "done")) == 1
    assert committed_steps(tmp_path / "ck")[-1] == MAX_STEPS


def test_a_signal_after_every_worker_finished_lets_the_agent_collect_them_then_stops_it(tmp_path, monkeypatch,
                                                                                      capsys):
    """The launcher's handler, in this process with real signals: once every worker said it finished, a SIGTERM
    does not stop the agent (which is collecting their results: the job ends 0 in a moment; stopping it cost
    ~50 s of SIGTERMs the workers ignore and a SIGKILL); only if they have not left after FINISHED_WAIT_S is the
    agent stopped as for any signal."""
    from harness import launch

    class Stopped(Exception):
        def __init__(self, msg, sigval):
            super().__init__(msg)
            self.sigval = sigval

    monkeypatch.setattr(launch, "FINISHED_WAIT_S", 0.3)
    stopper = launch.Stopper(str(tmp_path), workers=2)
    previous = {sig: signal.getsignal(sig) for sig in launch.HANDLED}
    try:
        stopper.install()
        stopper._raise, stopper.phase = Stopped, "agent"
        for rank in (0, 1):
            (tmp_path / f"finished-{rank}").touch()
        os.kill(os.getpid(), signal.SIGTERM)  # handled here, between two bytecodes: no raise
        assert stopper.signum == signal.SIGTERM and stopper.stopping()
        os.kill(os.getpid(), signal.SIGTERM)  # a scheduler repeating itself: nothing to wait for, nothing said
        assert "while stopping" not in capsys.readouterr().err
        with pytest.raises(Stopped) as stopped:
            time.sleep(5)  # the timer's signal interrupts this
        assert stopped.value.sigval == signal.SIGTERM
    finally:
        stopper.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _handles(pid: int, sig: int) -> bool:
    """True once process ``pid`` has a handler for ``sig`` (the SigCgt mask of /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    except (OSError, StopIteration, ValueError):
        return False
    return bool(mask >> (sig - 1) & 1)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except (OSError, ValueError):
        return []


def _signal_after_handler(proc: subprocess.Popen, sig: int, delay: float, workers: bool) -> None:
    """``delay`` s after the launcher's handlers are in (SIGUSR1 is the last it installs; Python itself
    catches SIGINT from its start, so SIGINT's own mask bit says nothing), or after its two workers exist
    (``workers``: they are still starting, before their own handlers), send ``sig``."""
    deadline = time.monotonic() + 60

    def ready() -> bool:
        return len(_children(proc.pid)) >= 2 if workers else _handles(proc.pid, signal.SIGUSR1)

    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    time.sleep(delay)
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, sig)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc to see when the handler is in")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_while_the_launcher_starts_exits_128_plus_n(sig, tmp_path):
    """A signal from the moment the launcher handles it, while it imports torch and checks config and storage,
    or its workers start (five launchers at once, signalled at spread moments): 128+N, one line, no traceback.
    A handler that raised there broke `import torch` half way: exit 1 with SystemError or AttributeError, once
    SIGSEGV; a Ctrl-C forwarded to starting workers printed their KeyboardInterrupt tracebacks."""
    delays = ((0.0, False), (0.3, False), (0.8, False), (0.0, True), (0.5, True))  # (s, after workers exist)
    procs = []
    for i in range(len(delays)):
        (tmp_path / f"d{i}").mkdir()
        procs.append(subprocess.Popen(launch_cmd(tmp_path / f"d{i}", max_restarts=3), env=base_env(),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    signallers = [threading.Thread(target=_signal_after_handler, args=(p, sig, *d)) for p, d in zip(procs, delays)]
    for t in signallers:
        t.start()
    try:
        for delay, proc in zip(delays, procs):
            _, err = proc.communicate(timeout=120)
            verdicts = [ln for ln in err.splitlines() if ln.startswith("harness launch:")]
            assert proc.returncode == 128 + sig, (delay, proc.returncode, err[-3000:])
            assert len(verdicts) == 1 and f"stopped by {sig.name}" in verdicts[0], (delay, err[-3000:])
            assert "Traceback" not in err, (delay, err[-3000:])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        for t in signallers:
            t.join()


def test_signal_during_a_stalled_storage_check_exits_128_plus_n(tmp_path, fault_proxy):
    """The launcher's storage check waits on an object store that does not answer (every request stalls):
    SIGTERM then ends the launch at once with 143 (retryable), not after the check's 30 s retry budget, and
    not with 3 (the check used to report the interrupted call as unusable storage: never retried)."""
    fault_proxy.stall_s = 60
    fault_proxy.configure(1.0, seed=1, kinds={"stall": 1})
    cmd = launch_cmd(tmp_path, "checkpoint.dir='s3://stalled-bucket/run'", max_restarts=3)
    proc = subprocess.Popen(cmd, env=base_env(AWS_ENDPOINT_URL=fault_proxy.url), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not fault_proxy.counts["stall"] and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert fault_proxy.counts["stall"], f"no request reached the store (exit {proc.poll()})"
        t0 = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, (proc.returncode, err[-3000:])
    lines = err.strip().splitlines()
    assert lines == ["harness launch: stopped by SIGTERM before any worker started; exit 143 (retryable: "
                     "a restart resumes)"], err[-3000:]
    assert took < 10, took
    assert not (tmp_path / "metrics.jsonl").exists()  # no worker ran


@pytest.mark.skipif(shutil.which("nohup") is None, reason="needs coreutils' nohup")
@pytest.mark.skipif(not SIGNALS_TO_HANDLE, reason="torch's agent takes SIGHUP over nohup's SIG_IGN "
                    "where LaunchConfig has no signals_to_handle (torch 2.4)")
def test_nohup_launch_survives_the_terminal_hangup(runner, tmp_path):
    """`nohup harness launch ...`: SIGHUP to the launcher and its workers (closing the terminal) changes
    nothing, the run finishes with 0. torch's agent used to put its handler over nohup's SIG_IGN and stop the
    workers without a checkpoint: exit 1."""
    proc = runner.start("launch", ["nohup", *launch_cmd(tmp_path, SLOW)])
    _past_first_checkpoint(proc, tmp_path)
    hung_up = [proc.pid, *proc.workers()]
    for pid in hung_up:
        os.kill(pid, signal.SIGHUP)
    assert proc.wait(120) == 0, proc.tail()
    assert len(hung_up) == 3, hung_up
    assert [e["step"] for e in events(tmp_path, "done")] == [MAX_STEPS]


# -- a worker dies: the agent restarts the group, the job ends 0, bitwise equal ----------------------------

def test_sigkilled_worker_is_restarted_and_the_run_ends_bitwise_equal(runner, tmp_path, ref):
    proc = runner.start("launch", launch_cmd(tmp_path, SLOW, max_restarts=1))
    wait_until("both workers", lambda: len(proc.workers()) == 2, [proc], timeout=60)
    _past_first_checkpoint(proc, tmp_path)
    victim = proc.worker_of_rank(1)
    os.kill(victim, signal.SIGKILL)
    assert proc.wait(150) == 0, proc.tail()
    log = proc.log()
    assert "will restart worker group" in log, log[-3000:]
    assert len(resumed_from(log)) == 2, log[-3000:]  # both ranks of the restarted group resumed
    assert_same_final(tmp_path, ref)


# -- two agents (two "nodes" on loopback) -----------------------------------------------------------------

@pytest.mark.parametrize("signalled", ["both", "one"])
def test_two_agents_stop_on_sigterm_with_143_and_finish_with_0(signalled, runner, tmp_path, ref):
    """SIGTERM to both launchers (SLURM signals every node), or to one (one preempted node), with restarts
    allowed: every rank stops at the same step and commits, and both launchers exit 143 at once. The node
    that was not signalled used to restart its workers (exit 143 looked like a failure) into a rendezvous the
    stopped node never joins: it hung."""
    port = free_port()
    cmds = [launch_cmd(tmp_path, SLOW, nproc=1, nnodes=2, endpoint=f"127.0.0.1:{port}", max_restarts=3)
            for _ in range(2)]
    nodes = [runner.start(f"node{i}", cmd) for i, cmd in enumerate(cmds)]
    at = _past_first_checkpoint(nodes[0], tmp_path)
    for node in nodes if signalled == "both" else nodes[:1]:
        os.kill(node.pid, signal.SIGTERM)
    assert [node.wait(60) for node in nodes] == [143, 143], [n.tail() for n in nodes]
    assert all("will restart worker group" not in n.log() for n in nodes), [n.tail() for n in nodes]
    step = _preempted_at(tmp_path, at, "SIGTERM")

    port = free_port()
    cmds = [launch_cmd(tmp_path, nproc=1, nnodes=2, endpoint=f"127.0.0.1:{port}") for _ in range(2)]
    nodes = [runner.start(f"rerun{i}", cmd) for i, cmd in enumerate(cmds)]
    assert [node.wait(120) for node in nodes] == [0, 0], [n.tail() for n in nodes]
    assert sorted(s for n in nodes for s in resumed_from(n.log())) == [step, step]
    assert_same_final(tmp_path, ref)


@pytest.mark.parametrize("lost", ["other", "host"])
def test_a_lost_node_is_replaced_and_the_job_ends_bitwise_equal(lost, runner, tmp_path, ref):
    """A node dies whole (SIGKILL to its launcher and workers: a machine lost, a pod evicted) and the scheduler
    starts the same command again, as Kubernetes recreates a pod. The surviving launcher must neither exit nor
    hang: it restarts its workers and waits for the node to come back, and the job ends 0 on both, bitwise
    equal to the reference. When the lost node hosted the rendezvous store, torch's agent fails at once
    (RendezvousConnectionError: torchrun exits 1, which Kubeflow's ExitCode policy never retries, so the job
    ended); the launcher starts its agent again instead (harness/rendezvous.py)."""
    port = free_port()
    cmd = launch_cmd(tmp_path, SLOW, nproc=1, nnodes=2, endpoint=f"127.0.0.1:{port}", max_restarts=3)
    host = runner.start("node0", cmd)
    wait_until("the rendezvous store", lambda: listening(port), [host], timeout=60)
    other = runner.start("node1", cmd)  # the store is taken: this node is a client of node0's
    at = _past_first_checkpoint(host, tmp_path)
    victim, survivor = (other, host) if lost == "other" else (host, other)
    wait_gone(kill_tree(victim))
    sign = "will restart worker group" if lost == "other" else "cannot reach the rendezvous at 127.0.0.1"
    wait_until("the survivor's restart", lambda: sign in survivor.log(), [survivor])
    # Its worker saw the lost peer as gloo's RuntimeError: one line, not a traceback (harness/errors.py).
    assert "harness: communication error (retryable, exit 1): RuntimeError: " in survivor.log(), survivor.tail()
    assert "Traceback" not in survivor.log(), survivor.tail()
    assert "frame #" not in survivor.log(), survivor.tail()  # no C++ stack from the launcher's store client
    nodes = [survivor, runner.start("replacement", cmd)]
    assert [node.wait(150) for node in nodes] == [0, 0], [n.tail() for n in nodes]
    resumed = sorted(s for n in nodes for s in resumed_from(n.log()))
    assert len(resumed) == 2 and resumed[0] == resumed[1] >= at - at % EVERY, (resumed, at)
    assert_same_final(tmp_path, ref)


def test_a_lost_node_never_replaced_ends_the_survivor_after_the_join_timeout(runner, tmp_path):
    """--rdzv-conf reaches torch's rendezvous (join_timeout=5 instead of 600): a lost node that never comes
    back ends the survivor with exit 1 and one line saying so, seconds later, not after ten minutes."""
    port = free_port()
    cmd = launch_cmd(tmp_path, SLOW, nproc=1, nnodes=2, endpoint=f"127.0.0.1:{port}", max_restarts=3)
    cmd[cmd.index("--max-restarts"):cmd.index("--max-restarts")] = ["--rdzv-conf", "join_timeout=5"]
    host = runner.start("node0", cmd)
    wait_until("the rendezvous store", lambda: listening(port), [host], timeout=60)
    other = runner.start("node1", cmd)
    _past_first_checkpoint(host, tmp_path)
    wait_gone(kill_tree(other))
    started = time.monotonic()
    assert host.wait(90) == 1, host.tail()
    line = host.log().strip().splitlines()[-1]
    assert line.startswith(f"harness launch: not enough nodes joined the rendezvous at 127.0.0.1:{port} in time"), line
    assert line.endswith("exit 1") and time.monotonic() - started < 60, (line, time.monotonic() - started)
