"""Pure decisions: what to do about a set of notices, and which pods a drain evicts.

Nothing here does I/O. Each verdict carries its reason: the reason is what Events, logs and --dry-run print.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from spotd.notices import Notice, NoticeKind

INTERRUPTION_TAINT_KEY = "spotd.io/interruption"
EXCLUDE_LB_LABEL = "node.kubernetes.io/exclude-from-external-load-balancers"
NOTICE_ANNOTATION = "spotd.io/notice"
STATE_ANNOTATION = "spotd.io/state"
SIMULATION_ANNOTATION = "spotd.io/simulate-reclaim"
SAFE_TO_EVICT_ANNOTATION = "cluster-autoscaler.kubernetes.io/safe-to-evict"
MIRROR_ANNOTATION = "kubernetes.io/config.mirror"


class Step(StrEnum):
    TAINT = "taint"
    CORDON = "cordon"
    EXCLUDE_LB = "exclude-lb"
    DRAIN = "drain"


STEP_ORDER = (Step.TAINT, Step.CORDON, Step.EXCLUDE_LB, Step.DRAIN)
TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")


@dataclass(frozen=True)
class NoticePolicy:
    """How to respond to one kind of notice. lead_time: act this long before the deadline (maintenance)."""

    steps: frozenset[Step]
    taint_effect: str = "NoSchedule"
    lead_time: timedelta | None = None


def default_policies(maintenance_lead: timedelta = timedelta(minutes=15)) -> dict[NoticeKind, NoticePolicy]:
    full = frozenset(STEP_ORDER)
    return {
        NoticeKind.SPOT_ITN: NoticePolicy(full, "NoSchedule"),
        NoticeKind.ASG_TERMINATION: NoticePolicy(full, "NoSchedule"),
        NoticeKind.REBALANCE: NoticePolicy(frozenset({Step.TAINT}), "PreferNoSchedule"),
        NoticeKind.SCHEDULED_MAINTENANCE: NoticePolicy(
            frozenset({Step.CORDON, Step.DRAIN}), "NoSchedule", maintenance_lead
        ),
    }


def parse_steps(text: str) -> frozenset[Step]:
    """'taint,cordon,drain' -> steps; 'none' -> no steps."""
    if text.strip().lower() in ("", "none"):
        return frozenset()
    steps = set()
    for part in text.split(","):
        try:
            steps.add(Step(part.strip().lower()))
        except ValueError:
            allowed = ", ".join(s.value for s in STEP_ORDER)
            raise ValueError(f"{part.strip()!r} is not a step (use {allowed} or none)") from None
    return frozenset(steps)


# A Spot reclaim beats everything; maintenance and ASG termination are as final; rebalance is advice.
_SEVERITY = {
    NoticeKind.SPOT_ITN: 3,
    NoticeKind.ASG_TERMINATION: 3,
    NoticeKind.SCHEDULED_MAINTENANCE: 2,
    NoticeKind.REBALANCE: 1,
}


def governing_notice(notices: Iterable[Notice]) -> Notice | None:
    """The notice to act on: the most severe active one, the earliest deadline among equals."""
    active = [n for n in notices if n.state == "active"]
    if not active:
        return None
    far = datetime.max.replace(tzinfo=None)

    def rank(n: Notice) -> tuple[int, datetime]:
        deadline = n.deadline.replace(tzinfo=None) if n.deadline else far
        return (-_SEVERITY[n.kind], deadline)

    return min(active, key=rank)


@dataclass(frozen=True)
class Response:
    """What the node should look like for a notice, and from when."""

    notice: Notice
    steps: tuple[Step, ...]
    taint_value: str
    taint_effect: str
    act_at: datetime
    deadline: datetime | None
    reason: str

    def due(self, now: datetime) -> bool:
        return now >= self.act_at


def plan_response(notice: Notice, policies: Mapping[NoticeKind, NoticePolicy]) -> Response:
    policy = policies[notice.kind]
    steps = tuple(s for s in STEP_ORDER if s in policy.steps)
    act_at = notice.seen_at
    if policy.lead_time is not None and notice.deadline is not None:
        act_at = max(notice.seen_at, notice.deadline - policy.lead_time)
    when = f"deadline {notice.deadline:%H:%M:%S}Z" if notice.deadline else "no deadline"
    action = f" ({notice.action})" if notice.action else ""
    reason = f"{notice.kind}{action} from {notice.source}, {when}"
    return Response(notice, steps, str(notice.kind), policy.taint_effect, act_at, notice.deadline, reason)


@dataclass(frozen=True)
class Release:
    release: bool
    reason: str


def plan_release(
    acting: Notice,
    current: Sequence[Notice],
    complete: bool,
    boot_changed: bool,
) -> Release:
    """Whether to undo what was done for `acting` (uncordon, untaint).

    Only a scheduled-maintenance or a simulated notice ever ends with the node alive, or a Spot
    stop/hibernate after which the instance booted again. An incomplete poll never releases.
    """
    same = [n for n in current if n.key == acting.key]
    if acting.source == "simulation":
        if not same:
            return Release(True, "the simulated notice was withdrawn")
        return Release(False, "simulated notice still present")
    if not complete:
        return Release(False, "poll incomplete")
    if acting.kind == NoticeKind.SCHEDULED_MAINTENANCE:
        if same and same[0].state in ("completed", "canceled"):
            return Release(True, f"maintenance event {acting.event_id} {same[0].state}")
        if not same:
            return Release(True, f"maintenance event {acting.event_id} no longer scheduled")
        if boot_changed:
            return Release(True, "the node rebooted after its maintenance")
        return Release(False, "maintenance still scheduled")
    if boot_changed and not same:
        return Release(True, f"the node booted again after {acting.kind}")
    return Release(False, f"{acting.kind} is final")


# ---- which pods a drain evicts ----


class PodVerdict(StrEnum):
    EVICT = "evict"
    DELETE = "delete"  # completed pods: nothing to protect, nothing to evict
    SKIP = "skip"  # left on the node on purpose (DaemonSet, mirror, already terminating)
    BLOCK = "block"  # voluntary drains refuse to touch it, and so refuse to drain the node


@dataclass(frozen=True)
class PodFacts:
    """The few facts about a pod that drain decisions need."""

    namespace: str
    name: str
    phase: str = "Running"
    owner_kinds: tuple[str, ...] = ()
    mirror: bool = False
    terminating: bool = False
    local_storage: bool = False
    safe_to_evict: str | None = None
    priority: int = 0
    grace_seconds: int = 30

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class DrainPolicy:
    voluntary: bool = False
    evict_unreplicated: bool = True
    evict_local_storage: bool = True


@dataclass(frozen=True)
class PodDecision:
    pod: PodFacts
    verdict: PodVerdict
    reason: str


def decide_pod(pod: PodFacts, policy: DrainPolicy) -> PodDecision:
    if pod.mirror:
        return PodDecision(pod, PodVerdict.SKIP, "mirror pod (managed by the kubelet)")
    if "DaemonSet" in pod.owner_kinds:
        return PodDecision(pod, PodVerdict.SKIP, "DaemonSet pod")
    if pod.terminating:
        return PodDecision(pod, PodVerdict.SKIP, "already terminating")
    if pod.phase in ("Succeeded", "Failed"):
        return PodDecision(pod, PodVerdict.DELETE, f"completed ({pod.phase})")
    if policy.voluntary:
        if pod.safe_to_evict == "false":
            return PodDecision(pod, PodVerdict.BLOCK, f"annotated {SAFE_TO_EVICT_ANNOTATION}=false")
        if not pod.owner_kinds and not policy.evict_unreplicated:
            return PodDecision(pod, PodVerdict.BLOCK, "no controller would recreate it")
        if pod.local_storage and not policy.evict_local_storage and pod.safe_to_evict != "true":
            return PodDecision(pod, PodVerdict.BLOCK, "uses local storage (emptyDir)")
    return PodDecision(pod, PodVerdict.EVICT, "evictable")


@dataclass(frozen=True)
class DrainPlan:
    decisions: tuple[PodDecision, ...]
    blocked: tuple[PodDecision, ...] = field(default=())

    def with_verdict(self, verdict: PodVerdict) -> list[PodFacts]:
        return [d.pod for d in self.decisions if d.verdict == verdict]


def plan_drain(pods: Iterable[PodFacts], policy: DrainPolicy) -> DrainPlan:
    """Lowest priority first, so that under a rate limit the critical pods keep running longest."""
    decisions = sorted((decide_pod(p, policy) for p in pods), key=lambda d: (d.pod.priority, d.pod.ref))
    blocked = tuple(d for d in decisions if d.verdict == PodVerdict.BLOCK)
    return DrainPlan(tuple(decisions), blocked)


def eviction_grace(pod: PodFacts, seconds_left: float | None, safety_margin: float) -> int | None:
    """Grace period to ask for: the pod's own, capped at the time left before the deadline minus margin."""
    if seconds_left is None:
        return None
    room = int(seconds_left - safety_margin)
    if room >= pod.grace_seconds:
        return None
    return max(0, room)


def retry_delay(attempt: int, first: float = 0.1, factor: float = 1.6, cap: float = 2.0) -> float:
    """Back-off after a refused eviction: 0.1 s, 0.16 s, 0.26 s ... capped at 2 s (kubectl waits 5 s flat)."""
    return float(min(cap, first * factor**attempt))
