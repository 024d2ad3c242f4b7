"""`harness ckpt list|verify|export` and harness.interop.export, on real checkpoints written by
CheckpointManager (local folders and memory://)."""

from __future__ import annotations

import argparse
import copy
import json
import os
import struct
import subprocess
import sys
import uuid

import pytest
import torch
from torch import nn

from harness import CheckpointManager
from harness.ckpt_cli import add_ckpt_parser, parse_storage_options, run_ckpt
from harness.errors import NoCheckpointError
from harness.interop.export import export_checkpoint
from harness.interop.safetensors import write_safetensors

safetensors_torch = pytest.importorskip("safetensors.torch")


# -- helpers ----------------------------------------------------------------------------------------

def cli(*argv: str) -> int:
    """The ckpt command exactly as harness/cli.py wires it."""
    parser = argparse.ArgumentParser(prog="harness")
    sub = parser.add_subparsers(dest="command", required=True)
    add_ckpt_parser(sub)
    args = parser.parse_args([str(a) for a in argv])
    return run_ckpt(args)


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def train_step(model: nn.Module, opt: torch.optim.Optimizer, sched, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    sched.step()
    return loss.item()


def build_single(root, steps=(1, 2, 3)):
    """A run with one model/AdamW/StepLR, checkpointed at each step; returns the live objects and a
    snapshot of the model at each step."""
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    mgr = CheckpointManager(str(root), keep_last=0)
    snaps = {}
    for step in range(1, max(steps) + 1):
        loss = train_step(model, opt, sched, seed=step)
        if step in steps:
            mgr.save(step, models=model, optimizers=opt, schedulers=sched, epoch=step // 2, loss=loss,
                     metrics={"acc": step / 10})
            snaps[step] = copy.deepcopy(model)
    mgr.close()
    return model, opt, sched, snaps


def build_gan(root):
    gen, disc = make_model(1), nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1))
    opts = {"generator": torch.optim.AdamW(gen.parameters(), lr=1e-3),
            "discriminator": torch.optim.AdamW(disc.parameters(), lr=2e-3)}
    scheds = {n: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.9) for n, o in opts.items()}
    x = torch.randn(4, 6)
    for o in opts.values():
        o.zero_grad()
    disc(gen(x)).mean().backward()
    for n in opts:
        opts[n].step()
        scheds[n].step()
    mgr = CheckpointManager(str(root))
    mgr.save(1, models={"generator": gen, "discriminator": disc}, optimizers=opts, schedulers=scheds, loss=0.5)
    mgr.close()
    return gen, disc, opts


def data_file(ckpt_dir) -> str:
    names = sorted(n for n in os.listdir(ckpt_dir) if n.startswith("data-"))
    return os.path.join(ckpt_dir, names[0])


def flip_byte(path: str, offset: int = 0) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def manifest_of(ckpt_dir) -> dict:
    with open(os.path.join(ckpt_dir, "manifest.json"), "rb") as f:
        return json.loads(f.read())


def first_tensor(ckpt_dir) -> dict:
    """The manifest entry stored at offset 0 of the first data file."""
    m = manifest_of(ckpt_dir)
    fname = sorted(m["files"])[0]
    return next(e for e in m["tensors"] if e["file"] == fname and e["offset"] == 0)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("single") / "run"
    model, opt, sched, snaps = build_single(root)
    return root, model, opt, sched, snaps


@pytest.fixture(scope="module")
def gan(tmp_path_factory):
    root = tmp_path_factory.mktemp("gan") / "run"
    return (root, *build_gan(root))


def copy_run(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


# -- list -------------------------------------------------------------------------------------------

def test_list_table(single, capsys):
    root = single[0]
    assert cli("ckpt", "list", root) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "STEP", "EPOCH", "LOSS", "SIZE", "CREATED", "WORLD", "SHARDING", "STATUS"]
    assert [ln.split()[0] for ln in lines[1:]] == ["step-000000001", "step-000000002", "step-000000003"]
    row = lines[3].split()
    assert row[1:3] == ["3", "1"] and row[-1] == "valid" and "replicated" in row
    assert all(ln[lines[0].index("STATUS"):].strip() == "valid" for ln in lines[1:])


