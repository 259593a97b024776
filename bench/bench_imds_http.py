"""CPU time per IMDS GET, by HTTP client: what chose spotd.common.keepalive (h11) for the agent's polling.

    .venv/bin/python -OO bench/bench_imds_http.py [--requests 2000] [--paced 100] [--gap 0.1]

The fake IMDS runs in a separate process; the figure is the client process's CPU time (user + system, from
time.process_time) divided by the requests made, so other load on the machine inflates it little. Two
figures per client: back to back (a warm loop) and paced (one GET per --gap, as the agent polls: every
wake-up starts with cold caches, which costs more than the request itself on a busy machine). "sleep" is
the paced loop with no request: the floor of one wake-up of the event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from spotd.common.keepalive import KeepAliveClient

SERVER = """
import asyncio
from spotd.sim.imds import FakeImds
async def main():
    async with FakeImds() as f:
        f.require_v2 = False
        print(f.url, flush=True)
        await asyncio.sleep(3600)
asyncio.run(main())
"""
PATH = "/latest/meta-data/spot/instance-action"  # 404 on a quiet instance, as in the agent's idle polls


async def measure(one: Callable[[], Awaitable[int]], n: int, gap: float) -> float:
    for _ in range(20):  # warm up: connection, imports, caches
        await one()
    started = time.process_time()
    for _ in range(n):
        status = await one()
        if status != 404:
            raise SystemExit(f"unexpected status {status}")
        if gap:
            await asyncio.sleep(gap)
    return (time.process_time() - started) / n * 1e6


async def with_client(name: str, url: str, n: int, gap: float) -> float:
    if name == "sleep":

        async def nothing() -> int:
            return 404

        return await measure(nothing, n, gap)
    if name == "aiohttp":
        import aiohttp

        async with aiohttp.ClientSession() as session:

            async def aiohttp_get() -> int:
                async with session.get(url + PATH, timeout=aiohttp.ClientTimeout(total=1)) as resp:
                    await resp.read()
                    return resp.status

            return await measure(aiohttp_get, n, gap)
    if name == "httpx":
        import httpx

        async with httpx.AsyncClient(base_url=url, trust_env=False) as client:

            async def httpx_get() -> int:
                return (await client.get(PATH, timeout=1)).status_code

            return await measure(httpx_get, n, gap)
    if name == "h11 (keepalive)":
        keepalive = KeepAliveClient(url)

        async def h11_get() -> int:
            return (await keepalive.request("GET", PATH, timeout=1)).status

        try:
            return await measure(h11_get, n, gap)
        finally:
            await keepalive.aclose()
    if name == "http.client in a thread":
        parts = urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=1)

        def blocking_get() -> int:
            conn.request("GET", PATH)
            resp = conn.getresponse()
            resp.read()
            return resp.status

        async def thread_get() -> int:
            return await asyncio.to_thread(blocking_get)

        return await measure(thread_get, n, gap)
    raise ValueError(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="back-to-back GETs per run")
    parser.add_argument("--paced", type=int, default=100, help="paced GETs per run")
    parser.add_argument("--gap", type=float, default=0.1, help="seconds between paced GETs")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure; the median is printed")
    args = parser.parse_args()
    server = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    url = server.stdout.readline().strip()
    try:
        print(f"CPU time per GET in the client (µs), median of {args.runs} runs, python {sys.version.split()[0]}")
        print(f"{'client':26s} {'back to back':>14s} {f'one per {args.gap * 1000:g} ms':>16s}")
        for name in ("sleep", "aiohttp", "httpx", "h11 (keepalive)", "http.client in a thread"):
            warm = (
                statistics.median(asyncio.run(with_client(name, url, args.requests, 0)) for _ in range(args.runs))
                if name != "sleep"
                else 0.0
            )
            runs = (asyncio.run(with_client(name, url, args.paced, args.gap)) for _ in range(args.runs))
            paced = statistics.median(runs)
            print(f"{name:26s} {warm:14.0f} {paced:16.0f}")
    finally:
        server.kill()


if __name__ == "__main__":
    main()
