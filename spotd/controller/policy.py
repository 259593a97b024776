"""Which on-demand nodes to drain back to Spot, and why (pure).

Everything here takes plain records in and returns verdicts with their reason; the controller only
executes them, and the reason is what the Event, the log line and --dry-run print.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

from spotd.common.parsing import format_duration, format_time
from spotd.inventory.records import NodeExtra, NodeInfo, NodePods, PendingPod, Requirement, matches_all
from spotd.kube.keys import (
    DO_NOT_DISRUPT_ANNOTATION,
    DRAIN_ANNOTATION,
    KARPENTER_NODE_LABELS,
    ON_DEMAND,
    SAFE_TO_EVICT_ANNOTATION,
)

# --- the fallback scope: which nodes the controller may ever drain ----------------------------------------


_LABEL_KEY = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")


def parse_label_selector(text: str) -> tuple[Requirement, ...]:
    """'node-pool=fallback,!gpu,tier in (a,b)' -> requirements (ANDed). Forms: k=v, k==v, k!=v, k, !k,
    k in (v1,v2), k notin (v1,v2). ValueError on anything else."""
    out: list[Requirement] = []
    parts: list[str] = []
    depth = 0
    current = ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    for raw in (p.strip() for p in parts):
        if not raw:
            continue
        words = raw.split(None, 1)
        if len(words) == 2 and words[1].split("(", 1)[0].strip() in ("in", "notin") and raw.endswith(")"):
            op = words[1].split("(", 1)[0].strip()
            values = tuple(v.strip() for v in words[1].split("(", 1)[1][:-1].split(",") if v.strip())
            if not values:
                raise ValueError(f"{raw!r} has no values")
            out.append(Requirement(words[0], "In" if op == "in" else "NotIn", values))
        elif "!=" in raw:
            key, value = (x.strip() for x in raw.split("!=", 1))
            out.append(Requirement(key, "NotIn", (value,)))
        elif "=" in raw:
            key, value = (x.strip() for x in raw.replace("==", "=").split("=", 1))
            out.append(Requirement(key, "In", (value,)))
        elif raw.startswith("!"):
            out.append(Requirement(raw[1:].strip(), "DoesNotExist"))
        else:
            out.append(Requirement(raw, "Exists"))
        last = out[-1]
        if not _LABEL_KEY.fullmatch(last.key) or not all(_LABEL_VALUE.fullmatch(v) for v in last.values):
            raise ValueError(f"{raw!r} is not a label requirement")
    return tuple(out)


@dataclass(frozen=True)
class FallbackScope:
    """The declared fallback capacity. Unconfigured (neither selector nor ASG tag): nothing is in scope."""

    selector: tuple[Requirement, ...] = ()
    selector_text: str = ""
    asg_tag: str = ""  # KEY[=VALUE] of --fallback-asg-tag, for the reasons

    @property
    def configured(self) -> bool:
        return bool(self.selector or self.asg_tag)

    @property
    def selects_karpenter(self) -> bool:
        """Karpenter's nodes are in scope only when the selector names one of its labels explicitly."""
        return any(r.key.startswith("karpenter.sh/") for r in self.selector)


def out_of_scope(node: NodeInfo, scope: FallbackScope, fallback_instances: Collection[str] = ()) -> str | None:
    """Why this node is not declared fallback capacity (never drained), or None when it is.

    fallback_instances: the instance ids of the ASGs carrying --fallback-asg-tag (as last read)."""
    if not scope.configured:
        return "no fallback capacity declared (--fallback-selector / --fallback-asg-tag): nothing is drained"
    labels = dict(node.labels)
    if any(k in labels for k in KARPENTER_NODE_LABELS) and not scope.selects_karpenter:
        return "managed by Karpenter (it consolidates its own nodes; select a karpenter.sh/ label to include)"
    if scope.selector and matches_all(scope.selector, labels):
        return None
    if scope.asg_tag and node.instance_id and node.instance_id in fallback_instances:
        return None
    named = " or ".join(
        x
        for x in (
            f"--fallback-selector {scope.selector_text}" if scope.selector else "",
            f"an ASG tagged {scope.asg_tag}" if scope.asg_tag else "",
        )
        if x
    )
    return f"not fallback capacity (not matched by {named})"


