"""Fail fast: a CheckpointManager whose folder cannot be written refuses at construction, with one line."""

import pytest
import torch

from harness import CheckpointManager, StorageError


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
