"""The training loop: DDP under torchrun, resume on every start, checkpoint on schedule and on preemption.

The trainer sees the checkpoint layer only through CheckpointManager's save/restore/wait/close.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import math
import os
import random
import signal
import threading
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as torch_dist

from harness import dist, faults, lease
from harness.checkpoint import CheckpointManager
from harness.config import Config
from harness.data import BatchLoader, ResumableSampler
from harness.errors import CheckpointError, ConfigError
from harness.progress import MetricsLog, Progress
from harness.storage import redact_url
from harness.workloads import Workload, build_workload, load_entry_point

log = logging.getLogger("harness")

EXIT_OK = 0
EXIT_ERROR = 1          # unexpected failure (a bug, a crashed peer): torchrun may restart
EXIT_CONFIG = 2         # bad configuration: permanent
EXIT_CHECKPOINT = 3     # storage unreachable or every checkpoint unusable: permanent, needs a human
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

WorkloadBuilder = Callable[[dict, dict, int], Workload]


class PreemptionFlag:
    """Signal handlers only record the signal; the loop acts on it at a step boundary."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in HANDLED_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = self.signum or signum

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


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
        os._exit(EXIT_ERROR)

    threading.Thread(target=watch, name="harness-launcher-watch", daemon=True).start()


def setup_logging(rank: int) -> None:
    fmt = f"[rank {rank}] %(asctime)s %(levelname)s %(message)s"
    logging.basicConfig(level=logging.INFO, format=fmt, datefmt="%H:%M:%S", force=True)


def init_distributed(cfg: Config) -> torch.device:
    """Join the torchrun process group when launched by torchrun; pick the device and backend."""
    want_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise ConfigError("train.device = 'cuda' but no CUDA device is available")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.initialized():
        backend = cfg.dist.backend if cfg.dist.backend != "auto" else ("nccl" if want_cuda else "gloo")
        torch_dist.init_process_group(backend=backend,
                                      timeout=datetime.timedelta(seconds=cfg.dist.timeout_s),
                                      device_id=device if backend == "nccl" else None)
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(cfg: Config, params: Any, zero: bool = False) -> torch.optim.Optimizer:
    """The configured optimizer; with ``zero`` a ZeroRedundancyOptimizer wrapping that class (each rank keeps
    the state of its partition of the parameters)."""
    o = cfg.optim
    if o.name == "sgd":
        cls, kwargs = torch.optim.SGD, {"lr": o.lr, "momentum": o.momentum, "weight_decay": o.weight_decay}
    else:
        cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
        kwargs = {"lr": o.lr, "weight_decay": o.weight_decay}
    if zero:
        from torch.distributed.optim import ZeroRedundancyOptimizer
        return ZeroRedundancyOptimizer(params, optimizer_class=cls, **kwargs)
    return cls(params, **kwargs)


