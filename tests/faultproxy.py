"""A fault-injecting HTTPS reverse proxy in front of the real kube-apiserver (issue 18).

The faults a real API server will not produce on demand (a failing node PATCH, slow evictions, 429s with
Retry-After, a watch dropped mid-way or gone silent) come from here, never from changing the server. The
proxy terminates TLS on 127.0.0.1 with the API server's own certificate (signed by the test CA that every
kubeconfig of tests/realcluster.py trusts), forwards each request to the real server over TLS and passes the
client's Authorization header through, so every identity stays the real one (a pod-bound token keeps its
node-name claim).

Rules match a method (a regex, whole) and a path with its query (a regex, searched), first rule first:

    proxy.add(Rule("PATCH", r"^/api/v1/nodes/n1\\b", status=500, times=3))   # answer 500 three times
    proxy.add(Rule("POST", r"/eviction$", status=429, retry_after=2, times=2))
    proxy.add(Rule("POST", r"/eviction$", delay=5))                         # forward each 5 s late
    watch = proxy.add(Rule("GET", r"/pods\\?.*watch=true"))                 # pass through, counted
    proxy.drop(watch)                                                        # close its open streams now
    proxy.add(Rule("GET", r"/nodes\\?.*watch=true", silent_after_lines=1, times=1))  # half-open

A rule counts the requests it matched (`seen`, with their monotonic times in `stamps`) and those it changed
(`applied`, at most `times`); after `times` its matches pass through unchanged. The proxy runs on its own
event loop in a thread (BackgroundLoop), so synchronous tests may block (RealCluster.wait_for) without
stalling it; the same loop can host the fake IMDS.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

T = TypeVar("T")

# Not passed on: hop-by-hop headers, and what the proxy sets itself (it re-frames every body).
_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "te", "trailer", "upgrade"}
)
_REASONS = {409: "Conflict", 429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable"}


class BackgroundLoop:
    """An asyncio loop in a daemon thread: `run(coro)` waits for its result from any other thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="faultproxy", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self.loop.is_running():
            self.loop.close()


@dataclass
class Rule:
    """One fault on the requests whose method fullmatches `method` and whose path?query `path` finds.

    status: answer this status (a Kubernetes Status body; Retry-After when `retry_after` is set) instead
    of forwarding. delay: seconds to hold the request before forwarding (or answering). drop_after_lines:
    forward the response and this many body lines (watch events), then close the connection.
    silent_after_lines: forward this many lines, then forward nothing more and keep the connection open
    (a half-open watch) until the client gives up or the proxy stops. hold: keep each request until
    `release()` (then forward it). times: how many matching requests get the fault (None: all); once they
    are spent, the next matching rule is tried. No fault at all: pass through, counted (and `drop()` can
    cut its streams).
    """

    method: str
    path: str
    status: int | None = None
    retry_after: float | None = None
    delay: float = 0.0
    drop_after_lines: int | None = None
    silent_after_lines: int | None = None
    hold: bool = False
    times: int | None = None
    seen: int = 0
    applied: int = 0
    stamps: list[float] = field(default_factory=list)
    streams: set[asyncio.BaseTransport] = field(default_factory=set, repr=False)  # connections of responses in flight
    released: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def matches(self, method: str, path_qs: str) -> bool:
        return re.fullmatch(self.method, method) is not None and re.search(self.path, path_qs) is not None

    def take(self, first: bool) -> bool:
        """Count one match; True when the fault applies to it (only the `first` applicable rule's does)."""
        self.seen += 1
        self.stamps.append(time.monotonic())
        if not first or (self.times is not None and self.applied >= self.times):
            return False
        self.applied += 1
        return True


