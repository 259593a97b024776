"""Pure decisions: what the agent does about a set of notices, and when it lets go of its node.

Nothing here does I/O. Each verdict carries its reason: the reason is what Events, logs and --dry-run print.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from spotd.kube.keys import (  # noqa: F401  re-exported: the agent's vocabulary
    EXCLUDE_LB_LABEL,
    INTERRUPTION_TAINT_KEY,
    NOTICE_ANNOTATION,
    SIMULATION_ANNOTATION,
    STATE_ANNOTATION,
)
from spotd.notices.record import Notice, NoticeKind


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
