"""Per-rank scenarios for tests/test_sharded_*.py (run by sharded_helpers.run_ranks in each rank's process)."""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch
import torch.distributed as tdist
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel as DDP

from ckpt_helpers import assert_bitwise, recording_calls
from harness import CheckpointManager, faults
from harness.checkpoint import blobs, sharded
from harness.checkpoint.discovery import list_checkpoints
from harness.errors import CheckpointError
from harness.storage import Storage
from sharded_helpers import FNet, ZNet, batch

LR = 1e-2


# -- ZeRO -----------------------------------------------------------------------------------------------

def _zero_setup(seed: int, width: int = 16):
    torch.manual_seed(seed)
    model = DDP(ZNet(width))
    zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=LR, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.StepLR(zero, step_size=1, gamma=0.9)
    return model, zero, sched


def _zero_step(model, zero, sched, step: int, rank: int, plain=None) -> None:
    x, y = batch(step, rank)
    zero.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    if plain is not None:  # the unsharded twin: same params, same (all-reduced) grads
        pm, popt, psched = plain
        for p, q in zip(model.parameters(), pm.parameters()):
            q.grad = p.grad.clone()
        popt.step()
        psched.step()
    zero.step()
    sched.step()


@contextlib.contextmanager
def _record_reads() -> Iterator[list]:
    """Record the entries (and row ranges) this process reads from storage inside the block."""
    seen: list = []
    with recording_calls(blobs, "read_entries", lambda a: seen.extend(a["entries"])), \
            recording_calls(blobs, "read_rows", lambda a: seen.append((a["e"], a["r0"], a["r1"]))):
        yield seen


def zero_save(rank: int, world: int, url: str, ref: str, split: bool = False) -> dict:
    """Train 3 steps under DDP + ZeRO (and an unsharded twin), save, fail a save on rank 1, train 2 more."""
    model, zero, sched = _zero_setup(0)
    pm = copy.deepcopy(model.module)
    popt = torch.optim.AdamW(pm.parameters(), lr=LR, weight_decay=0.01)
    psched = torch.optim.lr_scheduler.StepLR(popt, step_size=1, gamma=0.9)
    for step in range(1, 4):
        _zero_step(model, zero, sched, step, rank, (pm, popt, psched))
    mgr = CheckpointManager(url, timeout_s=30, split_replicated=split)
    mgr.save(3, models=model, optimizers=zero, schedulers=sched, position={"rank": rank})
    out = {}
    # torch's own consolidation, for comparison (collective)
    zero.consolidate_state_dict(to=0)
    if rank == 0:
        state, per_rank = sharded.consolidate(Storage(url), "step-000000003")
        assert_bitwise(zero.state_dict(), state["optimizers"]["optimizer"], "vs ZeRO's consolidation")
        assert_bitwise(popt.state_dict(), state["optimizers"]["optimizer"], "vs unsharded AdamW")
        assert_bitwise(dict(pm.state_dict()), state["models"]["model"], "model vs unsharded twin")
        torch.save({"model": dict(model.module.state_dict()), "opt": zero.state_dict(),
                    "sched": sched.state_dict()}, f"{ref}-step3.pt")
        out["ranks_in_manifest"] = len(per_rank)

    # rank 1 dies while writing its shard at step 4: nothing from that attempt is visible
    def crash(name, info):
        if name == "save.data_file" and info.get("rank") == 1 and info.get("step") == 4:
            raise faults.FaultInjected("rank 1 died writing its shard")

    faults.install(crash)
    try:
        mgr.save(4, models=model, optimizers=zero, schedulers=sched)
        out["fault"] = "no error"
    except CheckpointError as exc:
        out["fault"] = f"CheckpointError: {exc}"
    finally:
        faults.install(None)
    tdist.barrier()
    out["visible"] = [i.name for i in list_checkpoints(Storage(url))]
    for step in range(4, 6):
        _zero_step(model, zero, sched, step, rank)
    if rank == 0:
        torch.save(dict(model.module.state_dict()), f"{ref}-final.pt")
    mgr.close()
    return out


