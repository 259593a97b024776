"""What each decision pass publishes: node and pool metrics, and the alerts it fires and resolves.

Publishing only reads what it is handed and returns what changed (the alerts now firing); the caller
keeps that state.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from datetime import datetime, timedelta

from spotd.alerts.model import (
    ON_DEMAND_DRAIN_BLOCKED,
    ON_DEMAND_FALLBACK_ACTIVE,
    SPOT_CAPACITY_UNAVAILABLE,
    on_demand_fallback_alert,
    spot_capacity_unavailable_alert,
)
from spotd.capacity.metrics import export_pool_states
from spotd.capacity.pools import UNAVAILABLE, PoolBook
from spotd.controller.drains import AlertSink, pool_of
from spotd.controller.metrics import NODES, OLDEST_ON_DEMAND_AGE, ON_DEMAND_AGE, ON_DEMAND_OVER_AGE
from spotd.controller.policy import SpotAnswer
from spotd.inventory.records import NodeInfo
from spotd.kube.keys import ON_DEMAND

Firing = dict[str, frozenset[str]]  # alertname -> the pools it fires for

NO_POOL_ALERTS: Firing = {SPOT_CAPACITY_UNAVAILABLE: frozenset(), ON_DEMAND_FALLBACK_ACTIVE: frozenset()}


def export_metrics(
    nodes: list[NodeInfo], book: PoolBook, now: datetime, min_on_demand_age: float, cooldown: timedelta
) -> None:
    """Node counts by capacity type, on-demand ages, pool states: the gauges a pass sets."""
    counts = {"spot": 0, "on-demand": 0, "unknown": 0}
    oldest = 0.0
    over = 0
    for node in nodes:
        counts[node.capacity_type or "unknown"] += 1
        if node.capacity_type == ON_DEMAND:
            age = node.age(now)
            ON_DEMAND_AGE.observe(age)
            oldest = max(oldest, age)
            over += age >= min_on_demand_age
    for ctype, count in counts.items():
        NODES.labels(ctype).set(count)
    OLDEST_ON_DEMAND_AGE.set(oldest)
    ON_DEMAND_OVER_AGE.set(over)
    export_pool_states(book, now, cooldown)


def update_pool_alerts(
    alerter: AlertSink,
    firing: Mapping[str, frozenset[str]],
    book: PoolBook,
    candidates: list[NodeInfo],
    answer: Callable[[NodeInfo], SpotAnswer],
    now: datetime,
    cooldown: timedelta,
    min_on_demand_age: float,
) -> Firing:
    """Spot short in a pool; on-demand fallback kept because of it. Fires what is true, resolves what was
    firing (firing: the previous pass' answer) and no longer is; returns what fires now."""
    now_firing: dict[str, set[str]] = {name: set() for name in (*NO_POOL_ALERTS, *firing)}
    for pool in book.pools():
        verdict = book.spot_available(pool, now, cooldown)
        record = book.get(pool)
        if verdict.state == UNAVAILABLE and record is not None and record.last_ice is not None:
            alert = spot_capacity_unavailable_alert(
                str(pool), pool.zone, pool.instance_type, verdict.reason, record.last_ice
            )
            alerter.fire(alert)
            now_firing[SPOT_CAPACITY_UNAVAILABLE].add(str(pool))
    kept: dict[str, list[NodeInfo]] = {}
    for node in candidates:
        if node.capacity_type == ON_DEMAND and node.age(now) >= min_on_demand_age:
            if not answer(node).available:
                kept.setdefault(str(pool_of(node)), []).append(node)
    for pool_name, held in kept.items():
        oldest = max(n.age(now) for n in held)
        names = sorted(n.name for n in held)
        alerter.fire(on_demand_fallback_alert(pool_name, names, timedelta(seconds=oldest), now))
        now_firing[ON_DEMAND_FALLBACK_ACTIVE].add(pool_name)
    for name, pools in firing.items():
        for gone in pools - now_firing[name]:
            alerter.resolve(name, {"pool": gone})
    return {name: frozenset(pools) for name, pools in now_firing.items()}


def resolve_gone_nodes(alerter: AlertSink, blocked: Collection[str], present: Collection[str]) -> frozenset[str]:
    """OnDemandDrainBlocked of nodes that are gone: resolved. Returns the blocked nodes still present."""
    for name in set(blocked) - set(present):
        alerter.resolve(ON_DEMAND_DRAIN_BLOCKED, {"node": name})
    return frozenset(n for n in blocked if n in present)


__all__ = ["NO_POOL_ALERTS", "Firing", "export_metrics", "resolve_gone_nodes", "update_pool_alerts"]
