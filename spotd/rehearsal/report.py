"""The rehearsal report (pure): a timeline of observations in, per-node and per-workload verdicts out.

The rehearsal engine only records what it saw, with the time it saw it; this module decides what that
means. "Recovered" is claimed only for a recovery that was observed: the ready count back at desired
after the dip, seen within the recovery window.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any


class Fact(StrEnum):
    TAINTED = "tainted"  # subject: node
    CORDONED = "cordoned"  # subject: node
    DRAINED = "drained"  # subject: node (the agent's DrainComplete Event)
    DRAIN_INCOMPLETE = "drain-incomplete"  # subject: node (DrainIncomplete)
    POD_GONE = "pod-gone"  # subject: node, detail: namespace/name of a pod it held at the notice
    READY = "ready"  # subject: workload ref, value: ready pods now
    PENDING = "pending"  # subject: workload ref, value: pods Pending now


@dataclass(frozen=True)
class Observation:
    at: datetime
    fact: Fact
    subject: str
    value: int = 0
    detail: str = ""


@dataclass(frozen=True)
class NodePlan:
    """A node given a notice. pods: the evictable pods (namespace/name) on it at the notice.
    expect_drain: False for notices whose default response is a taint only (rebalance)."""

    name: str
    kind: str
    notice_at: datetime
    deadline: datetime | None
    pods: frozenset[str] = frozenset()
    expect_drain: bool = True


@dataclass(frozen=True, order=True)
class WorkloadRef:
    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind}/{self.namespace}/{self.name}"


@dataclass(frozen=True)
class WorkloadPlan:
    """counted: False for placeholders (overprovisioning, negative priority), reported but never failing."""

    ref: WorkloadRef
    desired: int
    ready_at_start: int
    counted: bool = True


@dataclass(frozen=True)
class NodeReport:
    name: str
    kind: str
    notice_at: datetime
    deadline: datetime | None
    tainted_at: datetime | None
    cordoned_at: datetime | None
    drained_at: datetime | None
    pods_evicted: int
    pods_left: int
    ok: bool
    reason: str


@dataclass(frozen=True)
class WorkloadReport:
    ref: WorkloadRef
    desired: int
    min_ready: int
    ready_at_end: int
    recovered_at: datetime | None
    pending: int
    counted: bool
    ok: bool
    reason: str


@dataclass(frozen=True)
class Report:
    nodes: tuple[NodeReport, ...]
    workloads: tuple[WorkloadReport, ...]
    ok: bool
    started_at: datetime
    finished_at: datetime
    recovery_deadline: datetime | None
    notes: tuple[str, ...] = field(default=())


def _first(timeline: Sequence[Observation], fact: Fact, subject: str) -> datetime | None:
    return next((o.at for o in timeline if o.fact == fact and o.subject == subject), None)


def node_report(plan: NodePlan, timeline: Sequence[Observation]) -> NodeReport:
    tainted = _first(timeline, Fact.TAINTED, plan.name)
    cordoned = _first(timeline, Fact.CORDONED, plan.name)
    drained = _first(timeline, Fact.DRAINED, plan.name)
    incomplete = _first(timeline, Fact.DRAIN_INCOMPLETE, plan.name)
    gone = {o.detail for o in timeline if o.fact == Fact.POD_GONE and o.subject == plan.name} & plan.pods
    left = len(plan.pods - gone)
    if not plan.expect_drain:
        ok, reason = tainted is not None, "tainted" if tainted else "never tainted"
    elif drained is None:
        ok = False
        if incomplete is not None:
            reason = "drain incomplete at the deadline"
        elif tainted is None and cordoned is None:
            reason = "no agent acted on the notice"
        else:
            reason = "drain not seen to complete"
    elif plan.deadline is not None and drained > plan.deadline:
        ok, reason = False, "drained after the deadline"
    elif left:
        ok, reason = False, f"{left} pods left"
    else:
        ok, reason = True, "drained before the deadline" if plan.deadline else "drained"
    return NodeReport(
        plan.name, plan.kind, plan.notice_at, plan.deadline, tainted, cordoned, drained, len(gone), left, ok, reason
    )


def settled_at(plan: NodePlan, timeline: Sequence[Observation]) -> datetime | None:
    """When the node's part ended: drained, drain given up, tainted (taint-only notices); else its deadline."""
    facts = (Fact.DRAINED, Fact.DRAIN_INCOMPLETE) if plan.expect_drain else (Fact.TAINTED,)
    times = [o.at for o in timeline if o.subject == plan.name and o.fact in facts]
    return min(times) if times else None


def workload_report(
    plan: WorkloadPlan, timeline: Sequence[Observation], recovery_deadline: datetime | None
) -> WorkloadReport:
    ready = [(o.at, o.value) for o in timeline if o.fact == Fact.READY and o.subject == str(plan.ref)]
    values = [plan.ready_at_start, *(v for _, v in ready)]
    pending_obs = [o.value for o in timeline if o.fact == Fact.PENDING and o.subject == str(plan.ref)]
    pending = pending_obs[-1] if pending_obs else 0
    min_ready, at_end = min(values), values[-1]
    recovered: datetime | None = None
    below = plan.ready_at_start < plan.desired
    for at, value in ready:  # the first time back at desired after the last time below it
        if value < plan.desired:
            below, recovered = True, None
        elif below and recovered is None:
            recovered = at
    if min_ready >= plan.desired:
        ok, reason = True, "never below desired"
    elif at_end < plan.desired or recovered is None:
        ok, reason = False, f"not recovered: {at_end}/{plan.desired} ready at the end"
    elif recovery_deadline is not None and recovered > recovery_deadline:
        ok, reason = False, "recovered after the recovery timeout"
    else:
        ok, reason = True, "recovered"
    if pending and ok:
        ok, reason = False, f"{pending} pods still Pending"
    if not plan.counted:
        reason = f"{reason} (placeholder, not counted)"
    return WorkloadReport(
        plan.ref, plan.desired, min_ready, at_end, recovered, pending, plan.counted, ok or not plan.counted, reason
    )


