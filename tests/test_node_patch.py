"""The node patches the agent sends: computed from what the node is, idempotent, and undone exactly."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from spotd.agent.node_patch import AgentState, NodeView, notice_patch, release_patch
from spotd.agent.policy import default_policies, plan_response
from spotd.kube.keys import EXCLUDE_LB_LABEL, NOTICE_ANNOTATION, STATE_ANNOTATION
from spotd.notices.record import Notice, NoticeKind

NOW = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)
ITN = Notice(NoticeKind.SPOT_ITN, "imds", NOW, NOW + timedelta(minutes=2), action="terminate")
OTHER_TAINT = {"key": "dedicated", "value": "batch", "effect": "NoSchedule"}


def apply(view: NodeView, patch: dict) -> NodeView:
    """What the API server does with our merge patch (enough for these fields)."""
    spec, meta = patch.get("spec", {}), patch.get("metadata", {})
    labels = {**view.labels, **meta.get("labels", {})}
    annotations = {**view.annotations, **meta.get("annotations", {})}
    return NodeView(
        view.name,
        resource_version=str(int(view.resource_version) + 1),
        unschedulable=bool(spec.get("unschedulable", view.unschedulable)),
        taints=tuple(spec["taints"] or ()) if "taints" in spec else view.taints,
        labels={k: v for k, v in labels.items() if v is not None},
        annotations={k: v for k, v in annotations.items() if v is not None},
        boot_id=view.boot_id,
    )


def test_itn_patch_taints_cordons_labels_and_remembers_in_one_request() -> None:
    view = NodeView("n1", resource_version="7", taints=(OTHER_TAINT,), boot_id="b1")
    response = plan_response(ITN, default_policies())
    state = AgentState(ITN.key, tuple(map(str, response.steps)), False, "b1")
    patch = notice_patch(view, response, state)
    assert patch is not None
    assert patch["metadata"]["resourceVersion"] == "7"  # the API server refuses it (409) if the node moved on
    assert patch["spec"]["unschedulable"] is True
    assert patch["spec"]["taints"] == [
        OTHER_TAINT,
        {"key": "spotd.io/interruption", "value": "spot-itn", "effect": "NoSchedule"},
    ]
    assert patch["metadata"]["labels"] == {EXCLUDE_LB_LABEL: "true"}
    assert Notice.from_json(patch["metadata"]["annotations"][NOTICE_ANNOTATION]) == ITN
    after = apply(view, patch)
    assert notice_patch(after, response, state) is None  # idempotent: nothing left to do


def test_escalation_from_rebalance_replaces_our_taint_only() -> None:
    rebalance = Notice(NoticeKind.REBALANCE, "imds", NOW, None, event_id="r1")
    view = NodeView("n1", resource_version="1", taints=(OTHER_TAINT,))
    r1 = plan_response(rebalance, default_policies())
    view = apply(view, notice_patch(view, r1, AgentState(rebalance.key, ("taint",))) or {})
    assert [t["effect"] for t in view.taints] == ["NoSchedule", "PreferNoSchedule"]
    assert not view.unschedulable
    r2 = plan_response(ITN, default_policies())
    view = apply(view, notice_patch(view, r2, AgentState(ITN.key, tuple(map(str, r2.steps)))) or {})
    ours = [t for t in view.taints if t["key"] == "spotd.io/interruption"]
    assert ours == [{"key": "spotd.io/interruption", "value": "spot-itn", "effect": "NoSchedule"}]
    assert OTHER_TAINT in view.taints and view.unschedulable


def test_release_undoes_only_what_we_did() -> None:
    maint = Notice(NoticeKind.SCHEDULED_MAINTENANCE, "imds", NOW, NOW + timedelta(hours=1), event_id="e1")
    response = plan_response(maint, default_policies())
    view = NodeView("n1", resource_version="1", taints=(OTHER_TAINT,))
    state = AgentState(maint.key, tuple(map(str, response.steps)), prior_unschedulable=False)
    view = apply(view, notice_patch(view, response, state) or {})
    assert view.unschedulable
    released = apply(view, release_patch(view, state) or {})
    assert not released.unschedulable
    assert released.taints == (OTHER_TAINT,)
    assert NOTICE_ANNOTATION not in released.annotations and STATE_ANNOTATION not in released.annotations
    assert release_patch(released, state) is None


def test_release_keeps_a_cordon_an_operator_made_before_the_notice() -> None:
    view = NodeView("n1", resource_version="3", unschedulable=True, annotations={NOTICE_ANNOTATION: "{}"})
    state = AgentState("k", ("cordon", "drain"), prior_unschedulable=True)
    patch = release_patch(view, state)
    assert patch is not None and "spec" not in patch
    assert patch["metadata"]["annotations"] == {NOTICE_ANNOTATION: None}


def test_agent_state_round_trips_and_tolerates_garbage() -> None:
    state = AgentState("spot-itn/x", ("taint", "cordon"), True, "boot")
    assert AgentState.from_json(state.to_json()) == state
    assert AgentState.from_json("not json") is None
    assert AgentState.from_json(None) is None
