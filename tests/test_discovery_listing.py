"""Restore's discovery costs one listing of the checkpoint folder, not a HEAD and a read per checkpoint:
whether a checkpoint is committed and the size of each of its files come from that listing, and commit
records are read lazily, newest candidate first, stopping at the first checkpoint that verifies. Counted
at the storage seam (a thin counting wrapper around the real backend) on local disk and on S3 (moto), with
three good checkpoints, a damaged newer one and an uncommitted newest folder; a second rank reads neither
commit record nor manifest (rank 0 sends the manifest with its choice)."""

from __future__ import annotations

import threading
import uuid
from collections import Counter

import pytest
import torch

from ckpt_helpers import (Net, assert_bitwise, counting, flip_byte, read_manifest, save_killed_before_commit,
                          simple_run, snapshot, train_step)
from harness import CheckpointManager, faults
from harness.checkpoint.discovery import list_checkpoints, read_commits, scan
from harness.checkpoint.format import COMMIT_FILE, MANIFEST_FILE
from harness.errors import CheckpointError, StorageError
from harness.storage import Storage
from sharded_helpers import run_ranks

GOOD, DAMAGED, UNCOMMITTED = "step-000000003", "step-000000004", "step-000000005"


def _flip_data(storage: Storage, name: str) -> None:
    """One byte of the largest tensor flipped: sizes agree, only its checksum can tell."""
    e = max(read_manifest(storage.url, name)["tensors"], key=lambda e: e["length"])
    flip_byte(storage.url, f"{name}/{e['file']}", e["offset"] + e["length"] // 2)


def _populate(url: str, damage: str) -> dict:
    """Steps 1-3 committed and good, step 4 committed and damaged, step 5 a save killed before its commit
    record (through the fault seam). Returns the state saved at step 3."""
    model, opt, sched = simple_run()
    mgr = CheckpointManager(url, keep_last=0)
    saved = {}
    for step in (1, 2, 3, 4):
        train_step(model, opt, sched, seed=step)
        mgr.save(step, models=model, optimizers=opt, loss=float(step))
        saved[step] = snapshot((model.state_dict(), opt.state_dict()))

    try:
        save_killed_before_commit(mgr, 5, models=model, optimizers=opt)
    finally:
        mgr.close()
    storage = Storage(url)
    if damage == "data":
        _flip_data(storage, DAMAGED)
    else:
        storage.write_bytes(f"{DAMAGED}/{COMMIT_FILE}", b"\x00\xffgarbage")
    assert [i.name for i in list_checkpoints(storage, committed_only=False)][-2:] == [DAMAGED, UNCOMMITTED]
    return saved[3]


@pytest.fixture(params=["local", "s3"])
def url(request, tmp_path) -> str:
    return str(tmp_path / "ck") if request.param == "local" else request.getfixturevalue("s3_url")


@pytest.mark.parametrize("damage", ["data", "commit"])
def test_restore_lists_once_and_reads_only_the_commit_records_it_walks(url, damage):
    at_3 = _populate(url, damage)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=0.5)
    mgr = CheckpointManager(url)
    calls = counting(mgr.storage)

    res = mgr.restore(models=model, optimizers=opt)

    assert res.name == GOOD and res.step == 3
    assert_bitwise(at_3, (model.state_dict(), opt.state_dict()))
    assert [n for n, _ in res.skipped] == [UNCOMMITTED, DAMAGED]
    assert res.skipped[0][1] == "no commit record"
    assert ("checksum mismatch" if damage == "data" else "commit record is not valid JSON") in res.skipped[1][1]
    n = calls.count()
    assert n["list_tree"] == 1 and n["listdir"] == 0, calls.calls          # one listing of the folder
    assert n["size"] == 0 and n["exists"] == 0, calls.calls                # no HEAD per folder or file
    # Commit records: the damaged one and the one restored, none older; each read once.
    assert calls.reads_of(COMMIT_FILE) == [DAMAGED, GOOD], calls.calls
    assert calls.reads_of(MANIFEST_FILE) == ([DAMAGED, GOOD] if damage == "data" else [GOOD]), calls.calls
    mgr.close()