def zero_restore(rank: int, world: int, url: str, ref: str, saved_world: int, continue_steps: bool,
                 mismatch: bool = False) -> dict:
    """Restore at this world size into fresh objects; check model, this rank's owned optimizer state and the
    reads; at the saving world size train on and compare with the uninterrupted run."""
    model, zero, sched = _zero_setup(1234)
    with _record_reads() as seen:
        res = CheckpointManager(url, timeout_s=30).restore(models=model, optimizers=zero, schedulers=sched)
    assert res is not None and res.step == 3 and res.name == "step-000000003", res
    expect = torch.load(f"{ref}-step3.pt", weights_only=True)
    assert_bitwise(expect["model"], dict(model.module.state_dict()), "model")
    assert sched.state_dict() == expect["sched"]
    owned = sharded.zero_owned(zero)
    got = sharded.zero_local_state(zero)
    assert set(got) == owned and owned, (sorted(got), sorted(owned))
    for gidx in owned:
        assert_bitwise(expect["opt"]["state"][gidx], got[gidx], f"optimizer state of param {gidx}")
    for g, eg in zip(zero.param_groups, expect["opt"]["param_groups"]):
        assert g["lr"] == eg["lr"]
    opt_reads = {e.key for e in seen if not isinstance(e, tuple) and e.key.startswith("state/optimizers/")}
    wanted = {k for k in opt_reads if "/state/" in k}
    read_gidx = {int(k.split("/")[4]) for k in wanted}
    out = {"owned": sorted(owned), "read_gidx": sorted(read_gidx),
           "read_writers": sorted({e.rank for e in seen if not isinstance(e, tuple)
                                   and e.key.startswith("state/optimizers/optimizer/state/")})}
    if continue_steps:
        for step in range(4, 6):
            _zero_step(model, zero, sched, step, rank)
        assert_bitwise(torch.load(f"{ref}-final.pt", weights_only=True), dict(model.module.state_dict()),
                       "after training on")
        out["continued"] = True
    if mismatch:
        out["mismatch"] = zero_mismatch(rank, world, url)["error"]
    return out


def zero_mismatch(rank: int, world: int, url: str) -> dict:
    model, zero, sched = _zero_setup(5, width=12)
    try:
        CheckpointManager(url, timeout_s=30).restore(models=model, optimizers=zero, schedulers=sched)
        return {"error": None}
    except CheckpointError as exc:
        return {"error": str(exc)}


# -- FSDP2 ----------------------------------------------------------------------------------------------

def _fsdp_setup(seed: int, width: int = 13, shard: bool = True):
    from harness import torchcompat
    fully_shard = torchcompat.fully_shard()  # torch >= 2.6, else a ConfigError
    torch.manual_seed(seed)
    model = FNet(width)
    if shard:
        for b in model.blocks:
            fully_shard(b)
        fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    return model, opt


def _fsdp_step(model, opt, step: int, rank: int) -> None:
    x, y = batch(step, rank, d_out=3)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def _full(sd: dict) -> dict:
    """A state dict with DTensors gathered to full tensors (collective)."""
    out = {}
    for k, v in sd.items():
        if isinstance(v, dict):
            out[k] = _full(v)
        elif sharded.codec.is_dtensor(v):
            out[k] = v.full_tensor()
        else:
            out[k] = v
    return out


def fsdp_save(rank: int, world: int, url: str, ref: str, chunk_bytes: int) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model, opt = _fsdp_setup(0)
    for step in range(1, 4):
        _fsdp_step(model, opt, step, rank)
    mgr = CheckpointManager(url, timeout_s=30, shard_chunk_bytes=chunk_bytes)
    mgr.save(3, models=model, optimizers=opt, position={"rank": rank})
    full_m = _full(get_model_state_dict(model))
    full_o = _full(get_optimizer_state_dict(model, opt)["state"])
    out = {}

    def crash(name, info):
        if name == "save.data_file" and info.get("rank") == world - 1 and info.get("step") == 4:
            raise faults.FaultInjected("last rank died writing its shard")

    faults.install(crash)
    try:
        mgr.save(4, models=model, optimizers=opt)
        out["fault"] = "no error"
    except CheckpointError as exc:
        out["fault"] = f"CheckpointError: {exc}"
    finally:
        faults.install(None)
    tdist.barrier()
    out["visible"] = [i.name for i in list_checkpoints(Storage(url))]
    if rank == 0:
        torch.save({"model": full_m, "opt": full_o}, f"{ref}-fsdp3.pt")
        state, _ = sharded.consolidate(Storage(url), "step-000000003")
        assert_bitwise(full_m, state["models"]["model"], "consolidated model")
        cons = state["optimizers"]["optimizer"]
        names = list(full_o)
        for i, n in enumerate(names):
            assert_bitwise(full_o[n], cons["state"][i], f"consolidated optimizer state {n}")
    for step in range(4, 6):
        _fsdp_step(model, opt, step, rank)
    final = _full(get_model_state_dict(model))
    if rank == 0:
        torch.save(final, f"{ref}-fsdp-final.pt")
    mgr.close()
    return out


