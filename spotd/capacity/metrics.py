"""The capacity metrics, on the process registry. Alert rules refer to these names: keep them."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta

from prometheus_client import Counter, Gauge

from spotd.capacity.pools import AVAILABLE, PoolBook
from spotd.capacity.signals import CapacitySignal, SignalKind
from spotd.common.metrics import REGISTRY

ICE_SIGNALS = Counter(
    "spotd_ice_signals",
    "ICE (capacity shortage) signals read, by pool and source.",
    ["pool", "source"],
    registry=REGISTRY,
)
LAUNCH_SIGNALS = Counter(
    "spotd_launch_signals",
    "Launch signals read, by capacity type and source.",
    ["capacity_type", "source"],
    registry=REGISTRY,
)
POOL_SPOT_AVAILABLE = Gauge(
    "spotd_pool_spot_available",
    "1 while Spot counts as available in the pool, 0 while unavailable or recovering.",
    ["pool"],
    registry=REGISTRY,
)
SQS_MESSAGES = Counter(
    "spotd_sqs_messages",
    "SQS messages by outcome (handled, foreign, malformed, ignored, failed; deferred: kept for later, a launch "
    "action whose node is not Ready yet).",
    ["outcome"],
    registry=REGISTRY,
)
AWS_REQUESTS = Counter(
    "spotd_aws_requests",
    "AWS API calls, every attempt, by outcome (ok, throttled, server_error, client_error, connection_error).",
    ["service", "operation", "outcome"],
    registry=REGISTRY,
)
INSTANCE_LOOKUPS = Counter(
    "spotd_instance_lookups",
    "Instance facts asked for, by outcome (hit, miss, not_found).",
    ["outcome"],
    registry=REGISTRY,
)


def count_signals(signals: Iterable[CapacitySignal]) -> None:
    for signal in signals:
        if signal.kind == SignalKind.ICE:
            ICE_SIGNALS.labels(pool=str(signal.pool), source=signal.source).inc()
        else:
            LAUNCH_SIGNALS.labels(capacity_type=signal.capacity_type, source=signal.source).inc()


def export_pool_states(book: PoolBook, now: datetime, cooldown: timedelta) -> None:
    """Set spotd_pool_spot_available for every pool the book knows; call once per pass."""
    for pool in book.pools():
        POOL_SPOT_AVAILABLE.labels(pool=str(pool)).set(1 if book.state(pool, now, cooldown) == AVAILABLE else 0)
