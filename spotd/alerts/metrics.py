"""Alert delivery metrics, on the process registry (spotd.metrics.REGISTRY). Counted in alerts, not requests."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from spotd.common.metrics import REGISTRY

ALERTS_SENT = Counter(
    "spotd_alerts_sent",
    "Alerts by delivery outcome to one Alertmanager: ok; error (network, timeout, 5xx: retried); "
    "rejected (4xx: not retried); dropped (queue full).",
    ["outcome"],
    registry=REGISTRY,
)
ALERTS_DROPPED = Counter(
    "spotd_alerts_dropped",
    "Alerts dropped unsent because an Alertmanager's queue was full (the oldest goes first).",
    registry=REGISTRY,
)
ALERT_QUEUE_DEPTH = Gauge(
    "spotd_alert_queue_depth",
    "Alerts waiting to be sent, summed over every Alertmanager.",
    registry=REGISTRY,
)
for _outcome in ("ok", "error", "rejected", "dropped"):
    ALERTS_SENT.labels(_outcome)
