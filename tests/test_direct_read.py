"""Reading a checkpoint straight into live tensors (harness/checkpoint/direct_read.py): bitwise equal to what
was saved, in place, verified on the same pass, on local disk and memory://."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from torch import nn

from harness import CheckpointManager
from harness.checkpoint import blobs, direct_cuda, direct_io, direct_read
from harness.checkpoint.destinations import destinations
from harness.checkpoint.direct_read import ReadStats, read_into, verify_entries
from harness.checkpoint.discovery import list_checkpoints, open_checkpoint
from harness.errors import CheckpointCorruptError, CheckpointError
from harness.storage import Storage


class Model(nn.Module):
    """Small tensors (coalesced), one over direct_read.SMALL_BYTES (streamed), a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 8)
        self.big = nn.Linear(8, 40000)  # 320000 floats: 1.28 MB
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        self.count += 1
        return self.big(torch.relu(self.b(torch.relu(self.a(x))))).mean()


def _trained(seed: int = 0, steps: int = 2):
    torch.manual_seed(seed)
    model = Model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for i in range(steps):
        opt.zero_grad()
        model(torch.randn(3, 4, generator=torch.Generator().manual_seed(i))).backward()
        opt.step()
    return model, opt


def _raw(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.fixture(scope="module")
def _master(tmp_path_factory):
    """One checkpoint saved by CheckpointManager (saving takes seconds), kept as bytes: each test gets a copy."""
    model, opt = _trained()
    url = str(tmp_path_factory.mktemp("master") / "ckpt")
    mgr = CheckpointManager(url, keep_last=2)
    mgr.save(2, models={"model": model}, optimizers={"optimizer": opt})
    mgr.wait()
    mgr.close()
    storage = Storage(url)
    name = list_checkpoints(storage)[-1].name
    files = {f: storage.read_bytes(f"{name}/{f}") for f in storage.listdir(name)}
    return name, files, model, opt


@pytest.fixture
def saved(_master, ckpt_url):
    """(storage, checkpoint name, manifest, the saved model and optimizer), on local disk or memory://."""
    name, files, model, opt = _master
    storage = Storage(ckpt_url)
    storage.makedirs(name)
    for f, data in files.items():
        if f != "COMMIT":
            storage.write_bytes(f"{name}/{f}", data)
    storage.commit_bytes(f"{name}/COMMIT", files["COMMIT"])
    return storage, name, open_checkpoint(storage, name), model, opt


def _entries(manifest, prefix: str = "state/"):
    return [e for e in manifest.tensors.values() if e.key.startswith(prefix)]


def _flip(storage: Storage, name: str, entry, at: int = 0) -> None:
    rel = f"{name}/{entry.file}"
    data = bytearray(storage.read_bytes(rel))
    data[entry.offset + at] ^= 0x5A
    storage.write_bytes(rel, bytes(data))


def test_fills_fresh_model_in_place_bitwise(saved):
    storage, name, manifest, model, opt = saved
    torch.manual_seed(99)
    fresh, fresh_opt = Model(), None
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)  # no state yet: it must be allocated
    ptrs = {k: t.data_ptr() for k, t in fresh.state_dict().items()}
    entries = _entries(manifest)
    dests = destinations(entries, {"model": fresh}, {"optimizer": fresh_opt})
    stats = ReadStats()
    got = read_into(storage, name, entries, dests, stats=stats)

    for k, t in fresh.state_dict().items():
        assert t.data_ptr() == ptrs[k], f"{k} was replaced, not filled in place"
        assert _raw(t) == _raw(model.state_dict()[k]), k
    saved_state = {i: s for i, s in enumerate(opt.state_dict()["state"].values())}
    for i, state in saved_state.items():
        for field, value in state.items():
            t = got[f"state/optimizers/optimizer/state/{i}/{field}"]
            assert t.dtype == value.dtype and t.shape == value.shape and _raw(t) == _raw(value), (i, field)
    # The same bytes as the plain reader gives.
    plain = blobs.read_tensors(storage, name, entries, threads=2)
    assert set(plain) == set(got) and all(_raw(plain[k]) == _raw(got[k]) for k in plain)
    assert stats.tensors == len(entries) and stats.bytes == sum(e.length for e in entries)
    assert stats.allocated == len(saved_state) * 3 and stats.staged == 0
    verify_entries(storage, name, entries)  # all good: no error
    # local: only the padding between coalesced neighbours; object stores: one coalesced span at a time per read
    remote = storage.url.startswith("memory://")
    assert stats.peak_extra_bytes <= (direct_read.COALESCE_SPAN * 3 if remote else 4096)


