"""One small aiohttp server per process: /healthz, /readyz, /metrics."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest


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
    ) -> None:
        self._host, self._port = host, port
        self._detail = detail  # a line /readyz adds (the controller: what it may drain)
        self._registry = registry
        self._liveness, self._readiness = liveness, readiness
        self._runner: web.AppRunner | None = None
        self.port = port

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        if self._port == 0:
            self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, _: web.Request) -> web.Response:
        ok = self._liveness()
        return web.Response(status=200 if ok else 503, text="ok\n" if ok else "loops stalled\n")

    async def _readyz(self, _: web.Request) -> web.Response:
        ok = self._readiness()
        text = "ready\n" if ok else "not ready\n"
        if self._detail is not None:
            text += self._detail() + "\n"
        return web.Response(status=200 if ok else 503, text=text)

    async def _metrics(self, _: web.Request) -> web.Response:
        body = generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


class Heartbeat:
    """Loops beat; /healthz is ok while every registered loop beat within its allowance."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._last: dict[str, tuple[float, float]] = {}

    def beat(self, loop: str, allowance: float) -> None:
        self._last[loop] = (self._clock(), allowance)

    def alive(self) -> bool:
        now = self._clock()
        return all(now - at <= allowance for at, allowance in self._last.values())
