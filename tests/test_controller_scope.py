# ruff: noqa: F811
"""Issue 11: the controller drains only declared fallback capacity, never loops, never sits idle in silence.

Each test runs the controller (in process, or as `spotd controller`) against the fake API server and moto.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from spotd.common.parsing import format_time
from spotd.sim.kubeapi.server import FakeApiServer
from tests.agent_harness import eventually, pdb_obj, pod_obj
from tests.moto_server import ACCOUNT, EVENTS_QUEUE, MotoAws, aws, moto_endpoint  # noqa: F401  (pytest fixtures)
from tests.test_controller import (
    OLD,
    ControllerProcess,
    RecordingAlerter,
    add_node,
    add_pods,
    api,  # noqa: F401  (pytest fixture)
    controller_command,
    events_for,
    ice_message,
    node,
    node_obj,
    pods_on,
    procs,  # noqa: F401  (pytest fixture)
    queue_source,
    replicaset,
    run_in_process,
    running,
    source,  # noqa: F401  (pytest fixture)
    stop_in_process,
)


def patched_nodes(api: FakeApiServer) -> set[str]:
    """Nodes the controller sent a PATCH to (cordon, uncordon, marks, taints)."""
    return {r.path.rsplit("/", 1)[-1] for r in api.requests if r.method == "PATCH" and "/api/v1/nodes/" in r.path}


async def test_an_on_demand_system_group_out_of_scope_is_never_touched(
    api: FakeApiServer, tmp_path: Path, source: str
) -> None:
    """No ICE ever; the system group is older than the fallback node; Karpenter's node matches the selector
    but is Karpenter's: only the fallback node is drained."""
    add_node(api, "system-1", "on-demand", OLD + timedelta(hours=3), pool="system")
    add_node(api, "system-2", "on-demand", OLD + timedelta(hours=2), pool="system")
    karpenter = node_obj("karp-1", "on-demand")
    karpenter["metadata"]["labels"]["karpenter.sh/nodepool"] = "default"
    api.create(karpenter)
    api.store.get("Node", "", "karp-1")["metadata"]["creationTimestamp"] = "2020-01-01T00:00:00Z"
    add_node(api, "fallback-1", "on-demand", OLD)
    add_node(api, "spot-1", "spot")
    for name in ("system-1", "system-2", "karp-1", "fallback-1"):
        add_pods(api, name, 2, app=f"app-{name}")
    ctl, task = await run_in_process(
        api, tmp_path, queue_source(source), max_drains_per_hour=6, max_concurrent_drains=3
    )
    try:
        async with running(replicaset(api, "spot-1")):
            await eventually(lambda: pods_on(api, "fallback-1") == [], timeout=30)
            await eventually(lambda: "SpotdDrainComplete" in events_for(api, "fallback-1"), timeout=10)
        await asyncio.sleep(1.0)  # a few more passes
        assert patched_nodes(api) == {"fallback-1"}
        for name in ("system-1", "system-2", "karp-1"):
            assert not node(api, name)["spec"].get("unschedulable"), name
            assert len(pods_on(api, name)) == 2
    finally:
        await stop_in_process(ctl, task)


async def test_without_a_declared_scope_nothing_is_drained_and_it_says_so(api: FakeApiServer, tmp_path: Path) -> None:
    from spotd.common.metrics import REGISTRY

    add_node(api, "fallback-1", "on-demand", OLD)
    add_node(api, "spot-1", "spot")
    add_pods(api, "fallback-1", 2)
    ctl, task = await run_in_process(api, tmp_path, fallback_selector=(), fallback_selector_text="")
    try:
        ctl.announce_scope()
        await eventually(lambda: ctl.ready, timeout=20)
        # ready is set before the first decision pass, which exports the sources
        ready = {"source": "inventory"}
        await eventually(lambda: REGISTRY.get_sample_value("spotd_source_ready", ready) == 1.0, timeout=10)
        await asyncio.sleep(1.0)
        assert patched_nodes(api) == set()
        assert REGISTRY.get_sample_value("spotd_controller_scope_configured") == 0.0
        last_read = REGISTRY.get_sample_value("spotd_source_last_read_timestamp_seconds", {"source": "inventory"})
        assert last_read is not None and last_read >= ctl.term_started > 0
        assert "nothing is drained" in ctl.readiness_detail()
        await eventually(lambda: any(e.get("reason") == "SpotdNoFallbackScope" for e in api.list("Event")), timeout=5)
    finally:
        await stop_in_process(ctl, task)


