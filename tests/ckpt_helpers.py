"""Helpers shared by the checkpoint-core tests (test_ckpt_*.py): models, training steps, bitwise
comparison, byte-level damage and counting the calls at the storage seam."""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import math
import random
import struct
from collections import Counter
from typing import Any, Callable, Iterator
from unittest import mock

import numpy as np
import pytest
import torch
from torch import nn

from harness import faults
from harness.checkpoint.format import COMMIT_FILE, MANIFEST_FILE, dumps, make_commit
from harness.storage import Storage


class Net(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, width)
        self.fc2 = nn.Linear(width, 2)
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        self.calls += 1
        return self.fc2(torch.relu(self.fc1(x)))


class OtherNet(Net):
    """Same parameters as Net, another class: restore warns about the class."""


class Wrapper(nn.Module):
    """A DDP-style wrapper: its only state is the wrapped ``module``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)


def train_step(model: nn.Module, opt, sched=None, seed: int = 0) -> float:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 4, generator=g)
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    if sched is not None:
        sched.step()
    return float(loss.detach())


def simple_run(seed: int = 0, steps: int = 2):
    """A model, optimizer and scheduler after a few steps (optimizer state populated)."""
    torch.manual_seed(seed)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
    for i in range(steps):
        train_step(model, opt, sched, seed=seed * 100 + i)
    return model, opt, sched


def fresh(seed: int = 1234):
    """Objects of the same kind in a different state: a restore must overwrite all of it."""
    torch.manual_seed(seed)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
    return model, opt, sched


def snapshot(obj):
    """A deep copy of a state dict (tensors cloned), to compare with later."""
    return copy.deepcopy(obj)


def _float_bits(x: float) -> bytes:
    return struct.pack("<d", x)


def tensor_bytes(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor as a flat uint8 tensor (on the CPU, lazy conj/neg resolved): what a
    bitwise comparison compares. torch.equal compares values instead, so -0.0 == 0.0 and nan != nan."""
    flat = t.detach().cpu().resolve_conj().resolve_neg().contiguous().reshape(-1)
    return flat.view(torch.uint8)


def assert_bitwise(a, b, path: str = "", ordered_keys: bool = False) -> None:
    """Bit-for-bit equality of two (nested) states, all differences named by their path.

    Tensors: same dtype, same shape, same raw bytes (so -0.0 != 0.0, and a nan equals only the same nan).
    ndarrays likewise. Python floats by their IEEE bits (-0.0 != 0.0), except that any nan equals any nan:
    JSON, which carries the small non-tensor state, keeps the sign of zero but not a nan's payload.
    Everything else: same type and ==. Dict keys must match as sets, or in order with ``ordered_keys``."""
    where = path or "<root>"
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), \
            f"{where}: {type(a).__name__} vs {type(b).__name__}"
        assert a.dtype == b.dtype and a.shape == b.shape, \
            f"{where}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
        assert a.device == b.device or b.device.type == "cpu", f"{where}: device {b.device}"
        ab, bb = tensor_bytes(a), tensor_bytes(b)
        if not torch.equal(ab, bb):  # uint8 vs uint8: byte equality
            first = int((ab != bb).nonzero()[0]) // a.element_size()
            raise AssertionError(f"{where}: tensor bytes differ (first at element {first}: "
                                 f"{a.reshape(-1)[first].item()!r} vs {b.reshape(-1)[first].item()!r})")
        return
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        assert isinstance(a, np.ndarray) and isinstance(b, np.ndarray), \
            f"{where}: {type(a).__name__} vs {type(b).__name__}"
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
        assert a.tobytes() == b.tobytes(), f"{where}: ndarray bytes differ"
        return
    assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, dict):
        same = list(a) == list(b) if ordered_keys else set(a) == set(b)
        assert same, f"{where}: keys {list(a)} vs {list(b)}"
        for k in a:
            assert_bitwise(a[k], b[k], f"{path}/{k!r}", ordered_keys)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise(x, y, f"{path}/{i}", ordered_keys)
    elif isinstance(a, float):
        assert _float_bits(a) == _float_bits(b) or (math.isnan(a) and math.isnan(b)), f"{where}: {a!r} vs {b!r}"
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


