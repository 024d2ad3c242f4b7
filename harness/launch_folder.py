"""The launch folder: how the workers of one ``harness launch`` tell their launcher how they ended.

The launcher makes a private folder and names it to its workers in ``HARNESS_LAUNCH_DIR``. A worker that
ends the job (a permanent error, or a stop on a signal with its checkpoint committed) records it there and
waits for the launcher to stop the agent (:func:`report_outcome`); one whose training ran to its end says so
(:func:`report_finished`). When the agent stops the workers to start them again (a node joined the job, or a
worker failed) the launcher says so first (:func:`mark_agent_restart`), so that its SIGTERM is not taken for a
stop of the job (:func:`agent_restarting`). The launcher's side, which reads these files and decides the exit
code, is in :mod:`harness.launch`. This module is what a worker imports: files and the environment, no torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import time

from harness.exitcodes import Outcome

LAUNCH_DIR_ENV = "HARNESS_LAUNCH_DIR"
STOPPING_FILE = "stopping"       # written by the launcher once the agent is stopping: waiting workers may exit
FINISHED_PREFIX = "finished-"    # + RANK: written by a worker whose training ran to its end
AGENT_RESTART_FILE = "agent-restart"  # the launcher: its agent stops the workers to restart them (its time)
STOP_WAIT_S = 20.0               # a worker waits at most this long for the launcher to stop the job
POLL_S = 0.05


def report_outcome(outcome: Outcome) -> bool:
    """In a worker of ``harness launch``: record an outcome that ends the job (a permanent error, or a stop on a
    signal with the checkpoint committed) for the launcher and wait until it stops the job (so the agent never
    restarts the group for it). Returns False when not under ``harness launch``, or when the record cannot be
    written (the caller then says it itself; the agent may restart the group, which resumes, loses nothing)."""
    folder = os.environ.get(LAUNCH_DIR_ENV)
    if not folder or not os.path.isdir(folder):
        return False
    rank = os.environ.get("RANK", "0")
    record = {"code": outcome.code, "line": outcome.line, "rank": int(rank), "pid": os.getpid()}
    tmp = os.path.join(folder, f".error-{rank}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(record, f)
        os.replace(tmp, os.path.join(folder, f"error-{rank}.json"))  # the launcher never sees half a record
    except OSError:  # a full or vanished /tmp must not turn the outcome into another error
        return False
    deadline = time.monotonic() + STOP_WAIT_S
    while time.monotonic() < deadline and not os.path.exists(os.path.join(folder, STOPPING_FILE)):
        time.sleep(POLL_S)
    return True


def report_finished() -> None:
    """In a worker of ``harness launch``: say that this rank's training ran to its end (final checkpoint
    committed). A signal the launcher gets while the workers are leaving then does not turn a finished job
    into a retryable stop: 128+N would have the scheduler requeue a job that only finds itself done."""
    folder = os.environ.get(LAUNCH_DIR_ENV)
    if folder and os.path.isdir(folder):
        with contextlib.suppress(OSError):  # without it the launcher keeps the signal's code: a requeue, no loss
            open(os.path.join(folder, f"{FINISHED_PREFIX}{os.environ.get('RANK', '0')}"), "w").close()


_started: float | None = None  # this worker's time of start (worker_started): which restart notes are its own


def mark_agent_restart(folder: str) -> None:
    """In the launcher, right before its agent stops the workers to restart them: note the time, atomically."""
    tmp = os.path.join(folder, f".{AGENT_RESTART_FILE}.{os.getpid()}.tmp")
    with contextlib.suppress(OSError):  # without it a restart looks like a stop: the job ends 128+N, resumes later
        with open(tmp, "w") as f:
            f.write(repr(time.time()))
        os.replace(tmp, os.path.join(folder, AGENT_RESTART_FILE))


def worker_started() -> None:
    """In a worker, as it installs its signal handlers: restart notes older than this are not about it."""
    global _started
    _started = time.time()


def agent_restarting() -> bool:
    """In a worker of ``harness launch``: whether its launcher's agent has said, since this worker started, that
    it stops the workers to restart them (so a SIGTERM now is that, not a stop of the job)."""
    folder = os.environ.get(LAUNCH_DIR_ENV)
    if not folder or _started is None:
        return False
    try:
        with open(os.path.join(folder, AGENT_RESTART_FILE)) as f:
            return float(f.read()) >= _started
    except (OSError, ValueError):
        return False
