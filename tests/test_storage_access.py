"""Fail fast: a CheckpointManager whose folder cannot be written refuses at construction, with one line.
Once only: `harness launch` checks before starting workers, and its workers' managers do not check again
(same URL and options, moments later); anything else checks for itself."""

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from harness import CheckpointManager, StorageError
from harness.storage import Storage
from harness.storage.facade import CHECKED_ENV
from trainer_helpers import RUN_TIMEOUT, base_env, harness_args


def test_unwritable_local_dir_fails_at_construction(tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    with pytest.raises(StorageError, match="is not writable"):
        CheckpointManager(str(tmp_path / "afile" / "ck"))


def test_probe_leaves_nothing_and_read_only_needs_no_write(tmp_path):
    url = str(tmp_path / "ck")
    CheckpointManager(url).save(1, models=torch.nn.Linear(2, 2))
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["step-000000001"]
    (tmp_path / "ck").chmod(0o555)  # read-only folder: restoring must still work
    try:
        model = torch.nn.Linear(2, 2)
        if not _writable(tmp_path / "ck"):
            with pytest.raises(StorageError):
                CheckpointManager(url)
        assert CheckpointManager(url, read_only=True).restore(models=model).step == 1
    finally:
        (tmp_path / "ck").chmod(0o755)


def _writable(folder) -> bool:
    try:
        (folder / ".w").write_text("x")
        (folder / ".w").unlink()
        return True
    except OSError:
        return False  # root ignores permission bits, so this is only checked where it applies


# -- the launcher's check, handed to its workers ---------------------------------------------------------

@pytest.fixture
def no_marker(monkeypatch):
    monkeypatch.delenv(CHECKED_ENV, raising=False)


def test_remembered_check_is_not_repeated_for_the_same_storage_only(tmp_path, no_marker):
    (tmp_path / "afile").write_text("not a folder")
    url = str(tmp_path / "afile" / "ck")  # unusable: a manager that checks refuses it
    Storage(url).remember_access(write=True)
    CheckpointManager(url)  # the check passed "moments ago" for this URL: not repeated
    with pytest.raises(StorageError, match="is not writable"):
        CheckpointManager(url, storage_options={"harness_direct_io": False})  # other options: checked
    with pytest.raises(StorageError, match="is not writable"):
        CheckpointManager(url + "2")  # another URL: checked
    Storage(url).remember_access(write=False)
    with pytest.raises(StorageError, match="is not writable"):
        CheckpointManager(url)  # checked for reading only: a writer checks
    assert Storage(url).access_remembered(write=False)


def test_stale_or_garbled_record_means_check_again(tmp_path, monkeypatch, no_marker):
    storage = Storage(str(tmp_path / "ck"))
    storage.remember_access(write=True)
    rec = json.loads(os.environ[CHECKED_ENV])
    assert storage.access_remembered(write=True)
    assert not storage.access_remembered(write=True, within_s=0.0)
    monkeypatch.setenv(CHECKED_ENV, json.dumps({**rec, "at": time.time() - 3600}))  # a restart an hour on
    assert not storage.access_remembered(write=True)
    for garbled in ("", "{", "[1]", json.dumps({"id": rec["id"]})):
        monkeypatch.setenv(CHECKED_ENV, garbled)
        assert not storage.access_remembered(write=True)
    assert "ck" not in rec["id"] and str(tmp_path) not in os.environ[CHECKED_ENV]  # a digest, not the URL


PROBE = textwrap.dedent("""
    import json, os, torch
    from harness.storage import Storage
    from harness.workloads import SyntheticVectors, Workload

    def build(model_cfg, data_cfg, seed):
        seen = Storage(os.environ["PROBE_URL"]).access_remembered(write=True)
        with open(os.path.join(os.environ["PROBE_OUT"], "rank" + os.environ["RANK"]), "w") as f:
            json.dump(seen, f)
        torch.manual_seed(seed)
        return Workload(torch.nn.Linear(4, 2), SyntheticVectors(256, 4, 2, seed), torch.nn.functional.cross_entropy)
""")


def test_launch_hands_its_check_to_its_workers(tmp_path, no_marker):
    """Real `harness launch` (2 workers): the workers inherit the launcher's record of its check."""
    (tmp_path / "probe_wl.py").write_text(PROBE)
    cmd = [sys.executable, "-m", "harness", "launch", "--nproc-per-node", "2", "--max-restarts", "0",
           *harness_args(tmp_path, "train.entry='probe_wl:build'", "train.max_steps=2")[1:]]
    env = base_env(PROBE_URL=str(tmp_path / "ck"), PROBE_OUT=str(tmp_path))
    env["PYTHONPATH"] += os.pathsep + str(tmp_path)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [json.loads((tmp_path / f"rank{r}").read_text()) for r in (0, 1)] == [True, True]
