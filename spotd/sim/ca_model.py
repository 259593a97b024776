"""The embedded cluster's cluster-autoscaler: node groups with priorities, ICE per pool, scale-up, scale-down.

A model of what cluster-autoscaler does on AWS with the priority expander, over the fake API server's
store (as spotd.sim.controllers and spotd.sim.scheduler are):

- scale-up: pods the sim scheduler marked Unschedulable (PodScheduled False, reason Unschedulable) that
  fit no node already launching go, packed in order of priority, to the group the priority expander
  picks among those whose template fits them (nodeSelector, required node affinity, taints, resources)
  and that are below max size and not backed off; the node turns up `provision_delay` later;
- an ICE-ed group's launch fails `launch_failure_delay` later (what CA learns from the ASG's failed
  activity, at worst after --max-node-provision-time); the group is then backed off (`initial_backoff`,
  doubling to `max_backoff`, as --initial-node-group-backoff-duration / --max-node-group-backoff-duration)
  and the next pass tries the next priority: that is how CA falls back from Spot to on-demand;
- scale-down: a group's node with no pods but DaemonSet ones for `scale_down_unneeded` is removed (the
  instance terminates; the sim's controllers collect its pods). Under-used nodes are not consolidated;
- it publishes kube-system/cluster-autoscaler-status (CA's YAML format, the fields spotd would read:
  per group health, sizes and `scaleUp.status` with `backoffInfo`) and reads the priorities from
  kube-system/cluster-autoscaler-priority-expander (`data.priorities`: priority -> regexes of group names),
  which it writes at start from the groups.

Durations are given at real scale and multiplied by `AutoscalerTiming.scale`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import yaml

from spotd.kube.keys import INSTANCE_TYPE_LABELS, ZONE_LABELS
from spotd.sim import builders
from spotd.sim.kubeapi.errors import ApiError
from spotd.sim.kubeapi.server import FakeApiServer
from spotd.sim.scheduler import (
    Obj,
    cpu_millis,
    mem_mebibytes,
    requests_of,
    schedulable,
    selects_node,
    terminating,
    tolerates,
)

SPOT = "spot"
ON_DEMAND = "on-demand"
NODEGROUP_LABEL = "eks.amazonaws.com/nodegroup"
EKS_CAPACITY_LABEL = "eks.amazonaws.com/capacityType"
KARPENTER_CAPACITY_LABEL = "karpenter.sh/capacity-type"
STATUS_CONFIGMAP = "cluster-autoscaler-status"
PRIORITY_CONFIGMAP = "cluster-autoscaler-priority-expander"
NAMESPACE = "kube-system"
# How often the model rewrites an unchanged status, wall time: a reader (spotd) takes a status older than
# 10 minutes as cluster-autoscaler down
STATUS_REFRESH = timedelta(seconds=60)
EXPENDABLE_PRIORITY_CUTOFF = -10  # CA's --expendable-pods-priority-cutoff: pods below it never scale up
ICE_MESSAGE = (
    "Could not launch Spot Instances. InsufficientInstanceCapacity - We currently do not have sufficient "
    "{instance_type} capacity in the Availability Zone you requested ({zone}). Our system will be working on "
    "provisioning additional capacity. Launching EC2 instance failed."
)


@dataclass(frozen=True)
class SimulatedGroup:
    """One node group (an ASG) and the template of its nodes."""

    name: str
    capacity_type: str  # spot | on-demand
    instance_type: str
    zone: str
    priority: int = 0
    min_size: int = 0
    max_size: int = 10
    labels: Mapping[str, str] = field(default_factory=dict)  # extra template labels
    taints: tuple[Mapping[str, str], ...] = ()
    cpu: str = "3920m"
    memory: str = "15136Mi"
    pods: int = 58
    ice: bool = False  # the pool starts short of capacity

    @property
    def pool(self) -> str:
        """The EC2 capacity pool the group launches into: instance type / zone."""
        return f"{self.instance_type}/{self.zone}"

    @property
    def ice_key(self) -> str:
        """The pool with its capacity type: a Spot shortage leaves the same pool's on-demand capacity alone."""
        return f"{self.capacity_type}:{self.pool}"

    def node_labels(self) -> dict[str, str]:
        """The labels of the group's nodes (and of its template, as the node-template/label/* tags give)."""
        return {
            "kubernetes.io/os": "linux",
            INSTANCE_TYPE_LABELS[0]: self.instance_type,
            ZONE_LABELS[0]: self.zone,
            "topology.kubernetes.io/region": self.zone[:-1],
            EKS_CAPACITY_LABEL: "SPOT" if self.capacity_type == SPOT else "ON_DEMAND",
            KARPENTER_CAPACITY_LABEL: self.capacity_type,
            NODEGROUP_LABEL: self.name,
            **self.labels,
        }

    def room(self) -> tuple[int, int, int]:
        return cpu_millis(self.cpu), mem_mebibytes(self.memory), self.pods


