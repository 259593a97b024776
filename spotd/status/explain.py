"""`spotd status`, pure: what the cluster holds (Nodes, spotd's Events on them, the controller's Lease and
the leader's GET /status) in, one row per node out, and the table, JSON and YAML of them.

The controller decides and says why (spotd.controller.policy's reasons, published by
spotd.controller.status); this module only picks the words for each node and adds what the Node itself
says (notice, drain marks, back-off) and the last Event that explains a back-off. Without a usable
controller view it answers from the Node and says so: it never guesses a verdict.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

import yaml

from spotd.common.parsing import format_time, parse_iso_time
from spotd.controller.policy import age_text
from spotd.controller.status import STATUS_KIND, STATUS_VERSION, SURGE
from spotd.inventory.records import read_retry_mark
from spotd.kube.keys import (
    DO_NOT_DISRUPT_ANNOTATION,
    DRAIN_ANNOTATION,
    DRAIN_RETRY_ANNOTATION,
    DRAINED_ANNOTATION,
    DRAINING_ANNOTATION,
    INSTANCE_TYPE_LABELS,
    NOTICE_ANNOTATION,
    ON_DEMAND,
    OUT_OF_SERVICE_TAINT_KEY,
    ZONE_LABELS,
    capacity_type_from_labels,
    first_label,
)
from spotd.notices.episodes import queue_episodes
from spotd.notices.record import MalformedNotice, Notice

UNAVAILABLE = "the controller's view is unavailable"
# Events that say why a drain ended or did not start: the last of them explains a back-off
DRAIN_END_REASONS = frozenset({"SpotdDrainStopped", "SpotdSurgeFailed", "SpotdSurgeSkipped", "SpotdDrainNotReturned"})
_SPOTD_COMPONENTS = frozenset({"spotd-agent", "spotd-controller"})


def _time(text: Any) -> datetime | None:
    try:
        return parse_iso_time(str(text)) if text else None
    except ValueError:
        return None


def _iso(at: datetime | None) -> str | None:
    return format_time(at) if at is not None else None


def relative(at: datetime | None, now: datetime) -> str:
    """'in 45s', '3m ago', '-' for none (the table's times)."""
    if at is None:
        return "-"
    seconds = (at - now).total_seconds()
    return f"in {age_text(seconds)}" if seconds >= 0 else f"{age_text(-seconds)} ago"


# --- the Lease and the controller's answer --------------------------------------------------------------


@dataclass(frozen=True)
class LeaseView:
    """The controller's Lease: who holds it, and when it was last renewed."""

    holder: str
    renewed: datetime | None
    duration: float

    def expired(self, now: datetime) -> bool:
        """No holder, or not renewed within its duration (read with this machine's clock: a hint only)."""
        return not self.holder or self.renewed is None or now - self.renewed > timedelta(seconds=self.duration)

    def describe(self, now: datetime) -> str:
        """Who leads, in one line; when no one does, since when the controller was last seen leading."""
        seen = f"{format_time(self.renewed)} ({relative(self.renewed, now)})" if self.renewed else ""
        if not self.holder:
            last = f", last renewed {seen}" if seen else ""
            return f"lease: released{last}: no controller is leading"
        if self.renewed is None:
            return f"lease: held by {self.holder}, never renewed: no controller is leading"
        if self.expired(now):
            return (
                f"lease: not renewed since {seen}, {self.duration:g}s lease: no controller is leading "
                f"(last holder {self.holder})"
            )
        return f"lease: held by {self.holder}, renewed {relative(self.renewed, now)}"


def read_lease(obj: Mapping[str, Any] | None) -> LeaseView | None:
    if not obj:
        return None
    spec = obj.get("spec") or {}
    return LeaseView(
        str(spec.get("holderIdentity") or ""),
        _time(spec.get("renewTime")),
        float(spec.get("leaseDurationSeconds") or 15),
    )


@dataclass(frozen=True)
class ControllerView:
    """The leader's /status when it can be trusted (document), else None and why (note)."""

    document: Mapping[str, Any] | None
    note: str

    @property
    def available(self) -> bool:
        return self.document is not None

    def entry(self, node: str) -> Mapping[str, Any] | None:
        if self.document is None:
            return None
        return next((e for e in self.document.get("nodes") or () if e.get("node") == node), None)


def lease_lapsed_at(lease: LeaseView | None, at: datetime) -> str:
    """Why the Lease did not hold at the controller's last pass (`at`), "" when it did or cannot be told.
    Both times are the controller's clock (it writes renewTime), and the Lease is read after /status, so a
    renewal after the pass only makes it hold: no clock of this machine, no slow read, makes a leader look
    lapsed."""
    if lease is None:
        return ""
    if not lease.holder:
        return "the Lease has been released"
    if lease.renewed is None:
        return "its Lease was never renewed"
    late = (at - lease.renewed).total_seconds()
    if late > lease.duration:
        return (
            f"its last pass came {late:.0f}s after its Lease's last renewal ({format_time(lease.renewed)}), "
            f"past the {lease.duration:g}s the Lease holds"
        )
    return ""


def controller_view(document: Any, error: str, lease: LeaseView | None, now: datetime) -> ControllerView:
    """Whether the /status answer (document, or the error that came instead) is the leader's, and recent.

    Fail closed: a standby's answer, one from a replica the Lease does not name, an unknown format or a
    last pass older than four intervals (and two minutes) is not used."""
    if error:
        return ControllerView(None, f"{UNAVAILABLE}: {error}")
    if not isinstance(document, Mapping) or document.get("kind") != STATUS_KIND:
        return ControllerView(None, f"{UNAVAILABLE}: the answer is not a controller status document")
    if document.get("version") != STATUS_VERSION:
        return ControllerView(None, f"{UNAVAILABLE}: status version {document.get('version')} (this CLI reads 1)")
    identity = str(document.get("identity") or "")
    if not document.get("leading"):
        leader = f"; the Lease names {lease.holder}" if lease is not None and lease.holder else ""
        return ControllerView(None, f"{UNAVAILABLE}: {identity} answered, and it is a standby{leader}")
    if lease is not None and lease.holder and lease.holder != identity:
        return ControllerView(None, f"{UNAVAILABLE}: {identity} answered, but the Lease names {lease.holder}")
    at = _time(document.get("at"))
    if at is None:
        return ControllerView(None, f"{UNAVAILABLE}: its last pass has no time")
    lapsed = lease_lapsed_at(lease, at)
    if lapsed:  # a replica deciding under a lapsed lease leads nothing: its verdicts are no leader's
        return ControllerView(None, f"{UNAVAILABLE}: {identity} answered as the leader, but {lapsed}")
    interval = float(document.get("interval_seconds") or 30)
    if now - at > timedelta(seconds=max(120.0, 4 * interval)):
        return ControllerView(None, f"{UNAVAILABLE}: its last pass was {relative(at, now)} (stale)")
    dry = " (--dry-run: it drains nothing)" if document.get("dry_run") else ""
    scope = document.get("scope") or "no fallback scope declared: it drains nothing"
    return ControllerView(
        document,
        f"controller {identity} (leader){dry}: last pass {relative(at, now)}, "
        f"next pass {relative(_time(document.get('next_pass_by')), now)} at the latest; scope: {scope}",
    )


# --- one node ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeEvent:
    """One Event of spotd's on a Node."""

    node: str
    reason: str
    message: str
    at: datetime


def spotd_node_events(events: Iterable[Mapping[str, Any]]) -> dict[str, list[NodeEvent]]:
    """spotd's Events on Nodes, per node, oldest first."""
    out: dict[str, list[NodeEvent]] = {}
    for e in events:
        involved = e.get("involvedObject") or {}
        component = (e.get("source") or {}).get("component") or e.get("reportingComponent") or ""
        at = _time(e.get("lastTimestamp") or e.get("eventTime") or e.get("firstTimestamp"))
        if involved.get("kind") != "Node" or component not in _SPOTD_COMPONENTS or at is None:
            continue
        name = str(involved.get("name") or "")
        out.setdefault(name, []).append(NodeEvent(name, str(e.get("reason") or ""), str(e.get("message") or ""), at))
    for found in out.values():
        found.sort(key=lambda ev: ev.at)
    return out


@dataclass(frozen=True)
class NodeRow:
    """One line of `spotd status`. why and next_look: on-demand nodes only."""

    name: str
    kind: str  # spot | on-demand | unknown
    pool: str
    age: float
    state: str = ""  # notice, drain marks, cordon; "" for none
    deadline: datetime | None = None  # of the notice, or of the drain in flight
    spot: str = ""  # its pool's Spot state per the controller: available | unavailable | ""
    why: str = ""
    next_look: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "pool": self.pool,
            "age_seconds": round(self.age),
            "state": self.state,
            "deadline": _iso(self.deadline),
            "spot": self.spot,
            "why": self.why,
            "next_look": _iso(self.next_look),
        }


