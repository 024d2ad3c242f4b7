"""Every rank of a job runs the same config.

Each node's launcher reads its own config file and ``--set`` options. A node started with another value (a config
edited on one machine, an override in one node's script) made a job that trained wrong or died obscurely: a
different ``checkpoint.every_steps`` or ``train.log_every`` puts a collective on one rank's step that the other
does not make (gloo aborted the workers, SIGABRT, and the agent spent its restarts on it: exit 1, which schedulers
retry); a different ``optim.lr`` or ``train.grad_clip`` lets the replicas drift apart silently (DDP averages the
gradients, each rank applies its own step), and rank 0's weights are the ones saved.

So each rank, once the process group is up, compares a digest of its config with every other's (one small
all-gather); on a difference every rank raises the same one-line ConfigError (exit 2: restarting cannot help)
naming the keys, the values and the ranks' hosts. What may differ between machines: where things are on each
(``PER_NODE``), and ``data`` settings, which a ``train.entry`` may use for paths (a difference there is a warning).
The versions of harness and torch are compared too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import socket
from typing import Any

import torch

from harness import dist
from harness._version import __version__
from harness.errors import ConfigError

log = logging.getLogger("harness")

# Where things are on each machine, and how long each waits: a difference there changes no rank's steps.
PER_NODE = frozenset({
    "run.output_dir", "run.id", "checkpoint.dir", "checkpoint.storage_options", "checkpoint.init_from",
    "checkpoint.io_threads", "checkpoint.lease_timeout_s", "checkpoint.timeout_s", "checkpoint.grace_period_s",
    "dist.timeout_s",
})
WARN_ONLY = ("data.",)  # a train.entry's data settings may name a path that differs between machines
SHOWN_KEYS = 3
SHOWN_VALUE = 60


def flat(cfg: Any) -> dict[str, str]:
    """The compared settings: ``section.key`` (nested tables dotted) -> the value as JSON; with the versions."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value and prefix not in PER_NODE:
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif prefix not in PER_NODE:
            out[prefix] = json.dumps(value, sort_keys=True, default=str)

    for section, values in dataclasses.asdict(cfg).items():
        walk(section, values)
    out["harness version"] = json.dumps(__version__)
    out["torch version"] = json.dumps(torch.__version__)
    return out


def check(cfg: Any, group: Any) -> None:
    """Collective: raise the same ConfigError on every rank if any rank's settings differ from rank 0's (see the
    module's docstring); warn on rank 0 for ``data`` settings alone. One all-gather of a digest when they agree."""
    if not dist.initialized() or dist.world_size() == 1:
        return
    mine = flat(cfg)
    digest = hashlib.sha256(json.dumps(mine, sort_keys=True).encode()).hexdigest()
    views = dist.all_gather((digest, socket.gethostname()), group)
    if all(d == views[0][0] for d, _ in views):
        return
    ref = dist.broadcast(mine if dist.rank() == 0 else None, group)
    diffs = dist.all_gather(differences(ref, mine), group)
    hosts = [host for _, host in views]
    problem = describe(diffs, hosts, warn_only=False)
    if problem:
        raise ConfigError(problem)
    note = describe(diffs, hosts, warn_only=True)
    if note and dist.rank() == 0:
        log.warning("%s: fine if each names the same data on its machine", note)


def differences(ref: dict[str, str], mine: dict[str, str]) -> list[tuple[str, str | None, str | None]]:
    """(key, this rank's value, rank 0's value) for each key whose values differ; None where a key is absent."""
    return [(k, mine.get(k), ref.get(k)) for k in sorted(set(ref) | set(mine)) if mine.get(k) != ref.get(k)]


def describe(diffs: list[list[tuple[str, str | None, str | None]]], hosts: list[str], warn_only: bool) -> str | None:
    """One line for the ranks whose differences are (``warn_only``) only ``data`` settings, or (not) any other."""
    def kind(key: str) -> bool:
        return key.startswith(WARN_ONLY) == warn_only

    ranks = [(r, [d for d in ds if kind(d[0])]) for r, ds in enumerate(diffs)]
    ranks = [(r, ds) for r, ds in ranks if ds]
    if not ranks:
        return None
    r, ds = ranks[0]
    shown = "; ".join(f"{key} = {_value(mine)} where rank 0 has {_value(ref)}" for key, mine, ref in ds[:SHOWN_KEYS])
    more = f" (and {len(ds) - SHOWN_KEYS} more)" if len(ds) > SHOWN_KEYS else ""
    others = f"; {len(ranks) - 1} more rank(s) differ" if len(ranks) > 1 else ""
    if warn_only:
        return f"rank {r} (host {hosts[r]}) has {shown}{more}{others}"
    return (f"the ranks do not run the same config: rank {r} (host {hosts[r]}) has {shown}{more} (rank 0 on host "
            f"{hosts[0]}){others}; start every node with the same config file and --set options (only paths, "
            f"storage options, timeouts, checkpoint.io_threads and data settings may differ between machines)")


def _value(v: str | None) -> str:
    if v is None:
        return "nothing"
    return v if len(v) <= SHOWN_VALUE else v[:SHOWN_VALUE - 3] + "..."
