"""`harness ckpt export` in every format: each file loads back with its consumer's own tool and gives the
same outputs as the trained model in eval mode; --best, --model, multi-model naming, --quantize int8."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from torch import nn

from harness import CheckpointManager
from harness.checkpoint.discovery import list_checkpoints
from harness.errors import HarnessError, NoCheckpointError
from harness.interop.export import export_checkpoint
from harness.interop.formats import named_path
from harness.interop.quantize import quantize_available, quantize_int8
from harness.recipe import safe_metadata, workload_from_dict
from harness.storage import Storage
from harness.workloads import SyntheticVectors, Workload, classification_loss

from export_helpers import batch_inputs, cli, eval_out, make_run, small_config

pytestmark = [pytest.mark.filterwarnings("ignore:.*torch.jit.load.*is deprecated:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:TypedStorage is deprecated:UserWarning")]

HAS_ORT = importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None
TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One checkpointed run per built-in model kind (mlp, cnn, gpt), as `harness train` writes them."""
    out = {}
    for kind in ("mlp", "cnn", "gpt"):
        root = tmp_path_factory.mktemp(f"run-{kind}")
        w, model, _ = make_run(root, small_config(kind), steps=(2, 4))
        out[kind] = (root, w, model)
    return out


# -- pt and safetensors -----------------------------------------------------------------------------

def test_pt_loads_with_weights_only_and_matches_model(runs, tmp_path, capsys):
    root, w, model = runs["mlp"]
    out = tmp_path / "m.pt"
    assert cli("ckpt", "export", root, "--format", "pt", "--out", out) == 0
    ck = torch.load(out, weights_only=True)
    assert {"epoch", "model_state_dict", "optimizer_state_dict", "scheduler_state_dict", "loss", "config"} <= set(ck)
    m2 = workload_from_dict(safe_metadata(small_config("mlp"))["config"]).model  # fresh weights (seed 0)
    m2.load_state_dict(ck["model_state_dict"])
    x = batch_inputs(w)
    assert torch.allclose(eval_out(m2, x), eval_out(model, x), **TOL)
    assert ck["config"]["model"]["name"] == "mlp"


def test_safetensors_loads_with_safetensors_package(runs, tmp_path):
    st = pytest.importorskip("safetensors.torch")
    root, w, model = runs["cnn"]
    out = tmp_path / "m.safetensors"
    assert cli("ckpt", "export", root, "--format", "safetensors", "--out", out) == 0
    tensors = st.load_file(str(out))
    m2 = type(model)(channels=3, num_classes=4, width=4)
    m2.load_state_dict(tensors)
    x = batch_inputs(w)
    assert torch.allclose(eval_out(m2, x), eval_out(model, x), **TOL)


# -- torchscript and onnx ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["mlp", "cnn", "gpt"])
def test_torchscript_matches_model(runs, tmp_path, kind, capsys):
    root, w, model = runs[kind]
    out = tmp_path / f"{kind}.pt"
    assert cli("ckpt", "export", root, "--format", "torchscript", "--out", out) == 0
    line = capsys.readouterr().out
    assert "torchscript (trace)" in line and "checked: max abs diff" in line
    program = torch.jit.load(str(out))
    for n in (1, 3):  # traced on a batch of 2: other batch sizes work too
        x = batch_inputs(w, n)
        with torch.no_grad():
            assert torch.allclose(program(x), eval_out(model, x), **TOL)


@pytest.mark.skipif(not HAS_ORT, reason="onnx/onnxruntime not installed (pip install 'harness[onnx]')")
@pytest.mark.parametrize("kind", ["mlp", "cnn", "gpt"])
def test_onnx_matches_model_in_onnxruntime(runs, tmp_path, kind):
    import onnxruntime as ort

    root, w, model = runs[kind]
    out = tmp_path / f"{kind}.onnx"
    summary = export_checkpoint(str(root), str(out), fmt="onnx")
    assert summary["outputs"][0]["check"]["max_abs_diff"] is not None
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    for n in (1, 3):  # dynamic batch dimension
        x = batch_inputs(w, n)
        got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
        assert torch.allclose(got, eval_out(model, x), rtol=1e-4, atol=1e-5)


