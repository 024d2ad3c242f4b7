"""`harness ckpt import`, harness.warm_start and harness.load_for_inference: plain PyTorch checkpoints in,
harness checkpoints out (and `harness train` resuming from them); hostile pickles refused; GPU/CPU moves."""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys

import pytest
import torch
from torch import nn

import harness
from harness import CheckpointManager, recipe
from harness.checkpoint.discovery import list_checkpoints
from harness.errors import CheckpointError, CheckpointFormatError, HarnessError
from harness.interop.export import export_checkpoint
from harness.interop.importer import import_checkpoint
from harness.interop.sources import load_file
from harness.storage import Storage

from ckpt_helpers import read_manifest
from torch_features import needs_stand_ins
from export_helpers import QUICKSTART, REPO, batch_inputs, cli, eval_out, make_run, quickstart_config, small_config

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def trainer_objects(cfg):
    """Fresh model/optimizer/scheduler exactly as `harness train` builds them for ``cfg``."""
    w = recipe.workload_from_dict(recipe.safe_metadata(cfg)["config"])
    opt = recipe.build_optimizer(cfg, w.model.parameters())
    return w, w.model, opt, recipe.build_scheduler(cfg, opt)


def tutorial_checkpoint(path, cfg, steps=6, prefix="module.", sched_cls=torch.optim.lr_scheduler.StepLR,
                        opt_cls=torch.optim.AdamW):
    """What a plain PyTorch loop saves, following the tutorial (a DDP model: keys prefixed 'module.')."""
    w = recipe.workload_from_dict(recipe.safe_metadata(cfg)["config"])
    model = w.model
    opt = opt_cls(model.parameters(), lr=cfg.optim.lr)
    sched = sched_cls(opt, step_size=3, gamma=0.5)
    for step in range(steps):
        items = [w.dataset[step * 8 + i] for i in range(8)]
        x, y = torch.stack([i[0] for i in items]), torch.stack([i[1] for i in items])
        loss = w.loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    torch.save({"epoch": 1, "model_state_dict": {prefix + k: v for k, v in model.state_dict().items()},
                "optimizer_state_dict": opt.state_dict(), "scheduler_state_dict": sched.state_dict(),
                "loss": loss}, path)
    return w, model, opt


