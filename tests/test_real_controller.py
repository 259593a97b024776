"""`spotd controller` end to end on the real control plane (issue 18): kube-apiserver with deploy/'s RBAC and
admission policies, the real scheduler, ReplicaSet, disruption, node lifecycle and pod GC controllers, kwok
running the nodes. The controller is a subprocess with its own ServiceAccount's token; AWS is moto, as in
tests/test_controller.py (the controller signs as the IAM user of deploy/iam-policy.json).

Names start with `rc-` (the cluster is shared by every test file of the session). Every node of this file is
tainted rc=<test>:NoSchedule and its workloads tolerate that taint only, so nothing of another file lands here
and nothing of ours lands elsewhere; each test has its own instance type (its own pool) and its own
--fallback-selector value, since the pool book and the drain marks outlive a controller process.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from spotd.common.parsing import format_time
from spotd.sim import builders
from tests.agent_harness import eventually
from tests.moto_server import aws, moto_endpoint  # noqa: F401  (pytest fixtures)
from tests.realcluster import DEPLOY, KUBELET_GONE_LABEL, KWOK_ANNOTATION, RealCluster
from tests.test_controller import LEASE, ControllerProcess, queue  # noqa: F401  (pytest fixture)

NS = "rc-work"
PLACEHOLDER_FOR = "spotd.io/placeholder-for"
OUT_OF_SERVICE = {"key": "node.kubernetes.io/out-of-service", "value": "nodeshutdown", "effect": "NoExecute"}


# ---- the cluster ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real(real_cluster: RealCluster) -> Iterator[RealCluster]:
    """Our namespace, and an untainted node for the pods of others (deploy/'s controller Deployment): a pod
    Pending for lack of any node would compete with our fallback nodes' pods and hold every drain."""
    real_cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    if real_cluster.request("GET", "/api/v1/nodes/rc-base")[0] == 404:
        add_kwok_node(real_cluster, "rc-base", builders.ON_DEMAND, allocatable=_resources(cpu="32"))
    real_cluster.wait_for(lambda: not _unschedulable_pods(real_cluster))
    yield real_cluster
    # The hourly drain budget is the cluster's, read from the Nodes' marks and spotd's SpotdDrainStarted
    # Events: ours must not count against the controller tests of files that run after this one. Our
    # workloads go first, so that no replacement waits Pending for our nodes.
    for namespace in (NS, "rc-restricted"):
        real_cluster.request("DELETE", f"/api/v1/namespaces/{namespace}")
    for obj in get(real_cluster, "/api/v1/nodes")["items"]:
        if obj["metadata"]["name"].startswith("rc-"):
            real_cluster.request("DELETE", f"/api/v1/nodes/{obj['metadata']['name']}")
    for event in get(real_cluster, "/api/v1/events")["items"]:
        meta = event["metadata"]
        if event.get("involvedObject", {}).get("name", "").startswith("rc-"):
            real_cluster.request("DELETE", f"/api/v1/namespaces/{meta['namespace']}/events/{meta['name']}")


def add_kwok_node(real: RealCluster, name: str, capacity: str, **kw: Any) -> None:
    """A Node as builders.node makes it (Ready, its allocatable given: kwok keeps both), run by kwok."""
    obj = builders.node(name, capacity, **kw)
    obj["metadata"].setdefault("annotations", {})[KWOK_ANNOTATION] = "fake"
    status, body = real.request("POST", "/api/v1/nodes", obj)
    assert status == 201, body

    def ready() -> bool:
        conditions = node(real, name)["status"].get("conditions") or []
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    real.wait_for(ready)


def _resources(cpu: str = "4", **extra: str) -> dict[str, str]:
    return {"cpu": cpu, "memory": "16Gi", "pods": "110", **extra}


def _unschedulable_pods(real: RealCluster) -> list[str]:
    """Pending pods the scheduler found no node for, but not a DaemonSet's: each is pinned to its own node
    (another file's small node may have no room for deploy/'s agent pod) and holds no drain (8c62762)."""
    pods = get(real, "/api/v1/pods?fieldSelector=status.phase%3DPending")["items"]
    return [
        p["metadata"]["name"]
        for p in pods
        if not any(o.get("kind") == "DaemonSet" for o in p["metadata"].get("ownerReferences") or [])
        and any(
            c.get("type") == "PodScheduled" and c.get("reason") == "Unschedulable"
            for c in p.get("status", {}).get("conditions") or []
        )
    ]


def get(real: RealCluster, path: str) -> dict[str, Any]:
    status, body = real.request("GET", path)
    assert status == 200, body
    return dict(body)


def add_node(
    real: RealCluster,
    name: str,
    capacity: str,
    test: str,
    *,
    pool: str = "",
    allocatable: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    labels: dict[str, str] | None = None,
    itype: str = "",
) -> None:
    """A kwok node of test `test`: tainted for it, its pool the instance type rc-<test>.large (or `itype`) in
    us-east-1a, node-pool=<pool> when given (the fallback selector)."""
    labels = {"rc-test": test, **({"node-pool": pool} if pool else {}), **(labels or {})}
    add_kwok_node(
        real,
        name,
        capacity,
        capacity_label=builders.KARPENTER_CAPACITY_LABEL,
        instance_type=itype or f"rc-{test}.large",
        labels=labels,
        allocatable=allocatable or _resources(),
        taints=[{"key": "rc", "value": test, "effect": "NoSchedule"}],
    )
    if annotations:
        patch_node(real, name, {"metadata": {"annotations": annotations}})


def patch_node(real: RealCluster, name: str, patch: dict[str, Any]) -> None:
    status, body = real.request("PATCH", f"/api/v1/nodes/{name}", patch, content_type="application/merge-patch+json")
    assert status == 200, body


def node(real: RealCluster, name: str) -> dict[str, Any]:
    return get(real, f"/api/v1/nodes/{name}")


def deployment(
    real: RealCluster,
    name: str,
    test: str,
    replicas: int,
    resources: dict[str, Any],
    selector: dict[str, str] | None = None,
) -> None:
    """A Deployment (not a Job: kwok's pod-complete stage finishes a Job's pods at once, and a finished pod has
    nothing to move) on the nodes of `test`, or on those `selector` names."""
    labels = {"app": name}
    selector = selector or {"rc-test": test}
    real.apply(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, "namespace": NS},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "terminationGracePeriodSeconds": 1,
                        "nodeSelector": selector,
                        "tolerations": [{"key": "rc", "operator": "Equal", "value": test, "effect": "NoSchedule"}],
                        "containers": [{"name": "app", "image": "app", "resources": resources}],
                    },
                },
            },
        }
    )


