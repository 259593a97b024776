"""Test helpers: find the real tools, and run a real Alertmanager on free 127.0.0.1 ports.

require_tool() is the one place that decides what a missing binary means: with CI set the test fails
with the install hint, elsewhere it skips with the same words.

An AlertmanagerSet of two runs a real gossip cluster (--cluster.listen-address / --cluster.peer on
127.0.0.1). Gossip shares silences and the notification log, never alerts, so each member's
/api/v2/alerts shows exactly what was POSTed to that member: the HA tests read each member separately.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

TOOLS = {
    # name: (environment override, candidates on PATH, Debian package)
    "alertmanager": ("SPOTD_ALERTMANAGER_BIN", ("prometheus-alertmanager", "alertmanager"), "prometheus-alertmanager"),
    "promtool": ("SPOTD_PROMTOOL_BIN", ("promtool",), "prometheus"),
    "amtool": ("SPOTD_AMTOOL_BIN", ("amtool",), "prometheus-alertmanager"),
    "kubectl": ("SPOTD_KUBECTL_BIN", ("kubectl",), "kubernetes-client"),
}


def require_tool(name: str) -> str:
    """Path of a real binary; fails (CI set) or skips (otherwise) with how to install it."""
    env_var, candidates, package = TOOLS[name]
    override = os.environ.get(env_var)
    found = override if override and os.access(override, os.X_OK) else None
    for candidate in () if found else candidates:
        found = shutil.which(candidate)
        if found:
            break
    if found:
        return found
    looked = f"{env_var}={override} is not executable" if override else f"{env_var} is not set"
    message = (
        f"{name} not found ({looked}; no {' or '.join(candidates)} on PATH). These tests need "
        f"the real binary: apt-get install -y {package} (Debian/Ubuntu; scripts/setup --test installs every "
        f"tool), or point {env_var} at one."
    )
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail(f"CI: {message}", pytrace=False)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(webhook_url: str | None) -> str:
    receiver: dict[str, Any] = {"name": "default"}
    if webhook_url:
        receiver["webhook_configs"] = [{"url": webhook_url, "send_resolved": True}]
    route = {"receiver": "default", "group_by": ["..."], "group_wait": "0s", "group_interval": "1s"}
    return json.dumps({"route": route, "receivers": [receiver]})  # JSON is YAML


class Alertmanager:
    """One real Alertmanager process. stop()/start() is a restart that forgets every alert."""

    def __init__(
        self,
        binary: str,
        workdir: Path,
        webhook_url: str | None = None,
        cluster_port: int | None = None,
        peers: tuple[int, ...] = (),
    ) -> None:
        self.binary, self.workdir = binary, workdir
        self.port = free_port()
        self.cluster_port, self.peers = cluster_port, peers
        self.config = workdir / "alertmanager.yml"
        self.config.write_text(_config(webhook_url))
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "alertmanager.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: float = 15.0) -> None:
        storage = tempfile.mkdtemp(dir=self.workdir, prefix="storage-")  # fresh: nothing survives a restart
        args = [
            self.binary,
            f"--config.file={self.config}",
            f"--storage.path={storage}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        if self.cluster_port:
            args += [
                f"--cluster.listen-address=127.0.0.1:{self.cluster_port}",
                f"--cluster.advertise-address=127.0.0.1:{self.cluster_port}",
                "--cluster.settle-timeout=1s",
                *(f"--cluster.peer=127.0.0.1:{p}" for p in self.peers),
            ]
        else:
            args.append("--cluster.listen-address=")  # no gossip for a single instance
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"alertmanager exited: {self.log.read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"alertmanager not ready after {wait}s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def alerts(self, **filters: str) -> list[dict[str, Any]]:
        """GET /api/v2/alerts (active, unresolved alerts only), filtered by exact label values."""
        query = "&".join(f"filter={urllib.parse.quote(f'{k}={json.dumps(v)}')}" for k, v in filters.items())
        with urllib.request.urlopen(f"{self.url}/api/v2/alerts?{query}", timeout=5) as resp:
            return list(json.load(resp))

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/api/v2/status", timeout=5) as resp:
            return dict(json.load(resp))


class AlertmanagerSet:
    """n Alertmanagers; with cluster=True they gossip as one HA set on 127.0.0.1."""

    def __init__(self, binary: str, n: int = 1, webhook_url: str | None = None, cluster: bool = False) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="spotd-am-")
        root = Path(self._tmp.name)
        ports = [free_port() for _ in range(n)] if cluster else [None] * n
        self.members = []
        for i, cport in enumerate(ports):
            workdir = root / f"am{i}"
            workdir.mkdir()
            peers = tuple(p for p in ports[:i] if p) if cluster else ()
            self.members.append(Alertmanager(binary, workdir, webhook_url, cport, peers))

    def __enter__(self) -> AlertmanagerSet:
        try:
            for member in self.members:
                member.start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for member in self.members:
            member.stop()
        self._tmp.cleanup()

    @property
    def urls(self) -> list[str]:
        return [m.url for m in self.members]


async def eventually(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Poll a blocking predicate in a thread (the event loop keeps delivering); its first truthy value."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(urllib.error.URLError, ConnectionError):
            value = await asyncio.to_thread(predicate)
            if value:
                return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)
