"""Capacity signals and the pure parsing of every AWS text that carries one (no boto3 here).

A signal says "Spot could not launch in this pool" (ICE) or "Spot launched in this pool" (LAUNCHED).
Sources: EventBridge events through SQS, DescribeScalingActivities, new Spot nodes, the active probe.

Which pool a failure names (the rule, also in docs/capacity.md):
  instance type: the type named in the status message, else the ASG's only type, else "*";
  zone: Details["Availability Zone"], else the zone named in the message, else the ASG's only zone, else "*".
A "*" field means "unknown": the pool covers every type (or zone) there.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum
from typing import Any

from spotd.common.parsing import INSTANCE_ID_RE, parse_iso_time

ANY = "*"


@dataclass(frozen=True, order=True)
class Pool:
    """Where Spot capacity runs out together: one instance type in one availability zone."""

    instance_type: str
    zone: str

    def __str__(self) -> str:
        return f"{self.instance_type}/{self.zone}"

    @classmethod
    def parse(cls, text: str) -> Pool:
        """'m5.large/us-east-1a' -> Pool; '*' stands for an unknown type or zone."""
        instance_type, sep, zone = text.strip().partition("/")
        if not sep or not instance_type or not zone or "/" in zone:
            raise ValueError(f"{text!r} is not a pool like m5.large/us-east-1a")
        return cls(instance_type, zone)

    def contains(self, other: Pool) -> bool:
        """True when every field is equal or "*" here: '*/us-east-1a' contains 'm5.large/us-east-1a'."""
        return self.instance_type in (ANY, other.instance_type) and self.zone in (ANY, other.zone)

    @property
    def wildcard(self) -> bool:
        return ANY in (self.instance_type, self.zone)


class SignalKind(StrEnum):
    ICE = "ice"
    LAUNCHED = "launched"


class CapacityType(StrEnum):
    SPOT = "spot"
    ON_DEMAND = "on-demand"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class CapacitySignal:
    """One observation about a pool. source: "sqs" | "activities" | "node" | "probe".

    capacity_type: what failed or launched ("spot", "on-demand", "unknown"). An ICE of any capacity type
    marks Spot unavailable (on-demand short means Spot is short too); only a Spot launch counts as return.
    key: identifies the observation (the ASG ActivityId, the node name) so a repeat is recognisable.
    """

    pool: Pool
    kind: SignalKind
    source: str
    at: datetime
    reason: str = ""
    asg: str = ""
    capacity_type: str = CapacityType.SPOT
    instance_id: str = ""
    key: str = ""


@dataclass(frozen=True)
class AsgInfo:
    """What the parsers need to know of an Auto Scaling group.

    spot: the group launches Spot (mixed-instances policy with OnDemandPercentageAboveBaseCapacity < 100,
    a launch template asking for the spot market, or a launch configuration with SpotPrice).
    on_demand: the group also (or only) launches on-demand (base capacity, percentage > 0, plain template).
    """

    name: str
    instance_types: tuple[str, ...] = ()
    zones: tuple[str, ...] = ()
    spot: bool = False
    on_demand: bool = True

    @property
    def launch_capacity_type(self) -> str:
        """The capacity type of any launch in this group, when the group alone tells it."""
        if self.spot and not self.on_demand:
            return CapacityType.SPOT
        if self.on_demand and not self.spot:
            return CapacityType.ON_DEMAND
        return CapacityType.UNKNOWN


class MalformedEvent(ValueError):
    """A message that should hold an event but cannot be read: logged, counted and deleted."""


# --- status messages --------------------------------------------------------------------------------

# Error codes EC2 and Auto Scaling write into status messages, in the order they are looked for.
_ICE_CODES = (
    "InsufficientInstanceCapacity",
    "InsufficientHostCapacity",
    "InsufficientReservedInstanceCapacity",
    "InsufficientCapacityOnHost",
    "UnfulfillableCapacity",
    "MaxSpotInstanceCountExceeded",
    "SpotMaxPriceTooLow",
    # Spot request status codes, as Spot Fleet and EC2 Fleet errors spell them.
    "capacity-not-available",
    "capacity-oversubscribed",
    "price-too-low",
    "instance-terminated-no-capacity",
)
_ICE_CODE_RE = re.compile(r"\b(" + "|".join(re.escape(c) for c in _ICE_CODES) + r")\b")
# Plain-text forms, for messages that carry no code.
_ICE_PHRASES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"no spot capacity available", re.I), "SpotCapacityNotAvailable"),
    (re.compile(r"do(?:es)? not have (?:sufficient|enough)\b.{0,60}?\bcapacity", re.I), "InsufficientInstanceCapacity"),
    (re.compile(r"insufficient capacity", re.I), "InsufficientInstanceCapacity"),
    (
        re.compile(r"max(?:imum)? (?:number of )?spot instances? (?:count |allowed )?(?:has been )?exceeded", re.I),
        "MaxSpotInstanceCountExceeded",
    ),
    (re.compile(r"unable to fulfill capacity", re.I), "UnfulfillableCapacity"),
    (re.compile(r"spot request price of .* is lower than the minimum required", re.I), "SpotMaxPriceTooLow"),
)


def classify_status_message(message: str) -> str | None:
    """An Auto Scaling or EC2 status message -> the capacity-shortage reason code, or None.

    None for every failure that is not a capacity shortage (unsupported type, IAM, quota of vCPUs,
    subnet addresses, ...): those need a person, not a wait for Spot.
    """
    if not isinstance(message, str) or not message:
        return None
    m = _ICE_CODE_RE.search(message)
    if m:
        return m.group(1)
    for pattern, code in _ICE_PHRASES:
        if pattern.search(message):
            return code
    return None


_INSTANCE_TYPE_RE = re.compile(
    r"\b([a-z][a-z0-9]*(?:-[a-z0-9]+)*\.(?:\d*(?:nano|micro|small|medium|large|xlarge)|metal(?:-\d+xl)?))\b"
)
_ZONE = r"[a-z]{2}(?:-[a-z]+)+-\d+(?:-[a-z]+-\d+)?[a-z]"
_ZONE_IN_PARENS_RE = re.compile(r"\((" + _ZONE + r")\)")
_ZONE_RE = re.compile(r"\b(" + _ZONE + r")\b")


def instance_type_in_message(message: str) -> str | None:
    """The first instance type a status message names ('... sufficient m5.large capacity ...')."""
    m = _INSTANCE_TYPE_RE.search(message or "")
    return m.group(1) if m else None


def zone_in_message(message: str) -> str | None:
    """The zone a status message names: the one in parentheses first, since the message goes on to
    list the zones that do have capacity ('... requested (us-east-1a). ... choosing us-east-1b, ...')."""
    m = _ZONE_IN_PARENS_RE.search(message or "") or _ZONE_RE.search(message or "")
    return m.group(1) if m else None


def _failed_capacity_type(message: str, asg: AsgInfo | None) -> str:
    # Mixed-instances groups say which market failed: "Could not launch Spot Instances. ..."
    lowered = message.lower()
    if "launch spot instances" in lowered or "spot capacity" in lowered or "spot instance" in lowered:
        return CapacityType.SPOT
    if "launch on-demand instances" in lowered:
        return CapacityType.ON_DEMAND
    return asg.launch_capacity_type if asg else CapacityType.UNKNOWN


def resolve_pool(message: str, zone: str | None, asg: AsgInfo | None) -> Pool:
    """The pool a failure or launch names, by the rule in the module docstring."""
    instance_type = instance_type_in_message(message)
    if not instance_type and asg and len(asg.instance_types) == 1:
        instance_type = asg.instance_types[0]
    zone = zone or zone_in_message(message)
    if not zone and asg and len(asg.zones) == 1:
        zone = asg.zones[0]
    return Pool(instance_type or ANY, zone or ANY)


# --- launch results (EventBridge detail, ASG notifications, scaling activities) ----------------------


@dataclass(frozen=True)
class LaunchResult:
    """The fields shared by a launch event's detail and a scaling activity, read and checked."""

    asg: str
    succeeded: bool
    message: str
    zone: str | None
    at: datetime
    instance_id: str = ""
    activity_id: str = ""


