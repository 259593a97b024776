"""The differential test (issue 18): one table of API scenarios, each run against the fake API server
(spotd/sim/kubeapi) and against the real control plane (tests/realcluster.py: kube-apiserver, etcd,
controller-manager, scheduler, kwok, deploy/ applied), comparing status codes, reasons, messages and the
resulting objects, normalised (see `normalise`). The same identities on both sides: the admin, the agent's
token bound to its node (on the real server a TokenRequest bound to its DaemonSet pod), the controller's
ServiceAccount, with deploy/'s RBAC and admission policies.

A row the fake answers differently and that is out of the fake's scope carries `fake_divergence`: what the
fake answers instead (docs/testing.md lists them). The test then asserts the fake still answers exactly that
and the real server does not, so a fake that learns the behaviour flips the row to a failure until the
divergence is taken out of the table.

Both sides are driven over HTTPS by the same synchronous client; the fake runs on an event loop of its own
thread. The real cluster acts asynchronously (disruption controller, kwok's kubelet, namespace controller):
every step waits on the state it needs, never on time."""

from __future__ import annotations

import asyncio
import copy
import json
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from spotd.sim.kubeapi import ADMIN_TOKEN, FakeApiServer
from tests.realcluster import DEPLOY, KWOK_ANNOTATION, RealCluster

NS = "diff"
NODE = "diff-node"  # a node with a kubelet: kwok's on the real side, status written Ready on the fake
DEAD_NODE = "diff-nokubelet"  # a node nothing runs: pods on it are never started, nor their deletion finished
OTHER_NODE = "diff-node-2"
MERGE = "application/merge-patch+json"
PODS = f"/api/v1/namespaces/{NS}/pods"
PDBS = f"/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets"

Json = dict[str, Any]


# ---- the two sides --------------------------------------------------------------------------------------


@dataclass
class Side:
    """One API server as the scenarios see it: HTTPS requests as one of the identities, and the few steps
    that differ between a fake with no kubelet and a real cluster with kwok's."""

    name: str
    url: str
    ca_file: Path
    tokens: dict[str, str]
    run_pod: Callable[[str], None]  # the kubelet's part: the pod Running and Ready (NODE's pods only)
    notes: list[str] = field(default_factory=list)

    def request(
        self, method: str, path: str, body: Any = None, *, who: str = "admin", content_type: str | None = None
    ) -> tuple[int, Any]:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {self.tokens[who]}", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = content_type or "application/json"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=60) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def get(self, path: str) -> Json | None:
        status, body = self.request("GET", path)
        if status == 404:
            return None
        assert status == 200, (self.name, path, body)
        return dict(body)

    def watch(
        self, path: str, resource_version: str, until: Callable[[str, Json], bool], field_selector: str = ""
    ) -> list[tuple[str, Json]]:
        """The events of a watch from `resource_version` up to the first that satisfies `until`."""
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        params = {"watch": "1", "resourceVersion": resource_version, "timeoutSeconds": "60"}
        if field_selector:
            params["fieldSelector"] = field_selector
        query = urllib.parse.urlencode(params)
        req = urllib.request.Request(
            f"{self.url}{path}?{query}", headers={"Authorization": f"Bearer {self.tokens['admin']}"}
        )
        events: list[tuple[str, Json]] = []
        with urllib.request.urlopen(req, context=ctx, timeout=90) as stream:
            for line in stream:
                if not line.strip():
                    continue
                event = json.loads(line)
                events.append((event["type"], event["object"]))
                if until(event["type"], event["object"]):
                    break
        return events


def wait_for(check: Callable[[], Any], what: str, timeout: float = 90.0) -> Any:
    """Poll until `check()` is truthy; its value. Waits on state (the real controllers act when they act)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.1)


class FakeThread:
    """A FakeApiServer served by an event loop of its own thread, so the synchronous client reaches it as it
    reaches the real server. `call` runs a helper on that loop (the fake's helpers are not thread-safe)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fake-apiserver", daemon=True)
        self.thread.start()
        # report_access=False: the scenarios provoke denials, which are not spotd's use of its RBAC
        self.api: FakeApiServer = self.call(lambda: FakeApiServer(report_access=False, termination_scale=0.01))
        asyncio.run_coroutine_threadsafe(self.api.start(), self.loop).result(30)

    def call(self, fn: Callable[[], Any]) -> Any:
        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(30)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.api.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def _node(name: str, kubelet: bool) -> Json:
    meta: Json = {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}}
    if kubelet:
        meta["annotations"] = {KWOK_ANNOTATION: "fake"}
    return {"apiVersion": "v1", "kind": "Node", "metadata": meta, "spec": {}}


