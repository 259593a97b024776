# ruff: noqa: F811  (pytest fixtures imported from other test modules, used as arguments)
"""A queue rehearsal (simulate-reclaim --via-queue) is written on the Node before the controller touches it,
so the node is released at the deadline even when the leader that drained it is gone; what the controller
says about a rehearsal is what it does (issue 19, review findings 3 and 11)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from spotd.common.parsing import format_time
from spotd.controller.takeover import RehearsalRecord, UnreadableRehearsal, real_notice_since, rehearsal_record
from spotd.kube.keys import QUEUE_NOTICE_ANNOTATION, QUEUE_REHEARSAL_ANNOTATION
from spotd.notices.queue_events import rehearsal_spot_warning
from spotd.sim.kubeapi.server import FakeApiServer
from tests.agent_harness import eventually, node_obj, pod_obj
from tests.moto_server import MotoAws, aws, moto_endpoint  # noqa: F401
from tests.test_capacity_aws import send
from tests.test_controller import api, run_in_process, stop_in_process  # noqa: F401
from tests.test_lifecycle_hooks import SETTINGS, queue, sources  # noqa: F401
from tests.test_queue_rehearsal_safety import cordoned, past, rehearse, tainted
from tests.test_takeover import IID, NODE, controller_parts, node_events

T0 = datetime(2026, 12, 6, 8, 0, tzinfo=UTC)


def test_the_rehearsal_record_reads_back_and_an_unreadable_one_is_said() -> None:
    record = RehearsalRecord("r-1", "spot-itn", T0 + timedelta(minutes=2), T0, prior_cordon=True)
    assert rehearsal_record({QUEUE_REHEARSAL_ANNOTATION: record.to_json()}) == record
    assert rehearsal_record({}) is None
    for broken in ("{not json", "[]", json.dumps({"id": "r", "kind": "spot-itn", "deadline": "x", "started": "y"})):
        with pytest.raises(UnreadableRehearsal):  # the cordon from before is unknown: never guessed
            rehearsal_record({QUEUE_REHEARSAL_ANNOTATION: broken})
    no_prior = json.loads(record.to_json())
    no_prior["prior_cordon"] = "false"
    with pytest.raises(UnreadableRehearsal):
        rehearsal_record({QUEUE_REHEARSAL_ANNOTATION: json.dumps(no_prior)})


def test_a_real_notice_since_the_rehearsal_began_holds_the_node() -> None:
    record = RehearsalRecord("r-1", "spot-itn", T0 + timedelta(minutes=2), T0, prior_cordon=False)

    def episodes(**kinds: dict[str, str]) -> dict[str, str]:
        return {QUEUE_NOTICE_ANNOTATION: json.dumps(kinds)}

    before = {"seen_at": format_time(T0 - timedelta(hours=1)), "at": format_time(T0 - timedelta(hours=1))}
    during = {"seen_at": format_time(T0 + timedelta(seconds=5)), "at": format_time(T0 + timedelta(seconds=5))}
    pending = {**during, "deadline": format_time(T0 + timedelta(minutes=2))}
    later = T0 + timedelta(minutes=3)
    assert real_notice_since({}, record, later) is None
    assert real_notice_since(episodes(**{"spot-itn": before}), record, later) is None  # an old episode
    assert real_notice_since(episodes(rebalance=during), record, later) is None  # no takeover kind
    assert real_notice_since(episodes(**{"state-change": during}), record, later)  # deadline past: still held
    assert real_notice_since(episodes(**{"spot-itn": pending}), record, T0 + timedelta(seconds=30))


async def test_a_new_leader_releases_the_node_a_stopped_leader_drained_for_a_rehearsal(
    api: FakeApiServer, tmp_path: Path, aws: MotoAws, queue: str
) -> None:
    api.create(node_obj(NODE, "spot", instance_id=IID))
    api.create(pod_obj("web-0", NODE, labels={"app": "web"}, grace=1))
    a, a_task = await run_in_process(api, tmp_path, sources(queue), identity="ctl-a", **SETTINGS)
    b = b_task = None
    try:
        await eventually(lambda: a.ready, timeout=30)
        b, b_task = await run_in_process(api, tmp_path, sources(queue), identity="ctl-b", **SETTINGS)
        await eventually(lambda: b.inventory.synced, timeout=30)
        now = datetime.now(UTC)
        deadline = now + timedelta(seconds=15)
        send(aws, queue, rehearsal_spot_warning(IID, now, deadline, "r-failover"))
        await eventually(lambda: "SpotdTakeoverComplete" in node_events(api), timeout=30)
        record = rehearsal_record(api.get("Node", NODE)["metadata"]["annotations"])
        assert record is not None and record.rehearsal == "r-failover" and record.prior_cordon is False
        assert cordoned(api) and tainted(api)
        await stop_in_process(a, a_task)  # the leader goes between the drain and the deadline
        await eventually(lambda: b.elector.is_leader.is_set(), timeout=30)
        await eventually(lambda: "SpotdRehearsalReleased" in node_events(api), timeout=60)
        assert datetime.now(UTC) >= deadline
        assert not cordoned(api) and not tainted(api), "the new leader left the rehearsal's node cordoned"
        assert QUEUE_REHEARSAL_ANNOTATION not in (api.get("Node", NODE)["metadata"].get("annotations") or {})
    finally:
        if b is not None and b_task is not None:
            await stop_in_process(b, b_task)
        if not a_task.done():
            await stop_in_process(a, a_task)


async def test_a_rehearsal_that_cannot_be_written_on_the_node_touches_nothing(
    api: FakeApiServer, tmp_path: Path
) -> None:
    api.create(node_obj(NODE, "spot", instance_id=IID))
    api.create(pod_obj("web-0", NODE, labels={"app": "web"}, grace=1))
    async with controller_parts(api, tmp_path, ack_timeout=0.3) as rig:
        api.inject_fault("PATCH", f"^/api/v1/nodes/{NODE}$", 500, times=1)  # the record's write
        deadline = await rehearse(rig, 6, "r-unwritten")
        await eventually(lambda: "SpotdRehearsalRefused" in node_events(api), timeout=20)
        await past(deadline, 0.5)
        assert not cordoned(api) and not tainted(api)
        assert [p["metadata"]["name"] for p in api.list("Pod")] == ["web-0"]


def messages(api: FakeApiServer, reason: str) -> list[str]:
    return [
        e.get("message", "")
        for e in api.list("Event")
        if e.get("involvedObject", {}).get("name") == NODE and e.get("reason") == reason
    ]


async def test_what_the_rehearsal_events_say_is_what_is_done(api: FakeApiServer, tmp_path: Path) -> None:
    api.create(node_obj(NODE, "spot", instance_id=IID))
    api.create(pod_obj("web-0", NODE, labels={"app": "web"}, grace=1))
    async with controller_parts(api, tmp_path, ack_timeout=0.3, dry_run=True) as rig:
        await rehearse(rig, 8, "r-dry")
        await eventually(lambda: messages(api, "SpotdAgentSilent"), timeout=20)
        [queued] = messages(api, "SpotdQueueRehearsal")
        assert "dry run" in queued and "drained" not in queued
        assert "would drain" in messages(api, "SpotdAgentSilent")[0]
        assert not cordoned(api)
    async with controller_parts(api, tmp_path, ack_timeout=0.3) as rig:
        await rehearse(rig, 8, "r-first")
        await eventually(lambda: cordoned(api), timeout=20)
        await rehearse(rig, 8, "r-second")  # the node is followed already: this one is not acted on
        await eventually(lambda: len(messages(api, "SpotdQueueRehearsal")) == 3, timeout=20)
        said: Any = messages(api, "SpotdQueueRehearsal")
        assert any("r-second" in m and "not acted on" in m for m in said), said