def test_scan_is_one_listing_and_reads_commit_records_only_when_asked(url):
    _populate(url, "data")
    storage = Storage(url)
    calls = counting(storage)
    infos = scan(storage)
    assert calls.count() == Counter({"refresh": 1, "list_tree": 1})
    assert [(i.step, i.committed) for i in infos] == [(1, True), (2, True), (3, True), (4, True), (5, False)]
    assert all(not i.commit_read for i in infos) and infos[-1].files and COMMIT_FILE not in infos[-1].files
    newest_first = read_commits(storage, reversed(infos))
    assert next(newest_first).name == UNCOMMITTED and calls.reads_of(COMMIT_FILE) == []
    assert next(newest_first).commit["step"] == 4 and calls.reads_of(COMMIT_FILE) == [DAMAGED]
    # list_checkpoints reads every record (retention and `harness ckpt list` need them) - still no HEAD.
    calls.calls.clear()
    assert [i.commit["loss"] for i in list_checkpoints(storage)] == [1.0, 2.0, 3.0, 4.0]
    assert calls.count()["list_tree"] == 1 and calls.count()["size"] == 0


def two_rank_restore(rank: int, world: int, url: str) -> dict:
    """Runs on both ranks (run_ranks): the storage calls each rank makes while restoring."""
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=0.5)
    mgr = CheckpointManager(url, timeout_s=30)
    calls = counting(mgr.storage)
    res = mgr.restore(models=model, optimizers=opt)
    mgr.close()
    return {"name": res.name, "count": dict(calls.count()), "commits": calls.reads_of(COMMIT_FILE),
            "manifests": calls.reads_of(MANIFEST_FILE)}


def test_other_ranks_do_not_read_commit_record_or_manifest(tmp_path):
    url = str(tmp_path / "ck")
    _populate(url, "data")
    r0, r1 = run_ranks(tmp_path, two_rank_restore, 2, url=url)
    assert r0["name"] == r1["name"] == GOOD
    assert r0["count"]["list_tree"] == 1 and r0["commits"] == [DAMAGED, GOOD]
    assert "list_tree" not in r1["count"] and "listdir" not in r1["count"] and "size" not in r1["count"]
    assert r1["commits"] == [] and r1["manifests"] == []


@pytest.mark.parametrize("error", [OSError(5, "Input/output error (injected)"),
                                   StorageError("Input/output error (injected): s3 said 503")])
def test_a_store_failing_on_a_commit_record_fails_the_restore_instead_of_walking_back(tmp_path, error):
    """The commit records are read lazily, inside the walk back; a store error there (injected through the
    fault seam as the newest record is read: an OSError, or the StorageError the S3 backend raises once its
    retries are spent) is the store's problem, not damage: restore fails with it, on every rank alike, and
    does not fall back to an older checkpoint; once the store answers again the newest one restores."""
    url = str(tmp_path / "ck")
    model, opt, sched = simple_run()
    mgr = CheckpointManager(url, keep_last=0)
    for step in (1, 2):
        train_step(model, opt, sched, seed=step)
        mgr.save(step, models=model, optimizers=opt)
    mgr.close()
    seen = []

    def failing_store(point: str, info: dict) -> None:
        if point == "discovery.read_commit":
            seen.append(info["name"])
            raise error
    faults.install(failing_store)
    try:
        mgr = CheckpointManager(url)
        with pytest.raises(Exception) as err:
            mgr.restore(models=Net(), optimizers=opt)
        mgr.close()
    finally:
        faults.install(None)
    assert isinstance(err.value, CheckpointError), repr(err.value)  # exit 3 through the CLI
    assert "Input/output error (injected)" in str(err.value) and "failed verification" not in str(err.value)
    assert seen == ["step-000000002"]  # the newest only: no walk back to step 1
    fresh = Net()
    mgr = CheckpointManager(url)
    res = mgr.restore(models=fresh, optimizers=torch.optim.AdamW(fresh.parameters(), lr=0.5))
    mgr.close()
    assert res is not None and res.step == 2 and not res.skipped  # the store recovered: nothing was damaged