def node_state(node: Mapping[str, Any]) -> tuple[str, datetime | None]:
    """What is happening to the node, as the Node says (the agent's notice, the queue's, the controller's
    drain marks, a cordon, the out-of-service taint), and the nearest deadline among them."""
    meta = node.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    parts: list[str] = []
    deadlines: list[datetime] = []
    text = annotations.get(NOTICE_ANNOTATION)
    if text:
        try:
            notice = Notice.from_json(text)
            rehearsal = " (rehearsal)" if notice.source == "simulation" else ""
            parts.append(f"notice {notice.kind}{rehearsal}")
            if notice.deadline is not None:
                deadlines.append(notice.deadline)
        except MalformedNotice:
            parts.append(f"{NOTICE_ANNOTATION} unreadable")
    for kind, entry in sorted(queue_episodes(annotations).items()):
        parts.append(f"queue notice {kind}")
        deadline = _time(entry.get("deadline"))
        if deadline is not None:
            deadlines.append(deadline)
    draining = _time(annotations.get(DRAINING_ANNOTATION))
    if draining is not None:
        parts.append(f"controller draining since {format_time(draining)}")
    drained = _time(annotations.get(DRAINED_ANNOTATION))
    if drained is not None:
        parts.append(f"drained at {format_time(drained)}")
    if (node.get("spec") or {}).get("unschedulable"):
        parts.append("cordoned")
    if any(t.get("key") == OUT_OF_SERVICE_TAINT_KEY for t in (node.get("spec") or {}).get("taints") or ()):
        parts.append("out-of-service")
    return "; ".join(parts), min(deadlines) if deadlines else None


