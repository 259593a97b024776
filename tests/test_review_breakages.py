"""Issue 8: eight small breakages of the agent and the controller that left the suite green.

Each test here fails with its breakage and passes without it (docs/testing.md, "The eight breakages of the
review"). All run real components over sockets: the drain engine with the agent's own client and identity,
the real agent as a subprocess, or the controller's drain job, against the fake API server with realistic
termination (pods stay Terminating for their scaled grace).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog

from spotd.capacity.signals import Pool
from spotd.controller.drains import DrainDeps, DrainJob, DrainOutcome, DrainSettings, drain
from spotd.drain.executor import DrainOptions, DrainResult, drain_node
from spotd.drain.plan import PodPolicy
from spotd.kube.client import make_client
from spotd.kube.events import EventRecorder
from spotd.kube.ratelimit import RateLimiter
from spotd.sim.imds import FakeImds
from spotd.sim.kubeapi.server import FakeApiServer
from tests.agent_harness import DEPLOY, AgentProcess, agent_kubeconfig, eventually, node_obj, pdb_obj, pod_obj
from tests.test_agent import rehearsal_request
from tests.test_agent_safety import PodHistory

NODE = "ip-10-0-1-10.ec2.internal"
TAINT = "spotd.io/interruption"
log = structlog.get_logger()


@pytest.fixture
async def apis() -> AsyncIterator[list[FakeApiServer]]:
    started: list[FakeApiServer] = []
    yield started
    for server in started:
        await server.stop()


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


async def cluster(apis: list[FakeApiServer], scale: float = 0.02, **node: Any) -> FakeApiServer:
    api = FakeApiServer(termination_scale=scale)
    await api.start()
    apis.append(api)
    obj = node_obj(NODE)
    obj["spec"].update(node)
    api.create(obj)
    return api


def agent_client(api: FakeApiServer, tmp: Path) -> Any:
    """The drain engine's client as the agent has it: the node-bound ServiceAccount under deploy/ RBAC."""
    return make_client(agent_kubeconfig(api, tmp / "kubeconfig", NODE), lean=True)


def run_agent(agents: list[AgentProcess], tmp: Path, api: FakeApiServer, imds: FakeImds, *extra: str) -> AgentProcess:
    agent = AgentProcess(tmp, agent_kubeconfig(api, tmp / "kubeconfig", NODE), imds.url, NODE, *extra).start()
    agents.append(agent)
    return agent


def evictions(api: FakeApiServer, pod: str | None = None) -> list[Any]:
    return [
        r
        for r in api.requests
        if r.method == "POST" and r.path.endswith("/eviction") and (pod is None or f"/pods/{pod}/" in r.path)
    ]


def pods_on_node(api: FakeApiServer) -> list[str]:
    return sorted(p["metadata"]["name"] for p in api.list("Pod") if p["spec"].get("nodeName") == NODE)


def node(api: FakeApiServer) -> dict[str, Any]:
    found = api.get("Node", NODE)
    assert found is not None
    return found


