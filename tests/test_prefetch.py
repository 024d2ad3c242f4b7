"""harness/prefetch.py: a restarting worker reads the newest committed local checkpoint into the page cache
before it imports torch. Checked with the page cache itself (mincore): which files are resident after the
prefetch, starting from files made cold (local data files are written with O_DIRECT and evicted besides)."""

from __future__ import annotations

import glob
import os

import pytest
import torch

from ckpt_helpers import Net, save_killed_before_commit
from harness import CheckpointManager, prefetch
from page_cache import evict, resident_fraction


def _data_files(folder: str, name: str) -> list[str]:
    return sorted(glob.glob(os.path.join(folder, name, "data-*.bin")))


def _resident(files: list[str]) -> float:
    return min(resident_fraction(f) for f in files)


@pytest.fixture
def folder(tmp_path) -> str:
    """Steps 1 and 2 committed, step 3 killed before its commit record; every file cold."""
    url = str(tmp_path / "ck")
    model = torch.nn.Sequential(Net(), torch.nn.Linear(4, 1024), torch.nn.Linear(1024, 1024))  # ~4 MB
    mgr = CheckpointManager(url, keep_last=0)
    mgr.save(1, models=model)
    mgr.save(2, models=model)
    try:
        save_killed_before_commit(mgr, 3, models=model)
    finally:
        mgr.close()
    for path in glob.glob(os.path.join(url, "*", "*")):
        evict(path)
    if max(resident_fraction(f) for f in glob.glob(os.path.join(url, "*", "data-*.bin"))) > 0.05:
        pytest.skip("this filesystem keeps the files cached (tmpfs?): nothing to measure")
    return url


def test_warms_only_the_newest_committed_checkpoint(folder):
    newest, nbytes = prefetch.warm(folder)
    assert os.path.basename(newest) == "step-000000002"  # step 3 has no commit record: restore skips it
    files = glob.glob(os.path.join(newest, "*"))
    assert nbytes == sum(os.path.getsize(f) for f in files) > 4 << 20
    assert _resident(_data_files(folder, "step-000000002")) > 0.99
    assert _resident(_data_files(folder, "step-000000001")) < 0.05
    assert _resident(_data_files(folder, "step-000000003")) < 0.05


def test_a_checkpoint_too_large_for_available_memory_is_left_cold(folder):
    assert prefetch.warm(folder, available=1 << 20) is None
    assert _resident(_data_files(folder, "step-000000002")) < 0.05


def test_started_on_a_thread_by_rank_0_for_local_folders_only(folder, monkeypatch):
    for url in ("s3://bucket/ck", "memory://ck", "simplecache::s3://bucket/ck", ""):
        assert prefetch.start(url) is None
    monkeypatch.setenv("RANK", "1")  # rank 0 reads (and warms its machine's page cache); the others receive
    assert prefetch.start(folder) is None
    monkeypatch.setenv("RANK", "0")
    thread = prefetch.start("file://" + folder)
    assert thread is not None and thread.daemon
    thread.join(30)
    assert _resident(_data_files(folder, "step-000000002")) > 0.99


def test_nothing_to_warm_is_quiet(tmp_path):
    assert prefetch.warm(str(tmp_path)) is None  # no checkpoint yet: a first run
    (tmp_path / "step-000000001").mkdir()
    assert prefetch.warm(str(tmp_path)) is None  # only an uncommitted folder
    with pytest.raises(FileNotFoundError):
        prefetch.warm(str(tmp_path / "missing"))
    thread = prefetch.start(str(tmp_path / "missing"))  # a hint only: the restore reports a missing folder
    assert thread is not None
    thread.join(30)
    assert not thread.is_alive()
