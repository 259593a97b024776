"""The health server: routes, status codes, a stalled client, and a stop that frees the port at once."""

from __future__ import annotations

import asyncio
import http.client
import socket

from prometheus_client import CollectorRegistry, Counter

from spotd.common.health import HealthServer, Heartbeat


def get(port: int, path: str) -> tuple[int, str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type") or "", resp.read().decode()
    finally:
        conn.close()


async def test_routes_and_status_codes() -> None:
    registry = CollectorRegistry()
    Counter("spotd_test_things", "things", registry=registry).inc(3)
    state = {"alive": True, "ready": False}
    server = HealthServer("127.0.0.1", 0, registry, lambda: state["alive"], lambda: state["ready"])
    await server.start()
    try:
        assert await asyncio.to_thread(get, server.port, "/healthz") == (200, "text/plain; charset=utf-8", "ok\n")
        assert (await asyncio.to_thread(get, server.port, "/readyz"))[::2] == (503, "not ready\n")
        state["alive"], state["ready"] = False, True
        assert (await asyncio.to_thread(get, server.port, "/healthz"))[::2] == (503, "loops stalled\n")
        assert (await asyncio.to_thread(get, server.port, "/readyz"))[::2] == (200, "ready\n")
        status, content_type, body = await asyncio.to_thread(get, server.port, "/metrics")
        assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
        assert "spotd_test_things_total 3.0" in body
        assert (await asyncio.to_thread(get, server.port, "/nope"))[0] == 404
    finally:
        await server.stop()


async def test_a_stalled_client_does_not_delay_a_probe() -> None:
    server = HealthServer("127.0.0.1", 0, CollectorRegistry(), lambda: True, lambda: True)
    await server.start()
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as stalled:
            stalled.sendall(b"GET /heal")  # and nothing more
            # Answered while the stalled request is still open (get() gives up after 5 s).
            assert (await asyncio.to_thread(get, server.port, "/healthz"))[0] == 200
    finally:
        await server.stop()


async def test_stop_returns_and_frees_the_port() -> None:
    server = HealthServer("127.0.0.1", 0, CollectorRegistry(), lambda: True, lambda: True)
    await server.start()
    port = server.port
    await asyncio.wait_for(server.stop(), timeout=10)  # a hang guard, not a speed bound
    again = HealthServer("127.0.0.1", port, CollectorRegistry(), lambda: True, lambda: True)
    await again.start()
    await again.stop()


def test_heartbeat_allowance() -> None:
    now = [100.0]
    beat = Heartbeat(lambda: now[0])
    assert beat.alive()  # nothing registered yet
    beat.beat("poll", 10)
    now[0] += 10
    assert beat.alive()
    now[0] += 0.5
    assert not beat.alive()
