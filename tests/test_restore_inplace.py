"""Restore reads straight into the live tensors (harness/checkpoint/restore.py with direct_read): parameters,
buffers and existing optimizer state keep their memory; optimizer state that did not exist is allocated once
and kept by load_state_dict; a damaged newest checkpoint walks back into the same tensors; peak extra host
memory stays far below the state's size; two ranks receive the broadcast into their live tensors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from unittest import mock

import pytest
import torch
from torch import nn

from ckpt_helpers import assert_bitwise, flip_byte, read_manifest, snapshot
from harness import CheckpointManager
from harness.checkpoint import direct_read
from harness.errors import CheckpointError
from sharded_helpers import run_ranks


class Model(nn.Module):
    """Small tensors (coalesced), one large one (streamed), a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.big = nn.Linear(8, 40000)
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        self.count += 1
        return self.big(torch.relu(self.a(x))).mean()


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    for i in range(steps):
        opt.zero_grad()
        model(torch.randn(3, 4, generator=torch.Generator().manual_seed(seed + i))).backward()
        opt.step()


def _built(seed: int, steps: int):
    torch.manual_seed(seed)
    model = Model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, opt, steps, seed)
    return model, opt


def _ptrs(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    out = {f"m/{k}": t.data_ptr() for k, t in model.state_dict().items()}
    out.update({f"o/{i}/{k}": t.data_ptr() for i, s in enumerate(opt.state.values()) for k, t in s.items()})
    return out


class _Returns:
    """A spy on direct_read.read_into that keeps what each call returned (the call itself runs for real)."""

    def __init__(self) -> None:
        self.real, self.results = direct_read.read_into, []

    def __call__(self, *args, **kwargs):
        got = self.real(*args, **kwargs)
        self.results.append(got)
        return got


def test_restore_fills_live_tensors_in_place(tmp_path):
    model, opt = _built(seed=0, steps=3)
    expected = snapshot((model.state_dict(), opt.state_dict()))
    mgr = CheckpointManager(str(tmp_path / "ck"))
    mgr.save(3, models=model, optimizers=opt)

    m2, o2 = _built(seed=7, steps=1)  # optimizer state exists: filled in place too
    before = _ptrs(m2, o2)
    mgr.restore(models=m2, optimizers=o2)
    assert _ptrs(m2, o2) == before
    assert_bitwise(expected, (m2.state_dict(), o2.state_dict()), "restored")

    # A fresh optimizer: its state is allocated by the read, once, and load_state_dict keeps those tensors.
    m3 = Model()
    o3 = torch.optim.AdamW(m3.parameters(), lr=1e-2)
    params = {k: p.data_ptr() for k, p in m3.named_parameters()}
    spy = _Returns()
    with mock.patch.object(direct_read, "read_into", spy):
        mgr.restore(models=m3, optimizers=o3)
    assert {k: p.data_ptr() for k, p in m3.named_parameters()} == params
    got = spy.results[0]
    for i, state in enumerate(o3.state.values()):
        for k, t in state.items():
            assert t.data_ptr() == got[f"state/optimizers/optimizer/state/{i}/{k}"].data_ptr(), (i, k)
    assert_bitwise(expected, (m3.state_dict(), o3.state_dict()), "restored into a fresh optimizer")
    mgr.close()


def test_other_dtype_model_is_cast_by_load_state_dict(tmp_path):
    """A live tensor of another dtype is not a destination: load_state_dict casts, as before."""
    model, opt = _built(seed=0, steps=1)
    mgr = CheckpointManager(str(tmp_path / "ck"))
    mgr.save(1, models=model)
    m2 = Model().double()
    mgr.restore(models=m2)
    assert torch.equal(m2.big.weight, model.big.weight.double())
    mgr.close()


@pytest.mark.parametrize("where", ["state/models/model/big.weight", "ranks/0/rng"])
def test_damaged_newest_walks_back_into_the_same_tensors(tmp_path, where):
    url = str(tmp_path / "ck")
    model, opt = _built(seed=0, steps=2)
    mgr = CheckpointManager(url, keep_last=5)
    mgr.save(2, models=model, optimizers=opt)
    expected = snapshot((model.state_dict(), opt.state_dict()))
    _train(model, opt, 2, seed=50)
    mgr.save(4, models=model, optimizers=opt)
    names = sorted(n for n in os.listdir(url) if n.startswith("step-"))
    entries = read_manifest(url, names[-1])["tensors"]
    entry = next(e for e in entries if e["key"].startswith(where))
    flip_byte(url, f"{names[-1]}/{entry['file']}", entry["offset"] + entry["length"] - 1)

    m2, o2 = _built(seed=9, steps=1)
    before = _ptrs(m2, o2)
    res = mgr.restore(models=m2, optimizers=o2)
    assert res.step == 2 and [n for n, _ in res.skipped] == [names[-1]]
    assert _ptrs(m2, o2) == before
    assert_bitwise(expected, (m2.state_dict(), o2.state_dict()), "walked back")
    mgr.close()


def test_walk_back_that_cannot_overwrite_the_live_tensors_fails(tmp_path):
    """The newest checkpoint has optimizer state, the older one none: a failed read of the newest leaves the
    live optimizer state undefined and the older one cannot overwrite it, so restore refuses to go on."""
    url = str(tmp_path / "ck")
    torch.manual_seed(0)
    model = Model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    mgr = CheckpointManager(url, keep_last=5)
    mgr.save(0, models=model, optimizers=opt)  # no optimizer state yet
    _train(model, opt, 2, seed=0)
    mgr.save(2, models=model, optimizers=opt)
    newest = sorted(n for n in os.listdir(url) if n.startswith("step-"))[-1]
    entries = read_manifest(url, newest)["tensors"]
    entry = next(e for e in entries if e["key"].startswith("ranks/0/"))  # found after the live tensors are filled
    flip_byte(url, f"{newest}/{entry['file']}", entry["offset"])

    m2, o2 = _built(seed=9, steps=1)
    with pytest.raises(CheckpointError, match="undefined bytes"):
        mgr.restore(models=m2, optimizers=o2)
    m3 = Model()  # no live optimizer state to strand: the walk back works
    o3 = torch.optim.AdamW(m3.parameters(), lr=1e-2)
    assert mgr.restore(models=m3, optimizers=o3).step == 0 and not o3.state
    mgr.close()


_PEAK_SCRIPT = textwrap.dedent("""
    import gc, json, sys
    import torch
    from torch import nn
    from harness import CheckpointManager

    def status(field):
        line = next(x for x in open("/proc/self/status") if x.startswith(field + ":"))
        return int(line.split()[1]) * 1024

    torch.manual_seed(1)
    model = nn.Sequential(*[nn.Linear(2048, 2048) for _ in range(4)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    for p in model.parameters():
        p.grad = None
    mgr = CheckpointManager(sys.argv[1])
    gc.collect()
    open("/proc/self/clear_refs", "w").write("5")  # reset the RSS high-water mark to the current RSS
    base = status("VmRSS")
    mgr.restore(models=model, optimizers=opt)
    print(json.dumps({"extra": status("VmHWM") - base}))
""")


def test_peak_extra_host_memory_is_far_below_the_state(tmp_path):
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs /proc/self/clear_refs to reset the RSS high-water mark")
    url = str(tmp_path / "ck")
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(2048, 2048) for _ in range(4)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    opt.step()
    state_bytes = 3 * sum(p.numel() * p.element_size() for p in model.parameters())  # ~200 MB
    mgr = CheckpointManager(url)
    mgr.save(1, models=model, optimizers=opt)
    mgr.close()
    del model, opt
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, url], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    extra = json.loads(out.stdout.strip().splitlines()[-1])["extra"]
    # Before: a second copy of the whole state. Now: coalescing padding, the manifest, the RNG states.
    assert extra < state_bytes // 8, f"restore of {state_bytes >> 20} MiB used {extra >> 20} MiB extra"