def _details(value: Any) -> dict[str, Any]:
    # EventBridge gives Details as an object, DescribeScalingActivities as a JSON string.
    if isinstance(value, dict):
        return value
    if isinstance(value, str) and value.strip():
        try:
            parsed = json.loads(value)
        except ValueError:
            return {}
        return parsed if isinstance(parsed, dict) else {}
    return {}


def _time(value: Any, fallback: Any = None) -> datetime:
    for candidate in (value, fallback):
        if isinstance(candidate, datetime):
            return parse_iso_time(candidate.isoformat())
        if isinstance(candidate, str) and candidate:
            return parse_iso_time(candidate)
    raise ValueError("no time")


def launch_signal(result: LaunchResult, source: str, asgs: Mapping[str, AsgInfo]) -> CapacitySignal | None:
    """A read launch result -> ICE, LAUNCHED or None (a failure that is no capacity shortage)."""
    asg = asgs.get(result.asg)
    if result.succeeded:
        pool = resolve_pool("", result.zone, asg)
        return CapacitySignal(
            pool,
            SignalKind.LAUNCHED,
            source,
            result.at,
            reason="launch successful",
            asg=result.asg,
            capacity_type=asg.launch_capacity_type if asg else CapacityType.UNKNOWN,
            instance_id=result.instance_id,
            key=result.activity_id,
        )
    reason = classify_status_message(result.message)
    if reason is None:
        return None
    return CapacitySignal(
        resolve_pool(result.message, result.zone, asg),
        SignalKind.ICE,
        source,
        result.at,
        reason=reason,
        asg=result.asg,
        capacity_type=_failed_capacity_type(result.message, asg),
        instance_id=result.instance_id,
        key=result.activity_id,
    )


