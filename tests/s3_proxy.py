"""A fault-injecting HTTP proxy between the S3 client and moto: what real object stores do on bad days.

On a seeded random fraction of requests (``rate``; the seed is printed) it answers instead of moto, or
breaks the exchange:

* ``500``          - 500 InternalError with S3's XML error body (not forwarded);
* ``503``          - 503 SlowDown, "Please reduce your request rate." (not forwarded);
* ``reset``        - TCP reset before any answer (not forwarded);
* ``stall``        - no answer for ``stall_s`` (longer than the client's read timeout), then a close;
* ``reset_after``  - forwarded to moto (the request takes effect!), then a reset instead of the answer:
                     the client must cope with an outcome it never saw (idempotent retries).

It can also play an IAM front door: ``deny[ACCESS_KEY_ID] = "invalid"`` answers 403 InvalidAccessKeyId and
``"denied"`` answers 403 AccessDenied for requests signed with that key id (moto checks no credentials by
default; its IAM mode would need IAM-created keys for every test).
"""

from __future__ import annotations

import collections
import http.client
import random
import re
import socket
import struct
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

KINDS = {"500": 3, "503": 3, "reset": 2, "stall": 1, "reset_after": 1}   # relative weights

_MESSAGES = {
    "InternalError": "We encountered an internal error. Please try again.",
    "SlowDown": "Please reduce your request rate.",
    "InvalidAccessKeyId": "The AWS Access Key Id you provided does not exist in our records.",
    "AccessDenied": "Access Denied",
}
_CRED_RE = re.compile(r"Credential=([^/,\s]+)/")
_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "expect"}


class FaultProxy:
    def __init__(self, target: str, rate: float = 0.0, seed: int | None = None, kinds: dict | None = None,
                 stall_s: float = 2.0) -> None:
        self.target = urlsplit(target)
        self.stall_s = stall_s
        self.kinds = dict(kinds or KINDS)
        self.deny: dict[str, str] = {}
        self.counts: collections.Counter = collections.Counter()
        self.log: list[tuple[str, str, int]] = []   # (method, path?query, status) of requests moto answered
        self._lock = threading.Lock()
        self.configure(rate, seed)
        self._server: ThreadingHTTPServer | None = None

    def configure(self, rate: float, seed: int | None = None, kinds: dict | None = None) -> None:
        with self._lock:
            self.rate = rate
            self.seed = random.randrange(1 << 31) if seed is None else seed
            self._rng = random.Random(self.seed)
            if kinds is not None:
                self.kinds = dict(kinds)
        if rate:
            print(f"fault proxy: rate={rate} seed={self.seed} kinds={self.kinds}")

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FaultProxy":
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, args=(0.05,), name="fault-proxy", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def pick(self) -> str | None:
        with self._lock:
            self.counts["requests"] += 1
            if self.rate <= 0 or self._rng.random() >= self.rate:
                return None
            kind = self._rng.choices(list(self.kinds), weights=list(self.kinds.values()))[0]
            self.counts[kind] += 1
            return kind

    def injected(self) -> int:
        return sum(v for k, v in self.counts.items() if k != "requests")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: FaultProxy

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._handle()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _handle(self) -> None:
        body = self._body()
        m = _CRED_RE.search(self.headers.get("Authorization", ""))
        verdict = self.owner.deny.get(m.group(1)) if m else None
        if verdict == "invalid":
            return self._error(403, "InvalidAccessKeyId")
        if verdict == "denied":
            return self._error(403, "AccessDenied")
        kind = self.owner.pick()
        if kind == "500":
            return self._error(500, "InternalError")
        if kind == "503":
            return self._error(503, "SlowDown")
        if kind == "reset":
            return self._reset()
        if kind == "stall":
            time.sleep(self.owner.stall_s)
            return self._reset()
        status, headers, data = self._forward(body)
        with self.owner._lock:
            self.owner.log.append((self.command, self.path, status))
        if kind == "reset_after":
            return self._reset()
        self.send_response(status)
        for k, v in headers:
            if k.lower() not in _HOP and k.lower() not in ("content-length", "server", "date"):
                self.send_header(k, v)
        length = next((v for k, v in headers if k.lower() == "content-length"), None)
        self.send_header("Content-Length", length if self.command == "HEAD" and length else str(len(data)))
        self.end_headers()
        if self.command != "HEAD" and data:
            self.wfile.write(data)

    def _forward(self, body: bytes) -> tuple[int, list, bytes]:
        t = self.owner.target
        conn = http.client.HTTPConnection(t.hostname, t.port, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP and k.lower() != "content-length"}
            headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.getheaders(), data
        finally:
            conn.close()

    def _error(self, status: int, code: str) -> None:
        rid = uuid.uuid4().hex[:16].upper()
        xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{_MESSAGES[code]}'
               f'</Message><RequestId>{rid}</RequestId><HostId>fault-proxy</HostId></Error>').encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("x-amz-request-id", rid)
        self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(xml)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(xml)

    def _reset(self) -> None:
        """Drop the connection with a TCP RST (SO_LINGER 0), as a crashed front end would."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
