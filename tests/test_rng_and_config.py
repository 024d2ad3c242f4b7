"""What a CPU can check of the GPU-facing fixes: the CUDA RNG is saved and restored by role (this rank's own
device), old checkpoints that stored a list by device index still load, the config refuses NCCL on CPU before
anything starts, and ``train.deterministic``/``train.amp_dtype`` are real keys."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness import config, state
from harness.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_capture_rng_without_cuda_has_no_cuda_entry():
    rng = state.capture_rng()
    assert set(rng) == {"python", "numpy", "torch"}  # no CUDA initialized here: nothing to save


def test_current_format_is_the_ranks_own_generator():
    gen = torch.arange(16, dtype=torch.uint8)
    saved = {"role": "train_device", "index": 5, "state": gen}
    got, note = state.cuda_rng_for_rank(saved, 0)  # saved on cuda:5, restored on cuda:0: still this rank's
    assert got is gen and note == ""


@pytest.mark.parametrize("saved,index,want,note", [
    # srun --gpus-per-task=1: each rank saw one GPU, its own
    ([torch.full((4,), 1, dtype=torch.uint8)], 3, 1, "one CUDA generator"),
    # torchrun: every rank saw all GPUs and trained on LOCAL_RANK (its current device)
    ([torch.full((4,), i, dtype=torch.uint8) for i in range(4)], 2, 2, "the one of device 2"),
    # resumed with more GPUs per node than were saved: nothing belongs to this device
    ([torch.full((4,), i, dtype=torch.uint8) for i in range(2)], 3, None, "none for device 3"),
], ids=["one-per-rank", "by-local-rank", "missing"])
def test_old_list_format_maps_to_this_ranks_device(saved, index, want, note):
    got, msg = state.cuda_rng_for_rank(saved, index)
    assert note in msg
    if want is None:
        assert got is None
    else:
        assert int(got[0]) == want


def test_restore_of_a_cuda_rng_without_cuda_warns_and_restores_the_rest(caplog):
    rng = state.capture_rng()
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    rng = state.capture_rng()
    rng["cuda"] = {"role": "train_device", "index": 0, "state": torch.zeros(16, dtype=torch.uint8)}
    torch.rand(5)  # move on, then go back
    with caplog.at_level(logging.WARNING, logger="harness"):
        state.restore_rng(rng)
    assert torch.equal(torch.rand(3), expected)
    if not torch.cuda.is_available():
        assert "no CUDA device" in caplog.text


def test_nccl_on_cpu_is_a_config_error_at_load():
    with pytest.raises(ConfigError, match="nccl"):
        config.load(None, ['dist.backend="nccl"', 'train.device="cpu"'])
    cfg = config.load(None, ['dist.backend="nccl"', 'train.device="cuda"', "train.deterministic=true",
                             'train.amp_dtype="fp16"'])
    assert cfg.train.deterministic and cfg.train.amp_dtype == "fp16"
    with pytest.raises(ConfigError, match="amp_dtype"):
        config.load(None, ['train.amp_dtype="fp8"'])


def test_nccl_on_cpu_exits_2_before_training(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "harness", "train", "--config", str(REPO / "configs/quickstart.toml"),
                           "--set", 'dist.backend="nccl"', "--set", f"checkpoint.dir={tmp_path / 'ck'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "nccl" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "ck").exists()


def test_metrics_folder_is_derived_from_the_checkpoint_folder():
    assert config.metrics_dir_for("/data/run1/ck") == "/data/run1/ck"
    assert config.metrics_dir_for("file:///data/run1") == "/data/run1"
    assert config.metrics_dir_for("s3://bucket/runs/a") == "runs/remote/s3/bucket/runs/a"
    assert config.metrics_dir_for("s3://bucket/../../etc") == "runs/remote/s3/bucket/etc"  # never climbs out
    cfg = config.load(None, ['checkpoint.dir="s3://b/x"'])
    assert cfg.output_dir == "runs/remote/s3/b/x"
    cfg = config.load(None, ['checkpoint.dir="s3://b/x"', 'run.output_dir="mine"'])
    assert cfg.output_dir == "mine"  # an explicit folder wins


def test_a_home_folder_path_is_the_home_folder_not_a_folder_named_tilde(tmp_path, monkeypatch):
    """``dir = "~/checkpoints/run1"`` in a config (or ``CheckpointManager("~/...")``) means what a shell means;
    fsspec alone would make a folder named "~" in the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    cfg = config.load(None, ['checkpoint.dir="~/ck/run1"'])
    assert cfg.checkpoint.dir == str(tmp_path / "home" / "ck" / "run1") and cfg.output_dir == cfg.checkpoint.dir
    assert config.load(None, ['run.output_dir="~/out"']).output_dir == str(tmp_path / "home" / "out")
    assert config.load(None, ['checkpoint.dir="s3://b/~x"']).checkpoint.dir == "s3://b/~x"  # URLs as given
    from harness.storage import Storage
    storage = Storage("~/ck/api")
    storage.check_access(write=True)  # creates the folder
    storage.write_bytes("probe", b"x")
    assert (tmp_path / "home" / "ck" / "api" / "probe").read_bytes() == b"x"
    assert not (tmp_path / "~").exists()


DETERMINISTIC_PROBE = """
import os, torch
from harness import config
from harness.trainer import init_distributed
cfg = config.load(None, ["train.deterministic=true", 'train.device="cpu"'])
assert not torch.are_deterministic_algorithms_enabled()
init_distributed(cfg)
print(torch.are_deterministic_algorithms_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
      torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
"""


