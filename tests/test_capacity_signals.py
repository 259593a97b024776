"""Capacity signal parsing: AWS status messages, EventBridge events, scaling activities (recorded shapes)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from spotd.capacity.signals import (
    AsgInfo,
    CapacitySignal,
    CapacityType,
    MalformedEvent,
    Pool,
    SignalKind,
    classify_status_message,
    instance_type_in_message,
    parse_eventbridge_message,
    parse_scaling_activity,
    resolve_pool,
    with_instance_facts,
    zone_in_message,
)
from spotd.common.parsing import instance_id_from_provider_id

DATA = Path(__file__).parent / "data" / "aws"
ASGS = {
    "eks-spot-m5-large": AsgInfo(
        "eks-spot-m5-large", ("m5.large",), ("us-east-1a", "us-east-1b"), spot=True, on_demand=False
    ),
    "eks-spot-mixed": AsgInfo(
        "eks-spot-mixed",
        ("m5.large", "m5a.large", "m6i.large"),
        ("us-east-1b", "us-east-1c"),
        spot=True,
        on_demand=True,
    ),
}


def load(name: str) -> str:
    return (DATA / name).read_text()


def event(name: str, **detail: Any) -> str:
    data = json.loads(load(name))
    data["detail"].update(detail)
    return json.dumps(data)


# --- classify_status_message --------------------------------------------------------------------

ICE_MESSAGES = [
    (
        "We currently do not have sufficient m5.large capacity in the Availability Zone you requested "
        "(us-east-1a). Our system will be working on provisioning additional capacity. You can currently get "
        "m5.large capacity by not specifying an Availability Zone in your request or choosing us-east-1b, "
        "us-east-1c. Launching EC2 instance failed.",
        "InsufficientInstanceCapacity",
    ),
    (
        "Could not launch Spot Instances. InsufficientInstanceCapacity - There is no Spot capacity available "
        "that matches your request. Launching EC2 instance failed.",
        "InsufficientInstanceCapacity",
    ),
    ("There is no Spot capacity available that matches your request.", "SpotCapacityNotAvailable"),
    (
        "Could not launch Spot Instances. MaxSpotInstanceCountExceeded - Max spot instance count exceeded. "
        "Launching EC2 instance failed.",
        "MaxSpotInstanceCountExceeded",
    ),
    ("Max spot instance count exceeded", "MaxSpotInstanceCountExceeded"),
    (
        "Could not launch Spot Instances. UnfulfillableCapacity - Unable to fulfill capacity due to your request "
        "configuration. Please adjust your request and try again. Launching EC2 instance failed.",
        "UnfulfillableCapacity",
    ),
    ("Unable to fulfill capacity due to your request configuration.", "UnfulfillableCapacity"),
    (
        "Could not launch On-Demand Instances. InsufficientInstanceCapacity - We currently do not have "
        "sufficient c5.4xlarge capacity in the Availability Zone you requested (eu-west-1b).",
        "InsufficientInstanceCapacity",
    ),
    (
        "Could not launch Spot Instances. SpotMaxPriceTooLow - Your Spot request price of 0.01 is lower than the "
        "minimum required Spot request fulfillment price of 0.0342. Launching EC2 instance failed.",
        "SpotMaxPriceTooLow",
    ),
    ("InsufficientHostCapacity: There is insufficient capacity on the host.", "InsufficientHostCapacity"),
    ("capacity-not-available", "capacity-not-available"),
    (
        "We currently do not have sufficient trn1.32xlarge capacity in zones with support for 'gp3' volumes.",
        "InsufficientInstanceCapacity",
    ),
]

NOT_CAPACITY = [
    "Your requested instance type (m5.large) is not supported in your requested Availability Zone (us-east-1e). "
    "Please retry your request by not specifying an Availability Zone or choosing us-east-1a, us-east-1b. "
    "Launching EC2 instance failed.",
    "Invalid IAM Instance Profile name. Launching EC2 instance failed.",
    "The requested configuration is currently not supported. Please check the documentation for supported "
    "configurations. Launching EC2 instance failed.",
    "You have requested more vCPU capacity than your current vCPU limit of 32 allows for the instance bucket "
    "that the specified instance type belongs to. Please visit http://aws.amazon.com/contact-us/ec2-request to "
    "request an adjustment to this limit. Launching EC2 instance failed.",
    "There are not enough free addresses in subnet 'subnet-0a1b2c3d' to satisfy the requested number of "
    "instances. Launching EC2 instance failed.",
    "The image id '[ami-0123456789abcdef0]' does not exist. Launching EC2 instance failed.",
    "Instance became unhealthy while waiting for instance to be in InService state. Termination Reason: "
    "Client.InternalError: Client error on launch",
    "",
    "Launching EC2 instance failed.",
]


@pytest.mark.parametrize(("message", "code"), ICE_MESSAGES)
def test_classify_capacity_shortage(message: str, code: str) -> None:
    assert classify_status_message(message) == code


@pytest.mark.parametrize("message", NOT_CAPACITY)
def test_classify_other_failures_is_none(message: str) -> None:
    assert classify_status_message(message) is None


@pytest.mark.parametrize(
    ("message", "instance_type", "zone"),
    [
        (ICE_MESSAGES[0][0], "m5.large", "us-east-1a"),
        (
            "Launching a new EC2 instance. Status Reason: We currently do not have sufficient m5.large capacity in the "
            "Availability Zone you requested (us-east-1a).",
            "m5.large",
            "us-east-1a",
        ),
        (
            "no sufficient capacity in the Availability Zone (ap-northeast-1d) for the c6gn.16xlarge instance type",
            "c6gn.16xlarge",
            "ap-northeast-1d",
        ),
        ("sufficient u-6tb1.metal capacity (us-west-2-lax-1a)", "u-6tb1.metal", "us-west-2-lax-1a"),
        ("sufficient m7i-flex.large capacity in us-gov-west-1b", "m7i-flex.large", "us-gov-west-1b"),
        ("There is no Spot capacity available that matches your request.", None, None),
    ],
)
def test_type_and_zone_in_message(message: str, instance_type: str | None, zone: str | None) -> None:
    assert instance_type_in_message(message) == instance_type
    assert zone_in_message(message) == zone


def test_resolve_pool_rule() -> None:
    single = ASGS["eks-spot-m5-large"]
    mixed = ASGS["eks-spot-mixed"]
    one_zone = AsgInfo("z", ("c5.xlarge", "c5a.xlarge"), ("eu-west-1a",), spot=True)
    # the message first, then the ASG's only type or zone, else "*"
    assert resolve_pool("sufficient c5.xlarge capacity (us-east-1f)", None, single) == Pool("c5.xlarge", "us-east-1f")
    assert resolve_pool("no Spot capacity", "us-east-1b", single) == Pool("m5.large", "us-east-1b")
    assert resolve_pool("no Spot capacity", "us-east-1b", mixed) == Pool("*", "us-east-1b")
    assert resolve_pool("no Spot capacity", None, one_zone) == Pool("*", "eu-west-1a")
    assert resolve_pool("no Spot capacity", None, None) == Pool("*", "*")


@pytest.mark.parametrize(
    ("provider_id", "expected"),
    [
        ("aws:///us-east-1a/i-0abc1234def567890", "i-0abc1234def567890"),
        ("aws:///us-east-1a/i-0abc1234", "i-0abc1234"),
        ("aws://us-east-1a/i-0abc1234def567890/", "i-0abc1234def567890"),
        ("gce://project/zone/instance", None),
        ("aws:///us-east-1a/not-an-instance", None),
        ("", None),
    ],
)
def test_instance_id_from_provider_id(provider_id: str, expected: str | None) -> None:
    assert instance_id_from_provider_id(provider_id) == expected


def test_pool_text_round_trip() -> None:
    pool = Pool("m5.large", "us-east-1a")
    assert str(pool) == "m5.large/us-east-1a"
    assert Pool.parse("m5.large/us-east-1a") == pool
    assert Pool("*", "us-east-1a").contains(pool)
    assert not pool.contains(Pool("*", "us-east-1a"))
    for bad in ("m5.large", "/us-east-1a", "m5.large/", "a/b/c"):
        with pytest.raises(ValueError):
            Pool.parse(bad)


# --- EventBridge events ---------------------------------------------------------------------------


def test_launch_unsuccessful_ice_names_type_and_zone() -> None:
    [signal] = parse_eventbridge_message(load("event_launch_unsuccessful_ice.json"))
    assert signal == CapacitySignal(
        Pool("m5.large", "us-east-1a"),
        SignalKind.ICE,
        "sqs",
        datetime(2024, 3, 5, 10, 12, 43, 115000, UTC),
        reason="InsufficientInstanceCapacity",
        asg="eks-spot-m5-large",
        capacity_type=CapacityType.UNKNOWN,
        key="6b05b4b1-6f0d-4c4f-a9e3-1d2a4b8f5f10",
    )


def test_launch_unsuccessful_capacity_type_from_asg() -> None:
    [signal] = parse_eventbridge_message(load("event_launch_unsuccessful_ice.json"), ASGS)
    assert signal.capacity_type == CapacityType.SPOT


def test_launch_unsuccessful_mixed_asg_has_wildcard_type() -> None:
    [signal] = parse_eventbridge_message(load("event_launch_unsuccessful_spot_mixed.json"), ASGS)
    assert signal.pool == Pool("*", "us-east-1b")
    assert signal.kind == SignalKind.ICE
    assert signal.reason == "InsufficientInstanceCapacity"
    assert signal.capacity_type == CapacityType.SPOT  # the message says "Could not launch Spot Instances"


def test_launch_unsuccessful_single_type_asg_fills_type() -> None:
    body = event("event_launch_unsuccessful_spot_mixed.json", AutoScalingGroupName="eks-spot-m5-large")
    [signal] = parse_eventbridge_message(body, ASGS)
    assert signal.pool == Pool("m5.large", "us-east-1b")


def test_launch_unsuccessful_not_capacity_is_no_signal() -> None:
    assert parse_eventbridge_message(load("event_launch_unsuccessful_not_capacity.json"), ASGS) == []


def test_launch_successful_is_launched() -> None:
    [signal] = parse_eventbridge_message(load("event_launch_successful.json"), ASGS)
    assert signal.kind == SignalKind.LAUNCHED
    assert signal.pool == Pool("m5.large", "us-east-1a")
    assert signal.capacity_type == CapacityType.SPOT
    assert signal.instance_id == "i-0b22a22eec53b9321"
    assert signal.at == datetime(2024, 3, 5, 13, 20, 31, 642000, UTC)


def test_launch_successful_unknown_asg_has_unknown_capacity_type() -> None:
    [signal] = parse_eventbridge_message(load("event_launch_successful.json"))
    assert signal.pool == Pool("*", "us-east-1a")
    assert signal.capacity_type == CapacityType.UNKNOWN
    filled = with_instance_facts(signal, "m5.large", "us-east-1a", "spot")
    assert (filled.pool, filled.capacity_type) == (Pool("m5.large", "us-east-1a"), "spot")


def test_unknown_detail_type_and_source_are_ignored() -> None:
    assert parse_eventbridge_message(load("event_instance_terminate_successful.json")) == []
    other = json.loads(load("event_launch_unsuccessful_ice.json"))
    other["source"] = "aws.ec2"
    assert parse_eventbridge_message(json.dumps(other)) == []
    assert (
        parse_eventbridge_message(
            json.dumps({"detail-type": "EC2 Spot Instance Interruption Warning", "source": "aws.ec2", "detail": {}})
        )
        == []
    )


def test_sns_wrapped_event_and_asg_notification() -> None:
    wrapped = json.dumps(
        {"Type": "Notification", "MessageId": "x", "Message": load("event_launch_unsuccessful_ice.json")}
    )
    [signal] = parse_eventbridge_message(wrapped)
    assert signal.pool == Pool("m5.large", "us-east-1a")
    [note] = parse_eventbridge_message(load("asg_notification_launch_error.json"), ASGS)
    assert (note.pool, note.reason, note.capacity_type) == (
        Pool("*", "us-east-1c"),
        "MaxSpotInstanceCountExceeded",
        CapacityType.SPOT,
    )
    assert parse_eventbridge_message(json.dumps({"Event": "autoscaling:TEST_NOTIFICATION"})) == []


@pytest.mark.parametrize(
    "body",
    [
        "not json",
        "",
        "[1, 2]",
        "null",
        json.dumps({"hello": "world"}),
        event("event_launch_unsuccessful_ice.json", AutoScalingGroupName=None),
        event("event_launch_unsuccessful_ice.json", StatusMessage=None),
        event("event_launch_unsuccessful_ice.json", StatusMessage=42),
        event("event_launch_unsuccessful_ice.json", EndTime="yesterday"),
        json.dumps({"detail-type": "EC2 Instance Launch Unsuccessful", "source": "aws.autoscaling", "detail": "x"}),
        json.dumps({"detail-type": "EC2 Instance Launch Successful", "source": "aws.autoscaling"}),
    ],
)
def test_malformed_messages(body: str) -> None:
    with pytest.raises(MalformedEvent):
        parse_eventbridge_message(body)


def test_missing_zone_falls_back_to_message_then_star() -> None:
    body = event("event_launch_unsuccessful_ice.json", Details={})
    [signal] = parse_eventbridge_message(body)
    assert signal.pool == Pool("m5.large", "us-east-1a")
    body = event("event_launch_unsuccessful_spot_mixed.json", Details={})
    [signal] = parse_eventbridge_message(body)
    assert signal.pool == Pool("*", "*")


def test_missing_end_time_uses_event_time() -> None:
    body = event("event_launch_unsuccessful_ice.json", EndTime=None)
    [signal] = parse_eventbridge_message(body)
    assert signal.at == datetime(2024, 3, 5, 10, 12, 43, tzinfo=UTC)


# --- scaling activities ---------------------------------------------------------------------------


def activities(name: str) -> list[dict[str, Any]]:
    return list(json.loads(load(name))["Activities"])


def test_scaling_activities_single_type_asg() -> None:
    signals = [parse_scaling_activity(a, ASGS) for a in activities("describe_scaling_activities_spot_m5.json")]
    in_progress, launched, not_capacity, terminate, ice = signals
    assert in_progress is None and not_capacity is None and terminate is None
    assert launched is not None and ice is not None
    assert (launched.kind, launched.pool, launched.source, launched.instance_id, launched.capacity_type) == (
        SignalKind.LAUNCHED,
        Pool("m5.large", "us-east-1a"),
        "activities",
        "i-0b22a22eec53b9321",
        "spot",
    )
    assert launched.at == datetime(2024, 3, 5, 13, 20, 31, tzinfo=UTC)
    assert (ice.kind, ice.pool, ice.reason, ice.key) == (
        SignalKind.ICE,
        Pool("m5.large", "us-east-1a"),
        "InsufficientInstanceCapacity",
        "6b05b4b1-6f0d-4c4f-a9e3-1d2a4b8f5f10",
    )


def test_scaling_activities_mixed_asg() -> None:
    signals = [parse_scaling_activity(a, ASGS) for a in activities("describe_scaling_activities_spot_mixed.json")]
    ice, unfulfillable, iam = signals
    assert ice is not None and unfulfillable is not None and iam is None
    assert (ice.pool, ice.reason) == (Pool("*", "us-east-1b"), "InsufficientInstanceCapacity")
    assert (unfulfillable.pool, unfulfillable.reason) == (Pool("*", "us-east-1c"), "UnfulfillableCapacity")


def test_scaling_activity_reason_from_description_when_no_status_message() -> None:
    [*_, ice] = activities("describe_scaling_activities_spot_m5.json")
    ice = {k: v for k, v in ice.items() if k not in ("StatusMessage", "Details")}
    signal = parse_scaling_activity(ice)
    assert signal is not None
    assert (signal.pool, signal.reason, signal.capacity_type) == (
        Pool("m5.large", "us-east-1a"),
        "InsufficientInstanceCapacity",
        CapacityType.UNKNOWN,
    )


def test_scaling_activity_boto3_datetimes() -> None:
    [_, launched, *_] = activities("describe_scaling_activities_spot_m5.json")
    launched = dict(
        launched,
        StartTime=datetime(2024, 3, 5, 13, 19, 59, tzinfo=UTC),
        EndTime=datetime(2024, 3, 5, 13, 20, 31, tzinfo=UTC),
    )
    signal = parse_scaling_activity(launched, ASGS)
    assert signal is not None and signal.at == datetime(2024, 3, 5, 13, 20, 31, tzinfo=UTC)


@pytest.mark.parametrize(
    "activity",
    [
        {},
        {"StatusCode": "Failed"},
        {"StatusCode": "Failed", "Description": "Launching a new EC2 instance."},
        {
            "StatusCode": "Failed",
            "Description": "Launching a new EC2 instance.",
            "AutoScalingGroupName": "a",
            "StatusMessage": "We currently do not have sufficient m5.large capacity",
            "EndTime": "garbage",
        },
    ],
)
def test_scaling_activity_incomplete_is_none(activity: dict[str, Any]) -> None:
    assert parse_scaling_activity(activity) is None
