"""The embedded cluster behind `spotd simulate-reclaim` with no kubeconfig: a FakeApiServer filled with
Spot and on-demand nodes and a realistic mix of workloads, the controllers that make evicted pods come back
(scheduler with preemption, ReplicaSet, Deployment, StatefulSet and DaemonSet behaviour, a kubelet that
marks pods Ready), one FakeImds per node, and the real agent for every node in the same event loop.

Pods declare how long they take to start and to stop (annotations); `time_scale` multiplies both, so a
rehearsal plays out in seconds while the notice deadline stays in real time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

from spotd.sim.imds import FakeImds
from spotd.sim.kubeapi import STOP_SECONDS_ANNOTATION, ApiError, FakeApiServer

Obj = dict[str, Any]
START_SECONDS_ANNOTATION = "sim.spotd.io/start-seconds"
CAPACITY_LABEL = "eks.amazonaws.com/capacityType"
ZONES = ("us-east-1a", "us-east-1b", "us-east-1c")
SPOT_TYPES = ("m5.xlarge", "m5a.xlarge", "m6i.xlarge", "m5d.xlarge")
PRIORITY_CLASSES = {"system-node-critical": 2000001000, "critical": 100000, "default": 0, "overprovisioning": -10}


@dataclass(frozen=True)
class ClusterSpec:
    spot_nodes: int = 30
    on_demand_nodes: int = 3
    pods_per_node: int = 6
    seed: int = 1
    time_scale: float = 0.25


@dataclass(frozen=True)
class Workload:
    """One workload of the mix: share of the cluster's pods, requests, priority and timings (unscaled)."""

    namespace: str
    kind: str  # Deployment | StatefulSet | DaemonSet
    name: str
    share: float  # of spec.pods_per_node * nodes; DaemonSets ignore it
    cpu_m: int
    mem_mi: int
    priority_class: str = "default"
    pdb: dict[str, Any] | None = None
    start_seconds: float = 3.0
    stop_seconds: float = 2.0
    grace: int = 30
    min_replicas: int = 1


MIX = (
    Workload("shop", "Deployment", "web", 0.33, 250, 256, pdb={"maxUnavailable": "20%"}, start_seconds=3),
    Workload("shop", "Deployment", "api", 0.2, 500, 512, "critical", {"maxUnavailable": "25%"}, 5, 3),
    Workload("shop", "Deployment", "checkout", 0.04, 500, 512, "critical", {"maxUnavailable": 1}, 4, 2, min_replicas=3),
    Workload("batch", "Deployment", "worker", 0.2, 500, 1024, start_seconds=2, stop_seconds=5),
    Workload("data", "StatefulSet", "cache", 0.0, 1000, 2048, "critical", {"maxUnavailable": 1}, 8, 10, 60, 3),
    Workload("overprovisioning", "Deployment", "pause", 0.1, 500, 512, "overprovisioning", None, 1, 0, 0),
    Workload("kube-system", "DaemonSet", "kube-proxy", 0, 50, 64, "system-node-critical", None, 1, 1),
    Workload("kube-system", "DaemonSet", "node-exporter", 0, 50, 64, "system-node-critical", None, 1, 1),
)


