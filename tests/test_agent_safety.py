"""Issue 10: spotd never does more harm than the event it reacts to.

The real agent, as a subprocess, against the fake API server with realistic termination (pods stay
Terminating until their scaled grace ends) and the fake IMDS. Every test here failed on the code before
the fix: see the report of the change for how each was seen failing.
"""

from __future__ import annotations

import json
import signal
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from spotd.sim.imds import FakeImds
from spotd.sim.kubeapi.server import FakeApiServer
from spotd.sim.kubeapi.store import Subscription
from tests.agent_harness import AgentProcess, agent_kubeconfig, eventually, node_obj, pdb_obj, pod_obj
from tests.test_agent import maintenance_event, rehearsal_request

NODE = "ip-10-0-1-10.ec2.internal"
TAINT = "spotd.io/interruption"


@pytest.fixture
async def imds() -> AsyncIterator[FakeImds]:
    fake = FakeImds()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
def agents() -> Iterator[list[AgentProcess]]:
    started: list[AgentProcess] = []
    yield started
    for agent in started:
        agent.stop(signal.SIGKILL)


async def start_api(scale: float) -> FakeApiServer:
    server = FakeApiServer(termination_scale=scale)
    await server.start()
    return server


@pytest.fixture
async def apis() -> AsyncIterator[list[FakeApiServer]]:
    started: list[FakeApiServer] = []
    yield started
    for server in started:
        await server.stop()


async def cluster(apis: list[FakeApiServer], scale: float, tmp: Path) -> tuple[FakeApiServer, str]:
    api = await start_api(scale)
    apis.append(api)
    api.create(node_obj(NODE))
    api.create(pod_obj("logs-agent", NODE, owner="DaemonSet", labels={"app": "logs"}))
    return api, agent_kubeconfig(api, tmp / "kubeconfig", NODE)


def run_agent(agents: list[AgentProcess], tmp: Path, kubeconfig: str, imds: FakeImds, *extra: str) -> AgentProcess:
    agent = AgentProcess(tmp, kubeconfig, imds.url, NODE, *extra).start()
    agents.append(agent)
    return agent


def pods_on_node(api: FakeApiServer) -> list[str]:
    return sorted(p["metadata"]["name"] for p in api.list("Pod") if p["spec"].get("nodeName") == NODE)


def node_events(api: FakeApiServer, reason: str) -> list[dict[str, Any]]:
    return [e for e in api.list("Event") if e["reason"] == reason and e["involvedObject"].get("name") == NODE]


def our_taint(api: FakeApiServer) -> dict[str, Any] | None:
    found = api.get("Node", NODE)
    assert found is not None
    return next((t for t in found["spec"].get("taints") or [] if t["key"] == TAINT), None)


def pod_deletes(api: FakeApiServer) -> list[Any]:
    return [r for r in api.requests if r.method == "DELETE" and "/pods/" in r.path]


def evictions(api: FakeApiServer) -> list[Any]:
    return [r for r in api.requests if r.method == "POST" and r.path.endswith("/eviction")]


class PodHistory:
    """Every version of every pod the API server stored, from a subscription to its store."""

    def __init__(self, api: FakeApiServer) -> None:
        self.sub: Subscription = api.subscribe()
        self.versions: dict[str, list[tuple[str, dict[str, Any]]]] = {}

    def collect(self) -> PodHistory:
        for event, obj in self.sub.pending():
            if obj.get("kind") == "Pod":
                self.versions.setdefault(obj["metadata"]["name"], []).append((event, obj))
        return self

    def deletion_graces(self, name: str) -> list[int]:
        return [
            int(o["metadata"]["deletionGracePeriodSeconds"])
            for _, o in self.versions.get(name, [])
            if o["metadata"].get("deletionTimestamp")
        ]

    def deletion_ends(self, name: str) -> list[datetime]:
        return [
            datetime.fromisoformat(o["metadata"]["deletionTimestamp"].replace("Z", "+00:00"))
            for _, o in self.versions.get(name, [])
            if o["metadata"].get("deletionTimestamp")
        ]

    def removed_without_grace(self) -> list[str]:
        """Running pods removed without a graceful deletion first (no deletionTimestamp): grace-0 deletes."""
        return [
            name
            for name, versions in self.versions.items()
            for event, obj in versions
            if event == "DELETED"
            and obj.get("status", {}).get("phase") == "Running"
            and not obj["metadata"].get("deletionTimestamp")
        ]


