"""Two real processes (gloo, file:// rendezvous): every rank saves, rank 0 writes the replicated state,
each rank its own RNG and data position, restore hands each rank its own back, and a failure on one rank
leaves no checkpoint and makes every rank raise (no hang)."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest
import torch
import torch.distributed as tdist

from ckpt_helpers import (Net, assert_bitwise, draws, flip_byte, read_manifest, recording_calls, simple_run,
                          snapshot)
from harness import CheckpointManager, faults
from harness.checkpoint import blobs, direct_read
from harness.checkpoint.restore import SHIP_BYTES
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
    # One machine, one local folder: rank 1 reads (and verifies) the replicated state itself once rank 0 chose
    # the checkpoint, from the page cache rank 0's read filled, instead of receiving it through gloo.
    assert results[0]["replicated_reads"] > 0 and results[1]["replicated_reads"] == results[0]["replicated_reads"]
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


def restore_reads(rank: int, world: int, url: str, damage_on_rank1: bool = False, own_bytes: int = 8) -> dict:
    """Runs on every rank: save steps 1 and 2 (rank-specific RNG), restore into fresh objects; which keys each
    rank read from storage, and whether it ended bitwise at the state of the step it restored."""
    model, opt, _ = simple_run(seed=0)
    states = {}
    mgr = CheckpointManager(url, timeout_s=30)
    for step in (1, 2):
        with torch.no_grad():
            next(model.parameters()).add_(1.0)
        mgr.save(step, models=model, optimizers=opt, rank_state={"r": torch.tensor([rank, step]),
                                                                 "pad": torch.full((own_bytes,), rank, dtype=torch.uint8)})
        states[step] = snapshot((model.state_dict(), opt.state_dict()))
    mgr.close()

    def flip_before_rank1_reads(point: str, info: dict) -> None:
        """The newest checkpoint's data changes on disk after rank 0 verified it, before rank 1 reads it."""
        if point == "restore.read" and info["rank"] == 1 and info["name"] == "step-000000002":
            man = read_manifest(url, "step-000000002")
            e = max((e for e in man["tensors"] if e["key"].startswith("state/")), key=lambda e: e["length"])
            flip_byte(url, f"step-000000002/{e['file']}", e["offset"] + e["length"] // 2)

    m2 = Net()
    o2 = torch.optim.AdamW(m2.parameters())
    keys: list[str] = []
    faults.install(flip_before_rank1_reads if damage_on_rank1 else None)
    try:
        with recording_calls(blobs, "read_tensors", lambda a: keys.extend(e.key for e in a["entries"])), \
                recording_calls(direct_read, "read_into", lambda a: keys.extend(e.key for e in a["entries"])):
            res = CheckpointManager(url, timeout_s=30).restore(models=m2, optimizers=o2)
    finally:
        faults.install(None)
    assert_bitwise(states[res.step], (m2.state_dict(), o2.state_dict()), f"rank {rank} state")
    assert_bitwise({"r": torch.tensor([rank, res.step]), "pad": torch.full((own_bytes,), rank, dtype=torch.uint8)},
                   res.rank_state, f"rank {rank} rank_state")
    return {"step": res.step, "skipped": res.skipped, "replicated": sum(k.startswith("state/") for k in keys),
            "own": sum(k.startswith(f"ranks/{rank}/") for k in keys)}


@pytest.mark.parametrize("own_bytes", [8, SHIP_BYTES + 1])
def test_restore_from_s3_reads_replicated_state_once_and_broadcasts_it(tmp_path, s3_url, own_bytes):
    """Not a local folder: the replicated state is read (and verified) once, by rank 0, and reaches rank 1
    through the process group; so does rank 1's own state (RNG, cursor), which rank 0 reads to verify it
    anyway, unless it is larger than SHIP_BYTES: then rank 1 downloads only that."""
    r0, r1 = run_ranks(tmp_path, restore_reads, WORLD, timeout_s=TIMEOUT_S, url=s3_url, own_bytes=own_bytes)
    assert r0["step"] == r1["step"] == 2
    assert r0["replicated"] > 0 and r1["replicated"] == 0
    assert (r1["own"] > 0) == (own_bytes > SHIP_BYTES)  # its RNG state, "r" and "pad", from storage or not


def test_damage_found_by_a_rank_reading_the_shared_folder_walks_every_rank_back(tmp_path):
    """One machine, local folder: rank 1 reads the replicated state itself, so it verifies it itself; a byte
    changed on disk after rank 0 checked it is damage, found by rank 1, and every rank walks back together."""
    r0, r1 = run_ranks(tmp_path, restore_reads, WORLD, timeout_s=TIMEOUT_S, url=str(tmp_path / "ck"),
                       damage_on_rank1=True)
    assert r0["step"] == r1["step"] == 1
    for r in (r0, r1):
        assert [n for n, _ in r["skipped"]] == ["step-000000002"] and "checksum mismatch" in r["skipped"][0][1]
    assert r1["replicated"] == r0["replicated"] > 0  # each rank read both candidates' replicated state


def save_two_steps(rank: int, world: int, url: str) -> dict:
    """Runs on every rank: steps 1 and 2 saved, each rank with its own state."""
    model, opt, _ = simple_run(seed=0)
    mgr = CheckpointManager(url, timeout_s=30)
    for step in (1, 2):
        mgr.save(step, models=model, optimizers=opt, rank_state={"r": torch.tensor([rank, step])})
    mgr.close()
    return {}


def restore_fresh(rank: int, world: int, url: str) -> dict:
    m = Net()
    res = CheckpointManager(url, timeout_s=30).restore(models=m, optimizers=torch.optim.AdamW(m.parameters()))
    return {"step": res.step, "skipped": res.skipped, "rank_state": res.rank_state["r"].tolist()}


def test_the_state_of_ranks_a_smaller_run_lacks_is_still_verified(tmp_path):
    """Saved by 3 ranks, restored by 2 from a shared local folder: no rank reads rank 2's own state, so rank 0
    verifies it; a damaged byte there makes the checkpoint damaged for everyone, who walk back together."""
    url = str(tmp_path / "ck")
    run_ranks(tmp_path, save_two_steps, 3, timeout_s=TIMEOUT_S, url=url)
    man = read_manifest(url, "step-000000002")
    e = next(e for e in man["tensors"] if e["key"].startswith("ranks/2/"))
    flip_byte(url, f"step-000000002/{e['file']}", e["offset"] + e["length"] // 2)
    results = run_ranks(tmp_path, restore_fresh, WORLD, timeout_s=TIMEOUT_S, url=url)
    for rank, res in enumerate(results):
        assert res["step"] == 1 and res["rank_state"] == [rank, 1], res
        assert [n for n, _ in res["skipped"]] == ["step-000000002"] and "checksum mismatch" in res["skipped"][0][1]


def call_on_rank0_only(rank: int, world: int, url: str, what: str) -> dict:
    """The torch.save habit, `if rank == 0:` around the manager (``what="construct"``), around save or around
    restore: rank 0 waits in the first collective."""
    import logging
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    logging.getLogger("harness").addHandler(handler)
    mgr = CheckpointManager(url, timeout_s=4) if what != "construct" else None
    t0 = time.monotonic()
    error = ""
    if rank == 0:
        try:
            mgr = mgr or CheckpointManager(url, timeout_s=4)
            mgr.restore(models=Net()) if what == "restore" else mgr.save(1, models=Net())
        except Exception as exc:  # noqa: BLE001 - the gloo or store timeout, whatever its type
            error = f"{type(exc).__name__}: {exc}"
    else:
        time.sleep(6)  # alive, just never calling it
    return {"error": error, "seconds": time.monotonic() - t0, "warned": [m for m in records if "collective" in m]}


@pytest.mark.parametrize("what, call", [("save", "CheckpointManager.save(step=1)"),
                                        ("construct", "CheckpointManager(...)"),
                                        ("restore", "CheckpointManager.restore()")])
def test_a_collective_called_on_one_rank_only_says_so_before_it_times_out(tmp_path, what, call):
    """It waited silently for checkpoint.timeout_s (10 minutes by default), then failed with a transport or
    store timeout that says nothing about the cause."""
    r0, r1 = run_ranks(tmp_path, call_on_rank0_only, WORLD, timeout_s=TIMEOUT_S, url=str(tmp_path / "ck"),
                       what=what)
    assert r0["error"] and r0["seconds"] < 30, r0
    assert r0["warned"] == [f"rank 0 has waited 1 s for the other ranks in {call}: they are slow to get there, or "
                            "do not call it; it is collective, every rank must call it (a rank that never does makes "
                            "this one fail when its timeout, 4 s, runs out)"], r0
    assert r1["warned"] == []