def assert_same_state(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# -- import: tutorial checkpoint, then `harness train` resumes ---------------------------------------

def test_tutorial_import_then_train_resumes(tmp_path, capsys):
    cfg = quickstart_config()
    src = tmp_path / "tutorial.pt"
    w, model, opt = tutorial_checkpoint(src, cfg, steps=6)
    dest = tmp_path / "ckpt"
    assert cli("ckpt", "import", src, dest, "--config", QUICKSTART) == 0
    out = capsys.readouterr().out
    assert "as step-000000006: step 6 (optimizer's step counter), epoch 1" in out
    assert "using the config's schedule (cosine) at step 6" in out

    # exactly the file's model and optimizer state, under the trainer's names
    _, m2, o2, s2 = trainer_objects(cfg)
    res = CheckpointManager(str(dest)).restore(models={"model": m2}, optimizers={"optimizer": o2},
                                               schedulers={"scheduler": s2})
    assert res.step == 6 and res.epoch == 1 and res.metadata["config"]["model"]["name"] == "mlp"
    assert_same_state(m2.state_dict(), model.state_dict())
    saved = opt.state_dict()["state"]
    for pid, st in o2.state_dict()["state"].items():
        assert torch.equal(st["exp_avg"], saved[pid]["exp_avg"])
    assert s2.last_epoch == 6

    # a real `harness train` process continues from it (single process)
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "harness", "train", "--config", QUICKSTART,
                           "--set", f"checkpoint.dir={dest}", "--set", "train.max_steps=10",
                           "--set", f"run.output_dir={tmp_path / 'out'}", "--set", "train.log_every=2"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from step-000000006 at step 6" in proc.stderr + proc.stdout
    assert [i.step for i in list_checkpoints(Storage(str(dest)))] == [6, 10]
    events = [json.loads(ln) for ln in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert events[0]["event"] == "resume" and events[0]["step"] == 6
    assert [e["step"] for e in events if "event" not in e] == [8, 10]  # the step log lines


def lightning_checkpoint(path, cfg, steps=6, attribute="model"):
    """What PyTorch Lightning's `trainer.save_checkpoint` writes for a LightningModule holding the network as
    ``self.<attribute>`` (the keys Lightning 2.x uses; no lightning package needed to write them)."""
    tutorial_checkpoint(path, cfg, steps=steps, prefix=f"{attribute}.")
    plain = torch.load(path, weights_only=True)
    torch.save({"epoch": 1, "global_step": steps, "pytorch-lightning_version": "2.4.0",
                "state_dict": plain["model_state_dict"], "optimizer_states": [plain["optimizer_state_dict"]],
                "lr_schedulers": [plain["scheduler_state_dict"]],
                "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 1}}}},
                "callbacks": {"ModelCheckpoint{'monitor': 'val_loss'}": {"best_model_score": torch.tensor(0.5)}},
                "hparams_name": "kwargs", "hyper_parameters": {"lr": cfg.optim.lr}}, path)
    return plain


def test_a_lightning_checkpoint_imports_and_resumes_and_warm_starts(tmp_path, capsys):
    """A Lightning .ckpt imported as weights only: its optimizer_states/lr_schedulers lists were "keys not
    imported", and its weights kept the LightningModule's 'model.' prefix, which no plain model has."""
    cfg = quickstart_config()
    src = tmp_path / "epoch=1-step=6.ckpt"
    plain = lightning_checkpoint(src, cfg)
    dest = tmp_path / "ckpt"
    assert cli("ckpt", "import", src, dest, "--config", QUICKSTART) == 0
    out = capsys.readouterr().out
    assert "as step-000000006: step 6 (file's step), epoch 1" in out, out
    assert "note: a PyTorch Lightning checkpoint (Lightning 2.4.0)" in out
    assert "note: model weights: the LightningModule's attribute prefix 'model.' removed" in out
    assert "note: Lightning's own state not imported: loops, callbacks, hparams_name, hyper_parameters" in out
    _, m2, o2, s2 = trainer_objects(cfg)
    res = CheckpointManager(dest).restore(models={"model": m2}, optimizers={"optimizer": o2},
                                          schedulers={"scheduler": s2})
    assert res.step == 6 and res.epoch == 1
    assert_same_state(m2.state_dict(), {k.removeprefix("model."): v for k, v in plain["model_state_dict"].items()})
    saved = plain["optimizer_state_dict"]["state"]
    assert all(torch.equal(st["exp_avg"], saved[pid]["exp_avg"]) for pid, st in o2.state_dict()["state"].items())
    fresh = trainer_objects(cfg)[1]
    assert harness.warm_start(fresh, src).loaded == len(m2.state_dict())
    assert_same_state(fresh.state_dict(), m2.state_dict())


def test_a_lightning_module_with_several_attributes_keeps_its_keys_and_a_gan_its_optimizers(tmp_path):
    from harness.interop.importer import understand
    enc, dec = nn.Linear(2, 3), nn.Linear(3, 2)
    opts = [torch.optim.SGD(enc.parameters(), lr=0.1), torch.optim.Adam(dec.parameters())]
    ckpt = {"pytorch-lightning_version": "2.4.0", "epoch": 0, "global_step": 0,
            "state_dict": {**{f"encoder.{k}": v for k, v in enc.state_dict().items()},
                           **{f"decoder.{k}": v for k, v in dec.state_dict().items()}},
            "optimizer_states": [o.state_dict() for o in opts], "lr_schedulers": []}
    imp = understand(ckpt, "gan.ckpt")
    assert sorted(imp.models["model"]) == ["decoder.bias", "decoder.weight", "encoder.bias", "encoder.weight"]
    assert list(imp.optimizers) == ["optimizer", "optimizer_1"] and imp.schedulers == {}
    assert not any("prefix" in n for n in imp.notes)


def test_import_without_config_keeps_state_as_is(tmp_path, capsys, caplog):
    cfg = small_config("mlp")
    src = tmp_path / "t.pt"
    _, model, opt = tutorial_checkpoint(src, cfg, steps=3)
    assert cli("ckpt", "import", src, tmp_path / "ck", "--step", "30") == 0
    out = capsys.readouterr().out
    assert "step 30 (given)" in out and "not a LambdaLR" in out
    _, m2, _, _ = trainer_objects(cfg)
    o2 = torch.optim.AdamW(m2.parameters())
    s2 = torch.optim.lr_scheduler.StepLR(o2, step_size=3)
    res = CheckpointManager(str(tmp_path / "ck")).restore(models={"model": m2}, optimizers={"optimizer": o2},
                                                          schedulers={"scheduler": s2})
    assert res.step == 30 and s2.last_epoch == 3
    # the file does not say its optimizer's class: none is recorded (it recorded harness's own holder, and the
    # restore warned "saved from harness.interop.importer.ImportedState")
    assert "ImportedState" not in caplog.text
    assert "ImportedState" not in json.dumps(read_manifest(str(tmp_path / "ck"), "step-000000030"))
    assert_same_state(m2.state_dict(), model.state_dict())
    assert o2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_bare_state_dict(tmp_path, capsys):
    cfg = small_config("mlp")
    w, model, _ = make_run(tmp_path / "run", cfg, steps=(2,))
    src = tmp_path / "bare.pt"
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, src)
    assert cli("ckpt", "import", src, tmp_path / "ck") == 0
    assert "from a bare state_dict" in capsys.readouterr().out
    fresh = recipe.workload_from_dict(recipe.safe_metadata(cfg)["config"]).model
    res = CheckpointManager(str(tmp_path / "ck")).restore(models={"model": fresh})
    assert res.step == 0
    x = batch_inputs(w)
    assert torch.equal(eval_out(fresh, x), eval_out(model, x))
    # with the run's config: optimizer and scheduler are created, so the trainer can resume
    s = import_checkpoint(str(src), str(tmp_path / "ck2"), step=4, config=cfg)
    assert s["optimizers"] == ["optimizer"] and s["schedulers"] == ["scheduler"] and s["config"]
    assert any("starts fresh" in n for n in s["notes"])
    _, m3, o3, s3 = trainer_objects(cfg)
    CheckpointManager(str(tmp_path / "ck2")).restore(models={"model": m3}, optimizers={"optimizer": o3},
                                                     schedulers={"scheduler": s3})
    assert s3.last_epoch == 4 and o3.state_dict()["state"] == {}
    assert_same_state(m3.state_dict(), model.state_dict())


def test_exported_pt_round_trip(tmp_path, capsys):
    cfg = small_config("mlp")
    _, model, _ = make_run(tmp_path / "run", cfg, steps=(3,))
    export_checkpoint(str(tmp_path / "run"), str(tmp_path / "e.pt"))
    s = import_checkpoint(str(tmp_path / "e.pt"), str(tmp_path / "ck"))
    assert s["step"] == 3 and s["step_source"] == "file's step" and s["config"]  # config taken from the file
    assert cli("ckpt", "diff", tmp_path / "run", tmp_path / "ck") == 0  # same replicated state
    assert capsys.readouterr().out.rstrip().endswith("identical")


def test_malicious_pickle_is_refused_and_never_runs(tmp_path, capsys):
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    src = tmp_path / "evil.pt"
    torch.save({"model_state_dict": {"w": torch.zeros(2)}, "epoch": Evil()}, src)
    with pytest.raises(CheckpointFormatError, match="refused.*unpickling arbitrary"):
        import_checkpoint(str(src), str(tmp_path / "ck"))
    assert cli("ckpt", "import", src, tmp_path / "ck") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "posix.system" in err and "nothing from the file was run" in err
    with pytest.raises(CheckpointFormatError):
        harness.warm_start(nn.Linear(2, 2), str(src))
    assert not marker.exists() and not (tmp_path / "ck").exists()
    # a plain pickle (not torch.save) of a malicious object, too
    (tmp_path / "p.pt").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointFormatError):
        load_file(str(tmp_path / "p.pt"))
    assert not marker.exists()


