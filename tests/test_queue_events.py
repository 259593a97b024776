"""The instance events read from the controller's queue: one small table test per shape (pure).

The bodies are the shapes AWS documents (EC2 Spot interruption warning, rebalance recommendation, state
change, AWS Health scheduled change, Auto Scaling lifecycle actions through EventBridge and straight from a
hook), with the instance ids and times changed.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from spotd.notices.queue_events import (
    ASG_LAUNCH,
    ASG_TERMINATION,
    REBALANCE,
    SCHEDULED_MAINTENANCE,
    SPOT_ITN,
    STATE_CHANGE,
    parse_health_time,
    read_instance_event,
)
from spotd.notices.record import MalformedNotice

T = "2026-12-05T10:00:00Z"
AT = datetime(2026, 12, 5, 10, 0, tzinfo=UTC)
IID = "i-1234567890abcdef0"


def spot_itn(action: str = "terminate", **over: Any) -> dict[str, Any]:
    event = {
        "version": "0",
        "id": "12345678-1234-1234-1234-123456789012",
        "detail-type": "EC2 Spot Instance Interruption Warning",
        "source": "aws.ec2",
        "account": "123456789012",
        "time": T,
        "region": "us-east-2",
        "resources": [f"arn:aws:ec2:us-east-2a:instance/{IID}"],
        "detail": {"instance-id": IID, "instance-action": action},
    }
    event.update(over)
    return event


def rebalance() -> dict[str, Any]:
    return {
        "version": "0",
        "id": "12345678-1234-1234-1234-123456789013",
        "detail-type": "EC2 Instance Rebalance Recommendation",
        "source": "aws.ec2",
        "account": "123456789012",
        "time": T,
        "region": "us-east-2",
        "resources": [f"arn:aws:ec2:us-east-2:123456789012:instance/{IID}"],
        "detail": {"instance-id": IID},
    }


def state_change(state: str) -> dict[str, Any]:
    return {
        "version": "0",
        "id": "7bf73129-1428-4cd3-a780-95db273d1602",
        "detail-type": "EC2 Instance State-change Notification",
        "source": "aws.ec2",
        "account": "123456789012",
        "time": T,
        "region": "us-east-1",
        "resources": [f"arn:aws:ec2:us-east-1:123456789012:instance/{IID}"],
        "detail": {"instance-id": IID, "state": state},
    }


def health(**detail_over: Any) -> dict[str, Any]:
    detail = {
        "eventArn": "arn:aws:health:us-east-1::event/EC2/AWS_EC2_INSTANCE_RETIREMENT_SCHEDULED/abc",
        "service": "EC2",
        "eventTypeCode": "AWS_EC2_INSTANCE_RETIREMENT_SCHEDULED",
        "eventTypeCategory": "scheduledChange",
        "startTime": "Sat, 12 Dec 2026 15:10:09 GMT",
        "endTime": "Sat, 12 Dec 2026 17:10:09 GMT",
        "eventDescription": [{"language": "en_US", "latestDescription": "EC2 has detected degradation..."}],
        "affectedEntities": [{"entityValue": IID}, {"entityValue": "i-0fedcba9876543210"}],
    }
    detail.update(detail_over)
    return {
        "version": "0",
        "id": "7fb65329-1628-4cf3-a740-95fg457h1402",
        "detail-type": "AWS Health Event",
        "source": "aws.health",
        "account": "123456789012",
        "time": T,
        "region": "us-east-1",
        "resources": [IID],
        "detail": detail,
    }


def lifecycle(transition: str = "terminate", **detail_over: Any) -> dict[str, Any]:
    detail = {
        "LifecycleActionToken": "87654321-4321-4321-4321-210987654321",
        "AutoScalingGroupName": "my-asg",
        "LifecycleHookName": "my-lifecycle-hook",
        "EC2InstanceId": IID,
        "LifecycleTransition": f"autoscaling:EC2_INSTANCE_{transition.upper()}ING".replace("EING", "ING"),
        "NotificationMetadata": "additional-info",
        "Origin": "AutoScalingGroup",
        "Destination": "EC2",
    }
    detail.update(detail_over)
    return {
        "version": "0",
        "id": "12345678-1234-1234-1234-123456789012",
        "detail-type": f"EC2 Instance-{transition} Lifecycle Action",
        "source": "aws.autoscaling",
        "account": "123456789012",
        "time": T,
        "region": "us-west-2",
        "resources": ["arn:aws:autoscaling:us-west-2:123456789012:autoScalingGroup:uuid:autoScalingGroupName/my-asg"],
        "detail": detail,
    }


def hook_direct() -> dict[str, Any]:
    """A lifecycle hook whose notification target is the queue (no EventBridge)."""
    return {
        "Origin": "AutoScalingGroup",
        "LifecycleHookName": "my-lifecycle-hook",
        "Destination": "EC2",
        "AccountId": "123456789012",
        "RequestId": "a1b2c3d4-5678-90ab-cdef-EXAMPLE11111",
        "LifecycleTransition": "autoscaling:EC2_INSTANCE_TERMINATING",
        "AutoScalingGroupName": "my-asg",
        "Service": "AWS Auto Scaling",
        "Time": T,
        "EC2InstanceId": IID,
        "LifecycleActionToken": "87654321-4321-4321-4321-210987654321",
    }


def body(obj: Any) -> str:
    return json.dumps(obj)


def sns(obj: Any) -> str:
    return body({"Type": "Notification", "MessageId": "m", "TopicArn": "arn:aws:sns:x", "Message": body(obj)})


@pytest.mark.parametrize("action", ["terminate", "stop", "hibernate"])
def test_spot_warning_has_the_two_minute_deadline(action: str) -> None:
    event = read_instance_event(body(spot_itn(action)))
    assert event is not None
    assert (event.kind, event.instance_ids, event.action) == (SPOT_ITN, (IID,), action)
    assert event.at == AT and event.deadline == AT + timedelta(minutes=2)
    assert (event.account, event.region) == ("123456789012", "us-east-2")


def test_rebalance_has_no_deadline() -> None:
    event = read_instance_event(body(rebalance()))
    assert event is not None and (event.kind, event.deadline) == (REBALANCE, None)


@pytest.mark.parametrize("state", ["stopping", "stopped", "shutting-down", "terminated"])
def test_state_change_away_is_due_now(state: str) -> None:
    event = read_instance_event(body(state_change(state)))
    assert event is not None and (event.kind, event.action, event.deadline) == (STATE_CHANGE, state, AT)


@pytest.mark.parametrize("state", ["pending", "running"])
def test_state_change_to_running_is_no_news(state: str) -> None:
    assert read_instance_event(body(state_change(state))) is None


def test_health_scheduled_change_drains_against_the_window_start() -> None:
    event = read_instance_event(body(health()))
    assert event is not None
    assert event.kind == SCHEDULED_MAINTENANCE
    assert event.instance_ids == (IID, "i-0fedcba9876543210")
    assert event.deadline == datetime(2026, 12, 12, 15, 10, 9, tzinfo=UTC)
    assert event.not_after == datetime(2026, 12, 12, 17, 10, 9, tzinfo=UTC)
    assert event.action == "AWS_EC2_INSTANCE_RETIREMENT_SCHEDULED"


def test_health_names_instances_in_resources_only() -> None:
    event = read_instance_event(body(health(affectedEntities=[])))
    assert event is not None and event.instance_ids == (IID,)


@pytest.mark.parametrize(
    "over", [{"service": "RDS"}, {"eventTypeCategory": "issue"}, {"eventTypeCategory": "accountNotification"}]
)
def test_health_other_service_or_category_is_not_ours(over: dict[str, str]) -> None:
    assert read_instance_event(body(health(**over))) is None


def test_terminate_lifecycle_action_carries_the_token() -> None:
    event = read_instance_event(body(lifecycle("terminate")))
    assert event is not None
    assert (event.kind, event.instance_ids, event.asg, event.hook) == (
        ASG_TERMINATION,
        (IID,),
        "my-asg",
        "my-lifecycle-hook",
    )
    assert event.token == "87654321-4321-4321-4321-210987654321" and event.deadline is None


def test_launch_lifecycle_action() -> None:
    event = read_instance_event(body(lifecycle("launch")))
    assert event is not None and event.kind == ASG_LAUNCH and event.token


def test_lifecycle_hook_straight_to_the_queue() -> None:
    event = read_instance_event(body(hook_direct()))
    assert event is not None
    assert (event.kind, event.asg, event.account, event.at) == (ASG_TERMINATION, "my-asg", "123456789012", AT)


def test_sns_envelope_is_unwrapped() -> None:
    event = read_instance_event(sns(spot_itn()))
    assert event is not None and event.kind == SPOT_ITN


@pytest.mark.parametrize(
    "text",
    [
        body({"Event": "autoscaling:TEST_NOTIFICATION", "Service": "AWS Auto Scaling"}),
        body({**hook_direct(), "LifecycleTransition": "autoscaling:TEST_NOTIFICATION"}),
        body({"detail-type": "EC2 Instance Launch Successful", "source": "aws.autoscaling", "detail": {}}),
        body({"detail-type": "EC2 Spot Instance Interruption Warning", "source": "custom.forged", "detail": {}}),
        body({"detail-type": "Scheduled Event", "source": "aws.events", "detail": {}}),
        body({"hello": "world"}),
    ],
)
def test_other_messages_carry_no_instance_event(text: str) -> None:
    assert read_instance_event(text) is None


@pytest.mark.parametrize(
    "text, error",
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        (body(spot_itn(detail="x")), "detail is not a JSON object"),
        (body(spot_itn(detail={"instance-id": IID})), "no instance-action"),
        (body(spot_itn(detail={"instance-id": "node-1", "instance-action": "terminate"})), "not an instance id"),
        (body(spot_itn(time="yesterday")), "event time"),
        (body({k: v for k, v in spot_itn().items() if k != "time"}), "no time"),
        (body({**state_change("stopped"), "detail": {"instance-id": IID}}), "no state"),
        (body(health(startTime="soon")), "startTime"),
        (body(health(eventTypeCode="")), "eventTypeCode"),
        (body(health(affectedEntities=[{"entityValue": "arn:x"}]) | {"resources": []}), "names no instance"),
        (body(lifecycle(LifecycleActionToken="")), "LifecycleActionToken"),
        (body(lifecycle(EC2InstanceId=None)), "EC2InstanceId"),
        (body({**hook_direct(), "AutoScalingGroupName": 3}), "AutoScalingGroupName"),
        (body({"Type": "Notification", "Message": "{broken"}), "not JSON"),
    ],
)
def test_malformed_events_are_named(text: str, error: str) -> None:
    with pytest.raises(MalformedNotice, match=error):
        read_instance_event(text)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Sat, 05 Jun 2021 15:10:09 GMT", datetime(2021, 6, 5, 15, 10, 9, tzinfo=UTC)),
        ("2021-06-05T15:10:09Z", datetime(2021, 6, 5, 15, 10, 9, tzinfo=UTC)),
    ],
)
def test_health_times(text: str, expected: datetime) -> None:
    assert parse_health_time(text) == expected


@pytest.mark.parametrize("text", ["", "Sat, 05 Jun 2021", "tomorrow", None, 5])
def test_health_times_refused(text: Any) -> None:
    with pytest.raises(ValueError):
        parse_health_time(text)


def test_every_detail_type_the_shipped_rules_send_is_read() -> None:
    """deploy/eventbridge-rules.json sends nothing spotd would only count as ignored."""
    from pathlib import Path

    from spotd.capacity.signals import read_event

    samples: dict[tuple[str, str], dict[str, Any]] = {
        ("aws.ec2", "EC2 Spot Instance Interruption Warning"): spot_itn(),
        ("aws.ec2", "EC2 Instance Rebalance Recommendation"): rebalance(),
        ("aws.ec2", "EC2 Instance State-change Notification"): state_change("stopping"),
        ("aws.health", "AWS Health Event"): health(),
        ("aws.autoscaling", "EC2 Instance-terminate Lifecycle Action"): lifecycle("terminate"),
        ("aws.autoscaling", "EC2 Instance-launch Lifecycle Action"): lifecycle("launch"),
    }
    rules = json.loads((Path(__file__).parent.parent / "deploy" / "eventbridge-rules.json").read_text())["rules"]
    sent = [(src, dt) for r in rules for src in r["EventPattern"]["source"] for dt in r["EventPattern"]["detail-type"]]
    assert len(sent) == 8
    for source, detail_type in sent:
        if (source, detail_type) in samples:
            assert read_instance_event(body(samples[source, detail_type])) is not None, detail_type
        else:  # the capacity events (spotd.capacity.signals)
            launch = {"AutoScalingGroupName": "g", "StatusMessage": "x", "EndTime": T}
            event = {"source": source, "detail-type": detail_type, "time": T, "detail": launch}
            assert read_event(body(event)) is not None, detail_type
