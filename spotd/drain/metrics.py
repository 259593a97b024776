"""Metrics of the drain engine (on spotd.common.metrics.REGISTRY). Alert rules use the names."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from spotd.common.metrics import REGISTRY

DRAINS = Counter(
    "spotd_drains", "Drains by outcome (complete, incomplete, interrupted).", ["outcome"], registry=REGISTRY
)


DRAIN_DURATION = Histogram(
    "spotd_drain_duration_seconds",
    "Time from drain start to the last pod gone (or the deadline).",
    buckets=(0.5, 1, 2, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600),
    registry=REGISTRY,
)


EVICTIONS = Counter(
    "spotd_evictions",
    "Pods by eviction outcome (evicted, deleted, pdb_blocked, failed, left, forced).",
    ["outcome"],
    registry=REGISTRY,
)


PODS_LEFT = Gauge(
    "spotd_drain_pods_left",
    "Pods still on the node when the last drain reached its deadline.",
    registry=REGISTRY,
)