def test_a_class_not_built_is_named_as_its_users_write_it():
    """Python 3.13 pickles a pathlib.Path as pathlib._local.PosixPath; protocol 2 names subprocess commands."""
    from harness.interop.torchload import _stand_in, not_built_notes
    objs = {n: _stand_in(n)() for n in ("pathlib._local.PosixPath", "commands.Popen", "argparse.Namespace")}
    assert not_built_notes(objs) == ["objects of classes harness does not import were not built (nothing of them "
                                     "ran; they are not used): argparse.Namespace, pathlib.PosixPath, "
                                     "subprocess.Popen"]


@needs_stand_ins
def test_objects_of_unknown_classes_are_not_built_and_a_function_call_is_still_refused(tmp_path, capsys):
    """A Lightning checkpoint whose hyperparameters hold an argparse.Namespace and a pathlib.Path (what
    `save_hyperparameters(args)` keeps) was refused whole ("unpickling arbitrary Python objects"): those objects
    are not built now, a stand-in takes their place and a note names them; a class used to run something
    (subprocess.Popen) runs nothing, and a function call (os.system) is refused as before."""
    import argparse
    import pathlib
    import subprocess as sp
    cfg = quickstart_config()
    src = tmp_path / "hp.ckpt"
    plain = lightning_checkpoint(src, cfg)
    ckpt = torch.load(src, weights_only=True)
    ckpt["hyper_parameters"] = {"args": argparse.Namespace(lr=0.1), "data_dir": pathlib.PosixPath("/data")}
    torch.save(ckpt, src)
    assert cli("ckpt", "import", src, tmp_path / "ck", "--config", QUICKSTART) == 0
    out = capsys.readouterr().out
    assert ("note: objects of classes harness does not import were not built (nothing of them ran; they are not "
            "used): argparse.Namespace, pathlib.PosixPath") in out, out
    fresh = trainer_objects(cfg)[1]
    assert harness.warm_start(fresh, src).loaded == len(plain["model_state_dict"])

    marker = tmp_path / "PWNED"

    class Spawn:
        def __reduce__(self):
            return (sp.Popen, (["touch", str(marker)],))

    torch.save({"model_state_dict": {"w": torch.zeros(2)}, "epoch": 1, "extra": Spawn()}, tmp_path / "spawn.pt")
    summary = import_checkpoint(tmp_path / "spawn.pt", tmp_path / "ck2")
    assert any("subprocess.Popen" in n for n in summary["notes"]) and not marker.exists()


