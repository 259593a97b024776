"""Scale bench: the controller against 5,000 nodes and 150,000 pods in the fake API server.

    .venv/bin/python bench/bench_controller.py [--nodes 5000] [--pods-per-node 30] [--passes 5]

Loads the cluster into a FakeApiServer (in this process), starts moto and the real controller as a
subprocess (`python -m spotd controller --dry-run`), waits for the inventory to be warm, then reads
the controller's resident memory (/proc/PID/status VmRSS, and the peak VmHWM) and the time of its
decision passes (the `seconds` field of its `decision_pass` log events). Goal: < 400 MB and < 200 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from moto.server import ThreadedMotoServer

from spotd.common.parsing import format_time
from spotd.sim import builders
from spotd.sim.kubeapi.server import FakeApiServer

ZONES = ("us-east-1a", "us-east-1b", "us-east-1c")
TYPES = ("m5.large", "m5.xlarge", "c5.xlarge", "r5.large")


def node_obj(i: int) -> dict[str, Any]:
    """The builder's node, with the annotations and conditions a real kubelet adds: the bytes the inventory
    decodes are what this bench weighs."""
    spot = i % 2 == 0
    zone, itype = ZONES[i % 3], TYPES[i % 4]
    node = builders.node(
        f"ip-10-{i // 250}-{i % 250}-1.ec2.internal",
        builders.SPOT if spot else builders.ON_DEMAND,
        instance_type=itype,
        zone=zone,
        labels={"kubernetes.io/arch": "amd64", "eks.amazonaws.com/nodegroup": "workers-spot" if spot else "workers-od"},
        instance_id=f"i-{i:017x}",
        allocatable={"cpu": "3920m", "memory": "15Gi", "pods": "58"},
        capacity_resources={"cpu": "4", "memory": "16Gi", "pods": "58"},
    )
    node["metadata"]["annotations"] = {
        "node.alpha.kubernetes.io/ttl": "0",
        "volumes.kubernetes.io/controller-managed-attach-detach": "true",
    }
    node["status"]["conditions"] = [
        {"type": "MemoryPressure", "status": "False", "reason": "KubeletHasSufficientMemory"},
        {"type": "DiskPressure", "status": "False", "reason": "KubeletHasNoDiskPressure"},
        {"type": "PIDPressure", "status": "False", "reason": "KubeletHasSufficientPID"},
        {"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "kubelet is posting ready status"},
    ]
    return node


def pod_obj(node: str, i: int, j: int) -> dict[str, Any]:
    ns = f"team-{(i * 7 + j) % 40}"
    app = f"svc-{(i + j) % 300}"
    daemon = j == 0
    owner = (
        {"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "aws-node", "uid": "ds-1", "controller": True}
        if daemon
        else {
            "apiVersion": "apps/v1",
            "kind": "ReplicaSet",
            "name": f"{app}-7d9f8c",
            "uid": f"rs-{app}",
            "controller": True,
        }
    )
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{app}-7d9f8c-{i:05d}{j:02d}",
            "namespace": "kube-system" if daemon else ns,
            "labels": {"app": app, "pod-template-hash": "7d9f8c", "team": ns},
            "annotations": {
                "kubectl.kubernetes.io/restartedAt": "2026-01-01T00:00:00Z",
                "prometheus.io/scrape": "true",
            },
            "ownerReferences": [owner],
        },
        "spec": {
            "nodeName": node,
            "serviceAccountName": "default",
            "terminationGracePeriodSeconds": 30,
            "containers": [
                {
                    "name": "app",
                    "image": f"123456789012.dkr.ecr.us-east-1.amazonaws.com/{app}:v1.2.3",
                    "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                    "env": [{"name": "LOG_LEVEL", "value": "info"}, {"name": "TEAM", "value": ns}],
                    "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
                }
            ],
            "volumes": [
                {"name": "kube-api-access", "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]}}
            ],
        },
        "status": {
            "phase": "Running",
            "podIP": f"10.{i // 250}.{i % 250}.{j}",
            "conditions": [
                {"type": "Initialized", "status": "True"},
                {"type": "Ready", "status": "True"},
                {"type": "ContainersReady", "status": "True"},
                {"type": "PodScheduled", "status": "True"},
            ],
        },
    }


def age_node(api: FakeApiServer, name: str, created: str) -> None:
    """The API server sets creationTimestamp itself; the bench reaches into its store to age a node."""
    stored = api.store.get("Node", "", name)
    stored["metadata"]["creationTimestamp"] = created


def launch(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)


def rss(pid: int) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024.0
    return out


def passes(log_path: Path) -> list[dict[str, Any]]:
    found = []
    for line in log_path.read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "decision_pass":
            found.append(event)
    return found


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=5000)
    parser.add_argument("--pods-per-node", type=int, default=30)
    parser.add_argument("--passes", type=int, default=5)
    opts = parser.parse_args()

    api = FakeApiServer(host="127.0.0.1", port=0)
    await api.start()
    tmp = Path(tempfile.mkdtemp(prefix="spotd-bench-"))
    kubeconfig = tmp / "kubeconfig"
    api.write_kubeconfig(str(kubeconfig))
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()

    started = time.monotonic()
    old = format_time(datetime.now(UTC) - timedelta(hours=5))
    for i in range(opts.nodes):
        node = api.create(node_obj(i))
        name = node["metadata"]["name"]
        for j in range(opts.pods_per_node):
            api.create(pod_obj(name, i, j))
    # Half the nodes old enough to be drain candidates: the API sets creationTimestamp, so age them here.
    for i in range(1, opts.nodes, 4):  # every other on-demand node (odd i are on-demand)
        age_node(api, node_obj(i)["metadata"]["name"], old)
    load_s = time.monotonic() - started
    print(f"loaded {opts.nodes} nodes, {opts.nodes * opts.pods_per_node} pods in {load_s:.1f}s", flush=True)

    log_path = tmp / "controller.log"
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "POD_NAME": "bench-controller",
    }
    args = [
        sys.executable,
        "-m",
        "spotd",
        "controller",
        "--kubeconfig",
        str(kubeconfig),
        "--listen",
        "127.0.0.1:0",
        "--lease-namespace",
        "kube-system",
        "--min-on-demand-age",
        "2h",
        "--ice-cooldown",
        "15m",
        "--interval",
        "1s",
        "--fallback-selector",
        "eks.amazonaws.com/nodegroup=workers-od",  # every on-demand node is a candidate, as before scoping
        "--dry-run",
        "--log-level",
        "info",
    ]
    proc = launch(args, env, log_path)
    t0 = time.monotonic()
    try:
        while len(passes(log_path)) < 1:
            if proc.poll() is not None:
                print(log_path.read_text()[-3000:])
                return 1
            if time.monotonic() - t0 > 600:
                print("timed out waiting for the inventory")
                return 1
            await asyncio.sleep(0.5)
        warm_s = time.monotonic() - t0
        while len(passes(log_path)) < opts.passes + 1:  # noqa: ASYNC110 - the log file is the only signal
            await asyncio.sleep(0.5)
        mem = rss(proc.pid)
        found = passes(log_path)
        times_ms = [e["seconds"] * 1000 for e in found[1:]]  # the first pass builds the pod summaries
        first = found[0]
        print(f"inventory warm (first decision pass) after {warm_s:.1f}s: {first['nodes']} nodes, {first['pods']} pods")
        print(f"controller RSS {mem['VmRSS']:.0f} MB (peak {mem['VmHWM']:.0f} MB); goal < 400 MB")
        print(
            f"decision pass: first {first['seconds'] * 1000:.1f} ms, then median {statistics.median(times_ms):.1f} ms, "
            f"max {max(times_ms):.1f} ms over {len(times_ms)} passes; goal < 200 ms "
            f"({first['on_demand']} on-demand nodes judged, {first['drains']} drains chosen)"
        )
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        await api.stop()
        moto.stop()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
