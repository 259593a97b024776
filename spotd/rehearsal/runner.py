"""The reclaim rehearsal engine: give the chosen nodes a notice, follow it with watches, report what was seen."""

from __future__ import annotations

import asyncio
import random
import sys
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

from lightkube import ALL_NS, AsyncClient
from lightkube.core.exceptions import ApiError
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.apps_v1 import Deployment, ReplicaSet, StatefulSet
from lightkube.resources.core_v1 import ConfigMap, Event, Node, Pod
from lightkube.types import OnErrorAction, OnErrorResult

from spotd.common.parsing import format_time
from spotd.common.waits import wait_set
from spotd.kube.client import make_client
from spotd.kube.keys import INTERRUPTION_TAINT_KEY, REHEARSAL_LABEL
from spotd.notices.record import NoticeKind
from spotd.rehearsal.aws import send_queue_notices, start_fis_experiment, terminate_instances
from spotd.rehearsal.report import Fact, NodePlan, Observation, Report, WorkloadPlan, WorkloadRef, build_report
from spotd.rehearsal.targets import (
    RehearsalRefused,
    Target,
    choose_nodes,
    evictable,
    pod_pending,
    pod_ready,
    pod_ref,
    rehearsal_request_data,
    workload_of,
)


@dataclass(frozen=True)
class RehearsalConfig:
    kubeconfig: str | None
    nodes: tuple[str, ...] = ()
    selector: str | None = None
    count: int | None = None
    kind: NoticeKind = NoticeKind.SPOT_ITN
    notice: float = 120.0
    recovery_timeout: float = 60.0
    any_capacity_type: bool = False
    terminate: bool = False
    via: str = "request"  # request (a ConfigMap the agents read) | fis | imds (embedded) | queue
    fis_role_arn: str | None = None
    queue_url: str = ""  # via queue: the controller's SQS queue
    seed: int | None = None
    namespace: str = "spotd"  # spotd's own: where the agents read rehearsal requests


# ---- the engine -------------------------------------------------------------------------------------------

Terminator = Callable[[Sequence[Target]], Awaitable[None]]
# (targets, kind, notice_at, deadline): delivers the notice some other way (the embedded cluster's IMDS)
Notifier = Callable[[Sequence[Target], NoticeKind, datetime, datetime | None], Awaitable[None]]


@dataclass
class _State:
    pods: dict[str, Pod] = field(default_factory=dict)  # uid -> pod
    rs_parent: dict[tuple[str, str], str] = field(default_factory=dict)
    desired: dict[WorkloadRef, int] = field(default_factory=dict)
    ready: dict[WorkloadRef, int] = field(default_factory=dict)
    members: dict[WorkloadRef, set[str]] = field(default_factory=dict)  # workload -> pod uids

    def count(self, ref: WorkloadRef, test: Callable[[Pod], bool]) -> int:
        return sum(1 for uid in self.members.get(ref, ()) if test(self.pods[uid]))

    def pods_of(self, ref: WorkloadRef) -> list[Pod]:
        return [self.pods[uid] for uid in self.members.get(ref, ())]


