"""The controller as the second witness (issue 19): instance events from the queue, through moto's SQS
(IAM enforced, deploy/iam-policy.json), matched to nodes by spec.providerID through the inventory's index.

A foreign instance's event (another cluster on the same queue) and a malformed one are logged, counted and
acknowledged; the loop goes on.
"""

from __future__ import annotations

import json
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from spotd.alerts.flags import AlertConfig
from spotd.alerts.sender import Alerter
from spotd.capacity.signals import CapacitySignal
from spotd.capacity.sources.sqs import SqsSource
from spotd.common import log as spotd_log
from spotd.common.parsing import format_time
from spotd.controller.witness import Witness
from spotd.inventory.cache import Inventory
from spotd.kube.client import make_client
from spotd.kube.events import EventRecorder
from spotd.kube.keys import NOTICE_ANNOTATION, QUEUE_NOTICE_ANNOTATION
from spotd.notices.queue_events import InstanceEvent, read_instance_event
from spotd.notices.record import Notice, NoticeKind
from spotd.sim import builders
from spotd.sim.imds import FakeImds
from spotd.sim.kubeapi.server import FakeApiServer
from tests.agent_harness import DEPLOY, AgentProcess, agent_kubeconfig, eventually
from tests.moto_server import EVENTS_QUEUE, MotoAws, aws, moto_endpoint  # noqa: F401  (pytest fixtures)
from tests.test_capacity_aws import queue_depth, sample, send
from tests.test_inventory import node, raw
from tests.test_queue_events import health, lifecycle, rebalance, spot_itn

OURS = "i-0aaaaaaaaaaaaaaa1"
THEIRS = "i-0bbbbbbbbbbbbbbb2"


@pytest.fixture
def queue(aws: MotoAws) -> str:  # noqa: F811
    sqs = aws.client("sqs")
    return str(sqs.create_queue(QueueName=EVENTS_QUEUE, Attributes={"VisibilityTimeout": "1"})["QueueUrl"])


def inventory_with(*instances: tuple[str, str]) -> Inventory:
    inv = Inventory(None)  # type: ignore[arg-type]  # fed by hand, no I/O
    for name, iid in instances:
        obj = node(name)
        obj["spec"]["providerID"] = f"aws:///us-east-2a/{iid}"
        inv.apply_node("ADDED", raw(obj))
    inv.nodes_synced.set()
    inv.pods_synced.set()
    return inv


def about(iid: str, event: dict[str, Any]) -> str:
    detail = event["detail"]
    for key in ("instance-id", "EC2InstanceId"):
        if key in detail:
            detail[key] = iid
    if "affectedEntities" in detail:
        detail["affectedEntities"] = [{"entityValue": iid}]
        event["resources"] = [iid]
    return json.dumps(event)


def no_signals(signals: list[CapacitySignal]) -> None:
    pass


async def drain_queue(source: SqsSource, on_instances: Callable[[InstanceEvent], Awaitable[str]]) -> int:
    total = 0
    while (n := await source.poll_once(no_signals, on_instances=on_instances)) > 0:
        total += n
    return total


async def test_ours_handled_foreign_and_malformed_acknowledged(aws: MotoAws, queue: str) -> None:  # noqa: F811
    inv = inventory_with(("spot-1", OURS))
    seen: list[tuple[str, str]] = []
    witness = Witness(inv.node_of_instance, lambda: inv.synced, spotd_log.get("test"))

    async def recording(event: InstanceEvent) -> str:
        outcome = await witness.on_event(event)
        seen.append((event.kind, outcome))
        return outcome

    send(
        aws,
        queue,
        about(OURS, spot_itn()),
        about(THEIRS, spot_itn()),
        about(THEIRS, lifecycle("terminate")),
        about(OURS, health()),
        json.dumps(spot_itn(detail={"instance-id": OURS})),  # no instance-action: malformed
        "{not json",
    )
    before = {o: sample("spotd_sqs_messages_total", {"outcome": o}) for o in ("handled", "foreign", "malformed")}
    foreign = sample("spotd_queue_instance_events_total", {"kind": "spot-itn", "outcome": "foreign"})
    matched = sample("spotd_queue_instance_events_total", {"kind": "spot-itn", "outcome": "matched"})
    source = SqsSource(queue, wait_seconds=1)
    assert await drain_queue(source, recording) == 6
    assert sorted(seen) == sorted(
        [
            ("spot-itn", "handled"),
            ("spot-itn", "foreign"),
            ("asg-termination", "foreign"),
            ("scheduled-maintenance", "handled"),
        ]
    )
    after = {o: sample("spotd_sqs_messages_total", {"outcome": o}) for o in before}
    assert {o: after[o] - before[o] for o in after} == {"handled": 2, "foreign": 2, "malformed": 2}
    assert sample("spotd_queue_instance_events_total", {"kind": "spot-itn", "outcome": "foreign"}) == foreign + 1
    assert sample("spotd_queue_instance_events_total", {"kind": "spot-itn", "outcome": "matched"}) == matched + 1
    assert queue_depth(aws, queue) == 0  # every one acknowledged: none comes back


