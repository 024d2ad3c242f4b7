"""The training loop: DDP under torchrun, resume on every start, checkpoint on schedule and on preemption.

The trainer sees the checkpoint layer only through CheckpointManager's save/restore/wait/close and
before_mutation (async saves are overlapped: the snapshot's copy runs beside the next forward and backward).
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import signal
import threading
import time
from typing import Any

import torch
import torch.distributed as torch_dist

from harness import determinism, dist, faults, lease, recipe, sameconfig, srun
from harness.checkpoint import CheckpointManager
from harness.checkpoint.foreign import refuse_fresh_start
from harness.checkpoint.prune import clean_leftovers
from harness.config import Config, as_config
from harness.errors import CheckpointError, ConfigError, StateMismatchError, StorageError
from harness.progress import MetricsLog, Progress
from harness.recipe import (WorkloadBuilder, build_optimizer, build_scheduler, fsdp_wrap, safe_metadata,
                            schedule_changes, seed_everything)
from harness.stepsync import StepStats, StopVote
from harness.stopping import HANDLED_SIGNALS, PreemptionFlag, await_agent_restart, watch_launcher
from harness.storage import redact_url
# One meaning per exit code, for `harness train` and `harness launch` alike: harness/exitcodes.py, which also maps
# an exception to its code (ConfigError 2, CheckpointError/StorageError 3, OOM/accelerator/communication 1).
from harness import exitcodes
from harness.exitcodes import EXIT_OK

log = logging.getLogger("harness")



# Libraries whose INFO records are their own bookkeeping (botocore: "Found credentials in environment
# variables." on every rank at every start), not the run's: WARNING and up unless HARNESS_DEBUG=1 or the user
# set their level.
QUIET_LOGGERS = ("botocore", "aiobotocore", "boto3", "s3fs", "urllib3", "fsspec")


def setup_logging(rank: int) -> None:
    fmt = f"[rank {rank}] %(asctime)s %(levelname)s %(message)s"
    logging.basicConfig(level=logging.INFO, format=fmt, datefmt="%H:%M:%S", force=True)
    if exitcodes.debug():
        return
    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)


def init_distributed(cfg: Config) -> torch.device:
    """Join the torchrun process group when launched by torchrun; pick the device and backend."""
    want_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise ConfigError("train.device = 'cuda' but no CUDA device is available")
    backend = cfg.dist.backend if cfg.dist.backend != "auto" else ("nccl" if want_cuda else "gloo")
    if backend == "nccl" and not want_cuda:  # train.device = "auto" on a machine without CUDA
        raise ConfigError("dist.backend = 'nccl' needs CUDA, but no CUDA device is available: "
                          "use dist.backend = 'gloo' (or 'auto')")
    if cfg.train.deterministic:
        determinism.enable()  # before CUDA is initialized: cuBLAS reads its workspace setting then
    srun.adopt()  # harness.trainer.train() in an srun task (harness train did it already)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", srun.cuda_index(local_rank)) if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(device)  # also what the checkpoint's CUDA RNG state refers to (harness/state.py)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.initialized():
        # No connect back-off when rank 0 is a moment late; bounded, so a rank 0 that never comes adds at
        # most STORE_WAIT_S to init_process_group's own timeout, not a second full timeout.
        dist.wait_for_store_host(min(cfg.dist.timeout_s, dist.STORE_WAIT_S))
        torch_dist.init_process_group(backend=backend,
                                      timeout=datetime.timedelta(seconds=cfg.dist.timeout_s),
                                      device_id=device if backend == "nccl" else None)
    return device


class Trainer:
    """One rank's training run. ``run()`` returns the process exit code."""

    def __init__(self, cfg: Config, builder: WorkloadBuilder | None = None, exit_after: bool = False) -> None:
        self.cfg = cfg
        self.builder = builder
        self.exit_after = exit_after  # the process ends with this run (harness train): see close()
        self.flag = PreemptionFlag()
        self.step = 0
        self.epoch = 0
        self.last_loss: float | None = None  # global mean over ranks, of step ``loss_step``
        self.loss_step = -1
        self.metrics: dict = {}
        self.saved_step = -1   # the step whose checkpoint is committed or in flight
        self.preempted = False
        self.deferred = False  # the model was built without its initial weights (setup)

    # -- setup ----------------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg = self.cfg
        # A built-in model is built without its initial weights (on the meta device): a restore overwrites
        # every one of them, and a fresh start draws them in resume(). FSDP shards a model as it is built.
        self.deferred = self.builder is None and not cfg.train.entry and cfg.train.parallel != "fsdp"
        # config errors surface before any process group or storage work
        workload = recipe.workload(cfg, self.builder, deferred=self.deferred)
        self.device = init_distributed(cfg)
        self.rank, self.world = dist.rank(), dist.world_size()
        sameconfig.check(cfg, vote_group := dist.new_cpu_group(cfg.dist.timeout_s))  # same settings everywhere, or 2
        self.loader = recipe.loader(cfg, workload.dataset, self.world, self.rank)  # before any storage work
        self.sampler = self.loader.sampler
        setup_logging(self.rank)
        if self.rank == 0 and (task := srun.adopted()) is not None:
            log.info("%s", task.line())
        self.flag.install()
        watch_launcher()
        model = (recipe.materialize(workload.model, self.device) if self.deferred
                 else workload.model.to(self.device))
        self.module = model  # unwrapped
        self.loss_fn, self.metric_fn = workload.loss_fn, workload.metric_fn
        parallel = cfg.train.parallel if dist.initialized() else "ddp"  # one process: nothing to shard
        if parallel == "fsdp":
            self.model = fsdp_wrap(model)
        else:
            # Deferred: no broadcast of rank 0's weights here; every rank restores the same ones, and a fresh
            # start broadcasts its drawn ones (resume).
            self.model = (recipe.ddp_wrap(model, self.device, init_sync=not self.deferred)
                          if dist.initialized() else model)
        self.optimizer = build_optimizer(cfg, self.model.parameters(), zero=parallel == "zero")
        self.scheduler = build_scheduler(cfg, self.optimizer)
        use_amp = cfg.train.amp and self.device.type == "cuda"
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[cfg.train.amp_dtype] if use_amp else None
        # bf16 has fp32's exponent range, so gradients do not underflow: no loss scaling, and none of the
        # scaler's per-step host sync (its inf check). fp16 needs the scaler.
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype is torch.float16 else None
        self.attention_kernels = determinism.attention_kernels(cfg.train.deterministic, self.device)
        c = cfg.checkpoint
        self.mgr = CheckpointManager(c.dir, keep_last=c.keep_last, keep_best=c.keep_best, best_metric=c.best_metric,
                                     best_mode=c.best_mode, async_save=c.async_save,
                                     storage_options=c.storage_options, max_file_bytes=c.max_file_mb << 20,
                                     io_threads=c.io_threads, timeout_s=c.timeout_s, split_replicated=c.split_writes)
        # One job per checkpoint folder: refuse (exit 3) if another live run holds it (harness/lease.py); a save
        # after another job took it over writes nothing (the manager's write guard); released by mgr.close().
        if self.mgr.hold_folder(cfg.run.id, c.lease_timeout_s, stopping=lambda: self.flag.signum):
            clean_leftovers(self.mgr.storage)  # rank 0 holds the folder: no live job writes an uncommitted save
        self.progress = Progress(cfg.train.max_steps, enabled=self.rank == 0)
        self.metrics_log = self._metrics_log(cfg.output_dir)
        self.stats = StepStats(self.device)
        self.vote = StopVote(vote_group)  # its own group: never waits on a save
        self._say_setup(parallel)  # after the storage checks: an error before it stays one line on stderr

    def _say_setup(self, parallel: str) -> None:
        """Rank 0's first line (Lightning prints the same): where and how this run trains. A config written for
        GPUs (train.device = "auto", train.amp) started on a machine without one says so here."""
        if self.rank != 0:
            return
        params = sum(p.numel() for p in self.module.parameters())
        amp = str(self.amp_dtype).removeprefix("torch.") if self.amp_dtype is not None else "off"
        note = " (train.amp is for CUDA)" if self.cfg.train.amp and self.amp_dtype is None else ""
        log.info("training on %s: %d rank(s), %s, %.2fM parameters, amp %s%s", self.device, self.world,
                 parallel, params / 1e6, amp, note)

    def _metrics_log(self, folder: str) -> MetricsLog:
        """Rank 0's metrics.jsonl, beside the run's checkpoints by default (Config.output_dir: two runs never
        append to one file). A folder it cannot make fails every rank at once, not rank 0 alone while the others
        wait in the next collective (bare torchrun then SIGKILLs them 30 s later)."""
        metrics, problem = MetricsLog(None), None
        if self.rank == 0:
            try:
                metrics = MetricsLog(os.path.join(folder, "metrics.jsonl"), self.cfg.output_dir_setting)
            except StorageError as exc:
                problem = str(exc)
        problem = dist.broadcast(problem, self.mgr._group)
        if problem:
            raise StorageError(problem)
        return metrics

    def resume(self) -> None:
        """Every start: restore the newest valid checkpoint, or seed a fresh run."""
        seed_everything(self.cfg.train.seed + self.rank)
        t0 = time.perf_counter()
        try:
            result = self.mgr.restore(models={"model": self.model}, optimizers={"optimizer": self.optimizer},
                                      schedulers={"scheduler": self.scheduler}, scaler=self.scaler)
        except StateMismatchError as exc:  # a valid checkpoint of another config: say which way out there is
            raise StateMismatchError(
                f"{exc.reason}. The config differs from the one the run in {redact_url(self.cfg.checkpoint.dir)} "
                "was saved with (`harness ckpt inspect` shows that one): resume with it, or start a new "
                "checkpoint.dir") from None
        if result is None:
            self._start_fresh()
            return
        self.step, self.epoch, self.saved_step = result.step, result.epoch, result.step
        self.last_loss, self.metrics = result.loss, dict(result.metrics)
        try:
            self.sampler.load_state_dict(self._position(result))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:  # no sampler wrote it: the checkpoint's fault
            raise CheckpointError(f"{result.name}: unusable data position {str(result.position)[:200]}: "
                                  f"{exc}") from None
        for name, reason in result.skipped:
            log.warning("skipped damaged checkpoint %s: %s", name, reason)
        self._warn_overridden_lr()
        self._warn_changed_schedule(result.metadata.get("config"))
        log.info("resumed from %s at step %d (epoch %d) in %.2f s", result.name, self.step, self.epoch,
                 time.perf_counter() - t0)
        self.metrics_log.write({"event": "resume", "step": self.step, "checkpoint": result.name,
                                "seconds": round(time.perf_counter() - t0, 3)})

    def _start_fresh(self) -> None:
        """No checkpoint yet: the weights a normal build draws, or checkpoint.init_from's where it has them
        (fine-tuning), and rank 0's on every rank (as DDP does)."""
        source = self.cfg.checkpoint.init_from
        refuse_fresh_start(self.mgr.storage, source, self.mgr._group, self.mgr.other_tools_checkpoints)
        if self.deferred:
            recipe.initialize(self.cfg, self.module)
        if source:  # imported here: the file readers it needs cost every other start nothing
            from harness.interop.inference import initial_weights
            initial_weights(self.module, source, storage_options=self.cfg.checkpoint.storage_options,
                            group=self.mgr._group)  # broadcasts them
        elif self.deferred:
            dist.broadcast_module(self.module)
        log.info("no checkpoint found in %s: starting at step 0%s", redact_url(self.cfg.checkpoint.dir),
                 f" from the weights of {redact_url(source)}" if source else "")
        event = {"event": "start", "step": 0}
        self.metrics_log.write({**event, "init_from": redact_url(source)} if source else event)

    def _warn_overridden_lr(self) -> None:
        """The saved optimizer and schedule win over the config (torch's load_state_dict): a changed optim.lr
        would otherwise be ignored without a word."""
        saved = (getattr(self.scheduler, "base_lrs", None) or [None])[0]
        if self.rank == 0 and saved is not None and not math.isclose(saved, self.cfg.optim.lr, rel_tol=1e-9):
            log.warning("optim.lr = %g in the config, %g in the checkpoint: the checkpoint's schedule continues "
                        "(a new checkpoint.dir starts one with the config's)", self.cfg.optim.lr, saved)

    def _warn_changed_schedule(self, saved: Any) -> None:
        """A schedule setting changed since the checkpoint (train.max_steps raised to train longer under
        cosine, another scheduler.name): the step count carries over, the shape is the config's, so the LR
        jumps. Said with both LRs, as Lightning users see a scheduler's saved T_max win instead."""
        if self.step > self.cfg.train.max_steps and self.rank == 0:  # no step will use the schedule
            log.warning("the checkpoint is at step %d, past train.max_steps = %d: nothing left to train",
                        self.step, self.cfg.train.max_steps)
        changes = schedule_changes(saved, self.cfg) if self.rank == 0 else []
        if not changes or self.step > self.cfg.train.max_steps:
            return
        sch = self.scheduler
        now = sch.base_lrs[0] * sch.lr_lambdas[0](sch.last_epoch)
        log.warning("the LR schedule differs from the checkpoint's (%s): from step %d it follows this config, LR "
                    "%.4g (the checkpoint's schedule was at %.4g)", ", ".join(changes), self.step, now,
                    sch.get_last_lr()[0])

    def _position(self, result: Any) -> dict:
        """This rank's data cursor: exact when the world size and the data are the saved ones. Otherwise the
        epoch's progress carries over (every rank consumed the same share of it), rescaled, with a warning."""
        saved = result.position if result.position is not None else {"epoch": result.epoch, "position": 0}
        now, per_rank = self.sampler.dataset_len, len(self.sampler)
        then = saved.get("dataset_len", now)  # not recorded before 2026-12-01: taken as unchanged
        pos = saved["position"]
        if then != now and isinstance(then, int) and then >= result.world_size > 0:
            pos = pos * per_rank // (then // result.world_size)  # the same fraction of the epoch
            log.warning("the data changed since the checkpoint (%d samples then, %d now): data position "
                        "rescaled (not exact)", then, now)
        elif result.world_size != self.world or result.position is None:
            pos = pos * result.world_size // self.world
            log.warning("checkpoint was written by %d ranks, running on %d: data position rescaled (not exact)",
                        result.world_size, self.world)
        elif isinstance(pos, int) and pos > per_rank:  # an older checkpoint of a larger dataset
            log.warning("data position %d is past this data's epoch (%d samples per rank; did the data change "
                        "since the checkpoint?): the epoch's remaining samples are skipped", pos, per_rank)
        else:
            return saved  # exact
        return {"epoch": result.epoch, "position": min(pos, per_rank)}

    # -- loop -----------------------------------------------------------------------------------------

    def train_step(self, batch: tuple) -> torch.Tensor:
        """One optimizer step; returns the loss as a device tensor (reading it would wait for the device)."""
        inputs, target = (t.to(self.device, non_blocking=True) for t in batch)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16,
                            enabled=self.amp_dtype is not None), self.attention_kernels():
            out = self.model(inputs)
            loss = self.loss_fn(out, target)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        # An overlapped checkpoint's copy ran beside this forward and backward; the step below changes what
        # it copies, so it is ordered after the copy here (nothing to wait for on most steps).
        self.mgr.before_mutation()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        if self.metric_fn is not None and self.is_log_step():
            with torch.no_grad():
                self.rank_metrics = self.metric_fn(out.detach().float(), target)
        return loss.detach()

    def is_log_step(self) -> bool:
        return self.step % self.cfg.train.log_every == 0 or self.step >= self.cfg.train.max_steps

    def stop_requested(self) -> int:
        """The ranks agree on a pending signal without a device sync: the vote cast at the previous step
        (harness/stepsync.py), so a signal on any rank stops all, one step after the one it arrived in."""
        return self.vote.poll(self.flag.signum, restart=self.flag.signum != 0 and self.flag.agent_restart())

    def global_loss(self) -> float | None:
        """This step's loss, mean over ranks (what the progress line, metrics.jsonl and checkpoint report);
        the restored one before any step of this process. Collective when not yet read at this step."""
        if self.stats.last is not None and self.loss_step != self.step:
            self.last_loss = self.stats.reduce()[0]
            self.loss_step = self.step
        return self.last_loss

    def log_step(self) -> None:
        """Read the loss and metrics (global means): the only host sync of a step that does not save."""
        metrics = getattr(self, "rank_metrics", None) if self.metric_fn is not None else None
        self.last_loss, loss_avg, means = self.stats.reduce(metrics or {})
        self.loss_step = self.step
        if metrics:
            self.metrics = means
        cfg = self.cfg
        self.progress.update(self.step, self.last_loss, cfg.train.batch_size * self.world, cfg.checkpoint.every_steps)
        self.metrics_log.write({"step": self.step, "epoch": self.epoch, "loss": self.last_loss, "loss_avg": loss_avg,
                                "lr": self.scheduler.get_last_lr()[0], **self.metrics})

    def save(self, *, final: bool = False) -> None:
        c = self.cfg.checkpoint
        if self.step == self.saved_step:  # already saved (or resumed from) this very step
            if final:
                self.mgr.wait()
            return
        loss = self.global_loss()
        t0 = time.perf_counter()
        try:
            self.mgr.save(self.step, models={"model": self.model}, optimizers={"optimizer": self.optimizer},
                          schedulers={"scheduler": self.scheduler}, scaler=self.scaler, epoch=self.epoch,
                          position=self.sampler.state_dict(), loss=loss, metrics=self.metrics,
                          metadata=safe_metadata(self.cfg), overlap=c.async_save)
            self.saved_step = self.step
            if final:
                self.mgr.wait()
        except CheckpointError as exc:
            if c.on_error == "stop" or final:
                raise
            log.error("checkpoint at step %d failed, training continues (checkpoint.on_error=continue): %s",
                      self.step, exc)
            return
        self.progress.saved(self.step, time.perf_counter() - t0)
        self.metrics_log.write({"event": "save", "step": self.step, "loss": loss,
                                "blocked_s": round(time.perf_counter() - t0, 3)})

    def preempt(self, signum: int) -> int:
        """Commit a checkpoint within the grace period, then exit 128+signal (retryable). The same when the
        stop is the launcher's agent restarting the workers (harness/stopping.py): the new group resumes from
        that checkpoint; the rank then waits for its own agent's stop rather than ending the job."""
        self.preempted = True  # also on ranks that learned of the signal from a peer (see close)
        name, restart = signal.Signals(signum).name, self.vote.agent_restart
        grace = self.cfg.checkpoint.grace_period_s
        log.warning("%s: checkpointing step %d before exit (grace %.0f s)", "the launcher restarts the workers "
                    "(a node joined the job?)" if restart else f"{name} received", self.step, grace)
        watchdog = threading.Timer(grace, lambda: os._exit(128 + signum))  # a stuck save must not outlive grace
        watchdog.daemon = True
        watchdog.start()
        self.save(final=True)
        watchdog.cancel()
        self.metrics_log.write({"event": "restart" if restart else "preempted", "step": self.step, "signal": name})
        if restart and await_agent_restart():
            log.info("checkpoint at step %d committed; the restarted workers resume from it", self.step)
        else:
            log.warning("checkpoint at step %d committed; exiting with %d so the scheduler requeues", self.step,
                        128 + signum)
        return 128 + signum

    def loop(self) -> int:
        cfg = self.cfg
        self.progress.start(self.step)
        while self.step < cfg.train.max_steps:
            self.sampler.set_epoch(self.epoch)
            for batch in self.loader:
                self.step += 1
                self.stats.add(self.train_step(batch))
                faults.point("train.step", step=self.step)
                if cfg.train.step_sleep_s:
                    time.sleep(cfg.train.step_sleep_s)
                if self.is_log_step():
                    self.log_step()
                if self.step % cfg.checkpoint.every_steps == 0 and self.step < cfg.train.max_steps:
                    self.save()
                signum = self.stop_requested()
                if signum:
                    return self.preempt(signum)
                if self.step >= cfg.train.max_steps:
                    break
            else:
                self.epoch += 1
        self.vote.drain()  # the last step's vote: the run is done, a late signal only meets the final save
        self.save(final=True)
        self.metrics_log.write({"event": "done", "step": self.step, "loss": self.last_loss})
        log.info("training finished at step %d", self.step)
        return EXIT_OK

    def run(self) -> int:
        try:
            self.setup()
            self.resume()
            return self.loop()
        except lease.LeaseStopped as stop:  # signalled while setup waited for the folder: nothing written yet
            self.preempted = True
            if self.flag.agent_restart():  # the agent restarting the workers, not a stop of the job: no report
                await_agent_restart()
            log.warning("%s received while waiting for the checkpoint folder's lease: exiting, nothing written "
                        "(a restart resumes)", signal.Signals(stop.signum).name)
            return 128 + stop.signum
        finally:
            self.close()

    def close(self) -> None:
        try:
            if getattr(self, "progress", None) is not None:
                self.progress.close()
            if getattr(self, "mgr", None) is not None:
                try:
                    self.mgr.close()
                except CheckpointError as exc:
                    log.error("last checkpoint failed: %s", exc)
            if dist.initialized():
                torch_dist.destroy_process_group()
        finally:
            # Handlers go last, so a signal during the final wait and teardown is recorded, not fatal. After a
            # preemption we are leaving with 128+signal, and a process that ends with the run (exit_after)
            # leaves with its code: further signals are ignored (SIG_IGN also holds through atexit hooks and
            # teardown), so a second SIGTERM (torchrun tearing down the ranks that exit later, a scheduler
            # repeating itself) cannot turn the documented exit code into death by signal (-15).
            if self.preempted or self.exit_after:
                for sig in HANDLED_SIGNALS:
                    signal.signal(sig, signal.SIG_IGN)
            else:
                self.flag.uninstall()


