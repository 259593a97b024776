"""An httpx transport over asyncio streams and h11: HTTP/1.1 without httpcore and anyio.

The agent's Kubernetes client (lightkube, on httpx) runs on every node for the node's whole life. httpx's
own transport loads httpcore and anyio on the first request, about 3 MB resident of a 36 MB budget
(bench/bench_agent.py; docs/agent.md). This transport gives httpx the same contract with the standard
library's streams and h11 (already installed under httpx), which does all parsing and framing.

What it keeps from httpx's defaults: at most 100 connections (a request waits for a free one up to the pool
timeout), up to 20 idle ones kept for 5 s, each of httpx's four timeouts, and httpx's exception types. An
idle connection on which anything arrived (a close, a proxy's unsolicited 408) is not reused, as httpcore
checks that the socket is not readable. A kept connection that the server closed unseen, before any byte
of the response, gets an idempotent request (GET, HEAD, PUT, DELETE) once more on a fresh connection; a
POST or PATCH is not sent again (the server may have acted on it: an eviction, an Event), and fails with
httpx.RemoteProtocolError as under httpcore. No proxies and no HTTP/2: the agent talks straight to the API
server (the client is built with trust_env=False).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator, Iterator

import h11
import httpx

from spotd.common.keepalive import H11Connection

_READ_SIZE = 65536
_DEFAULT_PORTS = {b"http": 80, b"https": 443}

Origin = tuple[bytes, str, int]


_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE"})

# TCP keepalive as client-go dials (30 s): a quiet watch (the rehearsal requests, an idle node's Node) sends
# nothing for hours. Without probes, a peer gone without a reset, or a load balancer that drops idle flows
# (an NLB after 350 s), leaves the watch waiting for ever; with them it fails within about a minute and the
# watch reconnects. Also httpx's socket_options for the controller's transport (spotd.kube.client).
TCP_KEEPALIVE: list[tuple[int, int, int]] = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)] + [
    (socket.IPPROTO_TCP, getattr(socket, name), value)
    for name, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3))
    if hasattr(socket, name)  # Linux; elsewhere the system's intervals
]


class _Stale(Exception):
    """A reused connection closed before any byte of the response: the request was not answered."""


@contextlib.contextmanager
def _mapped(timeout: type[httpx.TimeoutException], error: type[httpx.TransportError]) -> Iterator[None]:
    """The transport's failures as the httpx exceptions callers (lightkube, spotd) already handle."""
    try:
        yield
    except TimeoutError as exc:
        raise timeout(str(exc) or "timed out") from exc
    except h11.RemoteProtocolError as exc:
        raise httpx.RemoteProtocolError(str(exc)) from exc
    except h11.LocalProtocolError as exc:
        raise httpx.LocalProtocolError(str(exc)) from exc
    except OSError as exc:  # refused, reset, TLS (ssl.SSLError is an OSError)
        raise error(str(exc) or type(exc).__name__) from exc


class _Tls:
    """TLS over a plain asyncio stream through memory buffers, as anyio and the ssl documentation do it.

    Not asyncio's own TLS transport: that one keeps a 256 KiB read buffer per connection, for as long as the
    connection lives (a watch: the node's whole life).
    """

    def __init__(
        self, context: ssl.SSLContext, host: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._in, self._out, server_hostname=host)
        self._reader, self._writer = reader, writer

    async def handshake(self) -> None:
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._exchange()
        self._flush()

    async def read(self) -> bytes:
        """Decrypted bytes as they come; b"" at the end of the stream (with or without close_notify)."""
        while True:
            try:
                data = self._tls.read(_READ_SIZE)
                self._flush()  # TLS 1.3 may answer what it read (a key update)
                return data
            except ssl.SSLWantReadError:
                await self._exchange()
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""

    @property
    def pending(self) -> bool:
        """Bytes received and not yet read, encrypted or not."""
        return bool(self._in.pending or self._tls.pending())

    def write(self, data: bytes) -> None:
        self._tls.write(data)
        self._flush()

    async def _exchange(self) -> None:
        if self._in.eof:  # never spin on a stream that has ended
            raise ConnectionResetError("the TLS stream ended")
        self._flush()
        await self._writer.drain()
        raw = await self._reader.read(_READ_SIZE)
        if raw:
            self._in.write(raw)
        else:
            self._in.write_eof()  # the next read or handshake step says how the stream ended

    def _flush(self) -> None:
        out = self._out.read()
        if out:
            self._writer.write(out)


