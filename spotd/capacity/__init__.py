"""Spot capacity per pool: signal parsing (signals), the pool state machine (pools), the AWS readers
(aws, sqs, asg).

signals and pools are pure and import no boto3; only the readers do, so the agent never loads it.
"""

from spotd.capacity.pools import AVAILABLE, RECOVERING, UNAVAILABLE, PoolBook, PoolRecord, PoolVerdict
from spotd.capacity.signals import (
    AsgInfo,
    CapacitySignal,
    CapacityType,
    MalformedEvent,
    Pool,
    SignalKind,
    classify_status_message,
    instance_id_from_provider_id,
    parse_eventbridge_message,
    parse_scaling_activity,
)

__all__ = [
    "AVAILABLE",
    "RECOVERING",
    "UNAVAILABLE",
    "AsgInfo",
    "CapacitySignal",
    "CapacityType",
    "MalformedEvent",
    "Pool",
    "PoolBook",
    "PoolRecord",
    "PoolVerdict",
    "SignalKind",
    "classify_status_message",
    "instance_id_from_provider_id",
    "parse_eventbridge_message",
    "parse_scaling_activity",
]