# Trainers of processes that end with their run (exit_after), kept until harness.dist.leave ends the process
# with os._exit: never torn down. Why: dropping a trainer frees its process groups, and torch 2.4's
# ~ProcessGroupGloo joins gloo's worker threads while holding the GIL, which a worker needs to free a finished
# broadcast's tensors: a deadlock (finished workers that never exit; 1 run in 5-8 on a busy machine).
_LEAVING: list[Trainer] = []


def train(cfg: Config | dict | str | os.PathLike, builder: WorkloadBuilder | None = None, *,
          exit_after: bool = False) -> int:
    """Run training with a config (a Config, its dict form as TOML parses it, or a TOML file's path);
    ``builder(model_cfg, data_cfg, seed) -> Workload`` plugs in user code. ``exit_after``: the process ends
    with the returned code (as ``harness train``): signals stay ignored once the run is over, instead of the
    previous handlers coming back, and the trainer is never torn down."""
    cfg = as_config(cfg, "train")
    if builder is not None and not callable(builder):
        raise TypeError(f"train's builder is a function (model_cfg, data_cfg, seed) -> Workload, got "
                        f"{type(builder).__name__} (a 'module:function' string goes in train.entry)")
    trainer = Trainer(cfg, builder, exit_after)
    if exit_after:
        _LEAVING.append(trainer)
    return trainer.run()
