"""The agent's own Prometheus metrics (on spotd.common.metrics.REGISTRY). Alert rules use the names."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from spotd.common.metrics import REGISTRY

NOTICES = Counter("spotd_notices", "Notices acted on, by kind and source.", ["kind", "source"], registry=REGISTRY)


NOTICE_ACTIVE = Gauge(
    "spotd_notice_active", "1 while a notice of this kind is being acted on.", ["kind"], registry=REGISTRY
)


NODE_ACTIONS = Counter(
    "spotd_node_actions",
    "Node actions (taint, cordon, exclude_lb, uncordon, annotate) by outcome.",
    ["action", "outcome"],
    registry=REGISTRY,
)
