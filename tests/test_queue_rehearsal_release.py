# ruff: noqa: F811  (pytest fixtures imported from other test modules, used as arguments)
"""A queue rehearsal (simulate-reclaim --via-queue) is written on the Node before the controller touches it,
so the node is released at the deadline even when the leader that drained it is gone; what the controller
says about a rehearsal is what it does (issue 19, review findings 3 and 11)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from lightkube.models.core_v1 import ObjectReference
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Event

from spotd.common.parsing import format_time
from spotd.controller.takeover import (
    RehearsalRecord,
    UnreadableRehearsal,
    real_notice_since,
    rehearsal_record,
    release_hold,
    release_patch,
)
from spotd.kube.keys import QUEUE_NOTICE_ANNOTATION, QUEUE_REHEARSAL_ANNOTATION
from spotd.notices.queue_events import read_instance_event, rehearsal_refusal, rehearsal_spot_warning
from spotd.rehearsal.report import NodePlan
from spotd.rehearsal.runner import Rehearsal, RehearsalConfig
from spotd.sim.kubeapi.server import FakeApiServer
from tests.agent_harness import eventually, node_obj, pod_obj
from tests.moto_server import MotoAws, aws, moto_endpoint  # noqa: F401
from tests.test_capacity_aws import send
from tests.test_controller import api, run_in_process, running, stop_in_process  # noqa: F401
from tests.test_lifecycle_hooks import SETTINGS, queue, sources  # noqa: F401
from tests.test_queue_events import spot_itn
from tests.test_queue_rehearsal_safety import cordoned, node_with_agent, past, rehearse, tainted
from tests.test_takeover import IID, NODE, TAINT, controller_parts, node_events

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


# --- the second review (findings 1-5, 7-10 of a04e0e2's review; each seen failing on a04e0e2) ----------


def annotations(api: FakeApiServer) -> dict[str, str]:
    return api.get("Node", NODE)["metadata"].get("annotations") or {}


def node_with_record(api: FakeApiServer, *, cordon: bool, taint: bool, age: timedelta) -> None:
    """A node carrying a rehearsal record a previous leader left (its deadline `age` ago)."""
    node = node_obj(NODE, "spot", instance_id=IID)
    started = datetime.now(UTC) - age - timedelta(minutes=2)
    record = RehearsalRecord("r-old", "spot-itn", started + timedelta(minutes=2), started, prior_cordon=False)
    node["metadata"].setdefault("annotations", {})[QUEUE_REHEARSAL_ANNOTATION] = record.to_json()
    node["spec"]["unschedulable"] = cordon
    if taint:
        node["spec"]["taints"] = [{"key": TAINT, "value": "spot-itn", "effect": "NoSchedule"}]
    api.create(node)


def test_what_holds_a_rehearsals_node_at_the_release() -> None:
    record = RehearsalRecord("r-1", "spot-itn", T0 + timedelta(minutes=2), T0, prior_cordon=False)
    ours = {"taints": [{"key": TAINT, "value": "spot-itn", "effect": "NoSchedule"}], "unschedulable": True}
    at = record.deadline + timedelta(seconds=1)
    assert release_hold({}, ours, record, at) is None
    by_hand = release_hold({}, {"unschedulable": True}, record, at)  # our taint gone: the cordon is someone's
    assert by_hand is not None and "by hand" in by_hand[0] and by_hand[1] is False
    untainted = RehearsalRecord("r-1", "spot-itn", record.deadline, T0, prior_cordon=False, tainted=False)
    assert release_hold({}, {"unschedulable": True}, untainted, at) is None  # it never added one
    rebalance = {"taints": [{"key": TAINT, "value": "rebalance", "effect": "PreferNoSchedule"}], "unschedulable": True}
    assert release_hold({}, rebalance, record, at) is None  # the agent's taint took the key: not by hand
    stale = release_hold({}, ours, record, record.deadline + timedelta(hours=2))
    assert stale is not None and "stale" in stale[0] and stale[1] is False
    agent = {"spotd.io/notice": json.dumps({"kind": "spot-itn", "source": "imds", "seen_at": format_time(T0)})}
    cordoning = {**agent, "spotd.io/state": json.dumps({"steps": ["taint", "cordon", "drain"]})}
    assert release_hold(cordoning, ours, record, at) == ("the agent acts on a real notice and cordons", True)
    # the agent acting on a real Spot warning with taint and drain only: the taint is its own, the cordon ours
    tainting = {**agent, "spotd.io/state": json.dumps({"steps": ["taint", "drain"]})}
    assert release_hold(tainting, ours, record, at) is None
    assert release_patch(tainting, ours, record) == {"unschedulable": None}
    assert release_patch({}, ours, record) == {"taints": None, "unschedulable": None}
    kept = RehearsalRecord("r-1", "spot-itn", record.deadline, T0, prior_cordon=True)
    assert release_patch({}, ours, kept) == {"taints": None}


def test_a_rehearsal_of_a_kind_the_controller_never_takes_over_is_refused() -> None:
    now = datetime.now(UTC)
    event = read_instance_event(rehearsal_spot_warning(IID, now, now + timedelta(minutes=2), "r-kind"))
    assert event is not None and rehearsal_refusal(event, now) is None
    rebalance = dataclasses.replace(event, kind="rebalance")
    assert "only Spot warnings and state changes" in (rehearsal_refusal(rebalance, now) or "")


async def test_a_stale_record_never_lifts_a_cordon_made_since(
    api: FakeApiServer, tmp_path: Path, aws: MotoAws, queue: str
) -> None:
    """A release refused long ago; the node was given back by hand, the record stayed. Today someone cordons
    the node and the controller is rolled: the new leader removes the record and leaves the cordon."""
    node_with_record(api, cordon=True, taint=False, age=timedelta(days=2))
    ctl, task = await run_in_process(api, tmp_path, sources(queue), identity="ctl-a", **SETTINGS)
    try:
        await eventually(lambda: "SpotdRehearsalHeld" in node_events(api), timeout=60)
        assert cordoned(api), "the new leader lifted a cordon the rehearsal never made"
        assert QUEUE_REHEARSAL_ANNOTATION not in annotations(api)
    finally:
        await stop_in_process(ctl, task)


async def test_a_dry_run_leader_releases_nothing(api: FakeApiServer, tmp_path: Path, aws: MotoAws, queue: str) -> None:
    node_with_record(api, cordon=True, taint=True, age=timedelta(seconds=0))
    ctl, task = await run_in_process(api, tmp_path, sources(queue), identity="ctl-a", dry_run=True, **SETTINGS)
    try:
        await eventually(lambda: ctl.ready, timeout=60)
        await asyncio.sleep(3.0)  # the term's start resumes the release at once (its deadline is past)
        assert not [r.path for r in api.requests if r.method == "PATCH" and "/nodes/" in r.path]
        assert cordoned(api) and QUEUE_REHEARSAL_ANNOTATION in annotations(api)
    finally:
        await stop_in_process(ctl, task)


async def test_a_refused_release_is_tried_again_in_the_same_term(api: FakeApiServer, tmp_path: Path) -> None:
    api.create(node_obj(NODE, "spot", instance_id=IID))
    api.create(pod_obj("web-0", NODE, labels={"app": "web"}, grace=1))
    async with controller_parts(api, tmp_path, ack_timeout=0.3) as rig:
        await rehearse(rig, 6, "r-once")
        await eventually(lambda: "SpotdTakeoverComplete" in node_events(api), timeout=30)
        api.inject_fault("PATCH", f"^/api/v1/nodes/{NODE}$", 500, times=1)  # the release's patch only
        await eventually(lambda: "SpotdRehearsalReleased" in node_events(api), timeout=60)
        assert "SpotdRehearsalNotReleased" in node_events(api)
        assert not cordoned(api) and not tainted(api)
        assert QUEUE_REHEARSAL_ANNOTATION not in annotations(api)


async def test_a_real_notice_takes_the_node_and_the_rehearsals_record_goes(api: FakeApiServer, tmp_path: Path) -> None:
    api.create(node_obj(NODE, "spot", instance_id=IID))
    api.create(pod_obj("web-0", NODE, labels={"app": "web"}, grace=1))
    async with controller_parts(api, tmp_path, ack_timeout=0.3) as rig:
        await rehearse(rig, 6, "r-super")
        await eventually(lambda: QUEUE_REHEARSAL_ANNOTATION in annotations(api), timeout=20)
        await rig.deliver(spot_itn())
        await eventually(lambda: QUEUE_REHEARSAL_ANNOTATION not in annotations(api), timeout=20)
        assert cordoned(api) and tainted(api)  # the real notice's now


async def test_the_record_the_cordon_and_the_taint_come_in_one_write(api: FakeApiServer, tmp_path: Path) -> None:
    """No moment where the node carries the record without the cordon or the taint: a cordon someone makes
    then would be read as the rehearsal's and lifted at the release, and a taint write that failed after it
    would make the release take the node for given back by hand (and leave the rehearsal's own cordon)."""
    api.create(node_obj(NODE, "spot", instance_id=IID))
    api.create(pod_obj("web-0", NODE, labels={"app": "web"}, grace=1))
    seen: list[tuple[bool, bool, bool]] = []

    async def watch() -> None:
        async for kind, obj in api.subscribe():
            if obj.get("kind") == "Node" and obj["metadata"]["name"] == NODE and kind == "MODIFIED":
                recorded = QUEUE_REHEARSAL_ANNOTATION in (obj["metadata"].get("annotations") or {})
                taints = obj["spec"].get("taints") or []
                tainted = any(t.get("key") == TAINT and t.get("value") == "spot-itn" for t in taints)
                seen.append((recorded, bool(obj["spec"].get("unschedulable")), tainted))

    async with running(watch()), controller_parts(api, tmp_path, ack_timeout=0.3) as rig:
        await rehearse(rig, 6, "r-one-write")
        await eventually(lambda: "SpotdRehearsalReleased" in node_events(api), timeout=60)
    assert (True, True, True) in seen
    assert all(cordoned and tainted for recorded, cordoned, tainted in seen if recorded), seen


async def test_a_release_held_by_the_agents_real_notice_is_said(api: FakeApiServer, tmp_path: Path) -> None:
    async with node_with_agent(api, tmp_path) as imds, controller_parts(api, tmp_path, ack_timeout=0.3) as rig:
        await rehearse(rig, 10, "r-held")
        await eventually(lambda: cordoned(api) and "SpotdTakeoverComplete" in node_events(api), timeout=30)
        imds.set_instance_action("terminate", datetime.now(UTC) + timedelta(minutes=2))  # the real thing
        await eventually(lambda: "SpotdRehearsalHeld" in node_events(api), timeout=60)
        [said] = messages(api, "SpotdRehearsalHeld")
        assert said.startswith("rehearsal r-held over") and "agent acts on a real notice" in said
        assert cordoned(api) and QUEUE_REHEARSAL_ANNOTATION not in annotations(api)


def queue_run(deadline_in: float) -> Rehearsal:
    run = Rehearsal(RehearsalConfig(kubeconfig="unused", via="queue", notice=60))
    run.queue_rehearsal = "r-1"
    now = datetime.now(UTC)
    deadline = now + timedelta(seconds=deadline_in)
    run.plans[NODE] = NodePlan(NODE, "spot-itn", deadline - timedelta(seconds=60), deadline, frozenset(), True)
    return run


def node_event(reason: str, message: str) -> Event:
    return Event(
        metadata=ObjectMeta(name=f"{NODE}.1", namespace="default"),
        involvedObject=ObjectReference(kind="Node", name=NODE),
        reason=reason,
        message=message,
    )


def test_the_reports_word_on_each_release() -> None:
    run = queue_run(-61)  # a minute past the deadline
    assert run.released_all(datetime.now(UTC))
    [silent] = run.release_notes()
    assert "no word from the controller" in silent and "uncordon" not in silent
    run.apply(
        "Event", "ADDED", node_event("SpotdQueueRehearsal", "rehearsal r-1: spot-itn from the queue; not acted on")
    )
    [not_acted] = run.release_notes()
    assert "not acted on" in not_acted and "uncordon" not in not_acted
    dry = queue_run(30)  # a dry-run controller's word: final, nothing was done
    dry.apply("Event", "ADDED", node_event("SpotdQueueRehearsal", "rehearsal r-1: spot-itn; dry run: nothing is done"))
    assert dry.released_all(datetime.now(UTC))
    waiting = queue_run(30)
    waiting.apply("Event", "ADDED", node_event("SpotdRehearsalReleased", "rehearsal r-other over: node released"))
    waiting.apply("Event", "ADDED", node_event("SpotdRehearsalNotReleased", "rehearsal r-1: the release failed"))
    assert not waiting.released_all(datetime.now(UTC)), "another run's release, or a retried one, ended the wait"
    waiting.apply("Event", "ADDED", node_event("SpotdRehearsalReleased", "rehearsal r-1 over: node released"))
    assert waiting.released_all(datetime.now(UTC)) and waiting.release_notes() == []


async def test_a_rehearsal_on_a_node_whose_agent_acts_on_a_real_notice_does_nothing_and_says_so(
    api: FakeApiServer, tmp_path: Path
) -> None:
    async with node_with_agent(api, tmp_path) as imds:
        imds.set_instance_action("terminate", datetime.now(UTC) + timedelta(minutes=2))  # the real thing first
        await eventually(lambda: "spotd.io/notice" in annotations(api), timeout=30)
        async with controller_parts(api, tmp_path, ack_timeout=0.3) as rig:
            await rehearse(rig, 10, "r-late")
            await eventually(lambda: messages(api, "SpotdRehearsalHeld"), timeout=20)
            [said] = messages(api, "SpotdRehearsalHeld")
            assert said.startswith("rehearsal r-late:") and "agent acts on a real spot-itn notice" in said
            assert QUEUE_REHEARSAL_ANNOTATION not in annotations(api)
            assert "SpotdAgentSilent" not in node_events(api)
