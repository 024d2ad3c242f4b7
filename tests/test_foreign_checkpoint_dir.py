"""A checkpoint.dir holding another tool's checkpoints (torchtitan's DCP ``step-N`` folders, Lightning
``.ckpt`` files) and none of harness's: `harness launch` and `harness train` stop with a config error (exit 2,
one line saying how to import or start from them) instead of training from step 0 beside them; with
checkpoint.init_from set, or once harness has a checkpoint of its own there, they are left alone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from harness import CheckpointManager, load_for_inference, recipe
from harness.checkpoint.foreign import foreign_checkpoints
from harness.storage import Storage

from export_helpers import QUICKSTART, REPO, cli, quickstart_config

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp.save in one process


def harness_cmd(tmp_path, *args: str, launch: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = ([sys.executable, "-m", "harness", "launch", "--nproc-per-node", "2"] if launch
           else [sys.executable, "-m", "harness", "train"])
    return subprocess.run([*cmd, "--config", QUICKSTART, "--set", f"run.output_dir={tmp_path / 'out'}",
                           "--set", "train.max_steps=4", *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def torchtitan_dir(root, steps=(500, 1000)):
    model = recipe.workload_from_dict(recipe.safe_metadata(quickstart_config())["config"]).model
    for step in steps:
        dcp.save({"model": model.state_dict(), "step": step}, checkpoint_id=str(root / f"step-{step}"))
    return root


def test_the_launcher_refuses_to_start_over_in_torchtitans_checkpoint_folder(tmp_path):
    ckpt = torchtitan_dir(tmp_path / "checkpoint")
    before = sorted(os.listdir(ckpt))
    proc = harness_cmd(tmp_path, "--set", f"checkpoint.dir={ckpt}", launch=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("harness:")]
    assert len(lines) == 1 and lines[0].startswith(f"harness: config error: checkpoint.dir {ckpt} holds "
                                                   "torch.distributed.checkpoint checkpoints (step-500, step-1000)")
    assert f"`harness ckpt import {ckpt}/step-1000 NEW_DIR --config CONFIG`" in lines[0]
    assert f'checkpoint.init_from = "{ckpt}/step-1000"' in lines[0]
    assert sorted(os.listdir(ckpt)) == before  # nothing written beside them
    assert "[rank " not in proc.stderr, proc.stderr[-2000:]  # found by the launcher: no worker started


def test_the_launcher_leaves_a_folder_with_harness_checkpoint_folders_to_its_workers(tmp_path):
    """An uncommitted harness folder beside torchtitan's is no checkpoint of ours: the workers (which read the
    commit records) refuse it; a launcher that only lists cannot tell, so it lets them start."""
    ckpt = torchtitan_dir(tmp_path / "checkpoint", steps=(1000,))
    (ckpt / "step-000000004").mkdir()  # what a save killed before its commit record leaves
    proc = harness_cmd(tmp_path, "--set", f"checkpoint.dir={ckpt}", launch=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "[rank 0]" in proc.stderr and "holds torch.distributed.checkpoint checkpoints (step-1000)" in proc.stderr


def test_the_way_out_it_names_works_and_init_from_or_own_checkpoints_are_not_refused(tmp_path):
    ckpt = torchtitan_dir(tmp_path / "checkpoint", steps=(1000,))
    proc = harness_cmd(tmp_path, "--set", f"checkpoint.dir={tmp_path / 'new'}",
                       "--set", f"checkpoint.init_from={ckpt}/step-1000")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "warm start of model from" in proc.stderr
    shutil.copytree(tmp_path / "new", ckpt, dirs_exist_ok=True)  # harness's own checkpoint beside torchtitan's
    proc = harness_cmd(tmp_path, "--set", f"checkpoint.dir={ckpt}", "--set", "train.max_steps=6")
    assert proc.returncode == 0 and "resumed from step-000000004 at step 4" in proc.stderr, proc.stderr[-2000:]


def test_a_lightning_folder_and_a_dcp_folder_itself_are_refused_too(tmp_path):
    lightning = tmp_path / "lightning"
    lightning.mkdir()
    for name in ("epoch=0-step=50.ckpt", "last.ckpt", "notes.txt"):
        (lightning / name).write_bytes(b"x")
    assert foreign_checkpoints(Storage(str(lightning))) == ["epoch=0-step=50.ckpt", "last.ckpt"]
    proc = harness_cmd(tmp_path, "--set", f"checkpoint.dir={lightning}")
    assert proc.returncode == 2
    assert "holds PyTorch Lightning checkpoints (epoch=0-step=50.ckpt, last.ckpt)" in proc.stderr
    assert f"harness ckpt import {lightning}/last.ckpt NEW_DIR" in proc.stderr

    torchtitan_dir(tmp_path / "t", steps=(7,))
    assert foreign_checkpoints(Storage(str(tmp_path / "t" / "step-7"))) == ["."]
    assert foreign_checkpoints(Storage(str(tmp_path / "out-of-nothing"))) == []


def test_ckpt_list_and_verify_say_what_the_folder_holds_instead(tmp_path, capsys):
    ckpt = torchtitan_dir(tmp_path / "checkpoint", steps=(20, 100))
    hint = (f"(it holds torch.distributed.checkpoint checkpoints: step-20, step-100; `harness ckpt import "
            f"{ckpt}/step-100 NEW_DIR` makes one a harness checkpoint)")
    assert cli("ckpt", "list", ckpt) == 0
    assert capsys.readouterr().out.strip() == f"no committed checkpoints in {ckpt} {hint}"
    assert cli("ckpt", "verify", ckpt) == 1
    assert capsys.readouterr().err.strip() == f"harness: error: no committed checkpoint in {ckpt} {hint}"
    assert cli("ckpt", "export", ckpt / "step-100", "--format", "pt", "--out", tmp_path / "x.pt") == 1
    assert capsys.readouterr().err.strip() == (
        f"harness: error: no committed checkpoint in {ckpt}/step-100 (it is a torch.distributed.checkpoint "
        f"checkpoint: `harness ckpt import {ckpt}/step-100 NEW_DIR` makes it a harness checkpoint)")


def test_an_own_loop_restore_warns_what_the_folder_holds_instead(tmp_path, caplog):
    from harness import CheckpointManager
    ckpt = torchtitan_dir(tmp_path / "checkpoint", steps=(3,))
    model = recipe.workload_from_dict(recipe.safe_metadata(quickstart_config())["config"]).model
    mgr = CheckpointManager(ckpt)
    with caplog.at_level("INFO", logger="harness"):
        assert mgr.restore(models=model) is None
    assert mgr.other_tools_checkpoints == ["step-3"]  # what the trainer's refusal uses: the folder listed once
    warned = [r for r in caplog.records if r.levelname == "WARNING" and "no checkpoint in" in r.getMessage()]
    assert len(warned) == 1 and "it holds torch.distributed.checkpoint checkpoints: step-3" in warned[0].getMessage()
    caplog.clear()
    with caplog.at_level("INFO", logger="harness"):
        assert CheckpointManager(tmp_path / "empty").restore(models=model) is None
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_the_folder_of_step_folders_itself_is_a_source_its_newest_read(tmp_path):
    """checkpoint.init_from / warm_start / import pointed at torchtitan's checkpoint folder (not one step-N
    inside it) read the newest step; a Lightning folder its last.ckpt, and several .ckpt without one are named."""
    import harness
    from harness.errors import CheckpointFormatError
    from harness.interop.importer import import_checkpoint

    ckpt = torchtitan_dir(tmp_path / "checkpoint", steps=(500, 1000))
    model = recipe.workload_from_dict(recipe.safe_metadata(quickstart_config())["config"]).model
    report = harness.warm_start(model, ckpt)
    assert report.loaded == len(model.state_dict()) and report.source == f"{ckpt} (step-1000: __0_0.distcp)"
    summary = import_checkpoint(ckpt, tmp_path / "imported")
    assert summary["step"] == 1000 and f"the newest of 2 checkpoints in {ckpt}: step-1000" in summary["notes"]

    lightning = tmp_path / "lightning"
    lightning.mkdir()
    for name in ("epoch=0-step=5.ckpt", "epoch=1-step=10.ckpt"):
        torch.save({"state_dict": model.state_dict(), "global_step": 5, "pytorch-lightning_version": "2.4.0"},
                   lightning / name)
    with pytest.raises(CheckpointFormatError, match=r"holds 2 Lightning checkpoints and no last\.ckpt"):
        harness.warm_start(model, lightning)
    torch.save({"state_dict": model.state_dict(), "global_step": 10, "pytorch-lightning_version": "2.4.0"},
               lightning / "last.ckpt")
    assert import_checkpoint(lightning, tmp_path / "from-lightning")["step"] == 10


def test_ckpt_inspect_shows_a_dcp_folder_from_its_metadata(tmp_path, capsys):
    import json
    step = torchtitan_dir(tmp_path / "checkpoint", steps=(9,)) / "step-9"
    model = recipe.workload_from_dict(recipe.safe_metadata(quickstart_config())["config"]).model
    assert cli("ckpt", "inspect", step) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (f"torch.distributed.checkpoint folder {step} (from its .metadata alone; `harness ckpt import` "
                      "reads and checks the data)")
    n_bytes = sum(t.numel() * 4 for t in model.state_dict().values())
    assert out[1].startswith(f"  {len(model.state_dict())} tensors, ") and out[1].endswith(
        "in __0_0.distcp; 1 other values: step")
    assert out[2].split() == ["KEY", "DTYPE", "SHAPE", "SIZE"]
    assert out[3].split()[:2] == ["model.net.0.weight", "float32"]
    assert cli("ckpt", "inspect", step, "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["bytes"] == n_bytes and info["values"] == ["step"] and info["files"] == ["__0_0.distcp"]
    assert {t["key"]: t["shape"] for t in info["tensors"]} == {
        f"model.{k}": list(v.shape) for k, v in model.state_dict().items()}


def test_trainer_and_accelerate_output_folders_are_recognised(tmp_path, capsys):
    """transformers' Trainer keeps checkpoint-N folders (trainer_state.json inside), Accelerate's automatic
    naming checkpoint_N folders (optimizer.bin inside): a checkpoint.dir of them is refused like torchtitan's."""
    out = tmp_path / "out"
    for n in (500, 1000, 50):
        (out / f"checkpoint-{n}").mkdir(parents=True)
        (out / f"checkpoint-{n}" / "trainer_state.json").write_text("{}")
    (out / "checkpoint-7").mkdir()  # no trainer_state.json: not a Trainer checkpoint
    (out / "runs").mkdir()
    assert foreign_checkpoints(Storage(str(out))) == ["checkpoint-50", "checkpoint-500", "checkpoint-1000"]
    proc = harness_cmd(tmp_path, "--set", f"checkpoint.dir={out}")
    assert proc.returncode == 2
    assert (f"checkpoint.dir {out} holds Hugging Face Trainer checkpoints (checkpoint-50, checkpoint-500, "
            "checkpoint-1000) and none of harness's") in proc.stderr
    assert f"`harness ckpt import {out}/checkpoint-1000 NEW_DIR --config CONFIG`" in proc.stderr

    acc = tmp_path / "project" / "checkpoints"
    for n in (0, 1):
        (acc / f"checkpoint_{n}").mkdir(parents=True)
        (acc / f"checkpoint_{n}" / "optimizer.bin").write_bytes(b"x")
    assert foreign_checkpoints(Storage(str(acc))) == ["checkpoint_0", "checkpoint_1"]
    ds = tmp_path / "ds"
    for n in (200, 1000):
        (ds / f"global_step{n}").mkdir(parents=True)
        (ds / f"global_step{n}" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    (ds / "latest").write_text("global_step1000")
    assert foreign_checkpoints(Storage(str(ds))) == ["global_step200", "global_step1000"]
    assert cli("ckpt", "list", acc) == 0
    assert capsys.readouterr().out.strip().endswith(
        f"(it holds Accelerate checkpoints: checkpoint_0, checkpoint_1; `harness ckpt import {acc}/checkpoint_1 "
        "NEW_DIR` makes one a harness checkpoint)")


def test_a_run_folder_with_another_tools_file_beside_it_reads_harness_checkpoints(tmp_path):
    """load_for_inference/warm_start/init_from read another tool's folder first and asked afterwards whether
    harness checkpoints were there too: a stray file of another tool's layout (a broken `.metadata` a DCP
    experiment left in the run folder) made the harness checkpoints beside it unreadable. Harness's own
    checkpoints are looked for first now, and the other tool's files are not opened."""
    ck = tmp_path / "ck"
    torch.manual_seed(0)
    saved = nn.Linear(3, 3)
    mgr = CheckpointManager(str(ck), keep_last=0)
    mgr.save(1, models=saved)
    mgr.close()
    (ck / ".metadata").write_bytes(b"not a pickle")
    model = load_for_inference(str(ck), nn.Linear(3, 3))
    assert torch.equal(model.weight, saved.weight)
