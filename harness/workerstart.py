"""How ``harness launch`` starts its workers: forked from a preloaded process, or as fresh interpreters.

A fresh ``python -m harness train`` (what torchrun runs) imports torch (about 1.1 s on the 2-core machine)
and, when it builds its optimizer, torch._dynamo (about 1.0 s more), at every start and every restart,
after the launcher has spent the same second importing torch for the agent. So by default the launcher
starts, before importing anything heavy itself, multiprocessing's forkserver with ``harness.preload`` as
its preload: the two import torch side by side. The agent then starts each worker as a fork of that
process (torch's function entrypoints, ``start_method="forkserver"``), which runs ``harness train`` in
process (:func:`run_worker`); a restart forks again, importing nothing.

What a worker sees is what a fresh one would: the launcher's environment at the start (not the
forkserver's, see :func:`_adopt_environ`), torch's thread count from ``OMP_NUM_THREADS``, unbuffered output,
its own signal handlers, and an exit code that is the command's. Where the preload cannot be trusted (an
import failed, CUDA touched: harness/preload.py) or ``--start-method subprocess`` asks for it, the workers
are fresh interpreters, as before.

Standard library only at import: the launcher imports this before torch."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from typing import Any, Callable

FORKSERVER, SUBPROCESS = "forkserver", "subprocess"
METHODS = (FORKSERVER, SUBPROCESS)
PRELOAD = "harness.preload"
STATUS_FILE = "preload.json"
NAME_PREFIX = "harness-r"  # a forked worker's process name: harness-r<RANK>
WAIT_S = 300.0  # a preload still importing after this long has something wrong: start fresh workers
NOTICE_S = 30.0  # ... and after this long, say that the launch is waiting for it


def start_forkserver(folder: str) -> str:
    """Start the forkserver now (from the launcher's main thread: the forkserver dies with that thread) and
    return the path its preload reports to; it imports while the launcher goes on. '' where it cannot start
    (fresh ``python -m harness train`` workers then)."""
    import multiprocessing
    import multiprocessing.forkserver as forkserver

    from harness import preload

    status = os.path.join(folder, STATUS_FILE)
    multiprocessing.set_forkserver_preload([PRELOAD])
    os.environ[preload.STATUS_ENV], os.environ[preload.PARENT_ENV] = status, str(os.getpid())
    try:
        forkserver.ensure_running()
    except (OSError, ValueError) as exc:  # no fork here, a full process table
        print(f"harness launch: starting fresh worker processes (forkserver: {exc})", file=sys.stderr)
        return ""
    finally:
        del os.environ[preload.STATUS_ENV], os.environ[preload.PARENT_ENV]
    return status


def logs_specs(log_dir: str, status: str, stopping: Callable[[], bool]) -> Any:
    """torch's default logs specs (``DefaultLogsSpecs``), whose ``reify``, called by the agent right before
    it starts its workers, first settles the forkserver (:func:`settle`): the agent's rendezvous runs while
    the preload finishes, instead of after it."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs

    class AfterPreload(DefaultLogsSpecs):
        settled = False

        def reify(self, envs: Any) -> Any:
            if not self.settled:
                settle(status, stopping)
                self.settled = True
            return super().reify(envs)

    return AfterPreload(log_dir=log_dir)


def settle(status: str, stopping: Callable[[], bool]) -> None:
    """Wait for the preload. If it cannot be trusted, replace the forkserver by a plain one (its forks import
    torch themselves, as fresh workers do), saying why in one line."""
    why = wait_preloaded(status, stopping)
    if not why or stopping():
        return
    import multiprocessing
    import multiprocessing.forkserver as forkserver

    print(f"harness launch: workers import torch themselves (the preload: {why})", file=sys.stderr)
    multiprocessing.set_forkserver_preload([])
    server = forkserver._forkserver  # private, in every Python since 3.7: stop it; the next start makes a new one
    if server._forkserver_pid is not None:
        os.kill(server._forkserver_pid, signal.SIGKILL)  # it may still be importing: no need to wait for it
    server._stop()


def wait_preloaded(status: str, stopping: Callable[[], bool], poll_s: float = 0.01,
                   wait_s: float = WAIT_S, notice_s: float = NOTICE_S) -> str:
    """Wait for the preload's report: '' once the forkserver can start workers, else why not. Returns early
    (with a reason) when ``stopping()`` says the launch is ending anyway. Says once, after ``notice_s``, that
    it is still waiting (a slow filesystem under site-packages, a hung driver query): not a silent minute."""
    start = time.monotonic()
    deadline, notice = start + wait_s, start + notice_s  # notice: None once said
    while time.monotonic() < deadline:
        try:
            with open(status) as f:
                report = json.load(f)
            return "" if report.get("ok") else str(report.get("why") or "the preload failed")
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            return f"unreadable preload report ({exc})"
        if stopping():
            return "the launch is stopping"
        if not _forkserver_alive():
            return "the forkserver ended while preloading"
        if notice is not None and time.monotonic() >= notice:
            notice = None
            print(f"harness launch: the workers' preload (importing torch) is still running after {notice_s:g} s; "
                  f"waiting up to {wait_s:g} s before starting workers that import torch themselves",
                  file=sys.stderr)
        time.sleep(poll_s)
    return f"the preload took more than {wait_s:g} s"


def _forkserver_alive() -> bool:
    import multiprocessing.forkserver as forkserver

    pid = getattr(forkserver._forkserver, "_forkserver_pid", None)  # private, stable since 3.4; None: unknown
    if pid is None or not hasattr(os, "waitid"):
        return True
    try:  # without reaping it: multiprocessing does that
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
    except ChildProcessError:
        return False


def run_worker(launcher_env: dict[str, str], argv: list[str]) -> None:
    """A worker, forked from the preloaded forkserver by torch's agent: ``harness train`` with ``argv``.
    Success returns (the agent collects a return value from each worker); any other outcome leaves the
    process with the command's exit code, as ``python -m harness train`` would."""
    preloaded = PRELOAD in sys.modules  # else a fork of the plain forkserver that replaced a failed preload,
    from harness import faults, gcpause, preload  # started with the launcher's environment as it is now

    if preloaded:
        sys.excepthook = sys.__excepthook__  # the forkserver's is for failed starts only (preload.start_failed)
        preload.restore_signals()
        _adopt_environ(launcher_env, preload.BASE_ENV)
        faults.forget_env()
    else:
        gcpause.pause()  # this fork imports torch itself: as a fresh `harness train` would (harness/gcpause.py)
    for stream in (sys.stdout, sys.stderr):  # as ``python -u``: lines reach the launcher's output at once
        stream.reconfigure(line_buffering=True, write_through=True)
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        import torch  # imported in the forkserver already

        torch.set_num_threads(int(threads))  # OpenMP read the variable when the forkserver loaded it
    sys.argv = [sys.argv[0], *argv]
    _name_process(f"{NAME_PREFIX}{os.environ.get('RANK', '')}")

    from harness import cli, exiting

    try:
        code = cli.run(argv)
    except Exception:  # not one of ours (cli.main classifies those): a bug, with its traceback, exit 1, as a
        traceback.print_exc()  # fresh interpreter would print it (torch would only queue it for the agent)
        code = 1
    if code != 0:
        exiting.leave(code)
    exiting.finish()


def _name_process(name: str) -> None:
    """What ``ps``/``top`` show for this worker (its command line is the forkserver's); Linux only."""
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(name[:15])
    except OSError:
        pass


def _adopt_environ(launcher_env: dict[str, Any], base: dict[str, str]) -> None:
    """The launcher's environment at the start, plus what the agent set for this worker (RANK, MASTER_ADDR,
    ...: whatever differs from the environment the forkserver started with)."""
    agent = {k: v for k, v in os.environ.items() if base.get(k) != v}
    os.environ.clear()
    os.environ.update(launcher_env)
    os.environ.update(agent)
