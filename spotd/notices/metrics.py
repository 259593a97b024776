"""Metrics of the notice sources (on spotd.common.metrics.REGISTRY). Alert rules use the names."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from spotd.common.metrics import REGISTRY

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


EPISODE_SIGHTINGS = Counter(
    "spotd_episode_sightings",
    "Sightings of an interruption episode (one per instance and kind), by kind, witness (imds: the agent, "
    "queue: the controller) and order (first: recorded it on the Node and acted; second: found it recorded).",
    ["kind", "witness", "order"],
    registry=REGISTRY,
)