def fsdp_restore(rank: int, world: int, url: str, ref: str, saved_world: int, shard: bool = True,
                 mismatch: bool = False) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model, opt = _fsdp_setup(77, shard=shard)
    with _record_reads() as seen:
        res = CheckpointManager(url, timeout_s=30).restore(models=model, optimizers=opt)
    assert res is not None and res.step == 3, res
    expect = torch.load(f"{ref}-fsdp3.pt", weights_only=True)
    if shard:
        assert_bitwise(expect["model"], _full(get_model_state_dict(model)), "model")
        assert_bitwise(expect["opt"], _full(get_optimizer_state_dict(model, opt)["state"]), "optimizer")
    else:  # a plain model and optimizer: full tensors, the optimizer state re-keyed by parameter index
        assert_bitwise(expect["model"], dict(model.state_dict()), "model")
        got = opt.state_dict()["state"]
        for i, n in enumerate(expect["opt"]):
            assert_bitwise(expect["opt"][n], got[i], f"optimizer state {n}")
    bytes_read = sum(e.length if not isinstance(e, tuple) else (e[2] - e[1]) * (e[0].length // e[0].shape[0])
                     for e in seen)
    out = {"bytes_read": bytes_read, "row_reads": sum(isinstance(e, tuple) for e in seen)}
    if shard and world == saved_world:
        for step in range(4, 6):
            _fsdp_step(model, opt, step, rank)
        assert_bitwise(torch.load(f"{ref}-fsdp-final.pt", weights_only=True), _full(get_model_state_dict(model)),
                       "after training on")
        out["continued"] = True
    if mismatch:
        out["mismatch"] = fsdp_mismatch(rank, world, url)["error"]
    return out


def fsdp_mismatch(rank: int, world: int, url: str) -> dict:
    model, opt = _fsdp_setup(5, width=11)
    try:
        CheckpointManager(url, timeout_s=30).restore(models=model, optimizers=opt)
        return {"error": None}
    except CheckpointError as exc:
        return {"error": str(exc)}


# -- split writes ---------------------------------------------------------------------------------------

def split_save(rank: int, world: int, url: str, split: bool, size: int, repeats: int = 1) -> dict:
    """Save a replicated state (the same on every rank) ``repeats`` times; time each save."""
    import time

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(size, size) for _ in range(8)])
    mgr = CheckpointManager(url, timeout_s=120, split_replicated=split, keep_last=1)
    times = []
    for i in range(repeats):
        tdist.barrier()
        t0 = time.perf_counter()
        mgr.save(i + 1, models=model)
        tdist.barrier()
        times.append(time.perf_counter() - t0)
    mgr.close()
    return {"times": times, "bytes": sum(p.numel() * p.element_size() for p in model.state_dict().values())}


# -- torch.distributed.checkpoint folders for the importer ---------------------------------------------

def dcp_fsdp_save(rank: int, world: int, url: str, ref: str) -> dict:
    """What a torchtitan-style FSDP2 job leaves: ``dcp.save`` of sharded model and optimizer state (one chunk
    per rank for every DTensor), and on rank 0 the full state as torch.save for the parent to compare with."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model, opt = _fsdp_setup(0)
    for step in range(1, 4):
        _fsdp_step(model, opt, step, rank)
    msd, osd = get_model_state_dict(model), get_optimizer_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd, "step": 3}, checkpoint_id=url)
    full = {"model": _full(msd), "optim": _full(osd["state"])}
    if rank == 0:
        torch.save(full, ref)
    return {"sharded": [k for k, v in msd.items() if sharded.codec.is_dtensor(v)]}


def accelerate_fsdp_save(rank: int, world: int, folder: str, ref: str) -> dict:
    """What ``accelerator.save_state`` leaves under FSDP with SHARDED_STATE_DICT: DCP folders
    ``pytorch_model_fsdp_0`` ({"model": ...}) and ``optimizer_0`` ({"optimizer": ...}, keyed by parameter
    name), the scheduler's state and one RNG file per process; the full state on rank 0 for comparison."""
    import os
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model, opt = _fsdp_setup(0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    for step in range(1, 4):
        _fsdp_step(model, opt, step, rank)
        sched.step()
    msd, osd = get_model_state_dict(model), get_optimizer_state_dict(model, opt)
    dcp.save({"model": msd}, checkpoint_id=os.path.join(folder, "pytorch_model_fsdp_0"))
    dcp.save({"optimizer": osd}, checkpoint_id=os.path.join(folder, "optimizer_0"))
    torch.save({"step": 3, "torch_manual_seed": torch.get_rng_state()},
               os.path.join(folder, f"random_states_{rank}.pkl"))
    full = {"model": _full(msd), "optim": _full(osd["state"])}
    if rank == 0:
        torch.save(sched.state_dict(), os.path.join(folder, "scheduler.bin"))
        torch.save(full, ref)
    return {}
