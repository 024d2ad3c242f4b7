"""Snapshot buffers are reused across async saves, tied weights are stored once, and a saved state that does not
fit the object it is restored into is a clear CheckpointError."""

import pytest
import torch

from harness import CheckpointError, CheckpointManager
from harness.checkpoint.discovery import open_checkpoint


class Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(50, 8)
        self.head = torch.nn.Linear(8, 50, bias=False)
        self.head.weight = self.emb.weight


def test_async_snapshot_reuses_buffers_and_keeps_values(ckpt_url):
    model = torch.nn.Linear(16, 4)
    mgr = CheckpointManager(ckpt_url, async_save=True, keep_last=0)
    mgr.save(1, models=model)
    first = mgr.snapshot.views
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)  # training goes on while step 1 persists
    mgr.save(2, models=model)
    assert first and all(mgr.snapshot.views[k] is first[k] for k in first)
    mgr.close()
    fresh = torch.nn.Linear(16, 4)
    CheckpointManager(ckpt_url).restore(models=fresh, step=1)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in expected.items())
    CheckpointManager(ckpt_url).restore(models=fresh, step=2)
    assert torch.equal(fresh.weight, model.weight)


def test_snapshot_is_one_buffer_sized_to_the_state_and_freed_on_close(ckpt_url):
    """Issue 13 (2): one flat host buffer of about the state's size (not one rounded-up allocation per tensor),
    reused from save to save and released by close()."""
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(8)], torch.nn.LayerNorm(64))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 64)).sum().backward()
    opt.step()
    mgr = CheckpointManager(ckpt_url, async_save=True, keep_last=1)
    mgr.save(1, models=model, optimizers=opt)
    snap = mgr.snapshot
    state_bytes = snap.state_bytes
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert state_bytes > 3 * model_bytes  # weights, two AdamW moments, RNG states...
    assert state_bytes <= snap.nbytes <= 1.05 * state_bytes
    assert snap.allocations == 1 and not snap.pinned  # CPU sources: not pinned
    buffer = {k: v.untyped_storage().data_ptr() for k, v in snap.views.items()}
    assert len({v.untyped_storage().data_ptr() for v in snap.views.values()}) == 1  # views of one buffer
    assert all(v.data_ptr() % 64 == 0 for v in snap.views.values())
    mgr.save(2, models=model, optimizers=opt)  # same layout: the same buffer
    assert {k: v.untyped_storage().data_ptr() for k, v in snap.views.items()} == buffer
    mgr.close()
    assert snap.nbytes == 0 and snap.allocations == 0 and snap.views == {}
    fresh = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(8)], torch.nn.LayerNorm(64))
    CheckpointManager(ckpt_url).restore(models=fresh)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


def test_sync_save_of_cpu_state_holds_no_snapshot(ckpt_url):
    """A save that persists before returning writes CPU tensors in place: no host copy is held."""
    mgr = CheckpointManager(ckpt_url)
    mgr.save(1, models=torch.nn.Linear(8, 8))
    assert mgr.snapshot.nbytes == 0 and mgr.snapshot.allocations == 0
    mgr.close()


def test_tied_weights_stored_once_and_restored_tied(ckpt_url):
    model = Tied()
    mgr = CheckpointManager(ckpt_url)
    mgr.save(1, models=model)
    manifest = open_checkpoint(mgr.storage, mgr.latest())
    model_keys = [k for k in manifest.tensors if k.startswith("state/models/")]
    assert len(model_keys) == 1  # emb.weight and head.weight are one tensor
    other = Tied()
    mgr.restore(models=other)
    assert torch.equal(other.emb.weight, model.emb.weight)
    assert other.head.weight is other.emb.weight


def test_scheduler_of_another_type_is_a_clear_error(ckpt_url):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    CheckpointManager(ckpt_url).save(1, models=model, optimizers=opt,
                                     schedulers=torch.optim.lr_scheduler.StepLR(opt, 5))
    opt2 = torch.optim.SGD(model.parameters(), lr=0.1)
    lam = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0)
    with pytest.raises(CheckpointError, match="scheduler 'scheduler' cannot take the saved state"):
        CheckpointManager(ckpt_url).restore(models=model, optimizers=opt2, schedulers=lam)


