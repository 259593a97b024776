"""Runs the real `spotd agent` as a subprocess against a FakeApiServer and a FakeImds, over real sockets."""

from __future__ import annotations

import asyncio
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

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def agent_kubeconfig(api: Any, path: Path, node: str) -> str:
    """A kubeconfig for `node`'s agent as deployed: its ServiceAccount's node-bound token, under the RBAC and
    the admission policies of deploy/ (loaded into the fake once)."""
    if api.get("ClusterRole", "spotd-agent") is None:
        api.load_manifests([DEPLOY])
    token = api.service_account_token("spotd", "spotd-agent", node_name=node)
    return str(api.write_kubeconfig(path, token=token))


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


def node_obj(name: str, *, labels: dict[str, str] | None = None, boot_id: str = "boot-1") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "node.kubernetes.io/instance-type": "m5.large",
                "topology.kubernetes.io/zone": "us-east-1a",
                "eks.amazonaws.com/capacityType": "SPOT",
                **(labels or {}),
            },
        },
        "spec": {"providerID": f"aws:///us-east-1a/i-{abs(hash(name)) % 10**17:017x}"},
        "status": {
            "conditions": [{"type": "Ready", "status": "True"}],
            "nodeInfo": {
                "bootID": boot_id,
                "architecture": "amd64",
                "containerRuntimeVersion": "containerd://1.7.11",
                "kernelVersion": "6.1.0",
                "kubeProxyVersion": "v1.30.0",
                "kubeletVersion": "v1.30.0",
                "machineID": "ec2" + boot_id,
                "operatingSystem": "linux",
                "osImage": "Amazon Linux 2023",
                "systemUUID": "ec2" + boot_id,
            },
            "allocatable": {"cpu": "2", "memory": "8Gi", "pods": "110"},
        },
    }


def pod_obj(
    name: str,
    node: str,
    *,
    namespace: str = "default",
    owner: str | None = "ReplicaSet",
    phase: str = "Running",
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    grace: int = 30,
    empty_dir: bool = False,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": labels or {"app": "web"}}
    if annotations:
        meta["annotations"] = annotations
    if owner:
        meta["ownerReferences"] = [
            {
                "apiVersion": "apps/v1",
                "kind": owner,
                "name": f"{owner.lower()}-1",
                "uid": f"uid-{owner}",
                "controller": True,
            }
        ]
    spec: dict[str, Any] = {
        "nodeName": node,
        "terminationGracePeriodSeconds": grace,
        "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.9"}],
    }
    if empty_dir:
        spec["volumes"] = [{"name": "scratch", "emptyDir": {}}]
    ready = "True" if phase == "Running" else "False"
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": spec,
        "status": {"phase": phase, "conditions": [{"type": "Ready", "status": ready}]},
    }


def pdb_obj(name: str, *, min_available: int | str, app: str = "web", namespace: str = "default") -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"minAvailable": min_available, "selector": {"matchLabels": {"app": app}}},
    }


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
        self.port = free_port()
        self.log_path = tmp / f"agent-{node}-{self.port}.log"
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
            f"127.0.0.1:{self.port}",
            "--log-level",
            "debug",
            *extra,
        ]
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProcess:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        return self

    async def ready(self, timeout: float = 15.0) -> None:
        await eventually(lambda: self.http("/readyz")[0] == 200, timeout=timeout, interval=0.1)

    def http(self, path: str) -> tuple[int, str]:
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
