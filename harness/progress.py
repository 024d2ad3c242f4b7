"""What users watch: a rank-0 progress bar (plain lines when not a terminal) and a metrics JSONL file."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from typing import Any

from harness.errors import StorageError

log = logging.getLogger("harness")


class Progress:
    """Step, loss, samples/s and time to the next checkpoint; redrawn in place on a terminal.

    Called at log steps only (reading the loss waits for the device), with the global mean loss: the number
    metrics.jsonl and the checkpoint of that step record too. The line of the last step says the run finished."""

    def __init__(self, max_steps: int, enabled: bool, every_s: float = 2.0) -> None:
        self.max_steps = max_steps
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        self.every_s = every_s
        self._t_last = self._t_print = time.perf_counter()
        self._step_last: int | None = None
        self._rate = 0.0  # steps per second, smoothed
        self._diverged = False

    def start(self, step: int) -> None:
        """The loop begins at ``step`` (0, or the resumed one): the first line's rate is measured from here."""
        self._t_last, self._step_last = time.perf_counter(), step

    def update(self, step: int, loss: float, samples_per_step: int, every_steps: int) -> None:
        if not self.enabled:
            return
        if not math.isfinite(loss) and not self._diverged:
            self._diverged = True  # said once: a progress line of "loss nan" is easy to miss
            log.warning("loss is %s at step %d: training has diverged (a learning rate too high? train.grad_clip?); "
                        "it goes on, and checkpoint retention keeps the newest checkpoint with a finite loss",
                        loss, step)
        now = time.perf_counter()
        if self._step_last is not None and now > self._t_last:
            rate = (step - self._step_last) / (now - self._t_last)
            self._rate = rate if self._rate == 0 else 0.9 * self._rate + 0.1 * rate
        self._t_last, self._step_last = now, step
        if not self.tty and now - self._t_print < self.every_s and step != self.max_steps:
            return
        self._t_print = now
        line = (f"step {step}/{self.max_steps} | loss {loss:.4f} | {self._rate * samples_per_step:.0f} samples/s "
                f"| {self._tail(step, every_steps)}")
        if self.tty:
            width = 30
            done = int(width * step / self.max_steps)
            sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {line}\033[K")
            sys.stderr.flush()
        else:
            log.info("%s", line)

    def _tail(self, step: int, every_steps: int) -> str:
        if step >= self.max_steps:
            return "finished"
        to_ckpt = min(every_steps - step % every_steps, self.max_steps - step)
        eta = f"{to_ckpt / self._rate:.1f}s" if self._rate else "?"
        return f"next checkpoint in {to_ckpt} steps (~{eta})"

    def saved(self, step: int, seconds: float) -> None:
        if self.tty:
            sys.stderr.write("\n")
        if self.enabled:
            log.info("checkpoint at step %d: training blocked %.3f s", step, seconds)

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


class MetricsLog:
    """Appends one JSON object per line (with a timestamp) to a per-run file; None disables it.

    The file is a record of the run, not the run: a disk that fills up (or goes read-only) under it mid-run
    costs records, never the training or its checkpoints. The first failed append is warned about, the next
    ones are dropped quietly, and the first append that works again says how many were lost. A failed append
    leaves no half line behind (readers parse every line)."""

    def __init__(self, path: str | None, setting: str = "run.output_dir") -> None:
        self.path = path
        self.dropped = 0
        if path:
            prepare_output_dir(os.path.dirname(path), True, setting)

    def write(self, record: dict[str, Any]) -> None:
        if not self.path:
            return
        line = (json.dumps(_strict({"time": round(time.time(), 3), **record})) + "\n").encode()
        try:
            _append_whole(self.path, line)
        except OSError as exc:
            if not self.dropped:
                log.warning("metrics: cannot append to %s (%s); training goes on, its records are dropped until "
                            "the file can be written", self.path, exc)
            self.dropped += 1
            return
        if self.dropped:
            log.warning("metrics: appending to %s again; %d record(s) were dropped", self.path, self.dropped)
            self.dropped = 0


def _strict(record: dict[str, Any]) -> dict[str, Any]:
    """JSON as jq, JavaScript and every strict parser read it: a nan or inf value (a diverged loss) is null,
    not Python's bare NaN, which they refuse (the whole line with it)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


def _append_whole(path: str, data: bytes) -> None:
    """``data`` at the end of ``path``, all of it or none (a short write is truncated away)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        start = os.fstat(fd).st_size
        try:
            done = 0
            while done < len(data):
                done += os.write(fd, data[done:])
        except OSError:
            with contextlib.suppress(OSError):  # not every file can be truncated (a device)
                os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)


def prepare_output_dir(folder: str, create: bool = True, setting: str = "run.output_dir") -> None:
    """Create the run's output folder (metrics.jsonl's: ``Config.output_dir``) or raise a one-line StorageError
    (exit 3, a folder that needs a human): ``harness launch`` calls this before any worker starts, rank 0's
    MetricsLog again. ``create=False`` only checks that it could be made (its nearest existing folder is a
    writable folder): the launcher checks it so before the checkpoint storage, which creates its folder, and
    makes it after, so that neither is left behind, empty, when the other is refused. ``setting`` names where
    the folder comes from in the message (``Config.output_dir_setting``)."""
    folder = folder or "."
    try:
        if create:
            os.makedirs(folder, exist_ok=True)
        existing = _nearest_existing(folder)
        if not os.path.isdir(existing):
            raise NotADirectoryError(f"{existing} is not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):  # a read-only filesystem says so here, even to root
            raise PermissionError(f"cannot write to {existing}")
    except OSError as exc:
        raise StorageError(f"the run's output folder {folder} ({setting}: metrics.jsonl goes there) "
                           f"is not writable: {type(exc).__name__}: {exc}") from None


def _nearest_existing(folder: str) -> str:
    path = os.path.abspath(folder)
    while not os.path.lexists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path