def broadcast_into_live(rank: int, world: int, url: str) -> dict:
    """Runs on every rank (run_ranks): rank 1 gets the replicated state by broadcast, straight into its
    parameters (a non-contiguous one through a temporary) and existing optimizer state."""
    model, opt = _built(seed=0, steps=2)
    expected = snapshot((model.state_dict(), opt.state_dict()))
    mgr = CheckpointManager(url, timeout_s=30)
    mgr.save(2, models=model, optimizers=opt)
    m2, o2 = _built(seed=5 + rank, steps=1)
    with torch.no_grad():
        m2.a.weight = nn.Parameter(torch.zeros(4, 8).t())  # non-contiguous live parameter
    o2 = torch.optim.AdamW(m2.parameters(), lr=1e-2)
    _train(m2, o2, 1, seed=5)
    before = _ptrs(m2, o2)
    mgr.restore(models=m2, optimizers=o2)
    assert _ptrs(m2, o2) == before
    assert not m2.a.weight.is_contiguous()
    assert_bitwise(expected, (m2.state_dict(), o2.state_dict()), f"rank {rank}")
    mgr.close()
    return {}


def test_two_ranks_receive_the_broadcast_into_live_tensors(tmp_path):
    run_ranks(tmp_path, broadcast_into_live, 2, url=str(tmp_path / "ck"))