def fsdp_wrap(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2: fully_shard each block (each child holding parameters of the root's ModuleList/Sequential
    containers: GPT's ``blocks``, the MLP's layers), then the root, which keeps the rest (embeddings, a
    head tied to them)."""
    from torch.distributed.fsdp import fully_shard

    for child in model.children():
        if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential)):
            for block in child.children():
                if any(True for _ in block.parameters()):
                    fully_shard(block)
    fully_shard(model)
    return model


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """Warmup then cosine/step/constant, as one LambdaLR: its state is just counters (no closures saved)."""
    s, total = cfg.scheduler, cfg.train.max_steps

    def factor(step: int) -> float:
        if step < s.warmup_steps:
            return (step + 1) / s.warmup_steps
        if s.name == "cosine":
            progress = min(1.0, (step - s.warmup_steps) / max(1, total - s.warmup_steps))
            return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        if s.name == "step":
            return s.gamma ** ((step - s.warmup_steps) // s.step_size)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def safe_metadata(cfg: Config) -> dict:
    """The run's config for the manifest, minus storage_options (they may hold credentials)."""
    d = dataclasses.asdict(cfg)
    d["checkpoint"].pop("storage_options", None)
    return {"config": d}


class Trainer:
    """One rank's training run. ``run()`` returns the process exit code."""

    def __init__(self, cfg: Config, builder: WorkloadBuilder | None = None) -> None:
        self.cfg = cfg
        self.builder = builder
        self.flag = PreemptionFlag()
        self.step = 0
        self.epoch = 0
        self.last_loss: float | None = None
        self.metrics: dict = {}
        self.saved_step = -1   # the step whose checkpoint is committed or in flight
        self.preempted = False

    # -- setup ----------------------------------------------------------------------------------------

    def _workload(self) -> Workload:
        cfg = self.cfg
        builder = self.builder
        if builder is None and cfg.train.entry:
            try:
                builder = load_entry_point(cfg.train.entry)
            except ValueError as exc:
                raise ConfigError(f"train.entry: {exc}") from None
        try:
            return (builder or build_workload)(dict(cfg.model), dict(cfg.data), cfg.train.seed)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def setup(self) -> None:
        cfg = self.cfg
        workload = self._workload()  # config errors surface before any process group or storage work
        self.device = init_distributed(cfg)
        self.rank, self.world = dist.rank(), dist.world_size()
        setup_logging(self.rank)
        self.flag.install()
        watch_launcher()
        model = workload.model.to(self.device)
        self.loss_fn, self.metric_fn = workload.loss_fn, workload.metric_fn
        parallel = cfg.train.parallel if dist.initialized() else "ddp"  # one process: nothing to shard
        if parallel == "fsdp":
            self.model = fsdp_wrap(model)
        else:
            self.model = (torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
                if dist.initialized() else model)
        self.optimizer = build_optimizer(cfg, self.model.parameters(), zero=parallel == "zero")
        self.scheduler = build_scheduler(cfg, self.optimizer)
        use_amp = cfg.train.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if use_amp else None
        c = cfg.checkpoint
        self.mgr = CheckpointManager(c.dir, keep_last=c.keep_last, keep_best=c.keep_best, best_metric=c.best_metric,
                                     best_mode=c.best_mode, async_save=c.async_save,
                                     storage_options=c.storage_options, max_file_bytes=c.max_file_mb << 20,
                                     io_threads=c.io_threads, timeout_s=c.timeout_s,
                                     split_replicated=c.split_writes)
        # One job per checkpoint folder: refuse (exit 3) if another live run holds it (harness/lease.py).
        self.lease = lease.acquire(self.mgr.storage, cfg.run.id, c.lease_timeout_s, self.mgr._group)
        self.sampler = ResumableSampler(len(workload.dataset), self.world, self.rank, shuffle=True,
                                        seed=cfg.train.seed)
        self.loader = BatchLoader(workload.dataset, self.sampler, cfg.train.batch_size)
        self.progress = Progress(cfg.train.max_steps, enabled=self.rank == 0)
        self.metrics_log = MetricsLog(os.path.join(cfg.output_dir, "metrics.jsonl") if self.rank == 0 else None)

    def resume(self) -> None:
        """Every start: restore the newest valid checkpoint, or seed a fresh run."""
        seed_everything(self.cfg.train.seed + self.rank)
        t0 = time.perf_counter()
        result = self.mgr.restore(models={"model": self.model}, optimizers={"optimizer": self.optimizer},
                                  schedulers={"scheduler": self.scheduler}, scaler=self.scaler)
        if result is None:
            log.info("no checkpoint found in %s: starting at step 0", redact_url(self.cfg.checkpoint.dir))
            self.metrics_log.write({"event": "start", "step": 0})
            return
        self.step, self.epoch, self.saved_step = result.step, result.epoch, result.step
        self.last_loss, self.metrics = result.loss, dict(result.metrics)
        self.sampler.load_state_dict(self._position(result))
        for name, reason in result.skipped:
            log.warning("skipped damaged checkpoint %s: %s", name, reason)
        log.info("resumed from %s at step %d (epoch %d) in %.2f s", result.name, self.step, self.epoch,
                 time.perf_counter() - t0)
        self.metrics_log.write({"event": "resume", "step": self.step, "checkpoint": result.name,
                                "seconds": round(time.perf_counter() - t0, 3)})

    def _position(self, result: Any) -> dict:
        if result.world_size == self.world and result.position is not None:
            return result.position
        # Another world size: every rank consumed the same share, so the epoch's global progress carries over.
        saved = result.position or {"epoch": result.epoch, "position": 0}
        pos = saved["position"] * result.world_size // self.world
        log.warning("checkpoint was written by %d ranks, running on %d: data position rescaled (not exact)",
                    result.world_size, self.world)
        return {"epoch": result.epoch, "position": min(pos, len(self.sampler))}

    # -- loop -----------------------------------------------------------------------------------------

    def train_step(self, batch: tuple) -> float:
        inputs, target = (t.to(self.device, non_blocking=True) for t in batch)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.scaler is not None):
            out = self.model(inputs)
            loss = self.loss_fn(out, target)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        if self.metric_fn is not None and self.step % self.cfg.train.log_every == 0:
            with torch.no_grad():
                self.metrics = {k: float(v) for k, v in self.metric_fn(out.detach().float(), target).items()}
        return float(loss.detach())

    def stop_requested(self) -> int:
        """The ranks agree on a pending signal: one tiny all-reduce, so a signal on any rank stops all."""
        if not dist.initialized():
            return self.flag.signum
        t = torch.tensor([self.flag.signum], dtype=torch.int64, device=self.device)
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
        return int(t.item())

    def global_loss(self, loss: float) -> float:
        if not dist.initialized():
            return loss
        t = torch.tensor([loss], dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(t)
        return float(t.item()) / self.world

    def save(self, *, final: bool = False) -> None:
        c = self.cfg.checkpoint
        if self.step == self.saved_step:  # already saved (or resumed from) this very step
            if final:
                self.mgr.wait()
            return
        loss = self.global_loss(self.last_loss) if self.last_loss is not None else None
        t0 = time.perf_counter()
        try:
            self.mgr.save(self.step, models={"model": self.model}, optimizers={"optimizer": self.optimizer},
                          schedulers={"scheduler": self.scheduler}, scaler=self.scaler, epoch=self.epoch,
                          position=self.sampler.state_dict(), loss=loss, metrics=self.metrics,
                          metadata=safe_metadata(self.cfg))
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
        self.metrics_log.write({"event": "save", "step": self.step, "blocked_s": round(time.perf_counter() - t0, 3)})

    def preempt(self, signum: int) -> int:
        """Commit a checkpoint within the grace period, then exit 128+signal (retryable)."""
        self.preempted = True  # also on ranks that learned of the signal from a peer (see close)
        name = signal.Signals(signum).name
        grace = self.cfg.checkpoint.grace_period_s
        log.warning("%s received: checkpointing step %d before exit (grace %.0f s)", name, self.step, grace)
        watchdog = threading.Timer(grace, lambda: os._exit(128 + signum))  # a stuck save must not outlive grace
        watchdog.daemon = True
        watchdog.start()
        self.save(final=True)
        watchdog.cancel()
        self.metrics_log.write({"event": "preempted", "step": self.step, "signal": name})
        log.warning("checkpoint at step %d committed; exiting with %d so the scheduler requeues", self.step,
                    128 + signum)
        return 128 + signum

    def loop(self) -> int:
        cfg = self.cfg
        while self.step < cfg.train.max_steps:
            self.sampler.set_epoch(self.epoch)
            for batch in self.loader:
                self.step += 1
                self.last_loss = self.train_step(batch)
                faults.point("train.step", step=self.step)
                if cfg.train.step_sleep_s:
                    time.sleep(cfg.train.step_sleep_s)
                self.progress.update(self.step, self.last_loss, cfg.train.batch_size * self.world,
                                     cfg.checkpoint.every_steps)
                if self.step % cfg.train.log_every == 0:
                    self.metrics_log.write({"step": self.step, "epoch": self.epoch, "loss": self.last_loss,
                                            "lr": self.scheduler.get_last_lr()[0], **self.metrics})
                if self.step % cfg.checkpoint.every_steps == 0 and self.step < cfg.train.max_steps:
                    self.save()
                signum = self.stop_requested()
                if signum:
                    return self.preempt(signum)
                if self.step >= cfg.train.max_steps:
                    break
            else:
                self.epoch += 1
        self.save(final=True)
        self.metrics_log.write({"event": "done", "step": self.step})
        log.info("training finished at step %d", self.step)
        return EXIT_OK

    def run(self) -> int:
        try:
            self.setup()
            self.resume()
            return self.loop()
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
            if getattr(self, "lease", None) is not None:  # after the last save: the folder is ours till then
                self.lease.release()
            if dist.initialized():
                torch_dist.destroy_process_group()
        finally:
            # Handlers go last, so a signal during the final wait and teardown is recorded, not fatal. After a
            # preemption we are leaving with 128+signal: further ones are ignored (SIG_IGN also holds through
            # interpreter teardown, which takes seconds with torch loaded), so a second SIGTERM (torchrun tearing
            # down the ranks that exit later) cannot turn the documented exit code into death by signal (-15).
            if self.preempted:
                for sig in HANDLED_SIGNALS:
                    signal.signal(sig, signal.SIG_IGN)
            else:
                self.flag.uninstall()


def train(cfg: Config, builder: WorkloadBuilder | None = None) -> int:
    """Run training with a config; ``builder(model_cfg, data_cfg, seed) -> Workload`` plugs in user code."""
    return Trainer(cfg, builder).run()