class _Connection(H11Connection):
    def __init__(
        self, origin: Origin, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tls: _Tls | None
    ) -> None:
        super().__init__(reader, writer)
        self.origin = origin
        self.tls = tls
        self.expiry: asyncio.TimerHandle | None = None  # while idle in the pool
        self.received = 0  # bytes of the current response so far

    @property
    def usable(self) -> bool:
        """Idle and untouched: not closed, and nothing arrived while idle. A byte on an idle HTTP/1.1
        connection is a close (EOF, close_notify) or an unsolicited answer (a proxy's 408): never reuse it,
        as httpcore does (has_expired: the socket is readable)."""
        # Bytes may wait in h11 (they came with the last response), in TLS, or in the stream's buffer
        # (StreamReader has no public count; without the attribute this degrades to the EOF check).
        buffered = bool(self.h11.trailing_data[0]) or (self.tls is not None and self.tls.pending)
        buffered = buffered or bool(getattr(self.reader, "_buffer", b""))
        return not (buffered or self.reader.at_eof() or self.reader.exception() or self.writer.is_closing())

    async def send(self, request: h11.Request, body: bytes, timeout: float | None) -> None:
        self.received = 0
        data = self.h11.send(request) or b""
        if body:
            data += self.h11.send(h11.Data(data=body)) or b""
        data += self.h11.send(h11.EndOfMessage()) or b""
        if self.tls is not None:
            self.tls.write(data)
        else:
            self.writer.write(data)
        async with asyncio.timeout(timeout):
            await self.writer.drain()

    async def next_event(self, timeout: float | None) -> h11.Event | type[h11.PAUSED] | type[h11.NEED_DATA]:
        """The next h11 event, reading as needed; each read is bounded by ``timeout``."""
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            async with asyncio.timeout(timeout):
                data = await (self.tls.read() if self.tls is not None else self.reader.read(_READ_SIZE))
            self.received += len(data)
            self.h11.receive_data(data)  # b"" is end of stream: h11 then says whether that is an error

    async def head(self, timeout: float | None, reused: bool) -> h11.Response:
        while True:
            try:
                event = await self.next_event(timeout)
            except (ConnectionError, h11.RemoteProtocolError):  # reset, or closed (h11 says so)
                if reused and not self.received:
                    raise _Stale from None
                raise
            if isinstance(event, h11.Response):
                return event
            if isinstance(event, h11.ConnectionClosed):
                if reused and not self.received:
                    raise _Stale
                raise httpx.RemoteProtocolError("connection closed before the response")
            # InformationalResponse (1xx): wait for the real one


