"""Fixtures for the S3 tests (imported by conftest.py): a moto server per session, a fresh bucket per test,
and a fault-injecting proxy in front of the server. moto is imported only when an S3 test runs."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on loopback for the whole session; the AWS environment points at it meanwhile."""
    from s3_server import S3Server
    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A new, empty bucket."""
    return s3_server.new_bucket()


@pytest.fixture
def s3_url(s3_bucket) -> str:
    """A checkpoint folder URL in a new bucket."""
    return f"s3://{s3_bucket}/runs/test"


@pytest.fixture
def fault_proxy(s3_server):
    """A fault-injecting HTTP proxy in front of moto (rate 0 until a test sets it)."""
    from s3_proxy import FaultProxy
    proxy = FaultProxy(s3_server.endpoint).start()
    yield proxy
    proxy.stop()
