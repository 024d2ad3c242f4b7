"""harness/rendezvous.py: ``--rdzv-conf`` as torchrun takes it, how long ``harness launch`` keeps starting its
agent after a lost rendezvous, and what it says. End to end (real launchers: a node SIGKILLed and replaced, or
never replaced under join_timeout=5) in test_launch_agent.py."""

from __future__ import annotations

import math
import subprocess
import sys
import time

import pytest
from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError, RendezvousTimeoutError

from harness import rendezvous
from harness.errors import ConfigError
from trainer_helpers import REPO, base_env


def _lost(after: int):
    """A launch that cannot reach its store ``after`` times, the way torch raises it (chained cause)."""
    calls = []

    def launch() -> None:
        calls.append(1)
        if len(calls) <= after:
            try:
                raise RuntimeError("Failed to recv, got 0 bytes. Connection was likely closed.\nframe #0: ...")
            except RuntimeError as inner:
                raise RendezvousConnectionError("The connection to the C10d store has failed.") from inner
    return launch, calls


def test_the_agent_is_started_again_until_it_reaches_the_rendezvous(monkeypatch, capsys):
    monkeypatch.setattr(rendezvous, "PAUSE_S", 0.01)
    launch, calls = _lost(after=2)
    rendezvous.run_agent(launch, "node0:29400", seconds=60)
    assert len(calls) == 3
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("harness launch: cannot reach the rendezvous at node0:29400 "
                                                   "(Failed to recv, got 0 bytes.") for line in lines), lines


def test_the_pause_doubles_up_to_a_cap(monkeypatch):
    """An endpoint that fails at once (its DNS name gone with the pod) costs a line every 30 s, not every 2."""
    slept = []
    monkeypatch.setattr(rendezvous.time, "sleep", slept.append)
    launch, calls = _lost(after=8)
    rendezvous.run_agent(launch, "node0:29400", seconds=600)
    assert slept == [2, 4, 8, 16, 30, 30, 30, 30] and len(calls) == 9


def test_the_window_ends_the_wait(monkeypatch):
    monkeypatch.setattr(rendezvous, "PAUSE_S", 0.05)
    launch, calls = _lost(after=10**6)
    with pytest.raises(RendezvousConnectionError):
        rendezvous.run_agent(launch, "node0:29400", seconds=0.3)
    assert 3 <= len(calls) <= 8, len(calls)  # one every PAUSE_S for the window, then the error as it was


def test_a_later_loss_has_a_window_of_its_own(monkeypatch):
    """An agent that ran longer than the window (and REACHED_S) had reached its store: a new window."""
    monkeypatch.setattr(rendezvous, "PAUSE_S", 0.01)
    monkeypatch.setattr(rendezvous, "REACHED_S", 0.2)
    calls = []

    def launch() -> None:  # fails at once, runs "long" (0.3 s), fails at once again, then succeeds
        calls.append(1)
        if len(calls) == 2:
            time.sleep(0.3)
        if len(calls) <= 3:
            raise RendezvousConnectionError("lost")
    rendezvous.run_agent(launch, "node0:29400", seconds=0.25)  # without the new window: over after the 2nd
    assert len(calls) == 4


def test_slow_failures_to_connect_do_not_extend_the_window(monkeypatch):
    """Each agent fails only after a while (torch's store client tries for 2.5 minutes): still one window."""
    monkeypatch.setattr(rendezvous, "PAUSE_S", 0.01)
    monkeypatch.setattr(rendezvous, "REACHED_S", 0.05)
    calls = []

    def launch() -> None:
        calls.append(1)
        time.sleep(0.1)  # longer than REACHED_S, shorter than the window
        raise RendezvousConnectionError("lost")
    start = time.monotonic()
    with pytest.raises(RendezvousConnectionError):
        rendezvous.run_agent(launch, "node0:29400", seconds=0.5)
    assert time.monotonic() - start < 2 and len(calls) <= 7, len(calls)


@pytest.mark.parametrize("endpoint, seconds", [("", 600), ("node0:29400", 0)])
def test_no_wait_without_an_endpoint_or_a_window(endpoint, seconds):
    launch, calls = _lost(after=1)
    with pytest.raises(RendezvousConnectionError):
        rendezvous.run_agent(launch, endpoint, seconds)
    assert len(calls) == 1


def test_a_stopping_launcher_is_not_started_again(monkeypatch):
    """Signalled, or a worker recorded its outcome (every node is stopping): the host is gone for good."""
    monkeypatch.setattr(rendezvous, "PAUSE_S", 0.01)
    for flips_after in (1, 2):  # stopping when the failure comes / during the pause
        launch, calls = _lost(after=10**6)
        checks = []

        def stopping() -> bool:
            checks.append(1)
            return len(checks) >= flips_after
        with pytest.raises(RendezvousConnectionError):
            rendezvous.run_agent(launch, "node0:29400", 600, stopping)
        assert len(calls) == 1, flips_after


