"""checkpoint.init_from: a new run's initial weights from another run's checkpoint or a weights file
(fine-tuning, torchtitan's initial_load_path): tensors whose name and shape match are copied, read once by
rank 0 and broadcast; a restart resumes from the run's own checkpoints, never from the source again. A
source that does not exist or holds none of the model's tensors is a config error (exit 2)."""

from __future__ import annotations

import pytest
import torch

from harness import config
from harness.errors import CheckpointError, ConfigError
from harness.interop.inference import initial_weights
from trainer_helpers import EVERY, events, final_state, launch_cmd

BODY = ("net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias")  # the MLP without its classifier head


def test_a_new_run_starts_from_another_runs_weights_and_then_resumes_from_its_own(runner, tmp_path):
    pre, ft = tmp_path / "pre", tmp_path / "ft"
    for d in (pre, ft):
        d.mkdir()
    first = runner.run("pretrain", launch_cmd(pre, f"train.max_steps={EVERY}"))
    assert first.rc == 0, first.tail()
    pretrained = final_state(pre / "ck").state["models"]["model"]

    # another head (4 classes, not 8), and a learning rate so small that the weights stay the initial ones
    tune = ["data.num_classes=4", "optim.lr=1e-12", f"checkpoint.init_from='{pre / 'ck'}'"]
    second = runner.run("finetune", launch_cmd(ft, f"train.max_steps={EVERY}", *tune))
    assert second.rc == 0, second.tail()
    log = second.log()
    assert f"from {pre / 'ck'}/step-{EVERY:09d} (newest): 4 tensors loaded; shape mismatch: net.4.weight saved " \
           "[8, 128] vs model [4, 128]" in log, log[-3000:]
    tuned = final_state(ft / "ck").state["models"]["model"]
    for key in BODY:  # the body is the pretrained one; the head is this run's own
        torch.testing.assert_close(tuned[key], pretrained[key], rtol=0, atol=1e-6)
    assert tuned["net.4.weight"].shape == (4, 128)
    assert events(ft, "start") == [{**events(ft, "start")[0], "init_from": str(pre / "ck")}]

    third = runner.run("restart", launch_cmd(ft, f"train.max_steps={2 * EVERY}", *tune))
    assert third.rc == 0, third.tail()
    assert f"resumed from step-{EVERY:09d}" in third.log() and "warm start" not in third.log(), third.tail()


def test_a_source_that_does_not_exist_exits_2_without_restart(runner, tmp_path):
    proc = runner.run("missing", launch_cmd(tmp_path, f"checkpoint.init_from='{tmp_path / 'nowhere'}'",
                                            max_restarts=2))
    assert proc.rc == 2, proc.tail()
    log = proc.log()
    assert log.count(f"harness: config error: checkpoint.init_from: {tmp_path / 'nowhere'} does not exist") == 1
    assert "Traceback" not in log and "will restart worker group" not in log, log[-3000:]


def test_sources_that_cannot_start_a_model(tmp_path):
    """In one process (rank 0 alone): a file that is not weights is a CheckpointError; weights that share
    nothing with the model a ConfigError; the model is left as it was."""
    net = torch.nn.Linear(3, 2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    (tmp_path / "notes.txt").write_text("not weights")
    with pytest.raises(CheckpointError, match="checkpoint.init_from: .*notes.txt is not a readable torch.save"):
        initial_weights(net, str(tmp_path / "notes.txt"))
    torch.save({"encoder.weight": torch.zeros(5, 5)}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="holds none of the model's tensors"):
        initial_weights(net, str(tmp_path / "other.pt"))
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
    torch.save({"weight": torch.ones(2, 3)}, tmp_path / "partial.pt")
    report = initial_weights(net, str(tmp_path / "partial.pt"))
    assert report.loaded_keys == ["weight"] and torch.equal(net.weight, torch.ones(2, 3))
    assert torch.equal(net.bias, before["bias"])


def test_init_from_is_checked_with_the_config():
    with pytest.raises(ConfigError, match="not supported with train.parallel = 'fsdp'"):
        config.load(None, ["checkpoint.init_from='runs/pre'", "train.parallel='fsdp'"])
    with pytest.raises(ConfigError, match="did you mean 's3://bucket/pre'"):
        config.load(None, ["checkpoint.init_from='s3:/bucket/pre'"])