def last_drain_end(events: Sequence[NodeEvent]) -> NodeEvent | None:
    """The last Event that says how a drain (or its surge) ended: the pod and the budget that blocked it."""
    return next((e for e in reversed(events) if e.reason in DRAIN_END_REASONS), None)


def explain_from_controller(
    entry: Mapping[str, Any] | None, created: datetime | None, events: Sequence[NodeEvent], document: Mapping[str, Any]
) -> str:
    """Why an on-demand node is still here, in the controller's words (its verdict of the last pass)."""
    at = _time(document.get("at"))
    if entry is None:
        if created is not None and at is not None and created > at:
            return f"new since the controller's last pass ({format_time(at)}): judged at its next"
        return "not judged by the controller (its capacity type unknown to it)"
    reason = str(entry.get("reason") or "")
    flight = entry.get("drain_in_flight")
    if isinstance(flight, Mapping):
        started = str(flight.get("started") or "?")
        probe = " (a probe: is Spot back?)" if flight.get("probe") else ""
        if flight.get("phase") == SURGE:
            return (
                f"surge running since {started}{probe}: placeholders hold Spot room for its pods until "
                f"{flight.get('surge_until') or '?'}; the drain follows once they all run on Spot"
            )
        return f"drain in progress since {started}{probe}"
    if not entry.get("in_scope"):
        return f"out of scope: {reason}"
    if entry.get("drain"):
        if document.get("dry_run"):
            return f"would be drained (--dry-run): {reason}"
        return f"chosen for a drain: {reason}"
    if "not retried before" in reason:
        ended = last_drain_end(events)
        if ended is not None:
            reason += f"; {ended.reason} at {format_time(ended.at)}: {ended.message}"
    return reason


def explain_from_node(node: Mapping[str, Any], events: Sequence[NodeEvent], now: datetime) -> str:
    """Without the controller's view: what the Node and spotd's Events on it say, and that this is all."""
    annotations = (node.get("metadata") or {}).get("annotations") or {}
    parts: list[str] = []
    if str(annotations.get(DRAIN_ANNOTATION, "")).strip().lower() == "false":
        parts.append(f"annotated {DRAIN_ANNOTATION}=false (never drained)")
    if str(annotations.get(DO_NOT_DISRUPT_ANNOTATION, "")).strip().lower() == "true":
        parts.append(f"annotated {DO_NOT_DISRUPT_ANNOTATION}=true")
    mark = read_retry_mark(annotations.get(DRAIN_RETRY_ANNOTATION))
    if mark is not None and mark.after > now:
        text = f"last drain ended in {mark.outcome or 'failure'} (attempt {mark.attempts}); not retried before "
        text += format_time(mark.after)
        ended = last_drain_end(events)
        if ended is not None:
            text += f"; {ended.reason} at {format_time(ended.at)}: {ended.message}"
        parts.append(text)
    elif events:
        last = events[-1]
        parts.append(f"last Event {last.reason} at {format_time(last.at)}: {last.message}")
    parts.append(UNAVAILABLE)
    return "; ".join(parts)


