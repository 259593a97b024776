"""Runs the real `spotd agent` as a subprocess against a FakeApiServer and a FakeImds, over real sockets."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from spotd.sim.builders import node as node_obj  # noqa: F401  (the one builder, under the tests' names)
from spotd.sim.builders import pdb as pdb_obj  # noqa: F401
from spotd.sim.builders import pod as pod_obj  # noqa: F401

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def agent_kubeconfig(api: Any, path: Path, node: str) -> str:
    """A kubeconfig for `node`'s agent as deployed: its ServiceAccount's node-bound token, under the RBAC and
    the admission policies of deploy/ (loaded into the fake once)."""
    if api.get("ClusterRole", "spotd-agent") is None:
        api.load_manifests([DEPLOY])
    token = api.service_account_token("spotd", "spotd-agent", node_name=node)
    return str(api.write_kubeconfig(path, token=token))


LOG_RUNS = itertools.count(1)  # log file names unique within a test's tmp dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def eventually(check: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Wait until check() returns something truthy; fail with the last value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last: {last!r})")


class AgentProcess:
    """`python -m spotd agent` with its logs captured to a file."""

    def __init__(
        self,
        tmp: Path,
        kubeconfig: str,
        imds_url: str,
        node: str,
        *extra: str,
        env: dict[str, str] | None = None,
        python: str = sys.executable,
    ) -> None:
        self._port = 0
        self.log_path = tmp / f"agent-{node}-{next(LOG_RUNS)}.log"
        self.args = [
            python,
            "-m",
            "spotd",
            "agent",
            "--node-name",
            node,
            "--kubeconfig",
            kubeconfig,
            "--imds-endpoint",
            imds_url,
            "--poll-interval",
            "0.2s",
            "--listen",
            "127.0.0.1:0",  # the program's own bind: a port picked here could be taken before it binds
            "--log-level",
            "debug",
            *extra,
        ]
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        """The port the program bound (read from its start line); 0 until it has logged it."""
        if not self._port:
            for entry in self.logs() if self.log_path.exists() else ():
                if entry.get("event") == "agent_started" and entry.get("listen"):
                    self._port = int(str(entry["listen"]).rsplit(":", 1)[1])
                elif entry.get("event") == "listening" and entry.get("port"):
                    self._port = int(entry["port"])
        return self._port

    def start(self) -> AgentProcess:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        return self

    async def ready(self, timeout: float = 60.0) -> None:  # a wait: a Python start on a loaded machine
        await eventually(lambda: self.http("/readyz")[0] == 200, timeout=timeout, interval=0.1)

    def http(self, path: str) -> tuple[int, str]:
        if not self.port:
            return 0, ""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except OSError:
            return 0, ""

    def metric(self, name: str, **labels: str) -> float | None:
        status, text = self.http("/metrics")
        if status != 200:
            return None
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return float(sample.value)
        return None

    def logs(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"event": "non_json", "line": line})
        return out

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.logs() if e.get("event") == name]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
