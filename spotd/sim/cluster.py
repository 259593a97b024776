"""The embedded cluster of `spotd simulate-reclaim`: its nodes and workloads, a FakeImds and agent per node."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from spotd.controller.placeholders import PLACEHOLDER_PRIORITY_CLASS
from spotd.notices.record import NoticeKind
from spotd.sim import builders
from spotd.sim.controllers import Controllers, owner_ref
from spotd.sim.imds import FakeImds
from spotd.sim.kubeapi.errors import ApiError
from spotd.sim.kubeapi.policy import STOP_SECONDS_ANNOTATION
from spotd.sim.kubeapi.server import FakeApiServer
from spotd.sim.scheduler import START_SECONDS_ANNOTATION, Obj

CAPACITY_LABEL = "eks.amazonaws.com/capacityType"
ZONES = ("us-east-1a", "us-east-1b", "us-east-1c")
SPOT_TYPES = ("m5.xlarge", "m5a.xlarge", "m6i.xlarge", "m5d.xlarge")
PRIORITY_CLASSES = {"system-node-critical": 2000001000, "critical": 100000, "default": 0, "overprovisioning": -10}
# deploy/placeholder-priorityclass.yaml, as `kubectl apply -k deploy/` installs it: without it the API server's
# Priority admission refuses every placeholder (403 "no PriorityClass with name spotd-placeholder was found")
PLACEHOLDER_CLASS: Obj = {
    "apiVersion": "scheduling.k8s.io/v1",
    "kind": "PriorityClass",
    "metadata": {"name": PLACEHOLDER_PRIORITY_CLASS, "labels": {"app.kubernetes.io/name": "spotd"}},
    "value": -5,
    "globalDefault": False,
    "preemptionPolicy": "PreemptLowerPriority",
}


@dataclass(frozen=True)
class ClusterSpec:
    spot_nodes: int = 30
    on_demand_nodes: int = 3
    pods_per_node: int = 6
    seed: int = 1
    # pods declare how long they take to start and stop (annotations); this multiplies both, so a rehearsal
    # plays out in seconds while the notice deadline stays in real time
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


def imds_for(node: Obj) -> FakeImds:
    """A fake IMDS answering as the Node's instance: its providerID's id, type, zone and lifecycle."""
    labels = node["metadata"]["labels"]
    return FakeImds(
        instance_id=node["spec"]["providerID"].rsplit("/", 1)[-1],
        instance_type=labels.get("node.kubernetes.io/instance-type", "m5.xlarge"),
        zone=labels.get("topology.kubernetes.io/zone", "us-east-1a"),
        lifecycle="spot" if labels.get(CAPACITY_LABEL) == "SPOT" else "on-demand",
    )


async def notify_imds(
    imds: Mapping[str, FakeImds],
    targets: Iterable[Any],
    kind: NoticeKind,
    notice_at: datetime,
    deadline: datetime | None,
) -> None:
    """`--via imds` on an embedded cluster: the notice set in each target node's fake IMDS."""
    for target in targets:
        if kind == NoticeKind.REBALANCE:
            imds[target.name].set_rebalance(notice_at)
        else:
            imds[target.name].set_instance_action("terminate", deadline)


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
    from spotd.cli.flags import positive_duration

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

    p.add_argument(
        "--nodes",
        type=count,
        default=None,
        help="embedded: Spot nodes (30; fallback 9); on-demand via --on-demand-nodes",
    )
    p.add_argument("--on-demand-nodes", type=count, default=3, help="embedded: on-demand nodes (3)")
    p.add_argument("--pods-per-node", type=count, default=6, help="embedded: workload pods per node on average (6)")
    p.add_argument("--seed", type=int, default=None, help="random seed: node choice, embedded pod names (1 embedded)")
    p.add_argument(
        "--time-scale",
        type=scale,
        default=None,
        help="embedded: multiply pods' start and stop times by this (0.25); the notice stays in real time. "
        "--scenario fallback: every duration, the notice included (1/120: two hours in a minute)",
    )
    p.add_argument(
        "--agent-poll-interval", type=positive_duration, default=2.0, help="embedded: agents' IMDS poll (2s)"
    )


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
            builders.node(
                name,
                builders.SPOT if spot else builders.ON_DEMAND,
                instance_type=instance_type,
                zone=zone,
                labels={"eks.amazonaws.com/nodegroup": "spot-mixed" if spot else "on-demand"},
                instance_id=instance_id,
                boot_id=f"{rng.getrandbits(128):032x}",
                allocatable={"cpu": "3920m", "memory": "15136Mi", "pods": "58"},
                capacity_resources={"cpu": "4", "memory": "16Gi", "pods": "58"},
            )
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