def build_report(
    nodes: Iterable[NodePlan],
    workloads: Iterable[WorkloadPlan],
    timeline: Iterable[Observation],
    *,
    started_at: datetime,
    finished_at: datetime,
    recovery_timeout: float,
    notes: Sequence[str] = (),
) -> Report:
    """The verdicts. The recovery window runs from the last node's settling (or its deadline) for
    recovery_timeout seconds; ok only if every node drained in time and every counted workload is whole."""
    events = sorted(timeline, key=lambda o: o.at)
    plans = list(nodes)
    ends = []
    for plan in plans:
        end = settled_at(plan, events) or plan.deadline
        if end is not None:
            ends.append(end)
    recovery_deadline = max(ends) + timedelta(seconds=recovery_timeout) if ends else None
    node_reports = tuple(node_report(p, events) for p in plans)
    workload_reports = tuple(
        workload_report(w, events, recovery_deadline) for w in sorted(workloads, key=lambda w: w.ref)
    )
    ok = bool(node_reports) and all(n.ok for n in node_reports) and all(w.ok for w in workload_reports)
    return Report(node_reports, workload_reports, ok, started_at, finished_at, recovery_deadline, tuple(notes))


# ---- rendering ----------------------------------------------------------------------------------------


def _iso(at: datetime | None) -> str | None:
    if at is None:
        return None
    return at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def to_dict(report: Report) -> dict[str, Any]:
    return {
        "ok": report.ok,
        "started_at": _iso(report.started_at),
        "finished_at": _iso(report.finished_at),
        "recovery_deadline": _iso(report.recovery_deadline),
        "nodes": [
            {
                "name": n.name,
                "kind": n.kind,
                "notice_at": _iso(n.notice_at),
                "deadline": _iso(n.deadline),
                "tainted_at": _iso(n.tainted_at),
                "cordoned_at": _iso(n.cordoned_at),
                "drained_at": _iso(n.drained_at),
                "pods_evicted": n.pods_evicted,
                "pods_left": n.pods_left,
                "ok": n.ok,
                "reason": n.reason,
            }
            for n in report.nodes
        ],
        "workloads": [
            {
                "kind": w.ref.kind,
                "namespace": w.ref.namespace,
                "name": w.ref.name,
                "desired": w.desired,
                "min_ready": w.min_ready,
                "ready_at_end": w.ready_at_end,
                "recovered_at": _iso(w.recovered_at),
                "pending": w.pending,
                "counted": w.counted,
                "ok": w.ok,
                "reason": w.reason,
            }
            for w in report.workloads
        ],
        "notes": list(report.notes),
    }


def to_json(report: Report) -> str:
    return json.dumps(to_dict(report), indent=2)


def _since(at: datetime | None, origin: datetime) -> str:
    return "-" if at is None else f"+{(at - origin).total_seconds():.1f}s"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    return ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)).rstrip() for row in (header, *rows)]


def to_text(report: Report) -> str:
    """Two tables; node times are relative to that node's notice, workload recoveries to the first notice."""
    origin = min((n.notice_at for n in report.nodes), default=report.started_at)
    lines = [f"Reclaim rehearsal: {len(report.nodes)} nodes, notice at {_iso(origin)}", ""]
    rows = [
        [
            n.name,
            n.kind,
            "-" if n.deadline is None else _since(n.deadline, n.notice_at),
            _since(n.tainted_at, n.notice_at),
            _since(n.cordoned_at, n.notice_at),
            _since(n.drained_at, n.notice_at),
            str(n.pods_evicted),
            str(n.pods_left),
            "ok" if n.ok else f"FAIL: {n.reason}",
        ]
        for n in report.nodes
    ]
    header = ["NODE", "KIND", "DEADLINE", "TAINTED", "CORDONED", "DRAINED", "EVICTED", "LEFT", "RESULT"]
    lines += _table(header, rows)
    lines.append("")
    if report.workloads:
        rows = []
        for w in report.workloads:
            if w.recovered_at is not None:
                recovered = _since(w.recovered_at, origin)
            else:
                recovered = "no dip" if w.min_ready >= w.desired else "NOT SEEN"
            result = "ok" if w.ok and w.counted else ("-" if not w.counted else "FAIL")
            rows.append(
                [str(w.ref), str(w.desired), str(w.min_ready), str(w.ready_at_end), recovered, str(w.pending), result]
            )
            if w.reason and (not w.ok or not w.counted):
                rows[-1][-1] = f"{result}: {w.reason}"
        header = ["WORKLOAD", "DESIRED", "MIN READY", "READY", "RECOVERED", "PENDING", "RESULT"]
        lines += _table(header, rows)
    else:
        lines.append("No Deployment, StatefulSet or ReplicaSet had pods on these nodes.")
    lines.append("")
    lines += [f"note: {n}" for n in report.notes]
    elapsed = (report.finished_at - report.started_at).total_seconds()
    verdict = "OK" if report.ok else "NOT OK"
    lines.append(f"{verdict}: rehearsal took {elapsed:.1f}s")
    return "\n".join(lines)
