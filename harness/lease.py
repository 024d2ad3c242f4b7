"""One job per checkpoint folder: the RUN_LEASE record.

Two jobs pointed at the same ``checkpoint.dir`` by mistake would both save, both apply retention and both
resume from each other's checkpoints. At startup rank 0 writes ``DIR/RUN_LEASE`` (JSON: run id, host, pid,
start and heartbeat time) atomically through :meth:`Storage.commit_bytes`, refreshes the heartbeat from a
daemon thread, and removes the record when the process leaves through the trainer's normal exit path
(finished, preempted, failed with an exception). A starting job finding the lease of a *different* run takes
it over when it is stale: at once when written on this host by a process that no longer exists (a ``kill -9``)
or with no heartbeat for ``timeout_s`` by this (the same) host's clock (or the holder's own ``timeout_s``, which
its record carries, when longer); after three of its holder's beats without one (16 s at the defaults) when
written on another host, whose clock may run behind this one's (a live job there would look stale here).
Otherwise it does not trust the clocks or the pid (in a new container, that number may be anyone's): it
watches the record. The live job that holds it rewrites it
every few seconds: the starting job then refuses with :class:`LeaseError` (exit code 3). A record that stays
the same for that timeout belongs to a job that is gone (a node lost, a kill -9 a moment ago) and is taken
over: a job requeued onto another node right after such a death starts up to a minute later instead of
exiting 3. A stop signal ends the watch (LeaseStopped: the trainer exits 128+N, nothing written).

The same job restarting (torchrun ``--max-restarts``, SLURM requeue, a Kubernetes pod restart) keeps its run
id (``run.id``, else TORCHELASTIC_RUN_ID / SLURM_JOB_ID / PET_RDZV_ID) and takes its own lease back.
``torchrun --standalone`` draws a fresh run id per invocation: there the dead-pid rule is what lets "kill -9,
run the same command again" work at once, and the heartbeat timeout covers a job that died on another host.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from typing import Any, Callable

from harness import dist
from harness.config import MAX_DURATION_S, CheckpointConfig
from harness.errors import StorageError, is_storage_unavailable, storage_failure
from harness.hostinfo import pid_alive
from harness.storage import Storage, redact_url

log = logging.getLogger("harness")

LEASE_FILE = "RUN_LEASE"
MAX_LEASE_BYTES = 64 << 10
RUN_ID_ENV = ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "PET_RDZV_ID")


WATCH_POLL_S = 1.0  # how often a starting job re-reads a lease it watches
DEFAULT_TIMEOUT_S = CheckpointConfig.lease_timeout_s  # for a record without its holder's


class LeaseError(StorageError):
    """Another live run holds the checkpoint folder (exit code 3, like every checkpoint-folder problem)."""


class LeaseStopped(Exception):
    """A stop signal came while rank 0 watched another job's lease: nothing was written; a retry resumes."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum} while waiting for the checkpoint folder's lease")
        self.signum = signum


def run_id(configured: str = "") -> str:
    """The id that survives this job's own restarts: run.id, else the launcher's job id, else a fresh one."""
    if configured:
        return configured
    for var in RUN_ID_ENV:
        if os.environ.get(var):
            return f"{var.lower()}:{os.environ[var]}"
    return f"pid:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def read_lease(storage: Storage) -> dict | None:
    """The lease record, None when there is none; an unreadable one comes back as {"unreadable": why}."""
    try:  # one request (a bounded read, no size probe first): a starting job reads it twice, on S3 too
        data = storage.read_bytes(LEASE_FILE, 0, MAX_LEASE_BYTES + 1)
        if len(data) > MAX_LEASE_BYTES:
            return {"unreadable": f"more than {MAX_LEASE_BYTES} bytes"}
        obj = json.loads(data.decode("utf-8"))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as exc:
        return {"unreadable": str(exc)[:100]}
    return obj if isinstance(obj, dict) else {"unreadable": "not a JSON object"}


def describe(lease: dict) -> str:
    return (f"run {str(lease.get('run_id'))[:80]!r} on host {str(lease.get('host'))[:80]}, "
            f"pid {lease.get('pid')}")


def in_use(storage: Storage, holder: dict) -> str:
    """"FOLDER is in use by a live job (run, host, pid, heartbeat N s ago)": what a tool that refuses a folder
    a live job holds (``ckpt prune``, ``ckpt import``) starts its one line with."""
    return (f"{redact_url(storage.url)} is in use by a live job ({describe(holder)}, heartbeat "
            f"{heartbeat_age(holder) or 0:.0f} s ago)")


def heartbeat_age(lease: dict) -> float | None:
    """Seconds since the record's last heartbeat; None when it has none."""
    beat = lease.get("heartbeat")
    if isinstance(beat, bool) or not isinstance(beat, (int, float)):
        return None
    return time.time() - beat


