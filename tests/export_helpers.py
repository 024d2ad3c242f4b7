"""Helpers for the export/import/inspect tests: small runs checkpointed the way `harness train` does
(CheckpointManager + the run config in metadata), without starting a training process."""

from __future__ import annotations

import argparse
import os

import torch

from harness import CheckpointManager, config, recipe
from harness.ckpt_cli import add_ckpt_parser, run_ckpt
from harness.ckpt_parser import finish_export

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, "configs", "quickstart.toml")

SMALL = {
    "mlp": ({"name": "mlp", "hidden": 32, "layers": 2},
            {"name": "synthetic_vectors", "num_samples": 256, "in_features": 12, "num_classes": 5}),
    "cnn": ({"name": "cnn", "width": 4},
            {"name": "synthetic_images", "num_samples": 64, "channels": 3, "height": 8, "width": 8, "num_classes": 4}),
    "gpt": ({"name": "gpt", "d_model": 16, "n_layers": 1, "n_heads": 2},
            {"name": "synthetic_tokens", "num_samples": 64, "seq_len": 8, "vocab_size": 32}),
}


def cli(*argv) -> int:
    """The ckpt command exactly as harness/cli.py wires it."""
    parser = argparse.ArgumentParser(prog="harness")
    sub = parser.add_subparsers(dest="command", required=True)
    add_ckpt_parser(sub)
    args = parser.parse_args([str(a) for a in argv])
    if args.ckpt_command == "export":
        finish_export(args)
    return run_ckpt(args)


def small_config(kind: str = "mlp", **sections) -> config.Config:
    model, data = SMALL[kind]
    raw = {"model": dict(model), "data": dict(data), "train": {"seed": 0, "batch_size": 8, "device": "cpu",
                                                               "max_steps": 20},
           "scheduler": {"name": "cosine", "warmup_steps": 2}}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return config.from_dict(raw)


def quickstart_config(*overrides: str) -> config.Config:
    return config.load(QUICKSTART, list(overrides))


def make_run(root, cfg: config.Config, steps=(2, 4), metrics_fn=None):
    """Train cfg's workload for max(steps) steps, checkpointing at ``steps`` like the trainer (names
    model/optimizer/scheduler, run config in metadata). Returns (workload, trained model, losses by step)."""
    w = recipe.workload_from_dict(recipe.safe_metadata(cfg)["config"])
    model = w.model
    opt = recipe.build_optimizer(cfg, model.parameters())
    sched = recipe.build_scheduler(cfg, opt)
    mgr = CheckpointManager(str(root), keep_last=0)
    bs = cfg.train.batch_size
    losses = {}
    for step in range(1, max(steps) + 1):
        items = [w.dataset[(step * bs + i) % len(w.dataset)] for i in range(bs)]
        x, y = torch.stack([it[0] for it in items]), torch.stack([it[1] for it in items])
        out = model(x)
        loss = w.loss_fn(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses[step] = float(loss.detach())
        if step in steps:
            metrics = metrics_fn(step) if metrics_fn else (w.metric_fn(out.detach(), y) if w.metric_fn else {})
            mgr.save(step, models={"model": model}, optimizers={"optimizer": opt}, schedulers={"scheduler": sched},
                     epoch=0, position={"epoch": 0, "position": step * bs}, loss=losses[step], metrics=metrics,
                     metadata=recipe.safe_metadata(cfg))
    mgr.close()
    return w, model, losses


def batch_inputs(w, n: int = 3, start: int = 5) -> torch.Tensor:
    return torch.stack([w.dataset[start + i][0] for i in range(n)])


def eval_out(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    was = model.training
    model.eval()
    with torch.no_grad():
        y = model(x)
    model.train(was)
    return y


def train_plainly(cfg: config.Config, steps: int, scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 2)):
    """A plain PyTorch loop over cfg's workload (the trainer's model and optimizer, ``scheduler(opt)``), as the
    other tools' checkpoints in the import tests are made from: (model, optimizer, scheduler) after ``steps``."""
    w = recipe.workload_from_dict(recipe.safe_metadata(cfg)["config"])
    model = w.model
    opt = recipe.build_optimizer(cfg, model.parameters())
    sched = scheduler(opt)
    for step in range(steps):
        items = [w.dataset[step * 8 + i] for i in range(8)]
        x, y = torch.stack([i[0] for i in items]), torch.stack([i[1] for i in items])
        opt.zero_grad()
        w.loss_fn(model(x), y).backward()
        opt.step()
        sched.step()
    return model, opt, sched