async def test_agent_started_inside_an_open_maintenance_window_evicts_what_pdbs_allow_and_deletes_nothing(
    apis, imds, agents, tmp_path
) -> None:
    api, kubeconfig = await cluster(apis, 0.05, tmp_path)
    for i in range(4):
        api.create(pod_obj(f"web-{i}", NODE))
    api.create(pdb_obj("web", min_available=2))  # two of the four may go; nothing replaces them here
    history = PodHistory(api)
    # The window opened ten minutes ago: any agent start or restart inside it.
    imds.set_scheduled_events([maintenance_event("active", datetime.now(UTC) - timedelta(minutes=10))])
    agent = run_agent(agents, tmp_path, kubeconfig, imds, "--safety-margin", "0s")
    await agent.ready()

    await eventually(lambda: len([p for p in pods_on_node(api) if p.startswith("web-")]) == 2, timeout=15)
    # The other two stay refused, and are asked again and again (until the event ends), never deleted.
    await eventually(lambda: (agent.metric("spotd_evictions_total", outcome="pdb_blocked") or 0) >= 10, timeout=15)
    await eventually(lambda: node_events(api, "DrainIncomplete"), timeout=10)  # pods left past NotBefore: said
    await eventually(lambda: agent.metric("spotd_drain_pods_left") == 2, timeout=5)  # follows pods out
    history.collect()
    assert pod_deletes(api) == []
    assert history.removed_without_grace() == []
    survivors = [p for p in pods_on_node(api) if p.startswith("web-")]
    assert all(history.deletion_graces(p) == [] for p in survivors)  # never even marked for deletion
    gone = [f"web-{i}" for i in range(4) if f"web-{i}" not in survivors]
    assert all(history.deletion_graces(p) and min(history.deletion_graces(p)) >= 1 for p in gone)
    assert agent.metric("spotd_evictions_total", outcome="forced") is None


async def test_with_node_patches_failing_evictions_start_within_one_poll_and_the_node_empties(
    apis, imds, agents, tmp_path
) -> None:
    api, kubeconfig = await cluster(apis, 0.05, tmp_path)
    for i in range(5):
        api.create(pod_obj(f"web-{i}", NODE))
    # Every node PATCH answers 500: admission webhook down, API server trouble.
    api.inject_fault("PATCH", r"^/api/v1/nodes/", 500, times=1_000_000)
    agent = run_agent(agents, tmp_path, kubeconfig, imds)
    await agent.ready()
    polls_at_first_eviction: list[int] = []

    def hook(ch: Any) -> None:  # the polls counted at the instant the API server commits the first eviction
        if not polls_at_first_eviction and ch.kind == "Pod" and ch.obj["metadata"].get("deletionTimestamp"):
            polls_at_first_eviction.append(imds.count(path="spot/instance-action"))

    api.store.hooks.append(hook)
    polls_before = imds.count(path="spot/instance-action")
    imds.set_instance_action("terminate", datetime.now(UTC) + timedelta(seconds=20))

    await eventually(lambda: polls_at_first_eviction, timeout=10)
    # Seen on the next poll, evicted in that same cycle (one more poll allowed: one may start meanwhile).
    assert polls_at_first_eviction[0] - polls_before <= 3, polls_at_first_eviction
    await eventually(lambda: pods_on_node(api) == ["logs-agent"], timeout=15)
    assert our_taint(api) is None  # the patches really failed throughout
    await eventually(lambda: node_events(api, "NodePatchFailed"), timeout=5)
    assert (agent.metric("spotd_node_actions_total", action="notice", outcome="error") or 0) >= 1
    assert len(node_events(api, "NodePatchFailed")) == 1  # said once, retried quietly


