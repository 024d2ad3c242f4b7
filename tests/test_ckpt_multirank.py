"""Two real processes (gloo, file:// rendezvous): every rank saves, rank 0 writes the replicated state,
each rank its own RNG and data position, restore hands each rank its own back, and a failure on one rank
leaves no checkpoint and makes every rank raise (no hang)."""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.distributed as tdist

from ckpt_helpers import Net, assert_bitwise, draws, read_manifest, recording_calls, simple_run, snapshot
from harness import CheckpointManager, faults
from harness.checkpoint import blobs, direct_read
from harness.checkpoint.discovery import list_checkpoints, verify_checkpoint
from harness.errors import CheckpointError
from harness.storage import Storage
from sharded_helpers import run_ranks

WORLD = 2
TIMEOUT_S = 120


def _seed_rank(rank: int) -> None:
    random.seed(100 + rank)
    np.random.seed(200 + rank)
    torch.manual_seed(300 + rank)


def save_restore_fail_together(rank: int, world: int, url: str) -> dict:
    """Runs on every rank (sharded_helpers.run_ranks)."""
    out: dict = {}
    model, opt, sched = simple_run(seed=0)  # identical on both ranks, as under DDP
    expected = snapshot((model.state_dict(), opt.state_dict()))
    position = {"rank": rank, "cursor": 10 * rank + 3, "order": (rank, "x")}
    mgr = CheckpointManager(url, timeout_s=30)
    _seed_rank(rank)
    mgr.save(5, models=model, optimizers=opt, position=position, rank_state={"r": torch.tensor([rank])},
             loss=0.5)
    after_save = draws()

    # Restore as a restarted job would: other objects, other RNG states.
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    m2 = Net()
    o2 = torch.optim.AdamW(m2.parameters())
    read_keys: list[str] = []
    # Which tensors does each rank read from storage?
    with recording_calls(blobs, "read_tensors", lambda a: read_keys.extend(e.key for e in a["entries"])), \
            recording_calls(direct_read, "read_into", lambda a: read_keys.extend(e.key for e in a["entries"])):
        res = CheckpointManager(url, timeout_s=30).restore(models=m2, optimizers=o2)
    out["replicated_reads"] = sum(k.startswith("state/") for k in read_keys)
    out["own_reads"] = sum(k.startswith(f"ranks/{rank}/") for k in read_keys)
    assert_bitwise(after_save, draws(), f"rank {rank} rng")
    assert_bitwise(expected, (m2.state_dict(), o2.state_dict()), f"rank {rank} state")
    assert_bitwise(position, res.position, f"rank {rank} position")
    assert_bitwise({"r": torch.tensor([rank])}, res.rank_state, f"rank {rank} rank_state")
    assert res.world_size == world == WORLD and res.step == 5
    out["rank_differs"] = after_save[0]  # python draws, compared across ranks by the parent

    # A fault on rank 1 only, while it writes its data file.
    def crash_rank1(name, info):
        if name == "save.data_file" and info.get("rank") == 1 and info.get("step") == 6:
            raise faults.FaultInjected("rank 1 died writing")

    faults.install(crash_rank1)
    try:
        mgr.save(6, models=model, optimizers=opt, position=position)
        out["fault"] = "no error"
    except CheckpointError as exc:
        out["fault"] = f"CheckpointError: {exc}"
    except Exception as exc:  # noqa: BLE001
        out["fault"] = f"{type(exc).__name__}: {exc}"
    finally:
        faults.install(None)
    tdist.barrier()
    out["visible_after_fault"] = [i.name for i in list_checkpoints(Storage(url))]

    # The job goes on: the next save (async this time) commits and restores.
    amgr = CheckpointManager(url, timeout_s=30, async_save=True)
    amgr.save(7, models=model, optimizers=opt, position={"rank": rank, "cursor": 99})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    amgr.close()
    m3 = Net()
    res7 = CheckpointManager(url, timeout_s=30).restore(models=m3)
    assert res7.step == 7 and res7.position == {"rank": rank, "cursor": 99}
    assert_bitwise(expected[0], m3.state_dict(), f"rank {rank} async state")
    return out


def test_two_ranks_save_restore_and_fail_together(tmp_path):
    url = str(tmp_path / "ckpt")
    results = run_ranks(tmp_path, save_restore_fail_together, WORLD, timeout_s=TIMEOUT_S, url=url)
    for res in results:
        assert res["fault"].startswith("CheckpointError:") and "rank 1" in res["fault"], res["fault"]
        assert res["visible_after_fault"] == ["step-000000005"]
    assert results[0]["rank_differs"] != results[1]["rank_differs"]  # each rank got its own RNG back
    # Read once: rank 0 reads (and verifies) the replicated state, rank 1 gets it by broadcast and reads only
    # its own per-rank tensors from storage.
    assert results[0]["replicated_reads"] > 0 and results[1]["replicated_reads"] == 0
    assert results[1]["own_reads"] > 0

    man = read_manifest(url, "step-000000005")
    assert man["world_size"] == WORLD and len(man["ranks"]) == WORLD
    by_rank = {r: {e["key"] for e in man["tensors"] if e["rank"] == r} for r in range(WORLD)}
    assert by_rank[0] and all(k.startswith(("state/", "ranks/0/")) for k in by_rank[0])
    assert by_rank[1] and all(k.startswith("ranks/1/") for k in by_rank[1])  # rank 1 writes only its own
    assert any(k.startswith("state/models/") for k in by_rank[0])
    assert {f for f, info in man["files"].items() if info["rank"] == 1} == {"data-r00001-000.bin"}
    verify_checkpoint(Storage(url), "step-000000005")
    # Read at world size 1: the replicated state loads; rank 0's position comes back.
    m = Net()
    res = CheckpointManager(url).restore(models=m, step=5)
    assert res.world_size == WORLD and res.position["rank"] == 0