def _namespace(name: str) -> Json:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}


@pytest.fixture(scope="module")
def fake_side(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Side]:
    fake = FakeThread()
    api = fake.api
    ca = tmp_path_factory.mktemp("diff-fake") / "ca.crt"
    cert = api.ca_certificate
    assert cert is not None
    ca.write_bytes(cert)
    ready = {"conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}]}

    def setup() -> dict[str, str]:
        api.load_manifests([DEPLOY])
        api.create(_namespace(NS))
        for name, kubelet in ((NODE, True), (OTHER_NODE, True), (DEAD_NODE, False)):
            api.create({**_node(name, kubelet), **({"status": ready} if kubelet else {})})
        return {
            "admin": ADMIN_TOKEN,
            "agent": api.service_account_token("spotd", "spotd-agent", node_name=NODE),
            "controller": api.service_account_token("spotd", "spotd-controller"),
        }

    tokens = fake.call(setup)
    side = Side("fake", api.url, ca, tokens, run_pod=lambda name: None)

    def run_pod(name: str) -> None:
        # the fake has no kubelet: write what kwok's pod-ready stage writes
        conditions = [
            {"type": t, "status": "True"} for t in ("Initialized", "Ready", "ContainersReady", "PodScheduled")
        ]
        status = {"status": {"phase": "Running", "conditions": conditions, "podIP": "10.0.0.1"}}
        code, body = side.request("PATCH", f"{PODS}/{name}/status", status, content_type=MERGE)
        assert code == 200, body

    side.run_pod = run_pod
    try:
        yield side
    finally:
        fake.stop()


def _agent_pod(real: RealCluster, node: str) -> Json:
    """The agent DaemonSet's pod on `node`, as the real DaemonSet controller made it and kwok runs it: the
    agent's token is bound to it, so the node-name claim is the server's own."""
    query = f"labelSelector=app.kubernetes.io/component%3Dagent&fieldSelector=spec.nodeName%3D{node}"

    def running() -> Json | None:
        status, pods = real.request("GET", f"/api/v1/namespaces/spotd/pods?{query}")
        found = [p for p in pods["items"] if (p.get("status") or {}).get("phase") == "Running"] if status == 200 else []
        return found[0] if found else None

    return dict(wait_for(running, f"the agent's pod on {node}"))


@pytest.fixture(scope="module")
def real_side(real_cluster: RealCluster) -> Side:
    real = real_cluster
    if real.request("GET", f"/api/v1/namespaces/{NS}")[0] == 404:
        status, body = real.request("POST", "/api/v1/namespaces", _namespace(NS))
        assert status == 201, body
    for name, kubelet in ((NODE, True), (OTHER_NODE, True), (DEAD_NODE, False)):
        if real.request("GET", f"/api/v1/nodes/{name}")[0] == 404:
            status, body = real.request("POST", "/api/v1/nodes", _node(name, kubelet))
            assert status == 201, body
    tokens = {
        "admin": real.tokens["admin"],
        "agent": real.service_account_token("spotd", "spotd-agent", bound_pod=_agent_pod(real, NODE)),
        "controller": real.service_account_token("spotd", "spotd-controller"),
    }
    side = Side("real", real.url, real.ca_file, tokens, run_pod=lambda name: None)

    def run_pod(name: str) -> None:
        def running() -> bool:
            pod = side.get(f"{PODS}/{name}") or {}
            conditions = (pod.get("status") or {}).get("conditions") or []
            return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

        wait_for(running, f"kwok to run {name}")

    side.run_pod = run_pod
    # deploy/'s admission policies hold a moment after they are applied: wait for the agent's refusal
    wait_for(
        lambda: side.request(
            "PATCH", f"/api/v1/nodes/{OTHER_NODE}?dryRun=All", {"spec": {"unschedulable": True}}, who="agent",
            content_type=MERGE,
        )[0] in (403, 422),  # Invalid, or Forbidden when the policy gives that reason
        "deploy/'s admission policy",
    )  # fmt: skip
    return side


# ---- normalising what the servers answer -----------------------------------------------------------------

# Dropped from every object: what a server assigns by itself (identities, versions, times, field managers).
_METADATA_DROPPED = ("uid", "resourceVersion", "creationTimestamp", "managedFields", "generation", "selfLink")
# Dropped from a Pod's spec: what kube-apiserver's defaulting and admission add (SetDefaults_PodSpec and
# SetDefaults_Container, the ServiceAccount plugin's token volume and mounts, DefaultTolerationSeconds'
# not-ready/unreachable tolerations) and the fake does not model. spotd reads none of them: it reads a pod's
# nodeName, priority, priorityClassName, owner, labels, annotations, container resources, volumes it names
# (emptyDir, by its own pods only), terminationGracePeriodSeconds and conditions.
_POD_SPEC_DEFAULTED = (
    "dnsPolicy", "enableServiceLinks", "schedulerName", "securityContext", "serviceAccount", "serviceAccountName",
    "tolerations", "volumes", "restartPolicy",
)  # fmt: skip
_CONTAINER_DEFAULTED = ("imagePullPolicy", "terminationMessagePath", "terminationMessagePolicy", "volumeMounts")
_CONDITION_TIMES = ("lastTransitionTime", "lastProbeTime", "lastHeartbeatTime", "lastUpdateTime")


def normalise(obj: Any) -> Any:
    """An object as the comparison sees it: server-assigned fields dropped, a deletionTimestamp as "<set>",
    a Pod's status reduced to its phase and its DisruptionTarget condition (the rest of a pod's status is the
    kubelet's: kwok's on one side, the test's own writes on the other), a Node's status dropped (kwok's
    heartbeats), a PDB's status without its observedGeneration and condition times."""
    if not isinstance(obj, dict):
        return obj
    out = copy.deepcopy(obj)
    meta = out.get("metadata") or {}
    for key in _METADATA_DROPPED:
        meta.pop(key, None)
    if "deletionTimestamp" in meta:
        meta["deletionTimestamp"] = "<set>"
    for key in ("annotations", "labels", "finalizers"):
        if meta.get(key) == {} or meta.get(key) == []:
            meta.pop(key)
    kind = out.get("kind")
    if kind == "Pod":
        spec = out.get("spec") or {}
        for key in _POD_SPEC_DEFAULTED:
            spec.pop(key, None)
        for container in spec.get("containers") or []:
            for key in _CONTAINER_DEFAULTED:
                container.pop(key, None)
            if container.get("resources") == {}:
                container.pop("resources")  # the real server writes an empty one
        status = out.get("status") or {}
        target = [
            {k: v for k, v in c.items() if k not in _CONDITION_TIMES}
            for c in status.get("conditions") or []
            if c.get("type") == "DisruptionTarget"
        ]
        out["status"] = {"disruptionTarget": target}
    elif kind == "Node":
        out.pop("status", None)
    elif kind == "PodDisruptionBudget":
        status = out.get("status") or {}
        status.pop("observedGeneration", None)
        status["conditions"] = [
            {k: v for k, v in c.items() if k not in (*_CONDITION_TIMES, "observedGeneration")}
            for c in status.get("conditions") or []
        ]
    elif kind == "Namespace":
        out.pop("spec", None)  # spec.finalizers: ["kubernetes"], the namespace controller's
    return out


def answer(status: int, body: Any) -> Json:
    """A response as compared: the code, and for a Status its reason, message and details (less the uid)."""
    if isinstance(body, dict) and body.get("kind") == "Status":
        details = {k: v for k, v in (body.get("details") or {}).items() if k != "uid"}
        return {"code": status, "reason": body.get("reason"), "message": body.get("message"), "details": details}
    return {"code": status, "object": normalise(body)}


# ---- building blocks --------------------------------------------------------------------------------------


def pod(name: str, node: str | None = NODE, *, labels: dict[str, str] | None = None, **spec: Any) -> Json:
    container: Json = {"name": "c", "image": "registry.k8s.io/pause:3.10"}
    if "resources" in spec:
        container["resources"] = spec.pop("resources")
    body: Json = {"terminationGracePeriodSeconds": 30, "containers": [container], **spec}
    if node:
        body["nodeName"] = node
    meta: Json = {"name": name, "namespace": NS, "labels": labels or {"app": name}}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": body}


def create_running(side: Side, *pods: Json) -> None:
    for obj in pods:
        status, body = side.request("POST", PODS, obj)
        assert status == 201, (side.name, body)
    for obj in pods:
        side.run_pod(obj["metadata"]["name"])


def eviction(name: str) -> Json:
    return {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": name, "namespace": NS}}


def evict(side: Side, name: str, who: str = "admin") -> Json:
    return answer(*side.request("POST", f"{PODS}/{name}/eviction", eviction(name), who=who))


def evict_watched(side: Side, name: str, who: str = "admin") -> Json:
    """An eviction, followed by a watch of the pod from its current version to its DELETED event (or its
    marking, when the eviction is refused): the answer, and the DisruptionTarget condition the pod was given
    (the pod goes at once on the real side, where kwok ends the deletion)."""
    current = side.get(f"{PODS}/{name}") or {}
    selector = f"metadata.name={name}"
    events: list[list[tuple[str, Json]]] = []
    watcher = threading.Thread(
        target=lambda: events.append(
            side.watch(PODS, current["metadata"]["resourceVersion"], lambda t, o: t == "DELETED", selector)
        )
    )
    watcher.start()
    granted = evict(side, name, who)
    if granted["code"] != 201:
        side.request(
            "PATCH", f"{PODS}/{name}", {"metadata": {"labels": {"diff.spotd.io/wake": "1"}}}, content_type=MERGE
        )
        side.request("DELETE", f"{PODS}/{name}?gracePeriodSeconds=0")  # ends the watch
    watcher.join(120)
    assert events, "the watch ended without the pod's DELETED event"
    targets = [c for _, o in events[0] for c in normalise(o)["status"]["disruptionTarget"]]
    return {"eviction": granted, "disruptionTarget": targets[:1], "last": events[0][-1][0]}


def create_pdb(side: Side, name: str, app: str, synced: bool = True, **spec: Any) -> Json:
    pdb = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"selector": {"matchLabels": {"app": app}}, **spec},
    }
    status, body = side.request("POST", PDBS, pdb)
    assert status == 201, (side.name, body)
    return settled_pdb(side, name, synced=synced)


