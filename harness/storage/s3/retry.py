"""S3 errors and retries: which failures deserve another try, exponential backoff with full jitter within a
time budget per operation, and one-line descriptions of failures.

Throttling (503 SlowDown, 429, ...), 5xx, connection resets, read/connect timeouts and truncated bodies are
retried; then a one-line :class:`RetriesExhausted`. A retrying operation logs one INFO line when it starts
retrying and one when it ends (attempts, seconds); each attempt is logged at DEBUG only.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, TypeVar

from harness.errors import StorageUnavailableError
from harness.storage.errors import StorageOpError

log = logging.getLogger("harness")

T = TypeVar("T")

# Error codes worth another try. Throttling gets a longer backoff than a plain 5xx.
THROTTLE_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "ThrottledException",
                            "RequestThrottled", "RequestThrottledException", "TooManyRequests",
                            "TooManyRequestsException", "RequestLimitExceeded", "BandwidthLimitExceeded",
                            "ProvisionedThroughputExceededException", "503"})
TRANSIENT_CODES = frozenset({"InternalError", "ServiceUnavailable", "RequestTimeout", "RequestTimeoutException",
                             "PriorRequestNotComplete", "InternalFailure", "500", "502", "504"})
CREDENTIAL_CODES = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
                              "TokenRefreshRequired", "InvalidSecurity", "AuthorizationHeaderMalformed"})


class ShortReadError(Exception):
    """A response body ended before its Content-Length (a dropped connection): retryable."""


def client_error_info(exc: BaseException) -> tuple[str, int, str] | None:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict) or "Error" not in response:
        return None
    err = response.get("Error") or {}
    status = int((response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
    return str(err.get("Code") or status), status, str(err.get("Message") or "")


def retry_kind(exc: BaseException) -> str | None:
    """'throttle', 'transient' or None (do not retry)."""
    info = client_error_info(exc)
    if info is not None:
        code, status, _ = info
        if code in THROTTLE_CODES or status in (429, 503):
            return "throttle"
        if code in TRANSIENT_CODES or status >= 500:
            return "transient"
        return None
    if isinstance(exc, ShortReadError):
        return "transient"
    try:
        from botocore import exceptions as bex
        from botocore.parsers import ResponseParserError  # throttling front ends sometimes send bad XML
    except ImportError:  # pragma: no cover - s3fs depends on botocore
        bex = None
    if bex is not None:
        if isinstance(exc, (bex.NoCredentialsError, bex.PartialCredentialsError, bex.ParamValidationError)):
            return None
        if isinstance(exc, (bex.ConnectionError, bex.HTTPClientError, bex.IncompleteReadError,
                            ResponseParserError)):
            return "transient"
    try:
        import aiohttp
        if isinstance(exc, aiohttp.ClientError):
            return "transient"
    except ImportError:  # pragma: no cover
        pass
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError, ConnectionError)):
        return "transient"
    return None


def describe(exc: BaseException) -> str:
    """A short one-line description of an S3 failure."""
    info = client_error_info(exc)
    if info is not None:
        code, status, message = info
        text = f"{status} {code}" if status and str(status) != code else code
        return f"{text}: {message}"[:300] if message else text
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__


@dataclass
class RetryPolicy:
    """Exponential backoff with full jitter, bounded by a time budget per operation."""

    budget_s: float = 120.0
    base_s: float = 0.05          # first delay is drawn from [0, base_s * 2]
    cap_s: float = 8.0            # no single delay longer than this
    throttle_factor: float = 4.0  # SlowDown & co. back off this much harder

    def delay(self, attempt: int, kind: str, rng: random.Random | None = None) -> float:
        """Delay before attempt ``attempt + 1`` (``attempt`` >= 1 failed so far)."""
        base = self.base_s * (self.throttle_factor if kind == "throttle" else 1.0)
        return (rng or random).uniform(0, min(self.cap_s, base * 2 ** attempt))

    async def run(self, what: str, fn: Callable[[], Awaitable[T]], budget_s: float | None = None) -> T:
        budget = self.budget_s if budget_s is None else budget_s
        start = time.monotonic()
        attempt = 0
        loud = False  # the first two failures are blips, logged at DEBUG; a third says "retrying" once
        while True:
            attempt += 1
            try:
                result = await fn()
            except Exception as exc:  # noqa: BLE001 - classified below; anything else is re-raised
                kind = retry_kind(exc)
                elapsed = time.monotonic() - start
                if kind is None:
                    if loud:
                        log.info("S3 %s: gave up after %d attempts in %.1f s: %s", what, attempt, elapsed,
                                 describe(exc))
                    raise
                pause = self.delay(attempt, kind)
                if elapsed + pause > budget:
                    if loud:
                        log.info("S3 %s: gave up after %d attempts in %.1f s (retry budget %g s)", what, attempt,
                                 elapsed, budget)
                    raise RetriesExhausted(what, attempt, elapsed, budget, exc) from exc
                log.debug("S3 %s: %s; retry %d in %.2f s (%.1f s of the %g s budget used)", what, describe(exc),
                          attempt, pause, elapsed, budget)
                if attempt == 2 and not loud:
                    loud = True
                    log.info("S3 %s: %s; retrying for up to %g s (storage option harness_retry_budget_s)", what,
                             describe(exc), budget)
                await asyncio.sleep(pause)
                continue
            if loud:
                log.info("S3 %s: succeeded after %d attempts in %.1f s", what, attempt, time.monotonic() - start)
            return result


class RetriesExhausted(StorageOpError, StorageUnavailableError):
    """An operation still failed when its retry budget ran out (with errors worth retrying: retryable later)."""

    def __init__(self, what: str, attempts: int, elapsed: float, budget: float, last: BaseException) -> None:
        super().__init__(what, last, message=(
            f"S3 {what} failed after {attempts} attempt{'s' if attempts > 1 else ''} in {elapsed:.1f} s "
            f"(retry budget {budget:g} s, storage option harness_retry_budget_s): {describe(last)}"))
        self.attempts, self.elapsed, self.budget = attempts, elapsed, budget
        self.last = last