def test_import_dry_run_checks_everything_and_writes_nothing(tmp_path, capsys):
    cfg = quickstart_config()
    src, dest = tmp_path / "tutorial.pt", tmp_path / "ckpt"
    tutorial_checkpoint(src, cfg, steps=6)
    assert cli("ckpt", "import", src, dest, "--config", QUICKSTART, "--dry-run") == 0
    out = capsys.readouterr().out
    assert out.startswith(f"dry run: would import {src} into {dest} as step-000000006: step 6 (optimizer's step "
                          "counter), epoch 1"), out
    assert "using the config's schedule (cosine) at step 6" in out and not dest.exists()
    # a config whose model the file does not fit: the error the import itself would give, before any write
    assert cli("ckpt", "import", src, dest, "--config", QUICKSTART, "--set", "model.hidden=64", "--dry-run") == 1
    assert "the file's model weights do not fit the config's model (mlp)" in capsys.readouterr().err
    assert not dest.exists()
    # a save of step 6 killed before its commit left its folder: the import is step-000000006-a1, dry or not
    (dest / "step-000000006").mkdir(parents=True)
    (dest / "step-000000006" / "data-0000.bin").write_bytes(b"partial")
    for dry in (["--dry-run"], []):
        assert cli("ckpt", "import", src, dest, "--config", QUICKSTART, *dry) == 0
        assert " as step-000000006-a1: step 6 " in capsys.readouterr().out
    assert [p.name for p in dest.iterdir()] == ["step-000000006-a1"]  # the dead attempt went with its commit