def settled_pdb(side: Side, name: str, *, synced: bool = True, **expect: Any) -> Json:
    """The budget once its controller has seen its current generation (and `expect`ed status values); a
    budget whose sync fails (synced=False) keeps its observedGeneration: then once it has a condition."""

    def settled() -> Json | None:
        pdb = side.get(f"{PDBS}/{name}") or {}
        status = pdb.get("status") or {}
        seen = status.get("observedGeneration") == pdb["metadata"].get("generation") or not synced
        if not seen or not status.get("conditions"):
            return None
        if any(status.get(k) != v for k, v in expect.items()):
            return None
        return pdb

    return dict(wait_for(settled, f"{side.name}: the status of budget {name}"))


def gone(side: Side, path: str) -> bool:
    return side.request("GET", path)[0] == 404


def pod_and_pdb(
    side: Side, prefix: str, count: int, owner: Json | None = None, synced: bool = True, **pdb_spec: Any
) -> Json:
    """`count` running pods labelled app=<prefix> (owned by `owner` when given) under a budget of that name."""
    pods = []
    for i in range(count):
        obj = pod(f"{prefix}-{i}", labels={"app": prefix})
        if owner is not None:
            obj["metadata"]["ownerReferences"] = [owner]
        pods.append(obj)
    create_running(side, *pods)
    return create_pdb(side, prefix, prefix, synced, **pdb_spec)