async def test_a_drain_that_cannot_finish_backs_off_and_the_next_candidate_goes(
    api: FakeApiServer, tmp_path: Path, source: str
) -> None:
    retry_key = "spotd.io/drain-retry-after"  # spotd.kube.keys.DRAIN_RETRY_ANNOTATION (literal: run on old code)
    add_node(api, "stuck", "on-demand", OLD + timedelta(hours=1))  # the oldest: chosen first
    add_node(api, "next", "on-demand", OLD)
    add_node(api, "spot-1", "spot")
    add_pods(api, "stuck", 2, app="db")
    add_pods(api, "next", 2, app="web")
    api.create(pdb_obj("db", min_available=2, app="db"))  # never allows
    alerter = RecordingAlerter()
    settings = {"drain_timeout": 1.5, "retry_backoff": 3600.0, "max_drains_per_hour": 20}
    ctl, task = await run_in_process(api, tmp_path, queue_source(source, alerter=alerter), **settings)
    try:
        async with running(replicaset(api, "spot-1")):
            await eventually(lambda: "SpotdDrainComplete" in events_for(api, "next"), timeout=40)
            await asyncio.sleep(2.0)  # passes after it: "stuck" is not tried again
        assert events_for(api, "stuck").count("SpotdDrainStarted") == 1
        assert len(pods_on(api, "stuck")) == 2 and not node(api, "stuck")["spec"].get("unschedulable")
        mark = json.loads(node(api, "stuck")["metadata"]["annotations"][retry_key])
        assert mark["attempts"] == 1 and mark["outcome"] == "timeout"
        blocked = [a for a in alerter.fired if a.labels["alertname"] == "OnDemandDrainBlocked"]
        assert [a.labels["node"] for a in blocked] == ["stuck"]
        text = json.dumps(dict(blocked[0].annotations))
        assert "default/db-stuck-" in text and "The disruption budget db" in text
    finally:
        await stop_in_process(ctl, task)
    # The back-off is on the node: a new process (or leader) does not try it either.
    api.requests.clear()
    ctl2, task2 = await run_in_process(api, tmp_path, queue_source(source), identity="second", **settings)
    try:
        await eventually(lambda: ctl2.ready, timeout=20)
        await eventually(lambda: "stuck" in ctl2.reasons, timeout=10)  # ready comes before the first pass
        await asyncio.sleep(1.5)
        assert "stuck" not in patched_nodes(api)
        assert ctl2.reasons["stuck"] == "last drain ended in timeout"
    finally:
        await stop_in_process(ctl2, task2)


async def test_a_node_with_a_completed_pod_drains_without_any_delete(
    api: FakeApiServer, tmp_path: Path, source: str
) -> None:
    add_node(api, "fallback-1", "on-demand", OLD)
    add_node(api, "spot-1", "spot")
    add_pods(api, "fallback-1", 2)
    api.create(pod_obj("report-done", "fallback-1", owner="Job", phase="Succeeded", labels={"app": "report"}))
    ctl, task = await run_in_process(api, tmp_path, queue_source(source))
    try:
        async with running(replicaset(api, "spot-1")):
            await eventually(lambda: "SpotdDrainComplete" in events_for(api, "fallback-1"), timeout=30)
        assert pods_on(api, "fallback-1") == ["report-done"]  # left for the node's removal
        assert not [r for r in api.requests if r.method == "DELETE" and "/pods/" in r.path]
        assert "spotd.io/drained" in node(api, "fallback-1")["metadata"]["annotations"]
    finally:
        await stop_in_process(ctl, task)


