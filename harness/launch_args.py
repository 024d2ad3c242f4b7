"""``harness launch``'s options: the parser, and each option checked before anything starts (a bad one is a
config error, exit 2, like a bad config key: a typo must not be retried as a failure).

Every option can also come from torchrun's ``PET_<OPTION>`` environment variables (what the Kubeflow operator
sets).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any

from harness import exitcodes, rendezvous, srun, workerstart
from harness.errors import ConfigError


@dataclass
class LaunchArgs:
    nnodes: str
    nproc_per_node: str
    rdzv_endpoint: str
    rdzv_id: str
    max_restarts: int
    standalone: bool
    monitor_interval: float
    config: str
    overrides: list[str]
    rejoin_s: float = rendezvous.REJOIN_S  # keep starting the agent this long after a lost rendezvous
    rdzv_conf: dict[str, str] = field(default_factory=dict)  # --rdzv-conf, parsed
    start_method: str = workerstart.FORKSERVER


def _env_default(name: str, fallback: str) -> str:
    """torchrun's convention: every option can come from PET_<OPTION> (what the Kubeflow operator sets)."""
    return os.environ.get(f"PET_{name}", fallback)


def add_launch_parser(sub: Any) -> None:
    p = sub.add_parser(
        "launch", help="run a job: torchrun's elastic agent with a config and storage check first",
        description="Run training on this node under torchrun's elastic agent (in-process, torch's launcher API). "
                    "Checks the config and the checkpoint storage before any worker starts. With one node and no "
                    "--rdzv-endpoint it runs standalone (a local rendezvous); otherwise run the same command on "
                    "every node (c10d rendezvous at --rdzv-endpoint, hosted by the node whose address it is). "
                    "Options default to torchrun's PET_* environment variables (PET_NNODES, ...).",
        epilog=exitcodes.TABLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nnodes", default=_env_default("NNODES", "1"), metavar="N|MIN:MAX",
                   help="number of nodes, or an elastic range (default 1)")
    p.add_argument("--nproc-per-node", default=_env_default("NPROC_PER_NODE", ""), metavar="N",
                   help="workers on this node: N, gpu or cpu (default: one per GPU, else 1)")
    p.add_argument("--standalone", action="store_true",
                   help="a local rendezvous on one node (the default with --nnodes 1 and no --rdzv-endpoint)")
    p.add_argument("--rdzv-endpoint", default=_env_default("RDZV_ENDPOINT", ""), metavar="HOST:PORT",
                   help="c10d rendezvous endpoint (default: standalone on one node)")
    p.add_argument("--rdzv-id", default=_env_default("RDZV_ID", ""), metavar="ID",
                   help="job id, the same on every node (default: random with --standalone, else 'harness')")
    p.add_argument("--rdzv-conf", default=_env_default("RDZV_CONF", ""), metavar="KEY=VALUE,...",
                   help="c10d rendezvous settings, as for torchrun: join_timeout (default 600 s), "
                        "last_call_timeout, close_timeout, read_timeout, ...")
    p.add_argument("--max-restarts", default=_env_default("MAX_RESTARTS", "3"), metavar="K",
                   help="worker-group restarts by the agent before it gives up (default 3); permanent errors "
                        "(exit 2, 3) are never restarted")
    p.add_argument("--start-method", choices=workerstart.METHODS, default=workerstart.FORKSERVER,
                   help="how workers start: forked from a process that has imported torch beside the launcher "
                        "(default: no import at each start and restart), or as fresh 'python -m harness train' "
                        "processes, as torchrun starts them")
    p.add_argument("--monitor-interval", type=float, default=0.1, help=argparse.SUPPRESS)
    p.add_argument("--config", required=True, help="TOML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value; repeatable")


def nodes(text: str) -> tuple[int, int]:
    parts = text.split(":")
    try:
        lo, hi = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (0, 0)
    except ValueError:
        lo = hi = 0
    if not 0 < lo <= hi:
        raise ConfigError(f"--nnodes must be N or MIN:MAX with 0 < MIN <= MAX, got {text!r}")
    return lo, hi


