# ruff: noqa: F811
"""Issue 19: the controller reads no pool as Spot available without a capacity source, and an ASG discovery
it may not make is a start-up error.

Without a queue and without a Spot ASG matching --asg-tag, nothing could tell an ICE: "no ICE seen" is then
no news. The controller says so (log, metric, /status, an Event on its pod) and drains nothing until a
source is ready. The ASG discovery's reads (DescribeAutoScalingGroups, and the launch template or launch
configuration that says whether a group is Spot) refused with AccessDenied stop the controller at start
with one line: a Spot group read as on-demand would have its ICE never read.

`spotd controller` processes against the fake API server (deploy/'s RBAC) and moto (IAM enforced).
"""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from spotd.sim.kubeapi.server import FakeApiServer
from tests import aws_actions
from tests.agent_harness import eventually
from tests.moto_server import MotoAws, aws, moto_endpoint, moto_policy  # noqa: F401  (pytest fixtures)
from tests.test_controller import (
    OLD,
    ControllerProcess,
    add_node,
    add_pods,
    api,  # noqa: F401  (pytest fixture)
    pods_on,
    procs,  # noqa: F401  (pytest fixture)
    start,
)

ZONE = "us-east-1a"
ASG_TAGS: list[Any] = [{"Key": "k8s.io/cluster-autoscaler/enabled", "Value": "true", "PropagateAtLaunch": False}]


def template_asg(aws: MotoAws, name: str, instance_type: str, spot: bool) -> str:
    """An ASG of one instance type in ZONE by its launch template (Spot by its market type when spot),
    tagged for discovery, with no instance; returns the template's id."""
    ec2 = aws.client("ec2")
    data: dict[str, Any] = {"ImageId": ec2.describe_images()["Images"][0]["ImageId"], "InstanceType": instance_type}
    if spot:
        data["InstanceMarketOptions"] = {"MarketType": "spot"}
    template = str(
        ec2.create_launch_template(LaunchTemplateName=f"{name}-lt", LaunchTemplateData=data)["LaunchTemplate"][
            "LaunchTemplateId"
        ]
    )
    aws.client("autoscaling").create_auto_scaling_group(
        AutoScalingGroupName=name,
        MinSize=0,
        MaxSize=3,
        DesiredCapacity=0,
        AvailabilityZones=[ZONE],
        LaunchTemplate={"LaunchTemplateId": template, "Version": "$Default"},
        Tags=ASG_TAGS,
    )
    return template


def spot_template_asg(aws: MotoAws, name: str = "gate-spot") -> None:
    """A Spot ASG (its launch template's market type says so) of m5.large in us-east-1a, tagged for
    discovery, with no instance."""
    template_asg(aws, name, "m5.large", spot=True)


def spot_configuration_asg(aws: MotoAws, name: str = "gate-legacy") -> None:
    """A Spot ASG of the older kind: its launch configuration's SpotPrice says so."""
    image = aws.client("ec2").describe_images()["Images"][0]["ImageId"]
    autoscaling = aws.client("autoscaling")
    autoscaling.create_launch_configuration(
        LaunchConfigurationName=f"{name}-lc", ImageId=image, InstanceType="m5.large", SpotPrice="0.05"
    )
    autoscaling.create_auto_scaling_group(
        AutoScalingGroupName=name,
        MinSize=0,
        MaxSize=3,
        DesiredCapacity=0,
        AvailabilityZones=[ZONE],
        LaunchConfigurationName=f"{name}-lc",
        Tags=ASG_TAGS,
    )


def status(proc: ControllerProcess) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{proc.port}/status", timeout=5) as resp:
        return dict(json.loads(resp.read()))


def pod_events(api: FakeApiServer, reason: str) -> list[str]:
    return [
        e.get("message", "")
        for e in api.list("Event")
        if e.get("reason") == reason and e.get("involvedObject", {}).get("kind") == "Pod"
    ]


@pytest.mark.usefixtures("aws")
async def test_without_a_capacity_source_nothing_is_drained_until_one_is_ready(
    aws: MotoAws, api: FakeApiServer, tmp_path: Path, procs: list[ControllerProcess]
) -> None:
    """No queue, no ASG: an old fallback node and a Spot node of its pool (a Spot launch seen) are not a
    return of Spot. A Spot ASG appears: the next discovery is a source, and the node is drained."""
    add_node(api, "gate-od", "on-demand", OLD)
    add_node(api, "gate-spot", "spot")
    add_pods(api, "gate-od", 2)
    c = start(procs, tmp_path, "gate")
    await eventually(lambda: c.events("no_capacity_source"), timeout=30)
    await eventually(lambda: c.events("decision_pass"), timeout=10)
    assert "no Spot ASG matches --asg-tag" in c.events("no_capacity_source")[0]["reason"]
    assert c.metric("spotd_capacity_source_ready") == 0.0
    await eventually(lambda: pod_events(api, "SpotdNoCapacitySource"), timeout=10)
    document = status(c)
    assert document["capacity_source"]["ready"] is False
    [entry] = [n for n in document["nodes"] if n["node"] == "gate-od"]
    assert entry["drain"] is False and entry["spot"]["available"] is False
    assert "no capacity source" in entry["reason"]
    assert not c.events("drain_starting")
    assert len(pods_on(api, "gate-od")) == 2

    spot_template_asg(aws)
    await eventually(lambda: c.events("capacity_source_ready"), timeout=30)
    await eventually(lambda: c.events("drain_starting"), timeout=30)
    assert c.metric("spotd_capacity_source_ready") == 1.0
    assert status(c)["capacity_source"]["ready"] is True


def limited_user(aws: MotoAws, name: str, without: str) -> Any:
    """An IAM user with deploy/iam-policy.json less one action; the code under test signs as it."""
    policy = json.loads(aws_actions.POLICIES["spotd-controller"].read_text())
    for statement in policy["Statement"]:
        actions = [statement["Action"]] if isinstance(statement["Action"], str) else statement["Action"]
        statement["Action"] = [a for a in actions if a != without]
    policy["Statement"] = [s for s in policy["Statement"] if s["Action"]]
    iam = aws.client("iam")
    iam.create_user(UserName=name)
    arn = iam.create_policy(PolicyName=name, PolicyDocument=json.dumps(moto_policy(policy)))["Policy"]["Arn"]
    iam.attach_user_policy(UserName=name, PolicyArn=arn)
    key = iam.create_access_key(UserName=name)["AccessKey"]
    aws_actions.RECORDER.register(key["AccessKeyId"], name)
    who = type(aws.controller)(name, key["AccessKeyId"], key["SecretAccessKey"])
    aws.act_as(who)
    return who


@pytest.mark.parametrize(
    ("without", "group"),
    [
        ("ec2:DescribeLaunchTemplateVersions", spot_template_asg),
        ("autoscaling:DescribeLaunchConfigurations", spot_configuration_asg),
        ("autoscaling:DescribeAutoScalingGroups", spot_template_asg),
        ("autoscaling:DescribeScalingActivities", spot_template_asg),  # the loop reads every Spot group's
    ],
)
def test_an_asg_discovery_refused_is_an_error_at_start(
    aws: MotoAws, api: FakeApiServer, tmp_path: Path, without: str, group: Any
) -> None:
    group(aws)
    limited_user(aws, "spotd-limited", without)
    proc = ControllerProcess(tmp_path, str(tmp_path / "kubeconfig"), "limited")
    with aws.expect_denied(without):
        done = subprocess.run(proc.args, env=proc.env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("spotd controller: error: ") and without in lines[0] and "AccessDenied" in lines[0]
