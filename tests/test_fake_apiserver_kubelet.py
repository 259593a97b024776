"""Issue 18: terminating pods in the fake API server go as on a real cluster. Only a live kubelet finishes a
graceful deletion; finalizers hold a pod (and any object) until they are removed; on a dead node a pod stays
Terminating until the node gets node.kubernetes.io/out-of-service and pod GC force-deletes it
(pkg/controller/podgc gcTerminating), the taint-eviction controller having deleted the pods that do not
tolerate that NoExecute taint. The last test shows spotd's controller applying that taint and its effect."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from spotd.common.parsing import format_time
from spotd.sim import builders
from spotd.sim.kubeapi import FakeApiServer
from tests.agent_harness import eventually
from tests.test_fake_apiserver import http
from tests.test_fake_apiserver_fidelity import PODS

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
OUT_OF_SERVICE = {"key": "node.kubernetes.io/out-of-service", "value": "nodeshutdown", "effect": "NoExecute"}


@pytest.fixture
async def fake() -> AsyncIterator[FakeApiServer]:
    server = FakeApiServer(termination_scale=0.01, pdb_lag=0)  # a 30 s grace ends in 0.3 s
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def set_ready(api: FakeApiServer, node: str, ready: bool) -> None:
    obj = api.get("Node", node)
    assert obj is not None
    obj["status"]["conditions"] = [{"type": "Ready", "status": "True" if ready else "Unknown"}]
    api.update(obj)


def add_taint(api: FakeApiServer, node: str, taint: dict[str, str]) -> None:
    obj = api.get("Node", node)
    assert obj is not None
    obj["spec"]["taints"] = [*(obj["spec"].get("taints") or []), taint]
    api.update(obj)


async def delete(api: FakeApiServer, name: str) -> None:
    status, body, _ = await http(api, "DELETE", f"{PODS}/{name}")
    assert status == 200, body


async def test_only_a_live_kubelet_finishes_a_graceful_deletion(fake: FakeApiServer) -> None:
    fake.create(builders.node("live"))
    fake.create(builders.node("dead"))
    fake.create(builders.pod("on-live", "live"))
    fake.create(builders.pod("on-dead", "dead"))
    set_ready(fake, "dead", False)  # the instance is gone: no kubelet to stop the containers
    await delete(fake, "on-live")
    await delete(fake, "on-dead")
    await eventually(lambda: fake.get("Pod", "on-live") is None)
    # the same grace has passed for both: the dead node's pod is still Terminating
    stuck = fake.get("Pod", "on-dead")
    assert stuck is not None and stuck["metadata"]["deletionTimestamp"]
    set_ready(fake, "dead", True)  # the kubelet is back: it finishes what it missed
    await eventually(lambda: fake.get("Pod", "on-dead") is None)


async def test_finalizers_hold_a_pod_and_any_object_until_they_are_removed(fake: FakeApiServer) -> None:
    fake.create(builders.node("n1"))
    held = builders.pod("held", "n1")
    held["metadata"]["finalizers"] = ["example.com/keep"]
    fake.create(held)
    fake.create(builders.pod("free", "n1"))
    await delete(fake, "held")
    await delete(fake, "free")
    await eventually(lambda: fake.get("Pod", "free") is None)
    # the kubelet's final delete (grace 0) leaves it for its finalizer
    await eventually(lambda: (fake.get("Pod", "held") or {})["metadata"].get("deletionGracePeriodSeconds") == 0)
    pod = fake.get("Pod", "held")
    assert pod is not None
    pod["metadata"]["finalizers"] = []
    status, _, _ = await http(fake, "PUT", f"{PODS}/held", pod)
    assert status == 200 and fake.get("Pod", "held") is None

    cm = {"metadata": {"name": "c", "finalizers": ["example.com/keep"]}, "data": {}}
    assert (await http(fake, "POST", "/api/v1/namespaces/default/configmaps", cm))[0] == 201
    status, body, _ = await http(fake, "DELETE", "/api/v1/namespaces/default/configmaps/c")
    assert status == 200 and body["metadata"]["deletionTimestamp"]
    kept = fake.get("ConfigMap", "c")
    assert kept is not None
    kept["metadata"]["finalizers"] = []
    assert (await http(fake, "PUT", "/api/v1/namespaces/default/configmaps/c", kept))[0] == 200
    assert fake.get("ConfigMap", "c") is None


async def test_a_deletion_held_by_finalizers_keeps_when_it_was_asked_and_takes_no_new_finalizer(
    fake: FakeApiServer,
) -> None:
    fake.create(builders.node("n1"))
    held = builders.pod("held", "n1", grace=300)  # 3 s scaled: the kubelet will not be done before the delete
    held["metadata"]["finalizers"] = ["example.com/keep"]
    fake.create(held)
    generation = (fake.get("Pod", "held") or {})["metadata"]["generation"]
    await delete(fake, "held")
    graceful = (fake.get("Pod", "held") or {})["metadata"]
    assert graceful["deletionGracePeriodSeconds"] == 300 and graceful["generation"] == generation + 1
    status, body, _ = await http(fake, "DELETE", f"{PODS}/held?gracePeriodSeconds=0")
    assert status == 200
    # rest.BeforeDelete: the timestamp moves back to when the graceful deletion was asked, grace 0
    marked = body["metadata"]
    asked = datetime.fromisoformat(graceful["deletionTimestamp"]) - timedelta(seconds=300)
    assert marked["deletionGracePeriodSeconds"] == 0 and datetime.fromisoformat(marked["deletionTimestamp"]) == asked
    assert marked["generation"] == generation + 1  # only the first mark moves it
    late = {**body, "metadata": {**marked, "finalizers": ["example.com/keep", "example.com/late"]}}
    status, refused, _ = await http(fake, "PUT", f"{PODS}/held", late)
    assert status == 422 and "no new finalizers can be added if the object is being deleted" in refused["message"]
    assert (fake.get("Pod", "held") or {})["metadata"]["finalizers"] == ["example.com/keep"]


async def test_an_eviction_writes_why_before_it_deletes(fake: FakeApiServer) -> None:
    fake.create(builders.node("n1"))
    fake.create(builders.pod("web-1", "n1", grace=300))
    fake.create(builders.pod("web-2", "n1", grace=300))
    changes = fake.subscribe()
    status, _, _ = await http(fake, "POST", f"{PODS}/web-1/eviction?dryRun=All", {"metadata": {"name": "web-1"}})
    assert status == 201
    status, _, _ = await http(fake, "POST", f"{PODS}/web-2/eviction", {"metadata": {"name": "web-2"}})
    assert status == 201
    seen = [(t, o["metadata"]["name"], o) for t, o in changes.pending() if o["kind"] == "Pod"]
    changes.close()
    assert [(t, name) for t, name, _ in seen] == [("MODIFIED", "web-2"), ("MODIFIED", "web-2")]  # none for dry run
    marked, deleting = seen[0][2], seen[1][2]
    condition = [c for c in marked["status"]["conditions"] if c["type"] == "DisruptionTarget"]
    assert condition and condition[0]["status"] == "True" and condition[0]["reason"] == "EvictionByEvictionAPI"
    assert condition[0]["message"] == "Eviction API: evicting"
    assert not marked["metadata"].get("deletionTimestamp") and deleting["metadata"]["deletionTimestamp"]
    assert "DisruptionTarget" not in [c["type"] for c in (fake.get("Pod", "web-1") or {})["status"]["conditions"]]


async def test_the_taint_manager_evicts_when_a_toleration_runs_out(fake: FakeApiServer) -> None:
    fake.create(builders.node("n1"))
    taint = {"key": "example.com/maintenance", "value": "now", "effect": "NoExecute"}
    tolerations = {
        "forever": [{"key": taint["key"], "operator": "Exists"}],
        "brief": [{"key": taint["key"], "operator": "Equal", "value": "now", "tolerationSeconds": 20},
                  {"operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 10}],
        "other-value": [{"key": taint["key"], "operator": "Equal", "value": "later"}],
        "intolerant": [],
    }  # fmt: skip
    for name, tolerated in tolerations.items():
        pod = builders.pod(name, "n1", grace=1)
        pod["spec"]["tolerations"] = tolerated
        fake.create(pod)
    changes = fake.subscribe()
    add_taint(fake, "n1", taint)
    await eventually(lambda: fake.get("Pod", "intolerant") is None and fake.get("Pod", "other-value") is None)
    # tolerated for 20 s, 0.2 s scaled (the first toleration matching the taint counts, not the shortest)
    await eventually(lambda: fake.get("Pod", "brief") is None)
    assert fake.get("Pod", "forever") is not None
    deleted = [o["metadata"]["name"] for t, o in changes.pending() if t == "DELETED"]
    changes.close()
    assert sorted(deleted) == ["brief", "intolerant", "other-value"]


async def test_pod_gc_collects_the_pods_of_a_node_gone_for_its_quarantine(fake: FakeApiServer) -> None:
    for name in ("back", "gone"):
        fake.create(builders.node(name))
        fake.create(builders.pod(f"{name}-running", name, grace=300))
        fake.create(builders.pod(f"{name}-terminating", name, grace=300))
        await delete(fake, f"{name}-terminating")
    changes = fake.subscribe()
    fake.delete("Node", "back")
    fake.delete("Node", "gone")
    fake.create(builders.node("back"))  # the same name again within its quarantine: no orphans there
    await eventually(
        lambda: fake.get("Pod", "gone-running") is None and fake.get("Pod", "gone-terminating") is None, timeout=20
    )
    # the quarantines end in the order the nodes went: "back"'s was over first
    assert fake.get("Pod", "back-running") is not None and fake.get("Pod", "back-terminating") is not None
    seen = [(t, o["metadata"]["name"], o["status"]) for t, o in changes.pending() if o["kind"] == "Pod"]
    changes.close()
    for name in ("gone-running", "gone-terminating"):
        writes = [(t, status) for t, pod, status in seen if pod == name]
        assert [t for t, _ in writes] == ["MODIFIED", "DELETED"]
        failed = writes[0][1]
        condition = [c for c in failed["conditions"] if c["type"] == "DisruptionTarget"]
        assert failed["phase"] == "Failed" and condition[0]["reason"] == "DeletionByPodGC"
        assert condition[0]["message"] == "PodGC: node no longer exists"


def test_the_embedded_daemonsets_start_no_pod_the_taint_manager_would_evict() -> None:
    import random

    from spotd.sim.controllers import Controllers

    api = FakeApiServer()
    api.create(builders.node("plain"))
    api.create(builders.node("out", taints=[OUT_OF_SERVICE]))
    api.create(builders.node("unreachable", taints=[{"key": "node.kubernetes.io/unreachable", "effect": "NoExecute"}]))
    template = {"metadata": {"labels": {"app": "agent"}}, "spec": {"containers": [{"name": "c", "image": "x"}]}}
    api.create({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "agent", "namespace": "default"},
                "spec": {"selector": {"matchLabels": {"app": "agent"}}, "template": template}})  # fmt: skip
    Controllers(api, random.Random(1), 1.0).reconcile(initial=True)
    assert sorted(p["spec"]["nodeName"] for p in api.list("Pod")) == ["plain", "unreachable"]


async def test_the_embedded_scheduler_writes_why_it_preempts(fake: FakeApiServer) -> None:
    from spotd.sim.scheduler import Scheduler

    node = fake.create(builders.node("n1", allocatable={"cpu": "1", "memory": "2Gi", "pods": "110"}))
    low = builders.pod("placeholder", "n1", requests={"cpu": "800m"})
    high = builders.pod("critical", None, requests={"cpu": "800m"})
    low["spec"]["priority"], high["spec"]["priority"] = -10, 1000
    fake.create(low)
    fake.create(high)
    Scheduler(fake, 0.01).schedule({"n1": node}, initial=False)
    victim = fake.get("Pod", "placeholder")
    assert victim is not None and victim["metadata"]["deletionTimestamp"]
    why = [c for c in victim["status"]["conditions"] if c["type"] == "DisruptionTarget"]
    assert why and why[0]["reason"] == "PreemptionByScheduler" and why[0]["status"] == "True"
    assert why[0]["message"] == "default-scheduler: preempting to accommodate a higher priority pod"


async def test_the_out_of_service_taint_evicts_and_pod_gc_force_deletes_on_a_dead_node(fake: FakeApiServer) -> None:
    fake.create(builders.node("dead"))
    for name in ("terminating", "running", "tolerant"):
        fake.create(builders.pod(name, "dead", grace=300))
    tolerant = fake.get("Pod", "tolerant")
    assert tolerant is not None
    tolerant["spec"]["tolerations"] = [{"key": OUT_OF_SERVICE["key"], "operator": "Exists"}]
    fake.update(tolerant)
    set_ready(fake, "dead", False)
    await delete(fake, "terminating")
    changes = fake.subscribe()

    add_taint(fake, "dead", OUT_OF_SERVICE)
    await eventually(lambda: fake.get("Pod", "terminating") is None and fake.get("Pod", "running") is None)
    assert fake.get("Pod", "tolerant") is not None  # tolerated: the taint manager leaves it
    seen = [
        (t, o["metadata"]["name"], o["status"].get("phase"), o["status"].get("conditions"))
        for t, o in changes.pending()
        if o["kind"] == "Pod"
    ]
    changes.close()
    # pod GC marks a pod Failed before deleting it with grace 0
    assert ("MODIFIED", "terminating", "Failed") in [s[:3] for s in seen]
    assert [s[0] for s in seen if s[1] == "terminating"][-1] == "DELETED"
    # the taint manager writes why before it deletes
    running = [s for s in seen if s[1] == "running"]
    disruption = [c for c in running[0][3] if c["type"] == "DisruptionTarget"]
    assert disruption and disruption[0]["reason"] == "DeletionByTaintManager"
    assert running[-1][0] == "DELETED"


async def test_a_dead_node_without_the_taint_keeps_its_terminating_pods(fake: FakeApiServer) -> None:
    fake.create(builders.node("dead"))
    fake.create(builders.node("live"))
    fake.create(builders.pod("stuck", "dead"))
    fake.create(builders.pod("gone", "live"))
    set_ready(fake, "dead", False)
    add_taint(fake, "live", OUT_OF_SERVICE | {"effect": "NoSchedule"})  # Ready: pod GC leaves it alone
    await delete(fake, "stuck")
    await delete(fake, "gone")
    await eventually(lambda: fake.get("Pod", "gone") is None)
    assert fake.get("Pod", "stuck") is not None


# ---- spotd's controller gives the taint; the control plane does the rest ----------------------------------


async def test_the_controllers_out_of_service_taint_clears_a_dead_nodes_pods(tmp_path: Path) -> None:
    """A node past its Spot interruption deadline goes NotReady with a pod whose eviction never finished and
    one never evicted: neither goes until spotd's controller adds node.kubernetes.io/out-of-service; then the
    taint manager deletes the running one and pod GC force-deletes both (the StatefulSet's replacements can
    start elsewhere, its volumes detach)."""
    from spotd.kube.keys import NOTICE_ANNOTATION
    from tests.test_controller import run_in_process, stop_in_process

    api = FakeApiServer(host="127.0.0.1", port=0, termination_scale=0.2)
    await api.start()
    try:
        api.load_manifests([DEPLOY])
        token = api.service_account_token("spotd", "spotd-controller")
        api.write_kubeconfig(tmp_path / "kubeconfig", token=token)
        deadline = datetime.now(UTC) - timedelta(seconds=30)
        notice = {"kind": "spot-itn", "source": "imds", "seen_at": format_time(deadline - timedelta(minutes=2)),
                  "deadline": format_time(deadline), "action": "terminate"}  # fmt: skip
        gone = builders.node("gone", builders.SPOT, capacity_label=builders.KARPENTER_CAPACITY_LABEL)
        gone["metadata"]["annotations"] = {NOTICE_ANNOTATION: json.dumps(notice)}
        api.create(gone)
        api.create(builders.pod("db-0", "gone", owner="StatefulSet", grace=30))
        api.create(builders.pod("web-1", "gone", grace=30))
        set_ready(api, "gone", False)
        await delete(api, "db-0")  # its eviction went through before the instance died
        api.create(builders.node("witness"))  # a live node: the same grace ends there
        api.create(builders.pod("web-2", "witness", grace=30))
        await delete(api, "web-2")
        await eventually(lambda: api.get("Pod", "web-2") is None, timeout=20)
        assert api.get("Pod", "db-0") is not None and api.get("Pod", "web-1") is not None

        ctl, task = await run_in_process(api, tmp_path)
        try:
            await eventually(lambda: api.get("Pod", "db-0") is None and api.get("Pod", "web-1") is None, timeout=30)
        finally:
            await stop_in_process(ctl, task)
        taints = (api.get("Node", "gone") or {})["spec"].get("taints")
        assert taints == [OUT_OF_SERVICE]
    finally:
        await api.stop()
