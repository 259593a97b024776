"""The agent end to end on the real control plane (issue 18): `spotd agent` as a subprocess, as its real
identity (a TokenRequest token bound to its DaemonSet pod on its kwok node, so the node-name claim is the
server's), under deploy/'s RBAC and admission policies, with a fake IMDS; the real disruption controller,
ReplicaSets, Jobs, scheduler and Eviction API answer it.

The nodes here are run by a kwok of this file's own (`kwok.x-k8s.io/node=real-agent`), not the session's:
kwok's default pod stages complete every Job's pod at once (so no Job pod would be running to drain) and
strip finalizers when a pod is deleted (a kubelet never does: a finalizer holds a pod Terminating). Ours has
kwok's own pod-ready stage and a pod-delete that only deletes, as a kubelet's final DELETE does. Each test
has its own namespace and nodes (a Spot node and a spare that takes the replacements), both tainted for
this file alone, so no other file's pods land on them and ours land nowhere else."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import ssl
import subprocess
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from spotd.sim import builders
from spotd.sim.imds import FakeImds
from tests.agent_harness import AgentProcess, eventually
from tests.realcluster import KWOK_ANNOTATION, RealCluster
from tests.test_agent import maintenance_event

pytestmark = pytest.mark.timeout(420)  # the session's control plane may start here; each wait has its own limit

KWOK_VALUE = "real-agent"  # the nodes our kwok runs
ISOLATION = "real-agent.spotd.io/test"  # label and taint of a test's nodes; its pods select and tolerate them
TAINT = "spotd.io/interruption"
PAUSE = [{"name": "c", "image": "registry.k8s.io/pause:3.10"}]

# kwok v0.7.0's kustomize/stage/pod/fast/pod-ready.yaml as it is, and its pod-delete without
# `finalizers: {empty: true}`: the pod is deleted (grace 0, as a kubelet ends it) and a finalizer holds it.
_KWOK_CONFIG = """\
kind: KwokConfiguration
apiVersion: config.kwok.x-k8s.io/v1alpha1
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: pod-ready
spec:
  resourceRef:
    apiGroup: v1
    kind: Pod
  selector:
    matchExpressions:
    - key: '.metadata.deletionTimestamp'
      operator: 'DoesNotExist'
    - key: '.status.podIP'
      operator: 'DoesNotExist'
  next:
    statusTemplate: |
      {{ $now := Now }}

      conditions:
      - lastTransitionTime: {{ $now | Quote }}
        status: "True"
        type: Initialized
      - lastTransitionTime: {{ $now | Quote }}
        status: "True"
        type: Ready
      - lastTransitionTime: {{ $now | Quote }}
        status: "True"
        type: ContainersReady
      {{ range .spec.readinessGates }}
      - lastTransitionTime: {{ $now | Quote }}
        status: "True"
        type: {{ .conditionType | Quote }}
      {{ end }}

      containerStatuses:
      {{ range .spec.containers }}
      - image: {{ .image | Quote }}
        name: {{ .name | Quote }}
        ready: true
        restartCount: 0
        state:
          running:
            startedAt: {{ $now | Quote }}
      {{ end }}

      initContainerStatuses:
      {{ range .spec.initContainers }}
      - image: {{ .image | Quote }}
        name: {{ .name | Quote }}
        ready: true
        restartCount: 0
        {{ if eq .restartPolicy "Always" }}
        started: true
        state:
          running:
            startedAt: {{ $now | Quote }}
        {{ else }}
        state:
          terminated:
            exitCode: 0
            finishedAt: {{ $now | Quote }}
            reason: Completed
            startedAt: {{ $now | Quote }}
        {{ end }}
      {{ end }}

      hostIP: {{ NodeIPWith .spec.nodeName | Quote }}
      podIP: {{ PodIPWith .spec.nodeName ( or .spec.hostNetwork false ) ( or .metadata.uid "" ) \
( or .metadata.name "" ) ( or .metadata.namespace "" ) | Quote }}
      phase: Running
      startTime: {{ $now | Quote }}
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: pod-delete
spec:
  resourceRef:
    apiGroup: v1
    kind: Pod
  selector:
    matchExpressions:
    - key: '.metadata.deletionTimestamp'
      operator: 'Exists'
  next:
    delete: true
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def real(real_cluster: RealCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealCluster]:
    """The session's control plane, with our kwok running the nodes annotated kwok.x-k8s.io/node=real-agent."""
    work = tmp_path_factory.mktemp("real-agent-kwok")
    (work / "kwok.yaml").write_text(_KWOK_CONFIG)
    log = open(work / "kwok.log", "ab")
    kwok = subprocess.Popen(
        [
            str(real_cluster.bin_dir / "kwok"),
            f"--kubeconfig={real_cluster.work / 'admin.kubeconfig'}",
            f"--manage-nodes-with-annotation-selector={KWOK_ANNOTATION}={KWOK_VALUE}",
            "--node-ip=127.0.0.1",
            "--cidr=127.2.0.1/16",  # the session's kwok hands out 127.1.x.x
            f"--server-address=127.0.0.1:{_free_port()}",
            "--node-lease-duration-seconds=10",
            f"--config={work / 'kwok.yaml'}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield real_cluster
    finally:
        kwok.send_signal(signal.SIGTERM)
        try:
            kwok.wait(15)
        except subprocess.TimeoutExpired:
            kwok.kill()
            kwok.wait()
        log.close()


# ---- reading the real server ---------------------------------------------------------------------------


def get(real: RealCluster, path: str) -> dict[str, Any]:
    status, body = real.request("GET", path)
    assert status == 200, body
    return dict(body)


def merge_patch(real: RealCluster, path: str, body: dict[str, Any]) -> None:
    status, answer = real.request("PATCH", path, body, content_type="application/merge-patch+json")
    assert status == 200, answer


def pods_on(real: RealCluster, node: str, namespace: str) -> dict[str, dict[str, Any]]:
    selector = urllib.parse.quote(f"spec.nodeName={node}")
    pods = get(real, f"/api/v1/namespaces/{namespace}/pods?fieldSelector={selector}")["items"]
    return {p["metadata"]["name"]: p for p in pods}


def running(pod: dict[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") == "Running" and not pod["metadata"].get("deletionTimestamp")


def node_events(real: RealCluster, node: str) -> list[dict[str, Any]]:
    selector = urllib.parse.quote(f"involvedObject.kind=Node,involvedObject.name={node}")
    return list(get(real, f"/api/v1/events?fieldSelector={selector}")["items"])


def node_event(real: RealCluster, node: str, reason: str) -> dict[str, Any] | None:
    return next((e for e in node_events(real, node) if e["reason"] == reason), None)


def our_taint(node: dict[str, Any]) -> dict[str, Any] | None:
    return next((t for t in node["spec"].get("taints") or [] if t["key"] == TAINT), None)


def released(node: dict[str, Any]) -> bool:
    return our_taint(node) is None and not node["spec"].get("unschedulable")


def evicted(pod: dict[str, Any]) -> bool:
    """The mark the Eviction API leaves on a pod before it deletes it: DisruptionTarget, EvictionByEvictionAPI."""
    return any(
        c["type"] == "DisruptionTarget" and c["status"] == "True" and c.get("reason") == "EvictionByEvictionAPI"
        for c in (pod.get("status") or {}).get("conditions") or []
    )


class PodWatch:
    """Every watch event of a namespace's pods from its start, read by an asyncio task: the audit trail of how
    each pod went (a pod the agent deleted would go without the eviction's DisruptionTarget condition)."""

    def __init__(self, real: RealCluster, namespace: str) -> None:
        self.events: list[dict[str, Any]] = []
        self._real, self._namespace = real, namespace
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> PodWatch:
        real = self._real
        path = f"/api/v1/namespaces/{self._namespace}/pods"
        version = get(real, path)["metadata"]["resourceVersion"]
        client = httpx.AsyncClient(
            base_url=real.url,
            verify=ssl.create_default_context(cafile=str(real.ca_file)),
            headers={"Authorization": f"Bearer {real.tokens['admin']}"},
            timeout=httpx.Timeout(10, read=None),
        )
        opened = asyncio.get_running_loop().create_future()

        async def read() -> None:
            params = {"watch": "1", "resourceVersion": version, "timeoutSeconds": "900"}
            try:
                async with client, client.stream("GET", path, params=params) as response:
                    opened.set_result(response.status_code)
                    async for line in response.aiter_lines():
                        if line:
                            self.events.append(json.loads(line))
            except Exception as exc:
                if not opened.done():
                    opened.set_exception(exc)
                raise

        self._task = asyncio.create_task(read())
        assert await opened == 200
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    def deleted(self) -> dict[str, dict[str, Any]]:
        """The pods deleted so far, as each was last stored."""
        return {e["object"]["metadata"]["name"]: e["object"] for e in self.events if e["type"] == "DELETED"}


# ---- one test's nodes, workloads and agent ---------------------------------------------------------------


@dataclass
class Rig:
    """A test's namespace, its Spot node (the agent's) and a spare node, both run by our kwok and tainted and
    labelled for this test alone; the spare is cordoned until `open_spare()`, so the workloads start on the
    Spot node and their replacements go to the spare."""

    real: RealCluster
    name: str
    tmp: Path
    agents: list[AgentProcess] = field(default_factory=list)

    @property
    def node(self) -> str:
        return f"{self.name}-spot"

    @property
    def spare(self) -> str:
        return f"{self.name}-spare"

    @property
    def namespace(self) -> str:
        return self.name

    def create(self) -> None:
        real = self.real
        real.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": self.namespace}})
        isolation = {"key": ISOLATION, "value": self.name, "effect": "NoSchedule"}
        for name, capacity in ((self.node, builders.SPOT), (self.spare, builders.ON_DEMAND)):
            node = builders.node(name, capacity, labels={ISOLATION: self.name}, taints=[isolation])
            node["metadata"]["annotations"] = {KWOK_ANNOTATION: KWOK_VALUE}
            node["spec"]["unschedulable"] = name == self.spare
            status, body = real.request("POST", "/api/v1/nodes", node)
            assert status == 201, body
        for name in (self.node, self.spare):
            real.wait_for(lambda name=name: _ready(get(real, f"/api/v1/nodes/{name}")))

    def open_spare(self) -> None:
        merge_patch(self.real, f"/api/v1/nodes/{self.spare}", {"spec": {"unschedulable": None}})

    def pod_spec(self, **extra: Any) -> dict[str, Any]:
        return {
            "nodeSelector": {ISOLATION: self.name},
            "tolerations": [{"key": ISOLATION, "operator": "Equal", "value": self.name, "effect": "NoSchedule"}],
            "terminationGracePeriodSeconds": 5,
            "containers": PAUSE,
            **extra,
        }

    def deployment(self, name: str, replicas: int) -> dict[str, Any]:
        labels = {"app": name}
        return {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": labels},
                "template": {"metadata": {"labels": labels}, "spec": self.pod_spec()},
            },
        }

    def bare_pod(self, name: str, finalizers: list[str] | None = None) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": name, "namespace": self.namespace, "labels": {"app": name}}
        if finalizers:
            meta["finalizers"] = finalizers
        return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": self.pod_spec()}

    def job(self, name: str) -> dict[str, Any]:
        labels = {"app": name}
        return {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": {
                "backoffLimit": 0,
                "template": {"metadata": {"labels": labels}, "spec": self.pod_spec(restartPolicy="Never")},
            },
        }

    def pdb(self, app: str) -> dict[str, Any]:
        return {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": {"name": app, "namespace": self.namespace},
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {"app": app}}},
        }

    def pdb_status(self, app: str) -> dict[str, Any] | None:
        """The PDB's status once the disruption controller has computed it for its current spec."""
        budget = get(self.real, f"/apis/policy/v1/namespaces/{self.namespace}/poddisruptionbudgets/{app}")
        status = budget.get("status") or {}
        computed = status.get("observedGeneration") == budget["metadata"]["generation"] or status.get("conditions")
        return dict(status) if computed else None

    def pods(self) -> dict[str, dict[str, Any]]:
        return pods_on(self.real, self.node, self.namespace)

    def running_pods(self, prefix: str = "") -> list[str]:
        return sorted(n for n, p in self.pods().items() if n.startswith(prefix) and running(p))

    def get_node(self) -> dict[str, Any]:
        return get(self.real, f"/api/v1/nodes/{self.node}")

    def agent_pod(self) -> dict[str, Any]:
        """The DaemonSet's pod on the Spot node, as the real DaemonSet controller made it and our kwok runs it."""
        found: list[dict[str, Any]] = []

        def check() -> bool:
            selector = urllib.parse.quote(f"spec.nodeName={self.node}")
            pods = get(
                self.real,
                "/api/v1/namespaces/spotd/pods?labelSelector=app.kubernetes.io%2Fcomponent%3Dagent"
                f"&fieldSelector={selector}",
            )
            found[:] = [p for p in pods["items"] if running(p)]
            return bool(found)

        self.real.wait_for(check, timeout=90)
        return found[0]

    def start_agent(self, imds: FakeImds, *extra: str) -> AgentProcess:
        """`spotd agent` as deployed: its ServiceAccount's token bound to its DaemonSet pod on the Spot node."""
        pod = self.agent_pod()
        token = self.real.service_account_token("spotd", "spotd-agent", bound_pod=pod)
        kubeconfig = self.real.write_kubeconfig_for(self.tmp / f"{self.name}.kubeconfig", token, namespace="spotd")
        agent = AgentProcess(self.tmp, str(kubeconfig), imds.url, self.node, *extra).start()
        self.agents.append(agent)
        return agent

    def remove(self) -> None:
        for agent in self.agents:
            agent.stop(signal.SIGKILL)
        real = self.real
        for pod in get(real, f"/api/v1/namespaces/{self.namespace}/pods")["items"]:
            if pod["metadata"].get("finalizers"):
                merge_patch(
                    real,
                    f"/api/v1/namespaces/{self.namespace}/pods/{pod['metadata']['name']}",
                    {"metadata": {"finalizers": None}},
                )
        real.request("DELETE", f"/api/v1/namespaces/{self.namespace}")
        for name in (self.node, self.spare):
            real.request("DELETE", f"/api/v1/nodes/{name}")