def test_existing_optimizer_state_is_filled_in_place(saved):
    storage, name, manifest, model, opt = saved
    fresh, fresh_opt = _trained(seed=5, steps=1)  # state exists, other values
    before = {k: t.data_ptr() for s in fresh_opt.state.values() for k, t in s.items() if k != "step"}
    entries = _entries(manifest)
    stats = ReadStats()
    read_into(storage, name, entries, destinations(entries, {"model": fresh}, {"optimizer": fresh_opt}),
              stats=stats)
    assert stats.allocated == 0
    for (p, s), (p0, s0) in zip(fresh_opt.state.items(), opt.state.items()):
        for k in s:
            assert _raw(s[k]) == _raw(s0[k]), k
    assert {k: t.data_ptr() for s in fresh_opt.state.values() for k, t in s.items() if k != "step"} == before


def test_load_state_dict_after_direct_read_is_free_and_exact(saved):
    storage, name, manifest, model, opt = saved
    fresh = Model()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    entries = _entries(manifest)
    got = read_into(storage, name, entries, destinations(entries, {"model": fresh}, {"optimizer": fresh_opt}))
    from harness.checkpoint import codec
    state = codec.decode(manifest.raw["state"], got.__getitem__)
    ptrs = [t.data_ptr() for t in fresh.state_dict().values()]
    fresh.load_state_dict(state["models"]["model"])
    fresh_opt.load_state_dict(state["optimizers"]["optimizer"])
    assert [t.data_ptr() for t in fresh.state_dict().values()] == ptrs
    for s, s0 in zip(fresh_opt.state.values(), opt.state.values()):
        assert all(_raw(s[k]) == _raw(s0[k]) for k in s0)
    # the optimizer kept the tensors the reader allocated: no second copy
    assert fresh_opt.state[next(iter(fresh.parameters()))]["exp_avg"].data_ptr() == \
        got["state/optimizers/optimizer/state/0/exp_avg"].data_ptr()