def pods(real: RealCluster, app: str) -> list[dict[str, Any]]:
    return list(get(real, f"/api/v1/namespaces/{NS}/pods?labelSelector=app%3D{app}")["items"])


def running_on(real: RealCluster, app: str, node_name: str) -> list[str]:
    return [
        p["metadata"]["name"]
        for p in pods(real, app)
        if p["spec"].get("nodeName") == node_name
        and p.get("status", {}).get("phase") == "Running"
        and not p["metadata"].get("deletionTimestamp")
    ]


def placeholders(real: RealCluster, node_name: str) -> list[dict[str, Any]]:
    path = f"/api/v1/namespaces/spotd/pods?labelSelector={PLACEHOLDER_FOR}%3D{node_name}"
    return list(get(real, path)["items"])


def events_for(real: RealCluster, name: str) -> dict[str, list[str]]:
    """reason -> messages of the Events about object `name` (spotd writes them in the default namespace)."""
    out: dict[str, list[str]] = {}
    for e in get(real, f"/api/v1/events?fieldSelector=involvedObject.name%3D{name}")["items"]:
        out.setdefault(e.get("reason", ""), []).append(e.get("message", ""))
    return out


def pdb(real: RealCluster, name: str, app: str, min_available: int) -> None:
    real.apply(
        {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"minAvailable": min_available, "selector": {"matchLabels": {"app": app}}},
        }
    )


# ---- the controller --------------------------------------------------------------------------------------------


@pytest.fixture
def controllers(real: RealCluster, tmp_path: Path, queue: Any) -> Iterator[Any]:  # noqa: F811
    """start(identity, *flags): `spotd controller` as spotd-controller (a TokenRequest token of its
    ServiceAccount), the Lease in namespace spotd, decisions every 0.3 s, nodes of any age, moto's SQS queue
    as its capacity source (without one it drains nothing: it would not hear of an ICE)."""
    _, queue_url = queue
    token = real.service_account_token("spotd", "spotd-controller")
    kubeconfig = real.write_kubeconfig_for(tmp_path / "kubeconfig", token, namespace="spotd")
    started: list[ControllerProcess] = []

    def start(identity: str, *flags: str) -> ControllerProcess:
        proc = ControllerProcess(
            tmp_path,
            str(kubeconfig),
            identity,
            "--sqs-queue-url", queue_url,
            "--min-on-demand-age", "0s",
            "--max-drains-per-hour", "50",  # the hourly budget is read from every node's marks, ours included
            *flags,
        )  # fmt: skip
        started.append(proc)
        proc.start()
        return proc

    yield start
    for proc in started:
        proc.stop(signal.SIGTERM, timeout=15)  # released Lease: the next test's controller leads at once


def held(proc: ControllerProcess) -> str:
    """The controller's last words, for an assertion message."""
    return "\n".join(json.dumps(e) for e in proc.logs()[-25:])


# ---- 1, 2: make-before-break with the real scheduler and the real PriorityClass --------------------------------


def placeholder_priority() -> int:
    return int(yaml.safe_load((DEPLOY / "placeholder-priorityclass.yaml").read_text())["value"])