def test_import_refusals(tmp_path, capsys):
    cfg = small_config("mlp")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    assert cli("ckpt", "import", tmp_path / "junk.pt", tmp_path / "ck") == 1
    assert "not a readable torch.save or safetensors file" in capsys.readouterr().err
    torch.save({"epoch": 3, "notes": "no weights"}, tmp_path / "empty.pt")
    with pytest.raises(CheckpointFormatError, match="no model weights"):
        import_checkpoint(str(tmp_path / "empty.pt"), str(tmp_path / "ck"))
    # the model does not fit the config's model
    torch.save({"model_state_dict": nn.Linear(3, 3).state_dict()}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="do not fit the config's model"):
        import_checkpoint(str(tmp_path / "other.pt"), str(tmp_path / "ck"), config=cfg)
    # another optimizer than the config's: refused, unless --fresh-optimizer
    tutorial_checkpoint(tmp_path / "sgd.pt", cfg, steps=2,
                        opt_cls=lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9))
    with pytest.raises(CheckpointError, match="--fresh-optimizer"):
        import_checkpoint(str(tmp_path / "sgd.pt"), str(tmp_path / "ck"), config=cfg)
    assert cli("ckpt", "import", tmp_path / "sgd.pt", tmp_path / "ck", "--step", "2", "--fresh-optimizer",
               "--set", "model.hidden=32", "--set", "model.layers=2", "--set", "data.in_features=12",
               "--set", "data.num_classes=5", "--set", "data.num_samples=256") == 0
    assert "ignored (fresh optimizer)" in capsys.readouterr().out
    # a checkpoint at this step or later already there: harness would resume from that one
    assert cli("ckpt", "import", tmp_path / "sgd.pt", tmp_path / "ck", "--step", "1") == 1
    assert "already holds checkpoint step-000000002" in capsys.readouterr().err


def test_safetensors_source_and_reader_checks(tmp_path):
    from harness.interop.safetensors import write_safetensors

    sd = {"a": torch.randn(3, 2), "b": torch.arange(4, dtype=torch.int64)}
    with open(tmp_path / "m.safetensors", "wb") as f:
        write_safetensors(f, sd, {"step": "1"})
    got = load_file(str(tmp_path / "m.safetensors"))
    assert set(got) == {"a", "b"} and all(torch.equal(got[k], sd[k]) for k in sd)
    # offsets outside the data
    header = json.dumps({"a": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}).encode()
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(CheckpointFormatError, match="outside the data"):
        load_file(str(tmp_path / "bad.safetensors"))


# -- warm_start -------------------------------------------------------------------------------------

class Pretrained(nn.Module):
    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.head = nn.Linear(8, classes)


class FineTune(Pretrained):
    def __init__(self) -> None:
        super().__init__(classes=10)       # head: another shape
        self.adapter = nn.Linear(8, 8)     # new layer


def test_warm_start_reports_key_by_key(tmp_path):
    torch.manual_seed(0)
    src = Pretrained()
    mgr = CheckpointManager(str(tmp_path / "run"), keep_last=0)
    mgr.save(5, models=src)
    mgr.close()
    torch.save({"model_state_dict": src.state_dict(), "epoch": 1}, tmp_path / "pre.pt")
    for source in (tmp_path / "run", tmp_path / "pre.pt"):
        model = FineTune()
        head_before = model.head.weight.detach().clone()
        report = harness.warm_start(model, str(source))
        assert isinstance(report, harness.checkpoint.load.LoadReport)
        assert report.loaded == 2 and sorted(report.loaded_keys) == ["body.bias", "body.weight"]
        assert sorted(k for k, _, _ in report.mismatched) == ["head.bias", "head.weight"]
        assert sorted(report.missing) == ["adapter.bias", "adapter.weight"] and report.unexpected == []
        assert torch.equal(model.body.weight, src.body.weight) and torch.equal(model.head.weight, head_before)
        lines = report.lines()
        assert "loaded      body.weight" in lines
        assert any(ln.startswith("shape       head.weight: saved [4, 8], model [10, 8]") for ln in lines)
        assert any(ln.startswith("missing     adapter.weight") for ln in lines)


