"""Shared fixtures: checkpoint locations (local and memory://), a clean fault seam, the process runner and
the uninterrupted reference run of the end-to-end trainer tests, and the S3 server (conftest_s3)."""

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


@pytest.fixture
def runner(tmp_path):
    """A trainer_helpers.Runner for this test: whatever it started is killed (whole trees) when the test ends."""
    from trainer_helpers import Runner  # imported here: only the end-to-end tests need it

    r = Runner(tmp_path)
    yield r
    r.close()


@pytest.fixture(scope="session")
def ref(tmp_path_factory):
    """The final state of one uninterrupted 2-rank torchrun run (trainer_helpers.Reference), shared by every
    test of the session; started in the background on first use, ``.get()`` waits for it."""
    from trainer_helpers import reference

    return reference(tmp_path_factory.getbasetemp())


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
