"""Issue 20: `spotd status` explains, in one line each, every on-demand node of the fallback cycle at three
moments (Spot short, Spot back but the node too young, a surge running).

`python -m spotd status` runs as a subprocess, as a member of the group deploy/status-rbac.yaml binds
(tests/permissions.py's group_member), against the fake API server with deploy/'s RBAC; the controller
runs in process as spotd-controller, with its --listen server (/status) on a real socket. The cycle is
driven as tests/test_make_before_break.py drives it: the embedded cluster's ReplicaSet controller,
scheduler and kubelet, ICE signals handed to the controller as its SQS reader hands them, Spot nodes
appearing as cluster-autoscaler would add them.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import urllib.request
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from spotd.capacity.signals import CapacitySignal, Pool, SignalKind
from spotd.sim.controllers import Controllers
from spotd.sim.kubeapi.server import FakeApiServer
from tests.agent_harness import eventually
from tests.moto_server import aws, moto_endpoint  # noqa: F401  (pytest fixtures)
from tests.permissions import group_member
from tests.test_controller import queue_source, run_in_process, source, stop_in_process  # noqa: F401
from tests.test_make_before_break import add_old_node, node, placeholders, pods_on, replica_set

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
ROOT = DEPLOY.parent
POOL_A = Pool("m5.large", "us-east-1a")
POOL_B = Pool("m5.large", "us-east-1b")
STATUS_GROUP = "spotd-status"


def in_zone(obj: dict[str, Any], zone: str) -> dict[str, Any]:
    obj["metadata"]["labels"]["topology.kubernetes.io/zone"] = zone
    obj["spec"]["providerID"] = obj["spec"]["providerID"].replace("us-east-1a", zone)
    return obj


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[FakeApiServer]:
    server = FakeApiServer(termination_scale=0.01)
    await server.start()
    server.load_manifests(
        [
            DEPLOY / "namespace.yaml",
            DEPLOY / "rbac.yaml",
            DEPLOY / "status-rbac.yaml",
            DEPLOY / "placeholder-priorityclass.yaml",
        ]
    )
    server.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})
    server.write_kubeconfig(tmp_path / "kubeconfig", token=server.service_account_token("spotd", "spotd-controller"))
    token = server.add_token(
        "status-reader-token", group_member(STATUS_GROUP), groups=(STATUS_GROUP, "system:authenticated")
    )
    server.write_kubeconfig(tmp_path / "status-kubeconfig", token=token)
    controllers = Controllers(server, random.Random(7), time_scale=0.01)
    task = asyncio.get_running_loop().create_task(controllers.run())
    yield server
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await server.stop()


async def spotd_status(tmp_path: Path, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "spotd", "status", "--kubeconfig", str(tmp_path / "status-kubeconfig"), *args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def controller_status(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as resp:
        return dict(json.loads(resp.read()))


async def entry_when(port: int, name: str, ok: Any, timeout: float = 30) -> None:
    """Wait until the controller's /status entry for `name` satisfies ok (what `spotd status` will read)."""

    def check() -> bool:
        doc = controller_status(port)
        found = next((e for e in doc.get("nodes") or () if e["node"] == name), None)
        return found is not None and bool(ok(found))

    async def poll() -> bool:
        return await asyncio.to_thread(check)

    deadline = asyncio.get_running_loop().time() + timeout
    while not await poll():
        assert asyncio.get_running_loop().time() < deadline, controller_status(port)
        await asyncio.sleep(0.1)


ON_DEMAND = ("od-a", "od-b", "sys-1")


async def explained(tmp_path: Path, port: int) -> dict[str, dict[str, Any]]:
    """`spotd status` twice (table and JSON): one line per on-demand node, each with its why; the rows."""
    url = f"http://127.0.0.1:{port}"
    code, table, err = await spotd_status(tmp_path, "--controller-url", url, "--lease-namespace", "spotd")
    assert code == 0, err
    assert "controller probe-test (leader)" in table, table
    for name in ON_DEMAND:
        lines = [line for line in table.splitlines() if line.startswith(f"{name} ")]
        assert len(lines) == 1, table
        assert " on-demand " in lines[0], lines
    code, out, err = await spotd_status(tmp_path, "--controller-url", url, "--lease-namespace", "spotd", "-o", "json")
    assert code == 0, err
    document = json.loads(out)
    assert document["controller"]["available"] is True, document["controller"]
    rows = {r["name"]: r for r in document["nodes"]}
    assert {n for n, r in rows.items() if r["kind"] == "on-demand"} == set(ON_DEMAND), rows
    for name in ON_DEMAND:
        assert rows[name]["why"] and rows[name]["next_look"], rows[name]
        line = next(line for line in table.splitlines() if line.startswith(f"{name} "))
        assert rows[name]["why"][:30] in line, (line, rows[name])  # the same words (ages move between runs)
    return rows


