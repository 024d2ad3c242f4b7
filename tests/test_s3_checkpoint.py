"""CheckpointManager, discovery, retention and export on s3:// against moto's server over HTTP."""

from __future__ import annotations

import copy
import random

import fsspec
import numpy as np
import pytest
import torch

from ckpt_helpers import assert_bitwise, draws, fresh, simple_run, train_step
from harness import CheckpointManager
from harness.checkpoint.discovery import list_checkpoints, open_checkpoint, verify_checkpoint
from harness.interop.export import export_checkpoint
from harness.checkpoint.format import COMMIT_FILE
from harness.errors import CheckpointCorruptError
from harness.storage import Storage
from s3_server import SECRET_KEY

SMALL_PARTS = {"harness_part_size_mb": 1 / 64, "harness_max_concurrency": 3}   # 16 KiB parts, 3 in flight


def _big_extra(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"big": torch.randn(100_000, generator=g), "ints": torch.randint(0, 1 << 40, (1000,), generator=g)}


def _save(mgr: CheckpointManager, step: int, model, opt, sched, extra=None, loss=None) -> None:
    mgr.save(step, models=model, optimizers=opt, schedulers=sched, extra=extra, epoch=step // 3,
             position={"i": step}, loss=loss, metrics={"acc": step / 10})


def test_roundtrip_multipart_models_optimizer_rng(s3_url, s3_server):
    model, opt, sched = simple_run(seed=3)
    extra = _big_extra()
    mgr = CheckpointManager(s3_url, storage_options=SMALL_PARTS)
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    _save(mgr, 5, model, opt, sched, extra=extra, loss=0.25)
    expected_draws = draws()
    s3io = mgr.storage.backend.client
    assert s3io is not None
    assert 1 < s3io.peak_inflight_parts <= 3, "parts went up concurrently, never more than the bound"
    mgr.close()

    # the data object was a multipart upload (ETag "...-N") made of many 16 KiB parts
    bucket, key = s3_url[5:].split("/", 1)
    objs = s3_server.client().list_objects_v2(Bucket=bucket, Prefix=key)["Contents"]
    data = [o for o in objs if "/data-" in o["Key"]]
    assert data and all(o["ETag"].strip('"').rsplit("-", 1)[-1].isdigit() for o in data if o["Size"] > 16384)
    assert max(int(o["ETag"].strip('"').rsplit("-", 1)[-1]) for o in data if "-" in o["ETag"]) > 20

    m2, o2, s2 = fresh()
    random.seed(999)
    result = CheckpointManager(s3_url, storage_options=SMALL_PARTS).restore(models=m2, optimizers=o2, schedulers=s2)
    assert result.name == "step-000000005" and result.step == 5 and result.loss == 0.25
    assert result.position == {"i": 5}
    assert_bitwise(draws(), expected_draws)  # every RNG continues exactly
    assert_bitwise(m2.state_dict(), model.state_dict())
    assert_bitwise(o2.state_dict(), opt.state_dict())
    assert_bitwise(s2.state_dict(), sched.state_dict())
    assert_bitwise(result.extra["big"], extra["big"])
    assert_bitwise(result.extra["ints"], extra["ints"])


def test_async_saves_retention_keep_last_and_no_leftovers(s3_url, s3_server):
    model, opt, sched = simple_run()
    mgr = CheckpointManager(s3_url, keep_last=2, storage_options=SMALL_PARTS, async_save=True)  # background
    for step in range(1, 6):
        train_step(model, opt, sched, seed=step)
        _save(mgr, step, model, opt, sched, extra=_big_extra(step), loss=1.0 / step)
    mgr.close()
    names = [i.name for i in list_checkpoints(Storage(s3_url))]
    assert names == ["step-000000004", "step-000000005"]
    bucket = s3_url[5:].split("/", 1)[0]
    keys = [k for k, _ in s3_server.all_objects(bucket)]
    assert all(k.split("/")[2] in names for k in keys), keys          # nothing left of deleted ones
    assert not s3_server.uploads(bucket)                                # no unfinished multipart uploads
    assert not any(".harness-access-check" in k for k in keys)         # the fail-fast probe cleaned up


