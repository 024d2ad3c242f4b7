"""CheckpointManager: collective save/restore of complete training state, usable from any loop.

A thin facade: :mod:`~harness.checkpoint.save` captures, writes and commits; :mod:`~harness.checkpoint.restore`
chooses, reads and applies; :mod:`~harness.checkpoint.kinds` sorts the objects given into kinds of state.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
from typing import Any, Callable, Mapping

import torch

from harness import dist, lease
from harness.checkpoint import arguments, blobs, foreign, retention, shared
from harness.checkpoint.apply import RestoreOptions, RestoreResult
from harness.checkpoint.context import Ctx
from harness.checkpoint.discovery import scan
from harness.checkpoint.kinds import Named, gather
from harness.checkpoint.load import refuse_meta
from harness.checkpoint.restore import restore as _restore
from harness.checkpoint.save import Saver, SaveSettings
from harness.checkpoint.snapshot import Snapshot
from harness.errors import ConfigError, StorageError, is_storage_unavailable, storage_failure
from harness.state import Stateful
from harness.storage import Storage

__all__ = ["CheckpointManager", "RestoreResult"]

log = logging.getLogger("harness")


class CheckpointManager:
    """Saves and restores checkpoints under one folder or URL.

    Collective under torch.distributed: every rank constructs it and calls save/restore/wait/close at the
    same points. Rank 0 writes replicated state and commits; each rank writes its own RNG and data
    cursor. With ``async_save`` the call returns after a host copy and persisting runs in the background.

    What to save is given as ``state={name: object}`` (objects with ``state_dict()``/``load_state_dict()``,
    sorted by type: modules, optimizers, LR schedulers, a GradScaler, anything else as an extra), or with
    the keyword arguments ``models=``, ``optimizers=``, ``schedulers=``, ``scaler=``, ``extra=``, or both.

    Overlapped saves (``async_save=True``): ``save(..., overlap=True)`` returns once the host copy is
    scheduled, and the copy of the parameters and optimizer state runs while the next forward and backward
    compute (a side CUDA stream, or the save's thread on CPU). The loop must then call
    :meth:`before_mutation` right before anything changes the saved tensors (``optimizer.step()``, a
    GradScaler's ``step``/``update``, ``scheduler.step()``); it is free when no save is pending, so call it
    every step::

        loss.backward()
        mgr.before_mutation()   # waits for the snapshot only if one is still being copied
        opt.step()
        sched.step()
        ...
        mgr.save(step, models=model, optimizers=opt, overlap=True)

    A change of a saved tensor before that call is detected (each tensor's in-place version counter) and
    the save fails with a CheckpointError, nothing committed, rather than mixing two steps. Without
    ``overlap`` a save waits for its copy before returning, as safe as ever with no call needed.

    A background save's checksums, writes and fsync run on threads at the lowest CPU priority
    (``writer_priority="idle"``: Linux ``SCHED_IDLE``), so they take only CPU time training leaves unused;
    once anything waits for the save (the next save, ``wait()``, ``close()``) the rest runs at the waiter's
    priority. ``writer_priority="normal"`` makes the writers compete with training as ordinary threads.
    """

    def __init__(self, dir: str | os.PathLike, *, keep_last: int = 3, keep_best: int = 0, best_metric: str = "loss",
                 best_mode: str = "min", async_save: bool = False, storage_options: dict | None = None,
                 max_file_bytes: int = 256 << 20, io_threads: int = 4, timeout_s: float = 600.0,
                 split_replicated: bool = False, shard_chunk_bytes: int = blobs.CHUNK_BYTES,
                 read_only: bool = False, writer_priority: str = "idle") -> None:
        arguments.check_settings(keep_last=keep_last, keep_best=keep_best, max_file_bytes=max_file_bytes,
                                 shard_chunk_bytes=shard_chunk_bytes, io_threads=io_threads, timeout_s=timeout_s,
                                 writer_priority=writer_priority, best_metric=best_metric, best_mode=best_mode)
        dist.require_group_if_launched("CheckpointManager")  # torchrun without init_process_group: refuse
        self.storage = Storage(arguments.folder(dir), storage_options)
        self.rank, self.world_size = dist.rank(), dist.world_size()
        with dist.late_peers_warning("CheckpointManager(...)", timeout_s):  # made under `if rank == 0:`?
            self._group = dist.new_cpu_group(timeout_s)
        self._ctx = Ctx(self.storage, self._group, self.rank, self.world_size, io_threads, timeout_s)
        self._check_storage(write=not read_only)
        settings = SaveSettings(max_file_bytes=max_file_bytes, shard_chunk_bytes=shard_chunk_bytes,
                                split_replicated=split_replicated,
                                policy=retention.RetentionPolicy(keep_last, keep_best, best_metric, best_mode),
                                writer_priority=writer_priority)
        self._saver = Saver(self._ctx, settings, async_save)
        self._best_metric_warned = False
        self._lease: lease.Lease | None = None  # hold_folder(), on rank 0
        self._lease_held = False

    def _check_storage(self, write: bool) -> None:
        """Fail fast: an unwritable folder, a missing bucket, rejected credentials or a missing permission is a
        one-line StorageError on every rank now, not at the first save. Rank 0 checks (skipped when ``harness
        launch`` checked the same storage moments ago: :meth:`Storage.access_remembered`); all ranks raise.
        A writer with several ranks also checks that they all see one folder (:mod:`~harness.checkpoint.shared`:
        a job on several machines with the folder on each one's own disk)."""
        problem, marker, inside = None, None, None
        if self.rank == 0:
            try:
                if not self.storage.access_remembered(write):
                    self.storage.check_access(write=write)
                inside = foreign.inside_one_checkpoint(self.storage) if write else None
                if write and self.world_size > 1 and not inside:
                    marker = shared.write_marker(self.storage)
            except StorageError as exc:
                problem = (str(exc), is_storage_unavailable(exc))
            except Exception as exc:  # noqa: BLE001 - the marker's write: the others wait on the broadcast
                problem = (str(self.storage.access_error(exc)), is_storage_unavailable(exc))
        problem, marker, inside = dist.broadcast((problem, marker, inside), self._group)
        if problem:
            raise storage_failure(*problem, otherwise=StorageError)  # out of retries (exit 1) or refused (3)
        if inside:  # a step-N folder given as the folder of checkpoints: nothing written into it (exit 2)
            raise ConfigError(inside)
        shared.check(self.storage, marker, self._group, self.rank, self.world_size)

    @property
    def last_saved(self) -> str | None:
        """Name of the checkpoint the last completed save committed."""
        return self._saver.last_saved

    @property
    def snapshot(self) -> Snapshot:
        """The host snapshot buffer (its ``nbytes``, ``pinned``, ``allocations``): for accounting."""
        return self._saver.snapshot

    @property
    def other_tools_checkpoints(self) -> list[str] | None:
        """On rank 0, after a restore that found no checkpoint: other tools' checkpoints in the folder (torchtitan's
        ``step-N``, Lightning's ``.ckpt``...; :mod:`harness.checkpoint.foreign`), newest last; else None."""
        return self._ctx.others

    @property
    def _pool(self) -> cf.ThreadPoolExecutor | None:  # the background save thread (None: sync saves)
        return self._saver.pool

    def save(self, step: int, state: Mapping[str, Stateful | Any] | None = None, *,
             models: Named[torch.nn.Module] = None, optimizers: Named[torch.optim.Optimizer] = None,
             schedulers: Named[Stateful] = None, scaler: Stateful | None = None, epoch: int = 0,
             position: Any = None, loss: float | None = None, metrics: dict | None = None,
             extra: Mapping[str, Any] | None = None, rank_state: Any = None, metadata: dict | None = None,
             overlap: bool = False) -> None:
        """Checkpoint the given state as of ``step``. Collective. ``position`` and ``rank_state`` are this
        rank's own (data cursor, anything per rank); everything else is replicated and written once (by rank
        0, or split across ranks with ``split_replicated``), except sharded state: a ZeroRedundancyOptimizer
        (each rank writes the state of the parameters it owns) and DTensor (FSDP2) models and their
        optimizers (each rank writes its local shards).

        ``overlap=True`` (with ``async_save``): return once the snapshot is scheduled; the caller then
        calls :meth:`before_mutation` before changing the saved state (see the class docstring). A
        synchronous manager ignores it: its save is committed on return."""
        by_section = dict(models=models, optimizers=optimizers, schedulers=schedulers, scaler=scaler, extra=extra)
        arguments.check_objects(by_section)
        targets = gather(state, **by_section)
        step, epoch = arguments.counter(step, "step"), arguments.counter(epoch, "epoch")
        loss, metrics = arguments.loss_value(arguments.summary(loss)), arguments.summary(metrics)
        position, rank_state = arguments.own_state(position), arguments.own_state(rank_state)
        self._check_best_metric(metrics)
        self._saver.save(targets, step, epoch=epoch, position=position, loss=loss, metrics=metrics,
                         metadata=metadata, rank_state=rank_state, overlap=overlap)

    def _check_best_metric(self, metrics: dict | None) -> None:
        """keep_best by a metric the saves do not report keeps nothing by it: say so once (a typo such as
        'acc' for 'accuracy' would otherwise only show when the best checkpoint is gone). A save without
        metrics (before a loop's first evaluation) says nothing either way."""
        policy = self._saver.settings.policy
        if (policy.keep_best and policy.best_metric != "loss" and metrics and policy.best_metric not in metrics
                and self.rank == 0 and not self._best_metric_warned):
            self._best_metric_warned = True
            log.warning("best_metric %r is not among the saved metrics (%s): keep_best=%d keeps no checkpoint by "
                        "it", policy.best_metric, ", ".join(map(str, metrics)), policy.keep_best)

    def before_mutation(self) -> None:
        """Call right before the optimizer step, the scaler's step/update and the scheduler step (anything
        that changes the saved tensors in place). After ``save(..., overlap=True)`` it orders those changes
        after the snapshot's copies (on a GPU without blocking the host: the caller's streams wait for the
        copy; on CPU it waits for the copy thread) and fails the save if a saved tensor changed before it.
        With no overlapped save pending it does nothing, so calling it every step costs nothing."""
        self._saver.before_mutation()

    def wait(self) -> None:
        """Block until the save in flight (if any) is committed; re-raise its failure. Also the wait point of
        an overlapped save (the caller changes nothing while it waits)."""
        self._saver.wait()

    def set_write_guard(self, guard: Callable[[], str | None] | None) -> None:
        """``guard()`` says why this job must not write to the folder now, or None. Rank 0 asks it before each
        save; when it answers, no rank writes anything and every rank raises CheckpointError with that reason.
        ``harness train`` passes its run lease's check: a job whose folder another job has taken over (believing
        it gone) stops there, rather than write and prune beside the new one."""
        self._saver.guard = guard

    def hold_folder(self, run_id: str = "", lease_timeout_s: float = 60.0,
                    stopping: Callable[[], int] = lambda: 0) -> bool:
        """One job per checkpoint folder, for a loop of your own (``harness train`` does it itself). Collective.

        Rank 0 writes ``RUN_LEASE`` (run id, host, pid) and rewrites it every few seconds until :meth:`close`.
        A folder another live job holds raises :class:`harness.lease.LeaseError` (a StorageError) naming that
        job's host and pid, nothing written; a lease left by a job that is gone (its process on this host no
        longer exists, or its record has not changed for ``lease_timeout_s``) is taken over. ``run_id``: the
        same id takes its lease back at once (this job restarted); by default the scheduler's job id
        (TORCHELASTIC_RUN_ID, SLURM_JOB_ID, PET_RDZV_ID), else one per process. From then on a save that finds
        the folder taken over by another job raises CheckpointError instead of writing beside it. ``stopping()``:
        a stop signal received meanwhile (0: none), which ends a watch of another job's lease with
        :class:`harness.lease.LeaseStopped`. Returns True on rank 0 (which holds it), False elsewhere."""
        if not self._lease_held:
            self._lease = lease.acquire(self.storage, run_id, lease_timeout_s, self._group, stopping=stopping,
                                        group_timeout_s=self._ctx.timeout_s)
            self._lease_held = True
            if self._lease is not None:  # rank 0: it asks the guard before each save
                self.set_write_guard(self._lease.taken_by)
        return self._lease is not None

    def close(self) -> None:
        """Finish the save in flight, release the background thread and the snapshot buffer (and the folder's
        lease, if held). Collective."""
        try:
            self._saver.close()
        finally:
            if self._lease is not None:  # after the last save: the folder is ours till then
                self._lease.release()
                self._lease = None

    def restore(self, state: Mapping[str, Stateful | Any] | None = None, *,
                models: Named[torch.nn.Module] = None, optimizers: Named[torch.optim.Optimizer] = None,
                schedulers: Named[Stateful] = None, scaler: Stateful | None = None,
                extra: Mapping[str, Any] | None = None, step: int | None = None, strict: bool = True,
                skip_mismatched: bool = False, rng: bool = True) -> RestoreResult | None:
        """Load the newest valid checkpoint (or the one at ``step``) into the given objects. Collective.

        Rank 0 walks back from the newest committed checkpoint, verifying every checksum, past any that
        fail (logging why; damaged ones are never deleted), and broadcasts its choice so all ranks load the
        same one. Returns None when there is no checkpoint at all (a first run). Out of memory, a failing
        accelerator or process group keep their exception type (retryable); only a problem of the
        checkpoint itself is a CheckpointError."""
        by_section = dict(models=models, optimizers=optimizers, schedulers=schedulers, scaler=scaler, extra=extra)
        arguments.check_objects(by_section)
        step = arguments.optional_counter(step, "step")
        self.wait()
        targets = gather(state, **by_section)
        for name, model in targets.models.items():
            refuse_meta(model, f"model {name!r}")  # torch would skip its tensors; the restore said "loaded"
        return _restore(self._ctx, targets, RestoreOptions(step=step, strict=strict,
                                                           skip_mismatched=skip_mismatched, rng=rng))

    def latest(self) -> str | None:
        """Name of the newest committed checkpoint (not verified), or None. One listing: no record is read."""
        committed = [i for i in scan(self.storage) if i.committed]
        return committed[-1].name if committed else None
