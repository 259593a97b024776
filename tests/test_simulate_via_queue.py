# ruff: noqa: F811
"""`spotd simulate-reclaim --via-queue` (issue 19): the rehearsal's Spot warnings go through the controller's
SQS queue, EventBridge-shaped and marked as a rehearsal, instead of IMDS: the agent-down path rehearsed.

The embedded cluster's API server and controllers (evicted pods come back elsewhere), a real `spotd controller`
subprocess reading the moto queue as its own identity (deploy/'s RBAC, deploy/iam-policy.json), no agent
(IMDS would say nothing anyway), and the rehearsal as a subprocess signing as the operator, whose only policy
is deploy/iam-rehearsal-policy.json (sqs:SendMessage on the one queue). Also the marker, read purely.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from spotd.controller.takeover import RehearsalRecord
from spotd.kube.keys import INTERRUPTION_TAINT_KEY, QUEUE_NOTICE_ANNOTATION, QUEUE_REHEARSAL_ANNOTATION
from spotd.notices.queue_events import (
    REHEARSAL_MARKER,
    SPOT_ITN,
    read_instance_event,
    rehearsal_refusal,
    rehearsal_spot_warning,
)
from spotd.notices.record import MalformedNotice
from spotd.sim.cluster import ClusterSpec, EmbeddedCluster
from spotd.sim.kubeapi.server import FakeApiServer
from tests.agent_harness import DEPLOY, eventually
from tests.moto_server import EVENTS_QUEUE, MotoAws, aws, moto_endpoint  # noqa: F401  (pytest fixtures)
from tests.test_controller import ControllerProcess, events_for

NODE = "spot-01"
IID = "i-0123456789abcdef0"


# --- the marker, read purely ------------------------------------------------------------------------------


def test_a_rehearsal_warning_reads_back_with_its_id_and_deadline() -> None:
    at = datetime(2026, 12, 6, 4, 0, tzinfo=UTC)
    deadline = at + timedelta(seconds=45)
    body = rehearsal_spot_warning(IID, at, deadline, "spotd-rehearsal-x", "us-east-1", "111122223333")
    event = read_instance_event(body)
    assert event is not None
    assert (event.kind, event.instance_ids, event.action) == (SPOT_ITN, (IID,), "terminate")
    assert event.rehearsal == "spotd-rehearsal-x" and event.deadline == deadline  # the marker's, not time + 2 min
    real = json.loads(body)
    del real[REHEARSAL_MARKER]
    plain = read_instance_event(json.dumps(real))
    assert plain is not None and plain.rehearsal == "" and plain.deadline == at + timedelta(minutes=2)
    for marker in ("yes", {"deadline": "2026-12-06T04:00:45Z"}, {"id": "r", "deadline": "soon"}):
        with pytest.raises(MalformedNotice, match=REHEARSAL_MARKER):
            read_instance_event(json.dumps({**real, REHEARSAL_MARKER: marker}))


def test_a_rehearsal_deadline_past_or_far_is_refused() -> None:
    now = datetime(2026, 12, 6, 4, 0, tzinfo=UTC)

    def refusal(seconds: float) -> str | None:
        event = read_instance_event(rehearsal_spot_warning(IID, now, now + timedelta(seconds=seconds), "r"))
        assert event is not None
        return rehearsal_refusal(event, now)

    assert refusal(60) is None and refusal(900) is None
    assert "in the past" in (refusal(0) or "") and "in the past" in (refusal(-5) or "")
    assert "more than 15 minutes" in (refusal(901) or "")


# --- end to end -------------------------------------------------------------------------------------------


class Rig:
    def __init__(self, api: FakeApiServer, tmp: Path, queue_url: str) -> None:
        self.api, self.tmp, self.queue_url = api, tmp, queue_url
        self.admin_kubeconfig = str(api.write_kubeconfig(tmp / "admin-kubeconfig"))

    def node(self) -> dict[str, Any]:
        found = self.api.get("Node", NODE)
        assert found is not None
        return found

    def pods_on(self, name: str) -> list[str]:
        return [
            p["metadata"]["name"]
            for p in self.api.list("Pod")
            if p["spec"].get("nodeName") == name and not p["metadata"].get("deletionTimestamp")
        ]

    async def rehearse(self, *args: str) -> tuple[int, dict[str, Any], str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "spotd",
            "simulate-reclaim",
            "--kubeconfig",
            self.admin_kubeconfig,
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        try:
            report = json.loads(out.decode())
        except ValueError:
            report = {}
        return proc.returncode or 0, report, err.decode() + out.decode()


@pytest.fixture
async def rig(aws: MotoAws, tmp_path: Path) -> AsyncIterator[tuple[Rig, ControllerProcess]]:
    api = FakeApiServer(host="127.0.0.1", port=0, termination_scale=0.05)
    await api.start()
    api.load_manifests([DEPLOY])
    api.write_kubeconfig(tmp_path / "kubeconfig", token=api.service_account_token("spotd", "spotd-controller"))
    sim = EmbeddedCluster(api, ClusterSpec(spot_nodes=3, on_demand_nodes=1, pods_per_node=2, time_scale=0.1))
    sim.populate()
    controllers = asyncio.get_running_loop().create_task(sim.run_controllers())
    url = aws.client("sqs").create_queue(QueueName=EVENTS_QUEUE)["QueueUrl"]
    controller = ControllerProcess(
        tmp_path, str(tmp_path / "kubeconfig"), "vq", "--agent-ack-timeout", "1s", queue_url=url
    )
    controller.start()
    try:
        await eventually(lambda: controller.events("sources_ready"), timeout=60)
        aws.act_as(aws.operator)  # from here on, what the code under test signs is the rehearsal's
        yield Rig(api, tmp_path, url), controller
    finally:
        controller.stop()
        controllers.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await controllers
        await api.stop()


async def test_via_queue_the_controller_drains_the_node_and_releases_it_at_the_deadline(
    rig: tuple[Rig, ControllerProcess],
) -> None:
    cluster, controller = rig
    before = cluster.pods_on(NODE)
    assert before
    code, report, output = await cluster.rehearse(
        "--node", NODE, "--via-queue", cluster.queue_url, "--notice", "20s", "--output", "json",
        "--recovery-timeout", "30s",
    )  # fmt: skip
    assert code == 0, output
    assert report["ok"] is True, output
    [node] = report["nodes"]
    assert node["name"] == NODE and node["kind"] == "spot-itn"
    for key in ("notice_at", "tainted_at", "cordoned_at", "drained_at"):
        assert node[key], (key, output)
    assert node["pods_left"] == 0 and node["pods_evicted"] >= 1
    assert any("through the controller's queue" in n for n in report.get("notes", [])), report
    # the report waits for the controller's word on the node's release and says nothing is left
    assert "SpotdRehearsalReleased" in events_for(cluster.api, NODE), output
    assert not any("release" in n for n in report.get("notes", [])), report
    # the controller's view: a rehearsal, not a real episode; drained as for a silent agent
    [seen] = controller.events("queue_rehearsal")
    assert seen["node"] == NODE and seen["rehearsal"].startswith("spotd-rehearsal-")
    assert controller.events("agent_silent_draining")
    assert not controller.events("episode_recorded")
    assert QUEUE_NOTICE_ANNOTATION not in (cluster.node()["metadata"].get("annotations") or {})
    assert controller.metric("spotd_queue_instance_events_total", kind="spot-itn", outcome="rehearsal") == 1.0
    reasons = events_for(cluster.api, NODE)
    assert "SpotdQueueRehearsal" in reasons and "SpotdTakeoverComplete" in reasons
    assert "SpotdQueueNotice" not in reasons  # no real notice announced (nor its alert)
    # the instance lives on: at the deadline the node is given back
    await eventually(lambda: "SpotdRehearsalReleased" in events_for(cluster.api, NODE), timeout=60)
    spec = cluster.node()["spec"]
    assert not spec.get("unschedulable")
    assert not any(t.get("key") == INTERRUPTION_TAINT_KEY for t in spec.get("taints") or [])


async def test_a_node_the_controller_does_not_release_is_said_in_the_report(
    rig: tuple[Rig, ControllerProcess],
) -> None:
    cluster, _controller = rig
    now = datetime.now(UTC)
    other = RehearsalRecord("r-earlier", "spot-itn", now + timedelta(minutes=10), now, prior_cordon=False)
    node = cluster.node()
    node["metadata"].setdefault("annotations", {})[QUEUE_REHEARSAL_ANNOTATION] = other.to_json()
    cluster.api.update(node)
    _code, report, output = await cluster.rehearse(
        "--node", NODE, "--via-queue", cluster.queue_url, "--notice", "10s", "--output", "json",
        "--recovery-timeout", "5s",
    )  # fmt: skip
    assert report, output
    assert any(n.startswith(f"{NODE}: not released: SpotdRehearsalRefused") for n in report["notes"]), report
    assert "r-earlier still holds the node" in " ".join(report["notes"])
    assert not cluster.node()["spec"].get("unschedulable")  # refused: nothing was done to it


def test_via_queue_flag_is_refused_where_it_cannot_work(tmp_path: Path) -> None:
    import subprocess

    def run(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "spotd", "simulate-reclaim", *args], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 2, done.stderr
        return done.stderr

    queue = "https://sqs.us-east-1.amazonaws.com/111122223333/spotd-events"
    assert "--via-queue: needs a cluster" in run("--via-queue", queue)
    kubeconfig = str(tmp_path / "none")
    assert "only --kind spot-itn" in run(
        "--kubeconfig", kubeconfig, "--count", "1", "--via-queue", queue, "--kind", "rebalance"
    )
    assert "not with --via fis" in run("--kubeconfig", kubeconfig, "--count", "1", "--via-queue", queue, "--via", "fis")
    assert "not with --terminate" in run(
        "--kubeconfig", kubeconfig, "--count", "1", "--via-queue", queue, "--terminate", "--yes"
    )