def count(text: str, what: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise ConfigError(f"{what} must be an integer >= {minimum}, got {text!r}")
    return value


def nproc(requested: str) -> int:
    """N, or torchrun's words: ``gpu``/``auto`` (the Kubeflow operator's default) = one per GPU (else 1 here:
    torchrun's ``auto`` would start one per CPU core), ``cpu`` = one per core."""
    if requested == "cpu":
        return os.cpu_count() or 1
    if requested and requested not in ("auto", "gpu"):
        return count(requested, "--nproc-per-node", 1)
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def endpoint(text: str) -> str:
    """``HOST[:PORT]`` as torch's rendezvous parses it (``[::1]:29500`` for IPv6), checked here: torch's
    ValueError came from inside the agent, exit 1, retried as if the job had failed."""
    text = text.strip()
    if not text:
        return text
    if text[0] == "[" and text[-1] == "]":
        host, port = text[1:-1], None
    else:
        host, _, port = text.rpartition(":") if ":" in text else (text, "", None)
        if len(host) > 1 and host[0] == "[" and host[-1] == "]":
            host = host[1:-1]
    if port is not None and not (port.isdigit() and int(port) < 65536):
        raise ConfigError(f"--rdzv-endpoint {text!r}: the port must be an integer from 0 to 65535")
    if not re.fullmatch(r"[\w.:-]+", host):
        raise ConfigError(f"--rdzv-endpoint {text!r}: expected HOST:PORT (a host name, an IPv4 address or "
                          f"[IPv6]), e.g. node-0:29500")
    return text


def several_nodes_endpoint(given: str, nnodes: str, standalone: bool, run_id: str) -> tuple[str, str]:
    """The rendezvous endpoint (and run id) of a job of several nodes. Without one, torch's agent waited at this
    node's own localhost for the others until its join timeout (600 s), then exit 1, retried the same way.
    Taken, when not given, from what the scheduler tells every node: the Kubeflow operator's plain (not elastic)
    PyTorchJob gives each pod ``MASTER_ADDR``/``MASTER_PORT`` (``PET_MASTER_*`` too), the endpoint torchrun
    users pass; an srun step with one launcher per node, its first node (the port and job id srun's own tasks
    would use, harness/srun.py)."""
    if given or standalone or nodes(nnodes)[1] == 1:
        return given, run_id
    for prefix in ("PET_", ""):
        addr, port = os.environ.get(f"{prefix}MASTER_ADDR", ""), os.environ.get(f"{prefix}MASTER_PORT", "")
        if addr and port:
            return _announce(f"{addr}:{port}", f"{prefix}MASTER_ADDR:{prefix}MASTER_PORT", nnodes), run_id
    if srun.step_tasks() > 1:
        host, port = srun.step_master()
        return (_announce(f"{host}:{port}", "the srun step's first node", nnodes),
                run_id or os.environ.get("SLURM_JOB_ID", ""))
    raise ConfigError(f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT, the same on every node: a host:port of "
                      "one of them, which hosts the rendezvous (without one each node waits for the others at its "
                      "own localhost until the join timeout)")


def _announce(found: str, source: str, nnodes: str) -> str:
    try:
        found = endpoint(found)
    except ConfigError as exc:
        raise ConfigError(f"{source}, the rendezvous of --nnodes {nnodes}: "
                          f"{exc}".replace("--rdzv-endpoint ", "")) from None
    print(f"harness launch: rendezvous at {found} ({source})", file=sys.stderr)
    return found


def parse_args(ns: argparse.Namespace) -> LaunchArgs:
    """The parsed command line as LaunchArgs, every option checked (ConfigError)."""
    srun.check_launcher(nodes(ns.nnodes)[1])
    ns.rdzv_endpoint, ns.rdzv_id = several_nodes_endpoint(endpoint(ns.rdzv_endpoint), ns.nnodes, ns.standalone,
                                                          ns.rdzv_id)
    restarts = count(ns.max_restarts, "--max-restarts", 0)
    rejoin_s, rdzv_conf = rendezvous.window(), rendezvous.parse_conf(ns.rdzv_conf)
    if not 0 < ns.monitor_interval < math.inf:
        raise ConfigError(f"--monitor-interval must be a number of seconds > 0, got {ns.monitor_interval!r}")
    return LaunchArgs(ns.nnodes, ns.nproc_per_node, endpoint(ns.rdzv_endpoint), ns.rdzv_id, restarts,
                      ns.standalone, ns.monitor_interval, ns.config, ns.overrides, rejoin_s, rdzv_conf,
                      ns.start_method)
