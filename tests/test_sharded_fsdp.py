"""FSDP2 (fully_shard, DTensor) checkpoints on CPU/gloo: each rank writes its local shards with global shape
and offset; restore at 1, 2 and 4 ranks reads only the byte ranges each rank needs (row ranges of dim-0
shards, verified chunk by chunk); a rank failing mid-write leaves nothing visible; a model whose shapes
differ is refused with the tensor's name."""

from __future__ import annotations

import pytest

from ckpt_helpers import read_manifest
from harness.checkpoint.discovery import verify_checkpoint
from harness.storage import Storage
from sharded_helpers import run_ranks
from torch_features import needs_fsdp


pytestmark = needs_fsdp

CHUNK = 64  # bytes: small chunks so that restores at another world size read row ranges


@pytest.fixture(scope="module")
def saved2(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp2")
    url, ref = str(tmp / "ckpt"), str(tmp / "ref")
    results = run_ranks(tmp, "fsdp_save", 2, url=url, ref=ref, chunk_bytes=CHUNK)
    return tmp, url, ref, results


def test_fsdp_save_at_2_writes_local_shards(saved2):
    _, url, _, results = saved2
    for res in results:
        assert res["fault"].startswith("CheckpointError:") and "rank 1" in res["fault"], res["fault"]
        assert res["visible"] == ["step-000000003"]
    man = read_manifest(url, "step-000000003")
    assert man["sharding"] == "fsdp" and man["world_size"] == 2
    assert man["model_classes"]["model"].endswith("sharded_helpers.FNet")  # its own class, not FSDPFNet
    shards = [e for e in man["tensors"] if "global_shape" in e]
    w = [e for e in shards if e["key"] == "state/models/model/blocks.0.weight"]
    assert sorted((e["rank"], e["global_offset"], e["shape"]) for e in w) == [(0, [0, 0], [7, 8]), (1, [7, 0], [6, 8])]
    assert all(e["global_shape"] == [13, 8] for e in w)
    assert any(k["key"].startswith("state/optimizers/optimizer/state/") for k in shards)
    verify_checkpoint(Storage(url), "step-000000003")


def test_fsdp_restore_at_2_reads_own_shards_and_continues_bitwise(saved2, tmp_path):
    _, url, ref, _ = saved2
    results = run_ranks(tmp_path, "fsdp_restore", 2, url=url, ref=ref, saved_world=2, mismatch=True)
    for res in results:
        assert res["continued"] and res["row_reads"] == 0
        assert res["mismatch"] and "blocks.0.weight" in res["mismatch"] and "shape" in res["mismatch"], res
    total = sum(e["length"] for e in read_manifest(url, "step-000000003")["tensors"])
    assert sum(res["bytes_read"] for res in results) < 1.5 * total


def test_fsdp_restore_at_4_reads_row_ranges(saved2, tmp_path):
    _, url, ref, _ = saved2
    results = run_ranks(tmp_path, "fsdp_restore", 4, url=url, ref=ref, saved_world=2)
    assert any(res["row_reads"] for res in results)


def test_fsdp_restore_at_1_unsharded_model(saved2):
    """One plain process (no process group, a plain model): the shards are assembled into full tensors."""
    import sharded_scenarios

    _, url, ref, _ = saved2
    sharded_scenarios.fsdp_restore(0, 1, url=url, ref=ref, saved_world=2, shard=False)
