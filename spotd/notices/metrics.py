"""Metrics of the notice sources (on spotd.common.metrics.REGISTRY). Alert rules use the names."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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


# Both programs cordon: the agent on its own notice, the controller when it takes over from a silent agent.
NOTICE_TO_CORDON = Histogram(
    "spotd_notice_to_cordon_seconds",
    "Time from a notice being seen (or, for one acted on ahead of its NotBefore, being due) to the node being "
    "cordoned by spotd, by notice kind and actor (agent; controller: its takeover, counted from the queue "
    "message, when its cordon patch is accepted). The agent counts only a cordon it made, once per notice. A "
    "Spot warning gives two minutes.",
    ["kind", "actor"],
    buckets=(0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 60, 90, 120),
    registry=REGISTRY,
)
