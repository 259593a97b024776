"""Table tests for the pure decisions: which notice governs, what it asks for, when to release, which pods go."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest

from spotd.agent.policy import Step, default_policies, governing_notice, parse_steps, plan_release, plan_response
from spotd.drain.plan import PodFacts, PodPolicy, PodVerdict, decide_pod, eviction_grace, plan_drain, retry_delay
from spotd.notices.record import Notice, NoticeKind

NOW = datetime(2026, 11, 25, 10, 0, 0, tzinfo=UTC)


def notice(kind: NoticeKind, deadline_in: float | None = 120, **kw: object) -> Notice:
    deadline = NOW + timedelta(seconds=deadline_in) if deadline_in is not None else None
    return Notice(kind, str(kw.pop("source", "imds")), NOW, deadline, **kw)  # type: ignore[arg-type]


ITN = notice(NoticeKind.SPOT_ITN, action="terminate")
REBALANCE = notice(NoticeKind.REBALANCE, None, event_id="2026-11-25T09:59:00.000Z")
MAINT = notice(NoticeKind.SCHEDULED_MAINTENANCE, 3600, event_id="instance-event-1", action="system-reboot")
ASG = notice(NoticeKind.ASG_TERMINATION, 120, action="terminate")


@pytest.mark.parametrize(
    ("notices", "expected"),
    [
        ([], None),
        ([REBALANCE], REBALANCE),
        ([REBALANCE, ITN], ITN),
        ([MAINT, REBALANCE], MAINT),
        ([MAINT, ITN], ITN),
        ([notice(NoticeKind.SCHEDULED_MAINTENANCE, 60, event_id="b"), MAINT], "b"),
        ([Notice(NoticeKind.SCHEDULED_MAINTENANCE, "imds", NOW, NOW, state="completed", event_id="x")], None),
    ],
)
def test_governing_notice(notices: list[Notice], expected: object) -> None:
    got = governing_notice(notices)
    if isinstance(expected, str):
        assert got is not None and got.event_id == expected
    else:
        assert got == expected


@pytest.mark.parametrize(
    ("n", "steps", "effect"),
    [
        (ITN, (Step.TAINT, Step.CORDON, Step.EXCLUDE_LB, Step.DRAIN), "NoSchedule"),
        (ASG, (Step.TAINT, Step.CORDON, Step.EXCLUDE_LB, Step.DRAIN), "NoSchedule"),
        (REBALANCE, (Step.TAINT,), "PreferNoSchedule"),
        (MAINT, (Step.CORDON, Step.DRAIN), "NoSchedule"),
    ],
)
def test_default_response(n: Notice, steps: tuple[Step, ...], effect: str) -> None:
    response = plan_response(n, default_policies())
    assert response.steps == steps
    assert response.taint_effect == effect
    assert response.taint_value == str(n.kind)


def test_maintenance_waits_for_its_lead_time() -> None:
    response = plan_response(MAINT, default_policies(timedelta(minutes=15)))
    assert response.act_at == MAINT.deadline - timedelta(minutes=15)  # type: ignore[operator]
    assert not response.due(NOW)
    assert response.due(NOW + timedelta(minutes=45))
    soon = notice(NoticeKind.SCHEDULED_MAINTENANCE, 300, event_id="soon")
    assert plan_response(soon, default_policies()).due(NOW)


def test_itn_acts_at_once_and_reason_names_kind_source_deadline() -> None:
    response = plan_response(ITN, default_policies())
    assert response.due(NOW)
    assert "spot-itn" in response.reason and "imds" in response.reason and "10:02:00" in response.reason


@pytest.mark.parametrize(
    ("acting", "current", "complete", "boot_changed", "release"),
    [
        (ITN, [ITN], True, False, False),
        (ITN, [], True, False, False),  # an ITN is final even if IMDS stops showing it
        (ITN, [], True, True, True),  # stop/hibernate, then booted again
        (MAINT, [MAINT], True, False, False),
        (MAINT, [], True, False, True),
        (MAINT, [], False, False, False),  # an incomplete poll never releases
        (
            MAINT,
            [
                Notice(
                    NoticeKind.SCHEDULED_MAINTENANCE, "imds", NOW, NOW, event_id="instance-event-1", state="completed"
                )
            ],
            True,
            False,
            True,
        ),
        (
            MAINT,
            [Notice(NoticeKind.SCHEDULED_MAINTENANCE, "imds", NOW, NOW, event_id="instance-event-1", state="canceled")],
            True,
            False,
            True,
        ),
        (MAINT, [MAINT], True, True, True),
        (notice(NoticeKind.SPOT_ITN, source="simulation"), [], False, False, True),
        (
            notice(NoticeKind.SPOT_ITN, source="simulation"),
            [notice(NoticeKind.SPOT_ITN, source="simulation")],
            True,
            False,
            False,
        ),
        (REBALANCE, [], True, False, False),
    ],
)
def test_plan_release(acting: Notice, current: list[Notice], complete: bool, boot_changed: bool, release: bool) -> None:
    verdict = plan_release(acting, current, complete, boot_changed)
    assert verdict.release is release, verdict.reason
    assert verdict.reason


def test_parse_steps() -> None:
    assert parse_steps("taint, cordon") == {Step.TAINT, Step.CORDON}
    assert parse_steps("none") == frozenset()
    with pytest.raises(ValueError, match="'nuke' is not a step"):
        parse_steps("taint,nuke")


def pod(name: str, **kw: object) -> PodFacts:
    return PodFacts("default", name, **kw)  # type: ignore[arg-type]


EMERGENCY = PodPolicy()
VOLUNTARY = PodPolicy(voluntary=True, evict_unreplicated=False, evict_local_storage=False, evict_jobs=False)


@pytest.mark.parametrize(
    ("facts", "policy", "verdict"),
    [
        (pod("web", owner_kinds=("ReplicaSet",)), EMERGENCY, PodVerdict.EVICT),
        (pod("ds", owner_kinds=("DaemonSet",)), EMERGENCY, PodVerdict.SKIP),
        (pod("static", mirror=True), EMERGENCY, PodVerdict.SKIP),
        (pod("going", owner_kinds=("ReplicaSet",), terminating=True), EMERGENCY, PodVerdict.SKIP),
        # completed pods are never deleted, by anyone: left for the node's removal
        (pod("job", owner_kinds=("Job",), phase="Succeeded"), EMERGENCY, PodVerdict.SKIP),
        (pod("failed", phase="Failed"), EMERGENCY, PodVerdict.SKIP),
        (pod("job", owner_kinds=("Job",), phase="Succeeded"), VOLUNTARY, PodVerdict.SKIP),
        (pod("batch", owner_kinds=("Job",)), VOLUNTARY, PodVerdict.BLOCK),
        (pod("batch", owner_kinds=("Job",)), PodPolicy(voluntary=True, evict_jobs=True), PodVerdict.EVICT),
        (pod("batch", owner_kinds=("Job",)), EMERGENCY, PodVerdict.EVICT),
        (pod("busy", owner_kinds=("ReplicaSet",), do_not_disrupt=True), VOLUNTARY, PodVerdict.BLOCK),
        (pod("busy", owner_kinds=("ReplicaSet",), do_not_disrupt=True), EMERGENCY, PodVerdict.EVICT),
        (pod("bare"), EMERGENCY, PodVerdict.EVICT),  # the node dies anyway
        (pod("bare"), VOLUNTARY, PodVerdict.BLOCK),
        (pod("cache", owner_kinds=("ReplicaSet",), local_storage=True), VOLUNTARY, PodVerdict.BLOCK),
        (
            pod("cache", owner_kinds=("ReplicaSet",), local_storage=True, safe_to_evict="true"),
            VOLUNTARY,
            PodVerdict.EVICT,
        ),
        (pod("pinned", owner_kinds=("ReplicaSet",), safe_to_evict="false"), VOLUNTARY, PodVerdict.BLOCK),
        (pod("pinned", owner_kinds=("ReplicaSet",), safe_to_evict="false"), EMERGENCY, PodVerdict.EVICT),
        (pod("web", owner_kinds=("ReplicaSet",)), VOLUNTARY, PodVerdict.EVICT),
    ],
)
def test_decide_pod(facts: PodFacts, policy: PodPolicy, verdict: PodVerdict) -> None:
    decision = decide_pod(facts, policy)
    assert decision.verdict == verdict, decision.reason


def test_plan_drain_orders_low_priority_first_and_lists_blockers() -> None:
    plan = plan_drain(
        [
            pod("crit", priority=1000, owner_kinds=("ReplicaSet",)),
            pod("low", priority=-10, owner_kinds=("ReplicaSet",)),
            pod("bare"),
        ],
        VOLUNTARY,
    )
    assert [d.pod.name for d in plan.decisions] == ["low", "bare", "crit"]
    assert [d.pod.name for d in plan.blocked] == ["bare"]


@pytest.mark.parametrize(
    ("grace", "left", "margin", "expected"),
    [
        (30, 120.0, 10.0, None),  # plenty of time: the pod's own grace
        (300, 120.0, 10.0, 110),  # capped at the time left minus the margin
        (30, 25.0, 10.0, 15),
        (30, 5.0, 10.0, 0),
        (30, None, 10.0, None),  # no deadline
    ],
)
def test_eviction_grace(grace: int, left: float | None, margin: float, expected: int | None) -> None:
    assert eviction_grace(pod("p", grace_seconds=grace), left, margin) == expected


def test_retry_delay_starts_well_under_a_second_and_grows_to_a_cap() -> None:
    delays = [retry_delay(i) for i in range(12)]
    assert delays[0] < 0.5
    assert all(b >= a for a, b in itertools.pairwise(delays))
    assert max(delays) == 2.0