def test_list_json_fields(single, capsys):
    root = single[0]
    assert cli("ckpt", "list", root, "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    r = rows[-1]
    assert r["name"] == "step-000000003" and r["epoch"] == 1 and r["world_size"] == 1
    assert r["sharding"] == "replicated" and r["valid"] is True and r["status"] == "valid"
    assert isinstance(r["loss"], float) and r["created"].startswith("20")
    on_disk = sum(os.path.getsize(os.path.join(root, r["name"], n)) for n in os.listdir(root / r["name"])
                  if n != "COMMIT")
    assert r["size_bytes"] == on_disk and r["size"].endswith(("KB", "B"))


def test_list_damaged_shows_reason_and_uncommitted(single, tmp_path, capsys):
    root = copy_run(single[0], tmp_path / "run")
    # newest: a truncated data file (quick check catches it); step 2: a flipped byte (only --verify does)
    path = data_file(root / "step-000000003")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 10)
    flip_byte(data_file(root / "step-000000002"), first_tensor(root / "step-000000002")["offset"])
    os.makedirs(root / "step-000000004")  # a save that never committed
    assert cli("ckpt", "list", root, "--json", "--all") == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["step-000000001"]["status"] == "valid"
    assert rows["step-000000002"]["status"] == "valid"  # quick check: sizes are right
    bad = rows["step-000000003"]
    assert bad["valid"] is False and "truncated" in bad["status"] and "data-r00000-000.bin" in bad["status"]
    assert rows["step-000000004"]["status"] == "uncommitted" and rows["step-000000004"]["committed"] is False

    assert cli("ckpt", "list", root, "--verify") == 0
    out = capsys.readouterr().out
    line2 = next(ln for ln in out.splitlines() if ln.startswith("step-000000002"))
    assert "checksum mismatch" in line2 and first_tensor(root / "step-000000002")["key"] in line2
    assert "step-000000004" not in out  # without --all, uncommitted folders do not exist


def test_list_missing_dir_exit_1(tmp_path, capsys):
    assert cli("ckpt", "list", tmp_path / "nope") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("harness: error: ") and "does not exist" in err


def test_list_empty_dir(tmp_path, capsys):
    assert cli("ckpt", "list", tmp_path, "--json") == 0
    assert json.loads(capsys.readouterr().out) == []


# -- verify -----------------------------------------------------------------------------------------

def test_verify_valid(single, capsys):
    root = single[0]
    assert cli("ckpt", "verify", root) == 0
    out = capsys.readouterr().out.strip()
    n = len(manifest_of(root / "step-000000003")["tensors"])
    assert out.startswith("OK step-000000003 (") and f"({n} tensors, " in out and out.endswith(" MB)")


def test_verify_flipped_byte_fails_naming_tensor(single, tmp_path, capsys):
    root = copy_run(single[0], tmp_path / "run")
    entry = first_tensor(root / "step-000000003")
    flip_byte(data_file(root / "step-000000003"), entry["offset"] + 1)
    assert cli("ckpt", "verify", root) == 1
    out = capsys.readouterr().out.strip()
    assert out.startswith("FAILED step-000000003: ") and "checksum mismatch" in out
    assert entry["key"] in out and entry["file"] in out
    # an older step still verifies; --all reports both and fails
    assert cli("ckpt", "verify", root, "--step", "2") == 0
    assert capsys.readouterr().out.startswith("OK step-000000002 ")
    assert cli("ckpt", "verify", root, "--all") == 1
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines] == ["OK", "OK", "FAILED"]


def test_verify_missing_step_and_empty(single, tmp_path, capsys):
    assert cli("ckpt", "verify", single[0], "--step", "7") == 1
    err = capsys.readouterr().err
    assert err.startswith("harness: error: ") and "step 7" in err and err.count("\n") == 1
    assert cli("ckpt", "verify", tmp_path) == 1
    assert "no committed checkpoint" in capsys.readouterr().err


def test_verify_damaged_commit_record(single, tmp_path, capsys):
    root = copy_run(single[0], tmp_path / "run")
    (root / "step-000000003" / "COMMIT").write_bytes(b"\x80\x04not json")
    assert cli("ckpt", "verify", root) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAILED step-000000003: ") and "not valid JSON" in out