class _Body(httpx.AsyncByteStream):
    """The response body as it arrives; the connection goes back to the pool only after a complete body."""

    def __init__(self, transport: H11Transport, conn: _Connection, timeout: float | None) -> None:
        self._transport, self._conn, self._timeout = transport, conn, timeout
        self._complete = False
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _mapped(httpx.ReadTimeout, httpx.ReadError):
            while not self._complete:
                event = await self._conn.next_event(self._timeout)
                if isinstance(event, h11.Data):
                    yield bytes(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    self._complete = True
                elif isinstance(event, h11.ConnectionClosed):
                    raise httpx.RemoteProtocolError("connection closed before the end of the response")

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._transport._give_back(self._conn, self._complete and self._conn.reusable)


class H11Transport(httpx.AsyncBaseTransport):
    """HTTP/1.1 to any origin over kept-alive connections; TLS with ``ssl_context`` for ``https``."""

    def __init__(
        self,
        ssl_context: ssl.SSLContext | None = None,
        *,
        max_connections: int = 100,
        max_idle: int = 20,
        idle_expiry: float = 5.0,
    ) -> None:
        self._ssl = ssl_context
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[_Connection] = []
        self._max_idle = max_idle
        self._idle_expiry = idle_expiry
        self.connections_opened = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout", {})
        url = request.url
        origin: Origin = (url.raw_scheme, url.host, url.port or _DEFAULT_PORTS.get(url.raw_scheme, 80))
        if origin[0] not in _DEFAULT_PORTS:
            raise httpx.UnsupportedProtocol(f"{url.scheme!r} is not http or https")
        body = await request.aread()  # the agent's bodies are small JSON documents
        head = h11.Request(method=request.method, target=url.raw_path, headers=request.headers.raw)
        with _mapped(httpx.PoolTimeout, httpx.ConnectError):
            async with asyncio.timeout(timeouts.get("pool")):
                await self._slots.acquire()
        try:
            conn, response = await self._exchange(origin, head, body, timeouts)
        except BaseException:
            self._slots.release()
            raise
        return httpx.Response(
            status_code=response.status_code,
            headers=response.headers.raw_items(),
            stream=_Body(self, conn, timeouts.get("read")),
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": response.reason},
        )

    async def _exchange(
        self, origin: Origin, head: h11.Request, body: bytes, timeouts: dict[str, float | None]
    ) -> tuple[_Connection, h11.Response]:
        fresh_only = False
        while True:
            conn = None if fresh_only else self._take_idle(origin)
            reused = conn is not None
            if conn is None:
                conn = await self._connect(origin, timeouts.get("connect"))
            try:
                with _mapped(httpx.WriteTimeout, httpx.WriteError):
                    try:
                        await conn.send(head, body, timeouts.get("write"))
                    except ConnectionError:
                        if reused:  # closed by the server while idle: nothing was answered
                            raise _Stale from None
                        raise
                with _mapped(httpx.ReadTimeout, httpx.ReadError):
                    return conn, await conn.head(timeouts.get("read"), reused)
            except _Stale:
                conn.close()
                if head.method not in _IDEMPOTENT:
                    # The server may have acted on it (an eviction, an Event) before the connection went:
                    # not ours to send again. httpcore never re-sends a request either.
                    raise httpx.RemoteProtocolError("server disconnected without sending a response") from None
                fresh_only = True
            except BaseException:
                conn.close()
                raise

    def _take_idle(self, origin: Origin) -> _Connection | None:
        for conn in list(self._idle):
            if conn.origin == origin:
                self._forget(conn)
                if conn.usable:
                    return conn
                conn.close()
        return None

    def _forget(self, conn: _Connection) -> None:
        self._idle.remove(conn)
        if conn.expiry is not None:
            conn.expiry.cancel()
            conn.expiry = None

    def _expire(self, conn: _Connection) -> None:
        # Closed when it expires, not at the next request: an idle agent may make none for hours, and each
        # open connection holds a socket and its TLS state.
        if conn in self._idle:
            self._forget(conn)
            conn.close()

    async def _connect(self, origin: Origin, timeout: float | None) -> _Connection:
        scheme, host, port = origin
        with _mapped(httpx.ConnectTimeout, httpx.ConnectError):
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(host, port)
                sock = writer.get_extra_info("socket")
                for level, option, value in TCP_KEEPALIVE:
                    sock.setsockopt(level, option, value)
                tls = None
                try:
                    if scheme == b"https":
                        if self._ssl is None:  # the system's CAs, loaded once, not per connection
                            self._ssl = ssl.create_default_context()
                        tls = _Tls(self._ssl, host, reader, writer)
                        await tls.handshake()  # verifies the server's certificate
                except BaseException:
                    writer.close()
                    raise
        self.connections_opened += 1
        return _Connection(origin, reader, writer, tls)

    def _give_back(self, conn: _Connection, reusable: bool) -> None:
        self._slots.release()
        if reusable and conn.usable and len(self._idle) < self._max_idle:
            conn.expiry = asyncio.get_running_loop().call_later(self._idle_expiry, self._expire, conn)
            self._idle.append(conn)
        else:
            conn.close()

    async def aclose(self) -> None:
        for conn in list(self._idle):
            self._forget(conn)
            conn.close()
