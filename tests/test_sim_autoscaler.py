"""The embedded cluster's cluster-autoscaler model (spotd.sim.ca_model) over the fake API server, with the
sim scheduler and controllers: scale-up by priority, ICE and back-off to on-demand, return to Spot,
scale-down of empty nodes, and the two ConfigMaps CA publishes or reads."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any

import pytest
import yaml

from spotd.sim.ca_model import (
    NODEGROUP_LABEL,
    PRIORITY_CONFIGMAP,
    STATUS_CONFIGMAP,
    Autoscaler,
    AutoscalerTiming,
    SimulatedGroup,
    expand,
    fits_template,
    parse_priorities,
    priorities_yaml,
)
from spotd.sim.controllers import Controllers
from spotd.sim.kubeapi.server import FakeApiServer

SPOT_A = SimulatedGroup("spot-1a", "spot", "m5.xlarge", "us-east-1a", priority=20, max_size=5)
SPOT_B = SimulatedGroup("spot-1b", "spot", "m5.xlarge", "us-east-1b", priority=20, max_size=5)
FALLBACK = SimulatedGroup(
    "fallback-1a", "on-demand", "m5.xlarge", "us-east-1a", priority=10, labels={"node-pool": "fallback"}
)
GROUPS = (SPOT_A, SPOT_B, FALLBACK)
# real-scale seconds at 1/100: provisioning and failures 0.2 s, back-off 1 s, scale-down after 0.5 s
TIMING = AutoscalerTiming(
    provision_delay=20,
    launch_failure_delay=20,
    initial_backoff=100,
    scale_down_unneeded=50,
    scan_interval=5,
    scale=0.01,
)


class Sim:
    def __init__(self, groups: tuple[SimulatedGroup, ...] = GROUPS) -> None:
        self.api = FakeApiServer(termination_scale=0.01)
        self.controllers = Controllers(self.api, random.Random(1), 0.01)
        self.failures: list[tuple[str, datetime, str]] = []
        self.launched: list[str] = []
        self.autoscaler = Autoscaler(
            self.api,
            groups,
            TIMING,
            on_launched=lambda g, n: self.launched.append(n["metadata"]["name"]),
            on_launch_failed=lambda g, at, msg: self.failures.append((g.name, at, msg)),
        )

    def replicaset(self, name: str, replicas: int, cpu: str = "1000m", **spec: Any) -> None:
        self.api.create(
            {
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "metadata": {"name": name, "namespace": "default"},
                "spec": {
                    "replicas": replicas,
                    "selector": {"matchLabels": {"app": name}},
                    "template": {
                        "metadata": {"labels": {"app": name}, "annotations": {"sim.spotd.io/start-seconds": "1"}},
                        "spec": {
                            "terminationGracePeriodSeconds": 1,
                            "containers": [{"name": name, "resources": {"requests": {"cpu": cpu, "memory": "256Mi"}}}],
                            **spec,
                        },
                    },
                },
            }
        )
        self.controllers.dirty.set()

    def scale(self, name: str, replicas: int) -> None:
        rs = self.api.get("ReplicaSet", name, "default")
        assert rs is not None
        rs["spec"]["replicas"] = replicas
        self.api.update(rs)

    def node_of(self, pod_prefix: str) -> list[str]:
        return [
            p["spec"].get("nodeName", "")
            for p in self.api.list("Pod", "default")
            if p["metadata"]["name"].startswith(pod_prefix) and not p["metadata"].get("deletionTimestamp")
        ]

    def group_of(self, node: str) -> str:
        obj = self.api.get("Node", node)
        return "" if obj is None else obj["metadata"]["labels"][NODEGROUP_LABEL]

    def status(self) -> dict[str, Any]:
        cm = self.api.get("ConfigMap", STATUS_CONFIGMAP, "kube-system")
        assert cm is not None
        return dict(yaml.safe_load(cm["data"]["status"]))

    def scale_up_status(self, group: str) -> dict[str, Any]:
        return next(g["scaleUp"] for g in self.status()["nodeGroups"] if g["name"] == group)


@pytest.fixture
async def sim() -> AsyncIterator[Sim]:
    s = Sim()
    tasks = [asyncio.create_task(s.controllers.run()), asyncio.create_task(s.autoscaler.run())]
    try:
        yield s
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def all_on(sim: Sim, prefix: str, group: str, count: int) -> bool:
    nodes = sim.node_of(prefix)
    return len(nodes) == count and all(n and sim.group_of(n) == group for n in nodes)


async def test_a_pending_pod_scales_up_the_highest_priority_group(sim: Sim) -> None:
    sim.replicaset("web", 2, cpu="1500m")
    await eventually(lambda: all_on(sim, "web", "spot-1a", 2))
    nodes = sim.api.list("Node")
    assert [n["metadata"]["name"] for n in nodes] == ["spot-1a-1"]  # both fit one node
    labels = nodes[0]["metadata"]["labels"]
    assert labels["eks.amazonaws.com/capacityType"] == "SPOT"
    assert labels["karpenter.sh/capacity-type"] == "spot"
    assert labels["node.kubernetes.io/instance-type"] == "m5.xlarge"
    assert labels["topology.kubernetes.io/zone"] == "us-east-1a"
    assert nodes[0]["spec"]["providerID"].startswith("aws:///us-east-1a/i-0")
    assert sim.launched == ["spot-1a-1"]


async def test_ice_on_spot_backs_off_then_falls_back_to_on_demand_and_spot_returns(sim: Sim) -> None:
    assert sim.autoscaler.set_ice("spot", True) == ["spot:m5.xlarge/us-east-1a", "spot:m5.xlarge/us-east-1b"]
    sim.replicaset("web", 2, cpu="1500m")
    await eventually(lambda: all_on(sim, "web", "fallback-1a", 2))
    # spot-1a failed first (name order within a priority), then spot-1b, then the fallback
    assert [g for g, _, _ in sim.failures] == ["spot-1a", "spot-1b"]
    assert "InsufficientInstanceCapacity" in sim.failures[0][2] and "(us-east-1a)" in sim.failures[0][2]
    node = sim.api.get("Node", sim.node_of("web")[0])
    assert node is not None
    assert node["metadata"]["labels"]["eks.amazonaws.com/capacityType"] == "ON_DEMAND"
    assert node["metadata"]["labels"]["node-pool"] == "fallback"
    # the status shows both Spot groups backed off while ICE lasts
    backoff = sim.scale_up_status("spot-1a")
    assert backoff["status"] == "Backoff"
    assert backoff["backoffInfo"]["errorCode"] == "InsufficientInstanceCapacity"
    assert sim.scale_up_status("spot-1b")["status"] == "Backoff"
    await eventually(lambda: sim.scale_up_status("fallback-1a")["status"] == "NoActivity")

    sim.autoscaler.set_ice("spot", False)
    await eventually(lambda: not sim.autoscaler.backed_off("spot-1a", sim.autoscaler.clock()), timeout=3)
    sim.replicaset("api", 1, cpu="3000m")  # no room on the fallback node: a new node, Spot again
    await eventually(lambda: all_on(sim, "api", "spot-1a", 1))
    assert sim.scale_up_status("spot-1a")["status"] != "Backoff"


async def test_a_scale_up_of_several_nodes_fails_once_and_backs_off_once(sim: Sim) -> None:
    sim.autoscaler.set_ice("spot-1a", True)
    sim.replicaset("big", 3, cpu="3000m")  # one node each
    await eventually(lambda: bool(sim.failures))
    await asyncio.sleep(0.1)
    assert [g for g, _, _ in sim.failures] == ["spot-1a"]
    assert sim.autoscaler.backoff["spot-1a"].failures == 1
    assert not [la for la in sim.autoscaler.launches if la.group.name == "spot-1a"]
    await eventually(lambda: all_on(sim, "big", "spot-1b", 3))  # not ICE-ed: the same priority, next by name


async def test_an_empty_node_is_scaled_down_after_the_unneeded_time(sim: Sim) -> None:
    sim.replicaset("web", 1)
    await eventually(lambda: all_on(sim, "web", "spot-1a", 1))
    sim.scale("web", 0)  # the sim's ReplicaSet controller does not scale down: delete the pod too
    for pod in sim.api.list("Pod", "default"):
        sim.api.delete("Pod", pod["metadata"]["name"], "default", grace_period_seconds=1)
    await eventually(lambda: not sim.node_of("web"))
    emptied = time.monotonic()
    await eventually(lambda: sim.api.get("Node", "spot-1a-1") is None)
    assert time.monotonic() - emptied >= 0.4  # scale_down_unneeded 50 s at 1/100
    assert not [p for p in sim.api.list("Pod") if p["spec"].get("nodeName") == "spot-1a-1"]


async def test_pods_that_fit_no_group_stay_pending(sim: Sim) -> None:
    sim.replicaset("huge", 1, cpu="8000m")
    sim.replicaset("gpu", 1, nodeSelector={"node-pool": "gpu"})
    await asyncio.sleep(0.5)
    assert sim.api.list("Node") == []
    assert sim.node_of("huge") == [""] and sim.node_of("gpu") == [""]


async def test_a_selector_picks_its_group_whatever_the_priorities(sim: Sim) -> None:
    sim.replicaset("pinned", 1, nodeSelector={"node-pool": "fallback"})
    await eventually(lambda: all_on(sim, "pinned", "fallback-1a", 1))


def test_the_priority_expander_configmap_maps_priorities_to_group_regexes() -> None:
    sim = Sim()
    cm = sim.api.get("ConfigMap", PRIORITY_CONFIGMAP, "kube-system")
    assert cm is not None
    assert yaml.safe_load(cm["data"]["priorities"]) == {20: ["^spot\\-1a$", "^spot\\-1b$"], 10: ["^fallback\\-1a$"]}
    assert cm["data"]["priorities"].startswith("20:\n")


def test_expand_prefers_priority_then_name_and_unmatched_groups_last() -> None:
    priorities = parse_priorities(priorities_yaml(GROUPS))
    assert expand([FALLBACK, SPOT_B, SPOT_A], priorities) == SPOT_A
    assert expand([FALLBACK], priorities) == FALLBACK
    other = SimulatedGroup("other", "spot", "m5.large", "us-east-1a", priority=99)
    assert expand([other, FALLBACK], priorities) == FALLBACK  # `other` matches no regex
    assert expand([other], priorities) == other
    assert expand([], priorities) is None
    assert parse_priorities("not: [valid") == [] and parse_priorities("x: ['^a$']") == []


@pytest.mark.parametrize(
    ("spec", "group", "fits"),
    [
        ({}, FALLBACK, True),
        ({"nodeSelector": {"node-pool": "fallback"}}, SPOT_A, False),
        ({"nodeSelector": {"karpenter.sh/capacity-type": "spot"}}, SPOT_A, True),
        (
            {
                "affinity": {
                    "nodeAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": {
                            "nodeSelectorTerms": [
                                {"matchExpressions": [{"key": "node-pool", "operator": "Exists"}]},
                                {
                                    "matchExpressions": [
                                        {
                                            "key": "topology.kubernetes.io/zone",
                                            "operator": "In",
                                            "values": ["us-east-1b"],
                                        }
                                    ]
                                },
                            ]
                        }
                    }
                }
            },
            SPOT_A,
            False,
        ),
        (
            {
                "affinity": {
                    "nodeAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": {
                            "nodeSelectorTerms": [
                                {
                                    "matchExpressions": [
                                        {
                                            "key": "eks.amazonaws.com/capacityType",
                                            "operator": "NotIn",
                                            "values": ["SPOT"],
                                        }
                                    ]
                                }
                            ]
                        }
                    }
                }
            },
            FALLBACK,
            True,
        ),
    ],
)
def test_fits_template_reads_selectors_and_affinity(spec: dict[str, Any], group: SimulatedGroup, fits: bool) -> None:
    assert fits_template({"spec": spec}, group) is fits


def test_fits_template_needs_a_toleration_for_the_template_taints() -> None:
    tainted = SimulatedGroup(
        "gpu", "on-demand", "g5.xlarge", "us-east-1a", taints=({"key": "gpu", "effect": "NoSchedule"},)
    )
    assert not fits_template({"spec": {}}, tainted)
    assert fits_template({"spec": {"tolerations": [{"key": "gpu", "operator": "Exists"}]}}, tainted)