@pytest.mark.parametrize(
    ("test", "replicas", "resources", "extra"),
    [
        ("mbb", 2, {"requests": {"cpu": "500m", "memory": "256Mi"}}, {}),
        # a GPU is not overcommitable: the API server wants its limit, equal to any request (c3fdeb8)
        ("gpu", 1, {"requests": {"cpu": "1"}, "limits": {"nvidia.com/gpu": "1"}}, {"nvidia.com/gpu": "1"}),
    ],
)
async def test_a_surge_the_real_scheduler_places_then_the_workload_lands_on_spot(
    real: RealCluster, controllers: Any, test: str, replicas: int, resources: dict[str, Any], extra: dict[str, str]
) -> None:
    od, spot, app = f"rc-{test}-od", f"rc-{test}-spot", f"rc-{test}-app"
    add_node(real, od, builders.ON_DEMAND, test, pool=f"rc-{test}", allocatable=_resources(**extra))
    # a full Spot node of the pool: Spot launched there (a pool without one is not known to have Spot)
    add_node(real, f"rc-{test}-spot-full", builders.SPOT, test, allocatable=_resources(cpu="100m"))
    # kwok keeps the allocatable the node was created with, the extended resource included
    assert node(real, od)["status"]["allocatable"].get("nvidia.com/gpu") == extra.get("nvidia.com/gpu")
    deployment(real, app, test, replicas, resources)
    await eventually(lambda: len(running_on(real, app, od)) == replicas, timeout=60)
    before = sorted(p["metadata"]["uid"] for p in pods(real, app))

    ctl = controllers(
        f"rc-{test}-ctl",
        "--fallback-selector", f"node-pool=rc-{test}",
        "--surge-timeout", "120s",
        "--landing-timeout", "60s",
    )  # fmt: skip
    # No Spot node has room: the real scheduler leaves the placeholders Pending, Unschedulable
    await eventually(lambda: len(placeholders(real, od)) == replicas, timeout=60)

    def unschedulable() -> bool:
        conditions = [p.get("status", {}).get("conditions") or [] for p in placeholders(real, od)]
        return len(conditions) == replicas and all(
            any(c["type"] == "PodScheduled" and c.get("reason") == "Unschedulable" for c in cs) for cs in conditions
        )

    await eventually(unschedulable, timeout=60)
    for ph in placeholders(real, od):
        # the Priority admission plugin resolved deploy/'s PriorityClass
        assert ph["spec"]["priorityClassName"] == "spotd-placeholder"
        assert ph["spec"]["priority"] == placeholder_priority(), ph["spec"]
        if extra:
            assert ph["spec"]["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert not node(real, od)["spec"].get("unschedulable")
    assert sorted(p["metadata"]["uid"] for p in pods(real, app)) == before  # nothing evicted before Spot runs

    add_node(real, spot, builders.SPOT, test, allocatable=_resources(**extra))  # the autoscaler's answer
    await eventually(lambda: "SpotdDrainReturned" in events_for(real, od), timeout=120)
    surge = events_for(real, od)
    assert "SpotdSurgeFailed" not in surge, surge
    assert any(spot in m for m in surge.get("SpotdSurgeReady", [])), surge  # the placeholders ran on Spot
    assert surge["SpotdDrainReturned"][0].count(f"{spot} (spot)") == replicas, surge
    await eventually(lambda: len(running_on(real, app, spot)) == replicas, timeout=30)
    assert running_on(real, app, od) == []
    assert node(real, od)["spec"].get("unschedulable") is True
    assert placeholders(real, od) == []
    assert ctl.drains("complete") == 1.0, held(ctl)


# ---- 3: the out-of-service taint on a dead node, and the real pod GC ------------------------------------------


async def test_terminating_pods_of_a_dead_node_stay_until_the_out_of_service_taint(
    real: RealCluster, controllers: Any
) -> None:
    """On a real cluster only a live kubelet removes a Terminating pod: the pods of an instance gone after its
    interruption deadline stay until the controller adds node.kubernetes.io/out-of-service, then the pod GC
    (kube-controller-manager's gcTerminating) force-deletes them (docs/controller.md)."""
    dead, app = "rc-oos-spot", "rc-oos-app"
    deadline = datetime.now(UTC) - timedelta(seconds=30)
    notice = {"kind": "spot-itn", "source": "imds", "seen_at": format_time(deadline - timedelta(minutes=2)),
              "deadline": format_time(deadline), "action": "terminate"}  # fmt: skip
    add_node(real, dead, builders.SPOT, "oos", annotations={"spotd.io/notice": json.dumps(notice)})
    deployment(real, app, "oos", 2, {"requests": {"cpu": "100m"}})
    await eventually(lambda: len(running_on(real, app, dead)) == 2, timeout=60)
    uids = {p["metadata"]["uid"] for p in pods(real, app)}

    # The instance is gone: its node Lease is no longer renewed, and the node lifecycle controller marks it
    # Unknown after --node-monitor-grace-period. kwok v0.7.0 keeps renewing the Lease of a node that loses its
    # annotation (it lets a node go only when it is deleted), but leaves alone a Lease another holder has
    # taken, and then runs nothing on the node (a node whose Lease it does not hold is read-only to it).
    await eventually(lambda: take_node_lease(real, dead), timeout=30, interval=0.2)

    def ready_status() -> str:
        conditions = node(real, dead)["status"].get("conditions") or []
        return next((c["status"] for c in conditions if c["type"] == "Ready"), "")

    await eventually(lambda: ready_status() == "Unknown", timeout=90, interval=0.5)
    # kwok's read-only mode follows its own cache of the Lease: in 3 of about 10 loaded runs it still ran
    # the pods' deletion as their kubelet. A pod with this label is one kwok no longer runs at all.
    for name in [p["metadata"]["name"] for p in pods(real, app)]:
        patch = {"metadata": {"labels": {KUBELET_GONE_LABEL: "true"}}}
        path = f"/api/v1/namespaces/{NS}/pods/{name}"
        status, body = real.request("PATCH", path, patch, content_type="application/merge-patch+json")
        assert status == 200, body
    for name in [p["metadata"]["name"] for p in pods(real, app)]:  # the agent's drain, as it evicted them
        status, body = real.request("DELETE", f"/api/v1/namespaces/{NS}/pods/{name}")
        assert status == 200, body

    def left() -> list[dict[str, Any]]:
        return [p for p in pods(real, app) if p["metadata"]["uid"] in uids]

    # Past their grace (1 s) and a pod GC period (20 s, pkg/controller/podgc), nothing removed them
    await asyncio.sleep(25)
    assert len(left()) == 2 and all(p["metadata"].get("deletionTimestamp") for p in left()), left()
    assert OUT_OF_SERVICE not in (node(real, dead)["spec"].get("taints") or [])

    ctl = controllers("rc-oos-ctl", "--fallback-selector", "node-pool=rc-oos")
    await eventually(lambda: OUT_OF_SERVICE in (node(real, dead)["spec"].get("taints") or []), timeout=60)
    await eventually(lambda: left() == [], timeout=90, interval=0.5)  # the real pod GC force-deleted them
    await eventually(lambda: "SpotdOutOfService" in events_for(real, dead), timeout=30)
    assert len(ctl.events("node_out_of_service")) == 1, held(ctl)


def take_node_lease(real: RealCluster, name: str) -> bool:
    """The node's Lease held by nobody alive for an hour: its kubelet (kwok) is gone. False on a conflict."""
    path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{name}"
    lease = get(real, path)
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    lease["spec"].update(holderIdentity="rc-gone", leaseDurationSeconds=3600, renewTime=now)
    status, body = real.request("PUT", path, lease)
    assert status in (200, 409), body
    return status == 200


# ---- 4: the scope (fail closed) and the back-off -----------------------------------------------------------------


async def test_only_declared_fallback_nodes_are_drained_and_without_a_scope_none(
    real: RealCluster, controllers: Any
) -> None:
    pool = {"itype": "rc-scope.large"}  # one pool: Spot is available for the system node as for the fallback one
    add_node(real, "rc-scope-system", builders.ON_DEMAND, "scopesys", pool="rc-system", **pool)  # the oldest
    add_node(real, "rc-scope-fb", builders.ON_DEMAND, "scope", pool="rc-scope", **pool)
    deployment(real, "rc-scope-sys", "scopesys", 2, {"requests": {"cpu": "100m"}})
    deployment(real, "rc-scope-app", "scope", 2, {"requests": {"cpu": "100m"}})
    await eventually(lambda: len(running_on(real, "rc-scope-sys", "rc-scope-system")) == 2, timeout=60)
    await eventually(lambda: len(running_on(real, "rc-scope-app", "rc-scope-fb")) == 2, timeout=60)
    add_node(real, "rc-scope-spot", builders.SPOT, "scope", **pool)
    system_before = node(real, "rc-scope-system")

    ctl = controllers(
        "rc-scope-ctl",
        "--fallback-selector",
        "node-pool=rc-scope",
        "--surge-timeout",
        "0",
        "--max-concurrent-drains",
        "3",
    )
    await eventually(lambda: ctl.drains("complete") == 1, timeout=60)
    await eventually(lambda: len(running_on(real, "rc-scope-app", "rc-scope-spot")) == 2, timeout=30)
    await eventually(lambda: (ctl.metric("spotd_decision_pass_seconds_count") or 0) >= 5, timeout=30)  # more passes
    ctl.stop(signal.SIGTERM, timeout=15)
    assert [e["node"] for e in ctl.events("drain_starting")] == ["rc-scope-fb"]
    assert not [e for e in ctl.logs() if e.get("node") == "rc-scope-system"]  # no verdict: never a candidate

    # Without a declared scope nothing is drained, and it says so
    add_node(real, "rc-scope-fb2", builders.ON_DEMAND, "scope", pool="rc-scope", **pool)
    deployment(
        real, "rc-scope-app2", "scope", 1, {"requests": {"cpu": "100m"}}, {"kubernetes.io/hostname": "rc-scope-fb2"}
    )
    await eventually(lambda: len(running_on(real, "rc-scope-app2", "rc-scope-fb2")) == 1, timeout=60)
    blind = controllers("rc-scope-blind", "--fallback-selector", "", "--surge-timeout", "0")
    await eventually(lambda: blind.metric("spotd_controller_scope_configured") == 0.0, timeout=30)
    await eventually(lambda: (blind.metric("spotd_decision_pass_seconds_count") or 0) >= 5, timeout=30)
    await eventually(lambda: any(e.get("reason") == "SpotdNoFallbackScope" for e in _spotd_events(real)), timeout=30)
    assert "nothing is drained" in blind.http("/readyz")[1]
    assert blind.events("drain_starting") == [], held(blind)
    for name in ("rc-scope-fb2", "rc-scope-system"):
        assert not node(real, name)["spec"].get("unschedulable"), name
    assert len(running_on(real, "rc-scope-app2", "rc-scope-fb2")) == 1
    system = node(real, "rc-scope-system")
    assert len(running_on(real, "rc-scope-sys", "rc-scope-system")) == 2
    assert not [k for k in system["metadata"].get("annotations") or {} if k.startswith("spotd.io/")]
    assert system["spec"] == system_before["spec"]
    assert not [reason for reason in events_for(real, "rc-scope-system") if reason.startswith("Spotd")]


def _spotd_events(real: RealCluster) -> list[dict[str, Any]]:
    return [e for e in get(real, "/api/v1/events")["items"] if str(e.get("reason", "")).startswith("Spotd")]


async def test_a_drain_a_real_budget_holds_backs_off_and_the_next_candidate_goes(
    real: RealCluster, controllers: Any
) -> None:
    """The real disruption controller answers the evictions (disruptionsAllowed 0: 429 each): the drain times
    out, the node is put back with its back-off written on it, the next candidate is drained, and a new
    process does not try the first again."""
    add_node(real, "rc-bo-1-stuck", builders.ON_DEMAND, "bo", pool="rc-bo", labels={"rc-role": "db"})  # oldest
    add_node(real, "rc-bo-2-next", builders.ON_DEMAND, "bo", pool="rc-bo", labels={"rc-role": "web"})
    deployment(real, "rc-bo-db", "bo", 2, {"requests": {"cpu": "100m"}}, {"rc-role": "db"})
    deployment(real, "rc-bo-web", "bo", 2, {"requests": {"cpu": "100m"}}, {"rc-role": "web"})
    pdb(real, "rc-bo-db", "rc-bo-db", min_available=2)
    await eventually(lambda: len(running_on(real, "rc-bo-db", "rc-bo-1-stuck")) == 2, timeout=60)
    await eventually(lambda: len(running_on(real, "rc-bo-web", "rc-bo-2-next")) == 2, timeout=60)

    def allowed() -> Any:
        return get(real, f"/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/rc-bo-db").get("status", {})

    await eventually(lambda: allowed().get("expectedPods") == 2 and allowed().get("disruptionsAllowed") == 0)
    add_node(real, "rc-bo-spot", builders.SPOT, "bo", labels={"rc-role": "web"})
    db = sorted(p["metadata"]["uid"] for p in pods(real, "rc-bo-db"))
    flags = ("--fallback-selector", "node-pool=rc-bo", "--surge-timeout", "0", "--drain-timeout", "3s",
             "--retry-backoff", "1h")  # fmt: skip
    ctl = controllers("rc-bo-ctl", *flags)
    await eventually(lambda: ctl.drains("complete") == 1, timeout=90)
    assert [e["node"] for e in ctl.events("drain_starting")] == ["rc-bo-1-stuck", "rc-bo-2-next"], held(ctl)
    assert ctl.drains("timeout") == 1.0
    assert ctl.events("eviction_refused"), "the real budget refused no eviction"
    stuck = node(real, "rc-bo-1-stuck")
    assert not stuck["spec"].get("unschedulable")
    mark = json.loads(stuck["metadata"]["annotations"]["spotd.io/drain-retry-after"])
    assert mark["attempts"] == 1 and mark["outcome"] == "timeout", mark
    assert sorted(p["metadata"]["uid"] for p in pods(real, "rc-bo-db")) == db  # the budget held to the letter
    await eventually(lambda: len(running_on(real, "rc-bo-web", "rc-bo-spot")) == 2, timeout=30)
    ctl.stop(signal.SIGTERM, timeout=15)

    # The back-off is on the node: a new process does not try it either
    again = controllers("rc-bo-again", *flags)

    def kept() -> list[str]:
        return [e["reason"] for e in again.events("node_kept") if e["node"] == "rc-bo-1-stuck"]

    await eventually(lambda: kept(), timeout=30)
    await eventually(lambda: (again.metric("spotd_decision_pass_seconds_count") or 0) >= 5, timeout=30)
    assert kept()[0].startswith("last drain ended in timeout (attempt 1)"), kept()
    assert again.events("drain_starting") == []


# ---- 5: leader failover on the real Lease ---------------------------------------------------------------------


def lease_time(lease: dict[str, Any], key: str) -> datetime:
    return datetime.fromisoformat(lease["spec"][key].replace("Z", "+00:00"))


async def test_the_standby_takes_the_real_lease_after_a_kill_and_resumes_the_drain(
    real: RealCluster, controllers: Any
) -> None:
    od, app = "rc-fo-od", "rc-fo-app"
    add_node(real, od, builders.ON_DEMAND, "fo", pool="rc-fo")
    add_node(real, "rc-fo-spot-full", builders.SPOT, "fo", allocatable=_resources(cpu="100m"))  # Spot known
    deployment(real, app, "fo", 2, {"requests": {"cpu": "500m"}})
    pdb(real, app, app, min_available=2)  # the drain hangs
    await eventually(lambda: len(running_on(real, app, od)) == 2, timeout=60)
    flags = ("--fallback-selector", "node-pool=rc-fo", "--surge-timeout", "0", "--drain-timeout", "5m")
    a = controllers("rc-fo-a", *flags)
    await eventually(a.leading, timeout=30)
    b = controllers("rc-fo-b", *flags)
    await b.ready(timeout=30)
    await eventually(lambda: a.events("drain_started"), timeout=30)
    await eventually(lambda: a.events("eviction_refused"), timeout=30)  # mid-drain: the budget holds it
    marked = node(real, od)
    assert marked["spec"].get("unschedulable") is True and "spotd.io/draining" in marked["metadata"]["annotations"]
    assert not b.leading() and b.events("drain_resumed") == []

    lease_path = "/apis/coordination.k8s.io/v1/namespaces/spotd/leases/spotd-controller"
    renewed = lease_time(get(real, lease_path), "renewTime")  # a's last renewal or an earlier one
    a.stop(signal.SIGKILL)
    await eventually(b.leading, timeout=30, interval=0.1)
    taken = get(real, lease_path)
    assert taken["spec"]["holderIdentity"] == "rc-fo-b"
    # no release after kill -9: b got the Lease by its expiry, never before it
    assert lease_time(taken, "acquireTime") >= renewed + timedelta(seconds=LEASE["duration"])
    await eventually(lambda: b.events("drain_resumed"), timeout=60)
    assert [e["node"] for e in b.events("drain_resumed")] == [od]

    status, body = real.request("DELETE", f"/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/{app}")
    assert status == 200, body
    add_node(real, "rc-fo-spot", builders.SPOT, "fo")
    await eventually(lambda: b.drains("complete") == 1, timeout=90)
    await eventually(lambda: len(running_on(real, app, "rc-fo-spot")) == 2, timeout=30)
    assert running_on(real, app, od) == [] and not a.events("drain_complete")


def test_placeholders_meet_the_restricted_pod_security_standard(real: RealCluster) -> None:
    """--placeholder-namespace may be a namespace that enforces `restricted`: the real PodSecurity admission
    accepts the placeholders as they are built (the pause image's user, no privilege, RuntimeDefault seccomp)."""
    from spotd.controller.placeholders import placeholder_pods

    namespace = "rc-restricted"
    labels = {"pod-security.kubernetes.io/enforce": "restricted", "pod-security.kubernetes.io/warn": "restricted"}
    real.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace, "labels": labels}})
    workload = builders.pod("rc-psa", "rc-psa-od", requests={"cpu": "100m", "nvidia.com/gpu": "1"})
    workload["spec"]["containers"][0]["resources"]["limits"] = {"nvidia.com/gpu": "1"}
    (placeholder,) = placeholder_pods(
        "rc-psa-od", [workload], namespace=namespace, capacity_label=builders.KARPENTER_CAPACITY_LABEL,
        spot_values=["spot"],
    )  # fmt: skip
    status, body = real.request("POST", f"/api/v1/namespaces/{namespace}/pods?dryRun=All", placeholder)
    assert status == 201, body
    # and the admission is on: a pod that is not restricted is refused
    root = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "rc-root", "namespace": namespace},
            "spec": {"containers": [{"name": "c", "image": "c"}]}}  # fmt: skip
    status, body = real.request("POST", f"/api/v1/namespaces/{namespace}/pods?dryRun=All", root)
    assert status == 403 and "violates PodSecurity" in body["message"], body