def add_arguments(p: argparse.ArgumentParser | Any) -> None:
    """The embedded cluster's shape (ignored with --kubeconfig)."""
    from spotd.cli import positive_duration

    def count(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be 0 or more")
        return value

    def scale(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not 0 < value <= 10:
            raise argparse.ArgumentTypeError(f"{text!r} must be in (0, 10]")
        return value

    p.add_argument("--nodes", type=count, default=30, help="embedded: Spot nodes (30); on-demand via --on-demand-nodes")
    p.add_argument("--on-demand-nodes", type=count, default=3, help="embedded: on-demand nodes (3)")
    p.add_argument("--pods-per-node", type=count, default=6, help="embedded: workload pods per node on average (6)")
    p.add_argument("--seed", type=int, default=None, help="random seed: node choice, embedded pod names (1 embedded)")
    p.add_argument(
        "--time-scale",
        type=scale,
        default=0.25,
        help="embedded: multiply pods' start and stop times by this (0.25); the notice stays in real time",
    )
    p.add_argument(
        "--agent-poll-interval", type=positive_duration, default=2.0, help="embedded: agents' IMDS poll (2s)"
    )


# ---- quantities and matching (pure) ---------------------------------------------------------------------


def cpu_millis(text: str | int | None) -> int:
    if text is None:
        return 0
    text = str(text)
    return int(text[:-1]) if text.endswith("m") else int(float(text) * 1000)


def mem_mebibytes(text: str | int | None) -> int:
    if text is None:
        return 0
    text = str(text)
    for suffix, factor in (("Gi", 1024), ("Mi", 1), ("Ki", 1 / 1024)):
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(int(text) / 2**20)


def tolerates(tolerations: Iterable[Obj], taint: Obj) -> bool:
    for t in tolerations:
        if t.get("effect") and t.get("effect") != taint.get("effect"):
            continue
        if t.get("operator") == "Exists" and not t.get("key"):
            return True
        if t.get("key") != taint.get("key"):
            continue
        if t.get("operator") == "Exists" or t.get("value", "") == taint.get("value", ""):
            return True
    return False


def requests_of(pod: Obj) -> tuple[int, int]:
    cpu = mem = 0
    for c in pod.get("spec", {}).get("containers") or []:
        req = (c.get("resources") or {}).get("requests") or {}
        cpu += cpu_millis(req.get("cpu"))
        mem += mem_mebibytes(req.get("memory"))
    return cpu, mem


def is_ready(pod: Obj) -> bool:
    if pod["metadata"].get("deletionTimestamp"):
        return False
    conditions = pod.get("status", {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def controller_of(obj: Obj) -> tuple[str, str] | None:
    for ref in obj["metadata"].get("ownerReferences") or []:
        if ref.get("controller"):
            return ref.get("kind", ""), ref.get("name", "")
    return None


# ---- building the cluster -------------------------------------------------------------------------------


def node_objects(spec: ClusterSpec, rng: random.Random) -> list[Obj]:
    nodes = []
    for i in range(spec.spot_nodes + spec.on_demand_nodes):
        spot = i < spec.spot_nodes
        name = f"spot-{i + 1:02d}" if spot else f"ondemand-{i - spec.spot_nodes + 1:02d}"
        zone = ZONES[i % len(ZONES)]
        instance_type = rng.choice(SPOT_TYPES) if spot else "m5.xlarge"
        instance_id = f"i-0{rng.getrandbits(64):016x}"
        nodes.append(
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "labels": {
                        "kubernetes.io/hostname": name,
                        "kubernetes.io/os": "linux",
                        "node.kubernetes.io/instance-type": instance_type,
                        "topology.kubernetes.io/zone": zone,
                        "topology.kubernetes.io/region": zone[:-1],
                        CAPACITY_LABEL: "SPOT" if spot else "ON_DEMAND",
                        "eks.amazonaws.com/nodegroup": "spot-mixed" if spot else "on-demand",
                    },
                },
                "spec": {"providerID": f"aws:///{zone}/{instance_id}"},
                "status": {
                    "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
                    "allocatable": {"cpu": "3920m", "memory": "15136Mi", "pods": "58"},
                    "capacity": {"cpu": "4", "memory": "16Gi", "pods": "58"},
                    "nodeInfo": {
                        "bootID": f"{rng.getrandbits(128):032x}",
                        "machineID": f"ec2{rng.getrandbits(96):024x}",
                        "systemUUID": f"ec2{rng.getrandbits(96):024x}",
                        "kubeletVersion": "v1.32.0",
                        "kubeProxyVersion": "v1.32.0",
                        "containerRuntimeVersion": "containerd://1.7.22",
                        "kernelVersion": "6.1.112",
                        "osImage": "Amazon Linux 2023",
                        "architecture": "amd64",
                        "operatingSystem": "linux",
                    },
                },
            }
        )
    return nodes


def replicas_of(w: Workload, spec: ClusterSpec) -> int:
    if w.kind == "StatefulSet":
        return w.min_replicas
    total = (spec.spot_nodes + spec.on_demand_nodes) * spec.pods_per_node
    return max(w.min_replicas, round(total * w.share)) if w.share else 0


def pod_template(w: Workload) -> Obj:
    tolerations: list[Obj] = []
    if w.kind == "DaemonSet":
        tolerations = [{"operator": "Exists"}]
    return {
        "metadata": {
            "labels": {"app": w.name},
            "annotations": {
                START_SECONDS_ANNOTATION: str(w.start_seconds),
                STOP_SECONDS_ANNOTATION: str(w.stop_seconds),
            },
        },
        "spec": {
            "priorityClassName": w.priority_class,
            "priority": PRIORITY_CLASSES[w.priority_class],
            "terminationGracePeriodSeconds": w.grace,
            "tolerations": tolerations,
            "containers": [
                {
                    "name": w.name,
                    "image": f"registry.example.com/{w.name}:1.0",
                    "resources": {"requests": {"cpu": f"{w.cpu_m}m", "memory": f"{w.mem_mi}Mi"}},
                }
            ],
        },
    }


def workload_objects(w: Workload, spec: ClusterSpec) -> Obj:
    replicas = replicas_of(w, spec)
    body: Obj = {
        "apiVersion": "apps/v1",
        "kind": w.kind,
        "metadata": {"name": w.name, "namespace": w.namespace, "labels": {"app": w.name}},
        "spec": {"selector": {"matchLabels": {"app": w.name}}, "template": pod_template(w)},
    }
    if w.kind != "DaemonSet":
        body["spec"]["replicas"] = replicas
    if w.kind == "StatefulSet":
        body["spec"]["serviceName"] = w.name
    return body


def owner_ref(obj: Obj) -> Obj:
    meta = obj["metadata"]
    return {
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
    }


class EmbeddedCluster:
    """The objects, the controllers (`run_controllers`) and the per-node IMDS and agents (`run_agents`)."""

    def __init__(self, api: FakeApiServer, spec: ClusterSpec) -> None:
        self.api = api
        self.spec = spec
        self.rng = random.Random(spec.seed)
        self.imds: dict[str, FakeImds] = {}
        self.agents: dict[str, asyncio.Task[None]] = {}
        self.nominated: dict[str, str] = {}  # pod uid -> node its preemption made room on
        self.dirty = asyncio.Event()
        self.passes = 0

    @property
    def store(self) -> Any:
        return self.api.store

    # ---- objects ----
    def populate(self) -> None:
        """Create every object and place the first pods (Running and Ready at once)."""
        for name, value in PRIORITY_CLASSES.items():
            self.api.create(
                {
                    "apiVersion": "scheduling.k8s.io/v1",
                    "kind": "PriorityClass",
                    "metadata": {"name": name},
                    "value": value,
                    "globalDefault": name == "default",
                    "preemptionPolicy": "Never" if value < 0 else "PreemptLowerPriority",
                }
            )
        for node in node_objects(self.spec, self.rng):
            self.api.create(node)
        for ns in sorted({w.namespace for w in MIX}):
            if self.api.get("Namespace", ns) is None:
                self.api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        for w in MIX:
            self.add_workload(w)
        self.reconcile(initial=True)

    def add_workload(self, w: Workload) -> None:
        if replicas_of(w, self.spec) == 0 and w.kind != "DaemonSet":
            return
        created = self.api.create(workload_objects(w, self.spec))
        if w.kind == "Deployment":
            rs = workload_objects(w, self.spec)
            rs["kind"] = "ReplicaSet"
            template_hash = f"{self.rng.getrandbits(40):010x}"
            rs["metadata"]["name"] = f"{w.name}-{template_hash}"
            rs["metadata"]["ownerReferences"] = [owner_ref(created)]
            rs["spec"]["template"]["metadata"]["labels"]["pod-template-hash"] = template_hash
            self.api.create(rs)
        if w.pdb is not None:
            self.api.create(
                {
                    "apiVersion": "policy/v1",
                    "kind": "PodDisruptionBudget",
                    "metadata": {"name": w.name, "namespace": w.namespace},
                    "spec": {**w.pdb, "selector": {"matchLabels": {"app": w.name}}},
                }
            )

    def pod_name(self, prefix: str) -> str:
        return f"{prefix}-" + "".join(self.rng.choices("bcdfghjklmnpqrstvwxz2456789", k=5))

    def new_pod(self, owner: Obj, name: str, node: str | None = None) -> Obj:
        template = owner["spec"]["template"]
        pod: Obj = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": owner["metadata"]["namespace"],
                "labels": dict(template["metadata"].get("labels") or {}),
                "annotations": dict(template["metadata"].get("annotations") or {}),
                "ownerReferences": [owner_ref(owner)],
            },
            "spec": {**template["spec"]},
            "status": {"phase": "Pending"},
        }
        if node:
            pod["spec"]["nodeName"] = node
        return pod

    # ---- controllers ----
    async def run_controllers(self) -> None:
        """Until cancelled: one reconcile pass after each burst of changes."""
        sub = self.api.subscribe()

        async def listen() -> None:
            async for _ in sub:
                self.dirty.set()

        listener = asyncio.get_running_loop().create_task(listen())
        try:
            while True:
                await self.dirty.wait()
                await asyncio.sleep(0.02)  # coalesce a burst of writes into one pass
                self.dirty.clear()
                self.reconcile()
        finally:
            sub.close()
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener

    def reconcile(self, initial: bool = False) -> None:
        self.passes += 1
        nodes = {n["metadata"]["name"]: n for n in self.store.iter_objects("Node")}
        by_owner: dict[tuple[str, str, str], list[Obj]] = defaultdict(list)
        for pod in list(self.store.iter_objects("Pod")):
            node = pod.get("spec", {}).get("nodeName")
            if node and node not in nodes:  # pod garbage collection after a node is gone
                self._delete(pod, 0)
                continue
            ref = controller_of(pod)
            if ref:
                by_owner[(ref[0], pod["metadata"]["namespace"], ref[1])].append(pod)
        self._replica_sets(by_owner)
        self._stateful_sets(by_owner)
        self._daemon_sets(by_owner, nodes, initial)
        self._schedule(nodes, initial)
        self._statuses()

    def _replica_sets(self, by_owner: dict[tuple[str, str, str], list[Obj]]) -> None:
        for rs in list(self.store.iter_objects("ReplicaSet")):
            meta = rs["metadata"]
            # terminating pods no longer count: their replacements start at once, as the real controller does
            active = [p for p in by_owner[("ReplicaSet", meta["namespace"], meta["name"])] if not _terminating(p)]
            for _ in range(int(rs["spec"].get("replicas", 1)) - len(active)):
                self.api.create(self.new_pod(rs, self.pod_name(meta["name"])))

    def _stateful_sets(self, by_owner: dict[tuple[str, str, str], list[Obj]]) -> None:
        for sts in list(self.store.iter_objects("StatefulSet")):
            meta = sts["metadata"]
            present = {p["metadata"]["name"] for p in by_owner[("StatefulSet", meta["namespace"], meta["name"])]}
            for ordinal in range(int(sts["spec"].get("replicas", 1))):
                name = f"{meta['name']}-{ordinal}"
                if name not in present:  # a StatefulSet waits for the old pod to be gone entirely
                    self.api.create(self.new_pod(sts, name))

    def _daemon_sets(
        self, by_owner: dict[tuple[str, str, str], list[Obj]], nodes: dict[str, Obj], initial: bool
    ) -> None:
        for ds in list(self.store.iter_objects("DaemonSet")):
            meta = ds["metadata"]
            covered = {p["spec"].get("nodeName") for p in by_owner[("DaemonSet", meta["namespace"], meta["name"])]}
            for node in nodes:
                if node not in covered:
                    pod = self.new_pod(ds, self.pod_name(meta["name"]), node)
                    if initial:
                        pod["status"] = {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
                    created = self.api.create(pod)
                    if not initial:
                        self._start_later(created)

    def _statuses(self) -> None:
        pods_of: dict[tuple[str, str, str], list[Obj]] = defaultdict(list)
        rs_parent: dict[tuple[str, str], str] = {}
        for rs in self.store.iter_objects("ReplicaSet"):
            ref = controller_of(rs)
            if ref and ref[0] == "Deployment":
                rs_parent[(rs["metadata"]["namespace"], rs["metadata"]["name"])] = ref[1]
        for pod in self.store.iter_objects("Pod"):
            ref = controller_of(pod)
            if not ref:
                continue
            ns = pod["metadata"]["namespace"]
            pods_of[(ref[0], ns, ref[1])].append(pod)
            if ref[0] == "ReplicaSet" and (ns, ref[1]) in rs_parent:
                pods_of[("Deployment", ns, rs_parent[(ns, ref[1])])].append(pod)
        for kind in ("ReplicaSet", "Deployment", "StatefulSet", "DaemonSet"):
            for obj in list(self.store.iter_objects(kind)):
                meta = obj["metadata"]
                pods = [p for p in pods_of[(kind, meta["namespace"], meta["name"])] if not _terminating(p)]
                ready = sum(1 for p in pods if is_ready(p))
                if kind == "DaemonSet":
                    status: Obj = {
                        "currentNumberScheduled": sum(1 for p in pods if p["spec"].get("nodeName")),
                        "desiredNumberScheduled": self.store.count("Node"),
                        "numberReady": ready,
                        "numberAvailable": ready,
                        "observedGeneration": meta.get("generation", 1),
                    }
                else:
                    status = {
                        "replicas": len(pods),
                        "readyReplicas": ready,
                        "availableReplicas": ready,
                        "observedGeneration": meta.get("generation", 1),
                    }
                    if kind != "ReplicaSet":
                        status["updatedReplicas"] = len(pods)
                if obj.get("status") != status:
                    self.api.update({**obj, "status": status})

    # ---- scheduler ----
    def _schedule(self, nodes: dict[str, Obj], initial: bool) -> None:
        used: dict[str, list[int]] = {n: [0, 0, 0] for n in nodes}
        on_node: dict[str, list[Obj]] = defaultdict(list)
        pending: list[Obj] = []
        for pod in self.store.iter_objects("Pod"):
            node = pod.get("spec", {}).get("nodeName")
            if node in used:
                cpu, mem = requests_of(pod)
                used[node][0] += cpu
                used[node][1] += mem
                used[node][2] += 1
                on_node[node].append(pod)
            elif not node and not _terminating(pod):
                pending.append(pod)
        pending.sort(key=lambda p: (-_priority(p), p["metadata"].get("creationTimestamp", ""), p["metadata"]["name"]))
        # a pod that preempted others has the room it made reserved (nominatedNodeName), or the replacements
        # of its victims would take it back
        self.nominated = {uid: n for uid, n in self.nominated.items() if n in used}
        live = {p["metadata"]["uid"] for p in pending}
        for uid in [u for u in self.nominated if u not in live]:
            del self.nominated[uid]
        for pod in pending:
            node = self.nominated.get(pod["metadata"]["uid"])
            if node is not None:
                _add(used[node], requests_of(pod), 1)
        for pod in pending:
            uid = pod["metadata"]["uid"]
            cpu, mem = requests_of(pod)
            nominated = self.nominated.get(uid)
            if nominated is not None:
                _add(used[nominated], (cpu, mem), -1)
            fits = [
                n
                for n, obj in nodes.items()
                if _schedulable(obj, pod) and _fits(_room(obj, used[n], None), (cpu, mem, 1))
            ]
            if fits:
                node = (
                    nominated if nominated in fits else max(fits, key=lambda n: (_room(nodes[n], used[n], None)[0], n))
                )
                self._bind(pod, node, initial)
                _add(used[node], (cpu, mem), 1)
                self.nominated.pop(uid, None)
            elif not initial:
                self._preempt(pod, nodes, used, on_node)
                nominated = self.nominated.get(uid)
                if nominated is not None:
                    _add(used[nominated], (cpu, mem), 1)

    def _bind(self, pod: Obj, node: str, initial: bool) -> None:
        new = {**pod, "spec": {**pod["spec"], "nodeName": node}}
        new["status"] = {
            "phase": "Running" if initial else "Pending",
            "conditions": [{"type": "PodScheduled", "status": "True"}],
        }
        if initial:
            new["status"]["conditions"].append({"type": "Ready", "status": "True"})
            self.api.update(new)
            return
        self._start_later(self.api.update(new))

    def _start_later(self, pod: Obj) -> None:
        """The kubelet: the pod turns Running and Ready after its start time (scaled)."""
        try:
            start = float(pod["metadata"].get("annotations", {}).get(START_SECONDS_ANNOTATION, 1.0))
        except ValueError:
            start = 1.0
        meta = pod["metadata"]
        asyncio.get_running_loop().call_later(
            start * self.spec.time_scale, self._mark_ready, meta["namespace"], meta["name"], meta["uid"]
        )

    def _mark_ready(self, namespace: str, name: str, uid: str) -> None:
        pod = self.store.get("Pod", namespace, name)
        if pod is None or pod["metadata"]["uid"] != uid or _terminating(pod):
            return
        status = {
            "phase": "Running",
            "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}],
        }
        with contextlib.suppress(ApiError):
            self.api.update({**pod, "status": status})

    def _preempt(
        self, pod: Obj, nodes: dict[str, Obj], used: dict[str, list[int]], on_node: dict[str, list[Obj]]
    ) -> None:
        """Make room by deleting lower-priority pods on one node (the overprovisioning placeholders)."""
        uid, priority = pod["metadata"]["uid"], _priority(pod)
        if pod["spec"].get("preemptionPolicy") == "Never" or priority < 0:
            self._unschedulable(pod)
            return
        nominated = self.nominated.get(uid)
        if nominated in nodes and any(_terminating(p) for p in on_node[nominated]):
            return  # room is being made there already
        cpu, mem = requests_of(pod)
        for name, node in sorted(nodes.items(), key=lambda kv: kv[0]):
            if not _schedulable(node, pod):
                continue
            room = list(_room(node, used[name], on_node[name]))
            victims = []
            for victim in sorted(on_node[name], key=_priority):
                if _fits(room, (cpu, mem, 1)):
                    break
                if _priority(victim) >= priority or _terminating(victim):
                    continue
                vcpu, vmem = requests_of(victim)
                room = [room[0] + vcpu, room[1] + vmem, room[2] + 1]
                victims.append(victim)
            if _fits(room, (cpu, mem, 1)) and victims:
                for victim in victims:
                    self._delete(victim, int(victim["spec"].get("terminationGracePeriodSeconds", 30)))
                self.nominated[uid] = name
                return
        self._unschedulable(pod)

    def _unschedulable(self, pod: Obj) -> None:
        conditions = pod.get("status", {}).get("conditions") or []
        wanted = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}
        if wanted not in conditions:
            with contextlib.suppress(ApiError):
                self.api.update({**pod, "status": {**pod.get("status", {}), "conditions": [wanted]}})

    def _delete(self, pod: Obj, grace: int) -> None:
        with contextlib.suppress(ApiError):
            self.api.delete("Pod", pod["metadata"]["name"], pod["metadata"]["namespace"], grace_period_seconds=grace)

    # ---- nodes: IMDS and agents ----
    async def start_imds(self) -> dict[str, FakeImds]:
        for node in self.store.iter_objects("Node"):
            labels = node["metadata"]["labels"]
            imds = FakeImds(
                instance_id=node["spec"]["providerID"].rsplit("/", 1)[-1],
                instance_type=labels.get("node.kubernetes.io/instance-type", "m5.xlarge"),
                zone=labels.get("topology.kubernetes.io/zone", "us-east-1a"),
                lifecycle="spot" if labels.get(CAPACITY_LABEL) == "SPOT" else "on-demand",
            )
            await imds.start()
            self.imds[node["metadata"]["name"]] = imds
        return self.imds

    async def stop_imds(self) -> None:
        await asyncio.gather(*(i.stop() for i in self.imds.values()), return_exceptions=True)
        self.imds.clear()

    async def run_agents(self, agent_config: Callable[[str, str], Any]) -> None:
        """Run `spotd.agent.serve` for every node until cancelled; agent_config(node, imds_url) -> AgentConfig."""
        from spotd.agent import serve

        async with asyncio.TaskGroup() as tasks:
            for name, imds in self.imds.items():
                config = agent_config(name, imds.url)
                self.agents[name] = tasks.create_task(serve(config, health_server=False), name=f"agent-{name}")

    def remove_node(self, name: str) -> None:
        """A terminated instance: its agent stops, the Node goes, its pods are collected on the next pass."""
        agent = self.agents.pop(name, None)
        if agent is not None:
            agent.cancel()
        with contextlib.suppress(ApiError):
            self.api.delete("Node", name)
        self.dirty.set()


