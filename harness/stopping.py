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

:class:`StopSignals` gives a training loop of your own the trainer's behaviour: signals recorded, agreed on by
every rank at the same step, acted on by the loop (commit a checkpoint, exit 128+N).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any

from harness import dist, exitcodes, launch_folder
from harness.stepsync import StopVote

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


_restarted = False  # this process stopped for its agent's restart (await_agent_restart saw the agent's note)


def stopped_for_restart() -> bool:
    """Whether this worker's stop was its agent's restart, confirmed: it must not report a stop of the job."""
    return _restarted


def await_agent_restart(timeout_s: float = RESTART_WAIT_S) -> bool:
    """After the checkpoint of a restart stop, on a rank whose own agent has not stopped it yet (it learned of
    the restart from the vote: another node's agent noticed first): wait for it, so that this rank's exit is
    its agent's restart, not a failure that spends one of ``--max-restarts``. False if it never came (the
    caller then reports a stop of the job, which resumes)."""
    global _restarted
    deadline = time.monotonic() + timeout_s
    while not launch_folder.agent_restarting():
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_S)
    _restarted = True
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


class StopSignals:
    """Stop a training loop of your own on a scheduler's signal, at a step every rank agrees on.

    Made on every rank (collective under torch.distributed: it makes a small gloo group), it records SIGTERM,
    SIGUSR1 (SLURM's warning before a time limit), SIGUSR2 and SIGINT instead of letting them end the process.
    :meth:`requested`, called once per step on every rank, returns the signal number once the ranks agree on one
    (a signal on any rank stops every rank at the same step, at most one step after the one it arrived in; no
    device sync, the vote runs on the CPU group), else 0. The loop then commits a checkpoint and leaves with
    :attr:`exit_code` (128+N, what schedulers retry). :meth:`close` restores the previous handlers, or after a
    stop ignores further signals, so that a repeated SIGTERM cannot kill the process during its last save::

        stop = harness.StopSignals()
        while step < max_steps:
            ...one training step...
            if stop.requested():
                mgr.save(step, ...)          # every rank, as always
                break
        mgr.close(); stop.close()
        harness.dist.leave(stop.exit_code)   # 0 when no signal came
    """

    def __init__(self, timeout_s: float = 300.0) -> None:
        self._flag = PreemptionFlag()
        self._vote = StopVote(dist.new_cpu_group(timeout_s))
        self.signum = 0
        self._flag.install()

    def requested(self) -> int:
        """The agreed signal's number (every rank the same, at the same call), or 0. Once per step, every rank."""
        if not self.signum:
            self.signum = self._vote.poll(self._flag.signum)
        return self.signum

    @property
    def exit_code(self) -> int:
        """128 + the agreed signal (143 for SIGTERM), or 0 if none was agreed on."""
        return 128 + self.signum if self.signum else 0

    def close(self) -> None:
        """Finish the vote in flight; then the previous handlers back, or after a stop signals ignored."""
        self._vote.drain()
        if self.signum:
            for sig in HANDLED_SIGNALS:
                signal.signal(sig, signal.SIG_IGN)
        else:
            self._flag.uninstall()
