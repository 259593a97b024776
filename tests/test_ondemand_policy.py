"""The drain policy, table by table: which on-demand node is drained, and the reason given for each."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from spotd.controller.policy import (
    FallbackScope,
    OnDemandPolicy,
    SpotAnswer,
    choose_drains,
    out_of_scope,
    out_of_service_due,
    parse_label_selector,
)
from spotd.inventory.records import NodeExtra, NodeInfo, NodePods, PendingPod, Requirement
from spotd.kube.keys import ON_DEMAND, SPOT, capacity_type_from_labels, normalize_capacity_type

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
SCOPE = FallbackScope(parse_label_selector("node-pool=fallback"), "node-pool=fallback")
POLICY = OnDemandPolicy(min_on_demand_age=7200, max_concurrent_drains=1, max_drains_per_hour=4, scope=SCOPE)
FALLBACK = (("node-pool", "fallback"),)
AVAILABLE = SpotAnswer(True, "no ICE seen")


def node(name: str, hours: float, ctype: str | None = ON_DEMAND, **kw: object) -> NodeInfo:
    return NodeInfo(
        name=name,
        capacity_type=ctype,
        created=NOW - timedelta(hours=hours),
        instance_type="m5.large",
        zone="eu-west-1a",
        **{"labels": FALLBACK, **kw},  # type: ignore[arg-type]
    )


def always(answer: SpotAnswer = AVAILABLE):  # type: ignore[no-untyped-def]
    return lambda _n: answer


@pytest.mark.parametrize(
    ("labels", "extra", "expected"),
    [
        ({"eks.amazonaws.com/capacityType": "SPOT"}, None, SPOT),
        ({"eks.amazonaws.com/capacityType": "ON_DEMAND"}, None, ON_DEMAND),
        ({"karpenter.sh/capacity-type": "spot"}, None, SPOT),
        ({"karpenter.sh/capacity-type": "on-demand"}, None, ON_DEMAND),
        ({"node.kubernetes.io/lifecycle": "normal"}, None, ON_DEMAND),
        ({"node.kubernetes.io/lifecycle": "Ec2Spot"}, None, SPOT),
        ({"lifecycle": "Ec2Spot"}, "lifecycle", SPOT),
        ({"lifecycle": "OnDemand", "karpenter.sh/capacity-type": "spot"}, "lifecycle", ON_DEMAND),
        ({"karpenter.sh/capacity-type": "weird"}, None, None),
        ({}, None, None),
        ({"kubernetes.io/hostname": "x"}, "lifecycle", None),
    ],
)
def test_capacity_type_from_labels(labels: dict[str, str], extra: str | None, expected: str | None) -> None:
    assert capacity_type_from_labels(labels, extra) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [("SPOT", SPOT), ("on_demand", ON_DEMAND), ("On-Demand", ON_DEMAND), ("", None), (None, None), ("x", None)],
)
def test_normalize_capacity_type(value: str | None, expected: str | None) -> None:
    assert normalize_capacity_type(value) == expected


def test_oldest_old_enough_on_demand_node_is_the_one_drained() -> None:
    nodes = [
        node("young", 1),
        node("old", 5),
        node("older", 9),
        node("spot-old", 20, SPOT),
        node("unknown", 20, None),
    ]
    verdicts = choose_drains(nodes, {}, 0, always(), NOW, POLICY)
    assert [(v.node, v.drain) for v in verdicts] == [("older", True), ("old", False), ("young", False)]
    assert "Spot available" in verdicts[0].reason
    assert "max-concurrent-drains" in verdicts[1].reason
    assert "younger than --min-on-demand-age" in verdicts[2].reason


@pytest.mark.parametrize(
    ("name", "kw", "pods", "policy", "reason"),
    [
        ("annotated", {"drain_annotation": "false"}, NodePods(), POLICY, "spotd.io/drain=false"),
        ("annotated-upper", {"drain_annotation": "False"}, NodePods(), POLICY, "spotd.io/drain=false"),
        ("cordoned", {"unschedulable": True}, NodePods(), POLICY, "cordoned (unschedulable)"),
        ("notready", {"ready": False}, NodePods(), POLICY, "not Ready"),
        ("safe", {}, NodePods(3, not_safe_to_evict=("ns/db-0",)), POLICY, "safe-to-evict=false"),
        ("bare", {}, NodePods(3, unreplicated=("ns/bare",)), POLICY, "no controller"),
        ("local", {}, NodePods(3, local_storage=("ns/cache",)), POLICY, "local storage"),
    ],
)
def test_blocked_nodes(name: str, kw: dict[str, object], pods: NodePods, policy: OnDemandPolicy, reason: str) -> None:
    verdicts = choose_drains([node(name, 5, **kw)], {name: pods}, 0, always(), NOW, policy)
    assert len(verdicts) == 1
    assert not verdicts[0].drain
    assert reason in verdicts[0].reason


@pytest.mark.parametrize(
    ("pods", "policy"),
    [
        (
            NodePods(3, unreplicated=("ns/bare",)),
            OnDemandPolicy(min_on_demand_age=7200, evict_unreplicated=True, scope=SCOPE),
        ),
        (
            NodePods(3, local_storage=("ns/c",)),
            OnDemandPolicy(min_on_demand_age=7200, evict_local_storage=True, scope=SCOPE),
        ),
        (NodePods(3), POLICY),
        (NodePods(0), POLICY),
    ],
)
def test_flags_allow_unreplicated_and_local_storage(pods: NodePods, policy: OnDemandPolicy) -> None:
    verdicts = choose_drains([node("n", 5)], {"n": pods}, 0, always(), NOW, policy)
    assert verdicts[0].drain


def test_a_blocked_oldest_node_passes_the_turn_to_the_next() -> None:
    nodes = [node("oldest", 9, drain_annotation="false"), node("next", 5)]
    verdicts = choose_drains(nodes, {}, 0, always(), NOW, POLICY)
    assert [(v.node, v.drain) for v in verdicts] == [("oldest", False), ("next", True)]


def test_no_drain_without_spot_capacity_for_the_pool() -> None:
    def spot_for(n: NodeInfo) -> SpotAnswer:
        if n.zone == "eu-west-1a":
            return SpotAnswer(False, "ICE 3m ago (sqs), cooldown 15m")
        return AVAILABLE

    nodes = [
        node("a-old", 9),
        NodeInfo("b", ON_DEMAND, NOW - timedelta(hours=3), "m5.large", "eu-west-1b", labels=FALLBACK),
    ]
    verdicts = choose_drains(nodes, {}, 0, spot_for, NOW, POLICY)
    assert [(v.node, v.drain) for v in verdicts] == [("a-old", False), ("b", True)]
    assert verdicts[0].reason == "no Spot capacity: ICE 3m ago (sqs), cooldown 15m"


def test_never_while_pods_are_pending_for_lack_of_capacity() -> None:
    verdicts = choose_drains([node("n", 5)], {}, 2, always(), NOW, POLICY)
    assert not verdicts[0].drain
    assert "2 pods Pending" in verdicts[0].reason


@pytest.mark.parametrize(
    ("in_flight", "history", "policy", "drained"),
    [
        ((), (), POLICY, ["a"]),
        (("x",), (), POLICY, []),
        (("x",), (), OnDemandPolicy(min_on_demand_age=7200, max_concurrent_drains=2, scope=SCOPE), ["a"]),
        ((), (), OnDemandPolicy(min_on_demand_age=7200, max_concurrent_drains=3, scope=SCOPE), ["a", "b", "c"]),
        ((), [NOW - timedelta(minutes=m) for m in (5, 10, 20, 30)], POLICY, []),
        ((), [NOW - timedelta(minutes=m) for m in (5, 10, 20, 61)], POLICY, ["a"]),
        (
            (),
            [NOW - timedelta(minutes=5)],
            OnDemandPolicy(min_on_demand_age=7200, max_concurrent_drains=3, max_drains_per_hour=2, scope=SCOPE),
            ["a"],
        ),
    ],
)
def test_concurrency_and_hourly_budget(
    in_flight: tuple[str, ...], history: list[datetime], policy: OnDemandPolicy, drained: list[str]
) -> None:
    nodes = [node("c", 3), node("a", 9), node("b", 5)]
    verdicts = choose_drains(nodes, {}, 0, always(), NOW, policy, in_flight, history)
    assert [v.node for v in verdicts if v.drain] == drained


def test_node_in_flight_is_reported_as_such() -> None:
    verdicts = choose_drains([node("a", 9)], {}, 0, always(), NOW, POLICY, in_flight={"a"})
    assert verdicts[0].reason == "drain in progress"
    assert not verdicts[0].drain


def test_probe_drains_a_single_node_when_due() -> None:
    answer = SpotAnswer(False, "no Spot launch for 2h since the last ICE", probe_due=True)
    policy = OnDemandPolicy(min_on_demand_age=7200, max_concurrent_drains=3, scope=SCOPE)
    verdicts = choose_drains([node("a", 9), node("b", 8), node("c", 7)], {}, 0, always(answer), NOW, policy)
    assert [(v.node, v.drain, v.probe) for v in verdicts] == [
        ("a", True, True),
        ("b", False, False),
        ("c", False, False),
    ]
    assert verdicts[0].reason.startswith("probe: ")
    assert verdicts[1].reason.startswith("no Spot capacity: ")


def test_probe_still_respects_pending_pods_and_blockers() -> None:
    answer = SpotAnswer(False, "quiet", probe_due=True)
    assert not choose_drains([node("a", 9)], {}, 1, always(answer), NOW, POLICY)[0].drain
    blocked = choose_drains([node("a", 9, drain_annotation="false")], {}, 0, always(answer), NOW, POLICY)
    assert not blocked[0].drain


# --- the fallback scope ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("node-pool=fallback", (Requirement("node-pool", "In", ("fallback",)),)),
        ("a==b,c!=d", (Requirement("a", "In", ("b",)), Requirement("c", "NotIn", ("d",)))),
        ("gpu,!spot", (Requirement("gpu", "Exists"), Requirement("spot", "DoesNotExist"))),
        ("tier in (a, b),x notin (c)", (Requirement("tier", "In", ("a", "b")), Requirement("x", "NotIn", ("c",)))),
        ("", ()),
    ],
)
def test_parse_label_selector(text: str, expected: tuple[Requirement, ...]) -> None:
    assert parse_label_selector(text) == expected


@pytest.mark.parametrize("text", ["a b", "=x", "tier in ()", "a=(b"])
def test_parse_label_selector_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_label_selector(text)


KARPENTER = (("karpenter.sh/nodepool", "default"), ("node-pool", "fallback"))


@pytest.mark.parametrize(
    ("labels", "instance", "scope", "fallback_ids", "reason"),
    [
        (FALLBACK, "i-1", SCOPE, (), None),
        ((("node-pool", "system"),), "i-1", SCOPE, (), "not fallback capacity (not matched by --fallback-selector"),
        ((), "i-1", FallbackScope(), (), "no fallback capacity declared"),
        (FALLBACK, "i-1", FallbackScope(), (), "no fallback capacity declared"),
        ((), "i-1", FallbackScope(asg_tag="spotd/fallback"), {"i-1"}, None),
        ((), "i-2", FallbackScope(asg_tag="spotd/fallback"), {"i-1"}, "an ASG tagged spotd/fallback"),
        ((), "", FallbackScope(asg_tag="spotd/fallback"), {""}, "an ASG tagged spotd/fallback"),
        (KARPENTER, "i-1", SCOPE, (), "managed by Karpenter"),
        (
            KARPENTER,
            "i-1",
            FallbackScope(parse_label_selector("karpenter.sh/nodepool=default"), "karpenter.sh/nodepool=default"),
            (),
            None,
        ),
    ],
)
def test_out_of_scope(
    labels: tuple[tuple[str, str], ...], instance: str, scope: FallbackScope, fallback_ids: set[str], reason: str | None
) -> None:
    n = NodeInfo("n", ON_DEMAND, NOW - timedelta(hours=5), labels=labels, instance_id=instance)
    found = out_of_scope(n, scope, fallback_ids)
    if reason is None:
        assert found is None
    else:
        assert found is not None and reason in found


def test_nodes_out_of_scope_are_never_candidates() -> None:
    system = node("system", 30, labels=(("node-pool", "system"),))
    verdicts = choose_drains([system, node("fallback", 5)], {}, 0, always(), NOW, POLICY)
    assert [(v.node, v.drain) for v in verdicts] == [("fallback", True)]
    unscoped = OnDemandPolicy(min_on_demand_age=7200)
    assert choose_drains([system, node("fallback", 5)], {}, 0, always(), NOW, unscoped) == []


# --- back-off, do-not-disrupt, Jobs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "pods", "reason"),
    [
        (
            {"retry_after": NOW + timedelta(minutes=10), "drain_attempts": 1, "retry_outcome": "timeout"},
            NodePods(),
            "last drain ended in timeout (attempt 1); not retried before",
        ),
        ({"do_not_disrupt": True}, NodePods(), "karpenter.sh/do-not-disrupt=true"),
        ({}, NodePods(2, do_not_disrupt=("ns/busy",)), "pod ns/busy is annotated karpenter.sh/do-not-disrupt=true"),
        ({}, NodePods(2, jobs=("ns/batch-x",)), "pod ns/batch-x is a running Job (see --evict-jobs)"),
    ],
)
def test_held_nodes(kw: dict[str, object], pods: NodePods, reason: str) -> None:
    verdicts = choose_drains([node("n", 5, **kw)], {"n": pods}, 0, always(), NOW, POLICY)
    assert not verdicts[0].drain
    assert reason in verdicts[0].reason


def test_a_node_in_back_off_passes_the_turn_and_is_tried_again_after_it() -> None:
    stuck = node("stuck", 9, retry_after=NOW + timedelta(minutes=1), drain_attempts=2, retry_outcome="blocked")
    verdicts = choose_drains([stuck, node("next", 5)], {}, 0, always(), NOW, POLICY)
    assert [(v.node, v.drain) for v in verdicts] == [("stuck", False), ("next", True)]
    later = choose_drains([stuck, node("next", 5)], {}, 0, always(), NOW + timedelta(minutes=2), POLICY)
    assert [(v.node, v.drain) for v in later] == [("stuck", True), ("next", False)]


def test_evict_jobs_lets_a_running_job_go() -> None:
    policy = OnDemandPolicy(min_on_demand_age=7200, evict_jobs=True, scope=SCOPE)
    assert choose_drains([node("n", 5)], {"n": NodePods(1, jobs=("ns/j",))}, 0, always(), NOW, policy)[0].drain


# --- the scoped Pending gate -----------------------------------------------------------------------------

GPU_SELECTOR = (Requirement("nvidia.com/gpu.present", "In", ("true",)),)


@pytest.mark.parametrize(
    ("pending", "held"),
    [
        ([], False),
        ([PendingPod("ml/train", GPU_SELECTOR)], False),  # selects GPU nodes: no fallback node fits
        ([PendingPod("web/x")], True),  # no constraint: competes with everything
        ([PendingPod("web/y", (Requirement("node-pool", "In", ("fallback",)),))], True),
        ([PendingPod("web/z", terms=((Requirement("node-pool", "In", ("fallback", "spot")),),))], True),
        ([PendingPod("web/z", terms=((Requirement("node-pool", "NotIn", ("fallback",)),),))], False),
        ([PendingPod("ml/train", GPU_SELECTOR), PendingPod("web/x")], True),
    ],
)
def test_only_pending_pods_that_would_compete_hold_drains(pending: list[PendingPod], held: bool) -> None:
    verdicts = choose_drains([node("n", 5)], {}, pending, always(), NOW, POLICY)
    assert verdicts[0].drain is not held
    assert (verdicts[0].hold == "pending_pods") is held


# --- the out-of-service taint ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ready", "deadline", "tainted", "due"),
    [
        (False, NOW - timedelta(minutes=1), False, True),
        (True, NOW - timedelta(minutes=1), False, False),  # still Ready: the instance may still run
        (False, NOW + timedelta(minutes=1), False, False),  # deadline not passed yet
        (False, None, False, False),  # no notice: NotReady for any other reason is not ours
        (False, NOW - timedelta(minutes=1), True, False),  # once
    ],
)
def test_out_of_service_due(ready: bool, deadline: datetime | None, tainted: bool, due: bool) -> None:
    n = NodeInfo("n", ON_DEMAND, NOW - timedelta(hours=1), ready=ready)
    extra = NodeExtra(notice_deadline=deadline, out_of_service=tainted)
    assert (out_of_service_due(n, extra, NOW) is not None) is due
