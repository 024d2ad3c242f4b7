"""How a worker learns that it must stop: its signal handlers, its agent's death, its agent's restart.

A signal handler only records the signal (:class:`PreemptionFlag`); the training loop acts on it at a step
boundary, after the ranks agree on it (harness/stepsync.py). Which kind of stop it is matters to the scheduler:

* a stop of the job (SIGTERM/SIGUSR1/... from a scheduler: preemption, a time limit): commit a checkpoint, exit
  128+N, and under ``harness launch`` tell the launcher, which ends the job with that code;
* the launcher's elastic agent stopping its workers to start them again (a node joined the job: torch's agent
  restarts every worker group to take it in; or a worker failed). Its SIGTERM looked like a preemption: the
  workers committed, told the launcher, and it ended the job with 143 instead of letting the agent restart it
  (scaling an elastic job up stopped it). The launcher notes a restart before its agent sends the signal
  (harness/launch_folder.py); the workers commit the same checkpoint, so the new group resumes exactly there,
  and leave without ending the job.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any

from harness import exitcodes, launch_folder

log = logging.getLogger("harness")

HANDLED_SIGNALS = exitcodes.STOP_SIGNALS
RESTART_WAIT_S = 30.0  # a rank told by the vote that the agents restart: how long it waits for its own agent's
POLL_S = 0.05


class PreemptionFlag:
    """Signal handlers only record the signal; the loop acts on it at a step boundary."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        launch_folder.worker_started()  # restart notes from before this are about earlier workers
        for sig in HANDLED_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = self.signum or signum

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agent_restart(self) -> bool:
        """Whether the pending signal is this worker's agent stopping it to restart the workers."""
        return self.signum == signal.SIGTERM and launch_folder.agent_restarting()


def await_agent_restart(timeout_s: float = RESTART_WAIT_S) -> bool:
    """After the checkpoint of a restart stop, on a rank whose own agent has not stopped it yet (it learned of
    the restart from the vote: another node's agent noticed first): wait for it, so that this rank's exit is
    its agent's restart, not a failure that spends one of ``--max-restarts``. False if it never came (the
    caller then reports a stop of the job, which resumes)."""
    deadline = time.monotonic() + timeout_s
    while not launch_folder.agent_restarting():
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_S)
    return True


def watch_launcher(interval_s: float = 0.5) -> None:
    """Under torchrun: exit when the agent dies. torchrun starts each worker in a session of its own, so
    killing the agent (kill -9 of its process group, an OOM kill) would otherwise leave the workers
    training and checkpointing on their own, side by side with the workers of the restarted job."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        log.error("torchrun agent (pid %d) is gone: exiting", parent)
        os._exit(exitcodes.EXIT_ERROR)

    threading.Thread(target=watch, name="harness-launcher-watch", daemon=True).start()
