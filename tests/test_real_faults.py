"""The real agent against the real control plane through a fault-injecting proxy (tests/faultproxy.py, issue
18): a node PATCH that fails, slow evictions, 429s with Retry-After, a pod watch dropped during a drain and a
node watch gone silent. The agent runs as a subprocess with a TokenRequest token bound to its DaemonSet pod (its
real identity, deploy/'s RBAC and admission policies), its kubeconfig pointing at the proxy; IMDS is the fake."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from spotd.sim import builders
from spotd.sim.imds import FakeImds
from tests.agent_harness import AgentProcess
from tests.faultproxy import BackgroundLoop, FaultProxy, Rule, start_proxy
from tests.realcluster import KWOK_ANNOTATION, RealCluster

NAMESPACE = "faults"
TAINT = "spotd.io/interruption"


@pytest.fixture(scope="module")
def loop() -> Iterator[BackgroundLoop]:
    background = BackgroundLoop()
    yield background
    background.close()


@pytest.fixture(scope="module")
def proxy(real_cluster: RealCluster, loop: BackgroundLoop) -> Iterator[FaultProxy]:
    if real_cluster.request("GET", f"/api/v1/namespaces/{NAMESPACE}")[0] == 404:
        real_cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
    fault_proxy = start_proxy(loop, real_cluster.url, real_cluster.work)
    yield fault_proxy
    loop.run(fault_proxy.stop())


class Rig:
    """One kwok Spot node, its agent (through the proxy) and its fake IMDS."""

    def __init__(self, real: RealCluster, proxy: FaultProxy, loop: BackgroundLoop, node: str, tmp: Path) -> None:
        self.real, self.proxy, self.loop, self.node, self.tmp = real, proxy, loop, node, tmp
        self.instance_id = f"i-{abs(hash(node)) % 16**17:017x}"
        self.imds = FakeImds(instance_id=self.instance_id)
        self.agents: list[AgentProcess] = []

    def start_node(self) -> None:
        # Tainted so that no other test's pod is scheduled here (the agent's DaemonSet tolerates every taint)
        taint = {"key": "faults.spotd.io/only", "value": self.node, "effect": "NoSchedule"}
        node = builders.node(self.node, builders.SPOT, instance_id=self.instance_id, taints=[taint])
        node["metadata"].setdefault("annotations", {})[KWOK_ANNOTATION] = "fake"
        status, body = self.real.request("POST", "/api/v1/nodes", node)
        assert status == 201, body
        self.real.wait_for(lambda: self._ready())
        self.loop.run(self.imds.start())

    def _ready(self) -> bool:
        status, node = self.real.request("GET", f"/api/v1/nodes/{self.node}")
        conditions = (node.get("status") or {}).get("conditions") or [] if status == 200 else []
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    def agent_token(self) -> str:
        """A TokenRequest token bound to the agent DaemonSet's pod on this node, as the kubelet projects it."""
        found: list[dict[str, Any]] = []
        query = (
            "labelSelector=app.kubernetes.io/component%3Dagent"
            f"&fieldSelector=spec.nodeName%3D{self.node},status.phase%3DRunning"
        )

        def running() -> bool:
            status, pods = self.real.request("GET", f"/api/v1/namespaces/spotd/pods?{query}")
            found[:] = pods["items"] if status == 200 else []
            return bool(found)

        self.real.wait_for(running)
        return self.real.service_account_token("spotd", "spotd-agent", bound_pod=found[0])

    def start_agent(self, *extra: str, env: dict[str, str] | None = None) -> AgentProcess:
        ca = str(self.real.ca_file)  # the proxy shows the API server's own certificate
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "proxy", "cluster": {"server": self.proxy.url, "certificate-authority": ca}}],
            "users": [{"name": "agent", "user": {"token": self.agent_token()}}],
            "contexts": [{"name": "proxy", "context": {"cluster": "proxy", "user": "agent", "namespace": "spotd"}}],
            "current-context": "proxy",
        }  # fmt: skip
        path = self.tmp / f"{self.node}.kubeconfig"
        path.write_text(json.dumps(config))
        path.chmod(0o600)
        agent = AgentProcess(self.tmp, str(path), self.imds.url, self.node, *extra, env=env).start()
        self.agents.append(agent)
        self.real.wait_for(lambda: agent.http("/readyz")[0] == 200)
        return agent

    def notice(self, seconds: float) -> datetime:
        """A Spot interruption notice for `seconds` from now; its time (the drain's deadline)."""
        when = datetime.now(UTC) + timedelta(seconds=seconds)
        self.loop.run(_call(self.imds.set_instance_action, "terminate", when))
        return when

    def pod(self, name: str, **kw: Any) -> None:
        """A bare pod bound to this node (kwok runs it, and removes it as soon as it is deleted)."""
        body = builders.pod(name, self.node, namespace=NAMESPACE, owner=None, **kw)
        status, created = self.real.request("POST", f"/api/v1/namespaces/{NAMESPACE}/pods", body)
        assert status == 201, created

    def pods(self) -> list[str]:
        status, body = self.real.request(
            "GET", f"/api/v1/namespaces/{NAMESPACE}/pods?fieldSelector=spec.nodeName%3D{self.node}"
        )
        assert status == 200, body
        return sorted(p["metadata"]["name"] for p in body["items"])

    def get_node(self) -> dict[str, Any]:
        status, body = self.real.request("GET", f"/api/v1/nodes/{self.node}")
        assert status == 200, body
        return dict(body)

    def tainted_and_cordoned(self) -> bool:
        spec = self.get_node()["spec"]
        return bool(spec.get("unschedulable")) and any(t["key"] == TAINT for t in spec.get("taints") or [])

    def drain_finished(self, agent: AgentProcess) -> dict[str, Any] | None:
        found = agent.events("drain_finished")
        return found[-1] if found else None

    def stop(self) -> None:
        for agent in self.agents:
            agent.stop(signal.SIGKILL)
        self.loop.run(self.imds.stop())
        self.real.request("DELETE", f"/api/v1/nodes/{self.node}")
        for name in self.pods():
            self.real.request("DELETE", f"/api/v1/namespaces/{NAMESPACE}/pods/{name}?gracePeriodSeconds=0")