# ---- the scenarios ---------------------------------------------------------------------------------------
# Each takes a side and returns what is compared (JSON-able); steps that differ only in how the state comes
# about (kwok's kubelet or the test's status write, a real Job or an owner reference to one) are in Side.


def gpu_request_without_limit(side: Side) -> Json:
    """controller/placeholders.py's old output: requests only (c3fdeb8). 422 Invalid."""
    obj = pod("gpu-requests-only", None, resources={"requests": {"cpu": "100m", "nvidia.com/gpu": "1"}})
    return answer(*side.request("POST", PODS, obj))


def limits_default_requests(side: Side) -> Json:
    """A container with limits only is given equal requests (the placeholder now relies on it)."""
    obj = pod("gpu-limits-only", None, resources={"limits": {"cpu": "1", "nvidia.com/gpu": "1"}})
    created = answer(*side.request("POST", PODS, obj))
    side.request("DELETE", f"{PODS}/gpu-limits-only")
    return created


def pdb_bare_pods_max_unavailable(side: Side) -> Json:
    """maxUnavailable over pods with no controller: nothing expected, nothing allowed, every eviction 429."""
    pdb = pod_and_pdb(side, "bare-maxun", 2, maxUnavailable=1)
    return {"pdb": normalise(pdb)["status"], "eviction": evict(side, "bare-maxun-0")}


