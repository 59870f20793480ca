"""A fault-injecting HTTP proxy in front of the loopback S3 server, for tests.

Why a proxy and not mocks: the faults must hit the whole real stack (zarr's FsspecStore,
s3fs, aiobotocore, aiohttp, botocore's retries) in the Ray actors as well as the driver,
exactly as a flaky object store would. The proxy forwards every request to moto and, by a
seeded plan, instead:

* ``reset``: drops the connection with a TCP RST before forwarding (nothing applied);
* ``500`` / ``503``: answers ``InternalError`` / ``SlowDown`` without forwarding;
* ``slow``: waits ``slow_s`` seconds, then forwards;
* ``applied-lost``: forwards (the server applies the request), then resets the connection
  instead of answering, so the client sees a failure for a request that took effect;
* ``applied-timeout``: forwards, then holds the answer longer than the client's read
  timeout (``hold_s``) and drops it: the same, by timeout.

``fail_always`` (a regex on the request path, for PUTs) answers 503 to every matching
write: a unit whose writes keep failing. ``counts`` records what was injected and
``requests`` every request seen, as ``(method, path, action)``.

Usage::

    with S3Server() as s3, FaultProxy(s3.endpoint_url, rate=0.2) as proxy:
        so = {**s3.storage_options, "endpoint_url": proxy.url}
"""

from __future__ import annotations

import http.client
import random
import re
import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

__all__ = ["ACTIONS", "FaultProxy"]

ACTIONS = ("reset", "500", "503", "slow", "applied-lost", "applied-timeout")
_ERRORS = {
    500: b"<Error><Code>InternalError</Code><Message>We encountered an internal error. "
    b"Please try again.</Message></Error>",
    503: b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>",
}
_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


class FaultProxy:
    """A threaded HTTP proxy on ``127.0.0.1:<free port>`` injecting faults; a context manager."""

    def __init__(
        self,
        upstream: str,
        *,
        rate: float = 0.0,
        seed: int = 0,
        actions: tuple[str, ...] = ACTIONS,
        slow_s: float = 0.3,
        hold_s: float = 3.0,
        fail_always: str | None = None,
        max_per_action: int | None = None,
    ) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", int(parts.port or 80))
        self.rate = rate
        self.actions = actions
        self.slow_s = slow_s
        self.hold_s = hold_s
        self.fail_always = re.compile(fail_always) if fail_always else None
        self.max_per_action = max_per_action
        self.counts: Counter[str] = Counter()
        self.requests: list[tuple[str, str, str]] = []
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self.url = ""

    # -- the plan --------------------------------------------------------------------------
    def _choose(self, method: str, path: str) -> str:
        with self._lock:
            if self.fail_always is not None and method == "PUT" and self.fail_always.search(path):
                action = "fail-always"
            elif self.rate and self._rng.random() < self.rate:
                action = self._rng.choice(self.actions)
                if self.max_per_action is not None and self.counts[action] >= self.max_per_action:
                    action = "pass"
            else:
                action = "pass"
            self.counts[action] += 1
            self.requests.append((method, path, action))
            return action

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> FaultProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            self.rfile.readline()
                            return bytes(out)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _reset(self) -> None:
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.close_connection = True
                self.connection.close()

            def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    headers.pop("Content-Length", None)
                    headers["Content-Length"] = str(len(body))
                try:
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    return resp.status, resp.getheaders(), data
                finally:
                    conn.close()

            def _answer(self, status: int, headers: list[tuple[str, str]], data: bytes) -> None:
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in _HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _handle(self) -> None:
                body = self._body()
                action = proxy._choose(self.command, self.path)
                if action == "reset":
                    return self._reset()
                if action in ("500", "503", "fail-always"):
                    code = 503 if action != "500" else 500
                    return self._answer(code, [("Content-Type", "application/xml")], _ERRORS[code])
                if action == "slow":
                    time.sleep(proxy.slow_s)
                status, headers, data = self._forward(body)
                if action == "applied-lost":
                    return self._reset()
                if action == "applied-timeout":
                    time.sleep(proxy.hold_s)
                    return self._reset()
                self._answer(status, headers, data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