def _ready(node: dict[str, Any]) -> bool:
    conditions = (node.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


@pytest.fixture
async def imds() -> AsyncIterator[FakeImds]:
    fake = FakeImds()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
def rig(real: RealCluster, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Rig]:
    short = request.node.name.removeprefix("test_").split("_")[0]
    made = Rig(real, f"real-agent-{short}", tmp_path)
    made.create()
    try:
        yield made
    finally:
        made.remove()


def soon(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


def no_pod_deleted_by_the_agent(agent: AgentProcess) -> bool:
    return not (agent.events("pod_deleted") or agent.events("deadline_delete") or agent.events("pod_delete_failed"))


# ---- the tests -------------------------------------------------------------------------------------------


async def test_reclaim_drains_through_the_real_disruption_controller(rig: Rig, imds: FakeImds) -> None:
    """A Spot interruption notice: taint, cordon, then evictions as the real disruption controller allows them:
    a Deployment's pods under maxUnavailable 1 one at a time (each once its replacement runs on the spare);
    a bare pod and a Job's pod under maxUnavailable 1 never (no scalable owner: disruptionsAllowed 0, every
    eviction 429), so they are left at the deadline, named, and never deleted."""
    real = rig.real
    real.apply(
        rig.deployment("web", 3),
        rig.bare_pod("bare"),
        rig.job("batch"),
        rig.pdb("web"),
        rig.pdb("bare"),
        rig.pdb("batch"),
    )
    real.wait_for(lambda: len(rig.running_pods()) == 5, timeout=90)
    # The real disruption controller's answers, before any eviction.
    real.wait_for(lambda: (rig.pdb_status("web") or {}).get("disruptionsAllowed") == 1)
    real.wait_for(lambda: rig.pdb_status("bare") is not None and rig.pdb_status("batch") is not None)
    assert (rig.pdb_status("bare") or {}).get("disruptionsAllowed", 0) == 0
    batch = rig.pdb_status("batch") or {}
    assert batch.get("disruptionsAllowed", 0) == 0
    assert "does not implement the scale subresource" in json.dumps(batch["conditions"])
    web = rig.running_pods("web-")
    bare_job = sorted(set(rig.running_pods()) - set(web))
    assert bare_job[0] == "bare" and bare_job[1].startswith("batch-")
    rig.open_spare()

    async with PodWatch(real, rig.namespace) as watch:
        agent = rig.start_agent(imds, "--safety-margin", "5s")
        await agent.ready(timeout=60)
        imds.set_instance_action("terminate", soon(50))

        taint = await eventually(lambda: our_taint(rig.get_node()), timeout=30)
        assert taint == {"key": TAINT, "value": "spot-itn", "effect": "NoSchedule"}
        await eventually(lambda: rig.get_node()["spec"].get("unschedulable") is True, timeout=30)

        # The Deployment's pods go, one eviction at a time as the budget allows; the others are refused.
        await eventually(lambda: not set(web) & set(rig.pods()), timeout=60)
        incomplete = await eventually(lambda: node_event(real, rig.node, "DrainIncomplete"), timeout=90)
        for name in bare_job:
            assert f"{rig.namespace}/{name}" in incomplete["message"]
        assert sorted(rig.running_pods()) == bare_job  # left, running, not terminating
        await eventually(lambda: agent.events("drain_finished"), timeout=10)
        assert agent.metric("spotd_evictions_total", outcome="evicted") == 3
        assert agent.metric("spotd_evictions_total", outcome="left") == 2
        assert (agent.metric("spotd_evictions_total", outcome="pdb_blocked") or 0) >= 2
        assert not agent.metric("spotd_evictions_total", outcome="forced")
        assert agent.metric("spotd_drain_pods_left") == 2
        assert agent.metric("spotd_drains_total", outcome="incomplete") == 1
        assert agent.events("drain_finished")[-1]["outcome"] == "incomplete"

        # The audit trail: each pod that went was deleted by its eviction, none by the agent.
        await eventually(lambda: set(web) <= set(watch.deleted()), timeout=10)
        gone = watch.deleted()
        assert sorted(gone) == web and all(evicted(gone[name]) for name in web), gone
        assert no_pod_deleted_by_the_agent(agent)
        # The replacements run on the spare; the agent's own DaemonSet pod stays on its node.
        spare = pods_on(real, rig.spare, rig.namespace)
        assert len([n for n, p in spare.items() if n.startswith("web-") and running(p)]) == 3
        assert agent.proc is not None and agent.proc.poll() is None


async def test_maintenance_drains_against_the_windows_start(rig: Rig, imds: FakeImds) -> None:
    """A scheduled maintenance inside the lead time: cordon (no taint), evictions at once with PDBs honoured;
    the pods still refused at NotBefore are named then (not before), the drain goes on after it (each pod goes
    when its budget allows, the pods-left gauge following them out) and never takes the deadline action; the
    event completed, the node is released."""
    real = rig.real
    held = ["bare-a", "bare-b"]  # bare pods under maxUnavailable: disruptionsAllowed 0 until their PDB goes
    real.apply(rig.deployment("web", 2), *(rig.bare_pod(name) for name in held), *(rig.pdb(a) for a in ["web", *held]))
    real.wait_for(lambda: len(rig.running_pods()) == 4, timeout=90)
    real.wait_for(lambda: (rig.pdb_status("web") or {}).get("disruptionsAllowed") == 1)
    real.wait_for(lambda: all(rig.pdb_status(name) is not None for name in held))
    web = rig.running_pods("web-")
    rig.open_spare()

    async with PodWatch(real, rig.namespace) as watch:
        agent = rig.start_agent(imds, "--maintenance-lead-time", "15m", "--safety-margin", "5s")
        await agent.ready(timeout=60)
        not_before = (datetime.now(UTC) + timedelta(seconds=30)).replace(microsecond=0)
        imds.set_scheduled_events([maintenance_event("active", not_before)])

        await eventually(lambda: rig.get_node()["spec"].get("unschedulable") is True, timeout=30)
        assert our_taint(rig.get_node()) is None
        await eventually(lambda: not set(web) & set(rig.pods()), timeout=60)
        incomplete = await eventually(lambda: node_event(real, rig.node, "DrainIncomplete"), timeout=90)
        assert all(f"{rig.namespace}/{name}" in incomplete["message"] for name in held), incomplete["message"]
        said = incomplete.get("eventTime") or incomplete.get("firstTimestamp") or incomplete["lastTimestamp"]
        assert datetime.fromisoformat(said.replace("Z", "+00:00")) >= not_before  # at the window's start
        assert agent.metric("spotd_drain_pods_left") == 2
        assert rig.running_pods() == held

        # Past NotBefore the drain goes on: once a budget allows, its pod goes and the gauge follows it out.
        for left, name in enumerate(held[::-1]):
            path = f"/apis/policy/v1/namespaces/{rig.namespace}/poddisruptionbudgets/{name}"
            status, body = real.request("DELETE", path)
            assert status == 200, body
            await eventually(lambda name=name: name not in rig.pods(), timeout=30)
            await eventually(lambda left=left: agent.metric("spotd_drain_pods_left") == len(held) - 1 - left)
            assert agent.proc is not None and agent.proc.poll() is None
        assert not agent.metric("spotd_evictions_total", outcome="forced")
        assert agent.metric("spotd_evictions_total", outcome="evicted") == 4
        await eventually(lambda: set(web) | set(held) <= set(watch.deleted()), timeout=10)  # the watch follows
        gone = watch.deleted()
        assert sorted(gone) == sorted([*web, *held]) and all(evicted(pod) for pod in gone.values()), gone
        assert no_pod_deleted_by_the_agent(agent)

        imds.set_scheduled_events([maintenance_event("completed", not_before)])
        await eventually(lambda: not rig.get_node()["spec"].get("unschedulable"), timeout=30)
        assert "spotd.io/notice" not in (rig.get_node()["metadata"].get("annotations") or {})
        await eventually(lambda: node_event(real, rig.node, "NoticeReleased"), timeout=15)


async def test_finalizer_held_pod_is_waited_for_and_reported(rig: Rig, imds: FakeImds) -> None:
    """A pod whose eviction is accepted but which a finalizer holds Terminating (as on a real cluster: only the
    finalizer's owner ends it): the agent waits for it until the deadline, names it as left, and never
    deletes it; removing the finalizer then lets it go."""
    real = rig.real
    finalizer = "real-agent.spotd.io/hold"
    real.apply(rig.bare_pod("held", finalizers=[finalizer]))
    real.wait_for(lambda: rig.running_pods() == ["held"], timeout=90)

    agent = rig.start_agent(imds, "--safety-margin", "5s")
    await agent.ready(timeout=60)
    imds.set_instance_action("terminate", soon(25))

    def terminating() -> dict[str, Any] | None:
        pod = rig.pods().get("held")
        return pod if pod and pod["metadata"].get("deletionTimestamp") else None

    held = await eventually(terminating, timeout=30)
    assert evicted(held)  # by its eviction, which was accepted
    incomplete = await eventually(lambda: node_event(real, rig.node, "DrainIncomplete"), timeout=60)
    assert f"{rig.namespace}/held" in incomplete["message"]
    await eventually(lambda: agent.events("drain_finished"), timeout=10)
    assert agent.metric("spotd_drain_pods_left") == 1
    assert agent.metric("spotd_evictions_total", outcome="evicted") == 1
    assert not agent.metric("spotd_evictions_total", outcome="forced")
    assert no_pod_deleted_by_the_agent(agent)
    still = rig.pods()["held"]  # still there, still held, by the same finalizer
    assert still["metadata"]["uid"] == held["metadata"]["uid"] and still["metadata"]["finalizers"] == [finalizer]

    merge_patch(real, f"/api/v1/namespaces/{rig.namespace}/pods/held", {"metadata": {"finalizers": None}})
    await eventually(lambda: "held" not in rig.pods(), timeout=30)


async def test_rehearsal_request_through_the_api_server(rig: Rig, imds: FakeImds) -> None:
    """A rehearsal as `spotd simulate-reclaim` gives it on a real cluster: the operator's ConfigMap labelled
    spotd.io/rehearsal in spotd's namespace, which the agent watches with its own RBAC; it is a notice with
    source simulation (taint, cordon, evictions), and withdrawing it mid-drain releases the node."""
    real = rig.real
    real.apply(rig.deployment("web", 2), rig.bare_pod("bare"), rig.pdb("web"), rig.pdb("bare"))
    real.wait_for(lambda: len(rig.running_pods()) == 3, timeout=90)
    real.wait_for(lambda: (rig.pdb_status("web") or {}).get("disruptionsAllowed") == 1)
    web = rig.running_pods("web-")
    rig.open_spare()

    agent = rig.start_agent(imds)
    await agent.ready(timeout=60)
    request = f"{rig.name}-request"
    deadline = soon(120).strftime("%Y-%m-%dT%H:%M:%SZ")
    real.apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": request, "namespace": "spotd", "labels": {"spotd.io/rehearsal": "true"}},
            "data": {"nodes": rig.node, "kind": "spot-itn", "deadline": deadline},
        }
    )
    try:
        await eventually(lambda: our_taint(rig.get_node()), timeout=30)
        notice = json.loads(rig.get_node()["metadata"]["annotations"]["spotd.io/notice"])
        assert notice["source"] == "simulation" and notice["kind"] == "spot-itn"
        await eventually(lambda: rig.get_node()["spec"].get("unschedulable") is True, timeout=30)
        assert agent.metric("spotd_notices_total", kind="spot-itn", source="simulation") == 1
        await eventually(lambda: not set(web) & set(rig.pods()), timeout=60)
        await eventually(lambda: (agent.metric("spotd_evictions_total", outcome="pdb_blocked") or 0) >= 1, timeout=30)
        assert "bare" in rig.running_pods()  # the drain is still going on
    finally:
        real.request("DELETE", f"/api/v1/namespaces/spotd/configmaps/{request}")
    await eventually(lambda: released(rig.get_node()), timeout=30)
    await eventually(lambda: node_event(real, rig.node, "NoticeReleased"), timeout=15)
    assert "bare" in rig.running_pods()
    assert no_pod_deleted_by_the_agent(agent)
