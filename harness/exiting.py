"""Leaving a process with an exit code but without the interpreter's teardown (``leave``). Standard library only:
the launcher calls it too, possibly while a helper thread is still importing torch."""

from __future__ import annotations

import atexit
import gc
import io
import os
import sys
import threading
from typing import NoReturn


def leave(code: int) -> NoReturn:
    """End the process with ``code``, without the interpreter's teardown.

    Why: gloo's worker threads (C++) drop their reference to a finished collective's work, and with it the
    Python tensors it holds, a moment after the caller saw it complete; that decref takes the GIL. When the
    moment falls into interpreter finalization (a busy machine: the thread waits for a core), the thread
    is unwound by force inside a noexcept destructor: ``terminate called without an active exception``,
    SIGABRT, and a finished job exits -6 (seen here about 1 run in 8 under load; torch's own fix attempt,
    an atexit ``destroy_process_group``, would not help: the groups are destroyed, their threads live on).
    The launcher leaves this way too: teardown resets signal handlers to the default action (a repeated
    SIGTERM there would be death by SIGTERM, not the decided code) and takes ~0.4 s with torch loaded.
    So this does what a normal exit does that matters, then leaves: joins non-daemon threads, runs
    ``atexit`` handlers (logging's flush, users' hooks), flushes every file still open, ``os._exit``."""
    finish()
    os._exit(code)


def finish() -> None:
    """What :func:`leave` does before ``os._exit``; alone for a worker forked by the launcher, which returns
    to multiprocessing (it ends the process with ``os._exit`` too, after handing the agent its result)."""
    shutdown = getattr(threading, "_shutdown", None)  # what interpreter exit runs first; private but stable
    if shutdown is not None:
        shutdown()
    atexit._run_exitfuncs()
    _flush_open_files()


def _flush_open_files() -> None:
    """Flush every open writable file object (finalization would, by closing them): user code that kept a
    log file open without closing it loses nothing."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed pipe: nothing more can be written anyway
            pass
    buffered = (io.TextIOWrapper, io.BufferedWriter, io.BufferedRandom)  # exact types: an ABC check of every
    for obj in gc.get_objects():                                          # object would take 0.2 s
        if type(obj) in buffered:
            try:
                if not obj.closed and obj.writable():
                    obj.flush()
            except Exception:  # noqa: BLE001 - same: leaving regardless
                pass
