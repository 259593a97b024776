"""Resident memory each import adds to the agent: one fresh `python -OO` per line, nothing else running in it.

    .bench/venv/bin/python bench/bench_imports.py     # the agent's production-like venv (bench_agent builds it)

"alone" is the module on top of bare Python; "in order" adds each line to everything above it, so what a
library shares with those before it (httpx and h11, prometheus-client and wsgiref) is not counted twice.
"""

from __future__ import annotations

import subprocess
import sys

STEPS = [
    ("asyncio", "import asyncio"),
    ("TLS context (no CA store)", "import ssl; ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)"),
    ("httpx", "import httpx"),
    ("h11", "import h11"),
    ("prometheus_client", "import prometheus_client"),
    ("wsgiref server", "import wsgiref.simple_server"),
    ("structlog", "import structlog"),
    ("lightkube + core/v1", "import lightkube; from lightkube.resources.core_v1 import Node, Pod"),
    ("spotd agent", "from spotd.cli.main import build_parser, _program; build_parser(only='agent'); _program('agent')"),
    ("httpcore + anyio (no longer)", "import httpcore, anyio, anyio._backends._asyncio"),
    ("decimal (no longer)", "import decimal"),
    ("aiohttp (no longer)", "import aiohttp; from aiohttp import web"),
    ("yarl (no longer)", "import yarl"),
    ("tenacity (no longer)", "import tenacity"),
]
RSS = "\nprint([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1])"


def rss_mb(code: str) -> float:
    out = subprocess.run([sys.executable, "-OO", "-c", code + RSS], capture_output=True, text=True, check=True)
    return int(out.stdout.strip()) / 1024


def main() -> None:
    base = rss_mb("pass")
    print(f"resident memory added (MB), python {sys.version.split()[0]} -OO; bare interpreter {base:.1f} MB")
    print(f"{'import':28s} {'alone':>7s} {'in order':>9s} {'total':>7s}")
    so_far, previous = "", base
    for name, code in STEPS:
        alone = rss_mb(code) - base
        so_far += code + "\n"
        total = rss_mb(so_far)
        print(f"{name:28s} {alone:+7.1f} {total - previous:+9.1f} {total:7.1f}")
        previous = total


if __name__ == "__main__":
    main()