def test_fallback_past_damaged_newest_and_verify(s3_url, s3_server):
    model, opt, sched = simple_run()
    mgr = CheckpointManager(s3_url, keep_last=0, storage_options=SMALL_PARTS)
    _save(mgr, 1, model, opt, sched, extra=_big_extra(1))
    good = copy.deepcopy(model.state_dict())
    train_step(model, opt, sched, seed=11)
    _save(mgr, 2, model, opt, sched, extra=_big_extra(2))
    mgr.close()

    storage = Storage(s3_url)
    assert [i.name for i in list_checkpoints(storage)] == ["step-000000001", "step-000000002"]
    for info in list_checkpoints(storage):
        verify_checkpoint(storage, info.name)

    # damage the newest: overwrite one data object through s3fs with same-size, different bytes
    fs = fsspec.filesystem("s3")
    victim = f"{s3_url[5:]}/step-000000002/data-r00000-000.bin"
    raw = bytearray(fs.cat_file(victim))
    raw[len(raw) // 2] ^= 0xFF
    fs.pipe_file(victim, bytes(raw))

    open_checkpoint(storage, "step-000000002")  # sizes still agree: only the checksum can tell
    with pytest.raises(CheckpointCorruptError, match="checksum mismatch"):
        verify_checkpoint(storage, "step-000000002")

    m2, o2, s2 = fresh()
    result = CheckpointManager(s3_url).restore(models=m2, optimizers=o2, schedulers=s2)
    assert result.name == "step-000000001"
    assert [n for n, _ in result.skipped] == ["step-000000002"]
    assert_bitwise(m2.state_dict(), good)


def test_discovery_sees_fresh_state_and_uncommitted_is_invisible(s3_url):
    storage = Storage(s3_url)
    assert list_checkpoints(storage) == []
    storage.backend.client.fs.ls(storage.root.split("/")[0], refresh=True)  # fill s3fs's listing cache on this instance
    model, opt, sched = simple_run()
    writer = CheckpointManager(s3_url, storage_options=SMALL_PARTS)
    _save(writer, 1, model, opt, sched)
    # another Storage (another process, in effect) sees the commit at once
    assert [i.name for i in list_checkpoints(storage)] == ["step-000000001"]
    # remove the commit record: the checkpoint is invisible to readers, whatever data is there
    storage.remove(f"step-000000001/{COMMIT_FILE}")
    assert list_checkpoints(storage) == []
    assert [i.name for i in list_checkpoints(storage, committed_only=False)] == ["step-000000001"]
    assert CheckpointManager(s3_url).restore(models=fresh()[0]) is None  # uncommitted: never loaded
    writer.close()


def test_commit_object_written_last(s3_bucket, fault_proxy):
    """Through the (fault-free) proxy: every data object is complete and confirmed before the COMMIT PUT."""
    url = f"s3://{s3_bucket}/ordered"
    opts = {**SMALL_PARTS, "endpoint_url": fault_proxy.url}
    model, opt, sched = simple_run()
    mgr = CheckpointManager(url, keep_last=0, storage_options=opts, max_file_bytes=200_000)
    fault_proxy.log.clear()
    _save(mgr, 1, model, opt, sched, extra=_big_extra())
    mgr.close()
    writes = [(m, p) for m, p, status in fault_proxy.log if m in ("PUT", "POST") and status < 300]
    commit_at = [i for i, (m, p) in enumerate(writes) if p.split("?")[0].endswith("/" + COMMIT_FILE)]
    assert len(commit_at) == 1 and commit_at[0] == len(writes) - 1, writes[-3:]
    data_done = [i for i, (m, p) in enumerate(writes) if "/data-" in p and (m == "PUT" and "partNumber" not in p
                                                                          or m == "POST" and "uploadId" in p)]
    assert len(data_done) >= 2 and max(data_done) < commit_at[0]
    # a confirming HEAD of each data object came after its upload and before the commit
    ordered = [(m, p.split("?")[0]) for m, p, _ in fault_proxy.log]
    commit_pos = max(i for i, (m, p) in enumerate(ordered) if m == "PUT" and p.endswith("/" + COMMIT_FILE))
    heads = {p for m, p in ordered[:commit_pos] if m == "HEAD" and "/data-" in p}
    assert len(heads) == len(data_done)


def test_export_and_cli_list_from_s3(s3_url, tmp_path, capsys):
    from harness.cli import main
    model, opt, sched = simple_run()
    mgr = CheckpointManager(s3_url, storage_options=SMALL_PARTS)
    _save(mgr, 3, model, opt, sched, loss=0.5)
    mgr.close()
    out = tmp_path / "model.pt"
    export_checkpoint(s3_url, str(out), fmt="pt")
    payload = torch.load(out, weights_only=True)
    assert_bitwise(dict(payload["model_state_dict"]), dict(model.state_dict()))
    assert main(["ckpt", "list", s3_url]) == 0
    assert main(["ckpt", "verify", s3_url]) == 0
    text = capsys.readouterr()
    assert "step-000000003" in text.out and "valid" in text.out
    assert SECRET_KEY not in text.out + text.err


def test_scheme_case_chained_urls_and_empty_folder_names(s3_bucket, s3_server, capsys):
    """`S3://bucket/run` was exit 3 "Protocol not known: S3" (schemes are case-insensitive); `s3://bucket//run`
    trained and exited 0 with its checkpoints under keys starting with "/", which `s3://bucket/run` (where
    metrics.jsonl said they were) does not list. The first is the same folder as `s3://`, the second refused
    before anything is written; a chained fsspec URL (`simplecache::s3://...`) reads the same checkpoints."""
    from harness.cli import main
    from harness.errors import StorageError
    model, opt, sched = simple_run()
    mgr = CheckpointManager(f"S3://{s3_bucket}/run", storage_options=SMALL_PARTS)
    _save(mgr, 3, model, opt, sched, loss=0.5)
    mgr.close()
    fs = fsspec.filesystem("s3")
    assert fs.exists(f"{s3_bucket}/run/step-000000003/{COMMIT_FILE}")
    for url in (f"s3://{s3_bucket}/run", f"simplecache::s3://{s3_bucket}/run"):
        assert [c.step for c in list_checkpoints(Storage(url))] == [3]
        assert main(["ckpt", "verify", url]) == 0
    for doubled in (f"s3://{s3_bucket}//dbl", f"s3:///{s3_bucket}/dbl"):
        with pytest.raises(StorageError, match=f"did you mean 's3://{s3_bucket}/dbl'"):
            CheckpointManager(doubled)
        assert main(["ckpt", "list", doubled]) == 3
    assert "empty folder name" in capsys.readouterr().err
    fs.invalidate_cache()
    assert sorted(fs.ls(s3_bucket)) == [f"{s3_bucket}/run"]


def test_a_hugging_face_model_folder_in_s3_is_a_source_of_weights(s3_bucket, s3_server, tmp_path):
    """checkpoint.init_from = "s3://bucket/hf-model" (save_pretrained's files uploaded as they are)."""
    import json

    import harness
    from safetensors.torch import save_file
    model, _, _ = simple_run()
    sd = model.state_dict()
    names = sorted(sd)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    fs = fsspec.filesystem("s3")
    for shard, keys in halves.items():
        save_file({k: sd[k].contiguous() for k in keys}, tmp_path / shard)
        fs.put(str(tmp_path / shard), f"{s3_bucket}/hf-model/{shard}")
    index = {"weight_map": {k: shard for shard, keys in halves.items() for k in keys}}
    fs.pipe(f"{s3_bucket}/hf-model/model.safetensors.index.json", json.dumps(index).encode())
    fresh = harness.load_for_inference(f"s3://{s3_bucket}/hf-model", type(model)())
    assert_bitwise(dict(fresh.state_dict()), dict(sd))
