"""Agent-down coverage (issue 19): a queue notice that the node's agent does not acknowledge within
--agent-ack-timeout is drained by the controller itself, with the drain engine (evictions only, PDBs
honoured, the deadline); an agent that acknowledges, in time or later, is left the work, so no pod is
evicted by both.

The controller's parts run in process as the controller wires them (inventory, witness, takeovers), against
the fake API server under deploy/'s RBAC with the controller's ServiceAccount token; the agent is the real
process against the fake IMDS, stopped for the agent-down case.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from spotd.common import log as spotd_log
from spotd.common.parsing import format_time
from spotd.controller.takeover import Takeovers, TakeoverSettings, acknowledges, takeover_deadline
from spotd.controller.witness import Witness
from spotd.inventory.cache import Inventory
from spotd.kube.client import make_client
from spotd.kube.events import EventRecorder
from spotd.notices.queue_events import InstanceEvent, read_instance_event
from spotd.sim.imds import FakeImds
from spotd.sim.kubeapi.server import FakeApiServer
from tests.agent_harness import DEPLOY, AgentProcess, agent_kubeconfig, eventually, node_obj, pdb_obj, pod_obj
from tests.test_capacity_aws import sample
from tests.test_controller import replicaset, running
from tests.test_queue_events import lifecycle, spot_itn, state_change

NODE = "ip-10-0-1-10.ec2.internal"
IID = "i-0aaaaaaaaaaaaaaa1"
TAINT = "spotd.io/interruption"


# --- pure -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "agent, kind, expected",
    [
        ("", "spot-itn", False),
        ("spot-itn", "spot-itn", True),
        ("rebalance", "spot-itn", False),
        ("asg-termination", "asg-termination", True),
        ("spot-itn", "asg-termination", False),
        ("spot-itn", "state-change", True),
        ("asg-termination", "state-change", True),
        ("scheduled-maintenance", "state-change", False),
    ],
)
def test_what_acknowledges_a_queue_notice(agent: str, kind: str, expected: bool) -> None:
    assert acknowledges(agent, kind) is expected


def test_the_takeover_deadline() -> None:
    now = datetime(2026, 12, 5, 10, 0, 30, tzinfo=UTC)
    window = timedelta(minutes=2)
    spot = read_instance_event(json.dumps(spot_itn()))
    assert spot is not None and takeover_deadline(spot, now, window) == spot.at + timedelta(minutes=2)
    gone = read_instance_event(json.dumps(state_change("shutting-down")))
    assert gone is not None and takeover_deadline(gone, now, window) == gone.at  # due now: grace 1 s
    hook = read_instance_event(json.dumps(lifecycle("terminate")))
    assert hook is not None and takeover_deadline(hook, now, window) == now + window  # the hook carries none


# --- against the fake cluster ---------------------------------------------------------------------------


class Rig:
    """The controller's second-witness parts, wired as spotd.controller.main wires them."""

    def __init__(self, api: FakeApiServer, client: Any, ack_timeout: float, dry_run: bool = False) -> None:
        self.api = api
        self.tasks: set[asyncio.Task[None]] = set()
        log = spotd_log.get("test.controller")
        # dry_run: the takeovers and the witness only; the Events are written (in the controller they are
        # logged as would_record_event) so that a test reads what they would say
        events = self.events = EventRecorder(client, "spotd-controller", "test", log)
        self.takeovers: Takeovers
        self.inventory = Inventory.from_client(client, on_node=lambda _o, _n: self.takeovers.notify())

        def agent_kind(name: str) -> str:
            extra = self.inventory.node_extra.get(name)
            return extra.notice_kind if extra else ""

        self.takeovers = Takeovers(
            client,
            events,
            log,
            lambda: datetime.now(UTC),
            agent_kind,
            TakeoverSettings(ack_timeout=ack_timeout, dry_run=dry_run),
        )
        self.witness = Witness(
            self.inventory.node_of_instance,
            lambda: self.inventory.synced,
            log,
            client=client,
            events=events,
            clock=lambda: datetime.now(UTC),
            dry_run=dry_run,
            on_matched=lambda node, event: self.takeovers.consider(self.spawn, node.name, event),
        )

    def spawn(self, coro: Any) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        return task

    async def deliver(self, event: dict[str, Any]) -> InstanceEvent:
        event["time"] = format_time(datetime.now(UTC))
        event["detail"]["instance-id" if "instance-id" in event["detail"] else "EC2InstanceId"] = IID
        parsed = read_instance_event(json.dumps(event))
        assert parsed is not None
        assert await self.witness.on_event(parsed) == "handled"
        return parsed

    async def finished(self) -> None:
        await asyncio.gather(*self.tasks)
        await self.events.flush()


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[FakeApiServer]:
    server = FakeApiServer(host="127.0.0.1", port=0, termination_scale=0.02)
    await server.start()
    server.load_manifests([DEPLOY])
    server.write_kubeconfig(tmp_path / "kubeconfig", token=server.service_account_token("spotd", "spotd-controller"))
    yield server
    await server.stop()