def pdb_bare_pods_percentage(side: Side) -> Json:
    pdb = pod_and_pdb(side, "bare-pct", 2, minAvailable="50%")
    return {"pdb": normalise(pdb)["status"], "eviction": evict(side, "bare-pct-0")}


def pdb_job_pods_max_unavailable(side: Side) -> Json:
    """maxUnavailable over a Job's pods: a Job has no /scale, so the controller fails safe (SyncFailed).
    The real side's pods are the real Job controller's (kwok completes them, so no eviction is compared);
    the fake serves no Jobs: its pods carry an owner reference to one."""
    if side.name == "real":
        job = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "job-maxun", "namespace": NS},
            "spec": {
                "parallelism": 1,
                "completions": 1,
                "template": {
                    "metadata": {"labels": {"app": "job-maxun"}},
                    "spec": {**pod("x")["spec"], "restartPolicy": "Never"},
                },
            },
        }
        status, body = side.request("POST", f"/apis/batch/v1/namespaces/{NS}/jobs", job)
        assert status == 201, body

        def has_pod() -> bool:
            found = side.get(f"{PODS}?labelSelector=app%3Djob-maxun") or {}
            return bool(found.get("items"))

        wait_for(has_pod, "the Job's pod")
        pdb = create_pdb(side, "job-maxun", "job-maxun", synced=False, maxUnavailable=1)
    else:
        owner = {"apiVersion": "batch/v1", "kind": "Job", "name": "job-maxun", "uid": "uid-job", "controller": True}
        pdb = pod_and_pdb(side, "job-maxun", 1, owner=owner, synced=False, maxUnavailable=1)
    status = normalise(pdb)["status"]
    return {"disruptionsAllowed": status.get("disruptionsAllowed"), "conditions": status["conditions"]}


def pdb_min_available_integer(side: Side) -> Json:
    """An integer minAvailable counts the pods: one of two may go; the evicted pod gets DisruptionTarget
    (EvictionByEvictionAPI) and a deletionTimestamp; a second eviction is 429 until the first is replaced."""
    pod_and_pdb(side, "minint", 2, minAvailable=1)
    pdb = settled_pdb(side, "minint", disruptionsAllowed=1)
    first = evict_watched(side, "minint-0")
    after = settled_pdb(side, "minint", currentHealthy=1, expectedPods=1)
    second = evict(side, "minint-1")
    return {"pdb": normalise(pdb)["status"], "first": first, "after": normalise(after)["status"], "second": second}


def concurrent_evictions_one_pdb(side: Side) -> Json:
    """Six evictions at once against one budget allowing one: exactly one is granted (the real server
    serialises them on the budget's status: the others 429, or 409 after its retries)."""
    pod_and_pdb(side, "burst", 6, minAvailable=5)
    settled_pdb(side, "burst", disruptionsAllowed=1)
    with ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(lambda i: evict(side, f"burst-{i}")["code"], range(6)))
    # a 409 is the real server's answer when its retries on the budget's status run out: refused all the same
    return {"granted": codes.count(201), "refused": sorted({429 if c == 409 else c for c in codes if c != 201})}


def eviction_without_pdb_by_agent(side: Side) -> Json:
    """The agent's eviction of a pod on its node, no budget: 201 Success; the pod is marked, then deleted."""
    create_running(side, pod("evict-me"))
    return evict_watched(side, "evict-me", who="agent")