async def test_a_daemonset_pod_pending_on_a_full_node_elsewhere_does_not_hold_drains(
    real: RealCluster, controllers: Any
) -> None:
    """The real DaemonSet controller pins each of its pods to its node with a required node affinity on the
    field metadata.name (matchFields): an agent pod that does not fit its full node is Pending for lack of
    capacity, but no fallback node's pods compete with it, and it must not hold their drain for ever."""
    full, od, app = "rc-ds-full", "rc-ds-od", "rc-ds-app"
    add_node(real, od, builders.ON_DEMAND, "ds", pool="rc-ds")
    deployment(real, app, "ds", 2, {"requests": {"cpu": "100m"}})
    await eventually(lambda: len(running_on(real, app, od)) == 2, timeout=60)
    add_node(real, "rc-ds-spot", builders.SPOT, "ds")
    add_node(real, full, builders.SPOT, "dsfull", allocatable=_resources(cpu="50m"))  # deploy/'s agent asks 100m
    try:
        await eventually(lambda: [p for p in _pods_pinned_to(real, full) if _unschedulable(p)], timeout=60)
        ctl = controllers("rc-ds-ctl", "--fallback-selector", "node-pool=rc-ds", "--surge-timeout", "0")
        await eventually(lambda: ctl.drains("complete") == 1 or _held(ctl, od), timeout=60)
        assert ctl.drains("complete") == 1, _held(ctl, od)
        await eventually(lambda: len(running_on(real, app, "rc-ds-spot")) == 2, timeout=30)
    finally:
        status, body = real.request("DELETE", f"/api/v1/nodes/{full}")  # its agent pod goes with it
        assert status == 200, body