def soon(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


async def start_drain(
    api: FakeApiServer, tmp: Path, deadline: datetime | None, stop: asyncio.Event, **options: Any
) -> asyncio.Task[DrainResult]:
    client = agent_client(api, tmp)
    work = drain_node(client, NODE, DrainOptions(**options), deadline, log=log, limiter=RateLimiter(0, 1), stop=stop)
    return asyncio.get_running_loop().create_task(work)


# (1) pods that arrive on the node during a drain are drained too (the pod watch's ADDED).
async def test_a_pod_that_arrives_during_the_drain_is_evicted(apis, tmp_path) -> None:
    api = await cluster(apis)
    api.create(pod_obj("held", NODE, labels={"app": "held"}))
    api.create(pdb_obj("held", min_available=1, app="held"))  # keeps the drain going
    stop = asyncio.Event()
    task = await start_drain(api, tmp_path, None, stop)
    await eventually(lambda: evictions(api, "held"), timeout=10)
    api.create(pod_obj("late", NODE))
    await eventually(lambda: "late" not in pods_on_node(api), timeout=10)
    stop.set()
    result = await asyncio.wait_for(task, 10)
    assert "default/late" in result.evicted


# (2) after a broken pod watch the drain lists the node's pods again: deletions meanwhile are not missed.
async def test_a_deletion_while_the_pod_watch_is_down_ends_the_drain(apis, tmp_path) -> None:
    api = await cluster(apis)
    api.create(pod_obj("slow", NODE, grace=50))  # 1 s Terminating at the scale of 0.02
    task = await start_drain(api, tmp_path, None, asyncio.Event())
    await eventually(lambda: evictions(api, "slow"), timeout=10)
    # The watch ends and its resume is held until the pod is gone, then refused: the drain's watch starts
    # again from now, and only a new list shows that the pod went meanwhile.
    api.inject_fault("GET", r"/api/v1/pods$", 410, delay=2.0, query_regex="watch")
    assert api.break_watches("Pod") == 1
    result = await asyncio.wait_for(task, 15)
    assert result.outcome == "complete"


# (7) at the cutoff, a pod still refused is deleted with what is left before the deadline, not its own grace.
async def test_the_deadline_delete_asks_for_no_more_grace_than_is_left(apis, tmp_path) -> None:
    api = await cluster(apis)
    api.create(pod_obj("held", NODE, grace=300, labels={"app": "held"}))
    api.create(pdb_obj("held", min_available=1, app="held"))
    api.load_manifests([DEPLOY, DEPLOY / "optional" / "agent-deadline-delete.yaml"])  # the operator's choice
    history = PodHistory(api)
    deadline = soon(14)
    task = await start_drain(api, tmp_path, deadline, asyncio.Event(), deadline_action="delete", safety_margin=10.0)
    await asyncio.wait_for(task, 30)
    graces = history.collect().deletion_graces("held")
    assert graces
    assert max(graces) <= 10  # the delete came at deadline - margin (14 - 10 s): at most what was left


# (8) an eviction asks for the pod's grace capped at the time left before the deadline minus the margin.
async def test_an_eviction_grace_is_capped_by_the_deadline(apis, tmp_path) -> None:
    api = await cluster(apis)
    api.create(pod_obj("long", NODE, grace=300))
    history = PodHistory(api)
    task = await start_drain(api, tmp_path, soon(30), asyncio.Event(), safety_margin=10.0)
    await eventually(lambda: history.collect().deletion_graces("long"), timeout=10)
    assert max(history.deletion_graces("long")) <= 20
    result = await asyncio.wait_for(task, 30)
    assert result.outcome == "complete"


# (3) the agent keeps to --api-qps/--api-burst: a behavioural bound on the evictions of a drain.
async def test_the_agent_never_evicts_faster_than_its_rate_limit(apis, imds, agents, tmp_path) -> None:
    api = await cluster(apis)
    for i in range(40):
        api.create(pod_obj(f"web-{i}", NODE))
    qps, burst = 5.0, 5
    agent = run_agent(agents, tmp_path, api, imds, "--api-qps", str(qps), "--api-burst", str(burst))
    await agent.ready()
    imds.set_instance_action("terminate", soon(120))
    await eventually(lambda: len(evictions(api)) >= 15, timeout=15)
    times = [r.at for r in evictions(api)]
    first = times[0]
    for count, at in enumerate(times, start=1):
        # Tokens at the first eviction are at most `burst`; one more for the server's receive jitter.
        assert count <= burst + qps * (at - first) + 1, (count, at - first)


# (4) an operator's cordon from before the notice is still there after the release.
async def test_a_cordon_from_before_the_notice_is_kept_on_release(apis, imds, agents, tmp_path) -> None:
    api = await cluster(apis, unschedulable=True)
    api.create(pod_obj("web-0", NODE))
    agent = run_agent(agents, tmp_path, api, imds)
    await agent.ready()
    rehearsal_request(api, "rehearsal-1", soon(60))
    await eventually(lambda: any(t["key"] == TAINT for t in node(api)["spec"].get("taints") or []), timeout=10)
    api.delete("ConfigMap", "rehearsal-1", "spotd")
    await eventually(lambda: agent.events("notice_released"), timeout=10)
    await eventually(lambda: "spotd.io/notice" not in (node(api)["metadata"].get("annotations") or {}), timeout=10)
    assert node(api)["spec"].get("unschedulable") is True


# (5) a changed deadline restarts the drain with it: a pod already terminating is asked again, shorter.
async def test_a_nearer_deadline_restarts_the_drain_and_shortens_a_grace(apis, imds, agents, tmp_path) -> None:
    api = await cluster(apis, scale=1.0)  # pods stay Terminating their whole grace
    api.create(pod_obj("slow", NODE, grace=60))
    history = PodHistory(api)
    agent = run_agent(agents, tmp_path, api, imds)
    await agent.ready()
    imds.set_instance_action("terminate", soon(110))
    await eventually(lambda: history.collect().deletion_graces("slow"), timeout=10)
    assert set(history.deletion_graces("slow")) == {60}  # 100 s left before the margin: its own grace
    imds.set_instance_action("terminate", soon(30))
    await eventually(lambda: min(history.collect().deletion_graces("slow")) <= 20, timeout=10)


# (6) the controller's cordon carries the resourceVersion it read: a change meanwhile makes it fail (409).
async def test_the_controller_cordon_does_not_overwrite_a_change_made_since_its_read(apis, tmp_path) -> None:
    api = await cluster(apis)
    api.create(pod_obj("web-0", NODE))
    api.load_manifests([DEPLOY])
    token = api.service_account_token("spotd", "spotd-controller")
    client = make_client(str(api.write_kubeconfig(tmp_path / "controller-kubeconfig", token=token)))
    finished: list[DrainOutcome] = []
    deps = DrainDeps(
        client=client,
        events=EventRecorder(client, "spotd-controller", "test", log),
        alerter=_NoAlerts(),
        limiter=RateLimiter(0, 1),
        clock=lambda: datetime.now(UTC),
        log=log,
        settings=DrainSettings(drain_timeout=10.0, evict_unreplicated=True),
        leading=lambda: True,
        placements=lambda _job: [],
        finished=lambda _job, outcome: finished.append(outcome),
    )
    api.inject_fault("PATCH", rf"/api/v1/nodes/{NODE}$", 0, delay=1.0)  # the cordon is held a second
    job = DrainJob(NODE, Pool("m5.large", "us-east-1a"), datetime.now(UTC), probe=False)
    task = asyncio.get_running_loop().create_task(drain(deps, job, "test"))
    await eventually(lambda: [r for r in api.requests if r.method == "PATCH" and r.path.endswith(NODE)], timeout=10)
    # Meanwhile an operator says: do not drain this node.
    changed = node(api)
    changed["metadata"].setdefault("annotations", {})["spotd.io/drain"] = "false"
    api.update(changed)
    await asyncio.wait_for(task, 15)
    assert [o.outcome for o in finished] == ["blocked"]
    assert "409" in finished[0].detail
    assert not node(api)["spec"].get("unschedulable")
    assert node(api)["metadata"]["annotations"]["spotd.io/drain"] == "false"
    assert evictions(api) == []


class _NoAlerts:
    def fire(self, alert: Any) -> None:
        pass

    def resolve(self, alertname: str, labels: dict[str, str]) -> None:
        pass


# A later review: a voluntary drain decided each pod once. A pod annotated karpenter.sh/do-not-disrupt
# (or arriving so) after the drain began was evicted anyway, or left while the drain reported "complete"
# (after which the controller may terminate the instance). Now the drain stops, "blocked", naming it.
@pytest.mark.parametrize("how", ["annotated", "arrived"])
async def test_a_pod_that_opts_out_mid_drain_stops_a_voluntary_drain(apis, tmp_path, how: str) -> None:
    api = await cluster(apis)
    api.create(pod_obj("web-0", NODE, labels={"app": "web"}))
    api.create(pdb_obj("web", min_available=1, app="web"))  # refused: the drain keeps trying
    stop = asyncio.Event()
    task = await start_drain(api, tmp_path, soon(120), stop, policy=PodPolicy(voluntary=True))
    await eventually(lambda: evictions(api, "web-0"), timeout=10)
    opted_out = {"karpenter.sh/do-not-disrupt": "true"}
    if how == "annotated":
        pod = api.get("Pod", "web-0", "default")
        assert pod is not None
        pod["metadata"].setdefault("annotations", {}).update(opted_out)
        api.update(pod)
        name = "default/web-0"
    else:
        api.create(pod_obj("batch", NODE, annotations=opted_out))
        name = "default/batch"
    result = await asyncio.wait_for(task, 10)
    assert (result.outcome, result.blocked) == ("blocked", (name,))
    assert "do-not-disrupt" in result.reason
    assert not stop.is_set()  # the caller's event is the caller's


# The review of that fix: a change missed while the pod watch was down is decided at the re-list, and a
# blocking pod found after the last evicted pod left still makes the drain "blocked", never "complete".
async def test_an_opt_out_during_a_pod_watch_outage_still_stops_the_drain(apis, tmp_path) -> None:
    api = await cluster(apis)
    api.create(pod_obj("web-0", NODE, labels={"app": "web"}))
    api.create(pdb_obj("web", min_available=1, app="web"))
    task = await start_drain(api, tmp_path, soon(60), asyncio.Event(), policy=PodPolicy(voluntary=True))
    await eventually(lambda: evictions(api, "web-0"), timeout=10)
    api.inject_fault("GET", r"/api/v1/pods$", 410, delay=1.0, query_regex="watch")  # resume refused: re-list
    assert api.break_watches("Pod") == 1
    pod = api.get("Pod", "web-0", "default")
    assert pod is not None
    pod["metadata"].setdefault("annotations", {})["karpenter.sh/do-not-disrupt"] = "true"
    api.update(pod)
    # The watch comes back from "now": the MODIFIED itself is gone, only the re-list shows it. The budget still
    # refuses meanwhile, so an eviction cannot win that race; the old code never stopped (then the budget goes
    # and the pod is evicted: "complete").
    await asyncio.wait({task}, timeout=10)
    api.delete("PodDisruptionBudget", "web", "default")
    result = await asyncio.wait_for(task, 30)
    assert (result.outcome, result.blocked) == ("blocked", ("default/web-0",))
    assert "web-0" in pods_on_node(api)


async def test_a_blocking_pod_found_after_the_last_eviction_is_still_blocked(apis, tmp_path) -> None:
    api = await cluster(apis)
    api.create(pod_obj("slow", NODE, grace=50))  # Terminating for 1 s at this scale
    task = await start_drain(api, tmp_path, soon(60), asyncio.Event(), policy=PodPolicy(voluntary=True))
    await eventually(lambda: evictions(api, "slow"), timeout=10)
    api.inject_fault("GET", r"/api/v1/pods$", 410, delay=2.0, query_regex="watch")
    assert api.break_watches("Pod") == 1
    api.create(pod_obj("batch", NODE, annotations={"karpenter.sh/do-not-disrupt": "true"}))
    result = await asyncio.wait_for(task, 30)
    assert (result.outcome, result.blocked) == ("blocked", ("default/batch",))
