"""How much alerting costs the code that calls it: fire() latency and event-loop lag, whatever Alertmanager does.

    .venv/bin/python bench/bench_alerts.py [--alerts 5000]

Alertmanagers: live (the real prometheus-alertmanager if installed, else a tiny aiohttp stand-in, which
the table says), dead (connection refused), black hole (the kernel accepts the connection, nothing ever
answers), and an HA pair of live + black hole. Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiohttp import web

from spotd.alerts.flags import AlertConfig
from spotd.alerts.model import AlertNode, spot_interruption_alert
from spotd.alerts.sender import Alerter
from spotd.notices.record import Notice, NoticeKind


class QuietLog:
    def __getattr__(self, _: str) -> Any:
        return lambda *a, **kw: None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def black_hole() -> Iterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


@contextlib.contextmanager
def real_alertmanager() -> Iterator[str | None]:
    binary = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    if binary is None:
        yield None
        return
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "am.yml"
        cfg.write_text('{"route": {"receiver": "null"}, "receivers": [{"name": "null"}]}')
        port = free_port()
        args = [
            binary,
            f"--config.file={cfg}",
            f"--storage.path={tmp}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
            "--log.level=error",
        ]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(200):
                with contextlib.suppress(OSError):
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=1).close()
                    break
                time.sleep(0.05)
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            proc.wait(5)


@contextlib.asynccontextmanager
async def stand_in() -> AsyncIterator[str]:
    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.Response()

    app = web.Application()
    app.router.add_post("/api/v2/alerts", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def alerts(n: int, tag: str) -> list[Any]:
    deadline = datetime.now(UTC) + timedelta(minutes=2)
    notice = Notice(NoticeKind.SPOT_ITN, "imds", datetime.now(UTC), deadline, action="terminate")
    return [
        spot_interruption_alert(notice, AlertNode(f"ip-10-0-{i // 250}-{i % 250}-{tag}", f"i-{i:017x}", "a", "b"))
        for i in range(n)
    ]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def lag_monitor(samples: list[float], stop: asyncio.Event, period: float = 0.001) -> None:
    """What a drain loop waking every millisecond sees: how late each wake-up is."""
    while not stop.is_set():
        start = time.perf_counter()
        await asyncio.sleep(period)
        samples.append(max(0.0, time.perf_counter() - start - period))


async def fire_latency(urls: list[str], n: int) -> tuple[float, float, float]:
    """fire() wall time in µs (p50, p99, max) while the delivery task runs against urls."""
    alerter = Alerter(AlertConfig(urls=tuple(urls), queue_size=n, timeout=5.0), log=QuietLog())
    task = asyncio.create_task(alerter.run())
    batch = alerts(n, "fire")
    durations = []
    for i, alert in enumerate(batch):
        start = time.perf_counter_ns()
        alerter.fire(alert)
        durations.append((time.perf_counter_ns() - start) / 1000)
        if i % 50 == 0:
            await asyncio.sleep(0)  # let delivery interleave, as it would in the agent
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return pct(durations, 0.5), pct(durations, 0.99), max(durations)


async def burst_lag(urls: list[str], n: int = 1000, window: float = 2.0) -> tuple[float, float, float, float]:
    """A burst of n alerts, then window seconds of delivery: burst time (ms), loop lag p50/p99/max (ms)."""
    alerter = Alerter(AlertConfig(urls=tuple(urls), timeout=5.0), log=QuietLog())
    task = asyncio.create_task(alerter.run())
    samples: list[float] = []
    stop = asyncio.Event()
    monitor = asyncio.create_task(lag_monitor(samples, stop))
    await asyncio.sleep(0.2)
    batch = alerts(n, "burst")
    start = time.perf_counter()
    for alert in batch:
        alerter.fire(alert)
    burst_ms = (time.perf_counter() - start) * 1000
    await asyncio.sleep(window)
    stop.set()
    await monitor
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    ms = [s * 1000 for s in samples]
    return burst_ms, statistics.median(ms), pct(ms, 0.99), max(ms)


async def ha_delivery(other: str, n: int = 20) -> tuple[float, float]:
    """fire() to answered POST at a live member (aiohttp stand-in) while the other member is dead or
    black-holed, one alert at a time (ms)."""
    arrived = asyncio.Event()

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        arrived.set()
        return web.Response()

    app = web.Application()
    app.router.add_post("/api/v2/alerts", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    alerter = Alerter(AlertConfig(urls=(other, f"http://127.0.0.1:{port}"), timeout=10.0), log=QuietLog())
    task = asyncio.create_task(alerter.run())
    took = []
    for alert in alerts(n, "ha"):
        arrived.clear()
        start = time.perf_counter()
        alerter.fire(alert)
        await asyncio.wait_for(arrived.wait(), 5)
        took.append((time.perf_counter() - start) * 1000)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await runner.cleanup()
    return statistics.median(took), max(took)


async def main(n: int) -> None:
    with real_alertmanager() as am_url, black_hole() as hole:
        async with contextlib.AsyncExitStack() as stack:
            live = am_url or await stack.enter_async_context(stand_in())
            live_name = "live (prometheus-alertmanager)" if am_url else "live (aiohttp stand-in)"
            dead = f"http://127.0.0.1:{free_port()}"
            scenarios = [
                ("no Alertmanager configured", []),
                (live_name, [live]),
                ("dead (connection refused)", [dead]),
                ("black hole (never answers)", [hole]),
                ("HA: live + black hole", [hole, live]),
            ]
            print(f"fire() wall time, {n} distinct alerts, delivery task running (µs)")
            print(f"{'Alertmanager':34} {'p50':>8} {'p99':>8} {'max':>8}")
            for name, urls in scenarios:
                p50, p99, worst = await fire_latency(urls, n)
                print(f"{name:34} {p50:8.1f} {p99:8.1f} {worst:8.1f}")

            print()
            print("event-loop lag: 1 ms timer, 2 s after a burst of 1,000 alerts (ms)")
            print(f"{'Alertmanager':34} {'burst':>8} {'lag p50':>8} {'lag p99':>8} {'lag max':>8}")
            for name, urls in [
                ("no alerts (baseline)", []),
                ("black hole (never answers)", [hole]),
                ("dead (connection refused)", [dead]),
                (live_name, [live]),
            ]:
                burst, p50, p99, worst = await burst_lag(urls)
                if not urls:
                    burst = 0.0
                print(f"{name:34} {burst:8.2f} {p50:8.3f} {p99:8.3f} {worst:8.3f}")

            print()
            print("delivery to the live member (aiohttp stand-in) of an HA pair, one alert at a time (ms)")
            print(f"{'other member':34} {'p50':>8} {'max':>8}")
            for name, other in [("dead (connection refused)", dead), ("black hole (never answers)", hole)]:
                p50, worst = await ha_delivery(other)
                print(f"{name:34} {p50:8.2f} {worst:8.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alerts", type=int, default=5000, help="alerts per fire() scenario")
    asyncio.run(main(parser.parse_args().alerts))
