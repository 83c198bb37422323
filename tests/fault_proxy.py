"""A loopback HTTP proxy that fails a set fraction of requests, for storage fault tests.

Put it in front of fake-gcs-server (``tests/gcs_emulator.py``'s :func:`emulator`) and point gcsfs
and tensorstore at it: every request is forwarded unchanged except those picked for a fault,
which get one of

- ``"503"``: a ``503 Service Unavailable`` JSON error, as GCS answers when it is overloaded;
- ``"429"``: a ``429 Too Many Requests`` JSON error (rate limiting);
- ``"reset"``: the request is read and dropped and the connection closed with a TCP reset;
- ``"reset-after"``: the request *is* forwarded (the upload or delete happens) and then the
  connection is reset before the answer arrives: the client cannot know it succeeded. A retried
  last chunk of a resumable upload that had finished gets the answer that finished it, as from GCS
  (fake-gcs-server itself answers 404 there).

Faults are bounded (``max_faults``), so a client that retries long enough always gets through;
``max_faults=None`` with ``rate=1.0`` is an outage, to test what happens when retries run out.
The draws come from a generator seeded at :meth:`FaultProxy.arm`, so a run sees the same
sequence of fault kinds every time.

    with FaultProxy(upstream="http://127.0.0.1:4443") as proxy:
        proxy.arm(rate=0.2, kinds=("503", "reset"), max_faults=30)
        ...  # clients talk to proxy.url
        print(proxy.injected)  # {"503": 14, "reset": 16}
"""

from __future__ import annotations

import contextlib
import http.client
import json
import random
import socket
import struct
import sys
import threading
import urllib.parse
from collections import Counter
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

FAULT_KINDS = ("503", "429", "reset", "reset-after")

# Headers that describe one hop's connection, not the message: never forwarded as they are.
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
}


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        # A client that gave up on a request (a cancelled read, its own timeout) closes the
        # connection under the proxy's answer: normal for a proxy, not worth a traceback.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class FaultProxy:
    """A threaded HTTP/1.1 proxy on 127.0.0.1 that injects faults into a fraction of requests.

    Args:
        upstream: ``http://host:port`` of the real server.
    """

    def __init__(self, upstream: str) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        self._upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self._rng = random.Random(0)
        self._lock = threading.Lock()
        self._rate = 0.0
        self._kinds: tuple[str, ...] = ()
        self._faults_left: int | None = 0
        self.requests = 0
        """Requests seen (faulted or not) since the proxy started."""
        self.injected: Counter[str] = Counter()
        """Faults injected, by kind, since the last :meth:`arm`."""
        self.faulted: list[str] = []
        # upload_id -> the answer that finished that resumable upload (see `_proxy`).
        self._finished_uploads: dict[str, tuple[int, str, list[tuple[str, str]], bytes]] = {}
        """``"METHOD path"`` of each faulted request, since the last :meth:`arm`."""
        self._server = _Server(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """The proxy's ``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def arm(
        self, *, rate: float, kinds: Sequence[str], max_faults: int | None, seed: int = 0
    ) -> None:
        """Fault each following request with probability ``rate``, until ``max_faults`` are done.

        Args:
            rate: Probability in [0, 1] that a request is faulted.
            kinds: Fault kinds to draw from uniformly (see the module docstring).
            max_faults: Stop injecting after this many faults; None: never stop.
            seed: Seed of the draws from here on. Every request makes the same draws, so the
                sequence of fault kinds is the same from run to run; which request gets which
                depends on the order concurrent requests arrive in.
        """
        unknown = set(kinds) - set(FAULT_KINDS)
        if unknown or not kinds or not 0.0 <= rate <= 1.0:
            raise ValueError(f"bad fault settings: rate {rate}, kinds {kinds}")
        with self._lock:
            self._rng = random.Random(seed)
            self._rate, self._kinds, self._faults_left = rate, tuple(kinds), max_faults
            self.injected = Counter()
            self.faulted = []

    def disarm(self) -> None:
        """Forward every request from now on."""
        with self._lock:
            self._faults_left = 0

    def _draw(self, request: str) -> str | None:
        with self._lock:
            self.requests += 1
            if self._faults_left == 0 or self._rng.random() >= self._rate:
                return None
            kind = self._rng.choice(self._kinds)
            if self._faults_left is not None:
                self._faults_left -= 1
            self.injected[kind] += 1
            self.faulted.append(request)
            return kind

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real clients use it
            upstream: http.client.HTTPConnection | None = None

            def log_message(self, format: str, *args: object) -> None:
                pass  # the test's output stays readable

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _reset(self) -> None:
                # SO_LINGER 0: close() sends RST instead of FIN, as a dropped connection does.
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.close()

            def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                headers["Content-Length"] = str(len(body))
                for attempt in range(2):  # the upstream may have closed an idle keep-alive
                    if self.upstream is None:
                        self.upstream = http.client.HTTPConnection(*proxy._upstream, timeout=60)
                    try:
                        self.upstream.request(self.command, self.path, body, headers)
                        response = self.upstream.getresponse()
                        data = response.read()
                        return response.status, response.reason, response.getheaders(), data
                    except (http.client.HTTPException, OSError):
                        self.upstream.close()
                        self.upstream = None
                        if attempt:
                            raise
                raise AssertionError("unreachable")

            def _proxy(self) -> None:
                body = self._body()
                kind = proxy._draw(f"{self.command} {self.path}")
                if kind == "reset":
                    self._reset()
                    return
                if kind in ("503", "429"):
                    code = int(kind)
                    payload = json.dumps(
                        {"error": {"code": code, "message": f"injected {code}"}}
                    ).encode()
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                upload_id = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query).get(
                    "upload_id", [None]
                )[0]
                finished = proxy._finished_uploads.get(upload_id) if upload_id else None
                if finished is not None and self.command in ("PUT", "POST"):
                    # A client re-sending the last chunk (gcsfs: a POST) of an upload that finished
                    # (its answer was lost to a "reset-after") gets what GCS answers: 200/201
                    # with the object. fake-gcs-server answers 404, which real GCS never does.
                    status, reason, headers, data = finished
                else:
                    status, reason, headers, data = self._forward(body)
                    if upload_id and self.command in ("PUT", "POST") and status in (200, 201):
                        proxy._finished_uploads[upload_id] = (status, reason, headers, data)
                if kind == "reset-after":
                    self._reset()
                    return
                self.send_response(status, reason)
                for key, value in headers:
                    if key.lower() in _HOP_BY_HOP:
                        continue
                    if key.lower() == "content-length" and self.command != "HEAD":
                        continue
                    self.send_header(key, value)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _proxy

            def finish(self) -> None:
                with contextlib.suppress(OSError, ValueError):  # after a reset
                    super().finish()
                if self.upstream is not None:
                    self.upstream.close()

        return Handler
