"""Table tests for pool matching by what would replace a node: the Spot groups whose template labels, taints,
instance types and zones fit the node's pods."""

from __future__ import annotations

from typing import Any

import pytest

from spotd.controller.node_groups import (
    NodeGroup,
    node_group_from_asg,
    node_selection_matches,
    requirement_holds,
    spot_groups_for,
)

CT = "eks.amazonaws.com/capacityType"


def pod(**spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": "p", "namespace": "shop"}, "spec": {"containers": [{"name": "c"}], **spec}}


def affinity(*terms: list[dict[str, Any]]) -> dict[str, Any]:
    node_terms = [{"matchExpressions": t} for t in terms]
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": node_terms}}}


def req(key: str, op: str, *values: str) -> dict[str, Any]:
    return {"key": key, "operator": op, "values": list(values)} if values else {"key": key, "operator": op}


@pytest.mark.parametrize(
    ("requirement", "labels", "holds"),
    [
        (req("a", "In", "1", "2"), {"a": "2"}, True),
        (req("a", "In", "1"), {}, False),
        (req("a", "NotIn", "1"), {}, True),
        (req("a", "NotIn", "1"), {"a": "1"}, False),
        (req("a", "Exists"), {"a": ""}, True),
        (req("a", "DoesNotExist"), {"a": ""}, False),
        (req("a", "Gt", "4"), {"a": "8"}, True),
        (req("a", "Lt", "4"), {"a": "8"}, False),
        (req("a", "Gt", "4"), {"a": "x"}, False),
        (req("a", "Bogus"), {"a": "x"}, False),
    ],
)
def test_requirement(requirement: dict[str, Any], labels: dict[str, str], holds: bool) -> None:
    assert requirement_holds(requirement, labels) is holds


def test_terms_are_ored_expressions_anded() -> None:
    spec = {"affinity": affinity([req("a", "In", "1"), req("b", "Exists")], [req("c", "In", "3")])}
    assert node_selection_matches(spec, {"a": "1", "b": "x"})
    assert node_selection_matches(spec, {"c": "3"})
    assert not node_selection_matches(spec, {"a": "1"})
    assert not node_selection_matches({"nodeSelector": {"a": "1"}}, {"a": "2"})
    assert node_selection_matches({}, {})
    fields = {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchFields": [req("metadata.name", "In", "n1")]}]}}}}  # fmt: skip
    assert node_selection_matches(fields, {}, "n1") and not node_selection_matches(fields, {}, "n2")


def test_node_group_from_asg_tags() -> None:
    tags = {
        "k8s.io/cluster-autoscaler/node-template/label/team": "shop",
        "k8s.io/cluster-autoscaler/node-template/taint/dedicated": "shop:NoSchedule",
        "k8s.io/cluster-autoscaler/node-template/taint/plain": "yes",
        "k8s.io/cluster-autoscaler/enabled": "true",
    }
    group = node_group_from_asg("spot-a", tags, ["m5.large"], ["us-east-1a"], "spot")
    assert group.labels == {"team": "shop"}
    assert sorted(group.taints, key=lambda t: t["key"]) == [
        {"key": "dedicated", "value": "shop", "effect": "NoSchedule"},
        {"key": "plain", "value": "yes", "effect": "NoSchedule"},
    ]
    (labels,) = group.templates(CT, "SPOT")
    assert labels["node.kubernetes.io/instance-type"] == "m5.large"
    assert labels["topology.kubernetes.io/zone"] == "us-east-1a" and labels[CT] == "SPOT"


GROUPS = [
    NodeGroup("spot-general", "spot", instance_types=("m5.large", "m6i.large"), zones=("us-east-1a", "us-east-1b")),
    NodeGroup("spot-arm", "spot", {"kubernetes.io/arch": "arm64"}, instance_types=("m7g.large",),
              zones=("us-east-1a",)),
    NodeGroup("spot-gpu", "spot", taints=({"key": "nvidia.com/gpu", "value": "", "effect": "NoSchedule"},),
              instance_types=("g5.xlarge",), zones=("us-east-1b",)),
    NodeGroup("od-general", "on-demand", instance_types=("m5.large",), zones=("us-east-1a",)),
]  # fmt: skip


@pytest.mark.parametrize(
    ("pods", "groups"),
    [
        ([pod()], ["spot-arm", "spot-general"]),
        ([pod(nodeSelector={"kubernetes.io/arch": "arm64"})], ["spot-arm"]),
        # an instance type the on-demand node had is not required: any type of the group that fits will do
        ([pod(affinity=affinity([req("node.kubernetes.io/instance-type", "In", "m6i.large", "c5.large")]))],
         ["spot-general"]),
        ([pod(affinity=affinity([req("topology.kubernetes.io/zone", "In", "us-east-1b")]))],
         ["spot-general"]),
        ([pod(tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists"}])],
         ["spot-arm", "spot-general", "spot-gpu"]),
        # all the node's pods must fit the same group
        ([pod(nodeSelector={"kubernetes.io/arch": "arm64"}),
          pod(affinity=affinity([req("topology.kubernetes.io/zone", "In", "us-east-1b")]))], []),
        ([pod(nodeSelector={CT: "ON_DEMAND"})], []),
    ],
)  # fmt: skip
def test_spot_groups_for(pods: list[dict[str, Any]], groups: list[str]) -> None:
    assert spot_groups_for(pods, GROUPS, CT, "SPOT") == groups
