"""Exit codes: one meaning per code for ``harness launch`` and ``harness train``, and the mapping from an
exception to its code and its one-line message.

The table below is the text ``harness launch --help`` prints; README.md and docs/launch.md carry the same.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from dataclasses import dataclass

from harness.errors import (CheckpointError, ConfigError, cause_chain, is_accelerator_failure, is_host_out_of_memory,
                            is_storage_unavailable, is_transport_failure)

EXIT_OK = 0
EXIT_ERROR = 1          # anything else (a bug, a crashed peer, out of memory, storage out of retries): retry
EXIT_CONFIG = 2         # bad configuration, found before any worker starts: do not retry
EXIT_CHECKPOINT = 3     # storage/checkpoints unusable or the folder held by another live job: do not retry
EXIT_SIGNAL_BASE = 128  # 128+N: stopped by signal N after committing a checkpoint: retry, it resumes

# Permanent codes: a launcher stops the whole job on them instead of restarting its workers.
PERMANENT = (EXIT_CONFIG, EXIT_CHECKPOINT)
# The signals that mean "commit a checkpoint, then exit 128+N" (in this order the launcher installs its handlers:
# SIGUSR1 last). SIGUSR2 is submitit's (--signal=USR2@90 before a time limit or preemption). Any other signal
# stops a job without a checkpoint.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2, signal.SIGUSR1)


def stopped(code: int) -> bool:
    """True for 128+N of a stop signal: stopped on that signal after committing a checkpoint."""
    return code in {EXIT_SIGNAL_BASE + int(s) for s in STOP_SIGNALS}

TABLE = """\
exit codes (harness launch; harness train in one process):
  0      finished
  128+N  stopped by signal N after committing a checkpoint (143 SIGTERM, 138 SIGUSR1, 140 SIGUSR2,
         130 SIGINT): retry, it resumes
  2      config error (found before any worker starts): do not retry
  3      storage or checkpoints unusable, or another live job holds the folder; never retried by the
         agent: do not retry
  1      anything else, after the agent's --max-restarts are spent: retry a bounded number of times
under bare `torchrun -m harness train` the exit code is torchrun's (1 for any failure or signal)"""


@dataclass(frozen=True)
class Outcome:
    """What an exception means for the process: its exit code and the one line that says why."""

    code: int
    line: str

    @property
    def permanent(self) -> bool:
        return self.code in PERMANENT


def _resource_kind(exc: BaseException) -> str | None:
    """Resource and communication failures (retryable): out of memory, a failed accelerator, a lost peer."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return "out of memory"
    if is_host_out_of_memory(exc):
        return "out of host memory"
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if (accelerator_error is not None and isinstance(exc, accelerator_error)) or is_accelerator_failure(exc):
        return "accelerator error"
    dist_error = getattr(torch.distributed, "DistError", None)
    if (dist_error is not None and isinstance(exc, dist_error)) or is_transport_failure(exc):
        return "communication error"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def classify(exc: BaseException) -> Outcome | None:
    """The outcome of an exception that ends a run; None for anything unexpected (a bug: let it raise, with
    its traceback). A resource failure wrapped in a CheckpointError still counts as the resource failure:
    it says nothing about the checkpoint."""
    if isinstance(exc, ConfigError):
        return Outcome(EXIT_CONFIG, f"harness: config error: {exc}")
    if is_storage_unavailable(exc):  # out of retries, not refused: a restart later may reach it
        return Outcome(EXIT_ERROR, f"harness: storage unreachable (retryable, exit {EXIT_ERROR}): {_first_line(exc)}")
    for link in cause_chain(exc):
        kind = _resource_kind(link)
        if kind is not None:
            return Outcome(EXIT_ERROR, f"harness: {kind} (retryable, exit {EXIT_ERROR}): "
                                       f"{type(link).__name__}: {_first_line(link)}")
    if isinstance(exc, CheckpointError):  # StorageError and LeaseError included
        return Outcome(EXIT_CHECKPOINT, f"harness: checkpoint error: {exc}")
    return None


def debug() -> bool:
    """HARNESS_DEBUG=1: tracebacks with every error line."""
    return os.environ.get("HARNESS_DEBUG", "") not in ("", "0")


def print_line(outcome: Outcome, exc: BaseException | None = None) -> None:
    if exc is not None and debug():
        traceback.print_exception(exc, file=sys.stderr)
    print(outcome.line, file=sys.stderr, flush=True)


def signal_code(signum: int) -> int:
    return EXIT_SIGNAL_BASE + int(signum)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
