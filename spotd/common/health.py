"""One small HTTP server per process: /healthz, /readyz, /metrics (and the controller's /status).

The standard library's WSGI server in a thread, with prometheus-client's WSGI app for /metrics: no web
framework in the agent (aiohttp alone is about 11 MB resident on every node, bench/bench_agent.py), and no
HTTP code of our own. Each request gets a short-lived thread (as prometheus-client's own server does), so
a client that stalls (cut off after ``_CLIENT_TIMEOUT``) never delays a kubelet probe. The server thread
sleeps in select() until a request comes (no periodic wake-ups); stop() wakes it with a connection.

liveness and readiness are called from those threads: they must only read (a bool, a few floats).
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

_CLIENT_TIMEOUT = 5.0
_TEXT = ("Content-Type", "text/plain; charset=utf-8")


class _Handler(WSGIRequestHandler):
    timeout = _CLIENT_TIMEOUT  # socket timeout per connection: a stalled client does not hold the server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # probes every few seconds are not worth a log line


class _Server(ThreadingMixIn, WSGIServer):
    allow_reuse_address = True
    daemon_threads = True  # a stalled client does not hold up stop()


class _Server6(_Server):
    address_family = socket.AF_INET6


class HealthServer:
    """liveness: the loops are alive. readiness: connected to the API server (and whatever else matters)."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        liveness: Callable[[], bool],
        readiness: Callable[[], bool],
        detail: Callable[[], str] | None = None,
        status: Callable[[], bytes] | None = None,
    ) -> None:
        self._host, self._port = host, port
        self._detail = detail  # a line /readyz adds (the controller: what it may drain)
        self._status = status  # a JSON document for GET /status (the controller's: `spotd status` reads it)
        self._liveness, self._readiness = liveness, readiness
        self._metrics = make_wsgi_app(registry)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.port = port

    async def start(self) -> None:
        server_class = _Server6 if ":" in self._host else _Server
        self._server = make_server(self._host, self._port, self._app, server_class, _Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": None}, name="health-server", daemon=True
        )
        self._thread.start()

    async def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._server = self._thread = None
        await asyncio.to_thread(self._shutdown, server, thread)
        server.server_close()

    def _shutdown(self, server: WSGIServer, thread: threading.Thread) -> None:
        """Ask serve_forever to return, and connect until it has: the select() it sleeps in returns on a
        connection, and only then does it see the request (which may come after our first connection)."""
        stopping = threading.Thread(target=server.shutdown, daemon=True)  # returns once serve_forever has
        stopping.start()
        host = "::1" if server.address_family == socket.AF_INET6 else "127.0.0.1"
        if self._host not in ("", "0.0.0.0", "::"):
            host = self._host
        for _ in range(50):
            try:
                with socket.create_connection((host, self.port), timeout=1.0):
                    pass
            except OSError:
                pass
            stopping.join(0.1)
            if not stopping.is_alive():
                break
        thread.join(1.0)

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return self._metrics(environ, start_response)
        if path == "/healthz":
            ok = self._liveness()
            return _answer(start_response, ok, b"ok\n" if ok else b"loops stalled\n")
        if path == "/readyz":
            ok = self._readiness()
            text = "ready\n" if ok else "not ready\n"
            if self._detail is not None:
                text += self._detail() + "\n"
            return _answer(start_response, ok, text.encode())
        if path == "/status" and self._status is not None:
            start_response("200 OK", [("Content-Type", "application/json")])
            return [self._status()]
        start_response("404 Not Found", [_TEXT])
        return [b"not found\n"]


def _answer(start_response: Callable[..., Any], ok: bool, body: bytes) -> list[bytes]:
    # A new list each time: wsgiref adds Content-Length to the one it is given.
    start_response("200 OK" if ok else "503 Service Unavailable", [_TEXT])
    return [body]


class Heartbeat:
    """Loops beat; /healthz is ok while every registered loop beat within its allowance."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._last: dict[str, tuple[float, float]] = {}

    def beat(self, loop: str, allowance: float) -> None:
        self._last[loop] = (self._clock(), allowance)

    def alive(self) -> bool:
        """Safe to call from another thread (the health server's)."""
        now = self._clock()
        return all(now - at <= allowance for at, allowance in list(self._last.values()))
