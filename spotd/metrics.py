"""The agent's Prometheus metrics, all prefixed spotd_. One registry per process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

NOTICES = Counter("spotd_notices", "Notices acted on, by kind and source.", ["kind", "source"], registry=REGISTRY)
NOTICES_MALFORMED = Counter(
    "spotd_notices_malformed",
    "Notice payloads that could not be read and were skipped.",
    ["source"],
    registry=REGISTRY,
)
IMDS_REQUESTS = Counter(
    "spotd_imds_requests",
    "IMDS requests by path and outcome (ok, not_found, unauthorized, throttled, error, timeout).",
    ["path", "outcome"],
    registry=REGISTRY,
)
IMDS_LAST_SUCCESS = Gauge(
    "spotd_imds_last_success_timestamp_seconds",
    "Unix time of the last poll cycle in which every IMDS path answered.",
    registry=REGISTRY,
)
NODE_ACTIONS = Counter(
    "spotd_node_actions",
    "Node actions (taint, cordon, exclude_lb, uncordon, annotate) by outcome.",
    ["action", "outcome"],
    registry=REGISTRY,
)
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
NOTICE_ACTIVE = Gauge(
    "spotd_notice_active", "1 while a notice of this kind is being acted on.", ["kind"], registry=REGISTRY
)
LOOP_ERRORS = Counter(
    "spotd_loop_errors",
    "Unexpected errors caught in a loop, which then carried on.",
    ["loop"],
    registry=REGISTRY,
)
