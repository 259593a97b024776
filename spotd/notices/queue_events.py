"""The instance events the controller reads from its SQS queue, parsed in one place (pure).

EventBridge delivers, to the queue the controller already reads for capacity events:
  aws.ec2          "EC2 Spot Instance Interruption Warning"     -> spot-itn (deadline: event time + 2 min)
  aws.ec2          "EC2 Instance Rebalance Recommendation"      -> rebalance (no deadline)
  aws.ec2          "EC2 Instance State-change Notification"     -> state-change, for stopping, stopped,
                                                                  shutting-down, terminated (deadline: now)
  aws.health       "AWS Health Event", service EC2, category scheduledChange
                                                                -> scheduled-maintenance (deadline: the
                                                                  window's start)
  aws.autoscaling  "EC2 Instance-terminate Lifecycle Action"    -> asg-termination (with the hook's token)
  aws.autoscaling  "EC2 Instance-launch Lifecycle Action"       -> asg-launch
A Spot warning, rebalance or state change that carries the rehearsal marker (a top-level "spotd-rehearsal"
object: {"id": ..., "deadline": RFC 3339}, which EventBridge never writes) is `spotd simulate-reclaim
--via-queue`'s: its event has `rehearsal` set and the marker's deadline (docs/simulate-reclaim.md); the
controller refuses one of a rebalance (rehearsal_refusal).
Also accepted: any of these wrapped in an SNS notification, and a lifecycle hook whose notification target
is the queue itself (no EventBridge envelope). Anything else returns None (the capacity parser in
spotd.capacity.signals may still read it). A body that is one of these but lacks what it must carry raises
MalformedNotice: logged, counted and acknowledged by the reader, never retried.

The record knows nothing of Kubernetes: which node an instance is, is the controller's business.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

from spotd.common.parsing import INSTANCE_ID_RE, format_time, parse_iso_time
from spotd.notices.record import REHEARSAL_MAX_AHEAD, MalformedNotice

SPOT_WARNING = timedelta(minutes=2)  # EventBridge sends the Spot warning two minutes before the action
REHEARSAL_MARKER = "spotd-rehearsal"  # the envelope key of a rehearsal's message (never EventBridge's)

# Episode kinds: the agent's notice kinds where IMDS has the same notice, and two the queue alone sees.
SPOT_ITN = "spot-itn"
REBALANCE = "rebalance"
SCHEDULED_MAINTENANCE = "scheduled-maintenance"
ASG_TERMINATION = "asg-termination"
STATE_CHANGE = "state-change"
ASG_LAUNCH = "asg-launch"
KINDS = (SPOT_ITN, REBALANCE, SCHEDULED_MAINTENANCE, ASG_TERMINATION, STATE_CHANGE, ASG_LAUNCH)

# The state changes that mean the instance is going away; pending and running are not news.
LEAVING_STATES = frozenset({"stopping", "stopped", "shutting-down", "terminated"})

_EC2_TYPES = {
    "EC2 Spot Instance Interruption Warning": SPOT_ITN,
    "EC2 Instance Rebalance Recommendation": REBALANCE,
    "EC2 Instance State-change Notification": STATE_CHANGE,
}
_LIFECYCLE_TYPES = {
    "EC2 Instance-terminate Lifecycle Action": ASG_TERMINATION,
    "EC2 Instance-launch Lifecycle Action": ASG_LAUNCH,
}
_TRANSITIONS = {
    "autoscaling:EC2_INSTANCE_TERMINATING": ASG_TERMINATION,
    "autoscaling:EC2_INSTANCE_LAUNCHING": ASG_LAUNCH,
}


@dataclass(frozen=True)
class InstanceEvent:
    """One event about one or more instances, as read from the queue.

    at: when AWS says it happened (the event's time). deadline: when the instance is expected to go
    (None: advisory, or unknown as for a lifecycle hook, which waits for us). not_after: the end of a
    maintenance window. action: the Spot action, the new state, or the Health event type code.
    asg, hook, token: an Auto Scaling lifecycle action's group, hook name and LifecycleActionToken.
    event_id: the EventBridge id (or the lifecycle notification's RequestId), for the logs.
    rehearsal: the id of the `spotd simulate-reclaim --via-queue` run that sent it ("": a real event).
    """

    kind: str
    instance_ids: tuple[str, ...]
    at: datetime
    deadline: datetime | None = None
    not_after: datetime | None = None
    action: str = ""
    event_id: str = ""
    account: str = ""
    region: str = ""
    asg: str = ""
    hook: str = ""
    token: str = ""
    rehearsal: str = ""


def read_instance_event(body: str) -> InstanceEvent | None:
    """An SQS message body -> the instance event it carries, None when it carries none (another event
    type, a Health event for another service or category, a state change to pending or running, a test
    notification), or MalformedNotice (not JSON, or one of our event types lacking what it must carry)."""
    try:
        data = json.loads(body)
    except (TypeError, ValueError) as exc:
        raise MalformedNotice(f"message is not JSON: {exc}") from None
    if isinstance(data, dict) and data.get("Type") == "Notification" and isinstance(data.get("Message"), str):
        return read_instance_event(data["Message"])  # SNS envelope
    if not isinstance(data, dict):
        raise MalformedNotice("message is not a JSON object")
    if "detail-type" in data:
        return _read_eventbridge(data)
    if "LifecycleTransition" in data:  # a lifecycle hook notifying the queue directly
        kind = _TRANSITIONS.get(str(data["LifecycleTransition"]))
        if kind is None:
            return None
        return _read_lifecycle(data, kind, data.get("Time"), str(data.get("RequestId") or ""), data)
    return None


def _read_eventbridge(data: dict[str, Any]) -> InstanceEvent | None:
    detail_type, source = data.get("detail-type"), data.get("source")
    detail = data.get("detail")
    if source == "aws.ec2" and detail_type in _EC2_TYPES:
        return _read_ec2(data, _EC2_TYPES[str(detail_type)], _object(detail))
    if source == "aws.autoscaling" and detail_type in _LIFECYCLE_TYPES:
        return _read_lifecycle(
            _object(detail), _LIFECYCLE_TYPES[str(detail_type)], data.get("time"), str(data.get("id") or ""), data
        )
    if source == "aws.health" and detail_type == "AWS Health Event":
        return _read_health(data, _object(detail))
    return None


def _object(detail: Any) -> dict[str, Any]:
    if not isinstance(detail, dict):
        raise MalformedNotice("event detail is not a JSON object")
    return detail


def _event_time(value: Any) -> datetime:
    if not isinstance(value, str) or not value:
        raise MalformedNotice("event has no time")
    try:
        return parse_iso_time(value)
    except ValueError as exc:
        raise MalformedNotice(f"event time {value!r}: {exc}") from None


def _instance_id(value: Any, field: str) -> str:
    if not isinstance(value, str) or not INSTANCE_ID_RE.fullmatch(value):
        raise MalformedNotice(f"event {field} {value!r} is not an instance id")
    return value


def _read_ec2(data: dict[str, Any], kind: str, detail: dict[str, Any]) -> InstanceEvent | None:
    at = _event_time(data.get("time"))
    iid = _instance_id(detail.get("instance-id"), "instance-id")
    deadline: datetime | None = None
    action = ""
    if kind == SPOT_ITN:
        action = detail.get("instance-action") or ""
        if not isinstance(action, str) or not action:
            raise MalformedNotice("Spot interruption warning has no instance-action")
        deadline = at + SPOT_WARNING
    elif kind == STATE_CHANGE:
        action = detail.get("state") or ""
        if not isinstance(action, str) or not action:
            raise MalformedNotice("state-change notification has no state")
        if action not in LEAVING_STATES:
            return None
        deadline = at  # the instance is going now
    rehearsal = ""
    if REHEARSAL_MARKER in data:
        rehearsal, deadline = _read_rehearsal_marker(data[REHEARSAL_MARKER])
    return InstanceEvent(
        kind,
        (iid,),
        at=at,
        deadline=deadline,
        action=action,
        event_id=str(data.get("id") or ""),
        account=str(data.get("account") or ""),
        region=str(data.get("region") or ""),
        rehearsal=rehearsal,
    )


def _read_rehearsal_marker(marker: Any) -> tuple[str, datetime]:
    if not isinstance(marker, dict):
        raise MalformedNotice(f"{REHEARSAL_MARKER} is not a JSON object")
    ident = marker.get("id")
    if not isinstance(ident, str) or not ident:
        raise MalformedNotice(f"{REHEARSAL_MARKER} has no id")
    try:
        deadline = parse_iso_time(str(marker.get("deadline") or ""))
    except ValueError as exc:
        raise MalformedNotice(f"{REHEARSAL_MARKER} deadline: {exc}") from None
    return ident, deadline


def rehearsal_refusal(event: InstanceEvent, now: datetime) -> str | None:
    """Why a rehearsal's event is not acted on (None: it is), as the agents judge a rehearsal request: a
    deadline past, or more than 15 minutes ahead, could never be a rehearsal's (a rehearsal is never made
    into an immediate deadline)."""
    if event.kind not in (SPOT_ITN, STATE_CHANGE):  # what the controller takes over for a silent agent
        return f"a rehearsal of {event.kind}: the controller rehearses only Spot warnings and state changes"
    if event.deadline is None:
        return "no deadline"
    if event.deadline <= now:
        return f"deadline {format_time(event.deadline)} is in the past"
    if event.deadline > now + REHEARSAL_MAX_AHEAD:
        return f"deadline {format_time(event.deadline)} is more than 15 minutes ahead"
    return None


def rehearsal_spot_warning(
    instance_id: str, at: datetime, deadline: datetime, rehearsal: str, region: str = "", account: str = ""
) -> str:
    """The SQS message body of a rehearsal's Spot interruption warning: EventBridge's shape, with the
    rehearsal marker carrying the run's id and its deadline (read back by read_instance_event)."""
    body = {
        "version": "0",
        "id": f"{rehearsal}-{instance_id}",
        "detail-type": "EC2 Spot Instance Interruption Warning",
        "source": "aws.ec2",
        "account": account,
        "time": format_time(at),
        "region": region,
        "resources": [f"arn:aws:ec2:{region}:{account}:instance/{instance_id}"],
        "detail": {"instance-id": instance_id, "instance-action": "terminate"},
        REHEARSAL_MARKER: {"id": rehearsal, "deadline": format_time(deadline)},
    }
    return json.dumps(body, separators=(",", ":"))


def _read_lifecycle(
    detail: dict[str, Any], kind: str, when: Any, event_id: str, envelope: dict[str, Any]
) -> InstanceEvent:
    iid = _instance_id(detail.get("EC2InstanceId"), "EC2InstanceId")
    fields = {}
    for name in ("AutoScalingGroupName", "LifecycleHookName", "LifecycleActionToken"):
        value = detail.get(name)
        if not isinstance(value, str) or not value:
            raise MalformedNotice(f"lifecycle action has no {name}")
        fields[name] = value
    return InstanceEvent(
        kind,
        (iid,),
        at=_event_time(when),
        event_id=event_id,
        account=str(envelope.get("account") or envelope.get("AccountId") or ""),
        region=str(envelope.get("region") or ""),
        asg=fields["AutoScalingGroupName"],
        hook=fields["LifecycleHookName"],
        token=fields["LifecycleActionToken"],
    )


def parse_health_time(text: Any) -> datetime:
    """AWS Health's times in events: 'Sat, 05 Jun 2021 15:10:09 GMT' (RFC 1123), or RFC 3339."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("no time")
    try:
        return parse_iso_time(text)
    except ValueError:
        pass
    try:
        parsed = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        raise ValueError(f"{text!r} is not a time") from None
    if parsed.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone")
    return parsed


def _read_health(data: dict[str, Any], detail: dict[str, Any]) -> InstanceEvent | None:
    if detail.get("service") != "EC2" or detail.get("eventTypeCategory") != "scheduledChange":
        return None
    code = detail.get("eventTypeCode")
    if not isinstance(code, str) or not code:
        raise MalformedNotice("Health event has no eventTypeCode")
    try:
        start = parse_health_time(detail.get("startTime"))
    except ValueError as exc:
        raise MalformedNotice(f"Health event startTime: {exc}") from None
    end: datetime | None = None
    if detail.get("endTime"):
        try:
            end = parse_health_time(detail["endTime"])
        except ValueError as exc:
            raise MalformedNotice(f"Health event endTime: {exc}") from None
    ids: list[str] = []
    entities = detail.get("affectedEntities")
    if isinstance(entities, list):
        for entity in entities:
            value = entity.get("entityValue") if isinstance(entity, dict) else None
            if isinstance(value, str) and INSTANCE_ID_RE.fullmatch(value) and value not in ids:
                ids.append(value)
    if not ids:  # some Health events name their instances only in resources
        for value in data.get("resources") or ():
            if isinstance(value, str) and INSTANCE_ID_RE.fullmatch(value) and value not in ids:
                ids.append(value)
    if not ids:
        raise MalformedNotice("Health event names no instance")
    return InstanceEvent(
        SCHEDULED_MAINTENANCE,
        tuple(ids),
        at=_event_time(data.get("time")),
        deadline=start,
        not_after=end,
        action=code,
        event_id=str(detail.get("eventArn") or data.get("id") or ""),
        account=str(data.get("account") or ""),
        region=str(data.get("region") or ""),
    )