@contextlib.contextmanager
def recording_calls(module: Any, name: str, record: Callable[[dict], None]) -> Iterator[None]:
    """Inside the block, every call of ``module.name`` is first shown to ``record`` (its arguments bound to
    their parameter names), then runs for real. The original is put back on exit whatever happens
    (mock.patch.object), also in spawned ranks where pytest's monkeypatch does not exist. A spy on which
    calls happen, never a replacement of the code under test."""
    real = getattr(module, name)
    signature = inspect.signature(real)

    def spy(*args, **kwargs):
        record(dict(signature.bind(*args, **kwargs).arguments))
        return real(*args, **kwargs)

    with mock.patch.object(module, name, spy):
        yield


def draws(n: int = 4):
    """The next draws of every RNG the checkpoint restores."""
    return ([random.random() for _ in range(n)], np.random.rand(n).tolist(), torch.rand(n),
            random.gauss(0, 1), torch.randint(0, 1 << 30, (n,)))


# -- byte-level access to a checkpoint folder --------------------------------------------------------

def ckpt_names(url: str) -> list[str]:
    return [n for n in Storage(url).listdir() if n.startswith("step-")]


def read_manifest(url: str, name: str) -> dict:
    return json.loads(Storage(url).read_bytes(f"{name}/{MANIFEST_FILE}"))


def write_manifest(url: str, name: str, manifest: dict, raw: bytes | None = None,
                   commit_from: dict | None = None) -> None:
    """Replace manifest and commit record by hand-made ones whose checksums match (a crafted checkpoint).
    The commit record's summary comes from ``commit_from`` when given (else from ``manifest``)."""
    st = Storage(url)
    raw = dumps(manifest) if raw is None else raw
    st.write_bytes(f"{name}/{MANIFEST_FILE}", raw)
    st.write_bytes(f"{name}/{COMMIT_FILE}", make_commit(commit_from or manifest, raw))


def data_files(url: str, name: str) -> list[str]:
    return [n for n in Storage(url).listdir(name) if n.startswith("data-")]


def flip_byte(url: str, rel: str, offset: int) -> None:
    st = Storage(url)
    data = bytearray(st.read_bytes(rel))
    data[offset] ^= 0x40
    st.write_bytes(rel, bytes(data))


def save_killed_before_commit(mgr: Any, step: int, **objects: Any) -> None:
    """A save of ``step`` killed just before its commit record (through the fault seam): it leaves an
    uncommitted folder, as a job killed at that moment would."""
    def killed(point: str, info: dict) -> None:
        if point == "save.before_commit" and info.get("step") == step:
            raise faults.FaultInjected("killed before the commit record")
    faults.install(killed)
    try:
        with pytest.raises(Exception, match="killed before the commit record"):
            mgr.save(step, **objects)
            mgr.wait()
    finally:
        faults.install(None)


# -- counting calls at the storage seam ---------------------------------------------------------------

class Counting:
    """The real backend, every call passed through as it is and recorded as (method, path relative to the
    checkpoint folder). Installed in place of ``Storage.backend``: the seam every storage call goes through."""

    def __init__(self, inner: Any, root: str) -> None:
        self.inner, self.root, self.calls = inner, root.rstrip("/") + "/", []

    def __getattr__(self, method: str) -> Any:
        real = getattr(self.inner, method)

        def counted(*args, **kwargs):
            path = args[0] if args and isinstance(args[0], str) else ""
            self.calls.append((method, path[len(self.root):] if path.startswith(self.root) else path))
            return real(*args, **kwargs)
        return counted

    def count(self) -> Counter:
        return Counter(m for m, _ in self.calls)

    def reads_of(self, fname: str) -> list[str]:
        """Folders whose ``fname`` was read, in order."""
        return [p.rsplit("/", 1)[0] for m, p in self.calls if m in ("read", "open_read") and p.endswith(f"/{fname}")]


def counting(storage: Storage) -> Counting:
    storage.backend = Counting(storage.backend, storage.root)
    return storage.backend
