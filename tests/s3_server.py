"""A real S3 endpoint for the tests: moto's server over HTTP on loopback, in this process.

Nothing on the S3 path is mocked: s3fs/aiobotocore talk HTTP to moto exactly as they would to AWS. The
environment is pointed at it the standard way (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...), with
dummy credentials whose secret is distinctive so tests can scan logs and stored objects for it.

moto enforces S3's 5 MiB minimum for multipart parts; the tests lower it (``S3_UPLOAD_PART_MIN_SIZE``) so
the multipart logic runs with small parts instead of gigabytes.
"""

from __future__ import annotations

import logging
import os
import uuid
from typing import Iterator

MIN_PART_BYTES = 16 * 1024
os.environ.setdefault("S3_UPLOAD_PART_MIN_SIZE", str(MIN_PART_BYTES))

ACCESS_KEY = "AKIAHARNESSTESTKEY01"
SECRET_KEY = "hArNeSs-sEcReT-7c1f0e9d2b4a-do-not-log"
REGION = "us-east-1"

ENV_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
            "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE",
            "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_EC2_METADATA_DISABLED")


class S3Server:
    """moto's ThreadedMotoServer on 127.0.0.1 (a free port) plus the AWS environment pointing at it."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer
        import moto.s3.models

        # In case moto was imported before us; stop() puts moto's own value back.
        self._moto_part_min = moto.s3.models.S3_UPLOAD_PART_MIN_SIZE
        moto.s3.models.S3_UPLOAD_PART_MIN_SIZE = MIN_PART_BYTES
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._saved: dict[str, str | None] = {}
        self.endpoint = ""

    def start(self) -> "S3Server":
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        env = self.env()
        self._saved = {k: os.environ.get(k) for k in ENV_KEYS}
        for k in ENV_KEYS:
            os.environ.pop(k, None)
        os.environ.update(env)
        _clear_s3fs_cache()
        return self

    def env(self) -> dict[str, str]:
        """The environment a subprocess needs to reach this server (standard AWS variables only)."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": REGION,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_CONFIG_FILE": os.devnull,
                "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_EC2_METADATA_DISABLED": "true"}

    def stop(self) -> None:
        import moto.s3.models

        self._server.stop()
        moto.s3.models.S3_UPLOAD_PART_MIN_SIZE = self._moto_part_min
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _clear_s3fs_cache()

    def client(self):
        """A plain boto3 client for test setup and inspection (independent of the code under test)."""
        import boto3
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name=REGION)

    def new_bucket(self, prefix: str = "harness-test") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def all_objects(self, bucket: str) -> Iterator[tuple[str, bytes]]:
        """Every object in a bucket with its bytes."""
        c = self.client()
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for o in page.get("Contents", []):
                yield o["Key"], c.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()

    def uploads(self, bucket: str) -> list[dict]:
        """Unfinished multipart uploads in a bucket."""
        return self.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])


def _clear_s3fs_cache() -> None:
    try:
        import s3fs
        s3fs.S3FileSystem.clear_instance_cache()
    except ImportError:  # pragma: no cover
        pass