def test_every_python_entry_point_takes_a_pathlib_path(tmp_path, monkeypatch):
    """`tmp_path / "run"` is what people pass: it failed everywhere with "argument of type 'PosixPath' is not
    iterable" (or "'PosixPath' object has no attribute 'startswith'" in export)."""
    torch.manual_seed(0)
    src = Pretrained()
    mgr = CheckpointManager(tmp_path / "run")
    mgr.save(5, models=src)
    mgr.close()
    assert [c.step for c in list_checkpoints(Storage(tmp_path / "run"))] == [5]
    export_checkpoint(tmp_path / "run", tmp_path / "out.pt", fmt="pt")
    monkeypatch.setenv("HOME", str(tmp_path))  # a quoted '~/x.pt' is under the home folder, as a folder's ~ is
    export_checkpoint("~/run", "~/home.pt", fmt="pt")  # it was ./~/home.pt: "folder ./~ does not exist"
    assert (tmp_path / "home.pt").stat().st_size == (tmp_path / "out.pt").stat().st_size
    summary = import_checkpoint(tmp_path / "out.pt", tmp_path / "imported")
    assert summary["step"] == 5
    for source in (tmp_path / "run", tmp_path / "out.pt", tmp_path / "imported"):
        model = harness.load_for_inference(source, Pretrained())
        assert torch.equal(model.body.weight, src.body.weight), source
        assert harness.warm_start(FineTune(), source).loaded == 2
    for call in (lambda: harness.load_for_inference(tmp_path / "run", [Pretrained()]),
                 lambda: harness.warm_start(src.state_dict(), tmp_path / "run")):
        with pytest.raises(TypeError, match="takes the model .a torch.nn.Module. to load into, got"):
            call()


def test_a_hugging_face_model_folder_is_a_source_of_weights(tmp_path):
    """`save_pretrained`'s folder (sharded safetensors with model.safetensors.index.json, or one
    pytorch_model.bin) for warm_start / load_for_inference / checkpoint.init_from: it said "no committed
    checkpoint" (it looked for harness's step-* folders only)."""
    from safetensors.torch import save_file
    from harness.errors import CheckpointFormatError
    torch.manual_seed(0)
    src = Pretrained()
    sd = src.state_dict()
    hf = tmp_path / "hf-model"
    hf.mkdir()
    save_file({k: sd[k] for k in ("body.weight", "body.bias")}, hf / "model-00001-of-00002.safetensors")
    save_file({k: sd[k] for k in ("head.weight", "head.bias")}, hf / "model-00002-of-00002.safetensors")
    index = {"metadata": {"total_size": 0}, "weight_map": {
        k: f"model-0000{1 if k.startswith('body') else 2}-of-00002.safetensors" for k in sd}}
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    model = harness.load_for_inference(hf, Pretrained())
    assert_same_state(model.state_dict(), sd)
    assert harness.warm_start(FineTune(), hf).loaded == 2  # body; head has another shape
    bin_folder = tmp_path / "bin-model"
    bin_folder.mkdir()
    torch.save(sd, bin_folder / "pytorch_model.bin")
    assert_same_state(harness.load_for_inference(bin_folder, Pretrained()).state_dict(), sd)
    imported = import_checkpoint(hf, tmp_path / "imported")  # `harness ckpt import FOLDER`: IsADirectoryError
    assert imported["models"] == ["model"] and imported["step"] == 0
    assert_same_state(harness.load_for_inference(tmp_path / "imported", Pretrained()).state_dict(), sd)
    for folder, message in [(tmp_path / "imported", "a harness checkpoint folder already: use it as checkpoint.dir"),
                            (tmp_path, "a folder without model weights")]:
        with pytest.raises(CheckpointFormatError, match=message):
            import_checkpoint(folder, tmp_path / "again")
    for shard in ("../outside.safetensors", "sub/x.safetensors"):
        (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"body.weight": shard}}))
        with pytest.raises(CheckpointFormatError, match="not plain file names in the folder"):
            harness.load_for_inference(hf, Pretrained())


