"""The fallback rehearsal's report (pure): node lives, pod waits and disruptions in, figures at real scale out.

The rehearsal runs with every duration multiplied by `scale`; this module divides by it again, so the
report speaks of the cluster's real time: on-demand node-hours, how long pods were Pending, when the work
was back on Spot. Times are offsets from the reclaim (the start of the Spot shortage).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from spotd.common.parsing import format_time

RECLAIM = "reclaim"  # a pod on a reclaimed Spot node
RETURN = "return"  # a pod on a fallback on-demand node (the way back)
OTHER = "other"  # preemption, or anything else


@dataclass(frozen=True)
class NodeLife:
    name: str
    group: str
    capacity_type: str  # spot | on-demand
    fallback: bool  # launched on-demand by the autoscaler during the rehearsal
    created: datetime
    removed: datetime | None = None


@dataclass(frozen=True)
class PodWait:
    """One pod created during the rehearsal: Pending from `since` until `until` (bound or gone; None: still)."""

    workload: str
    pod: str
    since: datetime
    until: datetime | None
    counted: bool = True  # False for placeholders (negative priority)


@dataclass(frozen=True)
class Disruption:
    workload: str
    pod: str
    at: datetime
    cause: str  # reclaim | return | other
    counted: bool = True


@dataclass(frozen=True)
class Milestones:
    reclaim_at: datetime  # notices given and Spot short (ICE on)
    deadline_at: datetime  # the reclaimed instances ended
    restored_at: datetime  # Spot back (ICE off)
    finished_at: datetime


@dataclass(frozen=True)
class WorkloadLine:
    workload: str
    counted: bool
    pods_pending: int  # pods that had to wait at all
    max_pending: float  # real seconds
    pending_at_end: int
    disrupted: int
    by_cause: dict[str, int]
    on_fallback_at_end: int


@dataclass(frozen=True)
class FallbackReport:
    scale: float
    reclaimed: tuple[str, ...]
    milestones: Milestones
    fallback_nodes: int
    fallback_first_ready: float | None  # real seconds after the reclaim
    max_fallback_nodes: int
    on_demand_node_hours: float
    on_demand_node_hours_after_restore: float  # the part a faster return saves
    spot_nodes_launched: int
    returned_at: float | None  # real seconds after the reclaim: the last fallback node gone
    pending_max: float
    pending_p50: float
    pending_p95: float
    pods_waited: int
    pending_at_end: int
    pending_after_restore_max: float  # the longest wait of a pod that went Pending once Spot was back
    workloads: tuple[WorkloadLine, ...]
    ok: bool
    verdict: str
    notes: tuple[str, ...] = field(default=())


def _real(seconds: float, scale: float) -> float:
    return seconds / scale


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def node_hours(nodes: Iterable[NodeLife], end: datetime, scale: float, since: datetime | None = None) -> float:
    """Real node-hours of these nodes up to their removal (or the end), counted from `since` if given."""
    seconds = sum(max(0.0, ((n.removed or end) - max(n.created, since or n.created)).total_seconds()) for n in nodes)
    return _real(seconds, scale) / 3600


def max_concurrent(nodes: Sequence[NodeLife], end: datetime) -> int:
    edges = sorted(
        [(n.created, 1) for n in nodes] + [(n.removed or end, -1) for n in nodes], key=lambda e: (e[0], e[1])
    )
    best = current = 0
    for _, step in edges:
        current += step
        best = max(best, current)
    return best


def build_fallback_report(
    *,
    scale: float,
    reclaimed: Sequence[str],
    milestones: Milestones,
    nodes: Sequence[NodeLife],
    waits: Sequence[PodWait],
    disruptions: Sequence[Disruption],
    on_fallback_at_end: dict[str, int],
    notes: Sequence[str] = (),
) -> FallbackReport:
    """The figures and the verdict: ok when no fallback node is left, nothing is Pending at the end, and
    no counted pod sits on a fallback node."""
    end = milestones.finished_at
    t0 = milestones.reclaim_at
    fallback = [n for n in nodes if n.fallback]
    first_ready = min((n.created for n in fallback), default=None)
    left = [n for n in fallback if n.removed is None]
    returned = None
    if fallback and not left:
        returned = _real((max(n.removed for n in fallback if n.removed) - t0).total_seconds(), scale)
    elif not fallback:
        returned = 0.0
    counted_waits = [w for w in waits if w.counted]
    durations = [_real(((w.until or end) - w.since).total_seconds(), scale) for w in counted_waits]
    pending_end = sum(1 for w in counted_waits if w.until is None)
    late_waits = [w for w in counted_waits if w.since >= milestones.restored_at]
    lines = []
    names = sorted({w.workload for w in waits} | {d.workload for d in disruptions} | set(on_fallback_at_end))
    for name in names:
        ws = [w for w in waits if w.workload == name]
        ds = [d for d in disruptions if d.workload == name]
        causes: dict[str, int] = defaultdict(int)
        for d in ds:
            causes[d.cause] += 1
        counted = all(w.counted for w in ws) and all(d.counted for d in ds)
        lines.append(
            WorkloadLine(
                name,
                counted,
                len(ws),
                max((_real(((w.until or end) - w.since).total_seconds(), scale) for w in ws), default=0.0),
                sum(1 for w in ws if w.until is None),
                len(ds),
                {c: causes.get(c, 0) for c in (RECLAIM, RETURN, OTHER)},
                on_fallback_at_end.get(name, 0),
            )
        )
    on_fallback = sum(line.on_fallback_at_end for line in lines if line.counted)
    problems = []
    if left:
        problems.append(f"controller did not return to Spot: {len(left)} fallback on-demand nodes still up")
    elif on_fallback:
        problems.append(f"{on_fallback} pods still on fallback nodes")
    if pending_end:
        problems.append(f"{pending_end} pods still Pending")
    ok = not problems
    if ok and not fallback:
        verdict = "no fallback was needed: no on-demand node launched, nothing Pending"
    elif ok:
        verdict = f"every workload back on Spot, nothing Pending (returned at +{_text(returned)})"
    else:
        verdict = "; ".join(problems)
    return FallbackReport(
        scale=scale,
        reclaimed=tuple(reclaimed),
        milestones=milestones,
        fallback_nodes=len(fallback),
        fallback_first_ready=None if first_ready is None else _real((first_ready - t0).total_seconds(), scale),
        max_fallback_nodes=max_concurrent(fallback, end),
        on_demand_node_hours=node_hours(fallback, end, scale),
        on_demand_node_hours_after_restore=node_hours(fallback, end, scale, since=milestones.restored_at),
        spot_nodes_launched=sum(1 for n in nodes if n.capacity_type == "spot" and n.created > t0),
        returned_at=returned,
        pending_max=max(durations, default=0.0),
        pending_p50=percentile(durations, 50),
        pending_p95=percentile(durations, 95),
        pods_waited=len(durations),
        pending_at_end=pending_end,
        pending_after_restore_max=max(
            (_real(((w.until or end) - w.since).total_seconds(), scale) for w in late_waits), default=0.0
        ),
        workloads=tuple(lines),
        ok=ok,
        verdict=verdict,
        notes=tuple(notes),
    )


def _text(seconds: float | None) -> str:
    """Real seconds as 45s, 12m30s, 2h05m; '-' for None."""
    if seconds is None:
        return "-"
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def to_text(r: FallbackReport) -> str:
    m = r.milestones
    t0 = m.reclaim_at

    def at(t: datetime) -> str:
        return "+" + _text(_real((t - t0).total_seconds(), r.scale))

    wall = (m.finished_at - t0).total_seconds()
    lines = [
        f"FALLBACK REHEARSAL (real time; run at 1/{1 / r.scale:.0f} scale, {wall:.1f}s of wall time)",
        f"  reclaim of {len(r.reclaimed)} Spot nodes, Spot short: +0s; instances gone: {at(m.deadline_at)}; "
        f"Spot restored: {at(m.restored_at)}; end: {at(m.finished_at)}",
        f"  fallback on-demand nodes: {r.fallback_nodes} launched, at most {r.max_fallback_nodes} at once, "
        f"first Ready at +{_text(r.fallback_first_ready)}; {r.on_demand_node_hours:.2f} on-demand node-hours, "
        f"{r.on_demand_node_hours_after_restore:.2f} of them after Spot was restored",
        f"  Spot nodes launched after the reclaim: {r.spot_nodes_launched}; back on Spot: "
        + (f"+{_text(r.returned_at)}" if r.returned_at is not None else "NOT SEEN"),
        f"  pods Pending: {r.pods_waited} waited, longest {_text(r.pending_max)}, p50 {_text(r.pending_p50)}, "
        f"p95 {_text(r.pending_p95)}; after Spot was restored longest {_text(r.pending_after_restore_max)}; "
        f"{r.pending_at_end} still Pending at the end",
        "",
    ]
    header = ("WORKLOAD", "PODS PENDING", "LONGEST", "DISRUPTED", "RECLAIM", "RETURN", "OTHER", "ON FALLBACK")
    rows = [header]
    for w in r.workloads:
        name = w.workload + ("" if w.counted else " (placeholder)")
        rows.append(
            (
                name,
                str(w.pods_pending),
                _text(w.max_pending),
                str(w.disrupted),
                str(w.by_cause[RECLAIM]),
                str(w.by_cause[RETURN]),
                str(w.by_cause[OTHER]),
                str(w.on_fallback_at_end),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines += ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]
    lines.append("")
    lines += [f"note: {n}" for n in r.notes]
    lines.append(f"{'OK' if r.ok else 'NOT OK'}: {r.verdict}")
    return "\n".join(lines)


def to_json(r: FallbackReport) -> str:
    data: dict[str, Any] = asdict(r)
    data["milestones"] = {k: format_time(v) for k, v in asdict(r.milestones).items()}
    data["time_unit"] = "real seconds (node-hours in real hours)"
    return json.dumps(data, indent=2)
