"""Which pods a drain evicts, in which order, with which grace (pure).

Nothing here does I/O. Each verdict carries its reason: the reason is what Events, logs and --dry-run print.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from enum import StrEnum

from spotd.kube.keys import DO_NOT_DISRUPT_ANNOTATION, SAFE_TO_EVICT_ANNOTATION


class PodVerdict(StrEnum):
    EVICT = "evict"
    WAIT = "wait"  # already terminating: counted as left until gone; asked again if its grace ends too late
    SKIP = "skip"  # left on the node on purpose (DaemonSet, mirror, completed)
    BLOCK = "block"  # voluntary drains refuse to touch it, and so refuse to drain the node


# The least grace period spotd ever asks for: 0 is a force delete (kubectl refuses it without --force).
MIN_GRACE_SECONDS = 1


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
    do_not_disrupt: bool = False  # karpenter.sh/do-not-disrupt=true
    priority: int = 0
    grace_seconds: int = 30
    deletion_grace_seconds: int | None = None  # of a terminating pod: the grace its deletion was given

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class PodPolicy:
    """Which pods a drain may touch: voluntary drains (the controller's) refuse more."""

    voluntary: bool = False
    evict_unreplicated: bool = True
    evict_local_storage: bool = True
    evict_jobs: bool = True  # voluntary drains: running Job pods are batch work, left to finish (--evict-jobs)


@dataclass(frozen=True)
class PodDecision:
    pod: PodFacts
    verdict: PodVerdict
    reason: str


def decide_pod(pod: PodFacts, policy: PodPolicy) -> PodDecision:
    if pod.mirror:
        return PodDecision(pod, PodVerdict.SKIP, "mirror pod (managed by the kubelet)")
    if "DaemonSet" in pod.owner_kinds:
        return PodDecision(pod, PodVerdict.SKIP, "DaemonSet pod")
    if pod.phase in ("Succeeded", "Failed"):
        # Nothing runs in it: it does not hold the node up, and spotd has no power to delete pods.
        return PodDecision(pod, PodVerdict.SKIP, f"completed ({pod.phase}), left alone")
    if pod.terminating:
        return PodDecision(pod, PodVerdict.WAIT, "already terminating")
    if policy.voluntary:
        if pod.safe_to_evict == "false":
            return PodDecision(pod, PodVerdict.BLOCK, f"annotated {SAFE_TO_EVICT_ANNOTATION}=false")
        if pod.do_not_disrupt:
            return PodDecision(pod, PodVerdict.BLOCK, f"annotated {DO_NOT_DISRUPT_ANNOTATION}=true")
        if "Job" in pod.owner_kinds and not policy.evict_jobs:
            return PodDecision(pod, PodVerdict.BLOCK, "a running Job pod (see --evict-jobs)")
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


def plan_drain(pods: Iterable[PodFacts], policy: PodPolicy) -> DrainPlan:
    """Lowest priority first, so that under a rate limit the critical pods keep running longest."""
    decisions = sorted((decide_pod(p, policy) for p in pods), key=lambda d: (d.pod.priority, d.pod.ref))
    blocked = tuple(d for d in decisions if d.verdict == PodVerdict.BLOCK)
    return DrainPlan(tuple(decisions), blocked)


def eviction_grace(pod: PodFacts, seconds_left: float | None, safety_margin: float) -> int | None:
    """Grace period to ask for (None: the pod's own).

    The pod's own, capped at the time left before the deadline minus the margin; inside the margin (or
    past the deadline) what is left, and never less than MIN_GRACE_SECONDS: no path asks for a force delete.
    """
    if seconds_left is None:
        return None
    room = int(seconds_left - safety_margin)
    if room < MIN_GRACE_SECONDS:
        room = int(seconds_left)
    if room >= pod.grace_seconds:
        return None
    return max(MIN_GRACE_SECONDS, room)


def shorter_grace(pod: PodFacts, seconds_left: float | None, safety_margin: float) -> int | None:
    """For a pod already terminating: the shorter grace to ask again with, or None when its deletion's
    grace already fits before the deadline (an eviction with a shorter grace shortens a deletion; a longer
    one never extends it). Compares grace periods only, so the node's clock does not matter."""
    if not pod.terminating or pod.deletion_grace_seconds is None:
        return None
    wanted = eviction_grace(replace(pod, grace_seconds=pod.deletion_grace_seconds), seconds_left, safety_margin)
    if wanted is None or wanted >= pod.deletion_grace_seconds:
        return None
    return wanted


def retry_delay(attempt: int, first: float = 0.1, factor: float = 1.6, cap: float = 2.0) -> float:
    """Back-off after a refused eviction: 0.1 s, 0.16 s, 0.26 s ... capped at 2 s (kubectl waits 5 s flat)."""
    return float(min(cap, first * factor**attempt))
