"""A small HTTP/1.1 client for one origin over kept-alive connections; h11 speaks the protocol.

For the agent's IMDS polling, several requests a second for as long as the node lives: per request it
costs a fraction of the CPU time of httpx or aiohttp (numbers in docs/agent.md). h11 (already installed
under httpx) does all parsing and framing; this module only moves bytes and keeps connections.

Requests that run one after another share one connection. A request that fails or times out closes its
connection (its state is unknown); the next one opens a new one. A kept connection the server closed
while idle is noticed on reuse (no byte of the response arrived) and the request is sent again, once, on
a fresh connection, as urllib3 and httpcore do.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11

_READ_SIZE = 65536


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]  # names lower-cased; a repeated header keeps its last value
    body: bytes

    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")


class _StaleConnection(Exception):
    """A kept connection was closed by the server before any byte of the response: safe to send again."""


class H11Connection:
    """One HTTP/1.1 client connection: asyncio streams and h11's state for them (also spotd.common.transport's)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.h11 = h11.Connection(h11.CLIENT)

    @property
    def reusable(self) -> bool:
        """True (h11 then ready for the next request) once both sides finished an exchange and may go on."""
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
            return True
        return False

    def close(self) -> None:
        self.writer.close()


class _Connection(H11Connection):
    async def exchange(self, request: h11.Request, reused: bool) -> Reply:
        self.writer.write(self.h11.send(request) + self.h11.send(h11.EndOfMessage()))
        await self.writer.drain()
        status, headers, body = 0, {}, bytearray()
        received = False
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                data = await self.reader.read(_READ_SIZE)
                if not data and reused and not received:
                    raise _StaleConnection
                received = received or bool(data)
                self.h11.receive_data(data)  # b"" is end of stream: h11 then says whether that is an error
            elif isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return Reply(status, headers, bytes(body))
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionResetError("connection closed before the end of the response")
            # InformationalResponse (1xx): nothing to keep


class KeepAliveClient:
    """Requests to one ``http://`` or ``https://`` origin. Use from one event loop; ``aclose()`` at the end.

    ``request`` raises TimeoutError, OSError (connection refused, reset) or h11.ProtocolError (a reply
    that is not HTTP/1.1); any of them closes the connection it happened on.
    """

    def __init__(self, base_url: str, *, max_idle: int = 1) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{base_url!r} is not an http(s) URL")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl: ssl.SSLContext | None = ssl.create_default_context() if parts.scheme == "https" else None
        default_port = self._port == (443 if parts.scheme == "https" else 80)
        host = f"[{self._host}]" if ":" in self._host else self._host
        self._host_header = host if default_port else f"{host}:{self._port}"
        self._prefix = parts.path.rstrip("/")
        self._idle: list[_Connection] = []
        self._max_idle = max_idle
        # The same few requests, several times a second: h11 validates each new Request; keep the last ones.
        self._requests: dict[tuple[str, str, tuple[tuple[str, str], ...]], h11.Request] = {}
        self.connections_opened = 0

    async def request(self, method: str, path: str, headers: dict[str, str] | None = None, *, timeout: float) -> Reply:
        """One request without a body; the whole exchange (connecting included) is bounded by ``timeout``."""
        key = (method, path, tuple((headers or {}).items()))
        request = self._requests.get(key)
        if request is None:
            fields = [("Host", self._host_header), *key[2]]
            if method in ("PUT", "POST", "PATCH"):
                fields.append(("Content-Length", "0"))
            request = h11.Request(method=method, target=self._prefix + path, headers=fields)
            if len(self._requests) >= 16:  # a new token makes new keys: forget the old ones
                self._requests.clear()
            self._requests[key] = request
        async with asyncio.timeout(timeout):
            while True:
                reused = bool(self._idle)
                conn = self._idle.pop() if reused else await self._connect()
                try:
                    response = await conn.exchange(request, reused)
                except _StaleConnection:
                    conn.close()
                    continue  # the next try takes a fresh connection (or another idle one)
                except BaseException:
                    conn.close()
                    raise
                if conn.reusable and len(self._idle) < self._max_idle:
                    self._idle.append(conn)
                else:
                    conn.close()
                return response

    async def _connect(self) -> _Connection:
        reader, writer = await asyncio.open_connection(self._host, self._port, ssl=self._ssl)
        self.connections_opened += 1
        return _Connection(reader, writer)

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
