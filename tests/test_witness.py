"""The controller as the second witness (issue 19): instance events from the queue, through moto's SQS
(IAM enforced, deploy/iam-policy.json), matched to nodes by spec.providerID through the inventory's index.

A foreign instance's event (another cluster on the same queue) and a malformed one are logged, counted and
acknowledged; the loop goes on.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from spotd.capacity.signals import CapacitySignal
from spotd.capacity.sources.sqs import SqsSource
from spotd.common import log as spotd_log
from spotd.controller.witness import Witness
from spotd.inventory.cache import Inventory
from spotd.notices.queue_events import InstanceEvent
from tests.moto_server import EVENTS_QUEUE, MotoAws, aws, moto_endpoint  # noqa: F401  (pytest fixtures)
from tests.test_capacity_aws import queue_depth, sample, send
from tests.test_inventory import node, raw
from tests.test_queue_events import health, lifecycle, spot_itn

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
