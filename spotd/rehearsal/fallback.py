"""`spotd simulate-reclaim --scenario fallback`: a reclaim while Spot is short, the on-demand fallback and the
way back, on the embedded cluster with cluster-autoscaler's model and the real controller.

The run, every duration multiplied by the time scale (given here at real scale):
  start   the embedded cluster, its node groups under spotd.sim.ca_model (Spot per zone at priority 20,
          on-demand `fallback-*` at 10, labelled node-pool=fallback), the real agents; moto (SQS) and the real
          `spotd controller` as a subprocess reading the queue, ready before anything happens;
  +0      Spot short (ICE on for every Spot pool) and a spot-itn notice to --count Spot nodes; the agents
          drain them and the instances end at the deadline (--notice);
          pods go Pending, CA tries Spot, the launch fails (the ICE event goes to the queue, as EventBridge
          sends it), CA backs the Spot groups off and launches on-demand;
  +spot-short-for   ICE off; from then on the controller may move the work back;
  end     when no fallback node is left and nothing is Pending, or --observe-for (2h30m) after Spot came back.

Why a subprocess and moto: the controller's ICE signals come from AWS (SQS, ASG activities); the stable
interface is its flags and those APIs, so the rehearsal feeds it what AWS would and touches none of its
internals. moto is a test dependency: the scenario needs `pip install 'spotd[test]'`.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from spotd.common.parsing import format_time
from spotd.kube.keys import DRAIN_ANNOTATION, REHEARSAL_LABEL
from spotd.notices.record import NoticeKind
from spotd.rehearsal.cycle_report import (
    OTHER,
    RECLAIM,
    RETURN,
    Disruption,
    FallbackReport,
    Milestones,
    NodeLife,
    PodWait,
    build_fallback_report,
)
from spotd.rehearsal.running_controller import ControllerProcess, controller_argv, controller_options
from spotd.rehearsal.targets import RehearsalRefused, rehearsal_request_data
from spotd.sim.ca_model import NODEGROUP_LABEL, ON_DEMAND, SPOT, Autoscaler, AutoscalerTiming, SimulatedGroup
from spotd.sim.cluster import ZONES, ClusterSpec, EmbeddedCluster
from spotd.sim.eventbridge import AwsEvents, MotoMissing
from spotd.sim.scheduler import Obj

FALLBACK_LABEL = ("node-pool", "fallback")
FALLBACK_SELECTOR = f"{FALLBACK_LABEL[0]}={FALLBACK_LABEL[1]}"
INSTANCE_TYPE = "m5.xlarge"


@dataclass(frozen=True)
class FallbackConfig:
    """Durations at real scale (seconds); `scale` multiplies them for the run."""

    count: int
    scale: float
    notice: float = 120.0
    spot_short_for: float = 1200.0
    observe_for: float = 9000.0
    controller_args: tuple[str, ...] = ()
    timing: AutoscalerTiming = AutoscalerTiming()  # noqa: RUF009 - frozen
    seed: int = 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    from spotd.cli.flags import duration

    p.add_argument(
        "--scenario",
        choices=("reclaim", "fallback"),
        default="reclaim",
        help="reclaim: the notice and the drain (default); fallback (embedded): a reclaim while Spot is short, "
        "the on-demand fallback, Spot restored and the real controller moving the work back",
    )
    p.add_argument(
        "--spot-short-for",
        type=duration,
        default=1200.0,
        help="fallback: how long Spot stays short after the reclaim, real time (20m)",
    )
    p.add_argument(
        "--observe-for",
        type=duration,
        default=9000.0,
        help="fallback: how long to wait for the return to Spot once Spot is back, real time (2h30m: the "
        "controller's --min-on-demand-age 2h holds the fallback nodes until then)",
    )
    p.add_argument(
        "--controller-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="fallback: a flag for `spotd controller` (repeatable; --controller-arg=--surge-timeout=0); "
        "durations are real time and scaled like the rest",
    )


# ---- the cluster's node groups ------------------------------------------------------------------------------


def node_groups(spec: ClusterSpec) -> list[SimulatedGroup]:
    spot = [SimulatedGroup(f"spot-{z}", SPOT, INSTANCE_TYPE, z, priority=20, max_size=30) for z in ZONES]
    fallback = [
        SimulatedGroup(
            f"fallback-{z}", ON_DEMAND, INSTANCE_TYPE, z, priority=10, max_size=30, labels=dict([FALLBACK_LABEL])
        )
        for z in ZONES
    ]
    base = SimulatedGroup(
        "on-demand-base",
        ON_DEMAND,
        INSTANCE_TYPE,
        ZONES[0],
        priority=0,
        min_size=spec.on_demand_nodes,
        max_size=spec.on_demand_nodes,
        labels={"node-pool": "base"},
    )
    return [*spot, *fallback, base]


def adopt_nodes(cluster: EmbeddedCluster) -> None:
    """The embedded cluster's nodes into the node groups: Spot nodes into their zone's group (with its
    instance type), on-demand ones into the base group, which the controller must leave alone."""
    for node in cluster.api.list("Node"):
        labels = node["metadata"]["labels"]
        zone = labels["topology.kubernetes.io/zone"]
        if labels.get("eks.amazonaws.com/capacityType") == "SPOT":
            labels.update({NODEGROUP_LABEL: f"spot-{zone}", "node.kubernetes.io/instance-type": INSTANCE_TYPE})
            labels["karpenter.sh/capacity-type"] = SPOT
        else:
            labels.update({NODEGROUP_LABEL: "on-demand-base", "node-pool": "base"})
            labels["karpenter.sh/capacity-type"] = ON_DEMAND
            node["metadata"].setdefault("annotations", {})[DRAIN_ANNOTATION] = "false"
        cluster.api.update(node)


# ---- what happened: node lives, pod waits, disruptions --------------------------------------------------------


class Recorder:
    """Follows the store's change feed from the reclaim on (in-process: the embedded mode only)."""

    def __init__(self, cluster: EmbeddedCluster, groups: dict[str, SimulatedGroup]) -> None:
        self.cluster = cluster
        self.groups = groups
        self.t0: datetime | None = None
        self.nodes: dict[str, NodeLife] = {}
        self.waits: dict[str, PodWait] = {}  # pod uid ->
        self.disruptions: list[Disruption] = []
        self.reclaimed: set[str] = set()
        self.gone: set[str] = set()  # pod uids already counted as disrupted
        for node in cluster.store.iter_objects("Node"):
            self._node_added(node, datetime.now(UTC))

    def _node_added(self, node: Obj, at: datetime) -> None:
        labels = node["metadata"].get("labels") or {}
        group = self.groups.get(labels.get(NODEGROUP_LABEL, ""))
        capacity = group.capacity_type if group else labels.get("karpenter.sh/capacity-type", "")
        fallback = bool(group and group.name.startswith("fallback-"))
        self.nodes[node["metadata"]["name"]] = NodeLife(
            node["metadata"]["name"], group.name if group else "", capacity, fallback, at
        )

    def workload(self, pod: Obj) -> tuple[str, bool] | None:
        """(Kind/namespace/name of the pod's workload, counted) or None for DaemonSet and ownerless pods."""
        ref = next((r for r in pod["metadata"].get("ownerReferences") or [] if r.get("controller")), None)
        if ref is None or ref.get("kind") == "DaemonSet":
            return None
        ns, kind, name = pod["metadata"]["namespace"], ref["kind"], ref["name"]
        if kind == "ReplicaSet":
            rs = self.cluster.store.get("ReplicaSet", ns, name)
            parent = next((r for r in (rs or {}).get("metadata", {}).get("ownerReferences") or []), None)
            if parent is not None:
                kind, name = parent["kind"], parent["name"]
        return f"{kind}/{ns}/{name}", int(pod["spec"].get("priority") or 0) >= 0

    def on_change(self, event: str, obj: Obj) -> None:
        now = datetime.now(UTC)
        if obj.get("kind") == "Node":
            name = obj["metadata"]["name"]
            if event == "ADDED":
                self._node_added(obj, now)
            elif event == "DELETED" and name in self.nodes:
                self.nodes[name] = replace(self.nodes[name], removed=now)
            return
        if obj.get("kind") != "Pod" or self.t0 is None:
            return
        found = self.workload(obj)
        if found is None:
            return
        workload, counted = found
        uid, name = obj["metadata"]["uid"], obj["metadata"]["name"]
        node = obj["spec"].get("nodeName")
        if event == "ADDED" and not node:
            self.waits[uid] = PodWait(workload, name, now, None, counted)
        elif uid in self.waits and self.waits[uid].until is None and (node or event == "DELETED"):
            self.waits[uid] = replace(self.waits[uid], until=now)
        going = event == "DELETED" or bool(obj["metadata"].get("deletionTimestamp"))
        if node and going and uid not in self.gone:  # the first sign of its end: a graceful delete, or gone
            self.gone.add(uid)
            life = self.nodes.get(node)
            cause = RECLAIM if node in self.reclaimed else RETURN if life and life.fallback else OTHER
            self.disruptions.append(Disruption(workload, name, now, cause, counted))

    def on_fallback(self) -> dict[str, int]:
        out: dict[str, int] = {}
        fallback = {n for n, life in self.nodes.items() if life.fallback and life.removed is None}
        for pod in self.cluster.store.iter_objects("Pod"):
            if pod["spec"].get("nodeName") in fallback and not pod["metadata"].get("deletionTimestamp"):
                found = self.workload(pod)
                if found is not None:
                    out[found[0]] = out.get(found[0], 0) + 1
        return out

    def pending(self) -> int:
        return sum(1 for w in self.waits.values() if w.counted and w.until is None)

    def fallback_up(self) -> int:
        return sum(1 for life in self.nodes.values() if life.fallback and life.removed is None)