_EVENT_TYPES = {
    # EventBridge detail-type (source aws.autoscaling) -> succeeded
    "EC2 Instance Launch Successful": True,
    "EC2 Instance Launch Unsuccessful": False,
}
_NOTIFICATION_TYPES = {
    # Auto Scaling's own SNS notifications, when the queue is subscribed to them
    "autoscaling:EC2_INSTANCE_LAUNCH": True,
    "autoscaling:EC2_INSTANCE_LAUNCH_ERROR": False,
}


def _read_launch_detail(detail: Any, succeeded: bool, event_time: Any) -> LaunchResult:
    if not isinstance(detail, dict):
        raise MalformedEvent("event detail is not a JSON object")
    asg = detail.get("AutoScalingGroupName")
    if not isinstance(asg, str) or not asg:
        raise MalformedEvent("event has no AutoScalingGroupName")
    message = detail.get("StatusMessage") or detail.get("Description") or ""
    if not isinstance(message, str):
        raise MalformedEvent("event StatusMessage is not a string")
    if not succeeded and not message:
        raise MalformedEvent("unsuccessful launch event has no StatusMessage")
    zone = _details(detail.get("Details")).get("Availability Zone")
    try:
        at = _time(detail.get("EndTime"), event_time or detail.get("StartTime"))
    except ValueError as exc:
        raise MalformedEvent(f"event time: {exc}") from None
    instance_id = detail.get("EC2InstanceId")
    activity_id = detail.get("ActivityId")
    return LaunchResult(
        asg=asg,
        succeeded=succeeded,
        message=message,
        zone=zone if isinstance(zone, str) and zone else None,
        at=at,
        instance_id=instance_id if isinstance(instance_id, str) else "",
        activity_id=activity_id if isinstance(activity_id, str) else "",
    )


