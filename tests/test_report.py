"""The rehearsal report: timelines in, verdicts out (pure)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from spotd.rehearsal.report import (
    Fact,
    NodePlan,
    Observation,
    WorkloadPlan,
    WorkloadRef,
    build_report,
    to_dict,
    to_json,
    to_text,
)

T0 = datetime(2026, 11, 25, 10, 0, 0, tzinfo=UTC)
WEB = WorkloadRef("Deployment", "shop", "web")


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def node(name: str = "n1", pods: tuple[str, ...] = ("shop/web-1", "shop/web-2"), **kw: object) -> NodePlan:
    return NodePlan(name, "spot-itn", T0, at(120), frozenset(pods), **kw)  # type: ignore[arg-type]


def obs(seconds: float, fact: Fact, subject: str = "n1", value: int = 0, detail: str = "") -> Observation:
    return Observation(at(seconds), fact, subject, value, detail)


def drained_node_timeline() -> list[Observation]:
    return [
        obs(0.1, Fact.TAINTED),
        obs(0.1, Fact.CORDONED),
        obs(1.0, Fact.POD_GONE, detail="shop/web-1"),
        obs(2.0, Fact.POD_GONE, detail="shop/web-2"),
        obs(2.1, Fact.DRAINED),
    ]


def report(timeline: list[Observation], nodes: list[NodePlan] | None = None, workloads: list[WorkloadPlan] = []):  # noqa: B006
    return build_report(nodes or [node()], workloads, timeline, started_at=T0, finished_at=at(10), recovery_timeout=60)


def test_drained_node_is_ok_with_its_times_and_counts() -> None:
    r = report(drained_node_timeline())
    n = r.nodes[0]
    assert (n.tainted_at, n.cordoned_at, n.drained_at) == (at(0.1), at(0.1), at(2.1))
    assert (n.pods_evicted, n.pods_left, n.ok) == (2, 0, True)
    assert r.ok


def test_node_without_drain_complete_is_not_ok() -> None:
    r = report([obs(0.1, Fact.TAINTED), obs(110, Fact.DRAIN_INCOMPLETE)])
    assert not r.nodes[0].ok
    assert r.nodes[0].pods_left == 2
    assert "incomplete" in r.nodes[0].reason
    assert not r.ok


def test_no_agent_is_named_as_the_reason() -> None:
    r = report([])
    assert r.nodes[0].reason == "no agent acted on the notice"


def test_drained_after_deadline_is_not_ok() -> None:
    r = report([obs(0.1, Fact.TAINTED), obs(121, Fact.DRAINED)], nodes=[node(pods=())])
    assert not r.nodes[0].ok and "after the deadline" in r.nodes[0].reason


def test_rebalance_only_needs_the_taint() -> None:
    plan = NodePlan("n1", "rebalance", T0, None, frozenset(), expect_drain=False)
    assert report([obs(0.2, Fact.TAINTED)], nodes=[plan]).ok
    assert not report([], nodes=[plan]).ok


def test_workload_recovery_is_the_first_time_back_after_the_last_dip() -> None:
    timeline = [
        *drained_node_timeline(),
        obs(1.0, Fact.READY, str(WEB), 2),
        obs(3.0, Fact.READY, str(WEB), 3),
        obs(4.0, Fact.READY, str(WEB), 2),
        obs(5.0, Fact.READY, str(WEB), 3),
        obs(6.0, Fact.READY, str(WEB), 3),
    ]
    r = report(timeline, workloads=[WorkloadPlan(WEB, 3, 3)])
    w = r.workloads[0]
    assert (w.min_ready, w.ready_at_end, w.recovered_at, w.ok) == (2, 3, at(5.0), True)
    assert r.ok


def test_recovery_never_claimed_when_not_seen() -> None:
    timeline = [*drained_node_timeline(), obs(1.0, Fact.READY, str(WEB), 1), obs(9.0, Fact.PENDING, str(WEB), 2)]
    r = report(timeline, workloads=[WorkloadPlan(WEB, 3, 3)])
    w = r.workloads[0]
    assert w.recovered_at is None and not w.ok and w.pending == 2
    assert not r.ok
    assert "NOT SEEN" in to_text(r)


def test_recovery_after_the_window_is_not_ok() -> None:
    timeline = [*drained_node_timeline(), obs(1.0, Fact.READY, str(WEB), 1), obs(70.0, Fact.READY, str(WEB), 3)]
    r = report(timeline, workloads=[WorkloadPlan(WEB, 3, 3)])
    assert r.recovery_deadline == at(62.1)
    assert not r.workloads[0].ok and "timeout" in r.workloads[0].reason


def test_never_dipped_is_ok_without_a_recovery_time() -> None:
    r = report([*drained_node_timeline(), obs(1.0, Fact.READY, str(WEB), 3)], workloads=[WorkloadPlan(WEB, 3, 3)])
    assert r.workloads[0].ok and r.workloads[0].recovered_at is None
    assert "no dip" in to_text(r)


def test_placeholder_workloads_never_fail_the_rehearsal() -> None:
    ref = WorkloadRef("Deployment", "overprovisioning", "pause")
    timeline = [*drained_node_timeline(), obs(1.0, Fact.READY, str(ref), 0), obs(9, Fact.PENDING, str(ref), 4)]
    r = report(timeline, workloads=[WorkloadPlan(ref, 4, 4, counted=False)])
    assert r.ok and r.workloads[0].pending == 4
    assert "placeholder" in r.workloads[0].reason


def test_json_has_the_documented_keys() -> None:
    r = report(
        [*drained_node_timeline(), obs(1.0, Fact.READY, str(WEB), 2), obs(3.0, Fact.READY, str(WEB), 3)],
        workloads=[WorkloadPlan(WEB, 3, 3)],
    )
    data = json.loads(to_json(r))
    assert data == to_dict(r)
    assert set(data) >= {"nodes", "workloads", "ok"}
    assert set(data["nodes"][0]) >= {
        "name",
        "kind",
        "notice_at",
        "tainted_at",
        "cordoned_at",
        "drained_at",
        "pods_evicted",
        "pods_left",
    }
    assert data["nodes"][0]["drained_at"] == "2026-11-25T10:00:02.100Z"
    assert data["workloads"][0]["recovered_at"] == "2026-11-25T10:00:03.000Z"
    assert data["ok"] is True


def test_text_is_a_table_with_relative_times() -> None:
    text = to_text(report(drained_node_timeline()))
    lines = text.splitlines()
    assert any(line.startswith("NODE") and "DRAINED" in line for line in lines)
    assert any(line.startswith("n1") and "+2.1s" in line and "ok" in line for line in lines)
    assert lines[-1].startswith("OK")