def test_a_run_keeping_its_checkpoints_reads_each_commit_record_once(url):
    """Retention after each save read every commit record in the folder: a run keeping its checkpoints
    (keep_last=0, or a large keep_last) made one GET per checkpoint it had, at every save (300 checkpoints on
    moto: 1.1 s per save, seconds on S3). Now the saving job reads each record once in its life: a save lists
    the folder once and reads only the record it just wrote; keeping every checkpoint reads none."""
    model, opt, sched = simple_run()
    mgr = CheckpointManager(url, keep_last=100, keep_best=2)
    for step in range(1, 9):
        mgr.save(step, models=model, loss=1.0 / step)
    counter = counting(mgr.storage)
    for step in range(9, 12):
        mgr.save(step, models=model, loss=1.0 / step)
    mgr.close()
    assert counter.reads_of(COMMIT_FILE) == ["step-000000009", "step-000000010", "step-000000011"]
    assert counter.count()["list_tree"] == 3  # one listing per save (retention's)
    assert [i.step for i in list_checkpoints(Storage(url))] == list(range(1, 12))
    mgr = CheckpointManager(url, keep_last=0)  # keep every one: a new job, and no record is read at all
    counter = counting(mgr.storage)
    for step in range(12, 14):
        mgr.save(step, models=model)
    mgr.close()
    assert counter.reads_of(COMMIT_FILE) == [] and counter.count()["list_tree"] == 2
    assert [i.step for i in list_checkpoints(Storage(url))] == list(range(1, 14))


def test_a_name_retention_deleted_and_a_later_save_reused_is_read_afresh(tmp_path):
    """A loop that goes back to an earlier step (a rewind after a loss spike) saves a checkpoint of a name
    retention deleted before. Its commit record is a new one (here with the same size as the old one): the
    job's memory of the old record must not stand in for it, or keep_best would rank it by the old loss."""
    url = str(tmp_path / "ck")
    model, _, _ = simple_run()
    mgr = CheckpointManager(url, keep_last=1, keep_best=1)
    mgr.save(5, models=model, loss=3.25)
    mgr.save(6, models=model, loss=2.25)   # step 5 deleted: neither last nor best
    assert [i.step for i in list_checkpoints(Storage(url))] == [6]
    mgr.save(5, models=model, loss=0.25)   # the rewind: step-000000005 again, now the best
    mgr.save(7, models=model, loss=1.25)   # last is 7, best is the new 5: 6 goes
    mgr.close()
    kept = {i.step: i.commit["loss"] for i in list_checkpoints(Storage(url))}
    assert kept == {5: 0.25, 7: 1.25}, kept


def test_a_full_listing_reads_commit_records_together_and_keeps_their_meaning():
    """list_checkpoints (retention's first pass, `ckpt list`) reads the records it needs several at a time
    from a store that is not a local disk (latency on S3; memory:// here): still a damaged record is a problem
    of that checkpoint, a record gone since the listing an uncommitted folder, and a failing store an error,
    not a damaged or missing checkpoint."""
    url = f"memory://listing-{uuid.uuid4().hex}/ck"
    model, _, _ = simple_run()
    mgr = CheckpointManager(url, keep_last=0)
    for step in range(1, 21):
        mgr.save(step, models=model, loss=float(step))
    mgr.close()
    storage = Storage(url)
    storage.write_bytes("step-000000007/COMMIT", b"{not json")
    threads = set()

    def seam(point: str, info: dict) -> None:
        if point != "discovery.read_commit":
            return
        threads.add(threading.current_thread().name)
        if info["name"] == "step-000000012":
            storage.remove_tree("step-000000012")   # deleted between the listing and the read
    faults.install(seam)
    infos = {i.name: i for i in list_checkpoints(storage, committed_only=False)}
    assert len(threads) > 1 and all(t.startswith("harness-commits") for t in threads), threads
    assert infos["step-000000007"].problem and not infos["step-000000012"].committed
    assert [i.commit["loss"] for n, i in sorted(infos.items()) if i.committed and not i.problem] == \
        [float(s) for s in range(1, 21) if s not in (7, 12)]

    def failing(point: str, info: dict) -> None:
        if point == "discovery.read_commit" and info["name"] == "step-000000015":
            raise StorageError("Input/output error (injected)")
    faults.install(failing)
    with pytest.raises(StorageError, match="injected"):
        list_checkpoints(storage)