def _pods_pinned_to(real: RealCluster, node_name: str) -> list[dict[str, Any]]:
    """The DaemonSet pods meant for `node_name` (their required affinity's matchFields name it)."""
    path = "/api/v1/namespaces/spotd/pods?labelSelector=app.kubernetes.io/component%3Dagent"
    out = []
    for p in get(real, path)["items"]:
        required = ((p["spec"].get("affinity") or {}).get("nodeAffinity") or {}).get(
            "requiredDuringSchedulingIgnoredDuringExecution"
        ) or {}
        fields = [f for t in required.get("nodeSelectorTerms") or [] for f in t.get("matchFields") or []]
        if any(f["key"] == "metadata.name" and f.get("values") == [node_name] for f in fields):
            out.append(p)
    return out


def _unschedulable(pod: dict[str, Any]) -> bool:
    return any(
        c.get("type") == "PodScheduled"
        and c.get("reason") == "Unschedulable"
        and "Insufficient" in c.get("message", "")
        for c in pod.get("status", {}).get("conditions") or []
    )


def _held(ctl: ControllerProcess, node_name: str) -> list[str]:
    """The reasons the controller gave for keeping `node_name` that name Pending pods."""
    return [e["reason"] for e in ctl.events("node_kept") if e.get("node") == node_name and "Pending" in e["reason"]]