@contextlib.asynccontextmanager
async def controller_parts(
    api: FakeApiServer, tmp_path: Path, ack_timeout: float, dry_run: bool = False
) -> AsyncIterator[Rig]:
    client = make_client(str(tmp_path / "kubeconfig"))
    rig = Rig(api, client, ack_timeout, dry_run)
    inventory = asyncio.create_task(rig.inventory.run())
    try:
        await rig.inventory.wait_synced()
        yield rig
    finally:
        for task in (*rig.tasks, inventory):
            task.cancel()
        await asyncio.gather(*rig.tasks, inventory, return_exceptions=True)
        await client.close()


def populate(api: FakeApiServer, web: int = 4) -> None:
    api.create(node_obj(NODE, "spot", instance_id=IID))
    for i in range(web):
        api.create(pod_obj(f"web-{i}", NODE, labels={"app": "web"}, grace=1))
    api.create(pod_obj("logs-agent", NODE, owner="DaemonSet", labels={"app": "logs"}))


def pods_on_node(api: FakeApiServer) -> list[str]:
    return sorted(p["metadata"]["name"] for p in api.list("Pod") if p["spec"].get("nodeName") == NODE)


def evictions(api: FakeApiServer) -> Counter[str]:
    return Counter(r.path.split("/")[-2] for r in api.requests if r.method == "POST" and r.path.endswith("/eviction"))


def node_events(api: FakeApiServer) -> list[str]:
    return [e["reason"] for e in api.list("Event") if e.get("involvedObject", {}).get("name") == NODE]


def start_agent(tmp_path: Path, api: FakeApiServer, imds: FakeImds) -> AgentProcess:
    return AgentProcess(tmp_path, agent_kubeconfig(api, tmp_path / "agent.kubeconfig", NODE), imds.url, NODE).start()


async def test_agent_stopped_the_controller_drains_before_the_deadline_pdb_honoured(
    api: FakeApiServer, tmp_path: Path
) -> None:
    populate(api)
    api.create(pdb_obj("web", min_available=5))  # of six, one may go at a time: refusals until replaced
    api.create(pod_obj("web-elsewhere-0", "other", labels={"app": "web"}))
    api.create(pod_obj("web-elsewhere-1", "other", labels={"app": "web"}))
    imds = FakeImds()
    await imds.start()
    agent = start_agent(tmp_path, api, imds)
    try:
        await agent.ready()
    finally:
        agent.stop(signal.SIGKILL)  # the agent is down: nobody hears IMDS on this node
        await imds.stop()
    taken = sample("spotd_controller_takeovers_total", {"outcome": "complete"})
    cordon = {"kind": "spot-itn", "actor": "controller"}
    cordons = sample("spotd_notice_to_cordon_seconds_count", cordon)
    async with controller_parts(api, tmp_path, ack_timeout=0.5) as rig, running(replicaset(api, "other")):
        event = await rig.deliver(spot_itn())
        await rig.finished()
        assert event.deadline is not None
        stored = api.get("Node", NODE)
        assert stored["spec"]["unschedulable"] is True
        assert {"key": TAINT, "value": "spot-itn", "effect": "NoSchedule"} in stored["spec"]["taints"]
        assert pods_on_node(api) == ["logs-agent"]
        assert sample("spotd_controller_takeovers_total", {"outcome": "complete"}) == taken + 1
        assert sample("spotd_notice_to_cordon_seconds_count", cordon) == cordons + 1
        assert {"SpotdAgentSilent", "SpotdTakeoverComplete"} <= set(node_events(api))
        # evictions only, through the PDB (refusals retried), never a delete
        assert not [r for r in api.requests if r.method == "DELETE" and "/pods/" in r.path]
        assert set(evictions(api)) == {f"web-{i}" for i in range(4)}
        assert sum(evictions(api).values()) > 4  # the PDB refused some: retried, not forced