@pytest.mark.parametrize("which", ["small", "big"])
def test_corrupt_byte_raises_naming_file_and_key(saved, which):
    storage, name, manifest, _, _ = saved
    entries = _entries(manifest)
    victim = next(e for e in entries if e.key == ("state/models/model/a.bias" if which == "small"
                                                  else "state/models/model/big.weight"))
    _flip(storage, name, victim, at=victim.length // 2)
    with pytest.raises(CheckpointCorruptError) as info:
        read_into(storage, name, entries, {}, threads=3)
    assert victim.file in str(info.value) and victim.key in str(info.value)
    with pytest.raises(CheckpointCorruptError):
        verify_entries(storage, name, entries)


def test_corrupt_entry_never_reaches_a_staged_destination(saved):
    storage, name, manifest, _, _ = saved
    e = manifest.tensors["state/models/model/b.weight"]
    _flip(storage, name, e)
    dest = torch.full((8, 8), 7.0).t()  # non-contiguous: staged, checked before it is copied in
    with pytest.raises(CheckpointCorruptError):
        read_into(storage, name, [e], {e.key: dest})
    assert torch.equal(dest, torch.full((8, 8), 7.0))


def test_non_contiguous_and_other_dtype_destinations(saved):
    storage, name, manifest, model, _ = saved
    keys = ["state/models/model/b.weight", "state/models/model/big.weight", "state/models/model/a.weight"]
    entries = [manifest.tensors[k] for k in keys]
    transposed = torch.zeros(8, 8).t()
    strided = torch.zeros(40000, 16)[:, ::2]
    wide = torch.zeros(8, 4, dtype=torch.float64)
    stats = ReadStats()
    out = read_into(storage, name, entries, dict(zip(keys, [transposed, strided, wide])), stats=stats)
    sd = model.state_dict()
    assert _raw(transposed.contiguous()) == _raw(sd["b.weight"])
    assert _raw(strided.contiguous()) == _raw(sd["big.weight"])
    assert torch.equal(wide, sd["a.weight"].double())
    assert out[keys[0]] is transposed and stats.staged == 3
    # staging is bounded by the largest staged tensor, not the sum
    assert stats.peak_extra_bytes <= max(manifest.tensors[k].length for k in keys) + direct_read.COALESCE_GAP + 256


def test_small_neighbours_share_one_read(saved):
    storage, name, manifest, model, _ = saved
    entries = _entries(manifest)
    stats = ReadStats()
    fresh = Model()
    read_into(storage, name, entries, destinations(entries, {"model": fresh}, {}), stats=stats)
    small = [e for e in entries if e.length <= direct_read.SMALL_BYTES]
    assert stats.coalesced >= len(small) - 2  # a run breaks only at a big tensor between small ones
    assert stats.reads < len(entries)
    assert all(_raw(t) == _raw(model.state_dict()[k]) for k, t in fresh.state_dict().items())


def test_without_coalescing_and_small_blocks_same_bytes(saved, monkeypatch):
    storage, name, manifest, model, _ = saved
    monkeypatch.setattr(direct_read, "BLOCK_BYTES", 4096)  # a big tensor in many blocks, hashed as they come
    monkeypatch.setattr(direct_read, "REMOTE_BLOCK_BYTES", 4096)
    e = manifest.tensors["state/models/model/big.weight"]
    dest = torch.empty(e.shape)
    stats = ReadStats()
    read_into(storage, name, [e], {e.key: dest}, coalesce=False, stats=stats)
    assert stats.reads == -(-e.length // 4096)
    assert _raw(dest) == _raw(model.big.weight)


def test_local_runs_are_contiguous_and_in_file_order(saved):
    """Each local thread streams a contiguous share front to back (one readahead stream per thread); object
    stores get one job per task, largest first."""
    storage, name, manifest, _, _ = saved
    targets, _ = direct_read.plan_targets(_entries(manifest), {}, "cpu", ReadStats())
    jobs = direct_read.plan_jobs(targets, coalesce=True)
    assert jobs == sorted(jobs, key=lambda j: (j.file, j.offset))
    for streams in (1, 2, 3):
        runs = direct_read.plan_runs(jobs, streams, local=True)
        assert len(runs) == min(streams, direct_read.local_streams(streams), len(jobs))
        assert [j for run in runs for j in run] == jobs  # every job once, order kept: contiguous runs
    remote = direct_read.plan_runs(jobs, 4, local=False)
    assert all(len(r) == 1 for r in remote) and len(remote) == len(jobs)
    sizes = [r[0].end - r[0].offset for r in remote]
    assert sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize("streams", [1, 3])
def test_any_number_of_streams_gives_the_same_bytes(saved, monkeypatch, streams):
    storage, name, manifest, model, opt = saved
    monkeypatch.setattr(direct_read, "BLOCK_BYTES", 64 * 1024)  # several blocks per big tensor
    monkeypatch.setattr(direct_read, "local_streams", lambda threads: streams)
    entries = _entries(manifest)
    fresh = Model()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    stats = ReadStats()
    got = read_into(storage, name, entries, destinations(entries, {"model": fresh}, {"optimizer": fresh_opt}),
                    threads=4, stats=stats)
    assert all(_raw(t) == _raw(model.state_dict()[k]) for k, t in fresh.state_dict().items())
    plain = blobs.read_tensors(storage, name, entries, threads=2)
    assert all(_raw(plain[k]) == _raw(got[k]) for k in plain)
    assert stats.bytes == sum(e.length for e in entries)


def test_missing_destinations_are_allocated_once_at_saved_shape(saved):
    storage, name, manifest, _, opt = saved
    entries = _entries(manifest, "state/optimizers/")
    stats = ReadStats()
    got = read_into(storage, name, entries, {entries[0].key: torch.device("cpu")}, stats=stats)
    assert stats.allocated == len(entries) == len(got)
    for e in entries:
        assert tuple(got[e.key].shape) == e.shape and got[e.key].dtype == direct_read.DTYPES[e.dtype]


def test_wrong_shape_destination_is_refused(saved):
    storage, name, manifest, _, _ = saved
    e = manifest.tensors["state/models/model/a.weight"]
    with pytest.raises(CheckpointError, match="a.weight"):
        read_into(storage, name, [e], {e.key: torch.zeros(4, 8)})


def test_truncated_file_is_corrupt(saved):
    storage, name, manifest, _, _ = saved
    e = manifest.tensors["state/models/model/big.weight"]
    rel = f"{name}/{e.file}"
    storage.write_bytes(rel, storage.read_bytes(rel)[:e.offset + e.length // 2])
    with pytest.raises(CheckpointCorruptError, match="big.weight"):
        read_into(storage, name, [e], {})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_destinations_through_the_pinned_ring(saved):
    storage, name, manifest, model, opt = saved
    fresh = Model().cuda()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    entries = _entries(manifest)
    dests = destinations(entries, {"model": fresh}, {"optimizer": fresh_opt})
    got = read_into(storage, name, entries, dests)
    for k, t in fresh.state_dict().items():
        assert t.is_cuda and _raw(t) == _raw(model.state_dict()[k]), k
    assert got["state/optimizers/optimizer/state/0/exp_avg"].is_cuda
    assert got["state/optimizers/optimizer/state/0/step"].device.type == "cpu"
    strided = torch.zeros(40000, 16, device="cuda")[:, ::2]
    e = manifest.tensors["state/models/model/big.weight"]
    read_into(storage, name, [e], {e.key: strided})
    assert _raw(strided.contiguous()) == _raw(model.big.weight)
    _flip(storage, name, e, at=5)
    with pytest.raises(CheckpointCorruptError, match="big.weight"):
        read_into(storage, name, [e], {e.key: strided})


class HostRing:
    """direct_cuda.fill_run's ring with plain host buffers and immediate copies: the pinned ring needs a GPU, the
    reading, hashing, slot and block arithmetic and error paths around it do not."""

    def __init__(self, slots: int = 2, slot_bytes: int = 300_001) -> None:
        self.slot_bytes = slot_bytes
        self.bufs = [torch.empty(slot_bytes, dtype=torch.uint8) for _ in range(slots)]
        self.host = [memoryview(b.numpy()) for b in self.bufs]
        self._next = 0
        self.drained = 0

    def bind(self) -> None:
        pass

    def take(self) -> int:
        slot, self._next = self._next, (self._next + 1) % len(self.bufs)
        return slot

    def staging(self, shape, dtype) -> torch.Tensor:
        return torch.empty(tuple(shape), dtype=dtype)

    def copy_out(self, slot: int, n: int, dst: torch.Tensor) -> None:
        dst.copy_(self.bufs[slot][:n])

    def convert(self, view: torch.Tensor, staged: torch.Tensor) -> None:
        with torch.no_grad():
            view.copy_(staged)

    def drain(self) -> None:
        self.drained += 1


def _fill(storage, name, run, ring, stop=None):
    with direct_io.Reader(storage, name) as reader:
        return direct_cuda.fill_run(reader, run, ring, True, stop or threading.Event())


# a slot read in blocks (the default), and in one read (checkpoint_io's _slot_reads row)
@pytest.mark.parametrize("block", [65_536, 300_001])
def test_cuda_fill_run_slots_blocks_and_conversions(saved, monkeypatch, block):
    """The CUDA reading thread's loop, on host buffers: entries over several slots (a slot not a multiple of the
    block), a destination of another dtype and a strided one (both staged, then converted), every byte."""
    storage, name, manifest, model, opt = saved
    monkeypatch.setattr(direct_cuda, "LOCAL_BLOCK_BYTES", block)
    entries = _entries(manifest)
    fresh = Model()
    dests = destinations(entries, {"model": fresh}, {})
    wide = torch.zeros(8, 4, dtype=torch.float64)  # another dtype: staged on the device, then converted
    strided = torch.zeros(40000, 16)[:, ::2]       # not contiguous: the same
    dests["state/models/model/a.weight"], dests["state/models/model/big.weight"] = wide, strided
    targets, _ = direct_read.plan_targets(entries, dests, "cpu", ReadStats())
    ring = HostRing()
    reads, nbytes = _fill(storage, name, [(t.entry, t.view) for t in targets], ring)
    assert nbytes == sum(e.length for e in entries) and ring.drained == 1
    block = block if direct_io.is_local(storage) else ring.slot_bytes
    assert reads == sum(-(-min(ring.slot_bytes, e.length - a) // block)
                        for e in entries for a in range(0, e.length, ring.slot_bytes))
    sd = model.state_dict()
    assert torch.equal(wide, sd["a.weight"].double()) and _raw(strided.contiguous()) == _raw(sd["big.weight"])
    for k, t in fresh.state_dict().items():
        if k not in ("a.weight", "big.weight"):
            assert _raw(t) == _raw(sd[k]), k


def test_cuda_fill_run_corrupt_byte_and_stop(saved):
    storage, name, manifest, _, _ = saved
    e = manifest.tensors["state/models/model/big.weight"]
    ring = HostRing()
    stop = threading.Event()
    stop.set()  # another thread failed: this one stops before its next read, and still drains its ring
    with pytest.raises(direct_io.Aborted):
        _fill(storage, name, [(e, torch.empty(e.shape))], ring, stop)
    assert ring.drained == 1
    _flip(storage, name, e, at=e.length - 3)  # in the last slot: caught when the entry's hash is complete
    with pytest.raises(CheckpointCorruptError, match="big.weight"):
        _fill(storage, name, [(e, torch.empty(e.shape))], ring)
    assert ring.drained == 2


def test_cuda_fill_run_says_where_its_time_went(saved):
    """Phases: a ring whose slots come back late (copies to the device still running) shows it as slot wait;
    read, hash and slot wait never add up to more than the thread's total."""
    storage, name, manifest, _, _ = saved
    e = manifest.tensors["state/models/model/big.weight"]

    class SlowRing(HostRing):
        def take(self) -> int:
            time.sleep(0.01)
            return super().take()

    ring, phases = SlowRing(), direct_cuda.Phases()
    with direct_io.Reader(storage, name) as reader:
        direct_cuda.fill_run(reader, [(e, torch.empty(e.shape))], ring, True, threading.Event(), phases)
    slots = -(-e.length // ring.slot_bytes)
    got = phases.seconds()
    assert got["slot_wait"] >= 0.01 * slots and got["read"] > 0 and got["hash"] > 0
    assert got["read"] + got["hash"] + got["slot_wait"] + got["other"] == pytest.approx(got["total"])


def test_cuda_runs_share_out_every_destination(saved):
    """One ring and thread per share: local shares are contiguous in file order; object stores get at most
    ``threads`` shares of about equal bytes."""
    storage, name, manifest, _, _ = saved
    targets, _ = direct_read.plan_targets(_entries(manifest), {}, "cpu", ReadStats())
    order = sorted(targets, key=lambda t: (t.entry.file, t.entry.offset))
    for threads in (1, 2, 3):
        runs = direct_read.plan_cuda_runs(targets, threads, local=True)
        assert len(runs) == min(direct_read.local_streams(threads), len(targets))
        assert [e for run in runs for e, _ in run] == [t.entry for t in order]
        remote = direct_read.plan_cuda_runs(targets, threads, local=False)
        assert len(remote) == min(threads, len(targets))
        assert sorted(e.key for run in remote for e, _ in run) == sorted(t.entry.key for t in targets)
        loads = [sum(e.length for e, _ in run) for run in remote]
        assert max(loads) - min(loads) <= max(t.entry.length for t in targets)


def test_s3_reads_into_live_tensors_and_finds_damage(_master, s3_url):
    """On S3 (moto over HTTP): the same bytes through ranged reads, coalesced small tensors, a flipped byte."""
    name, files, model, _ = _master
    storage = Storage(s3_url)
    for f, data in files.items():
        if f != "COMMIT":
            storage.write_bytes(f"{name}/{f}", data)
    storage.commit_bytes(f"{name}/COMMIT", files["COMMIT"])
    manifest = open_checkpoint(storage, name)
    entries = _entries(manifest, "state/models/")
    fresh = Model()
    stats = ReadStats()
    read_into(storage, name, entries, destinations(entries, {"model": fresh}, {}), stats=stats)
    assert all(_raw(t) == _raw(model.state_dict()[k]) for k, t in fresh.state_dict().items())
    assert stats.coalesced > 0
    _flip(storage, name, manifest.tensors["state/models/model/big.weight"], at=100)
    with pytest.raises(CheckpointCorruptError, match="big.weight"):
        read_into(storage, name, entries, {})
