"""Hugging Face Accelerate ``save_state`` folders as a source: `harness ckpt import` takes the models,
optimizers, schedulers and scaler (it took the weights alone, as from a save_pretrained folder, and said the
optimizer starts fresh); warm_start and load_for_inference read the weights and nothing else.

The folders are written with the files and names Accelerate's ``save_accelerator_state`` uses (safetensors
weights, torch.save'd optimizer/scheduler state dicts, RNG states with numpy objects in them, a pickled
sampler); no accelerate package is needed to write them."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import harness
from harness import CheckpointManager, recipe
from harness.errors import CheckpointFormatError
from harness.interop.importer import import_checkpoint

from export_helpers import QUICKSTART, cli, quickstart_config, train_plainly
from sharded_helpers import FNet, run_ranks
from torch_features import needs_fsdp, needs_stand_ins


def save_state(folder, models, optimizers, schedulers, safe: bool = True):
    """What ``accelerator.save_state(folder)`` leaves (its file names and serializers)."""
    folder.mkdir(parents=True)
    for i, model in enumerate(models):
        n = f"_{i}" if i else ""
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        if safe:
            save_file(sd, folder / f"model{n}.safetensors")
        else:
            torch.save(sd, folder / f"pytorch_model{n}.bin")
    for stem, objects in (("optimizer", optimizers), ("scheduler", schedulers)):
        for i, obj in enumerate(objects):
            torch.save(obj.state_dict(), folder / f"{stem}{'_%d' % i if i else ''}.bin")
    torch.save({"step": 5, "random_state": random.getstate(), "numpy_random_seed": np.random.get_state(),
                "torch_manual_seed": torch.get_rng_state()}, folder / "random_states_0.pkl")
    (folder / "sampler.bin").write_bytes(pickle.dumps(object()))
    return folder


def test_an_accelerate_checkpoint_imports_with_its_optimizer_and_scheduler(tmp_path, capsys):
    cfg = quickstart_config()
    model, opt, sched = train_plainly(cfg, 5)
    src = save_state(tmp_path / "checkpoints" / "checkpoint_0", [model], [opt], [sched])
    dest = tmp_path / "ckpt"
    assert cli("ckpt", "import", src, dest, "--config", QUICKSTART) == 0
    out = capsys.readouterr().out
    said = ["as step-000000005: step 5 (optimizer's step counter)", "note: an Accelerate save_state folder",
            "note: Accelerate's RNG, sampler and custom states not imported: random_states_0.pkl, sampler.bin"]
    assert [line for line in said if line not in out] == [] and "starts fresh" not in out, out  # optimizer kept
    w = recipe.workload_from_dict(recipe.safe_metadata(cfg)["config"])
    o2 = recipe.build_optimizer(cfg, w.model.parameters())
    CheckpointManager(dest).restore(models={"model": w.model}, optimizers={"optimizer": o2})
    assert all(torch.equal(a, b) for a, b in zip(w.model.state_dict().values(), model.state_dict().values()))
    want = opt.state_dict()["state"]
    assert all(torch.equal(st["exp_avg"], want[pid]["exp_avg"]) for pid, st in o2.state_dict()["state"].items())


def test_warm_start_reads_the_weights_alone(tmp_path):
    cfg = quickstart_config()
    model, opt, sched = train_plainly(cfg, 2)
    src = save_state(tmp_path / "state", [model], [opt], [sched], safe=False)
    (src / "optimizer.bin").write_bytes(b"not a torch file")  # not read by warm_start; refused by import
    fresh = recipe.workload_from_dict(recipe.safe_metadata(cfg)["config"]).model
    report = harness.warm_start(fresh, src)
    assert report.loaded == len(model.state_dict()) and "pytorch_model.bin" in report.source
    with pytest.raises(CheckpointFormatError, match=r"optimizer\.bin is not a readable torch\.save"):
        import_checkpoint(src, tmp_path / "ckpt")


def test_two_models_and_optimizers_keep_their_names(tmp_path):
    """A GAN prepared with two models and two optimizers: model.safetensors and model_1.safetensors."""
    gen, disc = torch.nn.Linear(4, 8), torch.nn.Linear(8, 1)
    opts = [torch.optim.Adam(m.parameters()) for m in (gen, disc)]
    for m, o in zip((gen, disc), opts):
        m.weight.grad = torch.ones_like(m.weight)
        o.step()
    src = save_state(tmp_path / "gan", [gen, disc], opts, [])
    summary = import_checkpoint(src, tmp_path / "ckpt")
    assert summary["models"] == ["model", "model_1"] and summary["optimizers"] == ["optimizer", "optimizer_1"]
    second = torch.nn.Linear(8, 1)
    assert harness.warm_start(second, src, name="model_1").loaded == 2
    assert torch.equal(second.weight, disc.weight)


@needs_fsdp
def test_an_fsdp_sharded_save_state_from_two_ranks(tmp_path):
    """Under FSDP with SHARDED_STATE_DICT the model and optimizer are DCP folders (pytorch_model_fsdp_0,
    optimizer_0) written by every rank; the optimizer's state is keyed by parameter name."""
    src, ref = tmp_path / "checkpoint_0", tmp_path / "full.pt"
    run_ranks(tmp_path, "accelerate_fsdp_save", 2, folder=str(src), ref=str(ref))
    full = torch.load(ref, weights_only=True)
    summary = import_checkpoint(src, tmp_path / "ckpt")
    assert (summary["models"], summary["optimizers"], summary["schedulers"]) == (["model"], ["optimizer"],
                                                                                 ["scheduler"])
    assert "an Accelerate save_state folder" in summary["notes"] and summary["step"] == 3
    plain = FNet(13)
    opt = torch.optim.AdamW(plain.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    CheckpointManager(tmp_path / "ckpt").restore(models={"model": plain}, optimizers={"optimizer": opt},
                                                 schedulers={"scheduler": sched})
    assert all(torch.equal(v, full["model"][k]) for k, v in plain.state_dict().items())
    for i, (name, _) in enumerate(plain.named_parameters()):
        assert torch.equal(opt.state[opt.param_groups[0]["params"][i]]["exp_avg"], full["optim"][name]["exp_avg"])
    assert sched.last_epoch == 3
    fresh = FNet(13)
    assert harness.warm_start(fresh, src).loaded == len(full["model"])


def trainer_folder(folder, model, opt, sched, step: int = 5):
    """What transformers' Trainer saves at a step: save_pretrained's weights, optimizer.pt, scheduler.pt,
    trainer_state.json, per-process RNG states and the pickled TrainingArguments."""
    import json
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    torch.save(opt.state_dict(), folder / "optimizer.pt")
    torch.save(sched.state_dict(), folder / "scheduler.pt")
    (folder / "trainer_state.json").write_text(json.dumps({
        "global_step": step, "epoch": 1.25, "best_metric": None,
        "log_history": [{"loss": 0.75, "step": step - 1}, {"loss": 0.5, "step": step}, {"eval_loss": 0.6}]}))
    torch.save({"python": random.getstate(), "numpy": np.random.get_state()}, folder / "rng_state.pth")
    (folder / "training_args.bin").write_bytes(pickle.dumps({"output_dir": "out"}))
    return folder


def test_a_hugging_face_trainer_checkpoint_imports_with_its_training_state(tmp_path):
    """checkpoint-N of transformers' Trainer was read as a save_pretrained folder: weights only, step 0,
    "the optimizer starts fresh"."""
    cfg = quickstart_config()
    model, opt, sched = train_plainly(cfg, 5)
    src = trainer_folder(tmp_path / "out" / "checkpoint-5", model, opt, sched)
    summary = import_checkpoint(src, tmp_path / "ckpt", config=cfg)
    assert (summary["step"], summary["step_source"], summary["epoch"], summary["loss"]) == (5, "file's step", 1, 0.5)
    assert summary["notes"][:2] == ["a Hugging Face Trainer checkpoint (global_step 5, epoch 1.25)",
                                    "the Trainer's RNG states and arguments not imported: rng_state.pth, "
                                    "training_args.bin"], summary["notes"]
    w = recipe.workload_from_dict(recipe.safe_metadata(cfg)["config"])
    o2 = recipe.build_optimizer(cfg, w.model.parameters())
    CheckpointManager(tmp_path / "ckpt").restore(models={"model": w.model}, optimizers={"optimizer": o2})
    assert all(torch.equal(a, b) for a, b in zip(w.model.state_dict().values(), model.state_dict().values()))
    want = opt.state_dict()["state"]
    assert all(torch.equal(st["exp_avg"], want[pid]["exp_avg"]) for pid, st in o2.state_dict()["state"].items())

    (src / "optimizer.pt").write_bytes(b"garbage")  # warm_start reads the weights alone
    fresh = recipe.workload_from_dict(recipe.safe_metadata(cfg)["config"]).model
    assert harness.warm_start(fresh, src).loaded == len(model.state_dict())
    trainer_folder(tmp_path / "out" / "checkpoint-2", model, opt, sched, step=2)  # the Trainer's output_dir:
    report = harness.warm_start(fresh, tmp_path / "out")                          # its newest checkpoint-N
    assert report.source == f"{tmp_path / 'out'} (checkpoint-5: model.safetensors)"
    (src / "model.safetensors").unlink()
    (src / "adapter_model.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointFormatError, match=r"Trainer checkpoint without model weights \(adapter_model"):
        harness.warm_start(fresh, src)


def deepspeed_save(save_dir, model, opt, sched, step: int, zero3: bool = False, bf16: bool = True):
    """What ``engine.save_checkpoint(save_dir)`` leaves under ZeRO-1/2 (``zero3``: ZeRO-3's placeholders):
    ``latest`` naming ``global_step<N>``, whose mp_rank_00_model_states.pt holds the module (bf16 under
    bf16 training), scheduler, step, config and the script's argparse.Namespace, beside the optimizer
    partitions."""
    import argparse
    tag = save_dir / f"global_step{step}"
    tag.mkdir(parents=True)
    module = {k: (torch.empty(0, dtype=v.dtype) if zero3 else v.to(torch.bfloat16 if bf16 else v.dtype))
              for k, v in model.state_dict().items()}
    shapes = [{k: v.shape for k, v in model.named_parameters()}]
    torch.save({"module": module, "optimizer": None, "lr_scheduler": sched.state_dict(), "param_shapes": shapes,
                "global_steps": step, "global_samples": step * 8, "dp_world_size": 2, "mp_world_size": 1,
                "ds_config": {"zero_optimization": {"stage": 3 if zero3 else 2}}, "ds_version": "0.16.4",
                "args": argparse.Namespace(local_rank=0)}, tag / "mp_rank_00_model_states.pt")
    for r in range(2):
        torch.save({"optimizer_state_dict": {"fp32_flat_groups": [torch.zeros(4)]}},
                   tag / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    (save_dir / "latest").write_text(tag.name)
    (save_dir / "zero_to_fp32.py").write_text("# DeepSpeed's script\n")
    return save_dir


@needs_stand_ins
def test_a_deepspeed_checkpoint_imports_its_weights_step_and_schedule(tmp_path, capsys):
    cfg = quickstart_config()
    model, opt, sched = train_plainly(cfg, 3)
    src = deepspeed_save(tmp_path / "ds", model, opt, sched, step=3, bf16=False)
    assert cli("ckpt", "import", src, tmp_path / "ckpt", "--config", QUICKSTART) == 0
    out = capsys.readouterr().out
    said = ["as step-000000003: step 3 (file's step)", "note: DeepSpeed's latest checkpoint: global_step3",
            "note: a DeepSpeed checkpoint (DeepSpeed 0.16.4)", "note: ZeRO optimizer partitions not imported (2 "
            "files, flat fp32 partitions: bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt...): the optimizer "
            "starts fresh from these weights", "note: objects of classes harness does not import were not built"]
    assert [line for line in said if line not in out] == [], out
    w = recipe.workload_from_dict(recipe.safe_metadata(cfg)["config"])
    CheckpointManager(tmp_path / "ckpt").restore(models={"model": w.model})
    assert all(torch.equal(a, b) for a, b in zip(w.model.state_dict().values(), model.state_dict().values()))

    bf = deepspeed_save(tmp_path / "bf16", model, opt, sched, step=4)  # bf16 training: bf16 weights, said
    report = harness.warm_start(w.model, bf / "global_step4")
    assert report.loaded == len(model.state_dict()) and report.source.endswith("(mp_rank_00_model_states.pt)")
    zero3 = deepspeed_save(tmp_path / "z3", model, opt, sched, step=5, zero3=True)
    with pytest.raises(CheckpointFormatError, match=r"is a ZeRO-3 DeepSpeed checkpoint: its weights \(net\.0\.weight, "
                                                    r"\.\.\.\) are partitioned .* run DeepSpeed's zero_to_fp32\.py"):
        harness.warm_start(w.model, zero3)