async def test_agent_running_the_node_is_drained_once_not_twice(api: FakeApiServer, tmp_path: Path) -> None:
    populate(api)
    imds = FakeImds()
    await imds.start()
    agent = start_agent(tmp_path, api, imds)
    acknowledged = sample("spotd_controller_takeovers_total", {"outcome": "acknowledged"})
    try:
        await agent.ready()
        async with controller_parts(api, tmp_path, ack_timeout=30) as rig:
            # the queue is the faster witness; the agent hears IMDS a moment later and acknowledges
            event = await rig.deliver(spot_itn())
            assert event.deadline is not None
            imds.set_instance_action("terminate", event.deadline)
            await rig.finished()
            assert sample("spotd_controller_takeovers_total", {"outcome": "acknowledged"}) == acknowledged + 1
            await eventually(lambda: pods_on_node(api) == ["logs-agent"], timeout=15)
        assert evictions(api) == {f"web-{i}": 1 for i in range(4)}  # the agent's, once each
        assert "SpotdAgentSilent" not in node_events(api)
        labels = {"kind": "spot-itn", "witness": "imds", "order": "second"}
        assert agent.metric("spotd_episode_sightings_total", **labels) == 1
    finally:
        agent.stop(signal.SIGKILL)
        await imds.stop()


async def test_a_lost_lease_in_the_turn_of_a_node_change_stops_the_takeover() -> None:
    """The leader's task group is cancelled (lease lost) in the same turn as an inventory change wakes the
    takeover waiting for the agent: the takeover must end, not go on to taint, cordon and drain as a non-leader
    (asyncio.wait_for on Python 3.11 returned normally then; helper review of issue 21, proved with this)."""
    from datetime import UTC, datetime, timedelta

    import structlog

    from spotd.controller.takeover import Takeovers, TakeoverSettings
    from spotd.notices.queue_events import SPOT_ITN, InstanceEvent

    acts: list[tuple[str, str]] = []

    class Recorder:
        def record(self, node: str, reason: str, *a: object, **k: object) -> None:
            acts.append(("Event", reason))

    class RefusingClient:  # the Kubernetes client of a replica that no longer leads: any call is a finding
        def __getattr__(self, name: str) -> object:
            acts.append(("API", name))
            raise RuntimeError("API call by a non-leader")

    now = datetime.now(UTC)
    takeovers = Takeovers(
        RefusingClient(),  # type: ignore[arg-type]
        Recorder(),  # type: ignore[arg-type]
        structlog.get_logger(),
        lambda: datetime.now(UTC),
        lambda node: "",
        TakeoverSettings(ack_timeout=0.3, ack_poll=10),
    )
    event = InstanceEvent(SPOT_ITN, ("i-1",), now, deadline=now + timedelta(minutes=2), action="terminate")

    async def lead() -> None:
        async with asyncio.TaskGroup() as group:
            takeovers.consider(group.create_task, "n1", event)
            await asyncio.Event().wait()

    work = asyncio.create_task(lead())
    await asyncio.sleep(0.05)
    takeovers.notify()
    work.cancel()
    done, _ = await asyncio.wait({work}, timeout=5)
    assert done and work.cancelled()
    await asyncio.sleep(0.5)  # past the acknowledgement timeout: nothing may follow
    assert acts == []