@dataclass(frozen=True)
class AutoscalerTiming:
    """Real-scale durations in seconds; `scale` multiplies every one of them for the run."""

    provision_delay: float = 90.0  # launch to a Ready node
    launch_failure_delay: float = 60.0  # launch to CA learning it failed (ICE)
    initial_backoff: float = 300.0
    max_backoff: float = 1800.0
    scale_down_unneeded: float = 600.0
    scan_interval: float = 10.0
    scale: float = 1.0

    def seconds(self, real: float) -> float:
        return real * self.scale


@dataclass
class Launch:
    """A node asked of a group: it becomes a Node at `due`, or fails then when `fails`."""

    group: SimulatedGroup
    asked_at: datetime
    due: datetime
    fails: bool
    name: str


@dataclass
class Backoff:
    until: datetime
    failures: int
    message: str
    since: datetime


# ---- pure: fitting pods to templates, the priority expander -----------------------------------------------


def fits_template(pod: Obj, group: SimulatedGroup) -> bool:
    """Would the pod schedule on an empty node of this group (selectors, affinity, taints)?"""
    if not selects_node(pod, group.node_labels()):
        return False
    tolerations = (pod.get("spec") or {}).get("tolerations") or []
    return all(tolerates(tolerations, dict(t)) for t in group.taints if t.get("effect") in ("NoSchedule", "NoExecute"))


def priorities_yaml(groups: Iterable[SimulatedGroup]) -> str:
    """The priority expander's `data.priorities`: priority -> regexes of group names (one per group)."""
    by_priority: dict[int, list[str]] = {}
    for g in sorted(groups, key=lambda g: g.name):
        by_priority.setdefault(g.priority, []).append(f"^{re.escape(g.name)}$")
    return yaml.safe_dump(dict(sorted(by_priority.items(), reverse=True)), default_flow_style=False, sort_keys=False)