async def test_the_node_annotation_changes_nothing_and_a_past_rehearsal_is_refused(
    apis, imds, agents, tmp_path
) -> None:
    api, kubeconfig = await cluster(apis, 0.05, tmp_path)
    for i in range(3):
        api.create(pod_obj(f"web-{i}", NODE))
    agent = run_agent(agents, tmp_path, kubeconfig, imds)
    await agent.ready()
    past = (datetime.now(UTC) - timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    n = api.get("Node", NODE)
    assert n is not None
    n["metadata"].setdefault("annotations", {})["spotd.io/simulate-reclaim"] = json.dumps(
        {"kind": "spot-itn", "deadline": past}
    )
    api.update(n)
    polls = imds.count(path="spot/instance-action")
    await eventually(lambda: imds.count(path="spot/instance-action") >= polls + 5, timeout=10)
    assert pods_on_node(api) == ["logs-agent", "web-0", "web-1", "web-2"]
    assert our_taint(api) is None
    await eventually(lambda: node_events(api, "SimulationAnnotationIgnored"), timeout=10)

    rehearsal_request(api, "rehearsal-past", datetime.now(UTC) - timedelta(seconds=30))
    refused = await eventually(lambda: node_events(api, "RehearsalRefused"), timeout=10)
    assert "in the past" in refused[0]["message"] and "spotd/rehearsal-past" in refused[0]["message"]
    polls = imds.count(path="spot/instance-action")
    await eventually(lambda: imds.count(path="spot/instance-action") >= polls + 5, timeout=10)
    assert pods_on_node(api) == ["logs-agent", "web-0", "web-1", "web-2"]
    assert evictions(api) == [] and pod_deletes(api) == []
    assert our_taint(api) is None
    assert len(node_events(api, "SimulationAnnotationIgnored")) == 1
    assert agent.metric("spotd_notices_total", kind="spot-itn", source="simulation") is None


async def test_long_graces_end_before_the_deadline_terminating_pods_included(apis, imds, agents, tmp_path) -> None:
    # 600 s of grace is 120 s here; the notice's 60 s are real seconds.
    api, kubeconfig = await cluster(apis, 0.2, tmp_path)
    stop_all = {"sim.spotd.io/stop-seconds": "600"}  # each pod uses all the grace it is given
    api.create(pod_obj("slow", NODE, grace=600, annotations=stop_all))
    api.create(pod_obj("going", NODE, grace=600, annotations=stop_all))
    history = PodHistory(api)
    api.delete("Pod", "going", "default", grace_period_seconds=600)  # already terminating, 600 s of grace
    agent = run_agent(agents, tmp_path, kubeconfig, imds)
    await agent.ready()
    deadline = (datetime.now(UTC) + timedelta(seconds=60)).replace(microsecond=0)
    imds.set_instance_action("terminate", deadline)

    await eventually(lambda: pods_on_node(api) == ["logs-agent"], timeout=30)
    assert datetime.now(UTC) < deadline
    history.collect()
    # Both were asked to stop with a grace that ends before the deadline (minus the 10 s margin).
    for name in ("slow", "going"):
        assert min(history.deletion_graces(name)) <= 50, name
        assert min(history.deletion_ends(name)) <= deadline - timedelta(seconds=10), name
    assert max(history.deletion_graces("going")) == 600  # it was terminating with its own grace first
    assert pod_deletes(api) == []
    assert len([r for r in evictions(api) if "/pods/going/" in r.path]) == 1
    # The drain ends once it has seen the last pod go (its watch), a moment after the API server did.
    await eventually(lambda: agent.metric("spotd_drains_total", outcome="complete") == 1, timeout=10)


async def test_a_forged_first_sighting_on_the_node_cannot_delay_a_confirmed_spot_itn(
    apis, imds, agents, tmp_path
) -> None:
    # The notice annotation is anyone's who may patch the Node: once IMDS confirms the notice, only what
    # makes the agent act sooner is kept from it (a first sighting a day ahead delayed the drain past the
    # real deadline).
    api, kubeconfig = await cluster(apis, 0.05, tmp_path)
    api.create(pod_obj("web-0", NODE))
    time = (datetime.now(UTC) + timedelta(seconds=20)).replace(microsecond=0)
    imds.set_instance_action("terminate", time)
    far = (time + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    forged = {"kind": "spot-itn", "source": "imds", "seen_at": far, "absent_before": far, "action": "terminate"}
    forged["deadline"] = time.strftime("%Y-%m-%dT%H:%M:%SZ")
    node = api.get("Node", NODE)
    assert node is not None
    node["metadata"].setdefault("annotations", {})["spotd.io/notice"] = json.dumps(forged)
    api.update(node)
    agent = run_agent(agents, tmp_path, kubeconfig, imds)
    await agent.ready()
    await eventually(lambda: evictions(api), timeout=15)
    assert datetime.now(UTC) < time
    # the cordon is written by its own task, not ordered with the evictions (they go on even if it fails)
    await eventually(lambda: (api.get("Node", NODE) or {})["spec"].get("unschedulable") is True, timeout=5)


async def test_a_maintenance_ahead_does_not_hide_a_rebalance_recommendation(apis, imds, agents, tmp_path) -> None:
    api, kubeconfig = await cluster(apis, 0.05, tmp_path)
    api.create(pod_obj("web-0", NODE))
    imds.set_scheduled_events([maintenance_event("active", datetime.now(UTC) + timedelta(hours=3))])
    imds.set_rebalance(datetime.now(UTC))
    agent = run_agent(agents, tmp_path, kubeconfig, imds)
    await agent.ready()
    await eventually(lambda: our_taint(api), timeout=10)
    assert our_taint(api) == {"key": TAINT, "value": "rebalance", "effect": "PreferNoSchedule"}
    assert agent.events("notice_scheduled")  # the maintenance waits for its lead time, and says so
    assert pods_on_node(api) == ["logs-agent", "web-0"]


async def test_a_rehearsal_withdrawn_while_the_watch_was_down_is_released(apis, imds, agents, tmp_path) -> None:
    """The request watch breaks and its resume fails: what happened meanwhile comes from a re-list."""
    api, kubeconfig = await cluster(apis, 0.05, tmp_path)
    api.create(pod_obj("web-0", NODE))
    agent = run_agent(agents, tmp_path, kubeconfig, imds)
    await agent.ready()
    rehearsal_request(api, "drill", datetime.now(UTC) + timedelta(minutes=5))
    await eventually(lambda: our_taint(api) is not None, timeout=10)
    api.inject_fault("GET", r"/namespaces/spotd/configmaps$", 500, query_regex=r"watch=(true|1)", delay=1.0)
    assert api.break_watches("ConfigMap") == 1
    api.delete("ConfigMap", "drill", "spotd")  # while no watch is open: only a re-list can tell
    await eventually(lambda: our_taint(api) is None, timeout=15)
    assert agent.events("watch_failed")


async def test_malformed_and_far_rehearsal_requests_are_refused(apis, imds, agents, tmp_path) -> None:
    api, kubeconfig = await cluster(apis, 0.05, tmp_path)
    api.create(pod_obj("web-0", NODE))
    agent = run_agent(agents, tmp_path, kubeconfig, imds)
    await agent.ready()
    rehearsal_request(api, "too-far", datetime.now(UTC) + timedelta(hours=1))
    rehearsal_request(api, "nonsense", datetime.now(UTC) + timedelta(minutes=2), kind="explode")
    await eventually(lambda: len(node_events(api, "RehearsalRefused")) == 2, timeout=10)
    messages = sorted(e["message"] for e in node_events(api, "RehearsalRefused"))
    assert "more than 15 minutes ahead" in messages[1] and "unknown kind" in messages[0]
    assert agent.metric("spotd_notices_malformed_total", source="rehearsal") == 2
    assert our_taint(api) is None and evictions(api) == []


async def test_a_forged_notice_annotation_is_dropped_once_imds_answers_without_it(apis, imds, agents, tmp_path) -> None:
    """Anyone who may patch a Node can write spotd.io/notice; a restarted agent acts on it only until IMDS says
    otherwise, and a late deadline never means more than an eviction (PDBs honoured)."""
    api, kubeconfig = await cluster(apis, 0.05, tmp_path)
    api.create(pod_obj("web-0", NODE))
    n = api.get("Node", NODE)
    assert n is not None
    past = (datetime.now(UTC) - timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
    forged = {"kind": "spot-itn", "source": "imds", "seen_at": past, "deadline": past, "action": "terminate"}
    n["metadata"].setdefault("annotations", {})["spotd.io/notice"] = json.dumps(forged)
    api.update(n)
    agent = run_agent(agents, tmp_path, kubeconfig, imds)
    await agent.ready()
    await eventually(lambda: agent.events("notice_released"), timeout=10)
    assert "not in IMDS" in agent.events("notice_released")[0]["reason"]
    assert pods_on_node(api) == ["logs-agent", "web-0"]
    assert evictions(api) == [] and pod_deletes(api) == []