def window_s(lease: dict, timeout_s: float) -> float:
    """How long a lease record must go without a heartbeat before its job counts as gone: ``timeout_s`` (the
    reader's), or the holder's own ``timeout_s`` from its record when longer (at most MAX_DURATION_S).
    The holder beats every min(5 s, its timeout_s / 4): a reader with a shorter timeout than that beat (a
    second job started with ``lease_timeout_s = 3`` beside a live one at the default 60) would otherwise see a
    live job's record as stale between two beats and take its folder over."""
    theirs = lease.get("timeout_s")
    if isinstance(theirs, bool) or not isinstance(theirs, (int, float)) or not math.isfinite(theirs):
        return timeout_s
    return max(timeout_s, min(float(theirs), MAX_DURATION_S))


def beat_s(timeout_s: float) -> float:
    """How often a holder with this ``timeout_s`` rewrites its record: several beats fit in a timeout."""
    return max(0.5, min(5.0, timeout_s / 4))


def confirm_s(lease: dict, timeout_s: float) -> float:
    """How long a record stale by this host's clock but written on another host is watched before it is taken
    over: three of its holder's beats and a second (a record without its ``timeout_s``: the default's 5 s
    beat), at most :func:`window_s`. Long enough for a live holder whose clock runs behind to show itself."""
    theirs = window_s(lease, 0.0) or DEFAULT_TIMEOUT_S
    return min(window_s(lease, timeout_s), 3 * beat_s(theirs) + 1)


def stale_reason(lease: dict, timeout_s: float) -> str | None:
    """Why a lease record no longer belongs to a live job, or None when it does: written on this host by a
    process that is gone (a ``kill -9``), or no heartbeat for :func:`window_s` (a job that died elsewhere)."""
    if "unreadable" in lease:
        return f"unreadable ({lease['unreadable']})"
    if lease.get("host") == socket.gethostname() and not pid_alive(lease.get("pid")):
        return "that process is gone"
    age = heartbeat_age(lease)
    if age is None or age >= window_s(lease, timeout_s):
        return "no heartbeat for " + ("ever" if age is None else f"{age:.0f} s")
    return None


def refuse_if_live(storage: Storage, timeout_s: float, not_doing: str) -> None:
    """For a tool that must not touch a folder a live job holds (``ckpt prune``, ``rollback``, ``import``): a
    LeaseError (a StorageError: exit 3, one line) "FOLDER is in use by a live job (...): ``not_doing``"."""
    holder = live_holder(storage, timeout_s)
    if holder is not None:
        raise LeaseError(f"{in_use(storage, holder)}: {not_doing}")


def live_holder(storage: Storage, timeout_s: float) -> dict | None:
    """The lease record of the live job that holds the folder, None when no live job does (no lease, an
    unreadable one, or a stale one). For tools that must not touch a folder a job is using."""
    held = read_lease(storage)
    if held is None or stale_reason(held, timeout_s) is not None:
        return None
    return held