async def test_before_the_inventory_is_listed_the_message_goes_back(aws: MotoAws, queue: str) -> None:  # noqa: F811
    inv = inventory_with()
    inv.nodes_synced.clear()  # not listed yet: an unknown instance may still be ours
    witness = Witness(inv.node_of_instance, lambda: inv.synced, spotd_log.get("test"))
    send(aws, queue, about(OURS, spot_itn()))
    source = SqsSource(queue, wait_seconds=1)
    failed = sample("spotd_sqs_messages_total", {"outcome": "failed"})
    assert await source.poll_once(no_signals, on_instances=witness.on_event) == 1
    assert sample("spotd_sqs_messages_total", {"outcome": "failed"}) == failed + 1
    assert queue_depth(aws, queue) == 1  # not acknowledged as foreign


# --- one episode per (instance, kind): recorded on the Node by the first witness -----------------------


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[tuple[FakeApiServer, Any]]:
    """The fake API server under deploy/'s RBAC and admission policies, and a client holding the
    controller's ServiceAccount token."""
    server = FakeApiServer(host="127.0.0.1", port=0)
    await server.start()
    server.load_manifests([DEPLOY])
    server.write_kubeconfig(tmp_path / "kubeconfig", token=server.service_account_token("spotd", "spotd-controller"))
    client = make_client(str(tmp_path / "kubeconfig"))
    try:
        yield server, client
    finally:
        await client.close()
        await server.stop()


def witness_for(server: FakeApiServer, client: Any, alerter: Alerter) -> Witness:
    inv = Inventory(None)  # type: ignore[arg-type]  # fed from the server's store by hand
    for obj in server.list("Node"):
        inv.apply_node("ADDED", raw(obj))
    inv.nodes_synced.set()
    inv.pods_synced.set()
    return Witness(
        inv.node_of_instance,
        lambda: inv.synced,
        spotd_log.get("test"),
        client=client,
        events=EventRecorder(client, "spotd-controller", "test", spotd_log.get("test")),
        alerter=alerter,
        clock=lambda: datetime.now(UTC),
    )


def event_of(iid: str, obj: dict[str, Any]) -> InstanceEvent:
    obj["time"] = format_time(datetime.now(UTC))  # an alert past its deadline's linger is not active
    found = read_instance_event(about(iid, obj))
    assert found is not None
    return found


def sightings(kind: str, witness: str, order: str) -> float:
    return sample("spotd_episode_sightings_total", {"kind": kind, "witness": witness, "order": order})


async def test_the_queue_first_records_the_episode_once_and_alerts_once(cluster: tuple[FakeApiServer, Any]) -> None:
    server, client = cluster
    server.create(builders.node("spot-1", "spot", instance_id=OURS))
    alerter = Alerter(AlertConfig())
    witness = witness_for(server, client, alerter)
    first, second = sightings("spot-itn", "queue", "first"), sightings("spot-itn", "queue", "second")
    event = event_of(OURS, spot_itn())
    assert await witness.on_event(event) == "handled"
    annotations = server.get("Node", "spot-1")["metadata"]["annotations"]
    recorded = json.loads(annotations[QUEUE_NOTICE_ANNOTATION])
    assert list(recorded) == ["spot-itn"]
    assert recorded["spot-itn"]["deadline"] == format_time(event.deadline)  # type: ignore[arg-type]
    assert [a.labels["kind"] for a in alerter.active()] == ["spot-itn"]
    assert sightings("spot-itn", "queue", "first") == first + 1
    # the same message again (SQS delivers at least once), or a second rule routing the same event
    assert await witness.on_event(event) == "handled"
    assert (
        server.get("Node", "spot-1")["metadata"]["annotations"][QUEUE_NOTICE_ANNOTATION]
        == (annotations[QUEUE_NOTICE_ANNOTATION])
    )
    assert sightings("spot-itn", "queue", "second") == second + 1
    assert len(alerter.active()) == 1
    # another kind for the same instance is another episode
    assert await witness.on_event(event_of(OURS, rebalance())) == "handled"
    recorded = json.loads(server.get("Node", "spot-1")["metadata"]["annotations"][QUEUE_NOTICE_ANNOTATION])
    assert sorted(recorded) == ["rebalance", "spot-itn"]


