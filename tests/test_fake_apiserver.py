"""The fake Kubernetes API server against real clients over real sockets: kubectl, the official Python
client and lightkube; plus the pure parts (selectors, patches) table by table."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from spotd.sim.kubeapi import ADMIN_TOKEN, STOP_SECONDS_ANNOTATION, ApiError, FakeApiServer
from spotd.sim.kubeapi.patch import json_patch, merge_patch, strategic_merge
from spotd.sim.kubeapi.selectors import labels_match, parse_field_selector, parse_label_selector
from tests.alertmanager import require_tool

KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.usefixtures("kubectl_binary")


@pytest.fixture
def kubectl_binary() -> str:
    return require_tool("kubectl")  # under CI=true a missing kubectl fails, elsewhere it skips


# ---- builders ------------------------------------------------------------------------------------------


def node(name: str, ready: bool = True) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "status": {
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            # complete: the official client (pydantic models) rejects a NodeSystemInfo with fields missing
            "nodeInfo": {
                **dict.fromkeys(
                    ("architecture", "bootID", "containerRuntimeVersion", "kernelVersion", "kubeProxyVersion"), "x"
                ),
                **dict.fromkeys(("machineID", "operatingSystem", "osImage", "systemUUID"), "x"),
                "kubeletVersion": "v1.32.0",
            },
        },
    }


def pod(
    name: str,
    node_name: str | None = "n1",
    labels: dict[str, str] | None = None,
    ready: bool = True,
    namespace: str = "default",
    owner: dict[str, Any] | None = None,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {}, "annotations": annotations or {}},
        "spec": {"containers": [{"name": "app", "image": "busybox"}]},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }
    if node_name:
        obj["spec"]["nodeName"] = node_name
    if owner:
        obj["metadata"]["ownerReferences"] = [
            {"apiVersion": "apps/v1", "kind": owner["kind"], "name": owner["metadata"]["name"],
             "uid": owner["metadata"]["uid"], "controller": True}
        ]  # fmt: skip
    return obj


def pdb(name: str, selector: dict[str, str], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"selector": {"matchLabels": selector}, **spec},
    }


def lease(name: str, holder: str) -> dict[str, Any]:
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": name, "namespace": "kube-system"},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15},
    }


async def until(condition: Callable[[], object], timeout: float = 5.0) -> None:
    """Poll a condition: timing assertions stay robust on a loaded machine."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def watching(api: FakeApiServer) -> bool:
    """A watch request has arrived (it is registered in the same step as it is recorded)."""
    return any(r.query.get("watch") in ("true", "1", "True") for r in api.requests)


# ---- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    # no PDB lag: these tests read budgets right after the writes that change them
    server = FakeApiServer(termination_scale=0.02, pdb_lag=0)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
def kubeconfig(api: FakeApiServer, tmp_path: Path) -> Path:
    return api.write_kubeconfig(tmp_path / "kubeconfig")


