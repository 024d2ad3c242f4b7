"""Multi-process tests (tests/test_sharded_*.py, tests/test_ckpt_multirank.py): ranks are real processes
(torch.multiprocessing forkserver, gloo on CPU, file:// rendezvous), each scenario a module-level function
``NAME(rank, world, **kwargs) -> dict`` run on every rank by ``run_ranks``; the parent asserts on the
results. Also the small models and batches the sharded scenarios share."""

from __future__ import annotations

import datetime
import json
import os
import time
import traceback
from typing import Callable

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from torch import nn

from harness.dist import leave

WORKER_TIMEOUT_S = 60


class ZNet(nn.Module):
    """Parameters of different sizes, so ZeRO's partition differs with the world size."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, width)
        self.fc2 = nn.Linear(width, width)
        self.fc3 = nn.Linear(width, 4)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class FNet(nn.Module):
    """Blocks to fully_shard; row counts that do not divide by 2, 3 or 4 (uneven shards)."""

    def __init__(self, width: int = 13) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(8, width), nn.Linear(width, width)])
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        for b in self.blocks:
            x = torch.relu(b(x))
        return self.head(x)


def batch(step: int, rank: int, d_in: int = 8, d_out: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(6, d_in, generator=g), torch.randn(6, d_out, generator=g)


def _worker(rank: int, world: int, init_file: str, scenario: str | Callable[..., dict], kwargs: dict,
            result_file: str, environ: dict[str, str], cwd: str) -> None:
    # A forkserver child starts with the environment and folder the server had when it started; a rank gets
    # the parent's of now, as a spawned one would (the S3 fixtures, for one, set AWS_* in the test process).
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world)
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                             timeout=datetime.timedelta(seconds=WORKER_TIMEOUT_S))
    try:
        try:
            if isinstance(scenario, str):
                import sharded_scenarios
                scenario = getattr(sharded_scenarios, scenario)
            result = {"ok": True, **scenario(rank, world, **kwargs)}
        except BaseException:  # noqa: BLE001 - report to the parent, which asserts
            result = {"ok": False, "error": traceback.format_exc()}
        with open(result_file.format(rank=rank), "w") as f:
            json.dump(result, f)
    finally:
        tdist.destroy_process_group()
    leave(0)  # not through interpreter teardown, which a gloo thread can abort (harness.dist.leave)


# Imported once by the fork server, not by every rank: a spawned rank spent ~2.5 s of CPU importing torch and
# torch._dynamo (which the first optimizer's __init__ pulls in) before its scenario began, most of a sharded
# test's time on 2 cores. Nothing of harness is preloaded: each rank imports it fresh, as a spawned one did.
_PRELOAD = ["torch", "torch.distributed", "torch._dynamo", "torch.distributed.optim", "torch.distributed.fsdp",
            "torch.distributed.checkpoint.state_dict", "torch.nn.parallel"]


def _start_method() -> str:
    """forkserver (ranks forked from one server that imported torch once); spawn where there is none."""
    if "forkserver" not in mp.get_all_start_methods():
        return "spawn"
    mp.get_context("forkserver").set_forkserver_preload(_PRELOAD)
    return "forkserver"


def run_ranks(tmp_path, scenario: str | Callable[..., dict], world: int, timeout_s: float = 90,
              **kwargs) -> list[dict]:
    """Run ``scenario(rank, world, **kwargs) -> dict`` on ``world`` new processes (gloo, file:// rendezvous)
    and return each rank's dict; fail on a hang or on any rank's exception (with its traceback).

    ``scenario`` is a module-level function (pickled by name, so the ranks import its module) or
    the name of one in tests/sharded_scenarios.py. The one rank-spawning helper of the test suite."""
    name = scenario if isinstance(scenario, str) else scenario.__name__
    tag = f"{name}-{time.monotonic_ns()}"
    rdzv = tmp_path / f"rdzv-{tag}"
    result_file = str(tmp_path / f"{tag}-rank{{rank}}.json")
    ctx = mp.start_processes(_worker, args=(world, str(rdzv), scenario, kwargs, result_file, dict(os.environ),
                                            os.getcwd()),
                             nprocs=world, join=False, start_method=_start_method())
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"{name}: ranks did not finish within {timeout_s} s (hang)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    results = []
    for r in range(world):
        with open(result_file.format(rank=r)) as f:
            results.append(json.load(f))
    for r, res in enumerate(results):
        assert res["ok"], f"{name} rank {r} failed:\n{res.get('error')}"
    return results