async def test_the_agent_first_the_queue_adds_nothing_but_a_metric(cluster: tuple[FakeApiServer, Any]) -> None:
    server, client = cluster
    imds_notice = Notice(NoticeKind.SPOT_ITN, "imds", datetime.now(UTC), datetime.now(UTC) + timedelta(minutes=2))
    obj = builders.node("spot-1", "spot", instance_id=OURS)
    obj["metadata"].setdefault("annotations", {})[NOTICE_ANNOTATION] = imds_notice.to_json()
    server.create(obj)
    alerter = Alerter(AlertConfig())
    witness = witness_for(server, client, alerter)
    second = sightings("spot-itn", "queue", "second")
    assert await witness.on_event(event_of(OURS, spot_itn())) == "handled"
    assert QUEUE_NOTICE_ANNOTATION not in server.get("Node", "spot-1")["metadata"]["annotations"]
    assert alerter.active() == []  # the agent raised the episode's alert
    assert sightings("spot-itn", "queue", "second") == second + 1


async def test_a_rehearsal_is_no_witness_of_a_real_episode(cluster: tuple[FakeApiServer, Any]) -> None:
    server, client = cluster
    rehearsal = Notice(NoticeKind.SPOT_ITN, "simulation", datetime.now(UTC), datetime.now(UTC), event_id="r-1")
    obj = builders.node("spot-1", "spot", instance_id=OURS)
    obj["metadata"].setdefault("annotations", {})[NOTICE_ANNOTATION] = rehearsal.to_json()
    server.create(obj)
    witness = witness_for(server, client, Alerter(AlertConfig()))
    assert await witness.on_event(event_of(OURS, spot_itn())) == "handled"
    assert "spot-itn" in json.loads(server.get("Node", "spot-1")["metadata"]["annotations"][QUEUE_NOTICE_ANNOTATION])


async def test_the_agent_second_still_drains_and_adds_only_a_metric(tmp_path: Path) -> None:
    """The controller recorded the episode from the queue first (agent down, or the queue was faster):
    the agent acts on IMDS as always (its drain has the deadline) but raises no second alert."""
    from tests.test_agent import NODE, our_taint, pods_on_node, populate, run_agent, soon

    api = FakeApiServer(termination_scale=0.02)
    await api.start()
    imds = FakeImds()
    await imds.start()
    agents: list[AgentProcess] = []
    try:
        populate(api, web=2)
        stored = api.store.get("Node", "", NODE)
        stored["metadata"].setdefault("annotations", {})[QUEUE_NOTICE_ANNOTATION] = json.dumps(
            {"spot-itn": {"seen_at": format_time(datetime.now(UTC))}}
        )
        agent = run_agent(agents, tmp_path, agent_kubeconfig(api, tmp_path / "agent.kubeconfig", NODE), imds)
        await agent.ready()
        imds.set_instance_action("terminate", soon(120))
        await eventually(lambda: our_taint(api), timeout=10)
        await eventually(lambda: pods_on_node(api) == ["job-done", "kube-proxy-x", "logs-agent"], timeout=15)
        labels = {"kind": "spot-itn", "witness": "imds"}
        assert agent.metric("spotd_episode_sightings_total", order="second", **labels) == 1
        assert not agent.metric("spotd_episode_sightings_total", order="first", **labels)
        assert agent.metric("spotd_notices_total", kind="spot-itn", source="imds") == 1
    finally:
        for running_agent in agents:
            running_agent.stop(signal.SIGKILL)
        await imds.stop()
        await api.stop()
