"""Local data files written with O_DIRECT (harness/storage/direct_write.py): exact bytes at every size, the
page cache left alone, the buffered fallback, and the storage option that turns it off."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from harness import CheckpointManager
from harness.errors import HarnessError
from harness.storage import Storage
from harness.storage import bytecopy, direct_write
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


def _aligned(nbytes: int, shift: int = 0) -> np.ndarray:
    """Random bytes at an address ``shift`` bytes past a page boundary."""
    raw = np.empty(nbytes + 2 * ALIGN, dtype=np.uint8)
    start = -raw.ctypes.data % ALIGN + shift
    out = raw[start:start + nbytes]
    out[:] = np.frombuffer(os.urandom(nbytes), dtype=np.uint8)
    return out


def _write_like_a_checkpoint(path, image: np.ndarray, spans: list[tuple[int, int]], piece: int,
                             on_pages: bool = False) -> DirectWriter:
    """Write ``image`` (a data file's bytes) the way the checkpoint writer does: each tensor span in pieces of
    at most ``piece`` bytes from ``image``'s own memory (``on_pages``: each but the last ending on a page of
    the file, as the background writer cuts them), the gaps between them as separate zero writes."""
    fd, direct = open_direct(str(path))
    if not direct:
        os.close(fd)
        pytest.skip("this filesystem has no O_DIRECT")
    w = DirectWriter(fd, direct)
    pos = 0
    try:
        for a, b in spans:
            if a > pos:
                w.write(b"\0" * (a - pos))
            i = a
            while i < b:
                end = min(b, i + piece)
                if on_pages and end < b and end // ALIGN * ALIGN > i:
                    end = end // ALIGN * ALIGN
                w.write(memoryview(image[i:end]))
                i = end
            pos = b
        w.finish()
    finally:
        w.close()
    return w


# Tensor spans of one data file: 64-byte aligned offsets, ragged lengths, one smaller than a page.
MB4 = 4 << 20
SPANS = [(0, 3 * MB4 + 1000), (3 * MB4 + 1024, 5 * MB4 + 77), (5 * MB4 + 128, 5 * MB4 + 228),
         (5 * MB4 + 256, 6 * MB4 + 3 * ALIGN + 5)]


def _image() -> np.ndarray:
    image = _aligned(SPANS[-1][1])
    ends = [0] + [b for _, b in SPANS]
    for (a, _), prev in zip(SPANS, ends):
        image[prev:a] = 0  # the padding the file holds
    return image


@pytest.mark.parametrize("piece", [4 << 20, 1 << 20, 777_777, 4096])
def test_pieces_congruent_with_the_file_are_written_from_the_callers_memory(tmp_path, piece):
    """A host snapshot lays a data file's tensors out at addresses equal to their file offsets modulo a page:
    their aligned middles then go to the disk without a copy; only ragged ends pass through the block (at most
    a page at each end of each piece: a tensor that does not start on a page costs one per piece)."""
    image = _image()
    w = _write_like_a_checkpoint(tmp_path / "f.bin", image, SPANS, piece)
    assert (tmp_path / "f.bin").read_bytes() == image.tobytes()
    assert w.size == len(image)
    ragged = sum(ALIGN * (1 + -(-(b - a) // piece)) for a, b in SPANS)
    assert len(image) - ragged <= w.from_source <= len(image)
    if piece >= 1 << 16:
        assert w.from_source > 0.99 * len(image)


def test_pieces_cut_on_pages_leave_one_small_write_per_tensor(tmp_path):
    """Pieces that end on a page of the file (the background writer's, stepwrite._Tensor) leave the block empty
    between them: one write per piece, and a partial page only where one tensor ends and the next begins.
    Cut every 4 MiB from the tensor's start instead, each piece also writes a partial page of its own."""
    image = _image()
    pieces = sum(-(-(b - a) // (4 << 20)) + 1 for a, b in SPANS)  # at most one more per tensor once cut on pages
    w = _write_like_a_checkpoint(tmp_path / "f.bin", image, SPANS, 4 << 20, on_pages=True)
    assert (tmp_path / "f.bin").read_bytes() == image.tobytes()
    assert w.writes <= pieces + len(SPANS) + 1  # + one block write per tensor boundary, + the tail
    assert w.from_source >= len(image) - 2 * ALIGN * len(SPANS)
    uncut = _write_like_a_checkpoint(tmp_path / "g.bin", image, SPANS, 4 << 20)
    assert uncut.writes > w.writes


def test_background_pieces_end_on_pages_of_the_file():
    """stepwrite cuts a whole tensor into pieces of at most PIECE_BYTES, each but the last ending on a page of
    the file, whatever the tensor's offset; the pieces cover it exactly and its checksum is the tensor's."""
    from harness.checkpoint.format import checksum
    from harness.checkpoint.stepwrite import PIECE_BYTES, _Tensor

    t = torch.randn(3 * PIECE_BYTES // 4 + 1000)

    class Sink:
        def __init__(self) -> None:
            self.lengths: list[int] = []

        def write(self, b) -> int:
            self.lengths.append(len(b))
            return len(b)

    for offset in (0, 64, 4032, ALIGN + 128):
        cur, sink = _Tensor("k", t, offset, chunk_bytes=1 << 20), Sink()
        while not cur.write_piece(sink):
            pass
        ends = np.cumsum(sink.lengths)
        assert ends[-1] == t.numel() * 4 and max(sink.lengths) <= PIECE_BYTES
        assert all((offset + e) % ALIGN == 0 for e in ends[:-1]), offset
        assert len(sink.lengths) <= -(-t.numel() * 4 // PIECE_BYTES) + 1
        assert cur.entry("f", 0).checksum == checksum(memoryview(t.numpy()).cast("B"))


def test_pieces_at_other_addresses_are_copied(tmp_path, monkeypatch):
    """The same bytes at addresses 64 bytes off congruence, or with the path turned off: every byte is copied
    through the block, and the file is the same."""
    image = _image()
    shifted = _aligned(len(image), shift=64)
    shifted[:] = image
    w = _write_like_a_checkpoint(tmp_path / "a.bin", shifted, SPANS, 4 << 20)
    assert (tmp_path / "a.bin").read_bytes() == image.tobytes() and w.from_source == 0
    monkeypatch.setattr(direct_write, "FROM_SOURCE", False)
    w = _write_like_a_checkpoint(tmp_path / "b.bin", image, SPANS, 4 << 20)
    assert (tmp_path / "b.bin").read_bytes() == image.tobytes() and w.from_source == 0


def test_an_async_save_writes_its_data_files_from_the_snapshot(tmp_path):
    """End to end: a background save's data files (several, each starting on a page of the snapshot) go to the
    disk from the snapshot with no copy, and restore exactly."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(300, 300) for _ in range(6)])
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 300)).sum().backward()
    opt.step()
    mgr = CheckpointManager(str(tmp_path / "ckpt"), async_save=True, max_file_bytes=1 << 20)
    if not open_direct(str(tmp_path / "probe"))[1]:
        pytest.skip("this filesystem has no O_DIRECT")
    mgr.save(1, models=model, optimizers=opt)
    mgr.wait()
    backend = mgr.storage.backend
    data = sum(p.stat().st_size for p in (tmp_path / "ckpt" / mgr.latest()).iterdir() if p.name.startswith("data"))
    assert len(list((tmp_path / "ckpt" / mgr.latest()).glob("data*"))) >= 4
    assert data < backend.data_bytes < 1.05 * data  # the data files, and the manifest
    assert backend.from_source > 0.95 * data
    mgr.close()
    fresh = torch.nn.Sequential(*[torch.nn.Linear(300, 300) for _ in range(6)])
    fresh_opt = torch.optim.AdamW(fresh.parameters())
    CheckpointManager(str(tmp_path / "ckpt")).restore(models=fresh, optimizers=fresh_opt)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    saved = opt.state_dict()["state"]
    assert all(torch.equal(saved[i]["exp_avg"], s["exp_avg"]) for i, s in fresh_opt.state_dict()["state"].items())
