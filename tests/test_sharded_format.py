"""Sharded entries in one process: shards written by two (simulated) ranks are identified by key and
offset, assembled into the full tensor, read as verified row ranges, and refused when they overlap, leave a
gap or lie about their chunks; the split-writes assignment is deterministic and balanced."""

from __future__ import annotations

import pytest
import torch

from ckpt_helpers import flip_byte, read_manifest, write_manifest
from harness import CheckpointManager
from harness.checkpoint import blobs, sharded
from harness.checkpoint.codec import Shard
from harness.checkpoint.discovery import open_checkpoint, verify_checkpoint
from harness.checkpoint.load import read_state
from harness.errors import CheckpointCorruptError, CheckpointFormatError
from harness.storage import Storage

NAME = "step-000000001"
KEY = "state/models/model/w"


def _sharded_ckpt(url: str, chunk_bytes: int = 32) -> torch.Tensor:
    """A checkpoint whose tensor ``w`` (10 x 4) is stored as two row shards written by ranks 0 and 1."""
    full = torch.arange(40, dtype=torch.float32).reshape(10, 4)
    CheckpointManager(url).save(1, models={"model": torch.nn.Linear(1, 1)})  # a genuine base to extend
    st = Storage(url)
    man = read_manifest(url, NAME)
    for rank, (lo, hi) in enumerate([(0, 6), (6, 10)]):
        files, entries = blobs.write_tensors(st, NAME, {KEY: Shard(full[lo:hi].clone(), (10, 4), (lo, 0))},
                                             rank=rank + 5, step=1, max_file_bytes=1 << 20, threads=1,
                                             chunk_bytes=chunk_bytes)
        man["files"].update(files)
        man["tensors"] += [e.to_json() for e in entries]
    man["state"]["models"]["model"] = {"w": {"__tensor__": KEY}}
    write_manifest(url, NAME, man)
    return full


def test_shards_assemble_and_read_as_row_ranges(ckpt_url):
    full = _sharded_ckpt(ckpt_url)
    st = Storage(ckpt_url)
    man = open_checkpoint(st, NAME)
    assert sorted(i for i in man.tensors if i.startswith(KEY + "@")) == [f"{KEY}@0,0", f"{KEY}@6,0"]
    _, state, _ = read_state(st, NAME)
    assert torch.equal(state["models"]["model"]["w"], full)
    verify_checkpoint(st, NAME)
    entries = man.entries(KEY)
    assert all(e.chunk_rows == 2 for e in entries)  # 32-byte chunks of 16-byte rows
    loader = sharded.Loader(st, NAME, man, threads=2)
    t1 = loader.want(KEY, (5, 0), (3, 4))   # rows 5..8 span both shards: row ranges of each
    t2 = loader.want(KEY, (1, 1), (2, 2))   # an inner box
    got = loader.run()
    assert torch.equal(got[t1], full[5:8]) and torch.equal(got[t2], full[1:3, 1:3])
    reqs = blobs.region_requests(entries, (5, 0), (3, 4))
    assert sorted(r[1] for r in reqs) == [(0, 2), (4, 6)]  # shard 0: its last chunk; shard 1: its first


def test_corrupt_chunk_is_caught_on_a_row_read(ckpt_url):
    _sharded_ckpt(ckpt_url)
    st = Storage(ckpt_url)
    man = open_checkpoint(st, NAME)
    e = next(e for e in man.entries(KEY) if e.global_offset == (6, 0))
    flip_byte(ckpt_url, f"{NAME}/{e.file}", e.offset + 3)
    loader = sharded.Loader(st, NAME, man, threads=1)
    loader.want(KEY, (6, 0), (1, 4))
    with pytest.raises(CheckpointCorruptError, match="rows 0"):
        loader.run()


@pytest.mark.parametrize("change, match", [
    (lambda es: es[1].update(global_offset=[5, 0]), "overlap|cover"),
    (lambda es: es.pop(), "cover"),
    (lambda es: es[1].update(global_shape=[11, 4]), "global shapes"),
    (lambda es: es[0].update(chunk_checksums=es[0]["chunk_checksums"][:1]), "chunk_checksums"),
    (lambda es: es[1].update(global_offset=es[0]["global_offset"]), "listed twice"),
])
def test_inconsistent_shards_are_refused(ckpt_url, change, match):
    _sharded_ckpt(ckpt_url)
    man = read_manifest(ckpt_url, NAME)
    es = [e for e in man["tensors"] if e["key"] == KEY]
    change(es)
    man["tensors"] = [e for e in man["tensors"] if e["key"] != KEY] + es
    write_manifest(ckpt_url, NAME, man)
    with pytest.raises(CheckpointFormatError, match=match):
        open_checkpoint(Storage(ckpt_url), NAME)


def test_assign_writers_is_greedy_and_deterministic():
    sizes = {"a": 100, "b": 90, "c": 50, "d": 40, "e": 10}
    w = sharded.assign_writers(sizes, 2)
    assert w == sharded.assign_writers(dict(reversed(list(sizes.items()))), 2)
    assert w == {"a": 0, "b": 1, "c": 1, "d": 0, "e": 0}
    assert set(sharded.assign_writers(sizes, 4).values()) == {0, 1, 2, 3}
    assert set(sharded.assign_writers(sizes, 1).values()) == {0}


def test_config_parallel_and_split_writes():
    from harness.config import from_dict
    from harness.errors import ConfigError

    cfg = from_dict({"train": {"parallel": "zero"}, "checkpoint": {"split_writes": True}})
    assert cfg.train.parallel == "zero" and cfg.checkpoint.split_writes
    assert from_dict({}).train.parallel == "ddp"
    with pytest.raises(ConfigError, match="train.parallel must be one of ddp, zero, fsdp"):
        from_dict({"train": {"parallel": "tp"}})