def test_snapshot_views_hold_every_dtype_and_shape_and_follow_layout_changes():
    from harness.checkpoint.codec import Shard
    from harness.checkpoint.snapshot import Snapshot

    src = {"f": torch.randn(3, 5), "scalar": torch.tensor(2.5, dtype=torch.float64), "empty": torch.empty(0, 7),
           "b": torch.tensor([True, False, True]), "c": torch.randn(4, dtype=torch.complex64).conj(),
           "bf": torch.randn(9, dtype=torch.bfloat16), "strided": torch.arange(20).reshape(4, 5).t(),
           "shard": Shard(torch.randn(2, 3), (4, 3), (2, 0))}
    snap = Snapshot()
    out = snap.take(src, copy_all=True)
    assert snap.allocations == 1 and snap.nbytes <= 1.05 * snap.state_bytes + 64 * len(src) + 4096  # a page to align
    for k, t in src.items():
        a, b = (t.local, out[k].local) if isinstance(t, Shard) else (t, out[k])
        assert torch.equal(a.resolve_conj(), b) and b.data_ptr() % 64 == 0 and b is not a, k
    assert isinstance(out["shard"], Shard) and out["shard"].global_offset == (2, 0)
    first = snap.views["f"]
    snap.take(src, copy_all=True)
    assert snap.views["f"] is first  # same layout: reused
    snap.take({**src, "f": torch.randn(3, 6)}, copy_all=True)
    assert snap.views["f"] is not first and snap.allocations == 1  # new layout: one new buffer, the old freed
    snap.release()
    assert snap.nbytes == 0 and snap.views == {}


@pytest.mark.parametrize("size, threads", [(0, 1), (1, 1), (4097, 1), ((3 << 20) + 5, 3)])
def test_a_buffer_to_pin_is_written_through_before_it_is_locked(monkeypatch, size, threads):
    """Before a new snapshot buffer is page-locked (GPU sources), every page is written, split over threads
    (each span a contiguous share, together the whole buffer), so the locking finds the pages present."""
    from harness.checkpoint import snapshot as snap

    monkeypatch.setattr(snap, "PREFAULT_MIN_CHUNK", 1 << 20)
    monkeypatch.setattr(snap, "usable_cpus", lambda: threads)
    buf = torch.empty(size, dtype=torch.uint8).fill_(0xAB)
    spans = []
    real = snap.ctypes.memset
    monkeypatch.setattr(snap.ctypes, "memset", lambda a, v, n: (spans.append((a - buf.data_ptr(), n)),
                                                                 real(a, v, n))[1])
    snap._prefault(buf)
    assert not buf.any()  # every byte written (zeros)
    assert len(spans) == (threads if size else 0)
    pos = 0
    for a, n in sorted(spans):  # back to back, no gap, no overlap
        assert a == pos
        pos += n
    assert pos == size


def test_the_first_tensor_of_each_data_file_starts_on_a_page():
    """So a data file's tensors lie in the buffer as in the file, modulo a page (the local writer then sends them
    to the disk uncopied); the others keep 64-byte alignment, and a change of file starts is a new layout."""
    from harness.checkpoint.snapshot import PAGE, Snapshot

    src = {k: torch.randn(n) for k, n in (("a", 3), ("b", 1000), ("c", 7), ("d", 5))}
    snap = Snapshot()
    snap.take(src, copy_all=True, file_starts=frozenset({"a", "c"}))
    ptr = {k: v.data_ptr() for k, v in snap.views.items()}
    assert ptr["a"] % PAGE == 0 and ptr["c"] % PAGE == 0
    assert ptr["b"] - ptr["a"] == 64 and ptr["d"] - ptr["c"] == 64  # packed as a data file packs them
    snap.take(src, copy_all=True, file_starts=frozenset({"a", "d"}))
    assert snap.views["d"].data_ptr() % PAGE == 0 and snap.views["c"].data_ptr() - snap.views["b"].data_ptr() == 4032
    snap.release()