def unschedulable_pod(name: str, node_selector: dict[str, str] | None, message: str) -> dict[str, Any]:
    pod = pod_obj(name, "", labels={"app": name})
    pod["spec"].pop("nodeName", None)
    if node_selector:
        pod["spec"]["nodeSelector"] = node_selector
    pod["status"] = {
        "phase": "Pending",
        "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}],
    }
    return pod


async def test_a_pending_gpu_pod_no_fallback_node_fits_does_not_hold_drains(
    api: FakeApiServer, tmp_path: Path, source: str
) -> None:
    from spotd.common.metrics import REGISTRY

    add_node(api, "fallback-1", "on-demand", OLD)
    add_node(api, "spot-1", "spot")
    add_pods(api, "fallback-1", 2)
    gpu = unschedulable_pod(
        "train", {"nvidia.com/gpu.present": "true"}, "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    )
    web = unschedulable_pod("web-big", None, "0/3 nodes are available: 3 Insufficient cpu.")
    api.create(web)
    api.create(gpu)
    ctl, task = await run_in_process(api, tmp_path, queue_source(source))
    try:
        # An unconstrained Pending pod competes with the fallback node's pods: held, and the metric says so.
        await eventually(lambda: "fallback-1" in ctl.reasons, timeout=20)
        assert ctl.reasons["fallback-1"].startswith("1 pods Pending for lack of capacity")
        assert REGISTRY.get_sample_value("spotd_controller_drains_held", {"reason": "pending_pods"}) == 1.0
        assert patched_nodes(api) == set()
        api.delete("Pod", "web-big", "default")
        async with running(replicaset(api, "spot-1")):
            await eventually(lambda: "SpotdDrainComplete" in events_for(api, "fallback-1"), timeout=30)
        assert api.get("Pod", "train", "default") is not None  # still Pending: it did not hold the drain
        assert REGISTRY.get_sample_value("spotd_controller_drains_held", {"reason": "pending_pods"}) == 0.0
    finally:
        await stop_in_process(ctl, task)


async def test_a_node_past_its_deadline_that_goes_not_ready_gets_the_out_of_service_taint_once(
    api: FakeApiServer, tmp_path: Path
) -> None:
    from spotd.kube.keys import NOTICE_ANNOTATION

    def notice(deadline: datetime) -> str:
        return json.dumps(
            {"kind": "spot-itn", "source": "imds", "seen_at": format_time(deadline - timedelta(minutes=2)),
             "deadline": format_time(deadline), "action": "terminate"}
        )  # fmt: skip

    past = datetime.now(UTC) - timedelta(seconds=30)
    for name, deadline, ready in [
        ("gone", past, "False"),  # the instance is gone: taint
        ("still-ready", past, "True"),  # past the deadline but Ready: not (yet)
        ("later", datetime.now(UTC) + timedelta(hours=1), "False"),  # NotReady before its deadline: not ours
        ("no-notice", None, "Unknown"),  # NotReady without a notice: not ours
    ]:
        obj = node_obj(name, "spot", pool="")
        obj["status"]["conditions"] = [{"type": "Ready", "status": ready}]
        if deadline is not None:
            obj["metadata"]["annotations"] = {NOTICE_ANNOTATION: notice(deadline)}
        api.create(obj)
    ctl, task = await run_in_process(api, tmp_path)
    try:
        await eventually(lambda: ctl.ready, timeout=20)

        def taints(name: str) -> list[dict[str, Any]]:
            return node(api, name)["spec"].get("taints") or []

        await eventually(lambda: taints("gone"), timeout=10)
        assert taints("gone") == [{"key": "node.kubernetes.io/out-of-service", "value": "nodeshutdown",
                                   "effect": "NoExecute"}]  # fmt: skip
        await asyncio.sleep(1.5)  # more passes: once
        assert len([r for r in api.requests if r.method == "PATCH" and r.path.endswith("/nodes/gone")]) == 1
        assert patched_nodes(api) == {"gone"}
        await eventually(lambda: "SpotdOutOfService" in events_for(api, "gone"), timeout=5)  # sent in the background
    finally:
        await stop_in_process(ctl, task)


# --- hand-over: a new term decides only after its own first read of every source ---------------------------


async def test_a_leader_that_gets_the_lease_back_reads_every_source_before_deciding(
    api: FakeApiServer,
    tmp_path: Path,
    aws: MotoAws,
) -> None:
    from spotd.capacity.sources.asg import AsgSource
    from spotd.capacity.sources.sqs import SqsSource

    sqs = aws.client("sqs")
    url = sqs.create_queue(QueueName=EVENTS_QUEUE)["QueueUrl"]
    add_node(api, "fallback-1", "on-demand", OLD)
    add_node(api, "spot-1", "spot")
    add_pods(api, "fallback-1", 2)
    hold = node(api, "fallback-1")
    hold["metadata"]["annotations"] = {"spotd.io/drain": "false"}  # nothing to do in the first term
    api.update(hold)
    sources = {"sqs": SqsSource(url, wait_seconds=1), "asgs": AsgSource(history=timedelta(hours=1))}
    ctl, task = await run_in_process(api, tmp_path, sources, probe_quiet_period=0.0)
    try:
        await eventually(lambda: ctl.ready, timeout=20)
        await asyncio.sleep(0.5)
        lease = api.get("Lease", "spotd-controller", "spotd")
        assert lease is not None
        lease["spec"]["holderIdentity"] = "other-leader"
        lease["spec"]["renewTime"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        lease["spec"]["leaseDurationSeconds"] = 60
        api.update(lease)
        await eventually(lambda: not ctl.elector.is_leader.is_set(), timeout=5)
        # A receive in flight at the step-down still completes in its thread (and hides what it got for
        # the visibility timeout): let it end before the other leader's "missed" message arrives.
        await asyncio.sleep(1.5)
        # Meanwhile: Spot ran out in the pool (the other leader has not read it yet), and the node became
        # drainable.
        sqs.send_message(QueueUrl=url, MessageBody=ice_message("m5.large", "us-east-1a", datetime.now(UTC)))
        free = node(api, "fallback-1")
        free["metadata"]["annotations"] = {}
        api.update(free)
        await asyncio.sleep(0.5)
        api.requests.clear()
        lease = api.get("Lease", "spotd-controller", "spotd")
        assert lease is not None
        lease["spec"]["holderIdentity"] = ""  # released: ours again at the next retry
        api.update(lease)
        await eventually(lambda: ctl.elector.is_leader.is_set(), timeout=10)
        await eventually(lambda: ctl.ready, timeout=20)
        # ready comes before the term's first pass; the reason from the first term (drain=false) is still there
        await eventually(lambda: ctl.reasons.get("fallback-1", "").startswith("no Spot capacity: ICE"), timeout=10)
        await asyncio.sleep(1.0)
        assert "fallback-1" not in patched_nodes(api), f"decided on the previous term's pool book: {ctl.reasons}"
        assert ctl.reasons["fallback-1"].startswith("no Spot capacity: ICE")
    finally:
        await stop_in_process(ctl, task)


# --- start-up checks ----------------------------------------------------------------------------------------


def run_controller(tmp_path: Path, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess[str]:
    kubeconfig = tmp_path / "kubeconfig"
    return subprocess.run(
        [*controller_command(), "--kubeconfig", str(kubeconfig), "--listen", "127.0.0.1:0", *extra],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def bare_env(tmp_path: Path) -> dict[str, str]:
    """No AWS settings at all: no region, no credentials, no config files, no instance metadata."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_CONFIG_FILE=str(tmp_path / "no-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-credentials"),
        AWS_EC2_METADATA_DISABLED="true",
    )
    return env


@pytest.mark.usefixtures("api")
def test_no_region_exits_with_one_line(tmp_path: Path) -> None:
    out = run_controller(tmp_path, bare_env(tmp_path))
    assert out.returncode != 0
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines == [
        "spotd controller: error: no AWS region: set AWS_REGION (or AWS_DEFAULT_REGION, or a profile's region)"
    ]


@pytest.mark.usefixtures("api")
def test_no_credentials_exits_with_one_line(tmp_path: Path) -> None:
    env = {**bare_env(tmp_path), "AWS_REGION": "us-east-1"}  # AWS_REGION alone is enough (see run)
    out = run_controller(tmp_path, env)
    assert out.returncode != 0
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("spotd controller: error: no AWS credentials found")


@pytest.mark.usefixtures("api")
def test_a_missing_queue_exits_with_one_line(tmp_path: Path, aws: MotoAws) -> None:
    url = f"{aws.url}/{ACCOUNT}/{EVENTS_QUEUE}"  # the queue the policy grants, never created
    with aws.expect_denied("sqs:GetQueueAttributes"):  # moto cannot match a missing queue's ARN: it refuses
        out = run_controller(tmp_path, dict(os.environ), "--sqs-queue-url", url)
    assert out.returncode != 0
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "SQS queue" in lines[0] and EVENTS_QUEUE in lines[0]


# --- the controller on a node it drains ----------------------------------------------------------------------


@pytest.mark.slow
async def test_a_leader_evicted_by_its_own_drain_hands_it_to_the_standby(
    api: FakeApiServer, tmp_path: Path, procs: list[ControllerProcess], source: str
) -> None:
    import signal

    add_node(api, "od-self", "on-demand", OLD)
    add_node(api, "spot-1", "spot")
    add_pods(api, "od-self", 2)
    api.create(pdb_obj("web", min_available=2, app="web"))  # the drain waits
    first = ControllerProcess(tmp_path, str(tmp_path / "kubeconfig"), "ctl-on-node", queue_url=source)
    first.env["NODE_NAME"] = "od-self"  # this replica runs on the node it drains
    first.start()
    procs.append(first)
    await eventually(lambda: first.events("drain_starting"), timeout=20)
    assert await asyncio.to_thread(first.stop, signal.SIGTERM) == 0  # evicted by its own drain
    held = node(api, "od-self")
    assert held["spec"].get("unschedulable") is True and "spotd.io/draining" in held["metadata"]["annotations"]
    assert first.events("drain_handed_over")

    api.delete("PodDisruptionBudget", "web", "default")
    async with running(replicaset(api, "spot-1")):
        second = ControllerProcess(tmp_path, str(tmp_path / "kubeconfig"), "ctl-standby", queue_url=source).start()
        procs.append(second)  # type: ignore[arg-type]
        await eventually(lambda: second.drains("complete") == 1, timeout=30)
    assert second.events("drain_resumed") and not second.events("drain_abandoned")
    assert not second.events("node_uncordoned")
    assert pods_on(api, "od-self") == [] and node(api, "od-self")["spec"].get("unschedulable") is True


async def test_a_drained_mark_that_cannot_be_written_never_gets_the_node_put_back(
    api: FakeApiServer, tmp_path: Path, source: str
) -> None:
    add_node(api, "fallback-1", "on-demand", OLD)
    add_node(api, "spot-1", "spot")
    add_pods(api, "fallback-1", 2)
    api.create(pdb_obj("web", min_available=2, app="web"))  # holds the drain until the fault is in place
    ctl, task = await run_in_process(api, tmp_path, queue_source(source))
    try:
        await eventually(lambda: node(api, "fallback-1")["spec"].get("unschedulable"), timeout=20)
        api.inject_fault("PATCH", r"/api/v1/nodes/fallback-1$", 503, times=100)  # every mark write fails
        api.delete("PodDisruptionBudget", "web", "default")
        async with running(replicaset(api, "spot-1")):
            await eventually(lambda: "SpotdDrainComplete" in events_for(api, "fallback-1"), timeout=30)
            await asyncio.sleep(1.0)  # later passes
        marked = node(api, "fallback-1")
        assert marked["spec"].get("unschedulable") is True and "spotd.io/draining" in marked["metadata"]["annotations"]
        patches = [r for r in api.requests if r.method == "PATCH" and r.path.endswith("/nodes/fallback-1")]
        assert len(patches) > 2  # the cordon, then the mark write tried again
    finally:
        await stop_in_process(ctl, task)
    api.clear_faults()
    # A new leader knows nothing of it: the node, marked as draining with nothing left to evict, is drained.
    ctl2, task2 = await run_in_process(api, tmp_path, queue_source(source), identity="second")
    try:
        await eventually(lambda: "spotd.io/drained" in node(api, "fallback-1")["metadata"]["annotations"], timeout=20)
        await asyncio.sleep(1.0)
        done = node(api, "fallback-1")
        assert done["spec"].get("unschedulable") is True
        assert "spotd.io/draining" not in done["metadata"]["annotations"]
        assert pods_on(api, "fallback-1") == []
    finally:
        await stop_in_process(ctl2, task2)


async def test_the_hourly_budget_counts_drains_of_nodes_deleted_since(
    api: FakeApiServer, tmp_path: Path, source: str
) -> None:
    """The autoscaler removes a drained node, marks and all: a new leader still counts its drain (Events)."""
    add_node(api, "fallback-1", "on-demand", OLD + timedelta(hours=1))
    add_node(api, "fallback-2", "on-demand", OLD)
    add_node(api, "spot-1", "spot")
    add_pods(api, "fallback-1", 2)
    add_pods(api, "fallback-2", 2)
    ctl, task = await run_in_process(api, tmp_path, queue_source(source), max_drains_per_hour=1)
    try:
        async with running(replicaset(api, "spot-1")):
            await eventually(lambda: "SpotdDrainComplete" in events_for(api, "fallback-1"), timeout=30)
    finally:
        await stop_in_process(ctl, task)
    api.delete("Node", "fallback-1")
    api.requests.clear()
    ctl2, task2 = await run_in_process(api, tmp_path, queue_source(source), identity="second", max_drains_per_hour=1)
    try:
        await eventually(lambda: "fallback-2" in ctl2.reasons, timeout=20)
        await asyncio.sleep(1.0)
        assert ctl2.reasons["fallback-2"] == "--max-drains-per-hour"
        assert "fallback-2" not in patched_nodes(api)
    finally:
        await stop_in_process(ctl2, task2)


@pytest.mark.usefixtures("aws")
async def test_readyz_says_what_may_be_drained(
    api: FakeApiServer, tmp_path: Path, procs: list[ControllerProcess]
) -> None:
    add_node(api, "fallback-1", "on-demand", OLD)
    add_node(api, "spot-1", "spot")
    unscoped = ControllerProcess(tmp_path, str(tmp_path / "kubeconfig"), "ctl-unscoped", "--fallback-selector", "")
    unscoped.start()
    procs.append(unscoped)
    await unscoped.ready(timeout=20)
    status, text = unscoped.http("/readyz")
    assert status == 200 and "no fallback capacity declared" in text and "nothing is drained" in text
    assert unscoped.events("no_fallback_scope")
    assert unscoped.metric("spotd_controller_scope_configured") == 0.0
    await eventually(lambda: unscoped.events("sources_ready"), timeout=20)
    await asyncio.sleep(1.0)
    assert patched_nodes(api) == set()
    unscoped.stop()
    scoped = ControllerProcess(tmp_path, str(tmp_path / "kubeconfig"), "ctl-scoped")
    scoped.start()
    procs.append(scoped)
    await scoped.ready(timeout=20)
    assert "fallback scope: --fallback-selector node-pool=fallback" in scoped.http("/readyz")[1]


async def test_a_node_annotated_to_be_left_alone_mid_drain_is_put_back(
    api: FakeApiServer, tmp_path: Path, source: str
) -> None:
    """Review finding: opt-outs were read only before the cordon; an operator's drain=false must stop it."""
    add_node(api, "fallback-1", "on-demand", OLD)
    add_node(api, "spot-1", "spot")
    add_pods(api, "fallback-1", 2, app="db")
    api.create(pdb_obj("db", min_available=2, app="db"))  # the drain waits on the budget
    ctl, task = await run_in_process(api, tmp_path, queue_source(source), drain_timeout=60.0)
    try:
        await eventually(lambda: "SpotdDrainStarted" in events_for(api, "fallback-1"), timeout=30)
        held = node(api, "fallback-1")
        held["metadata"].setdefault("annotations", {})["spotd.io/drain"] = "false"
        api.update(held)
        await eventually(lambda: "SpotdDrainStopped" in events_for(api, "fallback-1"), timeout=15)
        assert not node(api, "fallback-1")["spec"].get("unschedulable")  # put back before the Event said so
        assert len(pods_on(api, "fallback-1")) == 2
        assert "spotd.io/drain-retry-after" not in (node(api, "fallback-1")["metadata"].get("annotations") or {})
    finally:
        await stop_in_process(ctl, task)


def node_when_announced(api: FakeApiServer, name: str, reasons: set[str]) -> list[tuple[str, dict[str, Any]]]:
    """The node as the API server holds it at the instant each Event with one of `reasons` on it is committed."""
    seen: list[tuple[str, dict[str, Any]]] = []

    def hook(ch: Any) -> None:
        if ch.kind != "Event" or ch.type != "ADDED" or ch.obj.get("reason") not in reasons:
            return
        if (ch.obj.get("involvedObject") or {}).get("name") == name:
            seen.append((str(ch.obj["reason"]), json.loads(json.dumps(node(api, name)))))

    api.store.hooks.append(hook)
    return seen


@pytest.mark.parametrize("outcome", ["complete", "timeout"])
async def test_the_node_is_marked_before_the_event_that_says_how_its_drain_ended(
    api: FakeApiServer, tmp_path: Path, outcome: str, source: str
) -> None:
    """Issue 21: a reader of SpotdDrainComplete finds the node marked drained, and a reader of SpotdDrainStopped
    finds it put back with its back-off, even when the API server is slow to take the patch (the old code
    announced first and wrote the node after)."""
    add_node(api, "fallback-1", "on-demand", OLD)
    add_node(api, "spot-1", "spot")
    add_pods(api, "fallback-1", 2)
    api.create(pdb_obj("web", min_available=2, app="web"))  # holds the drain until the slow patch is in place
    seen = node_when_announced(api, "fallback-1", {"SpotdDrainComplete", "SpotdDrainStopped"})
    ctl, task = await run_in_process(
        api, tmp_path, queue_source(source), drain_timeout=4.0 if outcome == "timeout" else 20.0
    )
    try:
        await eventually(lambda: node(api, "fallback-1")["spec"].get("unschedulable"), timeout=20)
        api.inject_fault("PATCH", r"/api/v1/nodes/fallback-1$", 0, delay=1.0)  # the next node write is slow
        async with running(replicaset(api, "spot-1")):
            if outcome == "complete":
                api.delete("PodDisruptionBudget", "web", "default")
            await eventually(lambda: seen, timeout=30)
    finally:
        await stop_in_process(ctl, task)
    (reason, at_event), *_ = seen
    annotations = at_event["metadata"].get("annotations") or {}
    if outcome == "complete":
        assert reason == "SpotdDrainComplete", seen
        assert "spotd.io/drained" in annotations and "spotd.io/draining" not in annotations, at_event
    else:
        assert reason == "SpotdDrainStopped", seen
        assert not at_event["spec"].get("unschedulable"), at_event
        assert json.loads(annotations["spotd.io/drain-retry-after"])["outcome"] == "timeout", at_event