class FaultProxy:
    """HTTPS on 127.0.0.1 (`url`), forwarding to `upstream` (https, verified with `ca_file`)."""

    def __init__(self, upstream: str, ca_file: Path, cert_file: Path, key_file: Path) -> None:
        self.upstream = upstream.rstrip("/")
        self._client_tls = ssl.create_default_context(cafile=str(ca_file))
        self._server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._server_tls.load_cert_chain(str(cert_file), str(key_file))
        self.rules: list[Rule] = []
        self.requests: list[tuple[str, str]] = []  # (method, path?query) of every request, in order
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._stopping = asyncio.Event()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def add(self, rule: Rule) -> Rule:
        self.rules.append(rule)
        return rule

    def remove(self, rule: Rule) -> None:
        if rule in self.rules:
            self.rules.remove(rule)

    def drop(self, rule: Rule) -> int:
        """Close the connection of every response in flight under `rule` (a watch dropped mid-way); how many.
        On the proxy's loop: from a test, `loop.run(proxy.drop_now(rule))`."""
        streams = list(rule.streams)
        for transport in streams:
            transport.close()
        return len(streams)

    async def drop_now(self, rule: Rule) -> int:
        return self.drop(rule)

    async def start(self) -> FaultProxy:
        # No read timeout upstream: a watch is a response that lasts as long as the client wants it.
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            auto_decompress=False,
            connector=aiohttp.TCPConnector(ssl=self._client_tls, limit=0),
        )
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self._server_tls)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        self._stopping.set()
        for rule in self.rules:
            rule.released.set()
            self.drop(rule)
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def release(self, rule: Rule) -> None:
        """Forward the requests `rule` holds, and those it would hold from now (on the proxy's loop)."""
        rule.released.set()

    def _rules_for(self, method: str, path_qs: str) -> tuple[list[Rule], Rule | None]:
        """Every rule matching (each counts the request), and the first whose fault applies to it."""
        matching, fault = [], None
        for rule in list(self.rules):
            if rule.matches(method, path_qs):
                matching.append(rule)
                if rule.take(first=fault is None):
                    fault = rule
        return matching, fault

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path_qs))
        matching, fault = self._rules_for(request.method, request.path_qs)
        if fault is not None and fault.delay:
            await asyncio.sleep(fault.delay)
        if fault is not None and fault.hold:
            await fault.released.wait()
        if fault is not None and fault.status is not None:
            return _status(fault.status, fault.retry_after)
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP | {"accept-encoding"}}
        assert self._session is not None
        async with self._session.request(
            request.method, self.upstream + request.path_qs, headers=headers, data=body or None
        ) as upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for key, value in upstream.headers.items():
                if key.lower() not in _HOP:
                    response.headers.add(key, value)
            await response.prepare(request)
            transport = request.transport
            assert transport is not None
            for rule in matching:
                rule.streams.add(transport)
            try:
                await self._relay(request, response, upstream, fault)
            except (ConnectionError, aiohttp.ClientError):
                pass  # the client went (a read timeout, a dropped stream): nothing more to send
            finally:
                for rule in matching:
                    rule.streams.discard(transport)
            if request.transport is None or request.transport.is_closing():
                return response  # dropped: no end of body, the client sees the stream cut
            await response.write_eof()
            return response

    async def _relay(
        self, request: web.Request, response: web.StreamResponse, upstream: aiohttp.ClientResponse, fault: Rule | None
    ) -> None:
        limit = None
        if fault is not None:
            limit = fault.drop_after_lines if fault.drop_after_lines is not None else fault.silent_after_lines
        if limit is None:
            async for chunk in upstream.content.iter_any():
                if request.transport is None or request.transport.is_closing():
                    return
                await response.write(chunk)
            return
        assert fault is not None
        for _ in range(limit):
            line = await upstream.content.readline()
            if not line:
                return
            await response.write(line)
        if fault.drop_after_lines is not None:
            if request.transport is not None:
                request.transport.close()
            return
        # Half-open: the connection stays, nothing more comes, until the proxy stops; a client that gives up
        # closes it, which cancels this handler (handler_cancellation).
        await self._stopping.wait()
        if request.transport is not None:
            request.transport.close()


def _status(code: int, retry_after: float | None) -> web.Response:
    reason = _REASONS.get(code, "InternalError")
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": f"injected by the fault proxy: {code}",
        "reason": reason,
        "code": code,
    }
    # Exactly "application/json", as the API server says it (lightkube reads a Status only from that type)
    headers = {"Content-Type": "application/json"}
    if retry_after is not None:
        body["details"] = {"retryAfterSeconds": int(retry_after)}
        headers["Retry-After"] = f"{retry_after:g}"
    return web.Response(status=code, body=json.dumps(body).encode(), headers=headers)


def start_proxy(loop: BackgroundLoop, upstream: str, work: Path) -> FaultProxy:
    """A proxy for tests/realcluster.py's cluster (its CA, its API server's certificate) on `loop`."""
    proxy = FaultProxy(upstream, work / "ca.crt", work / "apiserver.crt", work / "apiserver.key")
    return loop.run(proxy.start())
