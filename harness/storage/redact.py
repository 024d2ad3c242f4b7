"""The one secret redactor: credentials never reach a log line, an error message or a printed URL.

Secrets come from three places - the ``user:password@`` part of a URL, the values of storage options, and
the AWS environment / the backend's own credentials - and are blanked out of any text by :func:`scrub`.
"""

from __future__ import annotations

import os
import re
from typing import Iterable

_SECRET_WORDS = ("key", "secret", "token", "password", "credential")
_CRED_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")
AWS_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECURITY_TOKEN")


def redact_url(url: str | os.PathLike) -> str:
    """The URL without any user:password@ part, for logs and errors."""
    url = os.fspath(url)
    if "://" in url and "@" in url.split("://", 1)[1].split("/", 1)[0]:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def url_secrets(url: str | os.PathLike) -> list[str]:
    """The user:password part of a URL and its pieces: backends may echo them (e.g. in a bucket name)."""
    url = os.fspath(url)
    if "://" not in url:
        return []
    netloc = url.split("://", 1)[1].split("/", 1)[0]
    if "@" not in netloc:
        return []
    userinfo = netloc.rsplit("@", 1)[0]
    return [userinfo, *userinfo.split(":", 1)]


def secret_values(obj: object, secret: bool = False) -> list[str]:
    """String values of options whose name says credential (key, secret, token...), at any depth."""
    if isinstance(obj, dict):
        return [s for k, v in obj.items()
                for s in secret_values(v, secret or any(w in str(k).lower() for w in _SECRET_WORDS))]
    if isinstance(obj, (list, tuple)):
        return [s for v in obj for s in secret_values(v, secret)]
    return [obj] if secret and isinstance(obj, str) else []


def env_secrets() -> list[str]:
    """Credentials in the standard AWS environment variables."""
    return [os.environ.get(k, "") for k in AWS_SECRET_ENV]


def scrub(text: str, secrets: Iterable[str] = (), min_len: int = 4) -> str:
    """``text`` with every secret (at least ``min_len`` characters: shorter ones would blank ordinary words)
    and every URL's user:password@ part replaced by ``***``."""
    for value in sorted({s for s in secrets if isinstance(s, str) and len(s) >= min_len}, key=len, reverse=True):
        text = text.replace(value, "***")
    return _CRED_RE.sub(r"\1***@", text)


def one_line(text: str, secrets: Iterable[str] = ()) -> str:
    """A message as one scrubbed line (for the CLI's ``harness: error: ...``)."""
    return scrub(" ".join(str(text).split()), secrets)


class Redactor:
    """A fixed set of secrets to scrub from messages (one per Storage)."""

    def __init__(self, secrets: Iterable[str] = (), min_len: int = 6) -> None:
        self.min_len = min_len
        self.secrets = sorted({s for s in secrets if isinstance(s, str) and len(s) >= min_len}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        return scrub(text, self.secrets, self.min_len)
