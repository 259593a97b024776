"""Promises of docs/controller.md on the decision pass that mutation testing
(scripts/mutation controller/policy) found unchecked."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from spotd.controller.policy import (
    FallbackScope,
    OnDemandPolicy,
    SpotAnswer,
    age_text,
    choose_drains,
    drain_withdrawn,
    parse_label_selector,
)
from spotd.inventory.records import NodeInfo
from spotd.kube.keys import ON_DEMAND

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
SCOPE = FallbackScope(parse_label_selector("node-pool=fallback"), "node-pool=fallback")
POLICY = OnDemandPolicy(min_on_demand_age=7200, max_concurrent_drains=1, max_drains_per_hour=6, scope=SCOPE)


def node(name: str, hours: float) -> NodeInfo:
    labels = (("node-pool", "fallback"),)
    return NodeInfo(name, ON_DEMAND, NOW - timedelta(hours=hours), "m5.large", "eu-west-1a", labels=labels)


def available(_node: NodeInfo) -> SpotAnswer:
    return SpotAnswer(True, "no ICE seen")


NODES = [node("a", 5), node("b", 4), node("c", 3)]


@pytest.mark.parametrize(
    ("situation", "kw", "first_reason"),
    [
        ("in flight", {"in_flight": ("a",)}, "drain in progress"),
        ("pending pods", {"pending": 3}, "3 pods Pending for lack of capacity"),
        (
            "hourly budget",
            {"history": [NOW - timedelta(minutes=m) for m in range(6)]},
            "--max-drains-per-hour (6) reached",
        ),
    ],
)
def test_one_verdict_per_on_demand_node_with_its_age_whatever_stops_the_first(
    situation: str, kw: dict[str, object], first_reason: str
) -> None:
    args: dict[str, object] = {"pending": 0, **kw}
    verdicts = choose_drains(NODES, {}, spot_for=available, now=NOW, policy=POLICY, **args)  # type: ignore[arg-type]
    assert [v.node for v in verdicts] == ["a", "b", "c"], situation
    assert verdicts[0].reason == first_reason
    assert [v.age for v in verdicts] == [5 * 3600, 4 * 3600, 3 * 3600]


def test_a_drain_verdict_carries_the_age_probe_or_not() -> None:
    (drain,) = [v for v in choose_drains(NODES[:1], {}, 0, available, NOW, POLICY) if v.drain]
    assert drain.age == 5 * 3600 and drain.reason == "on-demand for 5h00m, Spot available: no ICE seen"
    probe_due = SpotAnswer(False, "ICE in m5.large/eu-west-1a", probe_due=True)
    (probe,) = choose_drains(NODES[:1], {}, 0, lambda _n: probe_due, NOW, POLICY)
    assert probe.drain and probe.probe and probe.age == 5 * 3600


def test_each_drain_uses_one_of_the_hourly_budget() -> None:
    policy = OnDemandPolicy(min_on_demand_age=7200, max_concurrent_drains=3, max_drains_per_hour=2, scope=SCOPE)
    verdicts = choose_drains(NODES, {}, 0, available, NOW, policy)
    assert [v.drain for v in verdicts] == [True, True, False]


def test_a_node_exactly_min_on_demand_age_old_is_no_longer_younger() -> None:
    (verdict,) = choose_drains([node("a", 2)], {}, 0, available, NOW, POLICY)
    assert verdict.drain, verdict.reason


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (18000, "5h00m"),
        (3600, "1h00m"),
        (3599, "59m"),
        (3660, "1h01m"),
        (300, "5m"),
        (60, "1m"),
        (59, "59s"),
        (0, "0s"),
        (-5, "0s"),
    ],
)
def test_age_text(seconds: float, text: str) -> None:
    # the age in the drain reason (the Event, the log line, --dry-run)
    assert age_text(seconds) == text


ASG_SCOPE = FallbackScope(asg_tag="spotd/fallback")


def test_a_node_of_a_fallback_asg_is_a_candidate() -> None:
    # --fallback-asg-tag: the instance ids of the tagged ASGs put a node in scope
    n = NodeInfo("n", ON_DEMAND, NOW - timedelta(hours=5), instance_id="i-1")
    policy = OnDemandPolicy(min_on_demand_age=7200, scope=ASG_SCOPE)
    (verdict,) = choose_drains([n], {}, 0, available, NOW, policy, fallback_instances={"i-1"})
    assert verdict.drain, verdict.reason


@pytest.mark.parametrize(
    ("kw", "scope", "reason"),
    [
        ({"drain_annotation": " False "}, SCOPE, "annotated spotd.io/drain=false during the drain"),
        ({"do_not_disrupt": True}, SCOPE, "annotated karpenter.sh/do-not-disrupt=true during the drain"),
        (
            {"labels": (("node-pool", "system"),)},
            SCOPE,
            "left the fallback scope during the drain: not fallback capacity (not matched by --fallback-selector",
        ),
        ({"instance_id": "i-2"}, ASG_SCOPE, "left the fallback scope during the drain: not fallback capacity"),
        ({}, SCOPE, None),
        ({"instance_id": "i-1"}, ASG_SCOPE, None),
    ],
)
def test_a_drain_in_flight_is_withdrawn_when_the_node_leaves_the_scope_or_is_opted_out(
    kw: dict[str, object], scope: FallbackScope, reason: str | None
) -> None:
    # docs/controller.md, outcome `withdrawn`
    found = drain_withdrawn(replace(node("n", 5), **kw), scope, {"i-1"})  # type: ignore[arg-type]
    if reason is None:
        assert found is None
    else:
        assert found is not None and found.startswith(reason), found


def test_an_empty_requirement_between_commas_drops_nothing_after_it() -> None:
    # the scope fails closed: no requirement may be lost
    assert parse_label_selector("a=b,,c!=d") == parse_label_selector("a=b,c!=d")
    assert len(parse_label_selector("a=b,,c!=d")) == 2


def test_in_and_notin_without_a_space_before_the_parenthesis() -> None:
    # as kubectl reads them; a NotIn read for an In would turn the scope inside out
    assert parse_label_selector("tier in(a,b),x notin(c)") == parse_label_selector("tier in (a,b),x notin (c)")


def test_a_value_in_parentheses_is_a_value_error() -> None:
    # a selector the parser cannot read is a start error (ValueError), not a crash
    with pytest.raises(ValueError):
        parse_label_selector("a=(b)")