def finalizer_holds_terminating_pod(side: Side) -> Json:
    """A pod with a finalizer, deleted with grace 0 on a node without a kubelet: it stays, marked; the update
    removing the finalizer deletes it."""
    obj = pod("held", DEAD_NODE)
    obj["metadata"]["finalizers"] = ["spotd.io/test-hold"]
    status, body = side.request("POST", PODS, obj)
    assert status == 201, body
    deleted = answer(*side.request("DELETE", f"{PODS}/held?gracePeriodSeconds=0"))
    held = side.get(f"{PODS}/held")
    released = side.request("PATCH", f"{PODS}/held", {"metadata": {"finalizers": None}}, content_type=MERGE)[0]
    wait_for(lambda: gone(side, f"{PODS}/held"), "the released pod to go")
    return {"delete": deleted, "held": normalise(held), "release": released}


def graceful_delete_on_dead_node(side: Side) -> Json:
    """A graceful delete on a node without a kubelet: the pod stays Terminating (nothing ends it)."""
    status, body = side.request("POST", PODS, pod("stuck", DEAD_NODE))
    assert status == 201, body
    deleted = answer(*side.request("DELETE", f"{PODS}/stuck"))
    return {"delete": deleted, "after": normalise(side.get(f"{PODS}/stuck"))}


def priority_from_class(side: Side) -> Json:
    """Priority admission: spotd-placeholder (deploy/) gives -5 and its preemptionPolicy."""
    obj = pod("prio", None, priorityClassName="spotd-placeholder")
    created = answer(*side.request("POST", PODS, obj))
    side.request("DELETE", f"{PODS}/prio")
    spec = created.get("object", {}).get("spec", {})
    return {"code": created["code"], "priority": spec.get("priority"), "policy": spec.get("preemptionPolicy")}


def priority_unknown_class(side: Side) -> Json:
    return answer(*side.request("POST", PODS, pod("prio-unknown", None, priorityClassName="diff-no-such-class")))


def create_in_terminating_namespace(side: Side) -> Json:
    """A namespace deleted while a ConfigMap's finalizer holds its content stays Terminating (the namespace
    controller deletes what is in it, then waits) and refuses new pods (403 NamespaceTerminating); it goes
    once the finalizer is taken off."""
    ns = "diff-terminating"
    status, body = side.request("POST", "/api/v1/namespaces", _namespace(ns))
    assert status == 201, body
    holder = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "holder", "namespace": ns, "finalizers": ["spotd.io/test-hold"]},
    }
    held = f"/api/v1/namespaces/{ns}/configmaps/holder"
    assert side.request("POST", f"/api/v1/namespaces/{ns}/configmaps", holder)[0] == 201
    deleted = answer(*side.request("DELETE", f"/api/v1/namespaces/{ns}"))
    marked = wait_for(
        lambda: (side.get(held) or {}).get("metadata", {}).get("deletionTimestamp"), "the content deleted"
    )
    late = {**pod("late", None), "metadata": {"name": "late", "namespace": ns}}
    refused = answer(*side.request("POST", f"/api/v1/namespaces/{ns}/pods", late))
    terminating = normalise(side.get(f"/api/v1/namespaces/{ns}"))
    # the real namespace controller's progress conditions come when its pass has run (a race with this read;
    # seen in CI): the fake writes none, and spotd reads none; the phase is what is compared
    terminating.get("status", {}).pop("conditions", None)
    side.request("PATCH", held, {"metadata": {"finalizers": None}}, content_type=MERGE)
    wait_for(lambda: gone(side, f"/api/v1/namespaces/{ns}"), "the namespace to go")
    return {"delete": deleted, "content marked": bool(marked), "create": refused, "namespace": terminating}


