"""A fake EC2 Instance Metadata Service (IMDS) on 127.0.0.1, for tests, the benchmark and simulation.

It behaves like the real one where spotd can tell the difference:

- IMDSv2: ``PUT /latest/api/token`` needs ``X-aws-ec2-metadata-token-ttl-seconds`` (1..21600, else 400)
  and is refused (403) when it carries ``X-Forwarded-For``; the answer echoes the granted TTL in the same
  header. A GET with an unknown or expired token gets 401; a GET without a token gets 401 while
  ``require_v2`` is set (the default), as on an instance with ``HttpTokens=required``.
- Absent notices are 404; ``events/maintenance/scheduled`` is ``[]`` when there are none.
- Test knobs: ``set_raw`` serves any body/status on a path, ``fail_next``/``delay_next`` inject errors,
  throttling (429) and timeouts, ``advance`` moves the token clock, ``expire_tokens`` invalidates every
  token, and ``token_max_ttl`` caps the TTL granted (a token dying before the client expects it to).

One aiohttp app per instance and no background tasks: the embedded cluster runs one per simulated node.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

TOKEN_PATH = "/latest/api/token"
META_PREFIX = "/latest/meta-data/"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
MAX_TTL = 21600


def _full_path(path: str) -> str:
    """'spot/instance-action' or '/latest/meta-data/spot/instance-action' -> the request path."""
    if path.startswith("/latest/"):
        return path
    if path.strip("/") == "api/token":
        return TOKEN_PATH
    return META_PREFIX + path.lstrip("/")


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class _Fault:
    path: str | None  # None: every request, token PUTs included
    times: int
    status: int = 0  # 0: no error, just the delay
    delay: float = 0.0

    def matches(self, path: str) -> bool:
        return self.times > 0 and (self.path is None or self.path == path)


class FakeImds:
    """The IMDS of one instance. ``await start()``, use ``url``, ``await stop()``."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        instance_id: str = "i-0123456789abcdef0",
        instance_type: str = "m5.large",
        zone: str = "us-east-1a",
        lifecycle: str = "spot",
        lifecycle_state: str | None = "InService",
    ) -> None:
        self.host, self.port = host, port
        self.require_v2 = True
        self.token_max_ttl = MAX_TTL
        # (method, path, had_token), the latest ones only: a simulated node may run for hours.
        self.requests: deque[tuple[str, str, bool]] = deque(maxlen=10_000)
        self._clock_offset = 0.0
        self._tokens: dict[str, float] = {}  # token -> expiry on the fake clock
        self._faults: list[_Fault] = []
        self._raw: dict[str, tuple[str, int]] = {}
        self._values: dict[str, str | None] = {
            "instance-id": instance_id,
            "instance-type": instance_type,
            "placement/availability-zone": zone,
            "placement/region": zone[:-1] if zone[-1:].isalpha() else zone,
            "instance-life-cycle": lifecycle,
            "spot/instance-action": None,
            "events/recommendations/rebalance": None,
            "events/maintenance/scheduled": "[]",
            "autoscaling/target-lifecycle-state": lifecycle_state,
        }
        self._runner: web.AppRunner | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # handler_cancellation: a client that timed out must not leave a delayed handler behind.
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeImds:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- notices -----------------------------------------------------------------------------------------

    def set_instance_action(self, action: str = "terminate", time: datetime | None = None) -> None:
        when = time or datetime.now(UTC)
        self._values["spot/instance-action"] = json.dumps({"action": action, "time": _iso(when)})

    def clear_instance_action(self) -> None:
        self._values["spot/instance-action"] = None

    def set_rebalance(self, notice_time: datetime | None = None) -> None:
        when = notice_time or datetime.now(UTC)
        self._values["events/recommendations/rebalance"] = json.dumps({"noticeTime": _iso(when)})

    def clear_rebalance(self) -> None:
        self._values["events/recommendations/rebalance"] = None

    def set_scheduled_events(self, events: list[dict[str, Any]]) -> None:
        """Raw AWS-shaped events: Code, Description, EventId, NotBefore, NotAfter, State."""
        self._values["events/maintenance/scheduled"] = json.dumps(events, indent=2)

    def set_lifecycle_state(self, state: str | None) -> None:
        """'InService', 'Terminated', ...; None: not in an Auto Scaling group (404)."""
        self._values["autoscaling/target-lifecycle-state"] = state

    def set_metadata(self, path: str, value: str | None) -> None:
        """Any other meta-data path (relative to /latest/meta-data/); None makes it 404."""
        self._values[path.strip("/")] = value

    def set_raw(self, path: str, body: str | None, status: int = 200) -> None:
        """Serve exactly ``body`` with ``status`` on ``path`` until called again with body None."""
        full = _full_path(path)
        if body is None:
            self._raw.pop(full, None)
        else:
            self._raw[full] = (body, status)

    # -- faults ------------------------------------------------------------------------------------------

    def fail_next(self, path: str | None, status: int = 503, times: int = 1) -> None:
        """The next ``times`` requests to ``path`` (None: any, token PUTs included) answer ``status``."""
        self._faults.append(_Fault(None if path is None else _full_path(path), times, status=status))

    def delay_next(self, path: str | None, seconds: float, times: int = 1) -> None:
        """The next ``times`` requests to ``path`` (None: any) wait ``seconds`` before answering."""
        self._faults.append(_Fault(None if path is None else _full_path(path), times, delay=seconds))

    def clear_faults(self) -> None:
        self._faults.clear()

    # -- tokens ------------------------------------------------------------------------------------------

    def now(self) -> float:
        return time.monotonic() + self._clock_offset

    def advance(self, seconds: float) -> None:
        """Move the token clock forward: tokens past their TTL then get 401."""
        self._clock_offset += seconds

    def expire_tokens(self) -> None:
        self._tokens.clear()

    def count(self, method: str | None = None, path: str | None = None) -> int:
        """Recorded requests matching ``method`` and ``path`` (either may be None)."""
        full = None if path is None else _full_path(path)
        return sum(1 for m, p, _ in self.requests if (method in (None, m)) and (full in (None, p)))

    # -- serving -----------------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.Response:
        path = request.path
        token = request.headers.get(TOKEN_HEADER)
        self.requests.append((request.method, path, token is not None))
        status = 0
        for fault in self._faults:
            if fault.matches(path):
                fault.times -= 1
                if fault.delay:
                    await asyncio.sleep(fault.delay)
                if fault.status:
                    status = fault.status
                    break
        self._faults = [f for f in self._faults if f.times > 0]
        if status:
            return web.Response(status=status, text=f"fault {status}")
        if path == TOKEN_PATH:
            return self._put_token(request)
        if request.method != "GET":
            return web.Response(status=405)
        if token is not None:
            expiry = self._tokens.get(token)
            if expiry is None or expiry <= self.now():
                self._tokens.pop(token, None)
                return web.Response(status=401)
        elif self.require_v2:
            return web.Response(status=401)
        if path in self._raw:
            body, raw_status = self._raw[path]
            return web.Response(status=raw_status, text=body)
        if not path.startswith(META_PREFIX):
            return web.Response(status=404)
        value = self._values.get(path[len(META_PREFIX) :])
        if value is None:
            return web.Response(status=404, text="Not Found")
        return web.Response(text=value)

    def _put_token(self, request: web.Request) -> web.Response:
        if request.method != "PUT":
            return web.Response(status=405)
        if "X-Forwarded-For" in request.headers:
            return web.Response(status=403)
        if TOKEN_PATH in self._raw:
            body, raw_status = self._raw[TOKEN_PATH]
            return web.Response(status=raw_status, text=body)
        try:
            ttl = int(request.headers[TTL_HEADER])
        except (KeyError, ValueError):
            return web.Response(status=400)
        if not 1 <= ttl <= MAX_TTL:
            return web.Response(status=400)
        if len(self._tokens) > 1000:
            self._tokens = {t: exp for t, exp in self._tokens.items() if exp > self.now()}
        granted = min(ttl, self.token_max_ttl)
        token = secrets.token_urlsafe(32)
        self._tokens[token] = self.now() + granted
        return web.Response(text=token, headers={TTL_HEADER: str(granted)})
