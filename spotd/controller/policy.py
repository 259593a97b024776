"""Which on-demand nodes to drain back to Spot, and why (pure).

Everything here takes plain records in and returns verdicts with their reason; the controller only
executes them, and the reason is what the Event, the log line and --dry-run print.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from spotd.common.parsing import format_duration
from spotd.inventory.records import NodeInfo, NodePods
from spotd.kube.keys import DRAIN_ANNOTATION, ON_DEMAND, SAFE_TO_EVICT_ANNOTATION


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


@dataclass(frozen=True, slots=True)
class Verdict:
    """One on-demand node: drain it or not, and why. probe: a drain to learn whether Spot is back."""

    node: str
    drain: bool
    reason: str
    age: float = 0.0
    probe: bool = False


def age_text(seconds: float) -> str:
    """18000 -> '5h00m', 300 -> '5m', 42 -> '42s'."""
    seconds = max(0, int(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m"
    return f"{seconds}s"


def node_blocker(node: NodeInfo, policy: OnDemandPolicy, now: datetime) -> str | None:
    """Why this node must not be drained whatever its pods and the capacity say, or None."""
    if node.age(now) < policy.min_on_demand_age:
        return (
            f"younger than --min-on-demand-age ({age_text(node.age(now))} "
            f"< {format_duration(policy.min_on_demand_age)})"
        )
    if node.drain_annotation.strip().lower() == "false":
        return f"annotated {DRAIN_ANNOTATION}=false"
    if node.unschedulable:
        return "cordoned (unschedulable)"
    if not node.ready:
        return "not Ready"
    return None


def pods_blocker(pods: NodePods, policy: OnDemandPolicy) -> str | None:
    """Why this node's pods forbid a voluntary drain, or None."""
    if pods.not_safe_to_evict:
        return f"pod {pods.not_safe_to_evict[0]} is annotated {SAFE_TO_EVICT_ANNOTATION}=false"
    if pods.unreplicated and not policy.evict_unreplicated:
        return f"pod {pods.unreplicated[0]} has no controller (see --evict-unreplicated)"
    if pods.local_storage and not policy.evict_local_storage:
        return f"pod {pods.local_storage[0]} uses local storage (see --evict-local-storage)"
    return None


def drains_in_last_hour(history: Sequence[datetime], now: datetime) -> int:
    since = now - timedelta(hours=1)
    return sum(1 for at in history if at > since)


def choose_drains(
    nodes: Iterable[NodeInfo],
    pods: Mapping[str, NodePods],  # may be lazy: read only for nodes past node_blocker
    pending_unschedulable: int,
    spot_for: Callable[[NodeInfo], SpotAnswer],
    now: datetime,
    policy: OnDemandPolicy,
    in_flight: Collection[str] = (),
    history: Sequence[datetime] = (),
) -> list[Verdict]:
    """One verdict per on-demand node, oldest first; drain=True for at most the drains the budget allows.

    pending_unschedulable: pods Pending because no node fits; a drain would only add to them.
    spot_for: the pool answer for a node (available, reason, probe due).
    in_flight: nodes being drained now; history: start times of past drains (for --max-drains-per-hour).
    """
    candidates = sorted((n for n in nodes if n.capacity_type == ON_DEMAND), key=lambda n: (n.created, n.name))
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
        if pending_unschedulable > 0:
            no(f"{pending_unschedulable} pods Pending for lack of capacity")
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
