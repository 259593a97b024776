"""The comparison of recorded AWS calls with an IAM policy (tests/aws_actions.py), on synthetic records, and
the policy as moto is given it (tests/moto_server.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.aws_actions import Call, _credential, check_policies, compare, describe, needed_actions
from tests.moto_server import moto_policy

POLICY: dict[str, Any] = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Sid": "Queue",
            "Effect": "Allow",
            "Action": ["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes"],
            "Resource": "arn:aws:sqs:us-east-1:111122223333:spotd-events",
        },
        {"Sid": "Read", "Effect": "Allow", "Action": "ec2:DescribeInstances", "Resource": "*"},
    ],
}


def test_a_dropped_action_and_an_unused_one_are_named() -> None:
    called = {
        "sqs:ReceiveMessage",
        "sqs:DeleteMessageBatch",  # authorised as sqs:DeleteMessage
        "ec2:DescribeInstances",
        "ec2:DescribeLaunchTemplateVersions",  # not granted
        "sts:GetCallerIdentity",  # needs no permission
    }
    result = compare(called, POLICY)
    assert result.missing == {"ec2:DescribeLaunchTemplateVersions"}
    assert result.unused == {"sqs:GetQueueAttributes"}
    assert not result.ok
    assert describe("spotd-controller", "deploy/iam-policy.json", result) == [
        "spotd-controller: the code calls ec2:DescribeLaunchTemplateVersions, which deploy/iam-policy.json "
        "does not grant",
        "spotd-controller: deploy/iam-policy.json grants sqs:GetQueueAttributes, which no test saw the code call",
    ]


def test_exact_match_is_ok_and_wildcards_cover() -> None:
    assert compare({"sqs:ReceiveMessage", "sqs:DeleteMessageBatch", "ec2:DescribeInstances"}, POLICY).unused == {
        "sqs:GetQueueAttributes"
    }
    wide = {"Statement": [{"Effect": "Allow", "Action": "ec2:Describe*", "Resource": "*"}]}
    assert compare({"ec2:DescribeInstances", "ec2:DescribeLaunchTemplateVersions"}, wide).ok
    assert compare(set(), wide).unused == {"ec2:Describe*"}


def test_dependent_actions_count_as_called() -> None:
    assert needed_actions({"fis:CreateExperimentTemplate", "sts:GetCallerIdentity"}) == {
        "fis:CreateExperimentTemplate",
        "iam:PassRole",
    }


def test_check_policies_by_identity(tmp_path: Path) -> None:
    path = tmp_path / "iam-policy.json"
    path.write_text(json.dumps(POLICY))
    calls = [
        Call("spotd-controller", "sqs:ReceiveMessage", "allowed"),
        Call("spotd-controller", "sqs:DeleteMessageBatch", "allowed"),
        Call("spotd-controller", "autoscaling:DescribeLaunchConfigurations", "AccessDeniedError"),
        Call("spotd-controller", "ec2:DescribeInstances", "allowed"),
        Call("admin", "sqs:GetQueueAttributes", "allowed"),  # the test's own call: not the code's
    ]
    assert check_policies(calls, {"spotd-controller": path, "spotd-operator": path}) == [
        "spotd-controller: the code calls autoscaling:DescribeLaunchConfigurations, which "
        "deploy/iam-policy.json does not grant",
        "spotd-controller: deploy/iam-policy.json grants sqs:GetQueueAttributes, which no test saw the code call",
        "spotd-operator: no AWS call recorded (did the AWS tests run?)",
    ]


def test_moto_policy_widens_what_moto_cannot_evaluate() -> None:
    terminate = {
        "Sid": "T",
        "Effect": "Allow",
        "Action": ["autoscaling:TerminateInstanceInAutoScalingGroup"],
        "Resource": "arn:aws:autoscaling:us-east-1:111122223333:autoScalingGroup:*:autoScalingGroupName/*",
        "Condition": {"StringEquals": {"aws:ResourceTag/k8s.io/cluster-autoscaler/enabled": "true"}},
    }
    queue, read = POLICY["Statement"]
    out = moto_policy({"Version": "2012-10-17", "Statement": [queue, read, terminate]})["Statement"]
    assert out[0]["Resource"] == queue["Resource"]  # moto checks SQS against the queue's ARN: as written
    assert out[0]["Action"] == [*queue["Action"], "sqs:DeleteMessageBatch"]
    assert out[1] == {**read, "Action": ["ec2:DescribeInstances"]}
    assert out[2] == {**terminate, "Resource": "*"}  # the Condition stays: moto passes it either way
    assert terminate["Resource"] != "*"  # the input is left alone


def test_credential_scope() -> None:
    header = (
        "AWS4-HMAC-SHA256 Credential=AKIAEXAMPLE/20261130/us-east-1/autoscaling/aws4_request, "
        "SignedHeaders=host;x-amz-date, Signature=abc"
    )
    assert _credential({"Authorization": header}) == ("AKIAEXAMPLE", "autoscaling")
    assert _credential({}) == ("", "")