def _node_row(
    node: Mapping[str, Any],
    events: Sequence[NodeEvent],
    view: ControllerView,
    now: datetime,
    capacity_label: str | None,
) -> NodeRow:
    meta = node.get("metadata") or {}
    labels = meta.get("labels") or {}
    created = _time(meta.get("creationTimestamp"))
    kind = capacity_type_from_labels(labels, capacity_label)
    entry = view.entry(str(meta.get("name") or ""))
    if kind is None and entry is not None:
        kind = ON_DEMAND  # the controller resolved it through EC2
    pool = f"{first_label(labels, INSTANCE_TYPE_LABELS) or '*'}/{first_label(labels, ZONE_LABELS) or '*'}"
    state, deadline = node_state(node)
    row = NodeRow(
        name=str(meta.get("name") or ""),
        kind=kind or "unknown",
        pool=pool,
        age=(now - created).total_seconds() if created is not None else 0.0,
        state=state,
        deadline=deadline,
    )
    if row.kind != ON_DEMAND:
        return row
    if view.document is None:
        return replace(row, why=explain_from_node(node, events, now))
    spot = entry.get("spot") if entry is not None else None
    spot_state = ""
    if isinstance(spot, Mapping):
        spot_state = "available" if spot.get("available") else "unavailable"
    flight = entry.get("drain_in_flight") if entry is not None else None
    if isinstance(flight, Mapping) and flight.get("phase") == SURGE:
        deadline = deadline or _time(flight.get("surge_until"))
    return replace(
        row,
        deadline=deadline,
        spot=spot_state,
        why=explain_from_controller(entry, created, events, view.document),
        next_look=_time(view.document.get("next_pass_by")),
    )


# --- the whole answer -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StatusReport:
    at: datetime
    controller: ControllerView
    lease: LeaseView | None
    rows: list[NodeRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what could not be read (events, the Lease)


def build_report(
    nodes: Iterable[Mapping[str, Any]],
    events: Iterable[Mapping[str, Any]],
    lease: Mapping[str, Any] | None,
    document: Any,
    error: str,
    now: datetime,
    capacity_label: str | None = None,
    notes: Sequence[str] = (),
) -> StatusReport:
    """One row per node (by name) from the Nodes, spotd's Events, the Lease and the controller's answer
    (document, or the error that came instead of one)."""
    lease_view = read_lease(lease)
    view = controller_view(document, error, lease_view, now)
    by_node = spotd_node_events(events)
    rows = [
        _node_row(n, by_node.get(str((n.get("metadata") or {}).get("name") or ""), []), view, now, capacity_label)
        for n in nodes
    ]
    rows.sort(key=lambda r: r.name)
    return StatusReport(now, view, lease_view, rows, list(notes))


def header_lines(report: StatusReport) -> list[str]:
    lines = [report.controller.note]
    lease = report.lease
    if lease is None:
        lines.append("lease: not found (no controller has run, or it is in another namespace: --lease-namespace)")
    else:
        lines.append(lease.describe(report.at))
    if report.controller.document is not None:
        source = report.controller.document.get("capacity_source") or {}
        if source and not source.get("ready", True):  # no pool reads as available: nothing is drained
            lines.append(f"capacity source: none ({source.get('reason') or 'not ready'}): no node is drained")
        for pool in report.controller.document.get("pools") or ():
            lines.append(f"pool {pool.get('pool')}: {pool.get('state')}: {pool.get('reason')}")
    lines.extend(report.notes)
    return lines


COLUMNS = ("NAME", "KIND", "POOL", "AGE", "STATE", "DEADLINE", "SPOT", "NEXT LOOK", "WHY")


def render_table(report: StatusReport) -> str:
    """kubectl-like: the header lines, then one row per node, columns three spaces apart, WHY last."""
    now = report.at
    cells = [
        (
            r.name,
            r.kind,
            r.pool,
            age_text(r.age),
            r.state or "-",
            relative(r.deadline, now),
            r.spot or "-",
            relative(r.next_look, now) if r.kind == ON_DEMAND else "-",
            r.why or "-",
        )
        for r in report.rows
    ]
    widths = [max(len(c[i]) for c in [COLUMNS, *cells]) for i in range(len(COLUMNS) - 1)]
    lines = [*header_lines(report), ""]
    for row in [COLUMNS, *cells]:
        lines.append("   ".join(v.ljust(w) for v, w in zip(row[:-1], widths, strict=True)) + "   " + row[-1])
    return "\n".join(lines) + "\n"


def to_document(report: StatusReport) -> dict[str, Any]:
    """The same answer as one object (-o json / -o yaml)."""
    lease = report.lease
    document = report.controller.document
    return {
        "at": _iso(report.at),
        "controller": {
            "available": report.controller.available,
            "note": report.controller.note,
            "identity": document.get("identity") if document is not None else None,
            "last_pass": document.get("at") if document is not None else None,
            "next_pass_by": document.get("next_pass_by") if document is not None else None,
        },
        "lease": None
        if lease is None
        else {
            "holder": lease.holder,
            "renewed": _iso(lease.renewed),
            "expired": lease.expired(report.at),
            "note": lease.describe(report.at),
        },
        "pools": list(document.get("pools") or ()) if document is not None else [],
        "nodes": [r.to_dict() for r in report.rows],
        "notes": report.notes,
    }


def render(report: StatusReport, output: str) -> str:
    if output == "json":
        return json.dumps(to_document(report), indent=2) + "\n"
    if output == "yaml":
        return str(yaml.safe_dump(to_document(report), sort_keys=False, width=1000))
    return render_table(report)