def test_newer_format_version_is_reported_and_not_passed_over(single, tmp_path, capsys):
    """The newest checkpoint in a newer harness's format: listed with why; export refuses it rather than
    export an older one in its place without a word beyond a warning (it exported step 2); --step does."""
    root = copy_run(single[0], tmp_path / "run")
    commit = root / "step-000000003" / "COMMIT"
    record = json.loads(commit.read_bytes())
    commit.write_bytes(json.dumps({**record, "format_version": 99}).encode())
    assert cli("ckpt", "list", root, "--json") == 0
    status = json.loads(capsys.readouterr().out)[-1]["status"]
    assert "version 99" in status and "upgrade harness" in status
    assert cli("ckpt", "export", root, "--out", tmp_path / "m.pt") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "checkpoint step-000000003: commit record was written in format version 99 " \
        "by a newer harness" in err and "export and inspect take --step" in err, err
    assert not (tmp_path / "m.pt").exists()
    summary = export_checkpoint(str(root), str(tmp_path / "m.pt"), step=2)
    assert summary["checkpoint"] == "step-000000002" and summary["skipped"] == []


# -- export pt --------------------------------------------------------------------------------------

def test_a_signal_while_an_export_is_written_leaves_no_temp_file(single, tmp_path):
    """SIGTERM (a timeout, a scheduler) ends `harness ckpt export` through its cleanup, as Ctrl-C does: one
    line, 143, and no file in the output folder. Its default action left the hidden temp file behind, as large
    as the export. Delivered by the fault seam once the temp file is written whole, before its rename."""
    root = single[0]
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "HARNESS_FAULT": "local.atomic_written:sigterm"}
    proc = subprocess.run([sys.executable, "-m", "harness", "ckpt", "export", str(root), "--format", "pt",
                           "--out", str(out / "model.pt")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 143, (proc.returncode, proc.stderr)
    assert proc.stderr.strip().splitlines() == ["harness: stopped by SIGTERM"], proc.stderr
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_while_the_command_imports_torch_is_one_line_and_nothing_done(single, tmp_path, sig):
    """Ctrl-C or SIGTERM while `harness ckpt` imports torch (its first second): raised inside torch's or numpy's
    import, it was a KeyboardInterrupt traceback, an ImportError, SIGABRT, or swallowed (the command said it
    stopped, then ran to the end, exit 0). Noted now, it ends the command once the imports are done: one line,
    128+N, nothing listed. Sent as torch's library is mapped, then a little later each time."""
    import signal
    import time

    for delay in (0.0, 0.1, 0.2):
        proc = subprocess.Popen([sys.executable, "-m", "harness", "ckpt", "list", str(single[0])],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            with open(f"/proc/{proc.pid}/maps") as maps:
                if "libtorch" in maps.read():
                    break
            time.sleep(0.002)
        time.sleep(delay)
        proc.send_signal(getattr(signal, sig))
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 128 + getattr(signal, sig), (delay, proc.returncode, err[-2000:])
        assert err.strip().splitlines() == [f"harness: stopped by {sig}"] and out == "", (delay, err[-2000:], out)


def test_export_pt_tutorial_keys_and_exact_model(single, tmp_path, capsys):
    root, model, opt, sched, snaps = single
    out = tmp_path / "model.pt"
    assert cli("ckpt", "export", root, "--format", "pt", "--out", out) == 0
    assert "exported step-000000003" in capsys.readouterr().out
    ck = torch.load(out, weights_only=True)
    assert {"epoch", "model_state_dict", "optimizer_state_dict", "scheduler_state_dict", "loss", "step",
            "metrics"} <= set(ck)
    assert not {"model_state_dicts", "optimizer_state_dicts", "scheduler_state_dicts"} & set(ck)
    assert ck["step"] == 3 and ck["epoch"] == 1 and ck["metrics"] == {"acc": 0.3} and isinstance(ck["loss"], float)

    fresh = make_model(seed=123)
    fresh.load_state_dict(ck["model_state_dict"])
    x = torch.randn(5, 6)
    assert torch.equal(fresh(x), model(x))
    for k, v in model.state_dict().items():
        assert torch.equal(ck["model_state_dict"][k], v)

    # the optimizer and scheduler continue exactly like the live ones
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    opt2.load_state_dict(ck["optimizer_state_dict"])
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=2, gamma=0.5)
    sched2.load_state_dict(ck["scheduler_state_dict"])
    live = copy.deepcopy((model, opt, sched))
    lm, lo, ls = live
    lo.load_state_dict(opt.state_dict())  # deepcopy of an optimizer keeps param identity with the copy
    train_step(lm, lo, ls, seed=99)
    train_step(fresh, opt2, sched2, seed=99)
    for a, b in zip(lm.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    assert sched2.get_last_lr() == ls.get_last_lr()


def test_export_api_summary_and_step(single, tmp_path):
    root, _, _, _, snaps = single
    out = tmp_path / "s1.pt"
    summary = export_checkpoint(str(root), str(out), fmt="pt", step=1)
    assert summary["checkpoint"] == "step-000000001" and summary["step"] == 1 and summary["skipped"] == []
    assert summary["bytes"] == os.path.getsize(out) and summary["models"] == ["model"]
    ck = torch.load(out, weights_only=True)
    for k, v in snaps[1].state_dict().items():
        assert torch.equal(ck["model_state_dict"][k], v)
    assert [n for n in os.listdir(tmp_path) if n.endswith(".tmp")] == []


def test_export_gan_pt(gan, tmp_path):
    root, gen, disc, opts = gan
    out = tmp_path / "gan.pt"
    assert cli("ckpt", "export", root, "--format", "pt", "--out", out) == 0
    ck = torch.load(out, weights_only=True)
    assert set(ck["model_state_dicts"]) == {"generator", "discriminator"}
    assert set(ck["optimizer_state_dicts"]) == {"generator", "discriminator"}
    assert set(ck["scheduler_state_dicts"]) == {"generator", "discriminator"}
    assert not {"model_state_dict", "optimizer_state_dict", "scheduler_state_dict"} & set(ck)
    g2, d2 = make_model(7), nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1))
    g2.load_state_dict(ck["model_state_dicts"]["generator"])
    d2.load_state_dict(ck["model_state_dicts"]["discriminator"])
    x = torch.randn(4, 6)
    assert torch.equal(d2(g2(x)), disc(gen(x)))
    o2 = torch.optim.AdamW(d2.parameters(), lr=2e-3)
    o2.load_state_dict(ck["optimizer_state_dicts"]["discriminator"])
    got, want = o2.state_dict()["state"][0], opts["discriminator"].state_dict()["state"][0]
    assert torch.equal(got["exp_avg"], want["exp_avg"]) and torch.equal(got["exp_avg_sq"], want["exp_avg_sq"])


# -- export safetensors -----------------------------------------------------------------------------

def test_export_safetensors_single(single, tmp_path):
    root, model = single[0], single[1]
    out = tmp_path / "model.safetensors"
    assert cli("ckpt", "export", root, "--format", "safetensors", "--out", out) == 0
    loaded = safetensors_torch.load_file(str(out))
    sd = model.state_dict()
    assert set(loaded) == set(sd)
    for k, v in sd.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v)
    with open(out, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    assert n % 8 == 0
    assert header["__metadata__"]["step"] == "3" and header["__metadata__"]["epoch"] == "1"
    assert "harness_version" in header["__metadata__"]


def test_export_safetensors_gan_prefixes(gan, tmp_path):
    root, gen, disc, _ = gan
    out = tmp_path / "gan.safetensors"
    export_checkpoint(str(root), str(out), fmt="safetensors")
    loaded = safetensors_torch.load_file(str(out))
    want = {**{f"generator.{k}": v for k, v in gen.state_dict().items()},
            **{f"discriminator.{k}": v for k, v in disc.state_dict().items()}}
    assert set(loaded) == set(want) and all(torch.equal(loaded[k], v) for k, v in want.items())


def test_safetensors_writer_dtypes(tmp_path):
    tensors = {"f32": torch.randn(3, 4), "bf16": torch.randn(5).to(torch.bfloat16), "i64": torch.arange(7),
               "bool": torch.tensor([True, False, True]), "empty": torch.zeros(0, 3), "scalar": torch.tensor(2.5),
               "f16": torch.randn(2, 2).half(), "u8": torch.arange(9, dtype=torch.uint8),
               "noncontig": torch.randn(4, 6).t()}
    path = tmp_path / "t.safetensors"
    with open(path, "wb") as f:
        n = write_safetensors(f, tensors, {"step": "1"})
    assert n == os.path.getsize(path)
    loaded = safetensors_torch.load_file(str(path))
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and loaded[k].shape == v.shape and torch.equal(loaded[k], v), k


# -- export: fallback and errors --------------------------------------------------------------------

def test_export_falls_back_past_damaged_newest(single, tmp_path, capsys):
    root, _, _, _, snaps = single
    root = copy_run(root, tmp_path / "run")
    flip_byte(data_file(root / "step-000000003"), first_tensor(root / "step-000000003")["offset"])
    out = tmp_path / "fallback.pt"
    assert cli("ckpt", "export", root, "--format", "pt", "--out", out) == 0
    cap = capsys.readouterr()
    assert "exported step-000000002" in cap.out
    assert cap.err.count("\n") == 1  # one warning line, no duplicate from logging
    assert cap.err.startswith("harness: warning: skipped step-000000003: ") and "checksum mismatch" in cap.err
    ck = torch.load(out, weights_only=True)
    assert ck["step"] == 2
    for k, v in snaps[2].state_dict().items():
        assert torch.equal(ck["model_state_dict"][k], v)
    # asking for the damaged step itself fails, and leaves no file behind
    bad_out = tmp_path / "bad.pt"
    assert cli("ckpt", "export", root, "--step", "3", "--format", "pt", "--out", bad_out) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no valid checkpoint at step 3" in err and not bad_out.exists()
    with pytest.raises(NoCheckpointError):
        export_checkpoint(str(root), str(bad_out), step=3)


def test_export_missing_dir_one_line_exit_1(tmp_path, capsys):
    out = tmp_path / "x.pt"
    assert cli("ckpt", "export", tmp_path / "missing", "--format", "pt", "--out", out) == 1
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err.count("\n") == 1 and cap.err.startswith("harness: error: ")
    assert "Traceback" not in cap.err and not out.exists()


def test_export_empty_dir_and_bad_out_folder(single, tmp_path, capsys):
    assert cli("ckpt", "export", tmp_path, "--format", "safetensors", "--out", tmp_path / "m.st") == 1
    assert "no committed checkpoint" in capsys.readouterr().err
    assert cli("ckpt", "export", single[0], "--format", "pt", "--out", tmp_path / "no" / "m.pt") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err


def test_export_keeps_existing_out_on_failure(single, tmp_path):
    out = tmp_path / "keep.pt"
    out.write_bytes(b"old")
    with pytest.raises(NoCheckpointError):
        export_checkpoint(str(single[0]), str(out), step=42)
    assert out.read_bytes() == b"old"
    export_checkpoint(str(single[0]), str(out), step=2)
    assert torch.load(out, weights_only=True)["step"] == 2


def test_export_never_replaces_a_device_or_pipe_and_writes_through_a_symlink(single, tmp_path, capsys):
    """`--out /dev/null` (as root) renamed the export over /dev/null: the device was gone, a regular file in its
    place. A named pipe stands in for it here. A symlink is written through, as cp does: the link stays."""
    import stat
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    assert cli("ckpt", "export", single[0], "--format", "pt", "--out", pipe) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "it is not a regular file" in err, err
    assert stat.S_ISFIFO(os.lstat(pipe).st_mode) and os.listdir(tmp_path) == ["pipe"]
    from harness.storage.local import atomic_write
    with pytest.raises(FileExistsError, match="not a regular file"):  # every atomic write, not only export's
        atomic_write(pipe, lambda f: f.write(b"x"))
    assert stat.S_ISFIFO(os.lstat(pipe).st_mode)

    (tmp_path / "models").mkdir()
    target = tmp_path / "models" / "v3.pt"
    target.write_bytes(b"old")
    link = tmp_path / "current.pt"
    link.symlink_to(target)
    assert cli("ckpt", "export", single[0], "--format", "pt", "--out", link) == 0
    assert link.is_symlink() and "model_state_dict" in torch.load(target, weights_only=True)


# -- URLs, storage options, credentials -------------------------------------------------------------

def test_memory_url_and_storage_options(tmp_path, capsys):
    import fsspec
    url = f"memory://ckpt-cli-{uuid.uuid4().hex}"
    try:
        model = make_model()
        mgr = CheckpointManager(url)
        mgr.save(5, models=model, loss=1.0)
        mgr.close()
        assert cli("ckpt", "list", url, "--json", "--storage-option", "skip_instance_cache=true") == 0
        rows = json.loads(capsys.readouterr().out)
        assert [(r["step"], r["status"]) for r in rows] == [(5, "valid")]
        assert cli("ckpt", "verify", url) == 0
        out = tmp_path / "m.safetensors"
        assert cli("ckpt", "export", url, "--format", "safetensors", "--out", out) == 0
        loaded = safetensors_torch.load_file(str(out))
        assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    finally:
        fsspec.filesystem("memory").rm(url, recursive=True)


def test_parse_storage_options():
    got = parse_storage_options(["anon=true", "client_kwargs.endpoint_url=http://127.0.0.1:9000",
                                 "client_kwargs.region_name=us-east-1", "key=AKIA123", "n=5"])
    assert got == {"anon": True, "key": "AKIA123", "n": 5,
                   "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "region_name": "us-east-1"}}


def test_errors_do_not_print_credentials(tmp_path, capsys):
    rc = cli("ckpt", "list", "s3://AKIAEXAMPLE:supersecret@nonexistent-bucket-xyz/run",
             "--storage-option", "secret=supersecret2")
    err = capsys.readouterr().err
    # a storage problem: exit 3 and the line `harness train` prints (tests/test_storage_errors.py)
    assert rc == 3 and err.startswith("harness: checkpoint error: ") and err.count("\n") == 1
    assert "supersecret" not in err and "AKIAEXAMPLE" not in err
    # without options, s3fs echoes the URL's user:password as part of the bucket name; still blanked
    rc = cli("ckpt", "verify", "s3://AKIAEXAMPLE:supersecret@nonexistent-bucket-xyz/run")
    err = capsys.readouterr().err
    assert rc == 3 and err.startswith("harness: checkpoint error: ") and err.count("\n") == 1
    assert "supersecret" not in err and "AKIAEXAMPLE" not in err


# -- a real process ---------------------------------------------------------------------------------

SCRIPT = ("import argparse, sys\n"
          "from harness.ckpt_cli import add_ckpt_parser, run_ckpt\n"
          "p = argparse.ArgumentParser(prog='harness'); s = p.add_subparsers(dest='command', required=True)\n"
          "add_ckpt_parser(s); sys.exit(run_ckpt(p.parse_args(sys.argv[1:])))\n")


def test_real_process_exit_codes(single, tmp_path):
    root = copy_run(single[0], tmp_path / "run")
    flip_byte(data_file(root / "step-000000003"), 3)
    # two processes (each imports torch: ~2 s); the one-line error output is checked in-process above
    cases = {"good": ["ckpt", "verify", single[0]],
             "bad": ["ckpt", "export", root, "--step", "3", "--format", "pt", "--out", tmp_path / "o.pt"]}
    procs = {k: subprocess.Popen([sys.executable, "-c", SCRIPT, *map(str, argv)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for k, argv in cases.items()}  # in parallel
    res = {k: (p.wait(timeout=120), *p.communicate()) for k, p in procs.items()}
    rc, out, err = res["good"]
    assert rc == 0 and out.startswith("OK step-000000003"), err
    rc, out, err = res["bad"]
    assert rc == 1 and out == "" and err.startswith("harness: error: no valid checkpoint at step 3")
    assert err.count("\n") == 1 and "checksum mismatch" in err and not (tmp_path / "o.pt").exists()


def test_a_checkpoint_a_live_job_deletes_while_it_is_read_is_gone_not_damaged(tmp_path, capsys):
    """`harness ckpt verify/export` beside a live job with keep_last=1: its retention may delete the newest
    between the listing and the read. verify printed FAILED and exited 1, export warned "data file missing" /
    "no commit record (the save never completed)", as if the checkpoint were damaged. Simulated through the
    fault seam: the folder disappears right before its commit record is read a second time."""
    import collections
    import shutil

    from harness import faults
    ck = tmp_path / "ck"
    mgr = CheckpointManager(str(ck), keep_last=0)
    for step in (1, 2, 3):
        mgr.save(step, models=nn.Linear(3, 3))
    mgr.close()
    reads = collections.Counter()

    def retention_elsewhere(point, info):
        if point == "discovery.read_commit" and info["name"] == "step-000000003":
            reads[info["name"]] += 1
            if reads[info["name"]] == 2:
                shutil.rmtree(ck / "step-000000003")

    faults.install(retention_elsewhere)
    try:
        assert cli("ckpt", "verify", ck) == 0
        out = capsys.readouterr().out.splitlines()
        gone = "GONE step-000000003: deleted while it was read (the retention of the job writing this folder)"
        assert len(out) == 2 and out[0] == gone and out[1].startswith("OK step-000000002 ("), out
        mgr = CheckpointManager(str(ck), keep_last=0)
        mgr.save(3, models=nn.Linear(3, 3))  # the live job's next save, in a fresh step-000000003
        mgr.close()
        reads.clear()
        assert cli("ckpt", "export", ck, "--format", "pt", "--out", tmp_path / "m.pt") == 0
        err = capsys.readouterr().err
        assert "skipped step-000000003: deleted while it was read (the retention of the job writing this folder)" \
            in err, err
    finally:
        faults.install(None)
