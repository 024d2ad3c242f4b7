"""A GPU failure during restore is not a damaged checkpoint (issue 13, 3): out of memory inside
load_state_dict keeps its type (retryable), on every rank, marks nothing damaged, and the same checkpoint
restores once memory is back. A state that does not fit its object is still a CheckpointError."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as tdist

from ckpt_helpers import Net, assert_bitwise, simple_run, snapshot
from harness import CheckpointError, CheckpointManager, faults
from harness.checkpoint.errors import is_resource_error
from sharded_helpers import run_ranks


def _oom_in_optimizer(name: str, info: dict) -> None:
    if name == "restore.apply" and info["what"] == "optimizer":
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")


def test_resource_errors_are_told_apart():
    assert is_resource_error(torch.OutOfMemoryError("x")) and is_resource_error(MemoryError())
    if hasattr(torch, "AcceleratorError"):
        assert is_resource_error(torch.AcceleratorError("x"))
    assert is_resource_error(tdist.DistBackendError("nccl")) and is_resource_error(ConnectionResetError())
    assert not is_resource_error(RuntimeError("size mismatch")) and not is_resource_error(CheckpointError("x"))


def test_oom_in_load_state_dict_is_retryable_and_marks_nothing_damaged(ckpt_url):
    model, opt, _ = simple_run()
    mgr = CheckpointManager(ckpt_url, keep_last=1)
    mgr.save(5, models=model, optimizers=opt)
    mgr.save(10, models=model, optimizers=opt)
    expected = snapshot((model.state_dict(), opt.state_dict()))

    restarted = CheckpointManager(ckpt_url, keep_last=1)
    m2 = Net()
    o2 = torch.optim.AdamW(m2.parameters(), lr=0.5)
    faults.install(_oom_in_optimizer)
    with pytest.raises(torch.OutOfMemoryError, match="injected") as info:
        restarted.restore(models=m2, optimizers=o2)
    assert not isinstance(info.value, CheckpointError)
    faults.install(None)
    assert restarted._ctx.damaged == set()

    res = restarted.restore(models=m2, optimizers=o2)  # memory is back: the same checkpoint loads
    assert res.name == "step-000000010" and res.skipped == []
    assert_bitwise(expected, (m2.state_dict(), o2.state_dict()))
    restarted.save(15, models=m2, optimizers=o2)  # keep_last=1: step 10 is an ordinary old checkpoint
    assert restarted.latest() == "step-000000015"


def _host_allocation_fails(name: str, info: dict) -> None:
    if name == "restore.apply" and info["what"] == "optimizer":
        torch.empty(1 << 62, dtype=torch.uint8)  # 4 EiB: more than any address space, a real allocator failure


def test_host_memory_refused_in_load_state_dict_is_out_of_memory_not_a_mismatch(ckpt_url):
    """torch's CPU allocator says no with a plain RuntimeError: it was taken for a state that does not fit
    (StateMismatchError, exit 3: needs a human). It is out of memory: retryable, one line, nothing damaged."""
    from harness.exitcodes import classify
    model, opt, _ = simple_run()
    CheckpointManager(ckpt_url).save(5, models=model, optimizers=opt)
    restarted = CheckpointManager(ckpt_url)
    m2 = Net()
    faults.install(_host_allocation_fails)
    try:
        with pytest.raises(RuntimeError, match="DefaultCPUAllocator: can't allocate memory") as info:
            restarted.restore(models=m2, optimizers=torch.optim.AdamW(m2.parameters()))
    finally:
        faults.install(None)
    assert not isinstance(info.value, CheckpointError) and restarted._ctx.damaged == set()
    outcome = classify(info.value)
    assert outcome.code == 1 and outcome.line.startswith("harness: out of host memory (retryable, exit 1): "
                                                         "RuntimeError: "), outcome
    assert classify(MemoryError("numpy")).line == "harness: out of host memory (retryable, exit 1): MemoryError: numpy"


def test_state_that_does_not_fit_is_still_a_checkpoint_error(ckpt_url):
    model, opt, _ = simple_run()
    CheckpointManager(ckpt_url).save(1, models=model, optimizers=opt)
    other = torch.optim.AdamW(list(Net().parameters())[:2])  # 2 parameters, the saved state has 4
    with pytest.raises(CheckpointError, match="optimizer 'optimizer' cannot take the saved state"):
        CheckpointManager(ckpt_url).restore(models=Net(), optimizers=other)


def oom_on_rank1(rank: int, world: int, url: str) -> dict:
    """Runs on every rank: rank 1 runs out of memory loading the optimizer; both ranks must raise it."""
    model, opt, _ = simple_run()
    mgr = CheckpointManager(url, timeout_s=30)
    mgr.save(3, models=model, optimizers=opt)
    m2 = Net()
    o2 = torch.optim.AdamW(m2.parameters())
    if rank == 1:
        faults.install(_oom_in_optimizer)
    try:
        mgr.restore(models=m2, optimizers=o2)
        got = "no error"
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        got = type(exc).__name__
    finally:
        faults.install(None)
    res = mgr.restore(models=m2, optimizers=o2)
    return {"raised": got, "damaged": sorted(mgr._ctx.damaged), "after": res.name}


def test_oom_on_one_rank_is_raised_as_oom_on_every_rank(tmp_path):
    results = run_ranks(tmp_path, oom_on_rank1, 2, url=str(tmp_path / "ck"))
    for r in results:
        assert r["ok"], r.get("error")
        assert r["raised"] == "OutOfMemoryError" and r["damaged"] == [] and r["after"] == "step-000000003"