def test_a_pending_pod_pinned_by_match_fields_could_run_on_its_node_only() -> None:
    """The inventory's reading of the real DaemonSet controller's pin (pure)."""
    import msgspec

    from spotd.inventory.records import RawPod, pod_record

    def pending(*fields: dict[str, Any]) -> Any:
        terms = [{"matchFields": list(fields)}] if fields else []
        pod = {
            "metadata": {"namespace": "spotd", "name": "agent-x", "ownerReferences": [
                {"kind": "DaemonSet", "name": "spotd-agent", "controller": True}]},
            "spec": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": terms}}}},
            "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
                       "reason": "Unschedulable", "message": "0/3 nodes are available: 1 Insufficient cpu."}]},
        }  # fmt: skip
        record = pod_record(msgspec.json.decode(json.dumps(pod).encode(), type=RawPod))
        assert record.pending is not None
        return record.pending

    pinned = pending({"key": "metadata.name", "operator": "In", "values": ["full-1"]})
    assert pinned.could_run_on({}, "full-1") and not pinned.could_run_on({}, "od-1")
    assert pinned.could_run_on({})  # no name given: it could (fail closed: it holds drains)
    unread = pending({"key": "metadata.name", "operator": "NotIn", "values": ["full-1"]})
    assert unread.could_run_on({}, "od-1")  # a field requirement we do not read: it could
    assert pending().could_run_on({}, "od-1")


