"""The S3 access check: list the prefix and (for writers) PUT and DELETE a probe object, turning a missing
bucket, rejected credentials, a missing permission or an unreachable endpoint into one line naming the
bucket - never a credential."""

from __future__ import annotations

import uuid

from harness.errors import StorageError, StorageUnavailableError
from harness.storage.errors import StorageOpError
from harness.storage.s3.client import CREDENTIAL_CODES, S3Client
from harness.storage.s3.retry import RetriesExhausted, client_error_info, describe

ACCESS_CHECK_BUDGET_S = 30.0


def check_access(c: S3Client, root: str, write: bool) -> None:
    """A one-line StorageError naming the bucket and prefix if the root cannot be listed (or written)."""
    bucket, key = c.split(root)
    where = c.where(bucket, key)
    budget = min(c.policy.budget_s, ACCESS_CHECK_BUDGET_S)
    probe = f"{key.rstrip('/')}/.harness-access-check-{uuid.uuid4().hex}".lstrip("/")
    try:
        c.sync_raw(_probe, c, bucket, key, probe, write, budget)
    except StorageOpError as exc:  # out of retries: retryable later (exit 1); a refusal is not (exit 3)
        kind = StorageUnavailableError if isinstance(exc, RetriesExhausted) else StorageError
        raise kind(access_message(c, where, bucket, exc.step or "list", exc)) from None
    except StorageError as exc:
        raise StorageError(c.scrub(str(exc))) from None
    except Exception as exc:  # noqa: BLE001 - e.g. no credentials found before any request was made
        raise StorageError(access_message(c, where, bucket, "list", StorageOpError(where, exc))) from None


async def _probe(c: S3Client, bucket: str, key: str, probe: str, write: bool, budget: float) -> None:
    step = "list"
    try:
        prefix = key.rstrip("/") + "/" if key.strip("/") else ""
        await c.call(f"LIST {c.where(bucket, prefix)}", "list_objects_v2", budget, Bucket=bucket,
                     Prefix=prefix, MaxKeys=1)
        if write:
            step = "write"
            await c.call(f"PUT {c.where(bucket, probe)}", "put_object", budget, Bucket=bucket, Key=probe, Body=b"")
            step = "delete"
            await c.call(f"DELETE {c.where(bucket, probe)}", "delete_object", budget, Bucket=bucket, Key=probe)
    except StorageOpError as exc:
        exc.step = step
        raise


def access_message(c: S3Client, where: str, bucket: str, step: str, exc: StorageOpError) -> str:
    head = f"checkpoint storage {where}:"
    cause = exc.cause
    info = client_error_info(cause)
    code = info[0] if info else type(cause).__name__
    doing = {"list": "list", "write": "write to", "delete": "delete from"}[step]
    if code == "NoSuchBucket" or (info and info[1] == 404 and step == "list"):
        msg = f"{head} bucket '{bucket}' does not exist (check the bucket name, the region and AWS_ENDPOINT_URL)"
    elif code in CREDENTIAL_CODES:
        msg = (f"{head} S3 rejected the credentials ({code}) for bucket '{bucket}'; check AWS_ACCESS_KEY_ID/"
               "AWS_SECRET_ACCESS_KEY, AWS_PROFILE or checkpoint.storage_options")
    elif code in ("AccessDenied", "AllAccessDisabled") or (info and info[1] == 403):
        need = {"list": "s3:ListBucket", "write": "s3:PutObject", "delete": "s3:DeleteObject"}[step]
        msg = (f"{head} access denied: no permission to {doing} bucket '{bucket}' ({code}; "
               f"checkpoints need s3:ListBucket, s3:GetObject, s3:PutObject, s3:DeleteObject; this step needs {need})")
    elif type(cause).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
        msg = (f"{head} no AWS credentials found for bucket '{bucket}' (set AWS_ACCESS_KEY_ID and "
               "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or checkpoint.storage_options)")
    elif isinstance(exc, RetriesExhausted):
        msg = f"{head} cannot {doing} bucket '{bucket}': {exc}"
    else:
        msg = f"{head} cannot {doing} bucket '{bucket}': {describe(cause)}"
    return c.scrub(" ".join(msg.split()))
