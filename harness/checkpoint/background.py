"""Background checkpoint work that yields the CPUs to training, and still finishes promptly once waited on.

Writing a snapshot (checksums, copies into the page cache or an upload, fsync) runs beside training. On a
CPU-bound machine every cycle it takes comes out of training, and more than once: training's intra-op
threads work in lockstep, so when one of them is preempted by a writer the others wait for it at the end of
the parallel region. The writer threads here therefore run at the lowest CPU priority the OS gives without
privileges (Linux ``SCHED_IDLE``: they run only on a core no normal thread wants; elsewhere the nicest
``nice``, or nothing where neither applies), and they work in bounded steps (a few MB at a time).

A thread that lowered its own priority cannot raise it again without privileges, and a save that someone
waits on (the next save, a final or SIGTERM save, ``wait()``/``close()``) must not starve behind busy
cores. So the work is a queue of step-wise tasks: the low-priority workers take tasks while nobody waits;
once the save is marked ``urgent``, they hand each task back at its next step boundary and threads at the
waiter's (normal) priority finish the rest. What is left at low priority after that is at most one step
per worker. A save is also made urgent at its ``deadline`` (the saver sets one a quarter of the way to the
next save it expects, ``save.HURRY_AFTER``): when training leaves no idle CPU at all, the rest competes as
ordinary threads then, rather than being found unfinished, and waited for, by the next save.

Only CPU time is given up: the snapshot copy, which training waits for before its optimizer step, is not
done here (see :mod:`~harness.checkpoint.staging`).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import deque
from typing import Protocol

log = logging.getLogger("harness")

PRIORITIES = ("idle", "normal")


class Task(Protocol):
    def step(self) -> bool:
        """Do one bounded piece of the work; True once the task is complete."""

    def fail(self, exc: BaseException) -> None:
        """The task raised: release what it holds and remember why."""


def lower_priority() -> str:
    """Put the calling thread at the lowest CPU priority available; say which ("idle", "nice 19", "normal").
    Linux: ``SCHED_IDLE`` (the thread runs only where no normal thread is runnable), else nice 19 on this
    thread alone. Elsewhere nothing: ``setpriority`` there would renice the whole process."""
    if not sys.platform.startswith("linux"):
        return "normal"
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # pid 0: this thread, not the process
        return "idle"
    except (AttributeError, OSError):
        pass
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # Linux: a thread id renices it alone
        return "nice 19"
    except OSError as exc:
        log.debug("checkpoint writer: could not lower its CPU priority: %s", exc)
        return "normal"


class _Batch:
    """The tasks of one save, and whether somebody waits for them."""

    def __init__(self, tasks: list[Task], urgent: threading.Event) -> None:
        self.left = len(tasks)
        self.urgent = urgent


class YieldingPool:
    """Persistent low-priority worker threads, and a ``run`` that hands the rest of a batch to threads at
    the caller's priority once the batch is urgent. One batch at a time (one save in flight)."""

    def __init__(self, threads: int, priority: str = "idle", name: str = "harness-ckpt-writer") -> None:
        if priority not in PRIORITIES:
            raise ValueError(f"writer priority must be one of {PRIORITIES}, not {priority!r}")
        self.threads, self.priority, self.name = max(1, threads), priority, name
        self._cv = threading.Condition()
        self._queue: deque[tuple[Task, _Batch]] = deque()
        self._workers: list[threading.Thread] = []
        self._closed = False
        self.priorities: dict[int, str] = {}  # native thread id -> the priority each worker got (for checks)
        self.steps = {"low": 0, "normal": 0}  # task steps run by the workers / at the waiter's priority

    def run(self, tasks: list[Task], urgent: threading.Event, deadline: float | None = None) -> None:
        """Run every task to completion (a task that raises is failed, the others still run); return when all
        are done. Called by the save's own thread, whose priority the urgent path uses. ``deadline``
        (``time.monotonic()``): when to make the batch urgent if nobody did before."""
        if not tasks:
            return
        if self._closed:
            raise RuntimeError("checkpoint writer pool is closed")
        self._start_workers()
        batch = _Batch(tasks, urgent)
        with self._cv:
            self._queue.extend((t, batch) for t in tasks)
            self._cv.notify_all()
            while batch.left and not urgent.is_set():
                left = 0.5 if deadline is None else deadline - time.monotonic()
                if left <= 0:
                    log.debug("checkpoint writer: not done by its deadline, going on at normal priority")
                    urgent.set()
                    break
                self._cv.wait(min(0.5, left))  # woken by progress and by poke(); 0.5 s guards a lost wakeup
            if not batch.left:
                return
        # Urgent: finish at this thread's priority, with helpers for the parallelism the workers had.
        helpers = [threading.Thread(target=self._work, args=(False, batch), daemon=True,
                                    name=f"{self.name}-urgent") for _ in range(self.threads - 1)]
        for h in helpers:
            h.start()
        self._work(False, batch)
        for h in helpers:
            h.join()

    def poke(self) -> None:
        """Wake everyone to re-read the urgent flags (call after setting one)."""
        with self._cv:
            self._cv.notify_all()

    def close(self) -> None:
        """Let the workers go. Not joined: no batch is running (one only ends with every task done), and a
        worker at idle priority behind busy cores may take a while to be scheduled just to exit."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._workers = []

    # -- internals ------------------------------------------------------------------------------------

    def _start_workers(self) -> None:
        """Started on first use (a manager that never saves in the background has none). Not waited for:
        once a worker has lowered its priority, busy cores may keep it from running for a while."""
        if self._workers:
            return
        for i in range(self.threads):
            w = threading.Thread(target=self._worker_main, daemon=True, name=f"{self.name}-{i}")
            self._workers.append(w)
            w.start()

    def _worker_main(self) -> None:
        got = lower_priority() if self.priority == "idle" else "normal"
        with self._cv:
            self.priorities[threading.get_native_id()] = got
        self._work(True, None)

    def _take(self, low: bool, batch: _Batch | None) -> tuple[Task, _Batch] | None:
        """The next task this thread may run: low-priority workers leave urgent batches alone; an urgent
        helper takes only its own batch's."""
        for i, (task, b) in enumerate(self._queue):
            if (low and not b.urgent.is_set()) or (not low and b is batch):
                del self._queue[i]
                return task, b
        return None

    def _work(self, low: bool, batch: _Batch | None) -> None:
        while True:
            with self._cv:
                while True:
                    if (low and self._closed) or (not low and not batch.left):
                        return
                    got = self._take(low, batch)
                    if got is not None:
                        break
                    self._cv.wait(0.5)
            task, b = got
            done, n = self._advance(task, b, low)
            with self._cv:
                self.steps["low" if low else "normal"] += n
                if done:
                    b.left -= 1
                else:  # urgent while a low-priority worker held it: back to the front, for a normal thread
                    self._queue.appendleft((task, b))
                self._cv.notify_all()

    @staticmethod
    def _advance(task: Task, b: _Batch, low: bool) -> tuple[bool, int]:
        """Step ``task`` until it is done (True) or, on a low-priority worker, its batch turns urgent (False);
        and how many steps that took."""
        n = 0
        while True:
            n += 1
            try:
                if task.step():
                    return True, n
            except BaseException as exc:  # noqa: BLE001 - the save reports it; the thread lives on
                task.fail(exc)
                return True, n
            if low and b.urgent.is_set():
                return False, n