def parse_priorities(text: str) -> list[tuple[int, re.Pattern[str]]]:
    """`data.priorities` -> (priority, regex) pairs; unreadable entries are skipped, as CA logs and skips."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError:
        return []
    out = []
    for key, patterns in data.items() if isinstance(data, dict) else ():
        try:
            priority = int(key)
        except (TypeError, ValueError):
            continue
        for pattern in patterns if isinstance(patterns, list) else []:
            with contextlib.suppress(re.error, TypeError):
                out.append((priority, re.compile(str(pattern))))
    return out


def expand(options: Iterable[SimulatedGroup], priorities: list[tuple[int, re.Pattern[str]]]) -> SimulatedGroup | None:
    """The priority expander: the options of the highest priority any regex gives them (groups no regex
    matches only when none matches); ties broken by name, so the choice is deterministic."""
    scored = []
    for g in options:
        matched = [p for p, rx in priorities if rx.search(g.name)]
        scored.append((max(matched) if matched else None, g))
    if not scored:
        return None
    matched_only = [(p, g) for p, g in scored if p is not None]
    pool = matched_only or [(0, g) for _, g in scored]
    best = max(p for p, _ in pool)
    return min((g for p, g in pool if p == best), key=lambda g: g.name)


def backoff_duration(failures: int, timing: AutoscalerTiming) -> float:
    return min(timing.initial_backoff * 2 ** max(0, failures - 1), timing.max_backoff)


def unschedulable(pod: Obj) -> bool:
    """Pending, unbound and marked Unschedulable by the scheduler (what CA acts on)."""
    if pod.get("spec", {}).get("nodeName") or terminating(pod):
        return False
    conditions = pod.get("status", {}).get("conditions") or []
    return any(
        c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable"
        for c in conditions
    )


def _time(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


# ---- the model ---------------------------------------------------------------------------------------------

LaunchHook = Callable[[SimulatedGroup, Obj], None]
FailureHook = Callable[[SimulatedGroup, datetime, str], None]


class Autoscaler:
    """cluster-autoscaler over the fake API server. `set_ice(pool or group, on)` switches capacity at run time.

    on_launched(group, node) and on_launch_failed(group, at, message) report to the embedding (which may
    send the EventBridge events AWS would); remove_node(name) ends an instance (default: delete the Node).
    """

    def __init__(
        self,
        api: FakeApiServer,
        groups: Iterable[SimulatedGroup],
        timing: AutoscalerTiming = AutoscalerTiming(),
        *,
        seed: int = 1,
        on_launched: LaunchHook | None = None,
        on_launch_failed: FailureHook | None = None,
        remove_node: Callable[[str], None] | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.api = api
        self.groups = {g.name: g for g in groups}
        self.timing = timing
        self.rng = random.Random(seed)
        self.on_launched = on_launched
        self.on_launch_failed = on_launch_failed
        self.remove_node = remove_node or self._delete_node
        self.clock = clock
        self.ice: set[str] = {g.ice_key for g in self.groups.values() if g.ice}
        self.launches: list[Launch] = []
        self.backoff: dict[str, Backoff] = {}
        self.unneeded_since: dict[str, datetime] = {}
        self.transitions: dict[tuple[str, str], tuple[str, datetime]] = {}  # (group, part) -> (status, since)
        self.status_written: dict[str, Any] | None = None  # the last status written, without its time
        self.status_time = datetime.min.replace(tzinfo=UTC)
        self.dirty = asyncio.Event()
        self.counter = itertools.count(1)
        self.started = clock()
        self.write_priorities()

    @property
    def store(self) -> Any:
        return self.api.store

    # -- control --
    def set_ice(self, target: str, on: bool) -> list[str]:
        """ICE on or off; the pools changed ("spot:m5.xlarge/us-east-1a"). target: "spot" or "on-demand"
        (every pool of that capacity type), a group's name (its pool), or a pool "[spot:|on-demand:]type/zone"
        (Spot when no capacity type is given: Spot and on-demand capacity run short apart)."""
        if target in (SPOT, ON_DEMAND):
            pools = {g.ice_key for g in self.groups.values() if g.capacity_type == target}
        elif target in self.groups:
            pools = {self.groups[target].ice_key}
        else:
            pools = {target if target.startswith((f"{SPOT}:", f"{ON_DEMAND}:")) else f"{SPOT}:{target}"}
        for pool in pools:
            (self.ice.add if on else self.ice.discard)(pool)
        self.dirty.set()
        return sorted(pools)

    def write_priorities(self) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": PRIORITY_CONFIGMAP, "namespace": NAMESPACE},
            "data": {"priorities": priorities_yaml(self.groups.values())},
        }
        try:
            self.api.create(body)
        except ApiError:
            self.api.update(body)

    def priorities(self) -> list[tuple[int, re.Pattern[str]]]:
        cm = self.store.get("ConfigMap", NAMESPACE, PRIORITY_CONFIGMAP)
        return parse_priorities(((cm or {}).get("data") or {}).get("priorities", ""))

    # -- the loop --
    async def run(self) -> None:
        """Until cancelled: a pass after each burst of changes, at a launch's due time, or every scan."""
        sub = self.api.subscribe()

        async def listen() -> None:
            async for _ in sub:
                self.dirty.set()

        listener = asyncio.get_running_loop().create_task(listen())
        try:
            while True:
                self.dirty.clear()
                self.reconcile()
                wait = self.timing.seconds(self.timing.scan_interval)
                due = [(launch.due - self.clock()).total_seconds() for launch in self.launches]
                due += [(b.until - self.clock()).total_seconds() for b in self.backoff.values()]
                wait = max(0.01, min([wait, *due]))
                with contextlib.suppress(TimeoutError):  # asyncio.timeout, unlike wait_for, never eats a cancel
                    async with asyncio.timeout(wait):
                        await self.dirty.wait()
                await asyncio.sleep(0.03)  # a burst of writes is one pass
        finally:
            sub.close()
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener

    def reconcile(self) -> None:
        now = self.clock()
        self._finish_launches(now)
        members = self.members()
        self._scale_up(now, members)
        self._scale_down(now, members)
        self._write_status(now, members)

    def members(self) -> dict[str, list[Obj]]:
        """Group name -> its Nodes (by the node group label)."""
        out: dict[str, list[Obj]] = {name: [] for name in self.groups}
        for node in self.store.iter_objects("Node"):
            group = (node["metadata"].get("labels") or {}).get(NODEGROUP_LABEL)
            if group in out:
                out[group].append(node)
        return out

    def backed_off(self, group: str, now: datetime) -> bool:
        b = self.backoff.get(group)
        return b is not None and b.until > now

    # -- scale-up --
    def _daemonset_overhead(self, group: SimulatedGroup) -> tuple[int, int, int]:
        cpu = mem = pods = 0
        for ds in self.store.iter_objects("DaemonSet"):
            template = {"spec": (ds["spec"].get("template") or {}).get("spec") or {}}
            if fits_template(template, group):
                c, m = requests_of(template)
                cpu, mem, pods = cpu + c, mem + m, pods + 1
        return cpu, mem, pods

    def _scale_up(self, now: datetime, members: dict[str, list[Obj]]) -> None:
        pending = [p for p in self.store.iter_objects("Pod") if unschedulable(p)]
        pending = [p for p in pending if int(p["spec"].get("priority") or 0) >= EXPENDABLE_PRIORITY_CUTOFF]
        if not pending:
            return
        pending.sort(key=lambda p: (-int(p["spec"].get("priority") or 0), p["metadata"]["name"]))
        # the room of the nodes there (the scheduler may not have placed these pods yet) and of the nodes on
        # their way, as CA's simulation counts both; CA does not know yet that a launch will fail
        slots: list[tuple[Callable[[Obj], bool], list[int], SimulatedGroup | None]] = self._node_slots()
        for launch in self.launches:
            slots.append((partial(fits_template, group=launch.group), self._empty_room(launch.group), None))
        size = {
            name: len(nodes) + sum(1 for la in self.launches if la.group.name == name)
            for name, nodes in members.items()
        }
        priorities = self.priorities()
        empty = {name: self._empty_room(g) for name, g in self.groups.items()}
        for pod in pending:
            need = (*requests_of(pod), 1)
            slot = next((room for fits, room, _ in slots if fits(pod) and _fits(room, need)), None)
            if slot is not None:
                _take(slot, need)
                continue
            options = [
                g
                for g in self.groups.values()
                if size[g.name] < g.max_size
                and not self.backed_off(g.name, now)
                and fits_template(pod, g)
                and _fits(empty[g.name], need)
            ]
            chosen = expand(options, priorities)
            if chosen is None:
                continue  # no group can take it: it stays Pending (CA's NotTriggerScaleUp)
            room = list(empty[chosen.name])
            _take(room, need)
            slots.append((partial(fits_template, group=chosen), room, chosen))
            size[chosen.name] += 1
        for _, _, new in slots:
            if new is not None:
                self._launch(new, now)

    def _node_slots(self) -> list[tuple[Callable[[Obj], bool], list[int], SimulatedGroup | None]]:
        used: dict[str, list[int]] = {}
        for pod in self.store.iter_objects("Pod"):
            node = pod.get("spec", {}).get("nodeName")
            if node:
                cpu, mem = requests_of(pod)
                _take(used.setdefault(node, [0, 0, 0]), (-cpu, -mem, -1))  # adds up what is in use
        slots: list[tuple[Callable[[Obj], bool], list[int], SimulatedGroup | None]] = []
        for node in self.store.iter_objects("Node"):
            if not _node_ready(node):
                continue
            alloc = node.get("status", {}).get("allocatable") or {}
            taken = used.get(node["metadata"]["name"], [0, 0, 0])
            room = [
                cpu_millis(alloc.get("cpu", "0")) - taken[0],
                mem_mebibytes(alloc.get("memory", "0")) - taken[1],
                int(alloc.get("pods", 110)) - taken[2],
            ]
            slots.append((partial(schedulable, node), room, None))
        return slots

    def _empty_room(self, group: SimulatedGroup) -> list[int]:
        cpu, mem, pods = group.room()
        dcpu, dmem, dpods = self._daemonset_overhead(group)
        return [cpu - dcpu, mem - dmem, pods - dpods]

    def _launch(self, group: SimulatedGroup, now: datetime) -> None:
        fails = group.ice_key in self.ice
        delay = self.timing.launch_failure_delay if fails else self.timing.provision_delay
        name = f"{group.name}-{next(self.counter)}"
        self.launches.append(Launch(group, now, now + timedelta(seconds=self.timing.seconds(delay)), fails, name))
        self._transition(group.name, "scaleUp", "InProgress", now)

    def _finish_launches(self, now: datetime) -> None:
        due = [la for la in self.launches if la.due <= now]
        self.launches = [la for la in self.launches if la.due > now]
        failed: set[str] = set()
        for launch in due:
            group = launch.group
            if launch.fails and group.name in failed:
                continue
            if launch.fails:
                # the nodes asked of the group together are one scale-up: it fails once, and whole
                failed.add(group.name)
                self.launches = [la for la in self.launches if not (la.group.name == group.name and la.fails)]
                previous = self.backoff.get(group.name)
                failures = (previous.failures if previous else 0) + 1
                message = ICE_MESSAGE.format(instance_type=group.instance_type, zone=group.zone)
                until = now + timedelta(seconds=self.timing.seconds(backoff_duration(failures, self.timing)))
                self.backoff[group.name] = Backoff(until, failures, message, now)
                if self.on_launch_failed is not None:
                    self.on_launch_failed(group, now, message)
                continue
            node = self.api.create(self.node_object(group, launch.name))
            if group.name in self.backoff:  # a launch that worked resets the group's back-off
                del self.backoff[group.name]
            if self.on_launched is not None:
                self.on_launched(group, node)

    def node_object(self, group: SimulatedGroup, name: str) -> Obj:
        resources = {"cpu": group.cpu, "memory": group.memory, "pods": str(group.pods)}
        return builders.node(
            name,
            group.capacity_type,
            instance_type=group.instance_type,
            zone=group.zone,
            labels=dict(group.node_labels()),
            instance_id=f"i-0{self.rng.getrandbits(64):016x}",
            boot_id=f"{self.rng.getrandbits(128):032x}",
            allocatable=resources,
            taints=[dict(t) for t in group.taints],
        )

    # -- scale-down --
    def _scale_down(self, now: datetime, members: dict[str, list[Obj]]) -> None:
        busy = set()
        for pod in self.store.iter_objects("Pod"):
            node = pod.get("spec", {}).get("nodeName")
            if node and not _daemon(pod):
                busy.add(node)
        unneeded = timedelta(seconds=self.timing.seconds(self.timing.scale_down_unneeded))
        seen = set()
        for name, nodes in members.items():
            group = self.groups[name]
            size = len(nodes)
            for node in sorted(nodes, key=lambda n: n["metadata"]["name"]):
                node_name = node["metadata"]["name"]
                if node_name in busy:
                    continue
                seen.add(node_name)
                since = self.unneeded_since.setdefault(node_name, now)
                if now - since >= unneeded and size > group.min_size:
                    self.remove_node(node_name)
                    size -= 1
                    seen.discard(node_name)
        self.unneeded_since = {n: t for n, t in self.unneeded_since.items() if n in seen}

    def _delete_node(self, name: str) -> None:
        with contextlib.suppress(ApiError):
            self.api.delete("Node", name)

    # -- status ConfigMap --
    def _transition(self, group: str, part: str, status: str, now: datetime) -> datetime:
        last = self.transitions.get((group, part))
        if last is None or last[0] != status:
            self.transitions[(group, part)] = (status, now)
            return now
        return last[1]

    def status(self, now: datetime, members: Mapping[str, list[Obj]]) -> dict[str, Any]:
        """The status in CA's YAML format, reduced to what spotd would read."""
        groups = []
        total = ready_total = 0
        for name in sorted(self.groups):
            g = self.groups[name]
            nodes = members.get(name, [])
            ready = sum(1 for n in nodes if _node_ready(n))
            in_flight = [la for la in self.launches if la.group.name == name]
            total, ready_total = total + len(nodes), ready_total + ready
            b = self.backoff.get(name)
            if b is not None and b.until > now:
                scale_up: dict[str, Any] = {
                    "status": "Backoff",
                    "backoffInfo": {"errorCode": "InsufficientInstanceCapacity", "errorMessage": b.message},
                }
            elif in_flight:
                scale_up = {"status": "InProgress"}
            else:
                scale_up = {"status": "NoActivity"}
            candidates = sum(1 for n in nodes if n["metadata"]["name"] in self.unneeded_since)
            down_status = "CandidatesPresent" if candidates else "NoCandidates"
            scale_down = {"status": down_status, "candidates": candidates}
            groups.append(
                {
                    "name": name,
                    "health": {
                        "status": "Healthy",
                        "nodeCounts": {
                            "registered": {"total": len(nodes), "ready": ready, "notStarted": 0},
                            "longUnregistered": 0,
                            "unregistered": 0,
                        },
                        "cloudProviderTarget": len(nodes) + len(in_flight),
                        "minSize": g.min_size,
                        "maxSize": g.max_size,
                        "lastTransitionTime": _time(self._transition(name, "health", "Healthy", now)),
                    },
                    "scaleUp": {
                        **scale_up,
                        "lastTransitionTime": _time(self._transition(name, "scaleUp", scale_up["status"], now)),
                    },
                    "scaleDown": {
                        **scale_down,
                        "lastTransitionTime": _time(self._transition(name, "scaleDown", down_status, now)),
                    },
                }
            )
        wide_up = "InProgress" if self.launches else "NoActivity"
        return {
            "autoscalerStatus": "Running",
            "clusterWide": {
                "health": {
                    "status": "Healthy",
                    "nodeCounts": {"registered": {"total": total, "ready": ready_total, "notStarted": 0}},
                },
                "scaleUp": {"status": wide_up},
            },
            "nodeGroups": groups,
        }

    def _write_status(self, now: datetime, members: Mapping[str, list[Obj]]) -> None:
        status = self.status(now, members)
        cm = self.store.get("ConfigMap", NAMESPACE, STATUS_CONFIGMAP)
        if cm is not None and status == self.status_written and now - self.status_time < STATUS_REFRESH:
            return  # CA rewrites the status (its `time`) every loop; this model on a change, or once a minute
        self.status_written, self.status_time = status, now
        text = yaml.safe_dump({"time": _time(now), **status}, sort_keys=False)
        body = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": STATUS_CONFIGMAP,
                "namespace": NAMESPACE,
                "annotations": {"cluster-autoscaler.kubernetes.io/last-updated": now.strftime("%Y-%m-%d %H:%M:%S")},
            },
            "data": {"status": text},
        }
        if cm is None:
            self.api.create(body)
        else:
            self.api.update(body)


def _daemon(pod: Obj) -> bool:
    return any(r.get("kind") == "DaemonSet" for r in pod["metadata"].get("ownerReferences") or [])


def _node_ready(node: Obj) -> bool:
    conditions = node.get("status", {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _fits(room: list[int], need: tuple[int, int, int]) -> bool:
    return all(r >= n for r, n in zip(room, need, strict=True))


def _take(room: list[int], need: tuple[int, int, int]) -> None:
    for i, n in enumerate(need):
        room[i] -= n
