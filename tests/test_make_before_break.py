# ruff: noqa: F811
"""Issue 12 done-when (1)-(3): the controller, in process, as the real spotd-controller identity (deploy/'s
RBAC), against the fake API server with the embedded cluster's ReplicaSet controller, scheduler and kubelet.

(1) Spot short: nothing of the fallback node is evicted, the placeholders are removed after --surge-timeout,
    the node is never cordoned, the pool is recorded as short and no drain follows.
(2) A new Spot node runs the placeholders: the node's pods are evicted only after that, and the Event says
    where their replacements run.
(3) The replacements land on on-demand: the pool is marked short, the drain is reported as not returned,
    and no other drain of that pool follows (it waits for a successful surge).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from spotd.capacity.signals import Pool
from spotd.common.parsing import format_time
from spotd.sim.controllers import Controllers
from spotd.sim.kubeapi.server import FakeApiServer
from tests.agent_harness import eventually
from tests.moto_server import aws, moto_endpoint  # noqa: F401  (pytest fixtures)
from tests.test_controller import events_for, queue_source, run_in_process, source, stop_in_process  # noqa: F401

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
CT = "karpenter.sh/capacity-type"
POOL = Pool("m5.large", "us-east-1a")
PLACEHOLDER = "spotd.io/placeholder-for"


def node(name: str, capacity: str, cpu: str, pool: str = "") -> dict[str, Any]:
    labels = {
        "kubernetes.io/hostname": name,
        "node.kubernetes.io/instance-type": "m5.large",
        "topology.kubernetes.io/zone": "us-east-1a",
        CT: capacity,
        **({"node-pool": pool} if pool else {}),
    }
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "spec": {"providerID": f"aws:///us-east-1a/i-{abs(hash(name)) % 16**17:017x}"},
        "status": {
            "allocatable": {"cpu": cpu, "memory": "64Gi", "pods": "110"},
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


def add_old_node(api: FakeApiServer, obj: dict[str, Any], hours: float = 3) -> None:
    api.create(obj)
    stored = api.store.get("Node", "", obj["metadata"]["name"])
    stored["metadata"]["creationTimestamp"] = format_time(datetime.now(UTC) - timedelta(hours=hours))[:19] + "Z"


def replica_set(name: str, replicas: int, cpu: str = "1") -> dict[str, Any]:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "ReplicaSet",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{"name": "app", "image": "app", "resources": {"requests": {"cpu": cpu}}}],
                },
            },
        },
    }


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[FakeApiServer]:
    """deploy/'s namespace, RBAC and PriorityClass; the controller's kubeconfig carries its own token."""
    server = FakeApiServer(termination_scale=0.01)
    await server.start()
    server.load_manifests([DEPLOY / "namespace.yaml", DEPLOY / "rbac.yaml", DEPLOY / "placeholder-priorityclass.yaml"])
    server.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})
    server.write_kubeconfig(tmp_path / "kubeconfig", token=server.service_account_token("spotd", "spotd-controller"))
    controllers = Controllers(server, random.Random(7), time_scale=0.01)
    task = asyncio.get_running_loop().create_task(controllers.run())
    yield server
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await server.stop()


def pods_on(api: FakeApiServer, name: str, running: bool = False) -> list[dict[str, Any]]:
    return [
        p
        for p in api.list("Pod", "shop")
        if p["spec"].get("nodeName") == name and (not running or p["status"].get("phase") == "Running")
    ]


def placeholders(api: FakeApiServer) -> list[dict[str, Any]]:
    return [p for p in api.list("Pod", "spotd") if PLACEHOLDER in (p["metadata"].get("labels") or {})]


def evictions(api: FakeApiServer) -> list[int]:
    """Indexes in the request log of the eviction requests."""
    return [i for i, r in enumerate(api.requests) if r.method == "POST" and r.path.endswith("/eviction")]


def node_patches(api: FakeApiServer, name: str) -> list[Any]:
    return [r for r in api.requests if r.method == "PATCH" and r.path.endswith(f"/api/v1/nodes/{name}")]


def event_messages(api: FakeApiServer, name: str, reason: str) -> list[str]:
    return [
        str(e.get("message", ""))
        for e in api.list("Event")
        if e.get("involvedObject", {}).get("name") == name and e.get("reason") == reason
    ]


async def start(api: FakeApiServer, tmp_path: Path, source: str, **overrides: Any) -> tuple[Any, asyncio.Task[Any]]:
    settings: dict[str, Any] = {
        "lease_namespace": "spotd",
        "lease_name": "spotd-controller",
        "placeholder_namespace": "spotd",
        "surge_timeout": 20.0,
        "landing_timeout": 10.0,
        "probe_quiet_period": 3600.0,  # no probe during a test: a short pool stays short
        **overrides,
    }
    return await run_in_process(api, tmp_path, queue_source(source), **settings)


async def cluster(api: FakeApiServer) -> list[str]:
    """od-1 (fallback, old) runs web x2; spot-0 is a full Spot node of the same pool (Spot launched there)."""
    add_old_node(api, node("od-1", "on-demand", cpu="8", pool="fallback"))
    api.create(node("spot-0", "spot", cpu="100m"))
    api.create(replica_set("web", 2))
    await eventually(lambda: len(pods_on(api, "od-1", running=True)) == 2, timeout=10)
    return sorted(p["metadata"]["uid"] for p in pods_on(api, "od-1"))


async def test_spot_short_evicts_nothing_and_records_the_pool_short(
    api: FakeApiServer, tmp_path: Path, source: str
) -> None:
    before = await cluster(api)
    ctl, task = await start(api, tmp_path, source, surge_timeout=1.5)
    try:
        await eventually(lambda: len(placeholders(api)) == 2, timeout=20)
        await eventually(lambda: "SpotdSurgeFailed" in events_for(api, "od-1"), timeout=10)
        await eventually(lambda: placeholders(api) == [], timeout=5)
        verdict = ctl.book.spot_available(POOL, ctl.clock(), timedelta(seconds=60))
        assert not verdict.available and "short" in verdict.reason, verdict
        await eventually(lambda: "short" in ctl.reasons.get("od-1", ""), timeout=10)  # a pass after the surge
        await asyncio.sleep(1.5)  # more passes: the short pool is not tried again
        assert events_for(api, "od-1").count("SpotdSurgeFailed") == 1
        assert "SpotdDrainStarted" not in events_for(api, "od-1")
        assert "short" in ctl.reasons.get("od-1", ""), ctl.reasons
        assert list(ctl.history) == []  # a failed surge disrupted nothing: no drain in the hourly budget
    finally:
        await stop_in_process(ctl, task)
    assert evictions(api) == []
    assert node_patches(api, "od-1") == []  # never cordoned, nothing written on it
    assert not api.get("Node", "od-1")["spec"].get("unschedulable")
    assert sorted(p["metadata"]["uid"] for p in pods_on(api, "od-1")) == before


def book_when_announced(api: FakeApiServer, holder: dict[str, Any], reasons: set[str]) -> list[tuple[str, Any]]:
    """The pool's verdict in the controller's book at the instant each announcement is committed to the API
    server: an Event with one of `reasons`, or a placeholder pod deleted (or marked for deletion)."""
    seen: list[tuple[str, Any]] = []

    def hook(ch: Any) -> None:
        ctl = holder.get("ctl")
        if ctl is None:
            return
        meta = ch.obj.get("metadata") or {}
        if ch.kind == "Event" and ch.obj.get("reason") in reasons:
            what = str(ch.obj["reason"])
        elif ch.kind == "Pod" and PLACEHOLDER in (meta.get("labels") or {}):
            if ch.type != "DELETED" and not meta.get("deletionTimestamp"):
                return
            what = "placeholder deleted"
        else:
            return
        seen.append((what, ctl.book.spot_available(POOL, ctl.clock(), timedelta(seconds=60))))

    api.store.hooks.append(hook)
    return seen


async def test_the_failed_surge_is_booked_before_its_event_and_the_placeholders_deletion(
    api: FakeApiServer, tmp_path: Path, source: str
) -> None:
    """A reader of SpotdSurgeFailed (an operator, `spotd status`, a test) must not find the pool available."""
    await cluster(api)
    holder: dict[str, Any] = {}
    seen = book_when_announced(api, holder, {"SpotdSurgeFailed"})
    ctl, task = await start(api, tmp_path, source, surge_timeout=1.5)
    holder["ctl"] = ctl
    try:
        await eventually(lambda: "SpotdSurgeFailed" in events_for(api, "od-1"), timeout=20)
        await eventually(lambda: placeholders(api) == [], timeout=5)
    finally:
        await stop_in_process(ctl, task)
    assert {what for what, _ in seen} == {"SpotdSurgeFailed", "placeholder deleted"}, seen
    assert all(not verdict.available and "short" in verdict.reason for _, verdict in seen), seen


async def test_placeholders_on_a_new_spot_node_then_the_drain_and_where_they_landed(
    api: FakeApiServer, tmp_path: Path, source: str
) -> None:
    await cluster(api)
    ctl, task = await start(api, tmp_path, source)
    try:
        await eventually(lambda: len(placeholders(api)) == 2, timeout=20)
        await asyncio.sleep(0.5)
        assert evictions(api) == [] and not api.get("Node", "od-1")["spec"].get("unschedulable")
        api.create(node("spot-1", "spot", cpu="2"))  # cluster-autoscaler's answer to the placeholders
        await eventually(lambda: event_messages(api, "od-1", "SpotdDrainReturned"), timeout=30)
        # each Event is its own request, sent in the background: their order at the API server is not given
        await eventually(lambda: "SpotdSurgeReady" in events_for(api, "od-1"), timeout=5)
        returned = event_messages(api, "od-1", "SpotdDrainReturned")[0]
        assert returned.count("spot-1 (spot)") == 2, returned
        assert ctl.book.spot_available(POOL, ctl.clock(), timedelta(seconds=60)).available
    finally:
        await stop_in_process(ctl, task)
    # evicted only after the placeholders ran on spot-1 and were deleted to make room
    spotd_pods = "/api/v1/namespaces/spotd/pods/"
    placeholder_deletes = [i for i, r in enumerate(api.requests) if r.method == "DELETE" and spotd_pods in r.path]
    assert len(evictions(api)) == 2 and len(placeholder_deletes) >= 2
    assert max(placeholder_deletes[:2]) < min(evictions(api))
    assert len(pods_on(api, "spot-1", running=True)) == 2 and pods_on(api, "od-1") == []


async def test_replacements_on_on_demand_mark_the_pool_short_and_no_drain_follows(
    api: FakeApiServer, tmp_path: Path, source: str
) -> None:
    add_old_node(api, node("od-2", "on-demand", cpu="1", pool="fallback"), hours=2)  # same pool, younger
    api.create(replica_set("api", 1))
    await eventually(lambda: len(pods_on(api, "od-2", running=True)) == 1, timeout=10)
    await cluster(api)
    api.create(node("system-1", "on-demand", cpu="32"))  # out of scope, the most room: the scheduler's pick
    api.create(node("spot-1", "spot", cpu="2"))  # room for the placeholders, and they can only go there
    holder: dict[str, Any] = {}
    seen = book_when_announced(api, holder, {"SpotdDrainNotReturned"})
    ctl, task = await start(api, tmp_path, source, max_concurrent_drains=1, min_on_demand_age=3600.0)
    holder["ctl"] = ctl
    try:
        await eventually(lambda: event_messages(api, "od-1", "SpotdDrainNotReturned"), timeout=30)
        announced = [verdict for what, verdict in seen if what == "SpotdDrainNotReturned"]
        assert announced and not announced[0].available, seen  # booked short before the Event said so
        message = event_messages(api, "od-1", "SpotdDrainNotReturned")[0]
        assert "system-1 (on-demand)" in message and "marked short" in message, message
        verdict = ctl.book.spot_available(POOL, ctl.clock(), timedelta(seconds=60))
        assert not verdict.available and "waits for a successful surge" in verdict.reason, verdict
        await eventually(lambda: "short" in ctl.reasons.get("od-2", ""), timeout=10)  # a pass after the landing
        await asyncio.sleep(2.0)  # more passes: od-2, same pool, is not drained nor surged for
        assert "short" in ctl.reasons.get("od-2", ""), ctl.reasons
    finally:
        await stop_in_process(ctl, task)
    assert events_for(api, "od-2") == [] and node_patches(api, "od-2") == []
    assert len(pods_on(api, "od-2", running=True)) == 1


async def test_a_new_term_deletes_the_placeholders_a_previous_leader_left(
    api: FakeApiServer, tmp_path: Path, source: str
) -> None:
    from spotd.controller.placeholders import placeholder_pods

    await cluster(api)
    left = placeholder_pods("od-9", pods_on(api, "od-1"), namespace="spotd", capacity_label=CT, spot_values=["spot"])
    for i, pod in enumerate(left):
        pod["metadata"]["name"] = f"spotd-placeholder-left-{i}"
        api.create(pod)
    assert len(placeholders(api)) == 2
    ctl, task = await start(api, tmp_path, source, min_on_demand_age=24 * 3600.0)  # nothing to drain
    try:
        await eventually(lambda: ctl.ready, timeout=20)
        await eventually(lambda: placeholders(api) == [], timeout=5)
    finally:
        await stop_in_process(ctl, task)


def test_the_make_before_break_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import argparse

    from spotd.controller.config import add_arguments, config_from_args

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\nclusters: [{name: c, cluster: {server: 'http://127.0.0.1:1'}}]\n"
        "contexts: [{name: c, context: {cluster: c, user: u}}]\nusers: [{name: u, user: {}}]\n"
    )
    monkeypatch.setenv("SPOTD_KUBECONFIG", str(kubeconfig))
    monkeypatch.setenv("POD_NAMESPACE", "ops")
    monkeypatch.setenv("SPOTD_LANDING_TIMEOUT", "2m")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = config_from_args(parser.parse_args([]))
    assert config.surge_timeout == 900 and config.landing_timeout == 120
    assert config.placeholder_namespace == "ops" and config.placeholder_priority_class == "spotd-placeholder"
    assert config.placeholder_image == "registry.k8s.io/pause:3.10"
    off = config_from_args(parser.parse_args(["--surge-timeout", "0", "--placeholder-image", "mirror/pause:3.10"]))
    assert off.surge_timeout == 0 and off.placeholder_image == "mirror/pause:3.10"
    with pytest.raises(ValueError, match="--surge-timeout"):
        config_from_args(parser.parse_args(["--surge-timeout", "soon"]))