def cordon_taint(side: Side) -> Json:
    """The controller's cordon (merge patch spec.unschedulable): the node lifecycle controller then adds the
    node.kubernetes.io/unschedulable:NoSchedule taint, a second change of the Node spotd has to expect."""
    node = f"/api/v1/nodes/{OTHER_NODE}"
    cordoned = side.request("PATCH", node, {"spec": {"unschedulable": True}}, who="controller", content_type=MERGE)
    assert cordoned[0] == 200, cordoned

    def tainted() -> list[Json] | None:
        taints = ((side.get(node) or {}).get("spec") or {}).get("taints") or []
        found = [{k: v for k, v in t.items() if k != "timeAdded"} for t in taints if "unschedulable" in t["key"]]
        return found or None

    try:
        taints: Any = wait_for(tainted, "the unschedulable taint", timeout=30)
    except AssertionError:
        taints = "no taint"
    uncordoned = side.request("PATCH", node, {"spec": {"unschedulable": None}}, who="controller", content_type=MERGE)
    assert uncordoned[0] == 200, uncordoned
    return {"taints": taints}


def conditional_patch_conflict(side: Side) -> Json:
    """A merge patch carrying a stale metadata.resourceVersion: 409 Conflict, as the controller's cordon."""
    node = f"/api/v1/nodes/{OTHER_NODE}"
    current = side.get(node) or {}
    rv = current["metadata"]["resourceVersion"]
    side.request("PATCH", node, {"metadata": {"labels": {"diff.spotd.io/touched": "1"}}}, content_type=MERGE)
    patch = {"metadata": {"resourceVersion": rv}, "spec": {"unschedulable": True}}
    return answer(*side.request("PATCH", node, patch, who="controller", content_type=MERGE))


def merge_patch_null_removes(side: Side) -> Json:
    node = f"/api/v1/nodes/{OTHER_NODE}"
    side.request(
        "PATCH", node, {"metadata": {"labels": {"diff.spotd.io/a": "1", "diff.spotd.io/b": "2"}}}, content_type=MERGE
    )
    status, body = side.request("PATCH", node, {"metadata": {"labels": {"diff.spotd.io/a": None}}}, content_type=MERGE)
    labels = {k: v for k, v in body["metadata"]["labels"].items() if k.startswith("diff.spotd.io/")}
    return {"code": status, "labels": labels}


def rbac_denials(side: Side) -> Json:
    """What spotd's identities are refused, in the real server's words."""
    return {
        "agent get pod": answer(*side.request("GET", f"{PODS}/anything", who="agent")),
        "agent list nodes": answer(*side.request("GET", "/api/v1/nodes", who="agent")),
        "agent delete pod": answer(*side.request("DELETE", f"{PODS}/anything", who="agent")),
        "controller delete pod": answer(*side.request("DELETE", f"{PODS}/anything", who="controller")),
        "controller list secrets": answer(*side.request("GET", f"/api/v1/namespaces/{NS}/secrets", who="controller")),
    }


def agent_cordons_another_node(side: Side) -> Json:
    """deploy/admission-policy.yaml holds the agent to the node its token names."""
    patch = {"spec": {"unschedulable": True}}
    return answer(
        *side.request("PATCH", f"/api/v1/nodes/{OTHER_NODE}?dryRun=All", patch, who="agent", content_type=MERGE)
    )


def watch_sees_delete(side: Side) -> Json:
    """A pod watch from the list's resourceVersion sees a graceful delete as MODIFIED (marked) ... DELETED."""
    create_running(side, pod("watched"))
    listed = side.get(f"{PODS}?fieldSelector=metadata.name%3Dwatched") or {}
    rv = listed["metadata"]["resourceVersion"]
    done: list[list[tuple[str, Json]]] = []
    watcher = threading.Thread(
        target=lambda: done.append(
            side.watch(PODS, rv, lambda t, o: t == "DELETED" and o["metadata"]["name"] == "watched")
        )
    )
    watcher.start()
    assert side.request("DELETE", f"{PODS}/watched")[0] == 200
    watcher.join(120)
    assert done, "the watch ended without the DELETED event"
    mine = [(t, o) for t, o in done[0] if o["metadata"]["name"] == "watched"]
    marked = [t for t, o in mine if o["metadata"].get("deletionTimestamp")]
    return {"first marked": marked[0] if marked else None, "last": mine[-1][0]}


def agent_lists_its_nodes_pods(side: Side) -> Json:
    """The agent's list of the pods on its node (field selector spec.nodeName, as drain/executor.py asks)."""
    create_running(side, pod("listed"), pod("listed-elsewhere", OTHER_NODE, labels={"app": "listed"}))
    query = f"fieldSelector=spec.nodeName%3D{NODE}&labelSelector=app%3Dlisted"
    status, body = side.request("GET", f"/api/v1/pods?{query}", who="agent")
    names = sorted(p["metadata"]["name"] for p in body.get("items", [])) if status == 200 else body
    return {"code": status, "kind": body.get("kind"), "names": names}


