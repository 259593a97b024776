# ruff: noqa: F811
"""A Spot-warning takeover survives a leader failover (issue 19): the queue's message is gone once the notice
is on the Node (spotd.io/queue-notice), so a new leader resumes the agent-down drain from there.

Two controller replicas in process (spotd.controller.main.Controller) against the fake API server under
deploy/'s RBAC and moto's SQS with IAM enforced (deploy/iam-policy.json); no agent on the node.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from spotd.common.parsing import format_time
from spotd.controller.takeover import resumable_takeovers
from spotd.kube.keys import QUEUE_NOTICE_ANNOTATION
from spotd.sim.kubeapi.server import FakeApiServer
from tests.agent_harness import eventually, node_obj, pdb_obj, pod_obj
from tests.moto_server import MotoAws, aws, moto_endpoint  # noqa: F401  (pytest fixtures)
from tests.test_capacity_aws import queue_depth, send
from tests.test_controller import api, run_in_process, stop_in_process  # noqa: F401  (pytest fixture)
from tests.test_lifecycle_hooks import SETTINGS, queue, sources  # noqa: F401  (pytest fixture)
from tests.test_queue_events import spot_itn

NODE = "ip-10-0-1-20.ec2.internal"
IID = "i-0bbbbbbbbbbbbbbb2"
T0 = datetime(2026, 12, 6, 4, 0, tzinfo=UTC)


def test_what_a_new_leader_resumes_from_the_node() -> None:
    def entry(deadline: datetime) -> dict[str, str]:
        return {"at": format_time(T0), "deadline": format_time(deadline), "action": "terminate", "event_id": "e"}

    ahead, past = T0 + timedelta(minutes=2), T0 - timedelta(seconds=1)
    annotations = {
        QUEUE_NOTICE_ANNOTATION: json.dumps(
            {"spot-itn": entry(ahead), "state-change": entry(past), "rebalance": {"at": format_time(T0)}}
        )
    }
    [event] = resumable_takeovers(annotations, T0)
    assert (event.kind, event.deadline, event.action, event.event_id) == ("spot-itn", ahead, "terminate", "e")
    assert resumable_takeovers(annotations, ahead) == []  # the deadline passed: nothing to resume
    assert resumable_takeovers({QUEUE_NOTICE_ANNOTATION: "{not json"}, T0) == []
    broken = {QUEUE_NOTICE_ANNOTATION: json.dumps({"spot-itn": {"at": "x", "deadline": "y"}})}
    assert resumable_takeovers(broken, T0) == []


def populate(api: FakeApiServer, web: int = 3) -> None:
    api.create(node_obj(NODE, "spot", instance_id=IID))
    for i in range(web):
        api.create(pod_obj(f"web-{i}", NODE, labels={"app": "web"}, grace=1))
    api.create(pdb_obj("web", min_available=web))  # no eviction allowed: the drain runs until it goes


def web_pods(api: FakeApiServer) -> list[str]:
    return sorted(
        p["metadata"]["name"]
        for p in api.list("Pod")
        if p["spec"].get("nodeName") == NODE and p["metadata"]["name"].startswith("web-")
    )


def reasons(api: FakeApiServer) -> list[str]:
    return [e.get("reason", "") for e in api.list("Event") if e.get("involvedObject", {}).get("name") == NODE]


async def test_a_failover_mid_takeover_resumes_the_drain_from_the_node(
    api: FakeApiServer, tmp_path: Path, aws: MotoAws, queue: str
) -> None:
    populate(api)
    a, a_task = await run_in_process(api, tmp_path, sources(queue), identity="ctl-a", **SETTINGS)
    b = b_task = None
    try:
        await eventually(lambda: a.ready, timeout=20)
        b, b_task = await run_in_process(api, tmp_path, sources(queue), identity="ctl-b", **SETTINGS)
        await eventually(lambda: b.inventory.synced, timeout=20)
        warning = spot_itn(time=format_time(datetime.now(UTC)))
        warning["detail"]["instance-id"] = IID
        send(aws, queue, json.dumps(warning))
        await eventually(lambda: api.get("Node", NODE)["spec"].get("unschedulable"), timeout=20)  # A took over
        assert "spot-itn" in json.loads(api.get("Node", NODE)["metadata"]["annotations"][QUEUE_NOTICE_ANNOTATION])
        await eventually(lambda: queue_depth(aws, queue) == 0, timeout=10)  # B can only learn it from the Node
        assert reasons(api).count("SpotdAgentSilent") == 1
        assert not b.elector.is_leader.is_set()
        await stop_in_process(a, a_task)  # the leader goes mid-drain (the PDB holds it); B takes the Lease
        await eventually(lambda: b.elector.is_leader.is_set(), timeout=20)
        await eventually(lambda: reasons(api).count("SpotdAgentSilent") == 2, timeout=20)  # B follows it again
        assert len(web_pods(api)) == 3
        api.delete("PodDisruptionBudget", "web", "default")
        await eventually(lambda: web_pods(api) == [], timeout=30)  # B's drain, before the deadline
        await eventually(lambda: "SpotdTakeoverComplete" in reasons(api), timeout=10)
        assert api.get("Node", NODE)["spec"].get("unschedulable") is True
    finally:
        if b is not None and b_task is not None:
            await stop_in_process(b, b_task)
        if not a_task.done():
            await stop_in_process(a, a_task)
