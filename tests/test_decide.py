"""Table tests for the pure decisions: which notice governs, what it asks for, when to release, which pods go."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest

from spotd.agent.policy import (
    TAINT_EFFECTS,
    Step,
    choose_response,
    default_policies,
    governing_notice,
    parse_steps,
    plan_release,
    plan_response,
    safe_deadline,
)
from spotd.drain.plan import (
    PodFacts,
    PodPolicy,
    PodVerdict,
    decide_pod,
    eviction_grace,
    plan_drain,
    retry_delay,
    shorter_grace,
)
from spotd.notices.record import (
    Notice,
    NoticeKind,
    RehearsalRequestRefused,
    parse_rehearsal_request,
    rehearsal_nodes,
)

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
        (pod("going", owner_kinds=("ReplicaSet",), terminating=True), EMERGENCY, PodVerdict.WAIT),
        (pod("going", owner_kinds=("ReplicaSet",), terminating=True), VOLUNTARY, PodVerdict.WAIT),
        (pod("ds-going", owner_kinds=("DaemonSet",), terminating=True), EMERGENCY, PodVerdict.SKIP),
        (pod("job", owner_kinds=("Job",), phase="Succeeded"), EMERGENCY, PodVerdict.SKIP),  # no pod delete power
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
        (30, 5.0, 10.0, 5),  # inside the margin: what is left, not a force delete
        (30, 0.4, 10.0, 1),  # never below 1 s
        (30, -30.0, 10.0, 1),  # first seen (or resumed) after its deadline
        (30, 0.5, 0.0, 1),  # --safety-margin 0
        (1, 0.5, 0.0, 1),
        (30, None, 10.0, None),  # no deadline
    ],
)
def test_eviction_grace(grace: int, left: float | None, margin: float, expected: int | None) -> None:
    assert eviction_grace(pod("p", grace_seconds=grace), left, margin) == expected


@pytest.mark.parametrize(
    ("deletion_grace", "left", "margin", "expected"),
    [
        (600, 60.0, 10.0, 50),  # its deletion would outlive the node: asked again, shorter
        (30, 60.0, 10.0, None),  # its deletion fits before the deadline whenever it began
        (600, -5.0, 10.0, 1),
        (1, -5.0, 10.0, None),  # nothing shorter to ask for
        (600, None, 10.0, None),  # no deadline (maintenance, voluntary): wait for it
        (None, 60.0, 10.0, None),
    ],
)
def test_shorter_grace_for_a_terminating_pod(
    deletion_grace: int | None, left: float | None, margin: float, expected: int | None
) -> None:
    facts = pod("p", grace_seconds=600, terminating=True, deletion_grace_seconds=deletion_grace)
    assert shorter_grace(facts, left, margin) == expected


@pytest.mark.parametrize(
    ("time_in", "expected_in"),
    [
        (120, 120),
        (100, 100),  # AWS's time, when earlier
        (180, 120),  # a node clock a minute behind: the first sighting + 2 minutes bounds it
        (-30, -30),  # first seen after its time
    ],
)
def test_spot_itn_deadline_is_the_earlier_of_its_time_and_two_minutes_after_first_sighting(
    time_in: float, expected_in: float
) -> None:
    n = notice(NoticeKind.SPOT_ITN, time_in, action="terminate")
    assert safe_deadline(n) == NOW + timedelta(seconds=expected_in)
    assert plan_response(n, default_policies()).deadline == NOW + timedelta(seconds=expected_in)


@pytest.mark.parametrize(
    ("time_in", "absent_in", "action", "expected_in"),
    [
        (120, -0.25, "terminate", 120),  # a right clock: nothing changes
        (100, -0.25, "terminate", 100),  # a shorter warning (or a clock 20 s ahead): believed
        (60, -0.25, "terminate", 60),
        (0, -0.25, "terminate", 119.75),  # already due when first seen, a poll after it was absent
        (-180, -0.25, "terminate", 119.75),  # a clock 5 minutes ahead: no longer 1-second graces
        (-180, -0.25, "stop", 119.75),
        (-180, -0.25, "hibernate", -180),  # no two-minute warning for hibernation
        (-180, None, "terminate", -180),  # age unknown (present at start): seen late, believed
    ],
)
def test_a_fresh_spot_itn_already_past_is_due_two_minutes_after_it_was_last_absent(
    time_in: float, absent_in: float | None, action: str, expected_in: float
) -> None:
    absent = NOW + timedelta(seconds=absent_in) if absent_in is not None else None
    n = notice(NoticeKind.SPOT_ITN, time_in, action=action, absent_before=absent)
    assert safe_deadline(n) == NOW + timedelta(seconds=expected_in)
    assert Notice.from_json(n.to_json()) == n  # kept across a restart, in the node's annotation


def test_an_asg_termination_rehearsal_never_stands_for_the_real_one() -> None:
    # One key per instance life for the real notice (its deadline is computed, not given); a rehearsal
    # names itself, or it would take the real notice's place and be kept after being withdrawn.
    deadline = {"nodes": "n", "kind": "asg-termination", "deadline": (NOW + timedelta(minutes=14)).isoformat()}
    rehearsal = parse_rehearsal_request(deadline, "r1", NOW)
    other = parse_rehearsal_request(deadline, "r2", NOW)
    real = notice(NoticeKind.ASG_TERMINATION, 120, action="terminate")
    later = notice(NoticeKind.ASG_TERMINATION, 300, action="terminate")
    assert real.key == later.key
    assert len({rehearsal.key, other.key, real.key}) == 3
    assert plan_release(rehearsal, [real], True, False).release  # withdrawn, though IMDS says Terminated


def test_maintenance_is_voluntary_and_rehearsals_never_take_the_deadline_action() -> None:
    started = notice(NoticeKind.SCHEDULED_MAINTENANCE, -600, event_id="open", action="system-reboot")
    response = plan_response(started, default_policies())
    assert response.due(NOW)
    assert response.deadline is None  # no cutoff: PDBs honoured until the event ends
    assert response.report_at == started.deadline
    assert response.deadline_action is False
    assert plan_response(ITN, default_policies()).deadline_action is True
    assert plan_response(notice(NoticeKind.SPOT_ITN, source="simulation"), default_policies()).deadline_action is False


def test_a_maintenance_ahead_does_not_hide_a_rebalance_now() -> None:
    choice = choose_response([MAINT, REBALANCE], default_policies(), NOW)
    assert choice.due is not None and choice.due.notice == REBALANCE
    assert choice.waiting is not None and choice.waiting.notice == MAINT
    later = choose_response([MAINT, REBALANCE], default_policies(), NOW + timedelta(minutes=50))
    assert later.due is not None and later.due.notice == MAINT and later.waiting is None


@pytest.mark.parametrize(
    ("data", "refusal"),
    [
        ({"nodes": "n1", "kind": "spot-itn", "deadline": "2026-11-25T10:02:00Z"}, None),
        ({"nodes": "n1", "kind": "spot-itn", "deadline": "2026-11-25T09:59:59Z"}, "in the past"),
        ({"nodes": "n1", "kind": "spot-itn", "deadline": "2026-11-25T10:15:01Z"}, "more than 15 minutes"),
        ({"nodes": "n1", "kind": "spot-itn"}, "no deadline"),
        ({"nodes": "n1", "kind": "spot-itn", "deadline": "soon"}, "deadline"),
        ({"nodes": "n1", "kind": "nuke", "deadline": "2026-11-25T10:02:00Z"}, "unknown kind"),
        ({"nodes": "n1", "kind": "rebalance", "deadline": "2026-11-25T10:10:00Z"}, None),
    ],
)
def test_rehearsal_request(data: dict[str, str], refusal: str | None) -> None:
    if refusal is None:
        got = parse_rehearsal_request(data, "req-1", NOW)
        assert got.source == "simulation" and got.event_id == "rehearsal-req-1"
        assert plan_response(got, default_policies()).deadline_action is False
    else:
        with pytest.raises(RehearsalRequestRefused, match=refusal):
            parse_rehearsal_request(data, "req-1", NOW)


def test_rehearsal_nodes() -> None:
    assert rehearsal_nodes({"nodes": "a, b\nc"}) == ["a", "b", "c"]
    assert rehearsal_nodes({"nodes": '["a", "b"]'}) == ["a", "b"]
    assert rehearsal_nodes({}) == []
    with pytest.raises(RehearsalRequestRefused):
        rehearsal_nodes({"nodes": "[1, 2]"})


def test_retry_delay_starts_well_under_a_second_and_grows_to_a_cap() -> None:
    delays = [retry_delay(i) for i in range(12)]
    assert delays[0] < 0.5
    assert all(b >= a for a, b in itertools.pairwise(delays))
    assert max(delays) == 2.0


def test_a_resumed_notice_no_source_confirms_is_released_after_a_complete_poll() -> None:
    """A notice read back from the node's annotation could have been written by anyone who may patch a Node."""
    assert plan_release(ITN, [], True, False, unconfirmed=True).release is True
    assert plan_release(ITN, [], False, False, unconfirmed=True).release is False  # IMDS failing: resume
    assert plan_release(ITN, [ITN], True, False, unconfirmed=True).release is False
    assert plan_release(ITN, [], True, False, unconfirmed=False).release is False


def test_no_taint_effect_that_deletes_pods_can_be_chosen() -> None:
    """NoExecute would have the taint manager delete the pods, PDBs ignored: evictions only, always."""
    assert "NoExecute" not in TAINT_EFFECTS