async def test_a_new_leader_deletes_the_placeholders_of_a_killed_one(real: RealCluster, controllers: Any) -> None:
    """The leader SIGKILLed mid-surge cannot delete its placeholders: the next term does, before its own."""
    od, app = "rc-fs-od", "rc-fs-app"
    add_node(real, od, builders.ON_DEMAND, "fs", pool="rc-fs")
    add_node(real, "rc-fs-spot-full", builders.SPOT, "fs", allocatable=_resources(cpu="100m"))  # Spot known
    deployment(real, app, "fs", 2, {"requests": {"cpu": "500m"}})
    await eventually(lambda: len(running_on(real, app, od)) == 2, timeout=60)
    flags = ("--fallback-selector", "node-pool=rc-fs", "--surge-timeout", "10m")
    a = controllers("rc-fs-a", *flags)
    await eventually(lambda: len(placeholders(real, od)) == 2, timeout=60)
    left = {p["metadata"]["name"] for p in placeholders(real, od)}
    b = controllers("rc-fs-b", *flags)
    await b.ready(timeout=30)
    a.stop(signal.SIGKILL)
    await eventually(b.leading, timeout=30, interval=0.1)
    await eventually(lambda: not left & {p["metadata"]["name"] for p in placeholders(real, od)}, timeout=30)
    await eventually(lambda: len(placeholders(real, od)) == 2, timeout=60)  # b's own surge
    assert not node(real, od)["spec"].get("unschedulable")  # nothing drained without Spot room
    assert len(running_on(real, app, od)) == 2


