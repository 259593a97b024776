"""Metrics of the controller's watch cache (on spotd.common.metrics.REGISTRY)."""

from __future__ import annotations

from prometheus_client import Counter

from spotd.common.metrics import REGISTRY

INVENTORY_EVENTS = Counter(
    "spotd_inventory_events",
    "Watch events by kind (node, pod) and outcome (applied, malformed, unknown, expired).",
    ["kind", "outcome"],
    registry=REGISTRY,
)


INVENTORY_RELISTS = Counter(
    "spotd_inventory_relists",
    "Full relists by kind (start, 410 Gone, watch error).",
    ["kind"],
    registry=REGISTRY,
)
