"""Shared fixtures: checkpoint locations (local and memory://) and a clean fault seam."""

from __future__ import annotations

import uuid

import pytest
from fsspec.implementations.memory import MemoryFileSystem

from harness import faults


@pytest.fixture(params=["local", "memory"])
def ckpt_url(request, tmp_path):
    """A fresh checkpoint folder: a local path, or a unique memory:// path (cleared afterwards)."""
    if request.param == "local":
        yield str(tmp_path / "ckpt")
        return
    yield f"memory://ckpt-{uuid.uuid4().hex}/run"
    MemoryFileSystem.store.clear()
    MemoryFileSystem.pseudo_dirs[:] = [""]


@pytest.fixture(autouse=True)
def _no_fault_hook():
    """No test leaves an in-process fault hook behind."""
    faults.install(None)
    yield
    faults.install(None)


# S3 fixtures (s3_server, s3_bucket, s3_url, fault_proxy): moto's server over HTTP, imported lazily.
from conftest_s3 import fault_proxy, s3_bucket, s3_server, s3_url  # noqa: E402,F401


def pytest_addoption(parser):
    """Fault campaign size (tests/campaign, opt in with ``-m campaign``)."""
    group = parser.getgroup("campaign")
    group.addoption("--campaign-trials", type=int, default=200, help="in-process trials of the fault campaign")
    group.addoption("--campaign-process-trials", type=int, default=10, help="torchrun trials of the fault campaign")
    group.addoption("--campaign-s3-trials", type=int, default=0, help="in-process trials on S3 (moto + fault proxy)")
    group.addoption("--campaign-seed", type=int, default=None, help="campaign seed (random and printed if unset)")
    group.addoption("--campaign-json", default=None, help="write the campaign summary as JSON here")
    group.addoption("--fuzz-examples", type=int, default=2000, help="hypothesis examples per fuzz test (campaign)")