# ---- the run ------------------------------------------------------------------------------------------------


async def run_fallback(
    config: FallbackConfig, cluster_spec: ClusterSpec, workdir: Path, agent_factory: Any, log_level: str
) -> FallbackReport:
    """The whole scenario; the report at real scale. RehearsalRefused when it cannot start."""
    from spotd.sim.kubeapi.server import FakeApiServer

    scale = config.scale
    try:
        aws = AwsEvents()
    except MotoMissing as exc:
        raise RehearsalRefused(str(exc)) from None
    api = FakeApiServer(host="127.0.0.1", port=0, termination_scale=scale)
    await api.start()
    cluster = EmbeddedCluster(api, cluster_spec)
    tasks: list[asyncio.Task[Any]] = []
    controller: ControllerProcess | None = None
    loop = asyncio.get_running_loop()
    try:
        kubeconfig = str(api.write_kubeconfig(workdir / "kubeconfig"))
        cluster.populate()
        adopt_nodes(cluster)
        groups = node_groups(cluster_spec)
        recorder = Recorder(cluster, {g.name: g for g in groups})

        def hook(change: Any) -> None:
            recorder.on_change(change.type, change.obj)

        api.store.hooks.append(hook)
        await asyncio.to_thread(aws.start)

        def publish(body: str) -> None:
            loop.run_in_executor(None, aws.send, body)

        def launched(group: SimulatedGroup, node: Obj) -> None:
            iid = node["spec"]["providerID"].rsplit("/", 1)[-1]
            publish(aws.launch_event(group, datetime.now(UTC), "", iid))

        failures: dict[str, int] = {}

        def failed(group: SimulatedGroup, at: datetime, message: str) -> None:
            failures[group.name] = failures.get(group.name, 0) + 1
            publish(aws.launch_event(group, at, message))

        autoscaler = Autoscaler(
            api,
            groups,
            replace(config.timing, scale=scale),
            seed=config.seed,
            on_launched=launched,
            on_launch_failed=failed,
            remove_node=cluster.remove_node,
        )
        await cluster.start_imds()
        tasks.append(loop.create_task(cluster.run_controllers()))
        tasks.append(loop.create_task(cluster.run_agents(agent_factory(kubeconfig))))
        tasks.append(loop.create_task(autoscaler.run()))
        base = [
            "--kubeconfig", kubeconfig,
            "--listen", "127.0.0.1:0",  # its own bind, read back from its log: a port picked here may be taken
            "--sqs-queue-url", aws.queue_url,
            "--sqs-wait", "1s",
            "--lease-namespace", "kube-system",
            "--log-level", log_level,
        ]  # fmt: skip
        argv, notes = controller_argv(controller_options(), config.controller_args, scale, base, FALLBACK_SELECTOR)
        controller = ControllerProcess(argv, aws.env(), workdir / "controller.log")
        print(f"embedded cluster at {api.url}; starting spotd controller (log: {controller.log_path})", file=sys.stderr)
        await controller.start()

        # +0: Spot short, and the reclaim
        rng = random.Random(config.seed)
        spot = sorted(n["metadata"]["name"] for n in api.list("Node") if n["metadata"]["name"].startswith("spot-"))
        if config.count > len(spot):
            raise RehearsalRefused(f"--count {config.count}: only {len(spot)} Spot nodes")
        targets = sorted(rng.sample(spot, config.count))
        recorder.reclaimed = set(targets)
        t0 = datetime.now(UTC)
        recorder.t0 = t0
        autoscaler.set_ice(SPOT, True)
        deadline = t0 + timedelta(seconds=config.notice * scale)
        api.create(  # a rehearsal request, as `spotd simulate-reclaim` writes one for the agents
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": "spotd-rehearsal-fallback",
                    "namespace": "spotd",
                    "labels": {REHEARSAL_LABEL: "true"},
                },
                "data": rehearsal_request_data(targets, NoticeKind.SPOT_ITN, deadline),
            }
        )
        print(
            f"+0: Spot short (ICE on every Spot pool); spot-itn notice to {', '.join(targets)}, "
            f"deadline {format_time(deadline)}",
            file=sys.stderr,
            flush=True,
        )
        await asyncio.sleep(max(0.0, (deadline - datetime.now(UTC)).total_seconds()))
        deadline_at = datetime.now(UTC)
        for name in targets:
            cluster.remove_node(name)
        restore_at = t0 + timedelta(seconds=config.spot_short_for * scale)
        await asyncio.sleep(max(0.0, (restore_at - datetime.now(UTC)).total_seconds()))
        restored_at = datetime.now(UTC)
        autoscaler.set_ice(SPOT, False)
        print(
            f"Spot restored; waiting for the work to return (at most {config.observe_for:.0f}s real)", file=sys.stderr
        )
        give_up = restored_at + timedelta(seconds=config.observe_for * scale)
        while datetime.now(UTC) < give_up:
            if recorder.fallback_up() == 0 and recorder.pending() == 0 and not autoscaler.launches:
                break
            await asyncio.sleep(0.2)
        finished_at = datetime.now(UTC)
        exit_code = await controller.stop()
        if exit_code not in (0, None):
            notes.append(f"spotd controller exited with {exit_code}")
        if failures:
            tried = ", ".join(f"{name} x{n}" for name, n in sorted(failures.items()))
            notes.append(f"launches failed for lack of Spot capacity (ICE), each backing its group off: {tried}")
        notes.append(
            "nodes the autoscaler launched run no spotd agent; "
            f"controller log: {controller.log_path}; launch events sent to SQS: {aws.sent}"
        )
        return build_fallback_report(
            scale=scale,
            reclaimed=targets,
            milestones=Milestones(t0, deadline_at, restored_at, finished_at),
            nodes=list(recorder.nodes.values()),
            waits=list(recorder.waits.values()),
            disruptions=recorder.disruptions,
            on_fallback_at_end=recorder.on_fallback(),
            notes=notes,
        )
    finally:
        if controller is not None:
            await controller.stop()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await cluster.stop_imds()
        await api.stop()
        await asyncio.to_thread(aws.stop)
