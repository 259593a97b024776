"""Metrics of the API plumbing (on spotd.common.metrics.REGISTRY)."""

from __future__ import annotations

from prometheus_client import Counter

from spotd.common.metrics import REGISTRY

NODE_ACTIONS = Counter(
    "spotd_node_actions",
    "Node actions (taint, cordon, exclude_lb, uncordon, annotate) by outcome.",
    ["action", "outcome"],
    registry=REGISTRY,
)
