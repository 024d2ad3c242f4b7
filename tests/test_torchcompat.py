"""harness/torchcompat.py: the fallbacks for the older torch releases pyproject allows, run on this torch too.

The suite itself runs on the newest torch; these were found by running it on torch 2.11 (the GPU machine's) and
2.4, where ``harness launch`` failed before any worker with ``TypeError: LaunchConfig.__init__() got an
unexpected keyword argument 'shutdown_timeout'`` (2.11) or ``'signals_to_handle'`` (2.4)."""

from __future__ import annotations

import dataclasses
import sys

import pytest
from torch.distributed.launcher.api import LaunchConfig

from harness import torchcompat
from torch_features import needs_fsdp

WANTED = {"min_nodes": 1, "max_nodes": 1, "nproc_per_node": 2, "signals_to_handle": "SIGHUP,SIGQUIT",
          "shutdown_timeout": 55}


@dataclasses.dataclass
class LaunchConfig211:  # torch 2.11's fields, as far as harness uses them: no shutdown_timeout
    min_nodes: int
    max_nodes: int
    nproc_per_node: int
    signals_to_handle: str = "SIGTERM,SIGINT,SIGHUP,SIGQUIT"


@dataclasses.dataclass
class LaunchConfig24:  # torch 2.4's: neither
    min_nodes: int
    max_nodes: int
    nproc_per_node: int


@dataclasses.dataclass
class LaunchConfig213(LaunchConfig211):  # torch 2.13's: both
    shutdown_timeout: int = 30


def test_this_torch_gets_what_it_has():
    have = {f.name for f in dataclasses.fields(LaunchConfig)}
    assert torchcompat.launch_config_fields(LaunchConfig, 25, WANTED) == {k: WANTED[k] for k in WANTED if k in have}
    LaunchConfig(**torchcompat.launch_config_fields(LaunchConfig, 25, WANTED))  # accepted as built
    assert torchcompat.launch_config_fields(LaunchConfig213, 120, WANTED) == WANTED


@pytest.mark.parametrize("cls, dropped", [(LaunchConfig211, {"shutdown_timeout"}),
                                          (LaunchConfig24, {"shutdown_timeout", "signals_to_handle"})])
def test_an_older_launch_config_gets_only_its_own_fields(cls, dropped, capsys):
    fields = torchcompat.launch_config_fields(cls, 25, WANTED)
    assert set(WANTED) - set(fields) == dropped
    cls(**fields)  # no TypeError: unexpected keyword argument
    assert capsys.readouterr().err == ""  # the default grace period fits torch's 30 s


@pytest.mark.parametrize("grace, warned", [(25, False), (26, True), (120, True)])
def test_a_grace_period_torch_would_cut_short_is_warned_about_once(grace, warned, capsys):
    torchcompat.launch_config_fields(LaunchConfig211, grace, WANTED)
    err = capsys.readouterr().err
    assert err.count("\n") == (1 if warned else 0), err
    if warned:
        assert f"checkpoint.grace_period_s = {grace}" in err and "30 s" in err and err.startswith("harness launch:")
    torchcompat.launch_config_fields(LaunchConfig213, grace, WANTED)
    assert capsys.readouterr().err == ""  # a torch with shutdown_timeout: nothing to warn about


@needs_fsdp
def test_fully_shard_is_fsdp2s_on_this_torch():
    from torch.distributed.fsdp import fully_shard

    assert torchcompat.fully_shard() is fully_shard


@pytest.mark.parametrize("hidden", ["tensor", "fsdp"])
def test_a_torch_without_public_fsdp2_refuses_fsdp_as_a_config_error(monkeypatch, hidden):
    """torch 2.4 has no public DTensor (``torch.distributed.tensor`` holds only tensor parallelism) and no
    public fully_shard; torch 2.5 has DTensor but keeps fully_shard private, where it refuses to run without
    CUDA ("FSDP requires CUDA for streams"). The trainer's fsdp_wrap then raises a ConfigError (exit 2, one
    line; seen on torch 2.4.1 as 'harness: config error: train.parallel = "fsdp" needs torch >= 2.6 ...'),
    where it raised an ImportError traceback (2.4) or a RuntimeError (2.5, CPU) on every rank, restarted."""
    import types

    import torch.distributed

    from harness import exitcodes
    from harness.errors import ConfigError

    stub = types.ModuleType(f"torch.distributed.{hidden}")  # that module as the older torch has it
    monkeypatch.setattr(torch.distributed, hidden, stub)
    monkeypatch.setitem(sys.modules, f"torch.distributed.{hidden}", stub)
    why = torchcompat.fsdp_unsupported()
    assert why and 'train.parallel = "fsdp" needs torch >= 2.6' in why and '"ddp" or "zero"' in why
    with pytest.raises(ConfigError) as exc:
        torchcompat.fully_shard()
    assert str(exc.value) == why and exitcodes.classify(exc.value).code == exitcodes.EXIT_CONFIG
