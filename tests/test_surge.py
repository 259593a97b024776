"""Make-before-break against the fake API server, with the embedded cluster's scheduler and kubelet placing
the placeholders: the controller's real identity and deploy/'s RBAC, so a missing permission fails here.

Covers: placeholders carry the pod's constraints and the Spot affinity; no Spot room -> the surge fails
after its timeout, the placeholders are gone and the fallback node and its pods are untouched; a Spot node
appears -> ready, and where they ran; cancellation deletes them; a previous term's placeholders are cleaned
up; a zonal volume pins the placeholder to its zone; where replacements landed; cluster-autoscaler's
ConfigMaps are readable.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from spotd.common.metrics import REGISTRY
from spotd.controller.autoscaler_view import groups_in_backoff, parse_status
from spotd.controller.landing import PodSeen, what_to_follow
from spotd.controller.placeholders import placeholder_pods
from spotd.controller.surge import (
    api_pods,
    backoff_gate,
    check_priorities,
    cleanup_stale_placeholders,
    follow_before_drain,
    read_autoscaler_configmaps,
    replacements_landed,
    surge,
    zones_of_claims,
)
from spotd.kube.client import make_client
from spotd.sim import builders
from spotd.sim.controllers import Controllers
from spotd.sim.kubeapi.server import FakeApiServer
from tests.agent_harness import eventually

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
CT = "karpenter.sh/capacity-type"
OD_NODE = "od-1"
PLACEHOLDER = "spotd.io/placeholder-for"
EBS_ZONE = {"key": "topology.ebs.csi.aws.com/zone", "operator": "In", "values": ["us-east-1b"]}
log = structlog.get_logger()


class Events:
    def __init__(self) -> None:
        self.recorded: list[tuple[str, str, str, str]] = []

    def record(self, node: str, reason: str, message: str, type: str = "Normal", node_uid: str = "") -> None:
        self.recorded.append((node, reason, message, type))


def node(name: str, capacity: str, zone: str = "us-east-1a", cpu: str = "4") -> dict[str, Any]:
    allocatable = {"cpu": cpu, "memory": "16Gi", "pods": "110"}
    return builders.node(name, capacity, capacity_label=CT, zone=zone, allocatable=allocatable)


def workload_pod(name: str, on: str = OD_NODE, cpu: str = "1", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "shop",
            "labels": {"app": "web"},
            "ownerReferences": [
                {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-rs", "uid": "u-rs", "controller": True}
            ],
        },
        "spec": {
            "nodeName": on,
            "containers": [{"name": "app", "image": "app", "resources": {"requests": {"cpu": cpu, "memory": "1Gi"}}}],
            **spec,
        },
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]},
    }


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    server = FakeApiServer(termination_scale=0.01)
    await server.start()
    server.load_manifests([DEPLOY / "namespace.yaml", DEPLOY / "rbac.yaml", DEPLOY / "placeholder-priorityclass.yaml"])
    server.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})
    server.create(node(OD_NODE, "on-demand", cpu="8"))
    controllers = Controllers(server, random.Random(7), time_scale=0.01)
    task = asyncio.get_running_loop().create_task(controllers.run())
    yield server
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await server.stop()


@pytest.fixture
def client(api: FakeApiServer, tmp_path: Path) -> Any:
    """The controller as itself: deploy/rbac.yaml decides what it may do."""
    token = api.service_account_token("spotd", "spotd-controller")
    return make_client(str(api.write_kubeconfig(tmp_path / "kubeconfig", token=token)))


def placeholders(api: FakeApiServer) -> list[dict[str, Any]]:
    return [p for p in api.list("Pod", "spotd") if PLACEHOLDER in (p["metadata"].get("labels") or {})]


def pods_of(api: FakeApiServer, node_name: str) -> list[dict[str, Any]]:
    return [p for p in api.list("Pod") if p["spec"].get("nodeName") == node_name]


async def run_surge(client: Any, api: FakeApiServer, timeout: float, events: Events | None = None, **kw: Any) -> Any:
    return await surge(
        client,
        OD_NODE,
        pods_of(api, OD_NODE),
        namespace="spotd",
        capacity_label=CT,
        spot_values=["spot"],
        timeout=timeout,
        log=log,
        events=events,
        poll=0.05,
        **kw,
    )


async def test_no_spot_room_fails_after_the_timeout_and_touches_nothing(api: FakeApiServer, client: Any) -> None:
    tolerations = [{"key": "team", "operator": "Equal", "value": "shop", "effect": "NoSchedule"}]
    api.create(workload_pod("web-1", nodeSelector={"kubernetes.io/os": "linux"}, tolerations=tolerations))
    api.create(workload_pod("web-2"))
    api.create(node("od-2", "on-demand", cpu="16"))  # plenty of on-demand room: placeholders must not use it
    events = Events()
    failed_before = REGISTRY.get_sample_value("spotd_surges_total", {"outcome": "failed"}) or 0
    task = asyncio.get_running_loop().create_task(run_surge(client, api, timeout=1.5, events=events))

    await eventually(lambda: len(placeholders(api)) == 2)
    of = {p["metadata"]["annotations"]["spotd.io/placeholder-of"]: p for p in placeholders(api)}
    first = of["shop/web-1"]
    spec = first["spec"]
    assert first["metadata"]["labels"][PLACEHOLDER] == OD_NODE
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux"} and spec["tolerations"] == tolerations
    assert spec["priorityClassName"] == "spotd-placeholder"
    assert spec["containers"][0]["resources"]["requests"] == {"cpu": "1000m", "memory": str(2**30)}
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms == [{"matchExpressions": [{"key": CT, "operator": "In", "values": ["spot"]}]}]
    await eventually(lambda: all(not p["spec"].get("nodeName") for p in placeholders(api)), timeout=1.0)

    outcome = await task
    assert not outcome.ready
    assert "2 of 2 placeholder(s) not running on Spot after 1.5s (Unschedulable)" in outcome.reason
    await eventually(lambda: placeholders(api) == [], timeout=3.0)
    # the fallback node and its pods: untouched
    assert sorted(p["metadata"]["name"] for p in pods_of(api, OD_NODE)) == ["web-1", "web-2"]
    assert not api.get("Node", OD_NODE)["spec"].get("unschedulable")
    assert [(e[0], e[1], e[3]) for e in events.recorded] == [(OD_NODE, "SpotdSurgeFailed", "Warning")]
    assert REGISTRY.get_sample_value("spotd_surges_total", {"outcome": "failed"}) == failed_before + 1


async def test_a_spot_node_appears_and_the_surge_is_ready(api: FakeApiServer, client: Any) -> None:
    api.create(workload_pod("web-1", cpu="2"))
    api.create(workload_pod("web-2", cpu="2"))
    api.create(node("spot-small", "spot", cpu="1"))  # Spot, but too small for either
    events = Events()
    task = asyncio.get_running_loop().create_task(run_surge(client, api, timeout=20, events=events))
    await eventually(lambda: len(placeholders(api)) == 2)
    await asyncio.sleep(0.3)
    assert not task.done()
    assert all(not p["spec"].get("nodeName") for p in placeholders(api))

    api.create(node("spot-1", "spot", cpu="4"))  # what cluster-autoscaler would launch
    outcome = await asyncio.wait_for(task, 10)
    assert outcome.ready, outcome.reason
    assert list(outcome.nodes) == ["spot-1"] and len(outcome.nodes["spot-1"]) == 2
    assert "2 placeholder(s) running on Spot node(s) ['spot-1']" in outcome.reason
    await eventually(lambda: placeholders(api) == [], timeout=3.0)
    # the surge itself never evicts: the drain job does, after it
    assert len(pods_of(api, OD_NODE)) == 2
    assert [e[1] for e in events.recorded] == ["SpotdSurgeReady"]


async def test_cancellation_deletes_the_placeholders(api: FakeApiServer, client: Any) -> None:
    api.create(workload_pod("web-1"))
    task = asyncio.get_running_loop().create_task(run_surge(client, api, timeout=60))
    await eventually(lambda: len(placeholders(api)) == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await eventually(lambda: placeholders(api) == [], timeout=3.0)


async def test_nothing_to_move_needs_no_placeholder(api: FakeApiServer, client: Any) -> None:
    outcome = await run_surge(client, api, timeout=1)
    assert outcome.ready and outcome.reason == "no pod to make room for"


async def test_a_refused_create_fails_the_surge(api: FakeApiServer, client: Any) -> None:
    api.create(workload_pod("web-1"))
    # the controller may create pods in its own namespace only (a denial on purpose: kept out of the
    # session's permission records, tests/permissions.py)
    api.report_access = False
    result = await surge(
        client,
        OD_NODE,
        pods_of(api, OD_NODE),
        namespace="shop",
        capacity_label=CT,
        spot_values=["spot"],
        timeout=5,
        log=log,
        poll=0.05,
    )
    assert not result.ready and "placeholder create refused (403)" in result.reason
    assert [p for p in api.list("Pod", "shop") if p["metadata"]["name"].startswith("spotd-")] == []


async def test_stale_placeholders_are_cleaned_up(api: FakeApiServer, client: Any) -> None:
    for name in ("gone-node", "busy-node"):
        for manifest in placeholder_pods(
            name, [workload_pod("web-1", on=name)], namespace="spotd", capacity_label=CT, spot_values=["spot"]
        ):
            api.create({**manifest, "metadata": {**manifest["metadata"], "name": f"ph-{name}"}})
    api.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "other", "namespace": "spotd"},
                "spec": {"containers": [{"name": "c", "image": "x"}]}})  # fmt: skip
    removed = await cleanup_stale_placeholders(client, "spotd", log, surging={"busy-node"})
    assert removed == ["ph-gone-node"]
    left = ["other", "ph-busy-node"]
    await eventually(lambda: sorted(p["metadata"]["name"] for p in api.list("Pod", "spotd")) == left)


async def test_a_zonal_volume_pins_the_placeholder_to_its_zone(api: FakeApiServer, client: Any) -> None:
    api.create(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": "pv-data"},
            "spec": {
                "capacity": {"storage": "10Gi"},
                "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [EBS_ZONE]}]}},
            },
        }
    )
    api.create(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "data-web-1", "namespace": "shop"},
            "spec": {"volumeName": "pv-data"},
        }
    )
    volumes = [{"name": "data", "persistentVolumeClaim": {"claimName": "data-web-1"}}]
    api.create(workload_pod("web-1", volumes=volumes))
    zones = await zones_of_claims(client, pods_of(api, OD_NODE))
    assert zones == {("shop", "data-web-1"): ["us-east-1b"]}

    api.create(node("spot-a", "spot", zone="us-east-1a"))  # room, wrong zone
    task = asyncio.get_running_loop().create_task(run_surge(client, api, timeout=20, zone_of_claim=zones))
    await eventually(lambda: len(placeholders(api)) == 1)
    await asyncio.sleep(0.3)
    assert not task.done() and not placeholders(api)[0]["spec"].get("nodeName")
    api.create(node("spot-b", "spot", zone="us-east-1b"))
    outcome = await asyncio.wait_for(task, 10)
    assert outcome.ready and list(outcome.nodes) == ["spot-b"]


async def test_where_the_replacements_landed(api: FakeApiServer, client: Any) -> None:
    api.create(node("spot-1", "spot"))
    api.create(workload_pod("web-1"))
    api.create(workload_pod("web-2"))
    api.create(workload_pod("web-0", on="spot-1"))  # a sibling already on Spot: not a replacement
    pods_now = api_pods(client)
    follow = await follow_before_drain(pods_now, OD_NODE, pods_of(api, OD_NODE))
    web_0 = api.get("Pod", "web-0", "shop")["metadata"]["uid"]
    assert follow.expected == 2 and web_0 in follow.before and len(follow.before) == 3

    for name in ("web-1", "web-2"):  # the drain
        api.delete("Pod", name, "shop")
    api.create(workload_pod("web-3", on="spot-1"))
    api.create(node("od-2", "on-demand"))
    api.create(workload_pod("web-4", on="od-2"))
    short_before = REGISTRY.get_sample_value("spotd_drain_landings_total", {"result": "short"}) or 0
    landing = await replacements_landed(client, follow, capacity_label=CT, timeout=5, log=log, poll=0.05)
    assert landing.short and not landing.returned
    assert REGISTRY.get_sample_value("spotd_drain_landings_total", {"result": "short"}) == short_before + 1
    assert "landed on on-demand node(s) ['od-2']: ['shop/web-4']" in landing.reason
    assert landing.placed == {"shop/web-3": "spot-1 (spot)", "shop/web-4": "od-2 (on-demand)"}


async def test_replacements_all_on_spot(api: FakeApiServer, client: Any) -> None:
    api.create(node("spot-1", "spot"))
    follow = what_to_follow(OD_NODE, [workload_pod("web-1")], [])
    api.create(workload_pod("web-9", on="spot-1"))

    async def inventory_view(namespaces: Any) -> list[PodSeen]:  # the controller may pass its inventory's view
        return [PodSeen("shop", "web-9", "ReplicaSet", "web-rs", "spot-1", running=True)]

    landing = await replacements_landed(
        client, follow, capacity_label=CT, timeout=5, log=log, pods_now=inventory_view, poll=0.05
    )
    assert landing.returned and not landing.short


async def test_cluster_autoscaler_configmaps(api: FakeApiServer, client: Any) -> None:
    assert (await read_autoscaler_configmaps(client)).status is None
    status = "time: 2026-11-30 12:00:10 +0000 UTC\nautoscalerStatus: Running\nnodeGroups:\n- name: spot-a\n  scaleUp:\n    status: Backoff\n"  # noqa: E501
    for name, key, text in (
        ("cluster-autoscaler-status", "status", status),
        ("cluster-autoscaler-priority-expander", "priorities", "10:\n  - .*spot.*\n"),
    ):
        api.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": "kube-system"},
                    "data": {key: text}})  # fmt: skip
    read = await read_autoscaler_configmaps(client)
    assert read.priorities == "10:\n  - .*spot.*\n"
    assert read.status is not None
    parsed = parse_status(read.status)
    assert list(groups_in_backoff(parsed, parsed.time)) == ["spot-a"]  # type: ignore[arg-type]


# ---- the "done when", composed as the drain job is meant to compose it (docs/controller.md) ----------


def replica_set(name: str, replicas: int, cpu: str) -> dict[str, Any]:
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


async def make_before_break(client: Any, api: FakeApiServer, surge_timeout: float) -> tuple[Any, Any, Any]:
    """What the drain job will do with surge.py: surge, and only when ready cordon, drain, follow the landing."""
    from spotd.drain.executor import DrainOptions, drain_node
    from spotd.drain.plan import PodPolicy
    from spotd.kube.client import http_of

    policy = PodPolicy(voluntary=True)
    pods = pods_of(api, OD_NODE)
    outcome = await run_surge(client, api, timeout=surge_timeout, zone_of_claim=await zones_of_claims(client, pods))
    if not outcome.ready:
        return outcome, None, None  # the node is not touched: no cordon, no eviction
    follow = await follow_before_drain(api_pods(client), OD_NODE, pods)
    patch = {"spec": {"unschedulable": True}}
    resp = await http_of(client).patch(
        f"/api/v1/nodes/{OD_NODE}", json=patch, headers={"Content-Type": "application/merge-patch+json"}
    )
    assert resp.status_code == 200
    result = await drain_node(client, OD_NODE, DrainOptions(policy=policy, deadline_action="leave"), None, log=log)
    landing = await replacements_landed(client, follow, capacity_label=CT, timeout=10, log=log, poll=0.05)
    return outcome, result, landing


async def test_done_when_spot_is_short_and_then_back(api: FakeApiServer, client: Any) -> None:
    api.create(replica_set("web", 2, "1"))
    await eventually(lambda: len([p for p in pods_of(api, OD_NODE) if p["status"].get("phase") == "Running"]) == 2)
    before = sorted(p["metadata"]["uid"] for p in pods_of(api, OD_NODE))

    # Spot short: nothing evicted, placeholders gone after the timeout, node schedulable, the surge failed
    outcome, result, _ = await make_before_break(client, api, surge_timeout=1.0)
    assert not outcome.ready and result is None
    await eventually(lambda: placeholders(api) == [], timeout=3.0)
    assert sorted(p["metadata"]["uid"] for p in pods_of(api, OD_NODE)) == before
    assert not api.get("Node", OD_NODE)["spec"].get("unschedulable")

    # Spot back (cluster-autoscaler launches a node for the placeholders): evicted only after that,
    # and the replacements run where the placeholders held the room
    spot_added = asyncio.get_running_loop().call_later(0.5, api.create, node("spot-1", "spot", cpu="2"))
    outcome, result, landing = await make_before_break(client, api, surge_timeout=20)
    spot_added.cancel()
    assert outcome.ready and list(outcome.nodes) == ["spot-1"]
    assert result.outcome == "complete"
    assert landing.returned and not landing.short, landing.reason
    assert sorted(landing.placed.values()) == ["spot-1 (spot)", "spot-1 (spot)"]


def configmap(name: str, key: str, text: str) -> dict[str, Any]:
    meta = {"name": name, "namespace": "kube-system"}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {key: text}}


async def test_backoff_gate(api: FakeApiServer, client: Any) -> None:
    from datetime import UTC, datetime

    now = datetime(2026, 11, 30, 12, 1, tzinfo=UTC)
    verdict = await backoff_gate(client, ["spot-a"], now, log)
    assert verdict.ok and "back-offs not checked" in verdict.reason
    status = "time: 2026-11-30 12:00:10 +0000 UTC\nnodeGroups:\n- name: spot-a\n  scaleUp:\n    status: Backoff\n"
    api.create(configmap("cluster-autoscaler-status", "status", status))
    assert not (await backoff_gate(client, ["spot-a"], now, log)).ok
    assert (await backoff_gate(client, ["spot-a", "spot-b"], now, log)).ok
    # stale (cluster-autoscaler stopped writing it): fail closed
    later = datetime(2026, 11, 30, 13, 0, tzinfo=UTC)
    verdict = await backoff_gate(client, ["spot-b"], later, log)
    assert not verdict.ok and "old" in verdict.reason
    stored = api.get("ConfigMap", "cluster-autoscaler-status", "kube-system")
    api.update({**stored, "data": {"status": "garbage"}})
    assert not (await backoff_gate(client, ["spot-b"], now, log)).ok


async def test_check_priorities_sets_the_gauge(api: FakeApiServer, client: Any) -> None:
    def gauge() -> float | None:
        return REGISTRY.get_sample_value("spotd_autoscaler_spot_ranked_first")

    assert await check_priorities(client, ["eks-spot-a"], ["eks-od-a"], log) is None
    assert gauge() == -1
    api.create(configmap("cluster-autoscaler-priority-expander", "priorities", "10:\n  - .*od.*\n50:\n  - .*spot.*\n"))
    verdict = await check_priorities(client, ["eks-spot-a"], ["eks-od-a"], log)
    assert verdict is not None and verdict.ok and gauge() == 1
    verdict = await check_priorities(client, ["eks-spot-a"], ["eks-od-spot-a"], log)  # matches both patterns
    assert verdict is not None and not verdict.ok and gauge() == 0