def ice(pool: Pool) -> CapacitySignal:
    return CapacitySignal(pool, SignalKind.ICE, "sqs", datetime.now(UTC) - timedelta(seconds=30), "capacity")


async def test_status_explains_every_on_demand_node_through_the_fallback_cycle(
    api: FakeApiServer,
    tmp_path: Path,
    source: str,  # noqa: F811
) -> None:
    add_old_node(api, node("od-a", "on-demand", cpu="8", pool="fallback"))  # 3 h old: may go back once Spot is
    add_old_node(api, in_zone(node("od-b", "on-demand", cpu="500m", pool="fallback"), "us-east-1b"), hours=0.2)
    api.create(node("sys-1", "on-demand", cpu="500m"))  # not fallback capacity
    api.create(replica_set("web", 2))
    await eventually(lambda: len(pods_on(api, "od-a", running=True)) == 2, timeout=10)
    ctl, task = await run_in_process(
        api,
        tmp_path,
        queue_source(source),
        listen=("127.0.0.1", 0),
        surge_timeout=120.0,  # the surge stays running while we look
        landing_timeout=10.0,
        min_on_demand_age=3600.0,
        ice_cooldown=5.0,
        probe_quiet_period=3600.0,
    )
    server = ctl.http_server()
    await server.start()
    try:
        await eventually(lambda: ctl.ready, timeout=20)

        # 1. Spot short: an ICE in both pools (as the queue reports a failed launch)
        ctl.on_signals([ice(POOL_A), ice(POOL_B)])
        await entry_when(server.port, "od-a", lambda e: "ICE" in e["reason"])
        rows = await explained(tmp_path, server.port)
        assert rows["od-a"]["why"].startswith("no Spot capacity: ICE capacity in m5.large/us-east-1a"), rows["od-a"]
        assert rows["od-a"]["spot"] == "unavailable"
        assert rows["od-b"]["why"].startswith("younger than --min-on-demand-age ("), rows["od-b"]
        assert "< 1h)" in rows["od-b"]["why"]
        assert rows["sys-1"]["why"].startswith("out of scope: not fallback capacity"), rows["sys-1"]

        # 2. Spot back in od-b's pool (a Spot node launched there), but od-b is too young to go
        api.create(in_zone(node("spot-b1", "spot", cpu="100m"), "us-east-1b"))
        await entry_when(server.port, "od-b", lambda e: e["spot"]["available"])
        rows = await explained(tmp_path, server.port)
        assert rows["od-b"]["spot"] == "available" and "younger than --min-on-demand-age" in rows["od-b"]["why"]
        assert rows["od-a"]["why"].startswith("no Spot capacity: ICE"), rows["od-a"]
        assert rows["sys-1"]["why"].startswith("out of scope:")

        # 3. Spot back in od-a's pool: make-before-break surges first; the Spot nodes are full, so the
        #    placeholders wait and the node is not touched
        api.create(node("spot-a1", "spot", cpu="100m"))
        await entry_when(server.port, "od-a", lambda e: (e.get("drain_in_flight") or {}).get("phase") == "surge")
        await eventually(lambda: len(placeholders(api)) == 2, timeout=20)
        rows = await explained(tmp_path, server.port)
        assert rows["od-a"]["why"].startswith("surge running since "), rows["od-a"]
        assert "placeholders hold Spot room for its pods until" in rows["od-a"]["why"]
        assert rows["od-a"]["deadline"], rows["od-a"]  # the surge's end
        assert "younger than --min-on-demand-age" in rows["od-b"]["why"]
        assert rows["sys-1"]["why"].startswith("out of scope:")
        assert not api.get("Node", "od-a")["spec"].get("unschedulable")
    finally:
        await server.stop()
        await stop_in_process(ctl, task)


async def test_without_the_controller_it_answers_from_the_nodes_and_says_so(api: FakeApiServer, tmp_path: Path) -> None:
    add_old_node(api, node("od-a", "on-demand", cpu="8", pool="fallback"))
    stored = api.get("Node", "od-a")
    stored["metadata"].setdefault("annotations", {})["spotd.io/drain"] = "false"
    api.update(stored)
    api.create(node("spot-1", "spot", cpu="1"))
    code, table, err = await spotd_status(tmp_path, "--lease-namespace", "spotd")
    assert code == 0, err
    assert table.splitlines()[0] == "the controller's view is unavailable: no --controller-url given", table
    (line,) = [line for line in table.splitlines() if line.startswith("od-a ")]
    assert "annotated spotd.io/drain=false (never drained); the controller's view is unavailable" in line
    (spot,) = [line for line in table.splitlines() if line.startswith("spot-1 ")]
    assert " spot " in spot
    # an unreachable controller is the same answer, never an error
    code, out, err = await spotd_status(tmp_path, "--controller-url", "http://127.0.0.1:9", "-o", "yaml")
    assert code == 0, err
    assert "available: false" in out and "GET http://127.0.0.1:9/status" in out