def test_train_deterministic_turns_on_what_deterministic_kernels_need(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-c", DETERMINISTIC_PROBE], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["True", ":4096:8", "True", "False"]


@pytest.mark.parametrize("setting, message", [
    ("optim.lr=nan", "optim.lr must be a finite number, got nan"),  # the workers' ValueError, 3 restarts, exit 1
    ("optim.weight_decay=inf", "optim.weight_decay must be a finite number, got inf"),
    ("train.grad_clip=-inf", "train.grad_clip must be a finite number, got -inf"),
    ("dist.timeout_s=inf", "dist.timeout_s must be a finite number"),  # OverflowError in every worker
    ("checkpoint.timeout_s=nan", "checkpoint.timeout_s must be a finite number"),  # nan <= 0 is False
    ("checkpoint.timeout_s=0.001", "checkpoint.timeout_s is in seconds and must be >= 1, got 0.001"),
    ("dist.timeout_s=1e300", "dist.timeout_s is in seconds and must be <= 604800 (a week)"),
    ("checkpoint.grace_period_s=1e9", "checkpoint.grace_period_s is in seconds and must be <= 604800"),
    ("checkpoint.lease_timeout_s=1e9", "checkpoint.lease_timeout_s is in seconds and must be <= 604800"),
    ("optim.momentum=-1", "optim.momentum must be >= 0"),  # torch's ValueError in every worker
    ("scheduler.gamma=-0.5", "scheduler.gamma must be > 0"),  # trained with a negative LR, exit 0
    ("scheduler.min_lr_ratio=-5", "scheduler.min_lr_ratio must be >= 0"),  # likewise
])
def test_numbers_no_run_can_use_are_config_errors(setting, message):
    with pytest.raises(ConfigError) as caught:
        config.load(None, [setting])
    assert message in str(caught.value)


@pytest.mark.parametrize("setting, message", [
    ("train.amp=True", "train.amp must be bool, got str 'True' (TOML's booleans are true and false, unquoted: true)"),
    ("train.deterministic=off", "(TOML's booleans are true and false, unquoted: false)"),
    ("train.max_steps=1e3", "train.max_steps must be int, got float 1000.0 (write 1000)"),
])
def test_a_value_of_the_wrong_type_says_what_toml_wanted(setting, message):
    """`--set train.amp=True` (Python's spelling) or `max_steps = 1e3` said only "must be bool/int"."""
    with pytest.raises(ConfigError) as caught:
        config.load(None, [setting])
    assert message in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        config.load(None, ["train.max_steps=2.5"])
    assert str(caught.value) == "train.max_steps must be int, got float 2.5"  # no hint where none fits


def test_the_limits_themselves_are_accepted():
    cfg = config.load(None, ["dist.timeout_s=1", "checkpoint.timeout_s=604800", "checkpoint.grace_period_s=0.5",
                             "optim.momentum=0", "scheduler.min_lr_ratio=0", "scheduler.gamma=1e-9"])
    assert (cfg.dist.timeout_s, cfg.checkpoint.timeout_s, cfg.checkpoint.grace_period_s) == (1.0, 604800.0, 0.5)


def test_url_schemes_are_case_insensitive_and_object_store_keys_have_no_empty_folder(tmp_path, monkeypatch):
    """`S3://b/run` is `s3://b/run` (fsspec knows only the lower case); `s3://b//run` or `s3:///b/run` would
    store under keys with an empty folder name: refused with what was meant. Local paths and file:// URLs
    with '//' are the same folder as with one slash and stay as written; chained URLs are fsspec's."""
    monkeypatch.chdir(tmp_path)
    for value, stored in [("S3://bucket/run", "s3://bucket/run"), ("Gs://b/x/", "gs://b/x/"),
                          ("file:///data//ck", "file:///data//ck"), ("/abs//ck", "/abs//ck"),
                          ("simplecache::s3://b/x", "simplecache::s3://b/x"), ("hdfs:///x", "hdfs:///x")]:
        assert config.load(None, [f"checkpoint.dir='{value}'"]).checkpoint.dir == stored
    for value, meant in [("s3://bucket//run", "s3://bucket/run"), ("s3:///bucket/run", "s3://bucket/run"),
                         ("S3://b//x//y/", "s3://b/x/y"), ("gs://b//x", "gs://b/x")]:
        with pytest.raises(ConfigError, match=f"checkpoint.dir = '{value}' has an empty folder name .* did you "
                                              f"mean '{meant}'"):
            config.load(None, [f"checkpoint.dir='{value}'"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value, meant", [("s3:/bucket/run", "s3://bucket/run"), ("s3:bucket", "s3://bucket"),
                                          ("gs:/b/x", "gs://b/x"), ("file:/data/ck", "file:///data/ck")])
def test_a_url_missing_a_slash_is_refused_not_a_local_folder(value, meant, tmp_path, monkeypatch):
    """`s3:/bucket/run` trained into ./s3:/bucket/run on the node's disk. Refused with the likely meaning, in the
    config and in CheckpointManager; real URLs and local names with a colon in them stay as they were."""
    from harness import CheckpointManager
    from harness.errors import StorageError
    monkeypatch.chdir(tmp_path)
    for key in ("checkpoint.dir", "run.output_dir"):
        with pytest.raises(ConfigError, match=f"{key} = '{value}' is neither a URL nor a local path: did you mean "
                                              f"'{meant}'"):
            config.load(None, [f"{key}='{value}'"])
    with pytest.raises(StorageError, match=f"did you mean '{meant}'"):
        CheckpointManager(value)
    assert list(tmp_path.iterdir()) == []
    for fine in ("s3://bucket/run", "file:///data/ck", "./s3:/x", "runs/a:b", "/abs/s3:/x"):
        assert config.load(None, [f"checkpoint.dir='{fine}'"]).checkpoint.dir == fine
