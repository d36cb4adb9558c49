"""A fault-injecting HTTP proxy on 127.0.0.1 in front of the S3 test server: S3 as it misbehaves in production.

Each request, before it reaches the server, fails at set rates with HTTP 500 (InternalError), HTTP 503 (SlowDown)
or a connection reset, or is answered late. Faults are drawn from a seeded generator, so a run is reproducible.
Counts of requests and of each injected fault are kept for the test to print and check.
"""
from __future__ import annotations

import http.client
import random
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_ERRORS = {500: ("InternalError", "We encountered an internal error. Please try again."),
           503: ("SlowDown", "Please reduce your request rate.")}
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


@dataclass
class FaultRates:
    error_500: float = 0.0
    slow_down_503: float = 0.0
    reset: float = 0.0
    slow: float = 0.0
    slow_seconds: float = 0.3


@dataclass
class FaultProxy:
    target: str  # the S3 server's endpoint, http://127.0.0.1:PORT
    rates: FaultRates
    seed: int = 0
    counts: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_) -> None:  # quiet
                pass

            def _handle(self) -> None:
                body = self._body()
                fault = proxy._draw()
                if fault == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    self.connection.close()  # an RST: the client sees "connection reset by peer"
                    self.close_connection = True
                    return
                if fault in ("500", "503"):
                    code, message = _ERRORS[int(fault)]
                    payload = (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code>"
                               f"<Message>{message}</Message></Error>").encode()
                    self.send_response(int(fault))
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":  # a HEAD answer has no body, or the next answer would be corrupt
                        self.wfile.write(payload)
                    return
                if fault == "slow":
                    time.sleep(proxy.rates.slow_seconds)
                self._forward(body)

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _forward(self, body: bytes) -> None:
                target = urlsplit(proxy.target)
                connection = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                headers["Content-Length"] = str(len(body))
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                payload = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in _HOP_BY_HOP and key.lower() != "content-length":
                        self.send_header(key, value)
                # A HEAD answer carries the object's length with no body.
                length = response.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)
                connection.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def _draw(self) -> str | None:
        with self._lock:
            self.counts["requests"] += 1
            roll = self._random.random()
            for name, rate in (("500", self.rates.error_500), ("503", self.rates.slow_down_503),
                               ("reset", self.rates.reset), ("slow", self.rates.slow)):
                if roll < rate:
                    self.counts[name] += 1
                    return name
                roll -= rate
            return None

    @property
    def injected(self) -> int:
        return sum(self.counts[k] for k in ("500", "503", "reset"))

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._server.shutdown()
        self._server.server_close()
