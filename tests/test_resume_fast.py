"""Time to resume: what a restarted job does not do. A resume draws no initial weights (the built-in model is
built on the meta device and the checkpoint fills it), a fresh start still draws exactly the weights it always
did, `harness launch` checks a config without building anything heavy, and `import harness` alone loads
neither torch nor the checkpoint layer."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from harness import config, recipe
from harness.trainer import Trainer
from trainer_helpers import python_c

REPO = Path(__file__).resolve().parents[1]
WORKLOADS = {  # every built-in model, on each kind of data it takes
    "mlp-vectors": [],
    "mlp-images": ["data.name='synthetic_images'", "data.num_classes=10", "data.height=8", "data.width=8"],
    "cnn-images": ["model.name='cnn'", "data.name='synthetic_images'", "data.num_classes=10", "data.height=8",
                   "data.width=8"],
    "gpt-tokens": ["model.name='gpt'", "data.name='synthetic_tokens'", "data.seq_len=16", "data.vocab_size=32"],
}


class InitDraws(TorchFunctionMode):
    """Counts the calls of torch.nn.init (every built-in layer's weights are drawn through it)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", None) == "torch.nn.init":
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


def _cfg(tmp_path: Path, *sets: str):
    return config.load(None, [f"checkpoint.dir={tmp_path / 'ck'}", f"run.output_dir={tmp_path / 'out'}",
                              "train.device='cpu'", "train.max_steps=4", "checkpoint.every_steps=2",
                              "checkpoint.keep_best=0", "data.num_samples=256", "train.batch_size=8",
                              "train.log_every=2", *sets])


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_deferred_build_then_initialize_is_the_normal_build_bit_for_bit(name, tmp_path):
    cfg = _cfg(tmp_path, *WORKLOADS[name])
    rng = torch.get_rng_state()
    with InitDraws() as draws:
        deferred = recipe.workload(cfg, deferred=True).model
    assert not draws.calls and all(t.is_meta for t in deferred.state_dict().values())
    model = recipe.materialize(deferred, torch.device("cpu"))
    recipe.initialize(cfg, model)
    normal = recipe.workload(cfg).model
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG stream is left alone, as before
    mine, theirs = model.state_dict(), normal.state_dict()
    assert list(mine) == list(theirs)
    for key in theirs:
        assert torch.equal(mine[key], theirs[key]), key
    if name == "gpt-tokens":  # tied embedding and head stay one tensor
        assert model.head.weight is model.tok_emb.weight


def test_resume_draws_no_weights_and_a_fresh_start_draws_todays(tmp_path):
    cfg = _cfg(tmp_path)
    fresh = Trainer(cfg)
    with InitDraws() as draws:
        fresh.setup()
        fresh.resume()
    try:
        assert draws.calls and fresh.step == 0
        normal = recipe.workload(cfg).model.state_dict()  # what the trainer built before deferral
        for key, value in fresh.module.state_dict().items():
            assert torch.equal(value, normal[key]), key
        assert fresh.loop() == 0
        trained = {k: v.clone() for k, v in fresh.module.state_dict().items()}
    finally:
        fresh.close()

    again = Trainer(_cfg(tmp_path, "train.max_steps=6"))
    with InitDraws() as draws:
        again.setup()
        again.resume()
    try:
        assert draws.calls == [] and again.step == 4  # restored, and not one weight drawn for it
        for key, value in again.module.state_dict().items():
            assert torch.equal(value, trained[key]), key
    finally:
        again.close()


def _python(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (what it imports is what a new process would); it must exit 0."""
    return python_c(code, REPO)


def test_launch_config_check_and_import_harness_stay_light():
    """The launcher's check builds the GPT workload deferred (no torch._dynamo import, which drawing on the meta
    device costs); a bad option is still a ConfigError; `import harness` loads no torch."""
    code = (
        "import sys\n"
        "import harness\n"
        "assert 'torch' not in sys.modules and 'harness.checkpoint' not in sys.modules, 'import harness is heavy'\n"
        "from harness import config, launch\n"
        "from harness.errors import ConfigError\n"
        f"sets = {WORKLOADS['gpt-tokens']!r}\n"
        "launch._check_workload(config.load(None, sets), 2)\n"
        "assert 'torch._dynamo' not in sys.modules, 'the check imported torch._dynamo'\n"
        "try:\n"
        "    launch._check_workload(config.load(None, sets + ['model.n_heads=3']), 2)\n"
        "except ConfigError as exc:\n"
        "    print('refused:', exc)\n"
    )
    out = _python(code)
    assert "refused: d_model=64 must be divisible by n_heads=3" in out.stdout, out.stdout


def test_a_plain_model_saves_and_restores_without_torchs_sharding_stack(tmp_path):
    """Saving or restoring a model that holds no DTensor imports no torch.distributed.checkpoint.state_dict
    (and so no DTensor, FSDP or torch.fx): in a process with no optimizer, as load_for_inference or an export
    script, that import made the first save 0.7 s instead of 0.015 s."""
    code = (
        "import sys, torch, harness\n"
        "m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))\n"
        f"mgr = harness.CheckpointManager({str(tmp_path / 'ck')!r}, async_save=False)\n"
        "mgr.save(1, models=m)\n"
        "assert mgr.restore(models=m).step == 1\n"
        "mgr.close()\n"
        "heavy = [n for n in ('torch.distributed.checkpoint.state_dict', 'torch.distributed.tensor',\n"
        "                     'torch.distributed.fsdp') if n in sys.modules]\n"
        "print('heavy:', heavy)\n"
    )
    out = _python(code)
    assert "heavy: []" in out.stdout, out.stdout
