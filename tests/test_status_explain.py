"""`spotd status`'s pure parts: the controller's /status document (spotd.controller.status) and the words
spotd.status.explain picks per node, table by table."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import yaml

from spotd.capacity.pools import PoolBook
from spotd.capacity.signals import CapacitySignal, Pool, SignalKind
from spotd.common.parsing import format_time
from spotd.controller.drains import pool_of
from spotd.controller.policy import FallbackScope, SpotAnswer, Verdict, parse_label_selector
from spotd.controller.status import (
    DRAIN,
    SURGE,
    DrainInFlight,
    StatusSettings,
    drain_phase,
    standby_document,
    status_document,
)
from spotd.inventory.records import NodeInfo
from spotd.status.explain import (
    UNAVAILABLE,
    build_report,
    controller_view,
    node_state,
    read_lease,
    render,
)

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
SCOPE = FallbackScope(parse_label_selector("node-pool=fallback"), "node-pool=fallback")
SETTINGS = StatusSettings("ctl-a", 30.0, 7200.0, 900.0, 600.0, 900.0, False, SCOPE)
POOL = Pool("m5.large", "us-east-1a")


def info(name: str, hours: float, fallback: bool = True, **kw: Any) -> NodeInfo:
    labels = (("node-pool", "fallback"),) if fallback else ()
    return NodeInfo(name, "on-demand", NOW - timedelta(hours=hours), "m5.large", "us-east-1a", labels=labels, **kw)


def t(seconds: float) -> str:
    return format_time(NOW + timedelta(seconds=seconds))


# --- the controller's document -----------------------------------------------------------------------------


def test_the_document_carries_the_verdicts_word_for_word_and_what_is_out_of_scope() -> None:
    backoff = NOW + timedelta(minutes=20)
    nodes = [
        info("od-young", 0.5),
        info("od-backoff", 5, retry_after=backoff, drain_attempts=1, retry_outcome="blocked"),
        info("od-surge", 6),
        info("system", 9, fallback=False),
        NodeInfo("spot-1", "spot", NOW, "m5.large", "us-east-1a"),
    ]
    verdicts = [
        Verdict("od-young", False, "younger than --min-on-demand-age (30m < 2h)", 1800),
        Verdict("od-backoff", False, "last drain ended in blocked (attempt 1); not retried before X", 18000),
        Verdict("od-surge", False, "drain in progress", 21600),
    ]
    book = PoolBook().record(CapacitySignal(POOL, SignalKind.ICE, "sqs", NOW - timedelta(minutes=5), "capacity"))
    doc = status_document(
        SETTINGS,
        NOW,
        nodes,
        verdicts,
        lambda _n: SpotAnswer(False, "ICE", False),
        pool_of,
        book,
        {"od-surge": DrainInFlight("od-surge", NOW - timedelta(seconds=60), SURGE)},
    )
    json.dumps(doc)  # plain types only
    entries = {e["node"]: e for e in doc["nodes"]}
    assert set(entries) == {"od-young", "od-backoff", "od-surge", "system"}  # on-demand nodes only
    assert entries["od-young"]["reason"] == verdicts[0].reason and entries["od-young"]["not_before"] == t(5400)
    assert entries["od-backoff"]["not_before"] == format_time(backoff)
    assert entries["od-surge"]["drain_in_flight"] == {
        "phase": "surge",
        "started": t(-60),
        "probe": False,
        "surge_until": t(840),
    }
    assert entries["system"]["in_scope"] is False
    assert entries["system"]["reason"].startswith("not fallback capacity (not matched by --fallback-selector")
    assert (
        doc["leading"] is True
        and doc["next_pass_by"] == t(31)
        and doc["scope"] == "--fallback-selector node-pool=fallback"
    )
    (pool,) = doc["pools"]
    assert pool["pool"] == "m5.large/us-east-1a" and pool["state"] == "unavailable" and pool["last_ice"] == t(-300)


@pytest.mark.parametrize(
    ("surge_timeout", "resumed", "surged", "cordoned", "phase"),
    [
        (900, False, None, False, SURGE),
        (900, False, True, False, DRAIN),  # ready: the cordon comes next
        (900, False, True, True, DRAIN),
        (900, True, None, True, DRAIN),  # a previous leader's drain, resumed
        (0, False, None, False, DRAIN),  # drain-then-replace
    ],
)
def test_drain_phase(surge_timeout: float, resumed: bool, surged: bool | None, cordoned: bool, phase: str) -> None:
    assert drain_phase(surge_timeout, resumed, surged, cordoned) == phase


# --- whose answer -----------------------------------------------------------------------------------------


def lease(holder: str = "ctl-a", renewed: float = -2) -> dict[str, Any]:
    return {"spec": {"holderIdentity": holder, "renewTime": t(renewed), "leaseDurationSeconds": 15}}


def leader_doc(**changes: Any) -> dict[str, Any]:
    doc = status_document(
        SETTINGS, NOW - timedelta(seconds=3), [], [], lambda _n: SpotAnswer(True, ""), pool_of, PoolBook(), {}
    )
    return doc | changes


@pytest.mark.parametrize(
    ("document", "error", "lease_obj", "note"),
    [
        (None, "no --controller-url given", lease(), f"{UNAVAILABLE}: no --controller-url given"),
        (
            standby_document("ctl-b", NOW),
            "",
            lease(),
            f"{UNAVAILABLE}: ctl-b answered, and it is a standby; the Lease names ctl-a",
        ),
        (leader_doc(identity="ctl-b"), "", lease(), f"{UNAVAILABLE}: ctl-b answered, but the Lease names ctl-a"),
        ({"kind": "Status"}, "", lease(), f"{UNAVAILABLE}: the answer is not a controller status document"),
        (leader_doc(version=2), "", lease(), f"{UNAVAILABLE}: status version 2 (this CLI reads 1)"),
        (leader_doc(at=t(-600)), "", lease(), f"{UNAVAILABLE}: its last pass was 10m ago (stale)"),
    ],
)
def test_an_answer_that_is_not_the_leaders_recent_one_is_not_used(
    document: Any, error: str, lease_obj: dict[str, Any], note: str
) -> None:
    view = controller_view(document, error, read_lease(lease_obj), NOW)
    assert not view.available and view.note == note


def test_the_leaders_answer_is_used() -> None:
    view = controller_view(leader_doc(), "", read_lease(lease()), NOW)
    assert view.available
    assert view.note.startswith("controller ctl-a (leader): last pass 3s ago, next pass in 28s at the latest")


# --- what each node says ----------------------------------------------------------------------------------


def k8s_node(name: str, capacity: str = "on-demand", hours: float = 5, **annotations: str) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "creationTimestamp": t(-hours * 3600),
            "labels": {
                "karpenter.sh/capacity-type": capacity,
                "node.kubernetes.io/instance-type": "m5.large",
                "topology.kubernetes.io/zone": "us-east-1a",
            },
            "annotations": annotations,
        },
        "spec": {},
    }


def event(node: str, reason: str, message: str, seconds: float, component: str = "spotd-controller") -> dict[str, Any]:
    return {
        "involvedObject": {"kind": "Node", "name": node},
        "reason": reason,
        "message": message,
        "lastTimestamp": t(seconds),
        "source": {"component": component},
    }


def test_node_state_reads_the_notices_and_the_drain_marks() -> None:
    notice = {"kind": "spot-itn", "source": "imds", "seen_at": t(-10), "deadline": t(110), "action": "terminate"}
    node = k8s_node("spot-1", "spot", **{"spotd.io/notice": json.dumps(notice)})
    node["spec"]["unschedulable"] = True
    assert node_state(node) == ("notice spot-itn; cordoned", NOW + timedelta(seconds=110))
    rehearsal = notice | {"source": "simulation"}
    queue = json.dumps({"asg-termination": {"seen_at": t(-5), "deadline": t(60)}})
    state, deadline = node_state(
        k8s_node("n", **{"spotd.io/notice": json.dumps(rehearsal), "spotd.io/queue-notice": queue})
    )
    assert state == "notice spot-itn (rehearsal); queue notice asg-termination"
    assert deadline == NOW + timedelta(seconds=60)
    assert node_state(k8s_node("n", **{"spotd.io/draining": t(-30)}))[0] == f"controller draining since {t(-30)}"
    assert node_state(k8s_node("n")) == ("", None)


def report_rows(
    nodes: list[dict[str, Any]], document: Any, events: list[dict[str, Any]] | None = None, error: str = ""
) -> dict[str, Any]:
    report = build_report(nodes, events or [], lease(), document, error, NOW)
    return {r.name: r for r in report.rows}


def test_a_back_off_is_explained_with_the_pod_and_the_budget_that_blocked_the_drain() -> None:
    reason = f"last drain ended in timeout (attempt 1); not retried before {t(1200)}"
    document = leader_doc(
        nodes=[{"node": "od-1", "in_scope": True, "drain": False, "reason": reason, "spot": {"available": True}}]
    )
    stopped = (
        "timeout: not empty after --drain-timeout: shop/db-0: eviction refused by PodDisruptionBudget shop/db "
        f"(429); not tried again before {t(1200)} (attempt 1)"
    )
    events = [
        event("od-1", "SpotdDrainStarted", "Draining", -700),
        event("od-1", "SpotdDrainStopped", stopped, -100, "spotd-controller"),
        event("od-1", "SpotdDrainStopped", "not ours", -50, "someone-else"),
    ]
    row = report_rows([k8s_node("od-1")], document, events)["od-1"]
    assert row.why == f"{reason}; SpotdDrainStopped at {t(-100)}: {stopped}"
    assert row.spot == "available" and row.next_look is not None


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        ({"in_scope": False, "reason": "managed by Karpenter"}, "out of scope: managed by Karpenter"),
        ({"in_scope": True, "drain": True, "reason": "on-demand for 5h00m"}, "chosen for a drain: on-demand for 5h00m"),
        (
            {
                "in_scope": True,
                "drain": True,
                "reason": "x",
                "drain_in_flight": {"phase": "drain", "started": "T", "probe": True},
            },
            "drain in progress since T (a probe: is Spot back?)",
        ),
        (
            {
                "in_scope": True,
                "drain": False,
                "reason": "no Spot capacity: m5.large/us-east-1a short since T (surge failed)",
            },
            "no Spot capacity: m5.large/us-east-1a short since T (surge failed)",
        ),
    ],
)
def test_the_controllers_verdict_is_the_why(entry: dict[str, Any], why: str) -> None:
    document = leader_doc(nodes=[{"node": "od-1", **entry}])
    assert report_rows([k8s_node("od-1")], document)["od-1"].why == why


def test_a_node_newer_than_the_last_pass_waits_for_the_next() -> None:
    rows = report_rows([k8s_node("od-new", hours=0.0)], leader_doc())
    assert rows["od-new"].why == f"new since the controller's last pass ({t(-3)}): judged at its next"


def test_without_the_controller_the_node_speaks_and_says_it_is_all() -> None:
    mark = json.dumps({"after": t(600), "attempts": 2, "outcome": "blocked", "started": t(-300)})
    nodes = [
        k8s_node("od-1", **{"spotd.io/drain-retry-after": mark}),
        k8s_node("od-2", **{"spotd.io/drain": "false"}),
        k8s_node("od-3"),
        k8s_node("spot-1", "spot"),
    ]
    events = [event("od-1", "SpotdDrainStopped", "blocked: shop/job-1: pod is a running Job", -300)]
    rows = report_rows(nodes, None, events, error="no --controller-url given")
    assert rows["od-1"].why == (
        f"last drain ended in blocked (attempt 2); not retried before {t(600)}; SpotdDrainStopped at {t(-300)}: "
        f"blocked: shop/job-1: pod is a running Job; {UNAVAILABLE}"
    )
    assert rows["od-2"].why == f"annotated spotd.io/drain=false (never drained); {UNAVAILABLE}"
    assert rows["od-3"].why == UNAVAILABLE and rows["od-3"].next_look is None
    assert rows["spot-1"].why == "" and rows["spot-1"].kind == "spot"


def test_table_json_and_yaml_say_the_same() -> None:
    document = leader_doc(nodes=[{"node": "od-1", "in_scope": False, "reason": "not fallback capacity"}])
    report = build_report([k8s_node("od-1"), k8s_node("spot-1", "spot")], [], lease(), document, "", NOW)
    table = render(report, "table").splitlines()
    assert table[0].startswith("controller ctl-a (leader)") and table[1] == "lease: held by ctl-a, renewed 2s ago"
    header = table.index("") + 1
    assert table[header].split() == ["NAME", "KIND", "POOL", "AGE", "STATE", "DEADLINE", "SPOT", "NEXT", "LOOK", "WHY"]
    assert table[header + 1].split()[:4] == ["od-1", "on-demand", "m5.large/us-east-1a", "5h00m"]
    assert table[header + 1].endswith("out of scope: not fallback capacity")
    assert table[header + 2].split() == ["spot-1", "spot", "m5.large/us-east-1a", "5h00m", "-", "-", "-", "-", "-"]
    as_json = json.loads(render(report, "json"))
    assert as_json == yaml.safe_load(render(report, "yaml"))
    assert as_json["controller"]["available"] is True and as_json["controller"]["identity"] == "ctl-a"
    assert [n["why"] for n in as_json["nodes"]] == ["out of scope: not fallback capacity", ""]


# --- the Lease: who leads, or since when no one has ----------------------------------------------------------


@pytest.mark.parametrize(
    ("lease_obj", "line"),
    [
        (lease(), "lease: held by ctl-a, renewed 2s ago"),
        (
            lease(renewed=-300),
            f"lease: not renewed since {t(-300)} (5m ago), 15s lease: no controller is leading (last holder ctl-a)",
        ),
        (lease(holder=""), f"lease: released, last renewed {t(-2)} (2s ago): no controller is leading"),
        (
            {"spec": {"holderIdentity": "ctl-a", "leaseDurationSeconds": 15}},
            "lease: held by ctl-a, never renewed: no controller is leading",
        ),
    ],
)
def test_the_lease_line_says_who_leads_or_since_when_no_one_has(lease_obj: dict[str, Any], line: str) -> None:
    report = build_report([k8s_node("od-1")], [], lease_obj, None, "no --controller-url given", NOW)
    assert render(report, "table").splitlines()[1] == line
    as_json = json.loads(render(report, "json"))["lease"]
    assert as_json["note"] == line and as_json["expired"] is (not line.startswith("lease: held by ctl-a, renewed"))


@pytest.mark.parametrize(
    ("lease_obj", "note"),
    [
        (
            lease(renewed=-300),
            f"{UNAVAILABLE}: ctl-a answered as the leader, but its last pass came 297s after its Lease's last "
            f"renewal ({t(-300)}), past the 15s the Lease holds",
        ),
        (lease(holder=""), f"{UNAVAILABLE}: ctl-a answered as the leader, but the Lease has been released"),
        (
            {"spec": {"holderIdentity": "ctl-a", "leaseDurationSeconds": 15}},
            f"{UNAVAILABLE}: ctl-a answered as the leader, but its Lease was never renewed",
        ),
    ],
)
def test_a_leaders_answer_under_a_lapsed_lease_is_not_used(lease_obj: dict[str, Any], note: str) -> None:
    """A replica that still says it leads while its Lease lapsed (partitioned from the API server, or its
    renewals failing) leads nothing: its verdicts are not shown as the controller's. Told on the
    controller's own clock (its last pass against its renewTime), not this machine's."""
    document = leader_doc(nodes=[{"node": "od-1", "in_scope": True, "reason": "Spot available", "drain": True}])
    report = build_report([k8s_node("od-1")], [], lease_obj, document, "", NOW)
    assert report.controller.note == note and not report.controller.available
    assert report.rows[0].why == UNAVAILABLE and report.rows[0].next_look is None


def test_this_machines_clock_does_not_make_a_renewing_leader_look_lapsed() -> None:
    """Read a minute later than the controller's clock (a slow machine, a skewed laptop): the lease line says
    what this clock sees, but the leader's answer, renewed before its last pass, is still used."""
    later = NOW + timedelta(seconds=60)
    report = build_report([k8s_node("od-1")], [], lease(), leader_doc(), "", later)
    assert report.controller.available, report.controller.note
    assert render(report, "table").splitlines()[1].startswith("lease: not renewed since ")


def test_a_controller_without_capacity_source_is_said_in_the_header() -> None:
    """Issue 19: with no queue and no Spot ASG the controller reads no pool as available and drains nothing;
    `spotd status` says so above the rows, and says nothing when a source is ready."""
    from spotd.status.explain import header_lines

    reason = "no queue (--sqs-queue-url) and no Spot ASG matches --asg-tag"
    document = leader_doc(capacity_source={"ready": False, "reason": reason})
    lines = header_lines(build_report([], [], lease(), document, "", NOW))
    assert f"capacity source: none ({reason}): no node is drained" in lines
    ready = header_lines(build_report([], [], lease(), leader_doc(), "", NOW))
    assert not [line for line in ready if line.startswith("capacity source")]