class Lease:
    """A held lease: heartbeat thread running until :meth:`release`."""

    def __init__(self, storage: Storage, run: str, timeout_s: float, interval_s: float | None = None,
                 watch_s: float | None = None) -> None:
        self.storage = storage
        self.watch_cap_s = watch_s  # see _watch
        self.record = {"run_id": run, "host": socket.gethostname(), "pid": os.getpid(),
                       "token": uuid.uuid4().hex, "started": time.time(), "heartbeat": time.time(),
                       "timeout_s": timeout_s}  # how long a reader must see no beat before it may take over
        self.timeout_s = timeout_s
        self.interval_s = interval_s if interval_s is not None else beat_s(timeout_s)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self) -> None:
        self.record["heartbeat"] = time.time()
        self.storage.commit_bytes(LEASE_FILE, json.dumps(self.record).encode())

    def acquire(self, stopping: Callable[[], int] = lambda: 0) -> None:
        """Take the folder or raise LeaseError naming the run that holds it. ``stopping()``: the stop signal
        received so far (0: none), which ends a watch (:meth:`_watch`) with LeaseStopped."""
        where = redact_url(self.storage.url)
        held = read_lease(self.storage)
        if held is not None and "unreadable" in held:
            log.warning("lease %s/%s is unreadable (%s): taking it over", where, LEASE_FILE, held["unreadable"])
        elif held is not None and held.get("run_id") != self.record["run_id"]:
            stale = stale_reason(held, self.timeout_s)
            if stale is None:
                stale = self._watch(held, stopping)
            elif heartbeat_age(held) is not None and held.get("host") != socket.gethostname():
                stale = self._watch(held, stopping, confirm_s(held, self.timeout_s), stale)
            log.warning("taking over the stale lease of %s in %s: %s", describe(held), where, stale)
        self._write()
        mine = read_lease(self.storage)  # two jobs starting at the same moment: the last writer wins
        if mine is None or mine.get("token") != self.record["token"]:
            raise LeaseError(f"checkpoint.dir {where} was just claimed by another job: "
                             f"{describe(mine or {})}. Two jobs must not share a checkpoint folder")
        self._thread = threading.Thread(target=self._beat, name="harness-lease", daemon=True)
        self._thread.start()

    def _replaced_by(self, held: dict | None) -> bool:
        """``held`` (the record as read now) is another job's: ours was replaced."""
        return held is not None and held.get("token") not in (None, self.record["token"])

    def taken_by(self) -> str | None:
        """Why this job no longer holds the folder (another job's record replaced ours: it took the lease over,
        believing this job gone), or None. One read; a read that fails says nothing (the save that asks then
        meets the storage itself)."""
        try:
            held = read_lease(self.storage)
        except Exception:  # noqa: BLE001 - see above
            return None
        if not self._replaced_by(held):
            return None
        return (f"the lease of {redact_url(self.storage.url)} was taken over by {describe(held)}: this job stops "
                "writing there (two jobs must not share a checkpoint folder)")

    def _watch(self, held: dict, stopping: Callable[[], int], watch_s: float | None = None,
               stale: str = "") -> str:
        """A lease that looks alive by this host's clock (and, on this host, by a live process of its pid, which
        in a new container may be anyone's), or one that looks ``stale`` by it but comes from another host (whose
        clock may disagree), is watched rather than believed: its job rewrites it every few seconds. LeaseError
        as soon as it changes; the reason to take it over if it stays the same for ``watch_s`` (default
        :func:`window_s`; less where the other ranks cannot wait that long: ``watch_cap_s``): its job is gone,
        a node lost or killed with -9 a moment ago, whatever the clocks say."""
        where = redact_url(self.storage.url)
        watch_s = window_s(held, self.timeout_s) if watch_s is None else watch_s
        if self.watch_cap_s is not None:
            watch_s = min(watch_s, self.watch_cap_s)
        log.warning("checkpoint.dir %s holds the lease of %s, heartbeat %.0f s ago by this host's clock%s: waiting up "
                    "to %.0f s for it to beat (another live job: this one exits) or to go stale (taken over)",
                    where, describe(held), heartbeat_age(held) or 0.0,
                    ", which its host's may not agree with" if stale else "", watch_s)
        deadline = time.monotonic() + watch_s
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(WATCH_POLL_S, left))
            if stopping():
                raise LeaseStopped(stopping())
            now = read_lease(self.storage)
            if now is None:
                return "its job released it while this one waited"
            if now != held:
                raise LeaseError(
                    f"checkpoint.dir {where} is in use by another job: {describe(now)}, whose heartbeat moved while "
                    "this job watched it. Two jobs must not share a checkpoint folder; give this one its own "
                    "checkpoint.dir")
        return (stale + " and " if stale else "") + f"its record did not change for {watch_s:.0f} s"

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                held = read_lease(self.storage)
                if self._replaced_by(held):
                    log.error("the lease of %s was taken over by %s: this job no longer holds it",
                              redact_url(self.storage.url), describe(held))
                    return
                self._write()
            except Exception as exc:  # noqa: BLE001 - a missed heartbeat must not stop training
                log.warning("lease heartbeat failed: %s: %s", type(exc).__name__, exc)

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            held = read_lease(self.storage)
            if held is not None and held.get("token") == self.record["token"]:
                self.storage.remove(LEASE_FILE)
        except Exception as exc:  # noqa: BLE001 - leaving: a lease left behind goes stale by itself
            log.warning("could not remove the lease: %s: %s", type(exc).__name__, exc)


def acquire(storage: Storage, configured_id: str, timeout_s: float, group: Any,
            stopping: Callable[[], int] = lambda: 0, group_timeout_s: float | None = None) -> Lease | None:
    """Collective: rank 0 takes the lease; every rank raises LeaseError if it could not (LeaseStopped if a
    stop signal ended rank 0's watch, which lasts at most 80% of ``group_timeout_s``: the other ranks wait
    for it in a collective). Returns the held lease on rank 0, None elsewhere."""
    lease, problem = None, None
    if dist.rank() == 0:
        watch_s = None if group_timeout_s is None else 0.8 * group_timeout_s
        lease = Lease(storage, run_id(configured_id), timeout_s, watch_s=watch_s)
        try:
            lease.acquire(stopping)
        except LeaseStopped as exc:
            lease, problem = None, (exc.signum, "", False)
        except LeaseError as exc:
            lease, problem = None, (0, str(exc), False)
        except Exception as exc:  # noqa: BLE001 - the storage failed: say so on every rank
            lease, problem = None, (0, f"could not take {LEASE_FILE}: {type(exc).__name__}: {exc}",
                                    is_storage_unavailable(exc))
    problem = dist.broadcast(problem, group)
    if problem and problem[0]:
        raise LeaseStopped(problem[0])
    if problem:
        raise storage_failure(*problem[1:], otherwise=LeaseError)
    return lease
