"""Promises of docs/agent.md on the node patches that mutation testing (scripts/mutation node_patch) found
unchecked: the release of a full Spot response, a release after a restart that lost the state, a patch
that only restores one field, and the view read from a Node."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from lightkube.models.core_v1 import NodeSpec, NodeStatus, NodeSystemInfo, Taint
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Node

from spotd.agent.node_patch import AgentState, NodeView, notice_patch, release_patch
from spotd.agent.policy import default_policies, plan_response
from spotd.kube.keys import EXCLUDE_LB_LABEL, NOTICE_ANNOTATION, STATE_ANNOTATION
from spotd.notices.record import Notice, NoticeKind

NOW = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)
ITN = Notice(NoticeKind.SPOT_ITN, "imds", NOW, NOW + timedelta(minutes=2), action="terminate")
OURS = {"key": "spotd.io/interruption", "value": "spot-itn", "effect": "NoSchedule"}
OTHER_TAINT = {"key": "dedicated", "value": "batch", "effect": "NoSchedule"}
RESPONSE = plan_response(ITN, default_policies())
STATE = AgentState(ITN.key, tuple(map(str, RESPONSE.steps)), False, "b1")


def acted_on(*taints: dict[str, str], **kw: object) -> NodeView:
    """A node after the agent's full Spot response."""
    return NodeView(
        "n1",
        resource_version="9",
        unschedulable=True,
        taints=(*taints, OURS),
        labels={EXCLUDE_LB_LABEL: "true", "app": "x"},
        annotations={NOTICE_ANNOTATION: ITN.to_json(), STATE_ANNOTATION: STATE.to_json()},
        **kw,  # type: ignore[arg-type]
    )


def test_release_of_a_spot_response_undoes_taint_cordon_label_and_annotations() -> None:
    patch = release_patch(acted_on(OTHER_TAINT), STATE)
    assert patch == {
        "metadata": {
            "resourceVersion": "9",  # a concurrent writer makes it fail with 409
            "annotations": {NOTICE_ANNOTATION: None, STATE_ANNOTATION: None},
            "labels": {EXCLUDE_LB_LABEL: None},
        },
        "spec": {"taints": [OTHER_TAINT], "unschedulable": None},
    }
    # our taint alone: the list goes
    alone = release_patch(acted_on(), STATE)
    assert alone is not None and alone["spec"]["taints"] is None


def test_release_without_the_state_annotation_undoes_everything_ours() -> None:
    # a state annotation lost or unreadable: the agent undoes what its notice implies
    view = acted_on(OTHER_TAINT)
    patch = release_patch(view, None)
    assert patch is not None
    assert patch["spec"] == {"taints": [OTHER_TAINT], "unschedulable": None}
    assert patch["metadata"]["labels"] == {EXCLUDE_LB_LABEL: None}


def test_release_keeps_a_load_balancer_label_it_did_not_set() -> None:
    state = AgentState(ITN.key, ("taint", "cordon", "drain"), False, "b1")
    patch = release_patch(acted_on(), state)
    assert patch is not None and "labels" not in patch["metadata"]
    # and asks nothing about a label that is not there
    bare = NodeView("n1", resource_version="2", annotations={NOTICE_ANNOTATION: "{}"})
    assert release_patch(bare, None) == {"metadata": {"resourceVersion": "2", "annotations": {NOTICE_ANNOTATION: None}}}


def test_a_single_field_undone_by_someone_else_is_patched_back() -> None:
    # docs/agent.md: kubectl uncordon during a notice is undone; so is a removed label or state annotation
    uncordoned = replace(acted_on(), unschedulable=False)
    assert notice_patch(uncordoned, RESPONSE, STATE) == {
        "metadata": {"resourceVersion": "9"},
        "spec": {"unschedulable": True},
    }
    unlabelled = replace(acted_on(), labels={"app": "x"})
    assert notice_patch(unlabelled, RESPONSE, STATE) == {
        "metadata": {"resourceVersion": "9", "labels": {EXCLUDE_LB_LABEL: "true"}}
    }
    stale_state = replace(acted_on(), annotations={NOTICE_ANNOTATION: ITN.to_json()})
    assert notice_patch(stale_state, RESPONSE, STATE) == {
        "metadata": {"resourceVersion": "9", "annotations": {STATE_ANNOTATION: STATE.to_json()}}
    }
    assert notice_patch(acted_on(), RESPONSE, STATE) is None


def test_a_state_annotation_with_missing_fields_reads_as_nothing_done() -> None:
    assert AgentState.from_json("{}") == AgentState()
    assert AgentState.from_json('{"steps": ["cordon"]}') == AgentState(steps=("cordon",))


def test_the_view_reads_what_the_agent_needs_from_a_node() -> None:
    node = Node(
        metadata=ObjectMeta(
            name="n1",
            uid="u1",
            resourceVersion="42",
            labels={"topology.kubernetes.io/zone": "us-east-1a", "node.kubernetes.io/instance-type": "m5.large"},
            annotations={NOTICE_ANNOTATION: "{}"},
        ),
        spec=NodeSpec(
            unschedulable=True,
            taints=[Taint(key="dedicated", value="batch", effect="NoSchedule")],
            providerID="aws:///us-east-1a/i-0123456789abcdef0",
        ),
        status=NodeStatus(
            nodeInfo=NodeSystemInfo(
                bootID="boot-1",
                architecture="amd64",
                containerRuntimeVersion="",
                kernelVersion="",
                kubeProxyVersion="",
                kubeletVersion="",
                machineID="",
                operatingSystem="linux",
                osImage="",
                systemUUID="",
            )
        ),
    )
    view = NodeView.from_node(node)
    assert view == NodeView(
        name="n1",
        uid="u1",
        resource_version="42",
        unschedulable=True,
        taints=({"key": "dedicated", "value": "batch", "effect": "NoSchedule"},),
        labels={"topology.kubernetes.io/zone": "us-east-1a", "node.kubernetes.io/instance-type": "m5.large"},
        annotations={NOTICE_ANNOTATION: "{}"},
        boot_id="boot-1",
        provider_id="aws:///us-east-1a/i-0123456789abcdef0",
    )
    assert (view.zone, view.instance_type, view.instance_id) == ("us-east-1a", "m5.large", "i-0123456789abcdef0")
    # a Node with nothing set reads as empty, not as an error
    assert NodeView.from_node(Node()) == NodeView(name="")