def test_onnx_not_installed_is_one_clear_line(runs, tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    out = tmp_path / "m.onnx"
    assert cli("ckpt", "export", runs["mlp"][0], "--format", "onnx", "--out", out) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "onnx package" in err and "pip install" in err and not out.exists()


def test_no_run_config_needs_modules_from_python(tmp_path, capsys):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    mgr = CheckpointManager(str(tmp_path / "run"), keep_last=0)
    mgr.save(1, models=net)
    mgr.close()
    assert cli("ckpt", "export", tmp_path / "run", "--format", "torchscript", "--out", tmp_path / "n.pt") == 1
    err = capsys.readouterr().err
    assert "no run config" in err and "modules=" in err and err.count("\n") == 1
    # from Python: the module and an example input
    fresh = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    export_checkpoint(str(tmp_path / "run"), str(tmp_path / "n.pt"), fmt="torchscript", modules=fresh,
                      example_inputs=torch.randn(2, 4))
    x = torch.randn(5, 4)
    assert torch.allclose(torch.jit.load(str(tmp_path / "n.pt"))(x), net(x), **TOL)


def user_workload(model_cfg: dict, data_cfg: dict, seed: int) -> Workload:
    """A user workload (train.entry) for test_user_entry_workload."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, model_cfg.get("hidden", 5)), nn.Tanh(), nn.Linear(model_cfg.get("hidden", 5), 3))
    return Workload(model=model, dataset=SyntheticVectors(64, 6, 3, seed=seed), loss_fn=classification_loss)


def test_user_entry_workload(tmp_path, capsys):
    cfg = small_config("mlp", train={"entry": "test_export_formats:user_workload"})
    cfg.model = {"name": "custom", "hidden": 7}
    w, model, _ = make_run(tmp_path / "run", cfg, steps=(3,))
    assert cli("ckpt", "export", tmp_path / "run", "--format", "torchscript", "--out", tmp_path / "u.pt") == 0
    x = batch_inputs(w, 4)
    assert torch.allclose(torch.jit.load(str(tmp_path / "u.pt"))(x), eval_out(model, x), **TOL)


# -- choosing the checkpoint: --best ----------------------------------------------------------------

def test_best_by_loss_metric_and_config(tmp_path, capsys):
    accs = {1: 0.1, 2: 0.5, 3: 0.8, 4: 0.6}
    cfg = small_config("mlp", checkpoint={"best_metric": "acc", "best_mode": "max"})
    root = tmp_path / "run"
    make_run(root, cfg, steps=(1, 2, 3, 4), metrics_fn=lambda s: {"acc": accs[s]})
    real = {i.step: i.commit["loss"] for i in list_checkpoints(Storage(str(root)))}
    best_loss = min(real, key=lambda s: (real[s], -s))
    s = export_checkpoint(str(root), str(tmp_path / "a.pt"), best=True, metric="loss")
    assert s["step"] == best_loss and s["chosen"] == "best by loss (min)"
    # default: the run config's best_metric/best_mode
    s = export_checkpoint(str(root), str(tmp_path / "b.pt"), best=True)
    assert s["step"] == 3 and s["chosen"] == "best by acc (max)"
    assert cli("ckpt", "export", root, "--best", "--metric", "acc", "--mode", "min", "--format", "pt",
               "--out", tmp_path / "c.pt") == 0
    assert "(step 1, epoch 0, best by acc (min))" in capsys.readouterr().out
    assert cli("ckpt", "export", root, "--best", "--metric", "nope", "--format", "pt", "--out", tmp_path / "d.pt") == 1
    assert "records the metric 'nope'" in capsys.readouterr().err
    assert cli("ckpt", "export", root, "--metric", "acc", "--format", "pt", "--out", tmp_path / "d.pt") == 1
    assert "--best" in capsys.readouterr().err


def test_best_skips_damaged_best(tmp_path):
    root = tmp_path / "run"
    make_run(root, small_config("mlp"), steps=(1, 2, 3), metrics_fn=lambda s: {"acc": {1: 0.2, 2: 0.9, 3: 0.5}[s]})
    data = root / "step-000000002" / "data-r00000-000.bin"
    raw = bytearray(data.read_bytes())
    raw[10] ^= 0x40
    data.write_bytes(bytes(raw))
    s = export_checkpoint(str(root), str(tmp_path / "b.pt"), best=True, metric="acc", mode="max")
    assert s["step"] == 3 and s["skipped"][0][0] == "step-000000002"


# -- several models ---------------------------------------------------------------------------------

@pytest.fixture
def gan(tmp_path):
    torch.manual_seed(0)
    gen = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6))
    disc = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1))
    opts = {"generator": torch.optim.Adam(gen.parameters()), "discriminator": torch.optim.Adam(disc.parameters())}
    disc(gen(torch.randn(3, 4))).mean().backward()
    for o in opts.values():
        o.step()
    mgr = CheckpointManager(str(tmp_path / "gan"), keep_last=0)
    mgr.save(1, models={"generator": gen, "discriminator": disc}, optimizers=opts)
    mgr.close()
    return tmp_path / "gan", gen, disc


def test_multi_model_one_file_per_model(gan, tmp_path):
    root, gen, disc = gan
    out = tmp_path / "gan.pt"
    s = export_checkpoint(str(root), str(out), fmt="torchscript",
                          modules={"generator": nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6)),
                                   "discriminator": nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1))},
                          example_inputs={"generator": torch.randn(2, 4), "discriminator": torch.randn(2, 6)})
    assert [o["out"] for o in s["outputs"]] == [str(tmp_path / "gan.generator.pt"),
                                                str(tmp_path / "gan.discriminator.pt")]
    assert not out.exists()
    z, x = torch.randn(3, 4), torch.randn(3, 6)
    assert torch.allclose(torch.jit.load(str(tmp_path / "gan.generator.pt"))(z), gen(z), **TOL)
    assert torch.allclose(torch.jit.load(str(tmp_path / "gan.discriminator.pt"))(x), disc(x), **TOL)
    assert named_path("/a/b/m.onnx", "gen/x") == "/a/b/m.gen_x.onnx"


def test_multi_model_pick_one(gan, tmp_path, capsys):
    root, gen, disc = gan
    out = tmp_path / "d.pt"
    assert cli("ckpt", "export", root, "--model", "discriminator", "--format", "pt", "--out", out) == 0
    ck = torch.load(out, weights_only=True)
    assert "model_state_dicts" not in ck and set(ck["model_state_dict"]) == set(disc.state_dict())
    assert "optimizer_state_dict" in ck  # the optimizer of the same name
    assert cli("ckpt", "export", root, "--model", "generator", "--format", "safetensors",
               "--out", tmp_path / "g.st") == 0
    st = pytest.importorskip("safetensors.torch").load_file(str(tmp_path / "g.st"))
    assert set(st) == set(gen.state_dict())
    assert cli("ckpt", "export", root, "--model", "critic", "--format", "pt", "--out", out) == 1
    assert "no model named 'critic'" in capsys.readouterr().err
    assert cli("ckpt", "export", root, "--format", "onnx" if HAS_ORT else "torchscript", "--out", tmp_path / "x") == 1
    assert "no run config" in capsys.readouterr().err


# -- int8 -------------------------------------------------------------------------------------------

def test_quantize_int8_torchscript_and_pt(runs, tmp_path, capsys):
    try:
        quantize_available()
    except HarnessError as exc:
        pytest.skip(str(exc))
    root, w, model = runs["mlp"]
    out = tmp_path / "q.pt"
    assert cli("ckpt", "export", root, "--format", "torchscript", "--quantize", "int8", "--out", out) == 0
    text = capsys.readouterr().out
    assert "int8 dynamic quantization" in text and "x smaller" in text
    x = batch_inputs(w, 4)
    ref = eval_out(model, x)
    got = torch.jit.load(str(out))(x)
    assert (got - ref).abs().max() < 0.05 * max(1.0, float(ref.abs().max()))
    s = export_checkpoint(str(root), str(tmp_path / "q_state.pt"), fmt="pt", quantize="int8")
    assert s["quantized"]["int8_bytes"] < s["quantized"]["float_bytes"] / 2
    ck = torch.load(tmp_path / "q_state.pt", weights_only=True)
    qmodel = quantize_int8(type(model)(in_features=12, hidden=32, num_classes=5))
    qmodel.load_state_dict(ck["model_state_dict"])
    assert torch.allclose(qmodel(x), got, atol=1e-6)


@pytest.mark.parametrize("fmt", ["onnx", "safetensors"])
def test_quantize_refused_for_other_formats(runs, tmp_path, capsys, fmt):
    assert cli("ckpt", "export", runs["mlp"][0], "--format", fmt, "--quantize", "int8", "--out", tmp_path / "q") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--quantize int8 works with --format pt or torchscript" in err


def test_export_errors_leave_no_file(runs, tmp_path):
    with pytest.raises(NoCheckpointError):
        export_checkpoint(str(runs["mlp"][0]), str(tmp_path / "m.ts"), fmt="torchscript", step=99)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("fmt, name, named", [("pt", "m.safetensors", "safetensors"), ("safetensors", "m.pt", "pt"),
                                              ("torchscript", "m.onnx", "onnx"), ("safetensors", "m.PTH", "pt")])
def test_an_output_named_as_another_format_is_refused(runs, tmp_path, capsys, fmt, name, named):
    """`--format pt --out model.safetensors` wrote a pickle under a name safetensors' loader then refuses."""
    assert cli("ckpt", "export", runs["mlp"][0], "--format", fmt, "--out", tmp_path / name) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{name} is named as a {named} file, but the format is {fmt}: use --format " \
                                     f"{named}" in err, err
    assert os.listdir(tmp_path) == []


def test_names_a_format_shares_or_none_claims_are_taken(runs, tmp_path):
    for fmt, name in [("torchscript", "m.pt"), ("pt", "m.bin"), ("pt", "m.ckpt"), ("pt", "m.PTH"), ("pt", "model")]:
        export_checkpoint(runs["mlp"][0], tmp_path / name, fmt=fmt)
        assert (tmp_path / name).stat().st_size > 0


@pytest.mark.parametrize("name, fmt", [("m.pt", "pt"), ("m.PTH", "pt"), ("m.tar", "pt"),
                                       ("m.safetensors", "safetensors"), ("m.ts", "torchscript")])
def test_without_format_the_file_name_ending_chooses(runs, tmp_path, capsys, name, fmt):
    """`harness ckpt export DIR --out model.pt` was a usage error (--format required) where the name says it."""
    from harness.cli import main
    assert main(["ckpt", "export", str(runs["mlp"][0]), "--out", str(tmp_path / name)]) == 0
    assert f": {fmt}" in capsys.readouterr().out
    if fmt == "pt":
        assert "model_state_dict" in torch.load(tmp_path / name, weights_only=True)
    elif fmt == "safetensors":
        from safetensors.torch import load_file
        assert load_file(tmp_path / name)
    else:
        assert torch.jit.load(tmp_path / name) is not None
    # the Python API the same way; a name that says nothing is pt, as before
    assert export_checkpoint(runs["mlp"][0], tmp_path / f"again-{name}")["format"] == fmt
    assert export_checkpoint(runs["mlp"][0], tmp_path / "model")["format"] == "pt"


def test_without_format_a_name_that_says_none_is_a_usage_error(runs, tmp_path, capsys):
    from harness.cli import main
    with pytest.raises(SystemExit) as stop:
        main(["ckpt", "export", str(runs["mlp"][0]), "--out", str(tmp_path / "m.bin")])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "--format is needed: the name 'm.bin' ends in none of .onnx, .pt, .pth, .safetensors, .tar, .ts" in err
    assert os.listdir(tmp_path) == []


def test_sharded_zero_checkpoint_is_consolidated(tmp_path):
    """A ZeroRedundancyOptimizer checkpoint (sharding 'zero') exports as a plain tutorial-style file."""
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group of the test process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
        opt = ZeroRedundancyOptimizer(net.parameters(), optimizer_class=torch.optim.AdamW, lr=1e-2)
        net(torch.randn(3, 4)).sum().backward()
        opt.step()
        mgr = CheckpointManager(str(tmp_path / "run"), keep_last=0)
        mgr.save(1, models=net, optimizers=opt)
        mgr.close()
    finally:
        dist.destroy_process_group()
    out = tmp_path / "z.pt"
    export_checkpoint(str(tmp_path / "run"), str(out))
    ck = torch.load(out, weights_only=True)
    x = torch.randn(2, 4)
    fresh = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    fresh.load_state_dict(ck["model_state_dict"])
    assert torch.equal(fresh(x), net(x))
    assert sorted(ck["optimizer_state_dict"]["state"]) == [0, 1, 2, 3]
    plain = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    plain.load_state_dict(ck["optimizer_state_dict"])  # a standard optimizer state dict