def eviction(pod: str) -> str:
    """The path (a regex) of an eviction of `pod` (a regex) in the test namespace, with or without a query."""
    return rf"^/api/v1/namespaces/{NAMESPACE}/pods/{pod}/eviction(\?|$)"


async def _call(fn: Any, *args: Any) -> Any:
    return fn(*args)  # on the loop that owns the fake IMDS


@pytest.fixture
def rig(
    real_cluster: RealCluster, proxy: FaultProxy, loop: BackgroundLoop, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Rig]:
    proxy.rules.clear()
    short = request.node.name.removeprefix("test_").replace("_", "-")[:40].rstrip("-")
    made = Rig(real_cluster, proxy, loop, f"faults-{short}", tmp_path)
    made.start_node()
    try:
        yield made
    finally:
        proxy.rules.clear()
        made.stop()


def test_a_node_patch_failing_then_succeeding_ends_tainted_and_cordoned_before_the_deadline(rig: Rig) -> None:
    """Three 500s, then two 409s on the node's PATCH: the agent's node writer retries with back-off and the node
    ends tainted and cordoned while the notice still runs."""
    path = rf"^/api/v1/nodes/{rig.node}(\?|$)"
    errors = rig.proxy.add(Rule("PATCH", path, status=500, times=3))
    conflicts = rig.proxy.add(Rule("PATCH", path, status=409, times=2))
    agent = rig.start_agent()
    deadline = rig.notice(90)
    rig.real.wait_for(rig.tainted_and_cordoned, timeout=(deadline - datetime.now(UTC)).total_seconds())
    assert (errors.applied, conflicts.applied) == (3, 2)
    assert datetime.now(UTC) < deadline
    assert agent.events("node_patch_failed"), "the 500s were said"
    assert agent.proc is not None and agent.proc.poll() is None


def test_slow_evictions_keep_to_the_deadline(rig: Rig) -> None:
    """Every eviction answered 4 s late: the pods still go and the drain completes. One pod's evictions are
    held past the client's read timeout (never answered): the drain gives up on it at the deadline, not later,
    and names it."""
    for i in range(3):
        rig.pod(f"slow-{i}", grace=5)
    rig.pod("stuck", grace=5)
    stuck = rig.proxy.add(Rule("POST", eviction("stuck"), hold=True))
    slow = rig.proxy.add(Rule("POST", eviction(r"slow-\d"), delay=4))
    agent = rig.start_agent()
    deadline = rig.notice(40)
    rig.real.wait_for(lambda: rig.drain_finished(agent), timeout=(deadline - datetime.now(UTC)).total_seconds() + 60)
    finished = rig.drain_finished(agent)
    assert finished is not None
    assert (finished["outcome"], finished["left"]) == ("incomplete", [f"{NAMESPACE}/stuck"]), finished
    assert finished["evicted"] == 3
    assert rig.pods() == ["stuck"]
    assert slow.applied == 3
    assert stuck.seen >= 2, "the held eviction timed out and was asked again"
    # At the deadline: the drain's own clock said so (the deadline is the notice's time, counted on the monotonic
    # clock); a drain that waited on its unanswered eviction would have gone on past it.
    finished_at = datetime.fromisoformat(finished["timestamp"])
    assert finished_at < deadline + timedelta(seconds=30), (finished_at, deadline)
    rig.loop.run(rig.proxy.release(stuck))


