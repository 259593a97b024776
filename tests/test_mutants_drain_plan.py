"""Promises of docs/agent.md and docs/controller.md on the drain plan that mutation testing
(scripts/mutation drain/plan) found unchecked."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from spotd.drain.plan import PodFacts, PodPolicy, PodVerdict, decide_pod, plan_drain, retry_delay, shorter_grace

PODS = [
    PodFacts("kube-system", "proxy", mirror=True),
    PodFacts("kube-system", "logs", owner_kinds=("DaemonSet",)),
    PodFacts("web", "old", owner_kinds=("ReplicaSet",), terminating=True),
    PodFacts("batch", "done", owner_kinds=("Job",), phase="Succeeded"),
    PodFacts("web", "pinned", owner_kinds=("ReplicaSet",), safe_to_evict="false"),
    PodFacts("web", "bare"),
    PodFacts("web", "cache", owner_kinds=("ReplicaSet",), local_storage=True),
    PodFacts("web", "app", owner_kinds=("ReplicaSet",)),
]
VOLUNTARY = PodPolicy(voluntary=True, evict_unreplicated=False, evict_local_storage=False)


@pytest.mark.parametrize("policy", [PodPolicy(), VOLUNTARY])
def test_every_decision_carries_its_pod_and_a_reason(policy: PodPolicy) -> None:
    # "a verdict with its reason": the reason is what the Event, the log line and --dry-run print
    for pod in PODS:
        decision = decide_pod(pod, policy)
        assert decision.pod is pod
        assert isinstance(decision.reason, str) and decision.reason


def test_the_plan_hands_the_executor_the_pods_of_each_verdict() -> None:
    plan = plan_drain(PODS, VOLUNTARY)
    names = {v: [p.name for p in plan.with_verdict(v)] for v in PodVerdict}
    assert names == {
        PodVerdict.EVICT: ["app"],
        PodVerdict.WAIT: ["old"],  # already terminating: counted as left until gone
        PodVerdict.SKIP: ["done", "logs", "proxy"],  # completed pods too: nobody deletes pods
        PodVerdict.BLOCK: ["bare", "cache", "pinned"],
    }
    assert [d.pod.name for d in plan.blocked] == names[PodVerdict.BLOCK]


def test_refusals_are_retried_after_0_1_s_growing_by_1_6x_to_2_s() -> None:
    # docs/agent.md, "PDB refusals"
    delays = [retry_delay(n) for n in range(9)]
    assert delays[:4] == pytest.approx([0.1, 0.16, 0.256, 0.4096])
    assert delays[-1] == 2.0
    assert all(a <= b for a, b in itertools.pairwise(delays))


def test_a_terminating_pod_is_judged_by_its_deletion_grace_not_its_spec() -> None:
    # docs/agent.md: a pod already terminating is asked again when *its deletion's* grace ends too late
    going = PodFacts("web", "slow", owner_kinds=("ReplicaSet",), terminating=True, grace_seconds=30)
    going = replace(going, deletion_grace_seconds=600)
    assert shorter_grace(going, seconds_left=60, safety_margin=10) == 50
    assert shorter_grace(replace(going, deletion_grace_seconds=40), seconds_left=60, safety_margin=10) is None