def test_load_for_inference_names_a_device_it_cannot_use(tmp_path):
    """torch said "Invalid device string" or "Torch not compiled with CUDA enabled" (an AssertionError)."""
    mgr = CheckpointManager(tmp_path / "run")
    mgr.save(1, models=Pretrained())
    with pytest.raises(ValueError, match="device='gpu0' is not a device"):
        harness.load_for_inference(tmp_path / "run", Pretrained(), device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda' but no CUDA device is available here: use device='cpu'"):
            harness.load_for_inference(tmp_path / "run", Pretrained(), device="cuda")
    assert harness.load_for_inference(tmp_path / "run", Pretrained(), device="cpu").body.weight.device.type == "cpu"


# -- load_for_inference -----------------------------------------------------------------------------

def test_load_for_inference_step_best_and_file(tmp_path):
    cfg = small_config("mlp")
    root = tmp_path / "run"
    w, model, _ = make_run(root, cfg, steps=(1, 2, 3), metrics_fn=lambda s: {"acc": {1: 0.1, 2: 0.9, 3: 0.4}[s]})
    x = batch_inputs(w)
    fresh = lambda: recipe.workload_from_dict(recipe.safe_metadata(cfg)["config"]).model  # noqa: E731
    m = harness.load_for_inference(str(root), fresh().train())
    assert not m.training and torch.equal(m(x), eval_out(model, x))
    m1 = harness.load_for_inference(str(root), fresh(), step=1)
    m2 = harness.load_for_inference(str(root), fresh(), best=True, metric="acc", mode="max")
    ref2 = fresh()
    CheckpointManager(str(root)).restore(models={"model": ref2}, step=2, rng=False)
    assert torch.equal(m2(x), eval_out(ref2, x)) and not torch.equal(m1(x), m2(x))
    export_checkpoint(str(root), str(tmp_path / "m.safetensors"), fmt="safetensors")
    m3 = harness.load_for_inference(str(tmp_path / "m.safetensors"), fresh())
    assert torch.equal(m3(x), eval_out(model, x))
    with pytest.raises(CheckpointError, match="does not match"):
        harness.load_for_inference(str(root), nn.Linear(3, 3))
    with pytest.raises(HarnessError, match="step/best do not apply"):
        harness.load_for_inference(str(tmp_path / "m.safetensors"), fresh(), step=1)


@CUDA
def test_gpu_saved_cpu_loaded(tmp_path):
    torch.manual_seed(0)
    gpu = Pretrained().cuda()
    opt = torch.optim.Adam(gpu.parameters())
    gpu.head(gpu.body(torch.randn(2, 6, device="cuda"))).sum().backward()
    opt.step()
    mgr = CheckpointManager(str(tmp_path / "run"), keep_last=0)
    mgr.save(1, models=gpu, optimizers=opt)
    mgr.close()
    cpu = harness.load_for_inference(str(tmp_path / "run"), Pretrained())
    assert next(cpu.parameters()).device.type == "cpu"
    for k, v in gpu.state_dict().items():
        assert torch.equal(cpu.state_dict()[k], v.cpu())
    # and a model that lives on the GPU moved to the CPU by device=
    moved = harness.load_for_inference(str(tmp_path / "run"), Pretrained().cuda(), device="cpu")
    assert next(moved.parameters()).device.type == "cpu"
    export_checkpoint(str(tmp_path / "run"), str(tmp_path / "g.pt"))
    ck = torch.load(tmp_path / "g.pt", weights_only=True)
    assert ck["model_state_dict"]["body.weight"].device.type == "cpu"


@CUDA
def test_cpu_saved_gpu_loaded(tmp_path):
    torch.manual_seed(0)
    cpu = Pretrained()
    mgr = CheckpointManager(str(tmp_path / "run"), keep_last=0)
    mgr.save(1, models=cpu)
    mgr.close()
    gpu = harness.load_for_inference(str(tmp_path / "run"), Pretrained(), device="cuda")
    assert next(gpu.parameters()).device.type == "cuda" and not gpu.training
    x = torch.randn(3, 6)
    assert torch.allclose(gpu.head(gpu.body(x.cuda())).cpu(), cpu.head(cpu.body(x)), atol=1e-5)
    report = harness.warm_start(FineTune().cuda(), str(tmp_path / "run"))
    assert sorted(report.loaded_keys) == ["body.bias", "body.weight"]

