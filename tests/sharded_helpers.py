"""Multi-process scenarios for the sharded-checkpoint tests (tests/test_sharded_*.py): ranks are real
processes (torch.multiprocessing spawn, gloo on CPU, file:// rendezvous), each scenario a module-level
function ``NAME(rank, world, **kwargs) -> dict`` run on every rank; the parent asserts on the results."""

from __future__ import annotations

import datetime
import json
import os
import time
import traceback

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from torch import nn

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


def _worker(rank: int, world: int, init_file: str, scenario: str, kwargs: dict, out_dir: str) -> None:
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world)
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                             timeout=datetime.timedelta(seconds=WORKER_TIMEOUT_S))
    try:
        import sharded_scenarios
        try:
            result = {"ok": True, **getattr(sharded_scenarios, scenario)(rank, world, **kwargs)}
        except BaseException:  # noqa: BLE001 - report to the parent, which asserts
            result = {"ok": False, "error": traceback.format_exc()}
        with open(os.path.join(out_dir, f"{scenario}-rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        tdist.destroy_process_group()


def run_ranks(tmp_path, scenario: str, world: int, timeout_s: float = 90, **kwargs) -> list[dict]:
    """Run ``sharded_scenarios.SCENARIO`` on ``world`` spawned ranks; fail on a hang; return the results."""
    rdzv = tmp_path / f"rdzv-{scenario}-{time.monotonic_ns()}"
    ctx = mp.start_processes(_worker, args=(world, str(rdzv), scenario, kwargs, str(tmp_path)), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"{scenario}: ranks did not finish within {timeout_s} s (hang)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    results = [json.load(open(tmp_path / f"{scenario}-rank{r}.json")) for r in range(world)]
    for r, res in enumerate(results):
        assert res["ok"], f"{scenario} rank {r} failed:\n{res.get('error')}"
    return results