def test_other_failures_are_not_retried():
    calls = []

    def launch() -> None:
        calls.append(1)
        raise RendezvousTimeoutError("not enough nodes")
    with pytest.raises(RendezvousTimeoutError):
        rendezvous.run_agent(launch, "node0:29400", 600)
    assert len(calls) == 1


def test_describe_names_the_endpoint_and_the_window():
    lost = RendezvousConnectionError("The connection to the C10d store has failed.")
    assert rendezvous.describe(lost, "node0:29400", 600).startswith(
        "cannot reach the rendezvous at node0:29400, and no node hosted it within 600 s (its host is lost or never")
    assert "HARNESS_RDZV_REJOIN_S=0: not waiting" in rendezvous.describe(lost, "node0:29400", 0)
    assert rendezvous.describe(RendezvousTimeoutError("x"), "node0:29400", 600).startswith(
        "not enough nodes joined the rendezvous at node0:29400 in time")
    assert rendezvous.describe(ValueError("bad"), "", 600) == "ValueError: bad"


@pytest.mark.parametrize("raw, expected", [("", 600.0), ("0", 0.0), ("90", 90.0), ("abc", None), ("-1", None),
                                           ("nan", None)])
def test_window_from_the_environment(raw, expected, monkeypatch):
    monkeypatch.setenv(rendezvous.REJOIN_ENV, raw)
    if expected is None:
        with pytest.raises(ConfigError, match=rendezvous.REJOIN_ENV):
            rendezvous.window()
    else:
        assert rendezvous.window() == expected and not math.isnan(rendezvous.window())


def test_rdzv_conf_is_parsed_as_torchrun_takes_it():
    assert rendezvous.parse_conf("") == {}
    assert rendezvous.parse_conf("join_timeout=1800, last_call_timeout=30,is_host=false") == {
        "join_timeout": "1800", "last_call_timeout": "30", "is_host": "false"}


@pytest.mark.parametrize("text", ["join_timeout", "join_timeout=", "=5", "join_timeout=soon", "read_timeout=1.5",
                                  "join_timeout=0", "close_timeout=-3", "join_timout=1800"])
def test_a_malformed_rdzv_conf_is_a_config_error(text):
    with pytest.raises(ConfigError, match="--rdzv-conf"):
        rendezvous.parse_conf(text)


def test_a_mistyped_rdzv_conf_key_is_named_with_the_right_one():
    """torch would ignore an unknown key: the join timeout the user meant to raise would silently stay 600 s."""
    with pytest.raises(ConfigError, match="unknown key 'join_timout' \\(did you mean 'join_timeout'\\?\\)"):
        rendezvous.parse_conf("join_timout=1800")


@pytest.mark.parametrize("env, flags, named", [
    ({rendezvous.REJOIN_ENV: "soon"}, [], rendezvous.REJOIN_ENV),
    ({}, ["--rdzv-conf", "join_timeout=ten"], "join_timeout='ten'"),
    ({"PET_RDZV_CONF": "join_timeout=ten"}, [], "join_timeout='ten'"),  # the operator's elasticPolicy.rdzvConf
    # torch's ValueError from inside the agent, exit 1 (retried); an AssertionError with no text, exit 1
    ({}, ["--nnodes", "2", "--rdzv-endpoint", "node-0:29_500"], "--rdzv-endpoint 'node-0:29_500': the port"),
    ({}, ["--nnodes", "2", "--rdzv-endpoint", "node-0:99999"], "the port must be an integer from 0 to 65535"),
    ({"PET_RDZV_ENDPOINT": "node 0:29500", "PET_NNODES": "2"}, [], "expected HOST:PORT"),
    ({}, ["--monitor-interval", "0"], "--monitor-interval must be a number of seconds > 0, got 0.0"),
])
def test_a_bad_rendezvous_setting_exits_2_before_anything_starts(env, flags, named, tmp_path):
    """HARNESS_RDZV_REJOIN_S, --rdzv-conf or PET_RDZV_CONF: exit 2, one line naming it, nothing started."""
    cmd = [sys.executable, "-m", "harness", "launch", "--nproc-per-node", "1", "--config", "configs/quickstart.toml",
           "--set", f"checkpoint.dir={tmp_path / 'ck'}", *flags]
    out = subprocess.run(cmd, cwd=REPO, env=base_env(**env), capture_output=True, text=True, timeout=60)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and named in lines[0], out.stderr
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize("text", ["node-0:29500", "node-0", "10.0.0.7:0", "[::1]:29500", "[fe80::1]", "",
                                  "n.example.com:65535"])
def test_endpoints_torch_takes_are_taken(text):
    from harness.launch_args import endpoint
    assert endpoint(text) == text


@pytest.mark.parametrize("text", ["node-0:", "node-0:http", "node-0:65536", ":29500", "no de:1", "[::1]:x"])
def test_endpoints_torch_refuses_are_config_errors(text):
    from harness.launch_args import endpoint
    with pytest.raises(ConfigError, match="--rdzv-endpoint"):
        endpoint(text)