class EmbeddedCluster:
    """The objects, the controllers (`run_controllers`) and the per-node IMDS and agents (`run_agents`)."""

    def __init__(self, api: FakeApiServer, spec: ClusterSpec) -> None:
        self.api = api
        self.spec = spec
        self.rng = random.Random(spec.seed)
        self.imds: dict[str, FakeImds] = {}
        self.agents: dict[str, asyncio.Task[None]] = {}
        self.controllers = Controllers(api, self.rng, spec.time_scale)

    @property
    def store(self) -> Any:
        return self.api.store

    # ---- objects ----
    def populate(self) -> None:
        """Create every object and place the first pods (Running and Ready at once)."""
        for name, value in PRIORITY_CLASSES.items():
            if self.api.get("PriorityClass", name) is not None:
                continue  # system-node-critical: the API server creates it itself
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
        if self.api.get("PriorityClass", PLACEHOLDER_CLASS["metadata"]["name"]) is None:
            self.api.create(PLACEHOLDER_CLASS)  # installed with spotd (deploy/): the controller's surges name it
        for node in node_objects(self.spec, self.rng):
            self.api.create(node)
        for ns in sorted({w.namespace for w in MIX} | {"spotd"}):  # spotd's own: rehearsal requests
            if self.api.get("Namespace", ns) is None:
                self.api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        for w in MIX:
            self.add_workload(w)
        self.controllers.reconcile(initial=True)

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

    # ---- controllers ----
    async def run_controllers(self) -> None:
        """Until cancelled: one reconcile pass after each burst of changes."""
        await self.controllers.run()

    # ---- nodes: IMDS and agents ----
    async def start_imds(self) -> dict[str, FakeImds]:
        for node in self.store.iter_objects("Node"):
            imds = imds_for(node)
            await imds.start()
            self.imds[node["metadata"]["name"]] = imds
        return self.imds

    async def stop_imds(self) -> None:
        await asyncio.gather(*(i.stop() for i in self.imds.values()), return_exceptions=True)
        self.imds.clear()

    async def run_agents(self, agent_config: Callable[[str, str], Any]) -> None:
        """Run `spotd.agent.serve` for every node until cancelled; agent_config(node, imds_url) -> AgentConfig."""
        from spotd.agent.main import serve

        async with asyncio.TaskGroup() as tasks:
            for name, imds in self.imds.items():
                config = agent_config(name, imds.url)
                self.agents[name] = tasks.create_task(serve(config, health_server=False), name=f"agent-{name}")

    def remove_node(self, name: str) -> None:
        """A terminated instance: its agent stops, the Node goes; pod GC collects its pods (podgc.py)."""
        agent = self.agents.pop(name, None)
        if agent is not None:
            agent.cancel()
        with contextlib.suppress(ApiError):
            self.api.delete("Node", name)
        self.controllers.dirty.set()


FALLBACK_SPOT_NODES = 9
FALLBACK_TIME_SCALE = 1 / 120


def spec_from_args(args: argparse.Namespace) -> ClusterSpec:
    """The cluster of the flags; defaults by scenario (the fallback one is smaller and faster)."""
    fallback = getattr(args, "scenario", "reclaim") == "fallback"
    if args.nodes is None:
        args.nodes = FALLBACK_SPOT_NODES if fallback else ClusterSpec.spot_nodes
    if args.time_scale is None:
        args.time_scale = FALLBACK_TIME_SCALE if fallback else ClusterSpec.time_scale
    return replace(
        ClusterSpec(),
        spot_nodes=args.nodes,
        on_demand_nodes=args.on_demand_nodes,
        pods_per_node=args.pods_per_node,
        seed=1 if args.seed is None else args.seed,
        time_scale=args.time_scale,
    )