def read_event(body: str) -> LaunchResult | None:
    """An SQS message body -> the launch result it reports, or None for an event type spotd ignores.

    Reads an EventBridge event (also wrapped in an SNS notification) or an Auto Scaling SNS notification.
    Not JSON, not an event, or a launch event lacking what it must carry -> MalformedEvent.
    """
    try:
        data = json.loads(body)
    except (TypeError, ValueError) as exc:
        raise MalformedEvent(f"message is not JSON: {exc}") from None
    if isinstance(data, dict) and data.get("Type") == "Notification" and isinstance(data.get("Message"), str):
        return read_event(data["Message"])  # SNS envelope
    if not isinstance(data, dict):
        raise MalformedEvent("message is not a JSON object")
    if "detail-type" in data:
        detail_type = data["detail-type"]
        if data.get("source") != "aws.autoscaling" or detail_type not in _EVENT_TYPES:
            return None
        return _read_launch_detail(data.get("detail"), _EVENT_TYPES[detail_type], data.get("time"))
    if "Event" in data:
        if data["Event"] not in _NOTIFICATION_TYPES:
            return None
        return _read_launch_detail(data, _NOTIFICATION_TYPES[data["Event"]], None)
    raise MalformedEvent("message is neither an EventBridge event nor an Auto Scaling notification")


def parse_eventbridge_message(body: str, asgs: Mapping[str, AsgInfo] | None = None) -> list[CapacitySignal]:
    """An SQS message body -> the capacity signals it carries (zero or one today).

    "EC2 Instance Launch Unsuccessful" with a shortage -> ICE; "EC2 Instance Launch Successful" -> LAUNCHED;
    other failures and unknown event types -> []; unreadable -> MalformedEvent.
    asgs (from AsgSource.discover) fills the instance type, zone and capacity type an event leaves out.
    """
    result = read_event(body)
    if result is None:
        return []
    signal = launch_signal(result, "sqs", asgs or {})
    return [signal] if signal else []


# DescribeScalingActivities StatusCode values after which an activity no longer changes.
ACTIVITY_DONE = frozenset({"Successful", "Failed", "Cancelled"})


def read_scaling_activity(activity: Mapping[str, Any]) -> LaunchResult | None:
    """A DescribeScalingActivities Activity -> a launch result, or None when it is no finished launch."""
    status = activity.get("StatusCode")
    description = activity.get("Description") or ""
    if status not in ("Successful", "Failed") or not isinstance(description, str):
        return None
    if not description.startswith("Launching a new EC2 instance"):
        return None
    asg = activity.get("AutoScalingGroupName")
    if not isinstance(asg, str) or not asg:
        return None
    message = activity.get("StatusMessage") or ""
    if not message and "Status Reason:" in description:
        message = description.split("Status Reason:", 1)[1].strip()
    try:
        at = _time(activity.get("EndTime"), activity.get("StartTime"))
    except ValueError:
        return None
    m = INSTANCE_ID_RE.search(description.split("Status Reason:", 1)[0])
    zone = _details(activity.get("Details")).get("Availability Zone")
    return LaunchResult(
        asg=asg,
        succeeded=status == "Successful",
        message=str(message),
        zone=zone if isinstance(zone, str) and zone else None,
        at=at,
        instance_id=m.group(1) if m else "",
        activity_id=str(activity.get("ActivityId") or ""),
    )


def parse_scaling_activity(
    activity: Mapping[str, Any], asgs: Mapping[str, AsgInfo] | None = None
) -> CapacitySignal | None:
    """A DescribeScalingActivities Activity (as boto3 returns it, or as JSON) -> signal or None.

    None for activities that are not finished launches, and for launch failures that are no shortage.
    """
    result = read_scaling_activity(activity)
    return launch_signal(result, "activities", asgs or {}) if result else None


def with_instance_facts(signal: CapacitySignal, instance_type: str, zone: str, lifecycle: str) -> CapacitySignal:
    """Fill what an event left unknown ("*" type or zone, "unknown" capacity type) from the instance."""
    pool = Pool(
        instance_type if signal.pool.instance_type == ANY and instance_type else signal.pool.instance_type,
        zone if signal.pool.zone == ANY and zone else signal.pool.zone,
    )
    capacity_type = lifecycle if signal.capacity_type == CapacityType.UNKNOWN and lifecycle else signal.capacity_type
    return replace(signal, pool=pool, capacity_type=capacity_type)