def test_429s_on_evictions_honour_retry_after(rig: Rig) -> None:
    """Three 429s with Retry-After: 2 on one pod's eviction: the agent asks again no sooner than the server
    said, four times in all, and the drain completes."""
    rig.pod("throttled", grace=5)
    throttled = rig.proxy.add(Rule("POST", eviction("throttled"), status=429, retry_after=2, times=3))
    agent = rig.start_agent()
    rig.notice(90)
    rig.real.wait_for(lambda: rig.drain_finished(agent))
    finished = rig.drain_finished(agent)
    assert finished is not None and finished["outcome"] == "complete", finished
    assert (throttled.seen, throttled.applied) == (4, 3)
    gaps = [b - a for a, b in zip(throttled.stamps, throttled.stamps[1:], strict=False)]
    assert all(gap >= 1.95 for gap in gaps), gaps


def test_a_pod_deleted_while_the_pod_watch_was_down_ends_the_drain(rig: Rig) -> None:
    """The drain's pod watch is cut while one pod's eviction is throttled; its next watch is held at the proxy
    until the pod, evicted meanwhile, is gone. The drain resumes from its re-list's resourceVersion (4668c3c),
    so the deletion still comes as DELETED and the drain ends complete, not at its deadline with the pod
    named as left."""
    rig.pod("quick", grace=5)
    rig.pod("late", grace=5)
    watches = rig.proxy.add(Rule("GET", r"^/api/v1/pods\?.*watch=true"))
    throttle = rig.proxy.add(Rule("POST", eviction("late"), status=429, retry_after=1))
    agent = rig.start_agent()
    rig.notice(60)
    rig.real.wait_for(lambda: rig.pods() == ["late"] and throttle.applied >= 1 and watches.streams)
    held = Rule("GET", r"^/api/v1/pods\?.*watch=true", hold=True, times=1)
    rig.proxy.rules.insert(0, held)
    assert rig.loop.run(rig.proxy.drop_now(watches)) == 1
    rig.real.wait_for(lambda: held.applied == 1)  # re-listed; the new watch waits at the proxy
    rig.proxy.remove(throttle)
    rig.real.wait_for(lambda: rig.pods() == [])  # evicted, and gone at the server, while the watch was down
    assert not agent.events("drain_finished")
    rig.loop.run(rig.proxy.release(held))
    rig.real.wait_for(lambda: rig.drain_finished(agent), timeout=120)
    finished = rig.drain_finished(agent)
    assert finished is not None
    assert (finished["outcome"], finished["left"]) == ("complete", []), finished
    assert agent.events("watch_failed")


def test_a_silent_node_watch_is_noticed_and_started_again(rig: Rig) -> None:
    """The agent's watch of its Node goes half-open: the proxy forwards its first event (ADDED), then nothing,
    and keeps the connection, as a dead load balancer or a frozen proxy would. The agent asks the server to
    end each watch after --watch-timeout (4 s here) and gives up on a watch silent for longer: the watch starts
    again, and an operator's uncordon during the notice is seen and undone. Before (lightkube's watches have no
    read timeout, spotd asked for no timeoutSeconds) the agent waited on the silent connection for ever, its
    view of the node stale, and the uncordoned node stayed uncordoned."""
    silent = rig.proxy.add(Rule("GET", r"^/api/v1/nodes\?.*watch=true", silent_after_lines=1, times=1))
    # by its environment variable, as a DaemonSet sets it (and so that an agent without the flag still starts)
    agent = rig.start_agent(env={"SPOTD_WATCH_TIMEOUT": "4s"})
    assert silent.applied == 1
    rig.notice(120)
    rig.real.wait_for(rig.tainted_and_cordoned)
    status, body = rig.real.request(
        "PATCH",
        f"/api/v1/nodes/{rig.node}",
        {"spec": {"unschedulable": None}},
        content_type="application/merge-patch+json",
    )
    assert status == 200, body
    rig.real.wait_for(rig.tainted_and_cordoned)
    failed = [e for e in agent.events("watch_failed") if e.get("watch") == "node"]
    assert failed and "ReadTimeout" in failed[0]["error"], failed
    assert silent.seen >= 2, "the node watch was started again"