async def kubectl(kubeconfig: Path, *args: str, check: bool = True) -> str:
    assert KUBECTL is not None
    cache = kubeconfig.parent / "kube-cache"
    proc = await asyncio.create_subprocess_exec(
        KUBECTL,
        "--kubeconfig",
        str(kubeconfig),
        "--cache-dir",
        str(cache),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    if check and proc.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {err.decode()}")
    return out.decode() + err.decode()


def official_client(kubeconfig: Path) -> Any:
    from kubernetes import client, config

    return client.CoreV1Api(config.new_client_from_config(config_file=str(kubeconfig)))


# ---- kubectl -------------------------------------------------------------------------------------------


@needs_kubectl
async def test_kubectl_get_prints_tables(api: FakeApiServer, kubeconfig: Path) -> None:
    api.create(node("n1"))
    api.create(pod("web-1", labels={"app": "web"}))
    api.create(pod("dns-1", namespace="kube-system"))

    nodes = await kubectl(kubeconfig, "get", "nodes")
    pods = await kubectl(kubeconfig, "get", "pods", "-A", "-o", "wide")
    as_yaml = await kubectl(kubeconfig, "get", "pod", "web-1", "-o", "yaml")

    assert nodes.split("\n")[0].split() == ["NAME", "STATUS", "ROLES", "AGE", "VERSION"]
    assert nodes.split("\n")[1].split()[:2] == ["n1", "Ready"]
    assert "kube-system" in pods and "dns-1" in pods and "web-1" in pods and " n1" in pods
    assert "app: web" in as_yaml


@needs_kubectl
async def test_kubectl_node_actions(api: FakeApiServer, kubeconfig: Path) -> None:
    api.create(node("n1"))

    await kubectl(kubeconfig, "cordon", "n1")
    await kubectl(kubeconfig, "taint", "nodes", "n1", "spotd.io/reclaim=true:NoSchedule")
    await kubectl(kubeconfig, "taint", "nodes", "n1", "other=x:NoExecute")
    await kubectl(kubeconfig, "label", "node", "n1", "spotd.io/state=draining")
    await kubectl(kubeconfig, "annotate", "node", "n1", "spotd.io/notice=abc")
    got = api.get("Node", "n1")
    assert got is not None
    assert got["spec"]["unschedulable"] is True
    # the cordon's own taint comes from the node lifecycle controller, as on a real cluster
    assert {t["key"] for t in got["spec"]["taints"]} == {
        "node.kubernetes.io/unschedulable",
        "spotd.io/reclaim",
        "other",
    }
    assert got["metadata"]["labels"]["spotd.io/state"] == "draining"
    assert got["metadata"]["annotations"]["spotd.io/notice"] == "abc"
    assert got["status"]["conditions"][0]["type"] == "Ready"  # spec patches leave status alone

    await kubectl(kubeconfig, "taint", "nodes", "n1", "spotd.io/reclaim:NoSchedule-")
    await kubectl(kubeconfig, "label", "node", "n1", "spotd.io/state-")
    await kubectl(kubeconfig, "uncordon", "n1")
    got = api.get("Node", "n1")
    assert got is not None
    assert not got["spec"].get("unschedulable")
    assert [t["key"] for t in got["spec"]["taints"]] == ["other"]
    assert "spotd.io/state" not in got["metadata"]["labels"]
    patches = [r for r in api.requests if r.method == "PATCH"]
    assert patches and all(r.path == "/api/v1/nodes/n1" for r in patches)


@needs_kubectl
async def test_kubectl_drain_skips_daemonset_and_waits_for_budget(api: FakeApiServer, kubeconfig: Path) -> None:
    api.create(node("n1"))
    api.create(node("n2"))
    ds = api.create({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "agent"}, "spec": {}})
    rs = api.create(
        {"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {"name": "web"}, "spec": {"replicas": 3}}
    )
    api.create(pod("agent-n1", "n1", {"app": "agent"}, owner=ds))
    api.create(pod("web-1", "n1", {"app": "web"}, owner=rs, annotations={STOP_SECONDS_ANNOTATION: "1"}))
    api.create(pod("web-2", "n2", {"app": "web"}, owner=rs))
    api.create(pod("web-3", "n2", {"app": "web"}, owner=rs, ready=False))
    api.create(pdb("web", {"app": "web"}, minAvailable=2))
    budget = api.get("PodDisruptionBudget", "web")
    assert budget is not None and budget["status"]["disruptionsAllowed"] == 0

    async def become_ready() -> None:
        await asyncio.sleep(1.0)
        web3 = api.get("Pod", "web-3")
        assert web3 is not None
        web3["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
        api.update(web3)

    readiness = asyncio.create_task(become_ready())
    started = time.monotonic()
    out = await kubectl(kubeconfig, "drain", "n1", "--ignore-daemonsets", "--delete-emptydir-data", "--timeout=30s")
    await readiness

    assert "drained" in out and "ignoring DaemonSet-managed Pods: default/agent-n1" in out
    assert api.get("Pod", "web-1") is None and api.get("Pod", "agent-n1") is not None
    assert time.monotonic() - started >= 1.0
    evictions = [r for r in api.requests if r.path.endswith("/pods/web-1/eviction")]
    assert len(evictions) >= 2  # the first one was refused by the budget (429), kubectl retried
    n1 = api.get("Node", "n1")
    assert n1 is not None and n1["spec"]["unschedulable"] is True


@needs_kubectl
async def test_kubectl_protobuf_bodies(api: FakeApiServer, kubeconfig: Path) -> None:
    """kubectl's typed clients send protobuf DeleteOptions and Namespaces."""
    api.create(node("n1"))
    api.create(
        pod("solo", "n1", owner=api.create({"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {"name": "r"}}))
    )
    changes = api.subscribe()

    await kubectl(kubeconfig, "drain", "n1", "--disable-eviction", "--grace-period=5", "--timeout=20s")
    await kubectl(kubeconfig, "create", "namespace", "team-a")

    assert api.get("Pod", "solo") is None and api.get("Namespace", "team-a") is not None
    first_pod_change = None
    while first_pod_change is None:
        event_type, obj = await changes.__anext__()
        if obj["kind"] == "Pod":
            first_pod_change = (event_type, obj["metadata"].get("deletionGracePeriodSeconds"))
    changes.close()
    assert first_pod_change == ("MODIFIED", 5)
    assert {r.content_type for r in api.requests if r.method in ("DELETE", "POST")} == {
        "application/vnd.kubernetes.protobuf"
    }


# ---- the official Python client ------------------------------------------------------------------------


async def test_official_client_selectors_patch_watch_and_eviction(api: FakeApiServer, kubeconfig: Path) -> None:
    from kubernetes import watch
    from kubernetes.client import V1Eviction, V1ObjectMeta
    from kubernetes.client.rest import ApiException

    api.create(node("n1"))
    for i, (tier, n) in enumerate([("a", "n1"), ("b", "n1"), ("c", "n2")]):
        api.create(pod(f"p{i}", n, {"app": "web", "tier": tier}))
    api.create(pdb("web", {"app": "web"}, maxUnavailable=0))
    v1 = official_client(kubeconfig)

    def names(**kw: Any) -> list[str]:
        return [p.metadata.name for p in v1.list_pod_for_all_namespaces(**kw).items]

    assert await asyncio.to_thread(names, label_selector="tier in (a,c)") == ["p0", "p2"]
    assert await asyncio.to_thread(names, label_selector="tier!=a,app") == ["p1", "p2"]
    assert await asyncio.to_thread(names, label_selector="!missing,tier notin (b)") == ["p0", "p2"]
    assert await asyncio.to_thread(names, field_selector="spec.nodeName=n1") == ["p0", "p1"]
    assert await asyncio.to_thread(names, field_selector="spec.nodeName!=n1,status.phase=Running") == ["p2"]
    with pytest.raises(ApiException) as bad:
        await asyncio.to_thread(names, field_selector="spec.bogus=x")
    assert bad.value.status == 400

    rv = (await asyncio.to_thread(v1.list_namespaced_pod, "default")).metadata.resource_version
    await asyncio.to_thread(v1.patch_node, "n1", {"spec": {"unschedulable": True}})
    await asyncio.to_thread(v1.patch_namespaced_pod, "p0", "default", {"metadata": {"labels": {"tier": "z"}}})
    api.delete("Pod", "p2")

    def events() -> list[tuple[str, str]]:
        w = watch.Watch()
        stream = w.stream(v1.list_namespaced_pod, "default", resource_version=rv, timeout_seconds=1)
        return [(e["type"], e["object"].metadata.name) for e in stream]

    assert await asyncio.to_thread(events) == [("MODIFIED", "p0"), ("DELETED", "p2")]
    assert api.get("Node", "n1")["spec"]["unschedulable"] is True  # type: ignore[index]

    ready_false = {"status": {"conditions": [{"type": "Ready", "status": "False"}, {"type": "X", "status": "True"}]}}
    await asyncio.to_thread(v1.patch_namespaced_pod_status, "p1", "default", ready_false)
    await asyncio.to_thread(v1.patch_namespaced_pod, "p1", "default", {"status": {"phase": "Failed"}})
    p1 = api.get("Pod", "p1")
    assert p1 is not None and p1["status"]["phase"] == "Running"  # the main resource ignores status
    assert p1["status"]["conditions"] == ready_false["status"]["conditions"]  # merged by type
    await asyncio.to_thread(v1.patch_namespaced_pod_status, "p1", "default", {"status": {"conditions": [
        {"type": "Ready", "status": "True"}]}})  # fmt: skip

    body = V1Eviction(metadata=V1ObjectMeta(name="p1", namespace="default"))
    with pytest.raises(ApiException) as refused:
        await asyncio.to_thread(v1.create_namespaced_pod_eviction, "p1", "default", body)
    assert refused.value.status == 429
    assert "DisruptionBudget" in str(refused.value.body) and "disruption budget" in str(refused.value.body)


async def test_lease_race_exactly_one_wins(api: FakeApiServer, kubeconfig: Path) -> None:
    from kubernetes import client, config
    from kubernetes.client.rest import ApiException

    coord = client.CoordinationV1Api(config.new_client_from_config(config_file=str(kubeconfig)))
    await asyncio.to_thread(coord.create_namespaced_lease, "kube-system", lease("spotd-controller", "a"))  # type: ignore[arg-type]
    with pytest.raises(ApiException) as exists:
        await asyncio.to_thread(coord.create_namespaced_lease, "kube-system", lease("spotd-controller", "b"))  # type: ignore[arg-type]
    assert exists.value.status == 409 and "AlreadyExists" in str(exists.value.body)

    first = await asyncio.to_thread(coord.read_namespaced_lease, "spotd-controller", "kube-system")
    second = await asyncio.to_thread(coord.read_namespaced_lease, "spotd-controller", "kube-system")

    def take(obj: Any, holder: str) -> str:
        obj.spec.holder_identity = holder
        try:
            coord.replace_namespaced_lease("spotd-controller", "kube-system", obj)
            return "won"
        except ApiException as exc:
            return f"lost {exc.status}"

    results = await asyncio.gather(asyncio.to_thread(take, first, "b"), asyncio.to_thread(take, second, "c"))
    assert sorted(results) == ["lost 409", "won"]
    holder = api.get("Lease", "spotd-controller", "kube-system")["spec"]["holderIdentity"]  # type: ignore[index]
    assert holder in ("b", "c")


# ---- lightkube -----------------------------------------------------------------------------------------


async def test_lightkube_crud_patch_and_watch(api: FakeApiServer, kubeconfig: Path) -> None:
    from lightkube import AsyncClient, KubeConfig
    from lightkube.models.core_v1 import Container, PodSpec
    from lightkube.models.meta_v1 import ObjectMeta
    from lightkube.resources.core_v1 import Node, Pod
    from lightkube.types import PatchType

    api.create(node("n1"))
    client = AsyncClient(config=KubeConfig.from_file(str(kubeconfig)), field_manager="spotd")
    try:
        spec = PodSpec(nodeName="n1", containers=[Container(name="app", image="x")])
        created = await client.create(Pod(metadata=ObjectMeta(generateName="web-", labels={"app": "web"}), spec=spec))
        name = created.metadata.name  # type: ignore[union-attr]
        assert name and name.startswith("web-") and created.metadata.uid  # type: ignore[union-attr]

        listed = [p.metadata.name async for p in client.list(Pod, namespace="*", fields={"spec.nodeName": "n1"})]  # type: ignore[union-attr]
        assert listed == [name]

        await client.patch(Node, "n1", {"spec": {"unschedulable": True}})  # strategic by default
        await client.patch(Node, "n1", {"metadata": {"labels": {"a": "1"}}}, patch_type=PatchType.MERGE)
        await client.patch(
            Node, "n1", [{"op": "add", "path": "/spec/taints", "value": [{"key": "k", "effect": "NoSchedule"}]}],
            patch_type=PatchType.JSON,
        )  # fmt: skip
        got = await client.get(Node, "n1")
        assert got.spec.unschedulable is True and got.metadata.labels["a"] == "1"  # type: ignore[union-attr,index]
        assert got.spec.taints[0].key == "k"  # type: ignore[union-attr,index]

        seen: list[tuple[str, str]] = []

        async def watch() -> None:
            async for event_type, obj in client.watch(Pod, namespace="default"):
                seen.append((event_type, str(obj.metadata.name)))  # type: ignore[union-attr]
                if event_type == "DELETED":
                    return

        task = asyncio.create_task(watch())
        await until(lambda: watching(api))
        await client.delete(Pod, name, namespace="default", grace_period=1)
        await asyncio.wait_for(task, 5)
        assert seen == [("ADDED", name), ("MODIFIED", name), ("DELETED", name)]
        assert any(r.query.get("watch") == "true" for r in api.requests)
    finally:
        await client.close()


# ---- protocol details over plain HTTP ------------------------------------------------------------------


async def http(api: FakeApiServer, method: str, path: str, body: Any = None, raw: bool = False) -> tuple[int, Any, Any]:
    """One request; the body parsed as JSON unless `raw` (watch streams)."""
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=False)) as session:
        kwargs: dict[str, Any] = {}
        if body is not None:
            kwargs["json"] = body
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        async with session.request(method, api.url + path, headers=headers, **kwargs) as resp:
            text = await resp.text()
            return resp.status, (text if raw else json.loads(text)), resp.headers


async def test_stale_put_conflicts_and_errors_are_status(api: FakeApiServer) -> None:
    api.create(lease("l", "a"))
    current = api.get("Lease", "l", "kube-system")
    assert current is not None
    stale = {**current, "metadata": {**current["metadata"], "resourceVersion": "1"}}

    status, body, _ = await http(api, "PUT", "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/l", stale)
    assert status == 409 and body["kind"] == "Status" and body["reason"] == "Conflict"
    assert "the object has been modified" in body["message"]

    status, body, _ = await http(api, "GET", "/api/v1/namespaces/default/pods/nope")
    assert (status, body["reason"], body["details"]["name"]) == (404, "NotFound", "nope")

    with pytest.raises(ApiError) as conflict:
        api.update(stale)
    assert conflict.value.code == 409

    current["spec"]["holderIdentity"] = "b"
    assert api.update(current)["metadata"]["generation"] == 2  # spec changed
    current = api.get("Lease", "l", "kube-system")
    assert current is not None
    current["metadata"]["labels"] = {"x": "y"}
    assert api.update(current)["metadata"]["generation"] == 2  # metadata only


async def test_watch_from_too_old_version_is_gone(api: FakeApiServer) -> None:
    small = FakeApiServer(history_size=5)
    await small.start()
    try:
        for i in range(10):
            small.create(pod(f"p{i}"))
        status, body, _ = await http(
            small, "GET", "/api/v1/pods?watch=true&resourceVersion=2&timeoutSeconds=1", raw=True
        )
        assert status == 200
        assert '"type":"ERROR"' in body and '"code":410' in body and '"reason":"Expired"' in body
        # a recent version replays the history window
        rv = small.store.rv - 2
        status, body, _ = await http(
            small, "GET", f"/api/v1/pods?watch=1&resourceVersion={rv}&timeoutSeconds=1", raw=True
        )
        assert body.count('"type":"ADDED"') == 2
    finally:
        await small.stop()


async def test_watch_bookmarks_and_field_selector_transitions(api: FakeApiServer) -> None:
    api.bookmark_interval = 0.3
    api.create(pod("p", node_name=None))
    rv = api.store.rv
    scheduled = api.get("Pod", "p")
    assert scheduled is not None
    scheduled["spec"]["nodeName"] = "n1"
    api.update(scheduled)
    path = f"/api/v1/pods?watch=true&fieldSelector=spec.nodeName%3Dn1&resourceVersion={rv}"
    _, body, _ = await http(api, "GET", path + "&allowWatchBookmarks=true&timeoutSeconds=1", raw=True)
    lines = body.strip().split("\n")
    assert '"type":"ADDED"' in lines[0]  # it entered the selection: ADDED, as the real watch cache says
    assert any('"type":"BOOKMARK"' in line for line in lines[1:])

    # live: only the watched node's pods reach a spec.nodeName watch
    api.requests.clear()
    live = asyncio.create_task(http(api, "GET", path.split("&resourceVersion")[0] + "&timeoutSeconds=1", raw=True))
    await until(lambda: watching(api))
    api.create(pod("other", node_name="n2"))
    api.create(pod("mine", node_name="n1"))
    api.delete("Pod", "p")
    _, body, _ = await live
    events = [(e["type"], e["object"]["metadata"]["name"]) for e in map(json.loads, body.strip().split("\n"))]
    assert events == [("ADDED", "p"), ("ADDED", "mine"), ("DELETED", "p")]


async def test_injected_faults(api: FakeApiServer) -> None:
    api.create(node("n1"))
    api.inject_fault("GET", r"^/api/v1/nodes/n1$", 429, times=2, retry_after=3)
    api.inject_fault("*", r"/leases", 500, delay=0.1)
    for _ in range(2):
        status, body, headers = await http(api, "GET", "/api/v1/nodes/n1")
        assert status == 429 and body["reason"] == "TooManyRequests" and headers["Retry-After"] == "3"
    assert (await http(api, "GET", "/api/v1/nodes/n1"))[0] == 200
    started = time.monotonic()
    status, body, _ = await http(api, "GET", "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases")
    assert status == 500 and body["code"] == 500 and time.monotonic() - started >= 0.1
    api.inject_fault("GET", "/nodes", 503, times=5)
    api.clear_faults()
    assert (await http(api, "GET", "/api/v1/nodes"))[0] == 200


async def test_graceful_delete_timing(api: FakeApiServer) -> None:
    api.termination_scale = 0.1
    api.create(node("n1"))  # Ready: its kubelet ends the pods' graceful deletions
    api.create(pod("slow", annotations={}))  # grace 30 s -> 3 s scaled; shortened below
    api.create(pod("quick", annotations={STOP_SECONDS_ANNOTATION: "2"}))  # stops in 2 s -> 0.2 s
    api.create(pod("pending", node_name=None))
    finished = pod("done")
    finished["status"]["phase"] = "Succeeded"
    api.create(finished)
    sub = api.subscribe()

    started = time.monotonic()
    status, body, _ = await http(api, "DELETE", "/api/v1/namespaces/default/pods/quick")
    assert status == 200 and body["metadata"]["deletionGracePeriodSeconds"] == 30
    assert body["metadata"]["deletionTimestamp"]  # marked, not gone: gone 0.2 s later (the watch shows both)
    await http(api, "DELETE", "/api/v1/namespaces/default/pods/slow", {"gracePeriodSeconds": 30})
    await http(api, "DELETE", "/api/v1/namespaces/default/pods/pending")
    await http(api, "DELETE", "/api/v1/namespaces/default/pods/done")
    assert api.get("Pod", "pending") is None and api.get("Pod", "done") is None  # unscheduled, finished: at once

    await until(lambda: api.get("Pod", "quick") is None, timeout=2.5)
    assert time.monotonic() - started >= 0.2  # min(grace 30, stop-seconds 2) * 0.1
    assert api.get("Pod", "slow") is not None  # 3 s to go
    await http(api, "DELETE", "/api/v1/namespaces/default/pods/slow?gracePeriodSeconds=1")  # shortens to 0.1 s
    await until(lambda: api.get("Pod", "slow") is None, timeout=2.5)

    seen = [(event_type, obj["metadata"]["name"]) for event_type, obj in sub.pending()]
    sub.close()
    assert ("MODIFIED", "quick") in seen and ("DELETED", "quick") in seen
    assert seen.index(("DELETED", "quick")) < seen.index(("DELETED", "slow"))


async def test_eviction_rules(api: FakeApiServer) -> None:
    # a ReplicaSet's pods: maxUnavailable needs their controller's scale (bare pods would allow nothing)
    rs = {"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {"name": "web"}, "spec": {"replicas": 3}}
    rs = api.create(rs)
    for i in range(3):
        api.create(pod(f"w{i}", labels={"app": "web"}, owner=rs))
    api.create(pdb("a", {"app": "web"}, maxUnavailable="34%"))  # ceil(34% of 3) = 2
    evict = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": "w0"}}
    url = "/api/v1/namespaces/default/pods/{}/eviction"

    assert (await http(api, "POST", url.format("w0"), evict))[0] == 201
    assert (await http(api, "POST", url.format("w0"), evict))[0] == 201  # already terminating
    status, body, _ = await http(api, "POST", url.format("w1"), {**evict, "metadata": {"name": "w1"}})
    assert status == 201
    status, body, _ = await http(api, "POST", url.format("w2"), {**evict, "metadata": {"name": "w2"}})
    assert status == 429 and body["details"]["causes"][0]["reason"] == "DisruptionBudget"
    budget = api.get("PodDisruptionBudget", "a")
    assert budget is not None
    assert {k: budget["status"][k] for k in ("currentHealthy", "desiredHealthy", "disruptionsAllowed")} == {
        "currentHealthy": 1,
        "desiredHealthy": 1,
        "disruptionsAllowed": 0,
    }

    api.create(pdb("b", {"app": "web"}, minAvailable=0))
    status, body, _ = await http(api, "POST", url.format("w2"), {**evict, "metadata": {"name": "w2"}})
    assert status == 500 and "more than one PodDisruptionBudget" in body["message"]
    assert (await http(api, "POST", url.format("gone"), evict))[0] == 404


async def test_pagination_generate_name_and_events(api: FakeApiServer) -> None:
    for i in range(5):
        api.create(pod(f"p{i}"))
    _, first, _ = await http(api, "GET", "/api/v1/namespaces/default/pods?limit=2")
    token = first["metadata"]["continue"]
    assert [p["metadata"]["name"] for p in first["items"]] == ["p0", "p1"]
    assert first["metadata"]["remainingItemCount"] == 3
    _, rest, _ = await http(api, "GET", f"/api/v1/namespaces/default/pods?limit=10&continue={token}")
    assert [p["metadata"]["name"] for p in rest["items"]] == ["p2", "p3", "p4"] and "continue" not in rest["metadata"]

    core = {"metadata": {"generateName": "n1."}, "involvedObject": {"kind": "Node", "name": "n1"}, "reason": "A"}
    status, created, _ = await http(api, "POST", "/api/v1/namespaces/default/events", core)
    assert status == 201 and created["metadata"]["name"].startswith("n1.")
    new = {"metadata": {"name": "e2"}, "regarding": {"kind": "Pod", "name": "p0"}, "reason": "B", "note": "hi",
           "reportingController": "spotd", "reportingInstance": "x", "action": "Drain", "type": "Normal",
           "eventTime": "2026-01-01T00:00:00.000000Z"}  # fmt: skip
    assert (await http(api, "POST", "/apis/events.k8s.io/v1/namespaces/default/events", new))[0] == 201
    stored = api.get("Event", "e2")
    assert stored is not None and stored["involvedObject"]["name"] == "p0" and stored["message"] == "hi"
    _, by_kind, _ = await http(api, "GET", "/api/v1/events?fieldSelector=involvedObject.kind%3DNode")
    assert [e["reason"] for e in by_kind["items"]] == ["A"]
    _, v1, _ = await http(api, "GET", "/apis/events.k8s.io/v1/events?fieldSelector=regarding.name%3Dp0")
    assert [(e["note"], e["regarding"]["kind"]) for e in v1["items"]] == [("hi", "Pod")]


# ---- pure parts ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        ("a=1", {"a": "1"}, True),
        ("a==1", {"a": "2"}, False),
        ("a!=1", {}, True),
        ("a in (1, 2),b", {"a": "2", "b": ""}, True),
        ("a notin (1,2)", {"a": "3"}, True),
        ("!a", {"a": "1"}, False),
        ("a,!b", {"a": "x"}, True),
        ("a>3", {"a": "4"}, True),
    ],
)
def test_label_selectors(selector: str, labels: dict[str, str], expected: bool) -> None:
    assert labels_match(parse_label_selector(selector), labels) is expected


def test_selector_errors() -> None:
    with pytest.raises(ApiError):
        parse_label_selector("a in (1")
    with pytest.raises(ApiError):
        parse_field_selector("spec.other=x", {"metadata.name"})


def test_patches() -> None:
    doc = {"spec": {"containers": [{"name": "a", "image": "1"}, {"name": "b", "image": "1"}], "taints": [{"key": "x"}]}}
    smp = strategic_merge(doc, {"spec": {"containers": [{"name": "b", "image": "2"}], "taints": [{"key": "y"}]}})
    assert smp["spec"]["containers"] == [{"name": "a", "image": "1"}, {"name": "b", "image": "2"}]
    assert smp["spec"]["taints"] == [{"key": "y"}]  # no merge key: replaced, as node taints are
    deleted = strategic_merge(doc, {"spec": {"containers": [{"name": "a", "$patch": "delete"}]}})
    assert [c["name"] for c in deleted["spec"]["containers"]] == ["b"]
    assert merge_patch({"a": {"b": 1, "c": 2}}, {"a": {"b": None}, "d": [1]}) == {"a": {"c": 2}, "d": [1]}
    assert json_patch({"a": [1, 2]}, [{"op": "add", "path": "/a/-", "value": 3}, {"op": "remove", "path": "/a/0"}]) == {
        "a": [2, 3]
    }
    with pytest.raises(ApiError):
        json_patch({"a": 1}, [{"op": "test", "path": "/a", "value": 2}])
