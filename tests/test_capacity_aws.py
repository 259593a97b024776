"""The AWS readers against a moto server (SQS, Auto Scaling, EC2) through the standard boto3 chain, signed
as the controller's IAM user (deploy/iam-policy.json, enforced); set-up and checks go through `aws.client`.

moto answers DescribeScalingActivities with no activities, so the activity cursor is fed recorded
responses from tests/data/aws/ instead.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from spotd.capacity.signals import AsgInfo, CapacitySignal, Pool, SignalKind, parse_scaling_activity
from spotd.capacity.sources import aws as capacity_aws
from spotd.capacity.sources.asg import ActivityCursor, AsgSource
from spotd.capacity.sources.aws import AwsApi, InstanceLookup
from spotd.capacity.sources.sqs import SqsSource
from spotd.common.metrics import REGISTRY
from tests.moto_server import ACCOUNT, EVENTS_QUEUE, MotoAws, aws, moto_endpoint  # noqa: F401  (pytest fixtures)

DATA = Path(__file__).parent / "data" / "aws"
ZONES = ["us-east-1a", "us-east-1b"]


def sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def load(name: str) -> str:
    return (DATA / name).read_text()


# --- SQS --------------------------------------------------------------------------------------------


@pytest.fixture
def queue(aws: MotoAws) -> str:  # noqa: F811
    sqs = aws.client("sqs")
    return str(sqs.create_queue(QueueName=EVENTS_QUEUE, Attributes={"VisibilityTimeout": "1"})["QueueUrl"])


def queue_depth(aws: MotoAws, queue_url: str) -> int:  # noqa: F811
    attrs = aws.client("sqs").get_queue_attributes(
        QueueUrl=queue_url, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    )["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]) + int(attrs["ApproximateNumberOfMessagesNotVisible"])


def send(aws: MotoAws, queue_url: str, *bodies: str) -> None:  # noqa: F811
    sqs = aws.client("sqs")
    for body in bodies:
        sqs.send_message(QueueUrl=queue_url, MessageBody=body)


async def test_sqs_handled_then_deleted_malformed_and_unknown_deleted(aws: MotoAws, queue: str) -> None:  # noqa: F811
    send(
        aws,
        queue,
        load("event_launch_unsuccessful_ice.json"),
        "{not json",
        load("event_instance_terminate_successful.json"),
        load("event_launch_unsuccessful_not_capacity.json"),
    )
    before = {o: sample("spotd_sqs_messages_total", {"outcome": o}) for o in ("handled", "malformed", "ignored")}
    ice_before = sample("spotd_ice_signals_total", {"pool": "m5.large/us-east-1a", "source": "sqs"})
    received: list[CapacitySignal] = []
    source = SqsSource(queue, wait_seconds=1)
    assert not source.initial_read_done

    def on_signals(signals: list[CapacitySignal]) -> None:
        # handed over before the delete: the message is still in the queue now
        assert queue_depth(aws, queue) >= 1
        received.extend(signals)

    total = 0
    while (n := await source.poll_once(on_signals)) > 0:
        total += n
    assert total == 4
    assert source.initial_read_done
    assert [(s.pool, s.kind) for s in received] == [(Pool("m5.large", "us-east-1a"), SignalKind.ICE)]
    assert queue_depth(aws, queue) == 0
    after = {o: sample("spotd_sqs_messages_total", {"outcome": o}) for o in ("handled", "malformed", "ignored")}
    assert {o: after[o] - before[o] for o in after} == {"handled": 2, "malformed": 1, "ignored": 1}
    assert sample("spotd_ice_signals_total", {"pool": "m5.large/us-east-1a", "source": "sqs"}) == ice_before + 1
    assert sample("spotd_aws_requests_total", {"service": "sqs", "operation": "ReceiveMessage", "outcome": "ok"}) >= 2


async def test_sqs_message_whose_handling_raised_is_not_deleted(aws: MotoAws, queue: str) -> None:  # noqa: F811
    send(aws, queue, load("event_launch_unsuccessful_ice.json"))
    source = SqsSource(queue, wait_seconds=1)
    failed_before = sample("spotd_sqs_messages_total", {"outcome": "failed"})

    def broken(signals: list[CapacitySignal]) -> None:
        raise RuntimeError("store unavailable")

    assert await source.poll_once(broken) == 1
    assert sample("spotd_sqs_messages_total", {"outcome": "failed"}) == failed_before + 1
    assert queue_depth(aws, queue) == 1  # back after the visibility timeout

    got: list[CapacitySignal] = []

    async def works(signals: list[CapacitySignal]) -> None:
        got.extend(signals)

    for _ in range(10):
        if await source.poll_once(works) and got:
            break
    assert len(got) == 1
    assert queue_depth(aws, queue) == 0


async def test_sqs_backlog_is_read_only_to_empty_and_again_after_reset(aws: MotoAws, queue: str) -> None:  # noqa: F811
    """A batch of messages sent after the start does not prove the older ones were read (SQS returns a
    sample): only an empty receive ends the backlog; reset() (a new leadership term) starts over."""
    send(aws, queue, load("event_instance_terminate_successful.json"))  # the backlog: sent before the start
    await asyncio.sleep(0.05)
    source = SqsSource(queue, wait_seconds=1)
    await asyncio.sleep(0.05)
    assert await source.poll_once(lambda signals: None) == 1
    assert not source.initial_read_done
    send(aws, queue, load("event_instance_terminate_successful.json"))  # sent after the start: still not done
    assert await source.poll_once(lambda signals: None) == 1
    assert not source.initial_read_done
    assert await source.poll_once(lambda signals: None) == 0
    assert source.initial_read_done and source.healthy and source.last_success > 0
    source.reset()
    assert not source.initial_read_done
    assert await source.poll_once(lambda signals: None) == 0
    assert source.initial_read_done


async def test_sqs_run_hands_signals_over_until_cancelled(aws: MotoAws, queue: str) -> None:  # noqa: F811
    send(aws, queue, load("event_launch_unsuccessful_spot_mixed.json"))
    got: asyncio.Queue[CapacitySignal] = asyncio.Queue()

    def on_signals(signals: list[CapacitySignal]) -> None:
        for s in signals:
            got.put_nowait(s)

    task = asyncio.create_task(SqsSource(queue, wait_seconds=1).run(on_signals))
    signal = await asyncio.wait_for(got.get(), timeout=10)
    assert (signal.pool, signal.reason) == (Pool("*", "us-east-1b"), "InsufficientInstanceCapacity")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_sqs_uses_the_asg_view_and_the_instance_lookup(aws: MotoAws, queue: str) -> None:  # noqa: F811
    ec2 = aws.client("ec2")
    image = ec2.describe_images()["Images"][0]["ImageId"]
    inst = ec2.run_instances(
        ImageId=image,
        MinCount=1,
        MaxCount=1,
        InstanceType="c5.xlarge",
        Placement={"AvailabilityZone": "us-east-1b"},
        InstanceMarketOptions={"MarketType": "spot"},
    )["Instances"][0]
    body = json.loads(load("event_launch_successful.json"))
    body["detail"].update(AutoScalingGroupName="eks-spot-mixed", EC2InstanceId=inst["InstanceId"])
    body["detail"]["Details"]["Availability Zone"] = "us-east-1b"
    send(aws, queue, json.dumps(body))
    asgs = {"eks-spot-mixed": AsgInfo("eks-spot-mixed", ("c5.xlarge", "m5.xlarge"), tuple(ZONES), spot=True)}
    got: list[CapacitySignal] = []
    source = SqsSource(queue, wait_seconds=1, lookup=InstanceLookup())
    await source.poll_once(got.extend, lambda: asgs)
    [signal] = got
    assert (signal.kind, signal.pool, signal.capacity_type) == (
        SignalKind.LAUNCHED,
        Pool("c5.xlarge", "us-east-1b"),
        "spot",
    )


# --- Auto Scaling -----------------------------------------------------------------------------------


def make_asgs(aws: MotoAws) -> dict[str, str]:  # noqa: F811
    """A mixed-instances Spot ASG, a plain-template Spot ASG, an on-demand ASG, and an untagged one."""
    ec2 = aws.client("ec2")
    image = ec2.describe_images()["Images"][0]["ImageId"]
    lt_spot = ec2.create_launch_template(
        LaunchTemplateName="spot-lt",
        LaunchTemplateData={
            "ImageId": image,
            "InstanceType": "m5.large",
            "InstanceMarketOptions": {"MarketType": "spot"},
        },
    )["LaunchTemplate"]["LaunchTemplateId"]
    lt_plain = ec2.create_launch_template(
        LaunchTemplateName="plain-lt", LaunchTemplateData={"ImageId": image, "InstanceType": "m5.large"}
    )["LaunchTemplate"]["LaunchTemplateId"]
    autoscaling = aws.client("autoscaling")
    tags: list[Any] = [
        {"Key": "k8s.io/cluster-autoscaler/enabled", "Value": "true", "PropagateAtLaunch": False},
        {"Key": "k8s.io/cluster-autoscaler/prod", "Value": "owned", "PropagateAtLaunch": False},
    ]
    autoscaling.create_auto_scaling_group(
        AutoScalingGroupName="spot-mixed",
        MinSize=0,
        MaxSize=10,
        DesiredCapacity=2,
        AvailabilityZones=ZONES,
        MixedInstancesPolicy={
            "LaunchTemplate": {
                "LaunchTemplateSpecification": {"LaunchTemplateId": lt_plain, "Version": "$Latest"},
                "Overrides": [{"InstanceType": "m5.large"}, {"InstanceType": "m5a.large"}],
            },
            "InstancesDistribution": {
                "OnDemandBaseCapacity": 0,
                "OnDemandPercentageAboveBaseCapacity": 0,
                "SpotAllocationStrategy": "price-capacity-optimized",
            },
        },
        Tags=tags,
    )
    autoscaling.create_auto_scaling_group(
        AutoScalingGroupName="spot-template",
        MinSize=0,
        MaxSize=10,
        DesiredCapacity=1,
        AvailabilityZones=ZONES[:1],
        LaunchTemplate={"LaunchTemplateId": lt_spot, "Version": "$Default"},
        Tags=tags,
    )
    autoscaling.create_auto_scaling_group(
        AutoScalingGroupName="on-demand",
        MinSize=0,
        MaxSize=10,
        DesiredCapacity=1,
        AvailabilityZones=ZONES,
        LaunchTemplate={"LaunchTemplateName": "plain-lt"},
        Tags=tags,
    )
    autoscaling.create_auto_scaling_group(
        AutoScalingGroupName="untagged",
        MinSize=0,
        MaxSize=10,
        DesiredCapacity=0,
        AvailabilityZones=ZONES,
        LaunchTemplate={"LaunchTemplateId": lt_spot},
    )
    return {"spot": lt_spot, "plain": lt_plain}


async def test_discover_by_tag(aws: MotoAws) -> None:  # noqa: F811
    make_asgs(aws)
    source = AsgSource()
    found = await source.discover()
    assert sorted(found) == ["on-demand", "spot-mixed", "spot-template"]
    assert found["spot-mixed"] == AsgInfo(
        "spot-mixed", ("m5.large", "m5a.large"), tuple(ZONES), spot=True, on_demand=False
    )
    assert found["spot-template"] == AsgInfo(
        "spot-template", ("m5.large",), ("us-east-1a",), spot=True, on_demand=False
    )
    assert found["on-demand"] == AsgInfo("on-demand", ("m5.large",), tuple(ZONES), spot=False, on_demand=True)
    assert source.asgs == found
    # a tag given without a value matches any value
    by_key = await AsgSource(tag_filters=[("k8s.io/cluster-autoscaler/prod", None)]).discover()
    assert sorted(by_key) == ["on-demand", "spot-mixed", "spot-template"]
    assert await AsgSource(tag_filters=[("k8s.io/cluster-autoscaler/prod", "shared")]).discover() == {}


async def test_fallback_asg_tag_lists_the_instances_of_the_tagged_groups(aws: MotoAws) -> None:  # noqa: F811
    make_asgs(aws)
    autoscaling = aws.client("autoscaling")
    autoscaling.create_or_update_tags(
        Tags=[{"ResourceId": "on-demand", "ResourceType": "auto-scaling-group", "Key": "spotd.io/fallback",
               "Value": "true", "PropagateAtLaunch": False}]
    )  # fmt: skip
    group = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=["on-demand"])["AutoScalingGroups"][0]
    wanted = {i["InstanceId"] for i in group["Instances"]}
    assert wanted
    source = AsgSource(fallback_tag=("spotd.io/fallback", "true"))
    await source.poll_once()
    assert source.fallback_instances == wanted
    assert source.initial_read_done and source.healthy and source.last_success > 0
    assert await AsgSource(fallback_tag=("spotd.io/fallback", "false")).discover_fallback() == frozenset()
    assert await AsgSource().discover_fallback() == frozenset()  # no flag: nothing in scope by ASG


async def test_startup_check_names_the_problem(aws: MotoAws, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    from spotd.capacity.sources.aws import AwsStartupError, check_aws_access

    assert check_aws_access("", [])  # moto's caller ARN
    # the queue the policy grants, not created: the one line names it and what AWS said (moto cannot match a
    # missing queue's ARN, so it refuses where AWS would answer NonExistentQueue)
    with (
        aws.expect_denied("sqs:GetQueueAttributes"),
        pytest.raises(AwsStartupError, match=rf"SQS queue .*{EVENTS_QUEUE}"),
    ):
        check_aws_access(f"{aws.url}/{ACCOUNT}/{EVENTS_QUEUE}", [])
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.delenv("AWS_REGION")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    with pytest.raises(AwsStartupError, match="no AWS region"):
        check_aws_access("", [])


async def test_discover_launch_configuration_spot_price(aws: MotoAws) -> None:  # noqa: F811
    image = aws.client("ec2").describe_images()["Images"][0]["ImageId"]
    autoscaling = aws.client("autoscaling")
    autoscaling.create_launch_configuration(
        LaunchConfigurationName="lc-spot", ImageId=image, InstanceType="c5.large", SpotPrice="0.05"
    )
    autoscaling.create_auto_scaling_group(
        AutoScalingGroupName="legacy-spot",
        MinSize=0,
        MaxSize=3,
        DesiredCapacity=0,
        AvailabilityZones=ZONES,
        LaunchConfigurationName="lc-spot",
        Tags=[{"Key": "k8s.io/cluster-autoscaler/enabled", "Value": "true", "PropagateAtLaunch": False}],
    )
    found = await AsgSource().discover()
    assert found == {"legacy-spot": AsgInfo("legacy-spot", ("c5.large",), tuple(ZONES), spot=True, on_demand=False)}


async def test_read_activities_against_moto_and_initial_read(aws: MotoAws) -> None:  # noqa: F811
    make_asgs(aws)
    source = AsgSource()
    assert not source.initial_read_done
    assert await source.poll_once() == []  # moto records no launch activities
    assert source.initial_read_done
    ok = {"service": "autoscaling", "operation": "DescribeScalingActivities", "outcome": "ok"}
    before = sample("spotd_aws_requests_total", ok)
    await source.read_activities()
    assert sample("spotd_aws_requests_total", ok) == before + 2  # the two Spot ASGs, not the on-demand one


async def test_terminate_with_decrement(aws: MotoAws) -> None:  # noqa: F811
    make_asgs(aws)
    autoscaling = aws.client("autoscaling")
    group = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=["spot-mixed"])["AutoScalingGroups"][0]
    victim = group["Instances"][0]["InstanceId"]
    await AsgSource().terminate_instance(victim, decrement_desired=True)
    group = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=["spot-mixed"])["AutoScalingGroups"][0]
    assert group["DesiredCapacity"] == 1
    assert victim not in [i["InstanceId"] for i in group["Instances"]]


async def test_client_errors_are_counted_not_retried(aws: MotoAws) -> None:  # noqa: F811
    """A queue the policy does not grant: AccessDenied, a client error, counted once and not retried."""
    labels = {"service": "sqs", "operation": "ReceiveMessage", "outcome": "client_error"}
    other = aws.client("sqs").create_queue(QueueName="someone-elses-queue")["QueueUrl"]
    before = sample("spotd_aws_requests_total", labels)
    with aws.expect_denied("sqs:ReceiveMessage"), pytest.raises(ClientError, match="AccessDenied"):
        await SqsSource(other, wait_seconds=0).receive()
    assert sample("spotd_aws_requests_total", labels) == before + 1


async def test_throttling_is_retried(aws: MotoAws, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.setattr(capacity_aws, "RETRY_WAIT_MAX", 0.01)
    client = capacity_aws.make_client("sqs")
    calls = {"n": 0}

    def flaky(**kwargs: Any) -> dict[str, Any]:
        calls["n"] += 1
        if calls["n"] < 3:
            error: Any = {
                "Error": {"Code": "ThrottlingException", "Message": "Rate exceeded"},
                "ResponseMetadata": {"HTTPStatusCode": 400},
            }
            raise ClientError(error, "ListQueues")
        return {"QueueUrls": []}

    # A botocore stand-in for the one call: the retry and counting are ours, under test.
    monkeypatch.setattr(client, "list_queues", flaky)
    throttled = {"service": "sqs", "operation": "ListQueues", "outcome": "throttled"}
    before = sample("spotd_aws_requests_total", throttled)
    assert await AwsApi("sqs", client).call("list_queues") == {"QueueUrls": []}
    assert calls["n"] == 3
    assert sample("spotd_aws_requests_total", throttled) == before + 2


# --- the activity cursor, fed recorded responses ----------------------------------------------------

NOW = datetime(2024, 3, 5, 14, 0, tzinfo=UTC)
ASGS = {"eks-spot-m5-large": AsgInfo("eks-spot-m5-large", ("m5.large",), ("us-east-1a",), spot=True, on_demand=False)}


def recorded(name: str) -> list[dict[str, Any]]:
    return list(json.loads(load(name))["Activities"])


def test_cursor_first_read_returns_history_then_only_new() -> None:
    page = recorded("describe_scaling_activities_spot_m5.json")
    cursor = ActivityCursor(timedelta(hours=6))
    new, more = cursor.take(page, NOW)
    assert more  # nothing older than the window yet: the next page may hold more
    cursor.commit(NOW)
    signals = [s for s in (parse_scaling_activity(a, ASGS) for a in new) if s]
    assert [(s.kind, s.at) for s in signals] == [
        (SignalKind.LAUNCHED, datetime(2024, 3, 5, 13, 20, 31, tzinfo=UTC)),
        (SignalKind.ICE, datetime(2024, 3, 5, 10, 12, 43, tzinfo=UTC)),
    ]
    assert all(a["StatusCode"] != "PreInService" for a in new)
    # the same page again: nothing new; the in-progress launch finishing shows up once
    assert cursor.take(page, NOW + timedelta(minutes=1))[0] == []
    finished = dict(page[0], StatusCode="Successful", EndTime="2024-03-05T13:41:10Z")
    new, more = cursor.take([finished, *page[1:]], NOW + timedelta(minutes=2))
    assert [a["ActivityId"] for a in new] == [finished["ActivityId"]]
    assert not more  # reached activities an hour older than the newest taken
    cursor.commit(NOW + timedelta(minutes=2))
    assert cursor.take([finished], NOW + timedelta(minutes=3))[0] == []


def test_cursor_rollback_takes_again() -> None:
    page = recorded("describe_scaling_activities_spot_m5.json")
    cursor = ActivityCursor(timedelta(hours=6))
    first, _ = cursor.take(page, NOW)
    cursor.rollback()  # the read failed on a later page
    again, _ = cursor.take(page, NOW)
    assert [a["ActivityId"] for a in again] == [a["ActivityId"] for a in first]


def test_cursor_window_limits_the_first_read() -> None:
    page = recorded("describe_scaling_activities_spot_m5.json")
    new, more = ActivityCursor(timedelta(hours=1)).take(page, NOW)
    assert [a["ActivityId"] for a in new] == ["b3c4d5e6-f7a8-4b9c-8d0e-1f2a3b4c5d6e"]
    assert not more


async def test_instance_lifecycle_lookup_and_cache(aws: MotoAws) -> None:  # noqa: F811
    ec2 = aws.client("ec2")
    image = ec2.describe_images()["Images"][0]["ImageId"]
    spot = ec2.run_instances(
        ImageId=image, MinCount=1, MaxCount=1, InstanceType="m5.large", InstanceMarketOptions={"MarketType": "spot"}
    )["Instances"][0]["InstanceId"]
    on_demand = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, InstanceType="m5.large")["Instances"][0][
        "InstanceId"
    ]
    lookup = InstanceLookup()
    hits_before = sample("spotd_instance_lookups_total", {"outcome": "hit"})
    calls = {"service": "ec2", "operation": "DescribeInstances", "outcome": "ok"}
    calls_before = sample("spotd_aws_requests_total", calls)
    missing = "i-0123456789abcdef0"
    assert await lookup.lifecycle([spot, on_demand, missing]) == {spot: "spot", on_demand: "on-demand"}
    assert sample("spotd_aws_requests_total", calls) == calls_before + 1
    assert await lookup.lifecycle([spot, on_demand]) == {spot: "spot", on_demand: "on-demand"}
    assert sample("spotd_aws_requests_total", calls) == calls_before + 1  # served from the cache
    assert sample("spotd_instance_lookups_total", {"outcome": "hit"}) == hits_before + 2
    facts = (await lookup.describe([spot]))[spot]
    assert (facts.instance_type, facts.zone[:-1]) == ("m5.large", "us-east-1")


async def test_a_receive_cancelled_in_flight_gives_its_messages_back(aws: MotoAws) -> None:  # noqa: F811
    """Leadership lost during a long poll: the receive completes in its thread; what it got is made visible
    again at once (not after the visibility timeout, 30 s here), so the next leader reads it."""
    queue = str(aws.client("sqs").create_queue(QueueName=EVENTS_QUEUE)["QueueUrl"])  # visibility 30 s
    source = SqsSource(queue, wait_seconds=3)
    polling = asyncio.create_task(source.poll_once(lambda signals: None))
    await asyncio.sleep(0.5)  # the long poll is in flight
    polling.cancel()
    with pytest.raises(asyncio.CancelledError):
        await polling
    send(aws, queue, load("event_launch_unsuccessful_spot_mixed.json"))  # arrives during the orphaned long poll
    await asyncio.sleep(3.5)  # the orphaned receive returns it (its long poll is 3 s), and gives it back:
    # the next leader reads it well before the visibility timeout (30 s) would (the give-back may still trail)
    got: list[CapacitySignal] = []
    nxt = SqsSource(queue, wait_seconds=1)
    received = 0
    for _ in range(10):
        received = await nxt.poll_once(got.extend)
        if received:
            break
    assert received == 1
    assert [s.reason for s in got] == ["InsufficientInstanceCapacity"]