def _terminating(pod: Obj) -> bool:
    return bool(pod["metadata"].get("deletionTimestamp"))


def _priority(pod: Obj) -> int:
    return int(pod.get("spec", {}).get("priority") or 0)


def _schedulable(node: Obj, pod: Obj) -> bool:
    if node.get("spec", {}).get("unschedulable") and not _tolerates_unschedulable(pod):
        return False
    tolerations = pod.get("spec", {}).get("tolerations") or []
    for taint in node.get("spec", {}).get("taints") or []:
        if taint.get("effect") in ("NoSchedule", "NoExecute") and not tolerates(tolerations, taint):
            return False
    return True


def _tolerates_unschedulable(pod: Obj) -> bool:
    taint = {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}
    return tolerates(pod.get("spec", {}).get("tolerations") or [], taint)


def _add(used: list[int], requests: tuple[int, int], sign: int) -> None:
    used[0] += sign * requests[0]
    used[1] += sign * requests[1]
    used[2] += sign


def _fits(room: Iterable[int], need: Iterable[int]) -> bool:
    return all(r >= n for r, n in zip(room, need, strict=True))


def _room(node: Obj, used: list[int], terminating_freed: list[Obj] | None) -> tuple[int, int, int]:
    """Free (cpu millis, MiB, pods); with terminating_freed, the terminating pods' share counts as free."""
    alloc = node.get("status", {}).get("allocatable") or {}
    cpu = cpu_millis(alloc.get("cpu", "0")) - used[0]
    mem = mem_mebibytes(alloc.get("memory", "0")) - used[1]
    pods = int(alloc.get("pods", 110)) - used[2]
    for pod in terminating_freed or []:
        if _terminating(pod):
            pcpu, pmem = requests_of(pod)
            cpu, mem, pods = cpu + pcpu, mem + pmem, pods + 1
    return cpu, mem, pods


def spec_from_args(args: argparse.Namespace) -> ClusterSpec:
    return replace(
        ClusterSpec(),
        spot_nodes=args.nodes,
        on_demand_nodes=args.on_demand_nodes,
        pods_per_node=args.pods_per_node,
        seed=1 if args.seed is None else args.seed,
        time_scale=args.time_scale,
    )
