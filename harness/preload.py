"""The preload of the launcher's forkserver: importing this module, in the forkserver process that
``harness launch`` starts (harness/workerstart.py), is the preload. Every worker is then a fork of this
process and finds torch, torch._dynamo (which any optimizer's constructor imports: about a second),
torch.distributed and ``harness train``'s own modules already imported (none of them reads the environment
at import: a worker's comes later, see below).

What makes a fork of this process a faithful worker, done here:

* **Signals.** The forkserver lives exactly as long as its launcher (it leaves when the launcher's end of
  its pipe closes, and the kernel kills it when the launcher dies: ``PR_SET_PDEATHSIG``). A stop signal sent
  to every process of the job (SLURM signals them all) must not end it first: the agent would lose its
  workers' exit codes. So the terminating signals are *blocked* here, before any thread exists, and a
  worker unblocks them first thing (:func:`restore_signals`): a signal that came between its fork and that
  moment is then delivered, with the default action, exactly as to a fresh process that has not yet
  installed a handler.
* **Environment.** ``BASE_ENV`` is the environment this process started with; a worker replaces it by the
  launcher's at the time of the start (harness/workerstart.py), so nothing set in the meantime is missed.
* **Failed starts.** A fork that fails before it runs its worker (multiprocessing prints the exception, the
  fork exits 1) says so in one line (:func:`start_failed`), or nothing once the launcher is gone.
* **CUDA.** A fork is only safe while CUDA is untouched in the parent. Checked after the imports, by a probe
  fork that asks torch whether it is in a bad fork; if so (or if any import failed) the status says why and
  the launcher starts fresh ``python -m harness train`` workers instead.

The outcome goes to the JSON file named by ``HARNESS_PRELOAD_STATUS`` (written whole: temp + rename)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

from harness import gcpause
from harness.hostinfo import pid_alive

STATUS_ENV = "HARNESS_PRELOAD_STATUS"
PARENT_ENV = "HARNESS_PRELOAD_PARENT"
# Terminating signals a worker may be sent (a stop, or torch's agent handler's); blocked while preloaded.
BLOCKED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP, signal.SIGQUIT)
NVML_ENV = "PYTORCH_NVML_BASED_CUDA_CHECK"
MODULES = ("torch", "torch._dynamo", "torch.distributed", "torch.optim", "torch.nn.parallel",
           # ``harness train``'s own path (about 0.15 s): imported here once rather than in every worker
           "harness.cli", "harness.launch", "harness.trainer", "harness.launch_folder", "harness.prefetch",
           "fsspec.implementations.local")

# Only in a launcher's forkserver: anywhere else importing this module changes nothing.
ORIGINAL_MASK: set | None = signal.pthread_sigmask(signal.SIG_BLOCK, BLOCKED) if os.environ.get(STATUS_ENV) else None
BASE_ENV: dict[str, str] = dict(os.environ)
_parent = os.environ.get(PARENT_ENV, "")
LAUNCHER_PID: int | None = int(_parent) if _parent.isdigit() else None


def restore_signals() -> None:
    """In a worker, first: the signal mask this forkserver was started with (see the module's docstring)."""
    if ORIGINAL_MASK is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, ORIGINAL_MASK)


def _die_with_parent() -> bool:
    """The kernel kills this process when the launcher's thread that started it ends (Linux); False when the
    launcher is already gone."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    return str(os.getppid()) == os.environ.get(PARENT_ENV, str(os.getppid()))


def _fork_is_safe() -> str:
    """Why a fork of this process could not use CUDA, or ''."""
    import torch

    if torch.cuda.is_initialized():
        return "CUDA was initialised while preloading"
    pid = os.fork()
    if pid == 0:  # the probe: exit at once, without any teardown
        os._exit(3 if torch.cuda._is_in_bad_fork() else 0)
    _, status = os.waitpid(pid, 0)
    return "" if os.waitstatus_to_exitcode(status) == 0 else "a fork of the preloaded process cannot use CUDA"


def _preload() -> dict:
    t0, started = time.monotonic(), time.time()
    # torch.cuda.is_available() through NVML, which leaves forks usable (the CUDA runtime's check does not).
    nvml = os.environ.get(NVML_ENV)
    os.environ[NVML_ENV] = "1"
    try:
        from harness import faults

        faults.point("launch.preload")  # tests: a preload that fails (HARNESS_FAULT=launch.preload:raise)
        with gcpause.imports():  # forks inherit the preloaded heap frozen (harness/gcpause.py)
            for name in MODULES:
                __import__(name)
        why = _fork_is_safe()
    except BaseException as exc:  # noqa: BLE001 - any failure means: start fresh workers instead
        why = f"preloading failed: {type(exc).__name__}: {exc}"
    finally:  # the workers get the launcher's environment (harness/workerstart.py): leave none of ours
        os.environ.pop(NVML_ENV) if nvml is None else os.environ.__setitem__(NVML_ENV, nvml)
    return {"ok": not why, "why": why, "pid": os.getpid(), "import_s": round(time.monotonic() - t0, 3),
            "started": started, "ready": time.time()}


def start_failed(kind: type, value: BaseException, tb: Any) -> None:
    """This forkserver's ``sys.excepthook``, which each fork keeps until it runs its worker: multiprocessing
    shows it the exception of a start that failed before the worker ran (the fork then exits 1). One line, as
    every harness error; none when the launcher is gone (a stop came while the agent was starting workers:
    the launcher's semaphores went with it, and the fork cannot unpickle its process object). HARNESS_DEBUG=1:
    the traceback."""
    if os.environ.get("HARNESS_DEBUG"):
        sys.__excepthook__(kind, value, tb)
    elif LAUNCHER_PID is None or pid_alive(LAUNCHER_PID):
        print(f"harness launch: a worker process could not start: {kind.__name__}: {value}", file=sys.stderr)


def _write_status(path: str, status: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(status, f)
    os.replace(tmp, path)


def _main() -> None:
    path = os.environ.get(STATUS_ENV)
    if not path:  # imported outside a launcher's forkserver: only the definitions above
        return
    if not _die_with_parent():
        os._exit(0)
    sys.excepthook = start_failed
    try:
        _write_status(path, _preload())
    except OSError:
        pass  # the launch folder is gone: the launcher is ending


_main()
