"""What each decision pass publishes: node and pool metrics, and the alerts it fires and resolves."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from spotd.alerts.model import (
    ON_DEMAND_DRAIN_BLOCKED,
    ON_DEMAND_FALLBACK_ACTIVE,
    SPOT_CAPACITY_UNAVAILABLE,
    on_demand_fallback_alert,
    spot_capacity_unavailable_alert,
)
from spotd.capacity.metrics import export_pool_states
from spotd.capacity.pools import UNAVAILABLE
from spotd.controller.drains import pool_of
from spotd.controller.metrics import NODES, OLDEST_ON_DEMAND_AGE, ON_DEMAND_AGE, ON_DEMAND_OVER_AGE
from spotd.inventory.records import NodeInfo
from spotd.kube.keys import ON_DEMAND

if TYPE_CHECKING:
    from spotd.controller.main import Controller


def export_metrics(ctl: Controller, nodes: list[NodeInfo], now: datetime) -> None:
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
            over += age >= ctl.config.min_on_demand_age
    for ctype, count in counts.items():
        NODES.labels(ctype).set(count)
    OLDEST_ON_DEMAND_AGE.set(oldest)
    ON_DEMAND_OVER_AGE.set(over)
    export_pool_states(ctl.book, now, timedelta(seconds=ctl.config.ice_cooldown))


def update_alerts(ctl: Controller, nodes: list[NodeInfo], now: datetime) -> None:
    """Spot short in a pool; on-demand fallback kept because of it. Fired while true, resolved after."""
    cooldown = timedelta(seconds=ctl.config.ice_cooldown)
    firing: dict[str, set[str]] = {name: set() for name in ctl.alerted}
    for pool in ctl.book.pools():
        verdict = ctl.book.spot_available(pool, now, cooldown)
        record = ctl.book.get(pool)
        if verdict.state == UNAVAILABLE and record is not None and record.last_ice is not None:
            alert = spot_capacity_unavailable_alert(
                str(pool), pool.zone, pool.instance_type, verdict.reason, record.last_ice
            )
            ctl.alerter.fire(alert)
            firing[SPOT_CAPACITY_UNAVAILABLE].add(str(pool))
    kept: dict[str, list[NodeInfo]] = {}
    answer = ctl.spot_answer(now)
    for node in nodes:
        if node.capacity_type == ON_DEMAND and node.age(now) >= ctl.config.min_on_demand_age:
            if not answer(node).available:
                kept.setdefault(str(pool_of(node)), []).append(node)
    for pool_name, held in kept.items():
        oldest = max(n.age(now) for n in held)
        names = sorted(n.name for n in held)
        ctl.alerter.fire(on_demand_fallback_alert(pool_name, names, timedelta(seconds=oldest), now))
        firing[ON_DEMAND_FALLBACK_ACTIVE].add(pool_name)
    for name, pools in ctl.alerted.items():
        for gone in pools - firing[name]:
            ctl.alerter.resolve(name, {"pool": gone})
    ctl.alerted = firing
    for name in ctl.blocked_alerts - ctl.inventory.nodes.keys():  # the node is gone
        ctl.alerter.resolve(ON_DEMAND_DRAIN_BLOCKED, {"node": name})
    ctl.blocked_alerts &= ctl.inventory.nodes.keys()
