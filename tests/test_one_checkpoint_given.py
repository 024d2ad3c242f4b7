"""One checkpoint's own ``step-N`` folder where a folder of checkpoints is expected (Lightning's ``ckpt_path``
habit): a run there is refused (exit 2), nothing written into the checkpoint; readers (`ckpt verify`/`inspect`/
`export`, `checkpoint.init_from`, `warm_start`) read that very checkpoint."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch

from ckpt_helpers import Net, assert_bitwise, simple_run, snapshot, train_step
from export_helpers import cli
from harness import CheckpointManager
from harness.checkpoint.discovery import as_step_of_its_folder
from harness.errors import CheckpointError, ConfigError
from harness.interop.inference import warm_start
from harness.storage import Storage
from trainer_helpers import base_env, launch_cmd


def _run(url: str) -> dict[str, dict]:
    model, opt, _ = simple_run()
    mgr = CheckpointManager(url, keep_last=0)
    weights = {}
    for step in (1, 2, 3):
        train_step(model, opt)
        mgr.save(step, models=model, optimizers=opt)
        weights[mgr.last_saved] = snapshot(model.state_dict())
    mgr.close()
    return weights


def test_a_manager_on_one_checkpoint_is_refused_and_writes_nothing_there(tmp_path):
    _run(str(tmp_path / "ck"))
    one = tmp_path / "ck" / "step-000000002"
    before = sorted(os.listdir(one))
    with pytest.raises(ConfigError, match=r"step-000000002 is one harness checkpoint \(step-000000002\), not a "
                       r"folder of them: .*checkpoint.dir = \".*/ck\""):
        CheckpointManager(str(one))
    assert sorted(os.listdir(one)) == before
    CheckpointManager(str(one), read_only=True).close()  # a reader may look (nothing written)


def test_launch_on_one_checkpoint_exits_2_before_any_worker(tmp_path):
    """It started over at step 0 inside the committed checkpoint, writing step-000000100/ and metrics.jsonl
    there (exit 0)."""
    _run(str(tmp_path / "ck"))
    one = tmp_path / "ck" / "step-000000003"
    before = sorted(os.listdir(one))
    out = subprocess.run(launch_cmd(tmp_path, f"checkpoint.dir='{one}'", f"run.output_dir='{tmp_path / 'out'}'"),
                         env=base_env(), capture_output=True, text=True, timeout=120)
    err = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(err) == 1, (out.returncode, out.stderr[-2000:])
    assert err[0].startswith(f"harness: config error: {one} is one harness checkpoint (step-000000003)"), err
    assert "[rank" not in out.stdout + out.stderr  # no worker started
    assert sorted(os.listdir(one)) == before


def test_readers_given_one_checkpoint_read_that_checkpoint(tmp_path, capsys):
    weights = _run(str(tmp_path / "ck"))
    one = tmp_path / "ck" / "step-000000002"
    assert cli("ckpt", "verify", one) == 0
    assert capsys.readouterr().out.startswith("OK step-000000002 ")
    assert cli("ckpt", "inspect", one) == 0
    assert "checkpoint step-000000002 in " in capsys.readouterr().out
    assert cli("ckpt", "export", one, "--out", tmp_path / "m.pt") == 0  # it said "no committed checkpoint in"
    assert_bitwise(dict(torch.load(tmp_path / "m.pt", weights_only=True)["model_state_dict"]),
                   dict(weights["step-000000002"]))
    model = Net()
    warm_start(model, str(one))  # checkpoint.init_from's reader
    assert_bitwise(dict(model.state_dict()), dict(weights["step-000000002"]))


def test_an_earlier_save_of_a_step_is_not_read_as_the_later_one(tmp_path):
    """step-000000003 beside step-000000003-a1: reading step 3 of the folder reads -a1, so the folder
    step-000000003 given alone is refused rather than read as the other."""
    url = str(tmp_path / "ck")
    _run(url)
    model, _, _ = simple_run()
    CheckpointManager(url, keep_last=0).save(3, models=model)
    with pytest.raises(CheckpointError, match="step-000000003 is an earlier save of step 3 than step-000000003-a1"):
        as_step_of_its_folder(Storage(str(tmp_path / "ck" / "step-000000003")), None)
    parent, step = as_step_of_its_folder(Storage(str(tmp_path / "ck" / "step-000000003-a1")), None)
    assert (step, parent.url) == (3, url)
