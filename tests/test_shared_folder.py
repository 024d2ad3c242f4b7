"""A job's ranks must write into one checkpoint folder (harness/checkpoint/shared.py).

A job on several machines with ``checkpoint.dir`` on each machine's own disk committed checkpoints whose other
ranks' files were on other machines (all damaged: `ckpt verify` FAILED, "data file data-r00001-000.bin is
missing"), exit 0; and its restart, rank 0 on the other machine, found no checkpoint and trained from step 0
while the other rank wrote its files into the first run's committed folders. Here two launchers of one job
(--nnodes 2 on loopback) each get their own folder, as two machines' local disks of the same path would.
"""

from __future__ import annotations

import os
import shutil

import torch

from ckpt_helpers import Net, simple_run
from harness import CheckpointManager, dist, faults
from harness.checkpoint.discovery import list_checkpoints, verify_checkpoint
from harness.checkpoint.save import Fragment
from harness.checkpoint.shared import MARKER_PREFIX, check, unseen, write_marker
from harness.errors import CheckpointError, StorageError, StorageUnavailableError
from harness.storage import Storage
from sharded_helpers import run_ranks
from trainer_helpers import free_port, launch_cmd

NOT_SHARED = "is not the same folder for every rank"


def _markers(folder) -> list[str]:
    return [n for n in os.listdir(folder) if n.startswith(MARKER_PREFIX)] if os.path.isdir(folder) else []


def test_two_nodes_with_a_folder_each_exit_3_before_any_checkpoint(runner, tmp_path):
    """Both launchers exit 3 (never restarted, whatever --max-restarts says), one line each naming it; no
    checkpoint or marker is left in either folder."""
    port = free_port()
    dirs = [tmp_path / f"node{i}" / "ck" for i in range(2)]
    nodes = [runner.start(f"node{i}", launch_cmd(tmp_path, f"checkpoint.dir={d}", nproc=1, nnodes=2,
                                                 endpoint=f"127.0.0.1:{port}", max_restarts=2))
             for i, d in enumerate(dirs)]
    assert [n.wait(120) for n in nodes] == [3, 3], [n.tail() for n in nodes]
    for n in nodes:
        lines = [ln for ln in n.log().splitlines() if ln.startswith("harness: ")]
        assert len(lines) == 1 and lines[0].startswith("harness: checkpoint error: checkpoint folder "), n.tail()
        assert NOT_SHARED in lines[0] and "storage they all share" in lines[0], lines
        assert "will restart worker group" not in n.log() and "Traceback" not in n.log(), n.tail()
    for d in dirs:
        assert not list(d.glob("step-*")) and not _markers(d), list(d.iterdir()) if d.is_dir() else None


def own_folder_each(rank: int, world: int, root: str) -> dict:
    """Each rank a folder of its own (the same path on two machines' own disks): every rank raises, rank 0's
    marker is removed."""
    try:
        CheckpointManager(os.path.join(root, f"rank{rank}"), timeout_s=30)
    except StorageError as exc:
        return {"error": str(exc), "markers": _markers(os.path.join(root, f"rank{rank}"))}
    return {"error": None}


def one_folder(rank: int, world: int, root: str) -> dict:
    """The same folder (here through a symlink on rank 1: another path to one folder is fine)."""
    path = os.path.join(root, "ck")
    if rank == 1:
        while not os.path.isdir(path):  # rank 0 makes it in the constructor; the link must name a folder
            os.makedirs(path, exist_ok=True)
        link = os.path.join(root, "link")
        if not os.path.islink(link):
            os.symlink(path, link)
        path = link
    mgr = CheckpointManager(path, timeout_s=30)
    model, opt, _ = simple_run()
    mgr.save(1, models=model, optimizers=opt)
    mgr.close()
    return {"markers": _markers(path), "steps": [c.step for c in list_checkpoints(Storage(path))]}


def test_a_manager_with_a_folder_per_rank_refuses_on_every_rank(tmp_path):
    res = run_ranks(tmp_path, own_folder_each, 2, root=str(tmp_path))
    for r in res:
        assert r["error"] and NOT_SHARED in r["error"] and "rank 1 on host " in r["error"], r
        assert "does not see it" in r["error"] and r["markers"] == [], r
    assert str(tmp_path / "rank0") in res[0]["error"] and f"(folder {tmp_path / 'rank1'})" in res[0]["error"]
    assert not (tmp_path / "rank1").exists()  # rank 1 only looked: nothing made there


def test_one_folder_seen_by_every_rank_passes_and_leaves_no_marker(tmp_path):
    res = run_ranks(tmp_path, one_folder, 2, root=str(tmp_path))
    assert [r["markers"] for r in res] == [[], []]
    assert [r["steps"] for r in res] == [[1], [1]]


