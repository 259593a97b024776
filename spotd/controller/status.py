"""What the controller publishes at GET /status (pure): its pool book and, for every on-demand node, the
verdict of its last decision pass, for `spotd status` (spotd/status).

The verdicts are policy.choose_drains' own (its reasons, word for word); out-of-scope nodes get
policy.out_of_scope's reason. Nothing is decided here: this only writes down what the pass decided, with
the times a reader needs (when the pass ran, when the next one comes at the latest, when a node's
blocker lapses).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from spotd.capacity.pools import PoolBook
from spotd.capacity.signals import Pool
from spotd.common.parsing import format_time
from spotd.controller.policy import FallbackScope, SpotAnswer, Verdict, out_of_scope
from spotd.inventory.records import NodeInfo
from spotd.kube.keys import ON_DEMAND

STATUS_KIND = "SpotdControllerStatus"
STATUS_VERSION = 1
SURGE = "surge"  # placeholders wait for Spot room; the node is not touched yet
DRAIN = "drain"  # cordoned, pods being evicted (or their landing being checked)


@dataclass(frozen=True, slots=True)
class DrainInFlight:
    """A drain the leader runs now, as /status shows it."""

    node: str
    started: datetime
    phase: str  # SURGE | DRAIN
    probe: bool = False


def drain_phase(surge_timeout: float, resumed: bool, surged: bool | None, cordoned: bool) -> str:
    """SURGE while make-before-break's placeholders wait (no surge outcome yet, node not cordoned), else DRAIN."""
    if surge_timeout > 0 and not resumed and surged is None and not cordoned:
        return SURGE
    return DRAIN


@dataclass(frozen=True)
class StatusSettings:
    """The flags a reader needs to understand the verdicts."""

    identity: str
    interval: float
    min_on_demand_age: float
    surge_timeout: float
    drain_timeout: float
    ice_cooldown: float
    dry_run: bool
    scope: FallbackScope


def _time(at: datetime | None) -> str | None:
    return format_time(at) if at is not None else None


def scope_text(scope: FallbackScope) -> str:
    parts = [f"--fallback-selector {scope.selector_text}"] if scope.selector else []
    parts += [f"--fallback-asg-tag {scope.asg_tag}"] if scope.asg_tag else []
    return ", ".join(parts)


def not_before(node: NodeInfo, min_on_demand_age: float, now: datetime) -> datetime | None:
    """When the node's time-bound blockers (age, back-off) have all lapsed, if that is later than now."""
    times = [node.created + timedelta(seconds=min_on_demand_age)]
    if node.retry_after is not None:
        times.append(node.retry_after)
    latest = max(times)
    return latest if latest > now else None


def standby_document(identity: str, now: datetime) -> dict[str, Any]:
    """What a replica that does not hold the lease answers: it decides nothing, so it knows nothing."""
    return {"kind": STATUS_KIND, "version": STATUS_VERSION, "identity": identity, "leading": False, "at": _time(now)}


def _pools(book: PoolBook, now: datetime, cooldown: timedelta) -> list[dict[str, Any]]:
    out = []
    for pool in book.pools():
        rec = book.get(pool)
        assert rec is not None
        verdict = book.spot_available(pool, now, cooldown)
        out.append(
            {
                "pool": str(pool),
                "state": verdict.state,
                "available": verdict.available,
                "reason": verdict.reason,
                "last_ice": _time(rec.last_ice),
                "last_launch": _time(rec.last_launch),
                "short_since": _time(rec.short_since),
                "probe_failures": rec.probe_failures,
            }
        )
    return out


def status_document(
    settings: StatusSettings,
    now: datetime,
    nodes: Iterable[NodeInfo],
    verdicts: Iterable[Verdict],
    spot_for: Callable[[NodeInfo], SpotAnswer],
    pool_of: Callable[[NodeInfo], Pool],
    book: PoolBook,
    in_flight: Mapping[str, DrainInFlight],
    fallback_instances: Collection[str] = (),
    capacity_source: str | None = None,
) -> dict[str, Any]:
    """The leader's /status after a decision pass at `now`: one entry per on-demand node (its verdict, or why
    it is out of scope), the pools the book knows, the drains in flight; capacity_source: why no capacity
    source feeds the book (None: one does). JSON-ready (plain types)."""
    by_node = {v.node: v for v in verdicts}
    entries = []
    for node in sorted(nodes, key=lambda n: n.name):
        if node.capacity_type != ON_DEMAND:
            continue
        answer = spot_for(node)
        entry: dict[str, Any] = {
            "node": node.name,
            "pool": str(pool_of(node)),
            "created": _time(node.created),
            "spot": {"available": answer.available, "reason": answer.reason, "probe_due": answer.probe_due},
        }
        verdict = by_node.get(node.name)
        job = in_flight.get(node.name)
        if job is not None:
            entry |= {"in_scope": True, "drain": True, "reason": verdict.reason if verdict else "drain in progress"}
            entry["drain_in_flight"] = {"phase": job.phase, "started": _time(job.started), "probe": job.probe}
            if job.phase == SURGE:
                entry["drain_in_flight"]["surge_until"] = _time(job.started + timedelta(seconds=settings.surge_timeout))
        elif verdict is not None:
            entry |= {"in_scope": True, "drain": verdict.drain, "reason": verdict.reason, "probe": verdict.probe}
            if verdict.hold:
                entry["hold"] = verdict.hold
            entry["not_before"] = _time(not_before(node, settings.min_on_demand_age, now))
        else:
            entry |= {"in_scope": False, "drain": False}
            entry["reason"] = out_of_scope(node, settings.scope, fallback_instances) or "not judged in this pass"
        entries.append(entry)
    return {
        "kind": STATUS_KIND,
        "version": STATUS_VERSION,
        "identity": settings.identity,
        "leading": True,
        "at": _time(now),
        # the loop waits --interval (or a change), then up to a second more to take a burst as one pass
        "next_pass_by": _time(now + timedelta(seconds=settings.interval + min(1.0, settings.interval))),
        "interval_seconds": settings.interval,
        "dry_run": settings.dry_run,
        "scope": scope_text(settings.scope),
        "capacity_source": {"ready": not capacity_source, "reason": capacity_source or ""},
        "min_on_demand_age_seconds": settings.min_on_demand_age,
        "surge_timeout_seconds": settings.surge_timeout,
        "drain_timeout_seconds": settings.drain_timeout,
        "pools": _pools(book, now, timedelta(seconds=settings.ice_cooldown)),
        "nodes": entries,
    }