def controller_event_on_a_node(side: Side) -> Json:
    """A core/v1 Event about a Node as spotd/kube/events.py writes it (generateName, in default), created and
    listed back by the controller with its field selector (reason, involvedObject.kind)."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    event = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{NODE}.", "namespace": "default"},
        "involvedObject": {"kind": "Node", "name": NODE, "apiVersion": "v1"},
        "reason": "SpotdDiffTest",
        "message": "a differential test's event",
        "type": "Normal",
        "source": {"component": "spotd-controller", "host": "diff"},
        "reportingComponent": "spotd-controller",
        "reportingInstance": "diff",
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }
    created, body = side.request("POST", "/api/v1/namespaces/default/events", event, who="controller")
    query = "fieldSelector=reason%3DSpotdDiffTest%2CinvolvedObject.kind%3DNode"
    listed, found = side.request("GET", f"/api/v1/namespaces/default/events?{query}", who="controller")
    kept = ("involvedObject", "reason", "message", "type", "source", "reportingComponent", "count")
    items = [{k: e.get(k) for k in kept} for e in found.get("items", [])] if listed == 200 else found
    return {
        "create": created,
        "name": body["metadata"]["name"].startswith(f"{NODE}.") if created == 201 else body,
        "list": listed,
        "items": items,
    }


@dataclass(frozen=True)
class Scenario:
    name: str
    run: Callable[[Side], Json]
    fake_divergence: Any = None  # what the fake answers instead, when out of its scope (docs/testing.md)


SCENARIOS = [
    Scenario("gpu request without limit", gpu_request_without_limit),
    Scenario("limits default requests", limits_default_requests),
    Scenario("pdb maxUnavailable over bare pods", pdb_bare_pods_max_unavailable),
    Scenario("pdb percentage over bare pods", pdb_bare_pods_percentage),
    Scenario("pdb maxUnavailable over job pods", pdb_job_pods_max_unavailable),
    Scenario("pdb integer minAvailable, eviction, DisruptionTarget", pdb_min_available_integer),
    Scenario("concurrent evictions against one pdb", concurrent_evictions_one_pdb),
    Scenario("agent's eviction of a pod on its node", eviction_without_pdb_by_agent),
    Scenario("finalizer holds a terminating pod", finalizer_holds_terminating_pod),
    Scenario("graceful delete on a node without kubelet", graceful_delete_on_dead_node),
    Scenario("priority from the class", priority_from_class),
    Scenario("unknown priority class", priority_unknown_class),
    Scenario("create in a terminating namespace", create_in_terminating_namespace),
    Scenario("cordon and the unschedulable taint", cordon_taint),
    Scenario("resourceVersion-conditional patch", conditional_patch_conflict),
    Scenario("merge patch null removal", merge_patch_null_removes),
    Scenario("rbac denials", rbac_denials),
    Scenario("agent cordons another node", agent_cordons_another_node),
    Scenario("watch sees a delete", watch_sees_delete),
    Scenario("agent lists its node's pods", agent_lists_its_nodes_pods),
    Scenario("controller's event on a node", controller_event_on_a_node),
]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_the_fake_answers_as_the_real_server(scenario: Scenario, fake_side: Side, real_side: Side) -> None:
    real = scenario.run(real_side)
    fake = scenario.run(fake_side)
    if scenario.fake_divergence is None:
        assert fake == real, _diff(fake, real)
    else:
        # a documented divergence: still exactly this, and the real server still differs
        assert fake == scenario.fake_divergence, _diff(fake, scenario.fake_divergence)
        assert real != fake


def _diff(fake: Any, real: Any) -> str:
    """A unified diff of the two outcomes as sorted JSON (- fake, + real)."""
    import difflib

    lines = [json.dumps(x, indent=1, sort_keys=True, default=str).splitlines() for x in (fake, real)]
    return "\n" + "\n".join(difflib.unified_diff(lines[0], lines[1], "fake", "real", lineterm=""))
