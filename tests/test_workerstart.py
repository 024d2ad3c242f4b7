"""How `harness launch` starts its workers (harness/workerstart.py, harness/preload.py): by default forked from
multiprocessing's forkserver, which imported torch and torch._dynamo beside the launcher; fresh interpreters
with ``--start-method subprocess`` or when the preload fails. Real launches (2 gloo ranks on CPU): what a
worker sees (environment, thread count, name, what is imported), the fallback, and the forkserver's lifetime
(a stop signal to every process of the job, the launcher killed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from harness import workerstart
from trainer_helpers import (RUN_TIMEOUT, SLOW, base_env, committed_steps, descendants, events, last_logged_step,
                             launch_cmd, wait_gone, wait_until)

PROBE = '''
import gc, json, os, sys

import torch

from harness.workloads import SyntheticVectors, Workload


def build(model_cfg, data_cfg, seed):
    with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
        parent = f.read().replace(b"\\0", b" ").decode()
    with open("/proc/self/comm") as f:
        name = f.read().strip()
    seen = {"env": {k: os.environ.get(k) for k in ("HARNESS_LAUNCH_DIR", "OMP_NUM_THREADS", "PROBE_OUT", "RANK",
                                                   "TORCH_DISABLE_SHARE_RDZV_TCP_STORE")},
            "threads": torch.get_num_threads(), "dynamo_preloaded": "torch._dynamo" in sys.modules,
            "parent": parent, "name": name, "write_through": sys.stdout.write_through,
            "argv": sys.argv[1:3], "gc_enabled": gc.isenabled(), "frozen": gc.get_freeze_count()}
    with open(os.path.join(os.environ["PROBE_OUT"], "rank" + os.environ["RANK"]), "w") as f:
        json.dump(seen, f)
    torch.manual_seed(seed)
    return Workload(torch.nn.Linear(4, 2), SyntheticVectors(256, 4, 2, seed), torch.nn.functional.cross_entropy)
'''


def _probe_launch(tmp_path, *extra_args, **env):
    (tmp_path / "probe_wl.py").write_text(PROBE)
    cmd = launch_cmd(tmp_path, "train.entry='probe_wl:build'", "train.max_steps=2")
    cmd[4:4] = list(extra_args)  # after "launch"
    run_env = base_env(PROBE_OUT=str(tmp_path), **env)
    # Not set by the user: the launcher sets it (torchrun's default) after the forkserver started, which then
    # loaded OpenMP with the machine's core count.
    run_env.pop("OMP_NUM_THREADS")
    run_env["PYTHONPATH"] += os.pathsep + str(tmp_path)
    out = subprocess.run(cmd, env=run_env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert out.returncode == 0, out.stderr[-3000:]
    return out, [json.loads((tmp_path / f"rank{r}").read_text()) for r in (0, 1)]


@pytest.mark.parametrize("method", ["forkserver", "subprocess"])
def test_workers_see_what_a_fresh_worker_sees(method, tmp_path):
    """Either way: the launcher's environment with the agent's additions (RANK) and its own (the launch
    folder, OMP_NUM_THREADS=1 and torch's thread count to match), unbuffered output, ``train`` as the command.
    torch._dynamo imported and, with everything else the start-up imported, frozen (out of the collector's
    passes: harness/gcpause.py), the collector on for what training allocates. Forked: a child of the
    forkserver, named harness-r<RANK>."""
    out, seen = _probe_launch(tmp_path, "--start-method", method)
    assert "harness launch:" not in out.stderr, out.stderr[-2000:]  # no fallback line
    for rank, s in enumerate(seen):
        assert s["env"]["RANK"] == str(rank) and s["env"]["PROBE_OUT"] == str(tmp_path), s
        assert s["env"]["HARNESS_LAUNCH_DIR"] and s["env"]["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1", s
        assert s["env"]["OMP_NUM_THREADS"] == "1" and s["threads"] == 1, s
        assert s["argv"] == ["train", "--config"] and s["write_through"], s
        assert s["dynamo_preloaded"] and s["gc_enabled"] and s["frozen"] > 100_000, s
        if method == "forkserver":
            assert "multiprocessing.forkserver" in s["parent"] and s["name"] == f"harness-r{rank}", s
        else:
            assert "harness launch" in s["parent"], s


def test_a_failed_preload_leaves_workers_that_import_torch_themselves(tmp_path):
    """The preload fails (the fault seam raises in the forkserver before it imports torch): one line says so,
    the workers are forks of a plain forkserver, which import torch themselves, and the job runs as usual."""
    out, seen = _probe_launch(tmp_path, HARNESS_FAULT="launch.preload:raise")
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("harness launch:")]
    assert lines == ["harness launch: workers import torch themselves (the preload: preloading failed: "
                     "FaultInjected: fault injected at launch.preload)"], out.stderr[-2000:]
    for rank, s in enumerate(seen):
        assert s["threads"] == 1 and s["name"] == f"harness-r{rank}", s
        assert s["gc_enabled"] and s["frozen"] > 100_000, s  # their own imports, paused and frozen too


def test_a_stop_signal_to_every_process_of_the_job_commits_and_exits_143(runner, tmp_path):
    """SLURM signals every process of a job step, the forkserver included: it must outlive the workers'
    checkpoint (it blocks the signal), or the agent loses their exit codes."""
    proc = runner.start("launch", launch_cmd(tmp_path, SLOW))
    wait_until("a checkpoint and step 30", lambda: committed_steps(tmp_path / "ck") and last_logged_step(tmp_path) >= 30,
               [proc], timeout=120)
    assert len(proc.workers()) == 2
    os.killpg(proc.pid, signal.SIGTERM)  # the runner starts the launcher in a session of its own
    assert proc.wait(90) == 143, proc.tail()
    pre = events(tmp_path, "preempted")
    assert len(pre) == 1 and pre[0]["signal"] == "SIGTERM" and committed_steps(tmp_path / "ck")[-1] == pre[0]["step"]
    log = proc.log()
    assert log.count("exiting with 143 so the scheduler requeues") == 2, log[-3000:]


def test_the_forkserver_and_its_workers_end_with_a_killed_launcher(runner, tmp_path):
    """SIGKILL to the launcher alone: the forkserver dies with it (PR_SET_PDEATHSIG), its workers with that
    (torch's death signal for its workers): nothing is left running."""
    proc = runner.start("launch", launch_cmd(tmp_path, SLOW))
    wait_until("both workers", lambda: len(proc.workers()) == 2, [proc], timeout=60)
    left = descendants(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    wait_gone(left, timeout=60)


# -- units -------------------------------------------------------------------------------------------------

def test_a_forked_worker_takes_the_launchers_environment_plus_the_agents(monkeypatch):
    base = {"A": "forkserver", "B": "same", "GONE": "x"}
    now = {"A": "forkserver", "B": "same", "GONE": "x", "RANK": "3", "MASTER_PORT": "29500"}
    monkeypatch.setattr(os, "environ", dict(now))
    workerstart._adopt_environ({"A": "launcher", "B": "same", "NEW": "set after the forkserver"}, base)
    assert os.environ == {"A": "launcher", "B": "same", "NEW": "set after the forkserver", "RANK": "3",
                          "MASTER_PORT": "29500"}


def test_waiting_for_the_preload_says_why_it_cannot_be_used(tmp_path):
    status = tmp_path / "preload.json"
    never = lambda: False  # noqa: E731
    status.write_text(json.dumps({"ok": True}))
    assert workerstart.wait_preloaded(str(status), never) == ""
    status.write_text(json.dumps({"ok": False, "why": "CUDA was initialised while preloading"}))
    assert workerstart.wait_preloaded(str(status), never) == "CUDA was initialised while preloading"
    status.write_text("{not json")
    assert workerstart.wait_preloaded(str(status), never).startswith("unreadable preload report")
    missing = str(tmp_path / "none.json")
    assert workerstart.wait_preloaded(missing, lambda: True) == "the launch is stopping"
    t0 = time.monotonic()
    assert workerstart.wait_preloaded(missing, never, wait_s=0.2) == "the preload took more than 0.2 s"
    assert time.monotonic() - t0 < 5


def test_a_slow_preload_is_announced_once_while_the_launch_waits(tmp_path, capsys):
    missing = str(tmp_path / "none.json")
    assert workerstart.wait_preloaded(missing, lambda: False, wait_s=0.3, notice_s=0.1) == \
        "the preload took more than 0.3 s"
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["harness launch: the workers' preload (importing torch) is still running after 0.1 s; "
                     "waiting up to 0.3 s before starting workers that import torch themselves"], lines
    status = tmp_path / "preload.json"
    status.write_text(json.dumps({"ok": True}))
    assert workerstart.wait_preloaded(str(status), lambda: False, notice_s=0.0) == ""  # ready: nothing said
    assert capsys.readouterr().err == ""


def test_importing_the_preload_outside_a_forkserver_changes_nothing():
    """Only the forkserver (HARNESS_PRELOAD_STATUS set) blocks signals and imports torch."""
    code = ("import signal, sys; import harness.preload as p; "
            "print(p.ORIGINAL_MASK, sorted(signal.pthread_sigmask(signal.SIG_BLOCK, [])), 'torch' in sys.modules)")
    env = {k: v for k, v in base_env().items() if not k.startswith("HARNESS_PRELOAD")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["None", "[]", "False"], out.stderr


def test_the_preload_imports_the_train_path_and_nothing_of_s3_or_cuda(tmp_path):
    """What the forkserver holds when it reports ready: torch, torch._dynamo and ``harness train``'s own
    modules (a forked worker imports none of them again), but no S3 client (only an s3:// folder needs it) and
    no CUDA context (a fork could not use it)."""
    status = tmp_path / "preload.json"
    code = ("import sys, harness.preload, torch; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('harness', 's3fs', 'aiobotocore', "
            "'botocore', 'boto3')), torch.cuda.is_initialized())")
    env = {**base_env(), "HARNESS_PRELOAD_STATUS": str(status)}
    env.pop("HARNESS_PRELOAD_PARENT", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    report = json.loads(status.read_text())
    assert report["ok"] and report["why"] == "", report
    listed, cuda = out.stdout.rsplit(" ", 1)
    modules = set(eval(listed))  # noqa: S307 - our own print of a list of strings
    assert {"harness.cli", "harness.trainer", "harness.checkpoint.manager", "harness.storage.local",
            "harness.recipe", "harness.config"} <= modules, modules
    assert not {m for m in modules if not m.startswith("harness")}, modules
    assert cuda.strip() == "False"


def test_a_forked_worker_reads_the_fault_seam_from_its_own_environment(monkeypatch):
    """The forkserver read HARNESS_FAULT (the ``launch.preload`` point) in the environment it started with; a
    worker forgets that, as a fresh process would, and reads its own."""
    from harness import faults

    monkeypatch.setenv("HARNESS_FAULT", "launch.preload:sleep=0")
    faults.forget_env()
    faults.point("launch.preload")  # fires (a no-op sleep): read and cached
    monkeypatch.setenv("HARNESS_FAULT", "train.step:raise")
    faults.point("train.step")  # the cached spec names another point: nothing happens
    faults.forget_env()
    with pytest.raises(faults.FaultInjected):
        faults.point("train.step")
    monkeypatch.delenv("HARNESS_FAULT")
    faults.forget_env()
    faults.point("train.step")


def _env_reads_at_import(source: str) -> list[int]:
    """Lines where ``source`` touches os.environ/os.getenv in code that runs as it is imported: module and
    class bodies, decorators, default values (not function bodies)."""
    import ast

    lines: list[int] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for part in [*getattr(node, "decorator_list", []), *node.args.defaults, *node.args.kw_defaults]:
                if part is not None:
                    visit(part)
            return
        if (isinstance(node, ast.Attribute) and node.attr in ("environ", "environb", "getenv")
                and isinstance(node.value, ast.Name) and node.value.id == "os"):
            lines.append(node.lineno)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return lines


def test_no_harness_module_reads_the_environment_as_it_is_imported():
    """The forkserver imports harness's train path with the environment the launcher started with; a worker
    takes the launcher's later (harness/preload.py). A module that read os.environ as it is imported would keep
    the forkserver's value in every forked worker: none may (static check; the preload itself reads it on
    purpose)."""
    import pathlib

    sample = ("import os\nA = os.environ.get('A')\nclass C:\n    b = os.getenv('B')\n"
              "def f(c=os.environ['C']):\n    return os.environ\n")
    assert _env_reads_at_import(sample) == [2, 4, 5]  # the checker sees what runs at import, not f's body
    root = pathlib.Path(workerstart.__file__).parent
    offenders = [f"{path.relative_to(root.parent)}:{line}" for path in sorted(root.rglob("*.py"))
                 if path != root / "preload.py" for line in _env_reads_at_import(path.read_text())]
    assert offenders == [], offenders


START_FAILS = '''
import multiprocessing, os, sys

class Unpicklable:  # what a fork meets when the launcher's semaphores are gone: unpickling raises
    def __reduce__(self):
        return (os.stat, ("/nonexistent/harness-semaphore",))

if __name__ == "__main__":
    os.environ["HARNESS_PRELOAD_STATUS"] = sys.argv[1]
    os.environ["HARNESS_PRELOAD_PARENT"] = str(os.getpid())
    multiprocessing.set_forkserver_preload(["harness.preload"])
    p = multiprocessing.get_context("forkserver").Process(target=print, args=(Unpicklable(),))
    p.start()
    p.join()
    print("exitcode", p.exitcode)
'''


@pytest.mark.parametrize("debug", [False, True])
def test_a_fork_that_cannot_start_says_so_in_one_line(tmp_path, debug):
    """A real forkserver with harness's preload: a start that fails before the worker runs (here its process
    object cannot be unpickled, as when a stop signal ends the launcher mid-start) is one line, not a
    traceback; HARNESS_DEBUG=1 shows the traceback."""
    script = tmp_path / "start_fails.py"
    script.write_text(START_FAILS)
    env = {**base_env(), **({"HARNESS_DEBUG": "1"} if debug else {})}
    if not debug:
        env.pop("HARNESS_DEBUG", None)
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "preload.json")], env=env,
                         capture_output=True, text=True, timeout=180)
    assert out.stdout.split() == ["exitcode", "1"], (out.stdout, out.stderr[-2000:])
    if debug:
        assert "Traceback" in out.stderr and "FileNotFoundError" in out.stderr, out.stderr[-2000:]
    else:
        assert out.stderr.splitlines() == [
            "harness launch: a worker process could not start: FileNotFoundError: [Errno 2] No such file or "
            "directory: '/nonexistent/harness-semaphore'"], out.stderr[-2000:]


def test_a_failed_start_after_the_launcher_is_gone_says_nothing(monkeypatch, capsys):
    from harness import preload

    monkeypatch.delenv("HARNESS_DEBUG", raising=False)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    monkeypatch.setattr(preload, "LAUNCHER_PID", gone.pid)
    preload.start_failed(FileNotFoundError, FileNotFoundError(2, "No such file or directory"), None)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(preload, "LAUNCHER_PID", os.getpid())
    preload.start_failed(FileNotFoundError, FileNotFoundError(2, "No such file or directory"), None)
    assert capsys.readouterr().err == ("harness launch: a worker process could not start: FileNotFoundError: "
                                       "[Errno 2] No such file or directory\n")
