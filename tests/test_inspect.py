"""`harness ckpt inspect` and `harness ckpt diff`: what a checkpoint holds, and how two differ."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

from harness import CheckpointManager
from harness.interop.inspection import compare_tensors, diff_checkpoints, inspect_checkpoint
from harness.checkpoint.load import read_state
from harness.storage import Storage

from export_helpers import cli, make_run, small_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run") / "ck"
    w, model, losses = make_run(root, small_config("mlp"), steps=(2, 4))
    return root, model, losses


def test_inspect_text(run, capsys):
    root, model, losses = run
    assert cli("ckpt", "inspect", root) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("checkpoint step-000000004 in ") and "(newest;" in lines[0]
    assert f"step 4, epoch 0, loss {losses[4]:.6g}, metrics: accuracy=" in out
    assert "world size 1, sharding replicated" in out
    assert "format harness.checkpoint v1, written by harness 0.1.0, torch " in out
    assert "run config: model mlp (hidden=32, layers=2); data synthetic_vectors" in out
    n_params = sum(v.numel() for v in model.state_dict().values())
    assert "model 'model' (harness.workloads.MLP): 6 tensors, " in out and f"{n_params:,} parameters" in out
    assert any(ln.split()[:3] == ["net.0.weight", "float32", "[32,"] for ln in lines)
    assert "optimizer 'optimizer' (torch.optim.adamw.AdamW): 18 tensors" in out and "lr=" in out and "weight_decay=0" in out
    assert "scheduler 'scheduler': 0 tensors, 0 B; last_epoch=4" in out
    assert 'rank 0: 1 tensors' in out and 'data position {"epoch": 0, "position": 32}' in out


def test_inspect_json_and_step(run, capsys):
    root, model, losses = run
    assert cli("ckpt", "inspect", root, "--step", "2", "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["checkpoint"] == "step-000000002" and info["step"] == 2 and info["epoch"] == 0
    assert info["loss"] == pytest.approx(losses[2]) and set(info["metrics"]) == {"accuracy"}
    assert info["world_size"] == 1 and info["sharding"] == "replicated" and info["format_version"] == 1
    assert info["torch_version"] == torch.__version__ and info["config"]["model"]["name"] == "mlp"
    groups = {(g["kind"], g["name"]): g for g in info["groups"]}
    m = groups[("model", "model")]
    sd = model.state_dict()
    assert {t["key"]: t["shape"] for t in m["tensors"]} == {k: list(v.shape) for k, v in sd.items()}
    assert all(t["dtype"] == "float32" for t in m["tensors"])
    assert m["bytes"] == sum(v.numel() * 4 for v in sd.values())
    o = groups[("optimizer", "optimizer")]
    assert o["count"] == 18 and o["bytes"] > 2 * m["bytes"] and o["hyperparameters"][0]["lr"] > 0
    assert info["data_bytes"] >= sum(g["bytes"] for g in info["groups"])
    assert info["total_bytes"] > info["data_bytes"]


def test_inspect_errors(run, tmp_path, capsys):
    assert cli("ckpt", "inspect", run[0], "--step", "3") == 1
    assert "no committed checkpoint at step 3" in capsys.readouterr().err
    assert cli("ckpt", "inspect", tmp_path / "missing") == 1
    assert "does not exist" in capsys.readouterr().err


def test_inspect_walks_back_past_truncated(run, tmp_path, capsys):
    root = tmp_path / "ck"
    shutil.copytree(run[0], root)
    data = root / "step-000000004" / "data-r00000-000.bin"
    data.write_bytes(data.read_bytes()[:-8])
    info = inspect_checkpoint(str(root))
    assert info["checkpoint"] == "step-000000002" and "truncated" in info["skipped"][0][1]


# -- diff -------------------------------------------------------------------------------------------

def test_diff_identical_exit_0(run, capsys):
    root = run[0]
    assert cli("ckpt", "diff", root, root) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "identical" and out[-2].startswith("24 tensors in both: 24 identical, 0 different")


def test_diff_steps_max_abs_difference_exit_1(run, capsys):
    root = run[0]
    assert cli("ckpt", "diff", root, root, "--step-a", "2", "--step-b", "4") == 1
    out = capsys.readouterr().out
    assert out.rstrip().endswith("different")
    # the reported max |a-b| of a weight is the real one
    res = diff_checkpoints(str(root), str(root), step_a=2, step_b=4)
    w = next(d for d in res["different"] if d["key"] == "models/model/net.0.weight")
    sa = read_state(Storage(str(root)), "step-000000002", ranks=[])[1]["models"]["model"]["net.0.weight"]
    sb = read_state(Storage(str(root)), "step-000000004", ranks=[])[1]["models"]["model"]["net.0.weight"]
    assert w["max_abs_diff"] == pytest.approx(float((sa.double() - sb.double()).abs().max()))
    assert f"differs     models/model/net.0.weight  float32 [32, 12]  max |a-b| {w['max_abs_diff']:.6g}" in out
    assert "value       schedulers/scheduler/last_epoch: 2 -> 4" in out


def test_diff_keys_on_one_side_and_json(tmp_path, capsys):
    torch.manual_seed(0)
    net, extra = nn.Linear(3, 2), nn.Linear(2, 2)
    for name, models in (("a", {"model": net}), ("b", {"model": net, "head": extra})):
        mgr = CheckpointManager(str(tmp_path / name), keep_last=0)
        mgr.save(1, models=models)
        mgr.close()
    assert cli("ckpt", "diff", tmp_path / "a", tmp_path / "b", "--json") == 1
    res = json.loads(capsys.readouterr().out)
    assert res["identical"] is False and res["only_a"] == []
    assert res["only_b"] == ["models/head/weight", "models/head/bias"] and res["different"] == []
    assert res["tensors_compared"] == res["tensors_identical"] == 2
    assert cli("ckpt", "diff", tmp_path / "a", tmp_path / "b") == 1
    assert "only in B   models/head/weight" in capsys.readouterr().out


def test_diff_sees_the_summary_and_with_ranks_the_rng_and_data_position(tmp_path, capsys):
    """The same weights saved with another epoch and metrics, RNG and data position were "identical" (exit 0):
    the summary is compared now, and each rank's own state with --ranks (what a resumed run must match)."""
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    for name, epoch, acc, position, seed in (("a", 0, 0.5, 10, 1), ("b", 1, 0.7, 10, 1), ("c", 0, 0.5, 20, 2)):
        torch.manual_seed(seed)
        mgr = CheckpointManager(str(tmp_path / name), keep_last=0)
        mgr.save(1, models=net, epoch=epoch, metrics={"acc": acc}, position={"at": position})
        mgr.close()
    assert cli("ckpt", "diff", tmp_path / "a", tmp_path / "b") == 1
    out = capsys.readouterr().out
    assert "value       summary/epoch: 0 -> 1" in out and "value       summary/metrics/acc: 0.5 -> 0.7" in out
    assert cli("ckpt", "diff", tmp_path / "a", tmp_path / "c") == 0  # per-rank state only with --ranks
    capsys.readouterr()
    assert cli("ckpt", "diff", tmp_path / "a", tmp_path / "c", "--ranks") == 1
    out = capsys.readouterr().out
    assert "value       ranks/0/position/at: 10 -> 20" in out and "differs     ranks/0/rng/torch" in out, out
    assert cli("ckpt", "diff", tmp_path / "a", tmp_path / "a", "--ranks") == 0


def test_diff_error_exit_2(run, tmp_path, capsys):
    assert cli("ckpt", "diff", run[0], tmp_path / "missing") == 2
    err = capsys.readouterr().err
    assert err.startswith("harness: error: ") and err.count("\n") == 1


def test_compare_tensors_details():
    a = torch.tensor([1.0, float("nan"), 3.0])
    assert compare_tensors(a, a.clone()) is None
    d = compare_tensors(a, torch.tensor([1.5, float("nan"), 3.0]))
    assert d["max_abs_diff"] == 0.5 and d["elements_different"] == 1
    assert compare_tensors(a, a.double())["what"] == "dtype"
    assert compare_tensors(a, a[:2])["what"] == "shape"
    assert compare_tensors(torch.tensor([1, 5]), torch.tensor([1, 2]))["max_abs_diff"] == 3
