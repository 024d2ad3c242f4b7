"""Local data files written with O_DIRECT (harness/storage/direct_write.py): exact bytes at every size, the
page cache left alone, the buffered fallback, and the storage option that turns it off."""

from __future__ import annotations

import os

import pytest
import torch

from harness import CheckpointManager
from harness.errors import HarnessError
from harness.storage import Storage
from harness.storage import bytecopy
from harness.storage.direct_write import ALIGN, DirectWriter, open_direct
from page_cache import resident_fraction

SIZES = [0, 1, ALIGN - 1, ALIGN, ALIGN + 1, (4 << 20) - 1, 4 << 20, (4 << 20) + 5, 9_000_001]


def _write(storage: Storage, name: str, data: bytes, chunk: int = 777_777) -> None:
    with storage.open_write(name) as f:
        for i in range(0, len(data), chunk):
            f.write(memoryview(data)[i:i + chunk])


@pytest.mark.parametrize("size", SIZES)
def test_every_size_is_written_exactly(tmp_path, size):
    storage = Storage(str(tmp_path))
    assert storage.backend.direct
    data = os.urandom(size)
    _write(storage, "f.bin", data)
    assert (tmp_path / "f.bin").read_bytes() == data


@pytest.mark.parametrize("gil_free_min", [1, 64 << 10, 1 << 62])  # numpy's copy always, by size, never
def test_either_copy_into_the_block_writes_the_same_bytes(tmp_path, monkeypatch, gil_free_min):
    """Pieces above ``GIL_FREE_COPY_MIN`` are copied by numpy (the GIL released), smaller ones by a slice
    assignment: mixed sizes, read-only and writable sources, pieces that straddle a block's end."""
    monkeypatch.setattr(bytecopy, "GIL_FREE_COPY_MIN", gil_free_min)
    data = os.urandom(3 * (4 << 20) + 12_345)
    fd, direct = open_direct(str(tmp_path / "f.bin"))
    w = DirectWriter(fd, direct)
    pos = 0
    try:
        for n in (1, 70_000, (4 << 20) - 3, 64 << 10, 10, 5 << 20):
            piece = memoryview(data)[pos:pos + n]
            w.write(piece if n % 2 else bytearray(piece))  # bytes slices are read-only, bytearrays writable
            pos += n
        w.write(memoryview(data)[pos:])
        w.finish()
    finally:
        w.close()
    assert (tmp_path / "f.bin").read_bytes() == data


def test_direct_writes_leave_the_page_cache_alone(tmp_path):
    storage = Storage(str(tmp_path))
    _write(storage, "direct.bin", os.urandom(32 << 20))
    buffered = Storage(str(tmp_path), {"harness_direct_io": False})
    assert not buffered.backend.direct
    _write(buffered, "buffered.bin", os.urandom(32 << 20))
    if not open_direct(str(tmp_path / "probe"))[1]:
        pytest.skip("this filesystem has no O_DIRECT")
    assert resident_fraction(str(tmp_path / "buffered.bin")) > 0.5  # the reference: buffered stays cached
    assert resident_fraction(str(tmp_path / "direct.bin")) < 0.05


def test_a_refused_alignment_falls_back_to_buffered_writes(tmp_path):
    fd, direct = open_direct(str(tmp_path / "odd.bin"))
    if not direct:
        pytest.skip("this filesystem has no O_DIRECT")
    w = DirectWriter(fd, direct, block=1000)  # 1000-byte writes: O_DIRECT refuses them (EINVAL)
    data = os.urandom(12_345)
    try:
        w.write(data)
        w.finish()
    finally:
        w.close()
    assert not w.direct
    assert (tmp_path / "odd.bin").read_bytes() == data


def test_the_storage_option_is_checked():
    with pytest.raises(HarnessError, match="harness_direct_io"):
        Storage("/tmp", {"harness_direct_io": "yes"})


def test_checkpoints_round_trip_with_and_without_direct_io(tmp_path):
    for direct in (True, False):
        torch.manual_seed(0)
        model = torch.nn.Linear(300, 301)
        mgr = CheckpointManager(str(tmp_path / str(direct)), storage_options={"harness_direct_io": direct})
        mgr.save(step=1, models={"model": model})
        mgr.close()
        fresh = torch.nn.Linear(300, 301)
        mgr = CheckpointManager(str(tmp_path / str(direct)), storage_options={"harness_direct_io": direct})
        assert mgr.restore(models={"model": fresh}) is not None
        mgr.close()
        for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
            assert torch.equal(a, b)