class SpotVerdict(Protocol):
    """Whether Spot capacity is available for a node's pool (capacity.PoolVerdict fits)."""

    @property
    def available(self) -> bool: ...

    @property
    def reason(self) -> str: ...


@dataclass(frozen=True, slots=True)
class SpotAnswer:
    """What the controller's pool lookup returns: available, why, and whether an active probe is due."""

    available: bool
    reason: str
    probe_due: bool = False


@dataclass(frozen=True)
class OnDemandPolicy:
    min_on_demand_age: float = 7200.0
    max_concurrent_drains: int = 1
    max_drains_per_hour: int = 6
    evict_unreplicated: bool = False
    evict_local_storage: bool = False
    evict_jobs: bool = False
    scope: FallbackScope = field(default_factory=FallbackScope)


@dataclass(frozen=True, slots=True)
class Verdict:
    """One on-demand node: drain it or not, and why. probe: a drain to learn whether Spot is back."""

    node: str
    drain: bool
    reason: str
    age: float = 0.0
    probe: bool = False
    hold: str = ""  # what held a drainable node: "pending_pods" (exported as a metric)


def age_text(seconds: float) -> str:
    """18000 -> '5h00m', 300 -> '5m', 42 -> '42s'."""
    seconds = max(0, int(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m"
    return f"{seconds}s"


def drain_withdrawn(node: NodeInfo, scope: FallbackScope, fallback_instances: Collection[str] = ()) -> str | None:
    """Why a drain in flight (or one a previous leader began) must stop now, or None: the node left the
    fallback scope, or was annotated to be left alone, after the drain began."""
    if node.drain_annotation.strip().lower() == "false":
        return f"annotated {DRAIN_ANNOTATION}=false during the drain"
    if node.do_not_disrupt:
        return f"annotated {DO_NOT_DISRUPT_ANNOTATION}=true during the drain"
    outside = out_of_scope(node, scope, fallback_instances)
    return f"left the fallback scope during the drain: {outside}" if outside else None


def node_blocker(node: NodeInfo, policy: OnDemandPolicy, now: datetime) -> str | None:
    """Why this node must not be drained whatever its pods and the capacity say, or None."""
    if node.age(now) < policy.min_on_demand_age:
        return (
            f"younger than --min-on-demand-age ({age_text(node.age(now))} "
            f"< {format_duration(policy.min_on_demand_age)})"
        )
    if node.drain_annotation.strip().lower() == "false":
        return f"annotated {DRAIN_ANNOTATION}=false"
    if node.do_not_disrupt:
        return f"annotated {DO_NOT_DISRUPT_ANNOTATION}=true"
    if node.retry_after is not None and now < node.retry_after:
        return (
            f"last drain ended in {node.retry_outcome or 'failure'} (attempt {node.drain_attempts}); "
            f"not retried before {format_time(node.retry_after)}"
        )
    if node.unschedulable:
        return "cordoned (unschedulable)"
    if not node.ready:
        return "not Ready"
    return None


def pods_blocker(pods: NodePods, policy: OnDemandPolicy) -> str | None:
    """Why this node's pods forbid a voluntary drain, or None."""
    if pods.not_safe_to_evict:
        return f"pod {pods.not_safe_to_evict[0]} is annotated {SAFE_TO_EVICT_ANNOTATION}=false"
    if pods.do_not_disrupt:
        return f"pod {pods.do_not_disrupt[0]} is annotated {DO_NOT_DISRUPT_ANNOTATION}=true"
    if pods.jobs and not policy.evict_jobs:
        return f"pod {pods.jobs[0]} is a running Job (see --evict-jobs)"
    if pods.unreplicated and not policy.evict_unreplicated:
        return f"pod {pods.unreplicated[0]} has no controller (see --evict-unreplicated)"
    if pods.local_storage and not policy.evict_local_storage:
        return f"pod {pods.local_storage[0]} uses local storage (see --evict-local-storage)"
    return None


def drains_in_last_hour(history: Sequence[datetime], now: datetime) -> int:
    since = now - timedelta(hours=1)
    return sum(1 for at in history if at > since)


def competing_pending(node: NodeInfo, pending: Sequence[PendingPod]) -> list[PendingPod]:
    """The Pending pods the node's pods would compete with once evicted: those that could run on a node
    like it (no constraint, or a node selector and required affinity its labels satisfy). A GPU pod
    selecting GPU nodes does not compete with a fallback node's web pods, nor a DaemonSet's pod, pinned to
    its own node, with any other node's."""
    labels = dict(node.labels)
    return [p for p in pending if p.could_run_on(labels, node.name)]


def pending_blocker(node: NodeInfo, pending: int | Sequence[PendingPod]) -> str | None:
    """Why Pending pods hold this node's drain (a drain would only add to them), or None."""
    if isinstance(pending, int):
        return f"{pending} pods Pending for lack of capacity" if pending > 0 else None
    competing = competing_pending(node, pending)
    if not competing:
        return None
    first = competing[0].key
    return f"{len(competing)} pods Pending for lack of capacity that this node's pods would compete with ({first})"


def choose_drains(
    nodes: Iterable[NodeInfo],
    pods: Mapping[str, NodePods],  # may be lazy: read only for nodes past node_blocker
    pending: int | Sequence[PendingPod],
    spot_for: Callable[[NodeInfo], SpotAnswer],
    now: datetime,
    policy: OnDemandPolicy,
    in_flight: Collection[str] = (),
    history: Sequence[datetime] = (),
    fallback_instances: Collection[str] = (),
) -> list[Verdict]:
    """One verdict per on-demand node in the fallback scope, oldest first; drain=True for at most the
    drains the budget allows. Nodes out of scope get no verdict: they are never candidates.

    pending: pods Pending because no node fits (a count holds every node; records hold only the nodes
    whose pods they would compete with). spot_for: the pool answer for a node (available, reason, probe
    due). in_flight: nodes being drained now; history: start times of past drains (for
    --max-drains-per-hour). fallback_instances: instance ids of the ASGs tagged --fallback-asg-tag.
    """
    candidates = sorted(
        (
            n
            for n in nodes
            if n.capacity_type == ON_DEMAND and out_of_scope(n, policy.scope, fallback_instances) is None
        ),
        key=lambda n: (n.created, n.name),
    )
    budget = policy.max_concurrent_drains - len(in_flight)
    hourly_left = policy.max_drains_per_hour - drains_in_last_hour(history, now)
    verdicts: list[Verdict] = []
    probing = False
    for node in candidates:
        age = node.age(now)

        def no(reason: str, node: NodeInfo = node, age: float = age) -> None:
            verdicts.append(Verdict(node.name, False, reason, age))

        if node.name in in_flight:
            no("drain in progress")
            continue
        blocker = node_blocker(node, policy, now) or pods_blocker(pods.get(node.name, NodePods()), policy)
        if blocker is not None:
            no(blocker)
            continue
        answer = spot_for(node)
        probe = False
        if not answer.available:
            if not answer.probe_due or probing:
                no(f"no Spot capacity: {answer.reason}")
                continue
            probe = True
        held = pending_blocker(node, pending)
        if held is not None:
            verdicts.append(Verdict(node.name, False, held, age, hold="pending_pods"))
            continue
        if budget <= 0:
            no(f"--max-concurrent-drains ({policy.max_concurrent_drains}) reached")
            continue
        if hourly_left <= 0:
            no(f"--max-drains-per-hour ({policy.max_drains_per_hour}) reached")
            continue
        budget -= 1
        hourly_left -= 1
        if probe:
            probing = True
            verdicts.append(Verdict(node.name, True, f"probe: {answer.reason}", age, probe=True))
        else:
            verdicts.append(
                Verdict(
                    node.name,
                    True,
                    f"on-demand for {age_text(age)}, Spot available: {answer.reason}",
                    age,
                )
            )
    return verdicts


def out_of_service_due(node: NodeInfo, extra: NodeExtra, now: datetime) -> str | None:
    """Why the node should get node.kubernetes.io/out-of-service now, or None: the interruption deadline
    the agent recorded has passed and the node is NotReady (the instance is gone), and it is not there yet.
    Any node, in the fallback scope or not: this only lets the control plane finish what the reclaim began."""
    if extra.out_of_service or extra.notice_deadline is None or now < extra.notice_deadline or node.ready:
        return None
    return f"interruption deadline {format_time(extra.notice_deadline)} passed and the node is NotReady"