# ---- the second witness: a Spot warning from the queue for a node whose agent is silent ------------------------


async def test_a_spot_warning_the_agent_never_records_is_drained_by_the_controller(
    real: RealCluster,
    controllers: Any,
    queue: Any,  # noqa: F811
) -> None:
    """kwok runs deploy/'s agent pod on the node but no agent process: the controller, after
    --agent-ack-timeout, taints, cordons and drains it through the real eviction API (issue 19)."""
    from tests.test_queue_events import spot_itn

    sqs, url = queue
    node_name, app = "rc-wit-spot", "rc-wit-app"
    add_node(real, node_name, builders.SPOT, "wit")
    deployment(real, app, "wit", 2, {"requests": {"cpu": "500m"}})
    await eventually(lambda: len(running_on(real, app, node_name)) == 2, timeout=60)
    add_node(real, "rc-wit-room", builders.SPOT, "wit")
    ctl = controllers("rc-wit-ctl", "--fallback-selector", "node-pool=rc-wit", "--agent-ack-timeout", "2s")
    await eventually(lambda: ctl.events("sources_ready"), timeout=30)
    iid = builders.instance_id_for(node_name)
    warning = spot_itn(time=format_time(datetime.now(UTC)), detail={"instance-id": iid, "instance-action": "terminate"})
    warning["resources"] = [f"arn:aws:ec2:us-east-1a:instance/{iid}"]
    sqs.send_message(QueueUrl=url, MessageBody=json.dumps(warning))

    await eventually(lambda: len(running_on(real, app, "rc-wit-room")) == 2, timeout=90)
    taken = node(real, node_name)
    assert taken["spec"].get("unschedulable") is True
    assert any(t["key"] == "spotd.io/interruption" for t in taken["spec"].get("taints") or []), taken["spec"]
    await eventually(lambda: {"SpotdAgentSilent", "SpotdTakeoverComplete"} <= set(events_for(real, node_name)), 30)
    assert running_on(real, app, node_name) == []


async def test_a_budget_of_one_at_a_time_is_drained_one_at_a_time(real: RealCluster, controllers: Any) -> None:
    """maxUnavailable 1 over 3 replicas: the real disruption controller allows the next eviction only once a
    replacement runs and it has updated the budget's status; the drain retries the refusals and completes."""
    od, app = "rc-pdb-od", "rc-pdb-app"
    add_node(real, od, builders.ON_DEMAND, "pdb", pool="rc-pdb")
    deployment(real, app, "pdb", 3, {"requests": {"cpu": "100m"}})
    real.apply(
        {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": {"name": app, "namespace": NS},
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {"app": app}}},
        }
    )
    await eventually(lambda: len(running_on(real, app, od)) == 3, timeout=60)
    path = f"/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/{app}"
    await eventually(lambda: get(real, path).get("status", {}).get("disruptionsAllowed") == 1, timeout=30)
    add_node(real, "rc-pdb-spot", builders.SPOT, "pdb")
    # The Spot node takes no replacement until the budget has refused: without that hold, how fast a
    # replacement runs against the next eviction decides whether any is refused (a run with none did not
    # show the serialisation; seen on an idle machine)
    spot = "/api/v1/nodes/rc-pdb-spot"
    merge = "application/merge-patch+json"
    assert real.request("PATCH", spot, {"spec": {"unschedulable": True}}, content_type=merge)[0] == 200
    ctl = controllers("rc-pdb-ctl", "--fallback-selector", "node-pool=rc-pdb", "--surge-timeout", "0")
    await eventually(lambda: ctl.events("eviction_refused"), timeout=90)
    assert len(ctl.events("pod_evicted")) == 1, held(ctl)  # the budget's one disruption, the rest refused
    assert real.request("PATCH", spot, {"spec": {"unschedulable": None}}, content_type=merge)[0] == 200
    await eventually(lambda: ctl.drains("complete") == 1, timeout=90)
    await eventually(lambda: len(running_on(real, app, "rc-pdb-spot")) == 3, timeout=30)
    evicted = ctl.events("pod_evicted")
    assert len(evicted) == 3, held(ctl)