def files_go_elsewhere_at_step_2(rank: int, world: int, url: str, elsewhere: str) -> dict:
    """A network filesystem unmounted under a running job on rank 1's host: its files of step 2 land on that
    machine's own disk (moved away as they are written). The save fails on every rank, nothing committed, and
    step 1 is intact and still the newest, even with keep_last=1."""
    def unmounted(point: str, info: dict) -> None:
        if point == "save.data_file" and info["step"] == 2 and rank == 1:
            folder = os.path.join(url, f"step-{2:09d}")
            os.makedirs(elsewhere, exist_ok=True)
            shutil.move(os.path.join(folder, info["file"]), os.path.join(elsewhere, info["file"]))

    model, opt, _ = simple_run()
    mgr = CheckpointManager(url, keep_last=1, timeout_s=30)
    mgr.save(1, models=model, optimizers=opt)
    faults.install(unmounted)
    try:
        mgr.save(2, models=model, optimizers=opt)
        error = None
    except CheckpointError as exc:
        error = str(exc)
    finally:
        faults.install(None)
    mgr.close()
    listed = list_checkpoints(Storage(url))
    res = CheckpointManager(url, timeout_s=30).restore(models=Net(), optimizers=torch.optim.AdamW(Net().parameters()))
    return {"error": error, "committed": [c.name for c in listed], "restored": res.step,
            "verified": verify_checkpoint(Storage(url), listed[-1].name).name if rank == 0 else None}


def test_files_that_stop_landing_in_the_folder_fail_the_save_and_keep_the_last_good_one(tmp_path):
    url = str(tmp_path / "ck")
    res = run_ranks(tmp_path, files_go_elsewhere_at_step_2, 2, url=url, elsewhere=str(tmp_path / "local"))
    for r in res:
        assert r["error"] and "checkpoint at step 2 was not committed: rank 1 wrote data-r00001-" in r["error"], r
        assert "is not there" in r["error"] and "no longer the same folder for every rank" in r["error"], r
        assert r["committed"] == ["step-000000001"] and r["restored"] == 1, r
    assert res[0]["verified"] == "step-000000001"  # every checksum of the newest checks out


def test_one_process_writes_no_marker(tmp_path):
    """A world of one has nothing to compare: no marker is written (the access probe is removed as before)."""
    CheckpointManager(tmp_path / "ck")
    assert _markers(tmp_path / "ck") == [] and os.listdir(tmp_path / "ck") == []


class _StaleListing:
    """A local folder whose listing is older than another client's files (NFS's attribute cache)."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def list_tree(self, rel: str = "", prefix: str = "") -> dict:
        return {}


def test_a_listing_older_than_the_files_does_not_fail_the_commit(tmp_path):
    """Each file the listing misses is looked up by name before the save is failed: on NFS a listing may come
    from a cache, a lookup of a new name never does."""
    storage = Storage(str(tmp_path / "ck"))
    storage.makedirs("step-000000002")
    storage.write_bytes("step-000000002/data-r00001-000.bin", b"x" * 10)
    frags = [Fragment(rank=0), Fragment(rank=1, files={"data-r00001-000.bin": {"size": 10, "rank": 1}})]
    assert unseen(_StaleListing(storage), "step-000000002", frags) is None
    frags[1].files["data-r00001-000.bin"]["size"] = 11
    assert "has 10 bytes" in unseen(_StaleListing(storage), "step-000000002", frags)
    storage.remove("step-000000002/data-r00001-000.bin")
    assert "rank 1 wrote data-r00001-000.bin into step-000000002, but in rank 0's view of the folder it is not " \
           "there" in unseen(storage, "step-000000002", frags)


class _Unreachable(_StaleListing):
    """A store that stays unreachable through its retries when this rank looks."""

    def size(self, rel: str):
        raise StorageUnavailableError(f"S3 HEAD {rel} failed after 12 attempts in 120 s")


def unreachable_on_rank_1(rank: int, world: int, url: str) -> dict:
    storage = Storage(url)
    if rank == 0:
        storage.check_access(write=True)  # makes the folder, as the manager's check does
    marker = dist.broadcast(write_marker(storage) if rank == 0 else None, None)
    try:
        check(storage if rank == 0 else _Unreachable(storage), marker, None, rank, world)
    except StorageError as exc:
        return {"kind": type(exc).__name__, "error": str(exc), "left": _markers(url)}
    return {"kind": None}


def test_a_store_unreachable_when_a_rank_looks_is_retryable_not_a_verdict_on_the_folder(tmp_path):
    """Out of retries there is not "another folder": exit 1 (StorageUnavailableError), which the agent and
    schedulers retry, with the rank and the store's words; rank 0 removes its marker."""
    url = str(tmp_path / "ck")
    res = run_ranks(tmp_path, unreachable_on_rank_1, 2, url=url)
    for r in res:
        assert r["kind"] == "StorageUnavailableError", r
        assert "rank 1 on host " in r["error"], r
        assert "could not look for it: StorageUnavailableError: S3 HEAD" in r["error"], r
        assert NOT_SHARED not in r["error"], r
    assert res[0]["left"] == []