class Rehearsal:
    def __init__(
        self,
        config: RehearsalConfig,
        *,
        terminator: Terminator | None = None,
        notifier: Notifier | None = None,
        progress: TextIO | None = None,
    ) -> None:
        self.config = config
        self.terminator = terminator
        self.notifier = notifier
        self.progress = progress or sys.stderr
        self.client: AsyncClient | None = None
        self.state = _State()
        self.timeline: list[Observation] = []
        self.plans: dict[str, NodePlan] = {}
        self.targets: list[Target] = []
        self.request: str | None = None  # the rehearsal request (ConfigMap) we wrote, until removed
        self.changed = asyncio.Event()
        self.started_at = datetime.now(UTC)
        self.fis_experiment: str | None = None
        self.ready_at_notice: dict[WorkloadRef, int] = {}
        self.notes: list[str] = []  # what the report should mention beyond its tables
        self.released: dict[str, str] = {}  # via queue: node -> the controller's last word on its release
        self.queue_rehearsal = ""  # via queue: this run's id, which the controller's Events name
        self.on_targets: set[WorkloadRef | None] = set()

    def say(self, message: str) -> None:
        print(message, file=self.progress, flush=True)

    def observe(self, fact: Fact, subject: str, value: int = 0, detail: str = "") -> None:
        self.timeline.append(Observation(datetime.now(UTC), fact, subject, value, detail))
        self.changed.set()

    async def run(self) -> Report:
        """Rehearse; the report of what was seen. Cancelling removes the rehearsal request before re-raising."""
        self.client = client = make_client(self.config.kubeconfig)
        watchers: list[asyncio.Task[None]] = []
        try:
            nodes = [n async for n in client.list(Node)]
            rng = random.Random(self.config.seed) if self.config.seed is not None else random.Random()
            self.targets = choose_nodes(
                nodes,
                names=self.config.nodes,
                selector=self.config.selector,
                count=self.config.count,
                any_capacity_type=self.config.any_capacity_type,
                rng=rng,
            )
            if self.config.via in ("fis", "queue") or (self.config.terminate and self.terminator is None):
                unknown = [t.name for t in self.targets if not t.instance_id]
                if unknown:
                    raise RehearsalRefused(f"no EC2 instance ID (spec.providerID aws:///...) on {', '.join(unknown)}")
            versions = await self.snapshot()
            loop = asyncio.get_running_loop()
            watchers = [loop.create_task(w) for w in self.watches(versions)]
            await self.give_notices()
            await self.follow()
            for ref in self.state.desired:
                self.observe(Fact.PENDING, str(ref), self.state.count(ref, pod_pending))
            report = self.report()
            if self.config.terminate:
                await self.terminate()
            return report
        finally:
            for task in watchers:
                task.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
            await asyncio.shield(self.clean_up())
            await client.close()

    # -- start --
    async def snapshot(self) -> dict[str, str | None]:
        """List what the report needs; the resourceVersions the watches start from."""
        assert self.client is not None
        versions: dict[str, str | None] = {}
        for res in (ReplicaSet, Deployment, StatefulSet, Pod):
            listing = self.client.list(res, namespace=ALL_NS)
            for obj in [o async for o in listing]:
                self.apply(res.__name__, "ADDED", obj)
            versions[res.__name__] = _version(listing)
        events = self.client.list(Event, namespace=ALL_NS, fields={"involvedObject.kind": "Node"})
        async for _ in events:
            pass
        versions["Event"] = _version(events)
        return versions

    def watches(self, versions: Mapping[str, str | None]) -> list[Coroutine[Any, Any, None]]:
        return [
            self.watch(Node, None, None),
            self.watch(Event, versions["Event"], {"involvedObject.kind": "Node"}),
            *(self.watch(res, versions[res.__name__], None) for res in (ReplicaSet, Deployment, StatefulSet, Pod)),
        ]

    async def watch(self, res: Any, version: str | None, fields: dict[str, str] | None) -> None:
        assert self.client is not None

        def on_error(exc: Exception, count: int) -> OnErrorResult:
            return OnErrorResult(OnErrorAction.RETRY, sleep=min(2.0, 0.1 * 2**count))

        kwargs: dict[str, Any] = {"resource_version": version, "on_error": on_error}
        if res is not Node:
            kwargs["namespace"] = ALL_NS
        if fields:
            kwargs["fields"] = fields
        async for event, obj in self.client.watch(res, **kwargs):
            self.apply(res.__name__, event, obj)

    def apply(self, kind: str, event: str, obj: Any) -> None:
        """One watch event (or listed object) into the state, and the timeline."""
        meta = obj.metadata
        if kind == "Node":
            self._node_seen(obj)
        elif kind == "Event":
            name = obj.involvedObject.name if obj.involvedObject else None
            if name in self.plans and event == "ADDED":
                fact = DRAIN_FACTS.get(obj.reason or "")
                if fact is not None:
                    self.observe(fact, name, detail=obj.message or "")
                elif obj.reason in ("PodsForceDeleted", "PodsDeletedAtDeadline"):
                    self.notes.append(f"{name}: {obj.message}")
                elif self.config.via == "queue" and obj.reason in RELEASE_REASONS and self.queue_rehearsal:
                    said = f"{obj.reason}: {obj.message or ''}"
                    ours = (obj.message or "").split(":")[0].split(" ")[:2] == ["rehearsal", self.queue_rehearsal]
                    final = "not acted on" in said or "dry run" in said  # else the rehearsal's start
                    if ours and (obj.reason != "SpotdQueueRehearsal" or final):
                        self.released[name] = said
                        self.changed.set()
        elif kind == "ReplicaSet":
            parent = next((r.name for r in meta.ownerReferences or [] if r.controller and r.kind == "Deployment"), None)
            if parent:
                self.state.rs_parent[(meta.namespace, meta.name)] = parent
            elif event != "DELETED":
                self._desired(WorkloadRef("ReplicaSet", meta.namespace, meta.name), obj)
        elif kind in ("Deployment", "StatefulSet") and event != "DELETED":
            self._desired(WorkloadRef(kind, meta.namespace, meta.name), obj)
        elif kind == "Pod":
            self._pod_seen(event, obj)

    def _desired(self, ref: WorkloadRef, obj: Any) -> None:
        self.state.desired[ref] = int(obj.spec.replicas if obj.spec and obj.spec.replicas is not None else 1)

    def _node_seen(self, node: Node) -> None:
        name = node.metadata.name if node.metadata else None
        if name not in self.plans:
            return
        taints = (node.spec.taints or []) if node.spec else []
        seen = {o.fact for o in self.timeline if o.subject == name}
        if any(t.key == INTERRUPTION_TAINT_KEY for t in taints) and Fact.TAINTED not in seen:
            self.observe(Fact.TAINTED, name)
        if node.spec and node.spec.unschedulable and Fact.CORDONED not in seen:
            self.observe(Fact.CORDONED, name)

    def _pod_seen(self, event: str, pod: Pod) -> None:
        uid = pod.metadata.uid if pod.metadata else None
        if not uid:
            return
        ref = workload_of(pod, self.state.rs_parent)
        if event == "DELETED":
            self.state.pods.pop(uid, None)
            if ref is not None:
                self.state.members.get(ref, set()).discard(uid)
            node = pod.spec.nodeName if pod.spec else None
            plan = self.plans.get(node or "")
            if plan is not None and pod_ref(pod) in plan.pods:
                self.observe(Fact.POD_GONE, plan.name, detail=pod_ref(pod))
        else:
            self.state.pods[uid] = pod
            if ref is not None:
                self.state.members.setdefault(ref, set()).add(uid)
        if ref is None:
            return
        ready = self.state.count(ref, pod_ready)
        if self.state.ready.get(ref) != ready:
            if ref in self.state.ready and self.plans:
                self.observe(Fact.READY, str(ref), ready)
            self.state.ready[ref] = ready

    async def give_notices(self) -> None:
        assert self.client is not None
        now = datetime.now(UTC).replace(microsecond=datetime.now(UTC).microsecond // 1000 * 1000)  # as written
        deadline = None if self.config.kind == NoticeKind.REBALANCE else now + timedelta(seconds=self.config.notice)
        self.ready_at_notice = dict(self.state.ready)
        self.on_targets = {
            workload_of(p, self.state.rs_parent)
            for p in self.state.pods.values()
            if p.spec and p.spec.nodeName in {t.name for t in self.targets} and evictable(p)
        }
        for t in self.targets:
            pods = frozenset(
                pod_ref(p) for p in self.state.pods.values() if p.spec and p.spec.nodeName == t.name and evictable(p)
            )
            self.plans[t.name] = NodePlan(
                t.name, str(self.config.kind), now, deadline, pods, self.config.kind != NoticeKind.REBALANCE
            )
        if self.config.via == "fis":
            self.fis_experiment = await asyncio.to_thread(
                start_fis_experiment, self.targets, self.config.fis_role_arn or "", self.config.notice
            )
            self.say(f"FIS experiment {self.fis_experiment} started for {len(self.targets)} instances")
            return
        if self.config.via == "queue":
            rehearsal = f"spotd-rehearsal-{now:%Y%m%d-%H%M%S}-{random.randrange(16**4):04x}"
            self.queue_rehearsal = rehearsal
            until = deadline or now + timedelta(seconds=self.config.notice)
            await asyncio.to_thread(send_queue_notices, self.config.queue_url, self.targets, now, until, rehearsal)
            self.say(
                f"Spot warnings for {len(self.targets)} instances sent to {self.config.queue_url} at "
                f"{format_time(now)}, deadline {format_time(until)}: the controller drains them as for silent agents"
            )
            self.notes.append(f"notice delivered through the controller's queue (rehearsal {rehearsal})")
            return
        if self.config.via == "imds":
            if self.notifier is None:
                raise RehearsalRefused("--via imds: only the embedded cluster's IMDS can be told")
            await self.notifier(self.targets, self.config.kind, now, deadline)
            self.say(f"{self.config.kind} notice set in the IMDS of {len(self.targets)} nodes at {format_time(now)}")
            return
        # As the operator: a request only spotd's namespace can hold, which RBAC lets only operators write.
        name = f"spotd-rehearsal-{now:%Y%m%d-%H%M%S}-{random.randrange(16**4):04x}"
        data = rehearsal_request_data(
            [t.name for t in self.targets], self.config.kind, deadline or now + timedelta(seconds=self.config.notice)
        )
        request = ConfigMap(
            metadata=ObjectMeta(name=name, namespace=self.config.namespace, labels={REHEARSAL_LABEL: "true"}),
            data=data,
        )
        # Ours before the answer comes: a signal during the create must still remove it (404 if it never was).
        self.request = name
        try:
            await self.client.create(request)
        except ApiError as exc:
            self.request = None
            if exc.status.code == 404:
                raise RehearsalRefused(
                    f"namespace {self.config.namespace!r} not found: is spotd deployed there? (--namespace)"
                ) from None
            raise
        when = f"deadline {format_time(deadline)}" if deadline else "no deadline"
        self.say(f"{self.config.kind} notice given to {len(self.targets)} nodes at {format_time(now)}, {when}")

    # -- follow --
    def settled(self, plan: NodePlan, now: datetime) -> datetime | None:
        facts = (Fact.DRAINED, Fact.DRAIN_INCOMPLETE) if plan.expect_drain else (Fact.TAINTED,)
        times = [o.at for o in self.timeline if o.subject == plan.name and o.fact in facts]
        if times:
            return min(times)
        end = plan.deadline or plan.notice_at + timedelta(seconds=self.config.notice)
        return end if now >= end + timedelta(seconds=2) else None

    def whole(self) -> bool:
        """Every affected workload back at its desired ready count (placeholders aside)."""
        return all(self.state.ready.get(w.ref, 0) >= w.desired for w in self.workload_plans() if w.counted)

    async def follow(self) -> None:
        warned = False
        while True:
            now = datetime.now(UTC)
            if not warned and self.config.via in ("request", "queue") and now - self.started_at > timedelta(seconds=15):
                idle = [n for n in self.plans if not any(o.subject == n for o in self.timeline)]
                if idle and self.config.via == "queue":
                    self.say(f"nothing done yet on {', '.join(idle)}: is spotd controller reading the queue?")
                elif idle:
                    self.say(f"no agent has acted yet on {', '.join(idle)}: is the spotd agent running there?")
                warned = True
            ends = [self.settled(p, now) for p in self.plans.values()]
            if all(e is not None for e in ends) and self.released_all(now):
                last = max(e for e in ends if e is not None)
                if self.whole() or now >= last + timedelta(seconds=self.config.recovery_timeout):
                    return
            self.changed.clear()
            await wait_set(self.changed, 0.5)

    def released_all(self, now: datetime) -> bool:
        """Via queue: the controller gives each node back at the deadline; the report waits for its final
        word on each (a minute past the deadline at most: a node without one is said in the report)."""
        if self.config.via != "queue":
            return True
        for plan in self.plans.values():
            end = plan.deadline or plan.notice_at + timedelta(seconds=self.config.notice)
            if not release_final(self.released.get(plan.name, "")) and now < end + RELEASE_WAIT:
                return False
        return True

    def release_notes(self) -> list[str]:
        """What the report says of the nodes the controller did not give back (none: all released)."""
        if self.config.via != "queue":
            return []
        notes = []
        for name in self.plans:
            said = self.released.get(name, "")
            if not said:
                notes.append(
                    f"{name}: no word from the controller on its release a minute past the deadline (is it "
                    f"leading?); check the node: a spotd.io/queue-rehearsal annotation naming "
                    f"{self.queue_rehearsal or 'this run'} means the controller has not given it back yet"
                )
            elif said.startswith("SpotdRehearsalNotReleased"):
                notes.append(f"{name}: not released yet, the controller tries again: {said}")
            elif not said.startswith("SpotdRehearsalReleased"):
                notes.append(f"{name}: not released: {said}")
        return notes

    def workload_plans(self) -> list[WorkloadPlan]:
        """Workloads with pods on the nodes at the notice, or whose ready count moved during the rehearsal."""
        moved = {o.subject for o in self.timeline if o.fact == Fact.READY}
        plans = []
        for ref, desired in self.state.desired.items():
            if ref in self.on_targets or str(ref) in moved:
                placeholder = any(p.spec and (p.spec.priority or 0) < 0 for p in self.state.pods_of(ref))
                plans.append(WorkloadPlan(ref, desired, self.ready_at_notice.get(ref, 0), counted=not placeholder))
        return plans

    def report(self) -> Report:
        notes = list(self.notes) + self.release_notes()
        if self.fis_experiment:
            notes.append(f"notice delivered through AWS FIS experiment {self.fis_experiment}")
        return build_report(
            self.plans.values(),
            self.workload_plans(),
            self.timeline,
            started_at=self.started_at,
            finished_at=datetime.now(UTC),
            recovery_timeout=self.config.recovery_timeout,
            notes=notes,
        )

    # -- end --
    async def terminate(self) -> None:
        deadlines = [p.deadline for p in self.plans.values() if p.deadline is not None]
        if deadlines:
            wait = (max(deadlines) - datetime.now(UTC)).total_seconds()
            if wait > 0:
                self.say(f"terminating {len(self.targets)} instances at the deadline, in {wait:.0f}s")
                await asyncio.sleep(wait)
        if self.terminator is None:
            await asyncio.to_thread(terminate_instances, self.targets)
        else:
            await self.terminator(self.targets)
        self.say(f"terminated {', '.join(t.instance_id or t.name for t in self.targets)}")

    async def clean_up(self) -> None:
        """Remove our rehearsal request (the agents then release the nodes still alive)."""
        if self.client is None or self.request is None:
            return
        where = f"{self.config.namespace}/{self.request}"
        try:
            await self.client.delete(ConfigMap, self.request, namespace=self.config.namespace)
            self.request = None
        except ApiError as exc:
            if exc.status.code == 404:
                self.request = None
            else:
                self.say(f"could not remove the rehearsal request {where}: {exc}")
        except OSError as exc:
            self.say(f"could not remove the rehearsal request {where}: {exc!r}")


# The controller's word on a queue rehearsal's node: given back, left as it is (a real notice holds it),
# refused or "not acted on" (SpotdQueueRehearsal) at the start, or a release that failed and is tried again
# (not final)
RELEASE_REASONS = (
    "SpotdRehearsalReleased",
    "SpotdRehearsalHeld",
    "SpotdRehearsalRefused",
    "SpotdQueueRehearsal",
    "SpotdRehearsalNotReleased",
)
RELEASE_WAIT = timedelta(minutes=1)


def release_final(said: str) -> bool:
    """Whether the controller's word (reason: message) on a node ends the wait for its release."""
    return bool(said) and not said.startswith("SpotdRehearsalNotReleased")


# Node Events that end a node's drain: the agent's, and the controller's when it drained for a silent agent
DRAIN_FACTS = {
    "DrainComplete": Fact.DRAINED,
    "DrainIncomplete": Fact.DRAIN_INCOMPLETE,
    "SpotdTakeoverComplete": Fact.DRAINED,
    "SpotdTakeoverIncomplete": Fact.DRAIN_INCOMPLETE,
}


def _version(listing: Any) -> str | None:
    try:
        return str(listing.resourceVersion) or None
    except Exception:  # an empty list may carry none; the watch then starts from now
        return None
