"""The first training steps after a restore, timed in parts under torchrun (2 gloo ranks): the one script
resume_time.py's plain_first_step and first_step_ab.py's A/B both run.

``plain``: the model, DDP and AdamW with the optimizer state loaded (zeros), a fixed batch. ``harness``:
harness's Trainer (setup + resume from the checkpoint folder in the config) and its step's parts. Rank 0 writes
four steps' times: forward, backward, optimizer (with harness's before_mutation), total.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "quickstart.toml")

STEP_SCRIPT = """
import json, os, sys, time
import torch, torch.distributed as d
from harness import config, recipe
mode, out, *sets = sys.argv[1:]
cfg = config.load(os.environ["FIRST_STEP_CONFIG"], sets)
if mode == "harness":
    from harness import trainer
    t = trainer.Trainer(cfg)
    t.setup()
    t.resume()
    t.sampler.set_epoch(t.epoch)
    batches = iter(t.loader)
    model, opt, loss_fn, before = t.model, t.optimizer, t.loss_fn, t.mgr.before_mutation
    next_batch = lambda: next(batches)
else:
    d.init_process_group("gloo")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    wl = recipe.workload(cfg)
    model = torch.nn.parallel.DistributedDataParallel(wl.model)
    opt = recipe.build_optimizer(cfg, model.parameters())
    opt.load_state_dict({"param_groups": opt.state_dict()["param_groups"], "state": {
        i: {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        for i, p in enumerate(wl.model.parameters())}})
    items = [wl.dataset[i] for i in range(cfg.train.batch_size)]
    fixed = (torch.stack([a for a, _ in items]), torch.stack([b for _, b in items]))
    loss_fn, before, next_batch = wl.loss_fn, (lambda: None), (lambda: fixed)
T = time.perf_counter
steps = []
for _ in range(4):
    t0 = T()
    x, y = next_batch()
    opt.zero_grad(set_to_none=True)
    t1 = T()
    loss = loss_fn(model(x), y)
    t2 = T()
    loss.backward()
    t3 = T()
    before()
    opt.step()
    t4 = T()
    steps.append({"forward": t2 - t1, "backward": t3 - t2, "optimizer": t4 - t3, "total": t4 - t0})
if d.get_rank() == 0:
    with open(out, "w") as f:
        json.dump(steps, f)
os._exit(0)  # no teardown: the next launch starts at once (the lease of this dead pid is taken over)
"""


def model_sets(size_gb: float) -> list[str]:
    layers = 4
    hidden = int((size_gb * 1e9 / 12 / layers) ** 0.5)  # params + two AdamW moments, fp32 (as resume_time.py)
    return [f"model.hidden={hidden}", f"model.layers={layers}", "train.batch_size=8"]


def job_env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "HARNESS_FAULT"))}
    # the job's workers run with OMP_NUM_THREADS=1, as harness launch sets it
    e.update(OMP_NUM_THREADS="1", FIRST_STEP_CONFIG=CONFIG, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1",
             PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return e


def run_steps(mode: str, sets: list[str], work: Path, nproc: int = 2) -> list[dict]:
    """STEP_SCRIPT once under torchrun in ``mode``: rank 0's four steps."""
    script, out = work / "first_steps.py", work / f"first_steps_{mode}.json"
    script.write_text(STEP_SCRIPT)
    torchrun = shutil.which("torchrun")
    head = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    proc = subprocess.run([*head, "--standalone", "--nproc-per-node", str(nproc), str(script), mode, str(out), *sets],
                          env=job_env(), cwd=work, capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise RuntimeError(f"first steps ({mode}) failed: {proc.stderr[-2000:]}")
    return json.loads(out.read_text())
