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
# No NoExecute: the taint manager would then delete the pods, PDBs ignored (evictions only, always).
TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule")


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


# AWS gives a Spot interruption two minutes: a `time` further than that from our first sighting says more
# about this node's clock than about AWS.
SPOT_ITN_WARNING = timedelta(minutes=2)


def safe_deadline(notice: Notice) -> datetime | None:
    """The deadline the agent counts down to: for a Spot interruption, the earlier of its `time` and the
    first sighting + 2 minutes (a `time` later than that says more about this node's clock than AWS's).

    One `time` is not believed: one already past at the first sighting of a terminate or stop notice that
    IMDS did not hold at the reading before (`absent_before`). Such a notice was issued since, and AWS
    issues them ahead of the action, so this node's clock runs ahead; believed, it would give 1-second
    graces. The deadline is then that reading + 2 minutes. A `time` short of 2 minutes but still ahead is
    believed (a shorter warning, or a clock a little ahead: the graces shrink, they do not vanish).
    Hibernation gets no two-minute warning; a notice of unknown age (present when the agent started) may
    truly be past.
    """
    if notice.deadline is None:
        return None
    if notice.kind == NoticeKind.SPOT_ITN:
        before = notice.absent_before
        if before is not None and notice.action in ("terminate", "stop") and notice.deadline <= notice.seen_at:
            return min(before, notice.seen_at) + SPOT_ITN_WARNING
        return min(notice.deadline, notice.seen_at + SPOT_ITN_WARNING)
    return notice.deadline


@dataclass(frozen=True)
class Response:
    """What the node should look like for a notice, and from when.

    deadline: when the node is expected to go (the drain's cutoff, the deadline action's moment); None
    for a voluntary drain (scheduled maintenance: PDBs honoured until the event ends, never a deadline
    action). report_at: when pods still on the node are worth an Event and an alert (maintenance's
    NotBefore). deadline_action: whether --deadline-action may apply at all (never for rehearsals).
    """

    notice: Notice
    steps: tuple[Step, ...]
    taint_value: str
    taint_effect: str
    act_at: datetime
    deadline: datetime | None
    reason: str
    report_at: datetime | None = None
    deadline_action: bool = True

    def due(self, now: datetime) -> bool:
        return now >= self.act_at


def plan_response(notice: Notice, policies: Mapping[NoticeKind, NoticePolicy]) -> Response:
    policy = policies[notice.kind]
    steps = tuple(s for s in STEP_ORDER if s in policy.steps)
    act_at = notice.seen_at
    if policy.lead_time is not None and notice.deadline is not None:
        act_at = max(notice.seen_at, notice.deadline - policy.lead_time)
    deadline = safe_deadline(notice)
    when = f"deadline {deadline:%H:%M:%S}Z" if deadline else "no deadline"
    action = f" ({notice.action})" if notice.action else ""
    reason = f"{notice.kind}{action} from {notice.source}, {when}"
    if notice.kind == NoticeKind.SCHEDULED_MAINTENANCE:
        # A voluntary disruption: evictions honour PDBs until the event ends; NotBefore is when to tell.
        return Response(
            notice, steps, str(notice.kind), policy.taint_effect, act_at, None, reason, deadline, deadline_action=False
        )
    rehearsal = notice.source == "simulation"
    return Response(
        notice, steps, str(notice.kind), policy.taint_effect, act_at, deadline, reason, deadline_action=not rehearsal
    )


@dataclass(frozen=True)
class Choice:
    """The response to act on now (None: nothing due), and the next one waiting for its time."""

    due: Response | None
    waiting: Response | None


def choose_response(notices: Iterable[Notice], policies: Mapping[NoticeKind, NoticePolicy], now: datetime) -> Choice:
    """The governing notice among those due now; one not due yet (a maintenance hours ahead) never hides
    one that is (a rebalance recommendation now)."""
    responses = [plan_response(n, policies) for n in notices if n.state == "active"]
    due = [r for r in responses if r.due(now)]
    waiting = [r for r in responses if not r.due(now)]
    governing = governing_notice(r.notice for r in due)
    first_waiting = min(waiting, key=lambda r: r.act_at.replace(tzinfo=None), default=None)
    return Choice(next((r for r in due if r.notice is governing), None), first_waiting)


@dataclass(frozen=True)
class Release:
    release: bool
    reason: str


def plan_release(
    acting: Notice,
    current: Sequence[Notice],
    complete: bool,
    boot_changed: bool,
    unconfirmed: bool = False,
) -> Release:
    """Whether to undo what was done for `acting` (uncordon, untaint).

    Only a scheduled-maintenance or a simulated notice ever ends with the node alive, or a Spot
    stop/hibernate after which the instance booted again. An incomplete poll never releases.
    unconfirmed: `acting` was only read back from the node's annotation (a restart) and no source has
    shown it since; anyone who may patch the Node could have written it, so a complete poll without it
    ends it.
    """
    same = [n for n in current if n.key == acting.key]
    if acting.source == "simulation":
        if not same:
            return Release(True, "the simulated notice was withdrawn")
        return Release(False, "simulated notice still present")
    if not complete:
        return Release(False, "poll incomplete")
    if unconfirmed and not same:
        return Release(True, f"the {acting.kind} read back from the node is not in IMDS")
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
