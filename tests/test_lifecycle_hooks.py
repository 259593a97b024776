"""ASG lifecycle hooks (issue 19): a terminate action from the queue is completed with CONTINUE only after the
node's drain ends, heartbeated while the drain runs, and resumed by a new leader from the Node annotation.

The controller runs in process (spotd.controller.main.Controller, two replicas for the failover) against the
fake API server under deploy/'s RBAC and moto with IAM enforced (deploy/iam-policy.json). moto 5.2 answers
PutLifecycleHook and DescribeLifecycleHooks but implements neither CompleteLifecycleAction nor
RecordLifecycleActionHeartbeat ("has not been implemented"), and never puts an instance in Terminating:Wait
or sends the lifecycle notification. `LifecycleAws` adds the two calls to moto's Auto Scaling responses as
AWS documents them (the group, the hook and an active action's token must match, else ValidationError "No
active Lifecycle Action found"; result CONTINUE or ABANDON), after moto's IAM check, which still authorises
each call against the controller's policy; the test sends the notification the hook would.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from moto.autoscaling.exceptions import ValidationError
from moto.autoscaling.responses import AutoScalingResponse
from moto.core.responses import EmptyResult

from spotd.capacity.sources.asg import AsgSource
from spotd.capacity.sources.sqs import SqsSource
from spotd.common.parsing import format_time
from spotd.controller.lifecycle import (
    LIFECYCLE_ANNOTATION,
    HookAction,
    heartbeat_interval,
    hook_actions_patch,
    launch_verdict,
    pods_to_drain,
    read_hook_actions,
    terminate_verdict,
)
from spotd.inventory.records import NodeInfo, PodRecord
from spotd.sim.kubeapi.server import FakeApiServer
from tests.agent_harness import eventually, node_obj, pdb_obj, pod_obj
from tests.moto_server import EVENTS_QUEUE, MotoAws, aws, moto_endpoint  # noqa: F401  (pytest fixtures)
from tests.test_capacity_aws import queue_depth, sample, send
from tests.test_controller import api, run_in_process, stop_in_process  # noqa: F401  (pytest fixture)
from tests.test_queue_events import lifecycle

NODE = "ip-10-0-1-10.ec2.internal"
ASG = "spot-workers"
HOOK = "spotd-drain"
TOKEN = "87654321-4321-4321-4321-210987654321"
LAUNCH_TOKEN = "12345678-4321-4321-4321-210987654321"
T0 = datetime(2026, 12, 5, 10, 0, tzinfo=UTC)


# --- pure -----------------------------------------------------------------------------------------------


def test_heartbeat_interval_is_a_third_of_the_hooks_timeout() -> None:
    assert heartbeat_interval(300) == 100
    assert heartbeat_interval(None) == 10  # unknown: AWS's least timeout (30 s)
    assert heartbeat_interval(0) == 10
    assert heartbeat_interval(2) == 1  # never below a second


def test_terminate_verdict_only_after_the_drain_ends() -> None:
    deadline = T0 + timedelta(minutes=2)
    assert not terminate_verdict(True, ["default/web-0"], T0, deadline).complete
    assert terminate_verdict(True, [], T0, deadline) == terminate_verdict(True, (), T0, deadline)
    assert terminate_verdict(True, [], T0, deadline).complete
    late = terminate_verdict(True, ["default/web-0"], deadline, deadline)
    assert late.complete and late.left == ("default/web-0",) and "deadline" in late.reason
    assert terminate_verdict(False, ["default/web-0"], T0, deadline).complete  # the node is gone


def test_launch_verdict() -> None:
    ready = NodeInfo("n", "spot", T0, ready=True)
    booting = NodeInfo("n", "spot", T0, ready=False)
    later = T0 + timedelta(hours=1)
    assert launch_verdict(ready, False, T0, later) == "complete"
    assert launch_verdict(booting, False, T0, later) == "wait"
    assert launch_verdict(None, True, T0, later) == "wait"  # an ASG of ours: its node comes
    assert launch_verdict(None, True, later, later) == "expired"
    assert launch_verdict(None, False, T0, later) == "foreign"


def test_pods_to_drain_leaves_daemonset_mirror_and_finished_pods_out() -> None:
    from spotd.inventory.records import POD_DAEMONSET, POD_MIRROR, POD_TERMINAL, POD_TERMINATING

    def pod(name: str, flags: int) -> PodRecord:
        return PodRecord("default", name, NODE, "Running", "ReplicaSet", "rs", flags)

    pods = [pod("ds", POD_DAEMONSET), pod("mirror", POD_MIRROR), pod("done", POD_TERMINAL)]
    pods += [pod("web", 0), pod("going", POD_TERMINATING)]
    assert pods_to_drain(pods) == ["default/going", "default/web"]


def test_the_annotation_round_trip_and_a_redelivery_keeps_the_first_deadline() -> None:
    action = HookAction(ASG, HOOK, TOKEN, "i-0aaaaaaaaaaaaaaa1", T0, T0 + timedelta(minutes=2), 300.0)
    patch = hook_actions_patch({}, "7", add=action)
    assert patch is not None and patch["metadata"]["resourceVersion"] == "7"
    annotations = patch["metadata"]["annotations"]
    assert read_hook_actions(annotations) == {TOKEN: action}
    again = HookAction(ASG, HOOK, TOKEN, "i-0aaaaaaaaaaaaaaa1", T0 + timedelta(minutes=1), T0 + timedelta(minutes=3))
    assert hook_actions_patch(annotations, "8", add=again) is None
    removed = hook_actions_patch(annotations, "8", remove=TOKEN)
    assert removed is not None and removed["metadata"]["annotations"] == {LIFECYCLE_ANNOTATION: None}
    assert read_hook_actions({LIFECYCLE_ANNOTATION: "{not json"}) == {}
    event = action.event()
    assert (event.kind, event.deadline, event.token) == ("asg-termination", action.deadline, TOKEN)


# --- moto, with the two calls it lacks ------------------------------------------------------------------


@dataclass
class LifecycleAws:
    """Active lifecycle actions by token, and the calls the controller made on them."""

    active: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # token -> (asg, hook, instance)
    heartbeats: list[str] = field(default_factory=list)
    completions: list[tuple[str, str, list[str]]] = field(default_factory=list)  # token, result, pods then
    snapshot: Callable[[], list[str]] = list
    lock: threading.Lock = field(default_factory=threading.Lock)

    def action(self, response: AutoScalingResponse) -> str:
        asg = response._get_param("AutoScalingGroupName")
        hook = response._get_param("LifecycleHookName")
        token = response._get_param("LifecycleActionToken")
        instance = response._get_param("InstanceId")
        backend = response.autoscaling_backend
        if asg not in backend.autoscaling_groups or f"{asg}_{hook}" not in backend.lifecycle_hooks:
            raise ValidationError(f"No active Lifecycle Action found with token {token}")
        with self.lock:
            if self.active.get(token) != (asg, hook, instance):
                raise ValidationError(f"No active Lifecycle Action found with token {token}")
        return str(token)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        fake = self

        def record_lifecycle_action_heartbeat(self: AutoScalingResponse) -> EmptyResult:
            token = fake.action(self)
            with fake.lock:
                fake.heartbeats.append(token)
            return EmptyResult()

        def complete_lifecycle_action(self: AutoScalingResponse) -> EmptyResult:
            token = fake.action(self)
            result = self._get_param("LifecycleActionResult")
            if result not in ("CONTINUE", "ABANDON"):
                raise ValidationError(f"Invalid LifecycleActionResult {result}")
            pods = fake.snapshot()  # the cluster as the completion arrives
            with fake.lock:
                del fake.active[token]
                fake.completions.append((token, result, pods))
            return EmptyResult()

        monkeypatch.setattr(
            AutoScalingResponse, "record_lifecycle_action_heartbeat", record_lifecycle_action_heartbeat, raising=False
        )
        monkeypatch.setattr(AutoScalingResponse, "complete_lifecycle_action", complete_lifecycle_action, raising=False)

    def beats(self) -> int:
        with self.lock:
            return len(self.heartbeats)


@pytest.fixture
def hooks(aws: MotoAws, monkeypatch: pytest.MonkeyPatch) -> Iterator[LifecycleAws]:  # noqa: F811
    fake = LifecycleAws()
    fake.install(monkeypatch)
    yield fake


def make_group(aws: MotoAws, heartbeat_timeout: int) -> str:  # noqa: F811
    """A tagged Spot ASG with one instance and a terminate hook; returns the instance id."""
    ec2 = aws.client("ec2")
    image = ec2.describe_images()["Images"][0]["ImageId"]
    template = ec2.create_launch_template(
        LaunchTemplateName="spot-lt",
        LaunchTemplateData={
            "ImageId": image,
            "InstanceType": "m5.large",
            "InstanceMarketOptions": {"MarketType": "spot"},
        },
    )["LaunchTemplate"]["LaunchTemplateId"]
    autoscaling = aws.client("autoscaling")
    autoscaling.create_auto_scaling_group(
        AutoScalingGroupName=ASG,
        MinSize=0,
        MaxSize=3,
        DesiredCapacity=1,
        AvailabilityZones=["us-east-1a"],
        LaunchTemplate={"LaunchTemplateId": template, "Version": "$Default"},
        Tags=[{"Key": "k8s.io/cluster-autoscaler/enabled", "Value": "true", "PropagateAtLaunch": False}],
    )
    autoscaling.put_lifecycle_hook(
        LifecycleHookName=HOOK,
        AutoScalingGroupName=ASG,
        LifecycleTransition="autoscaling:EC2_INSTANCE_TERMINATING",
        HeartbeatTimeout=heartbeat_timeout,
        DefaultResult="ABANDON",
    )
    (group,) = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[ASG])["AutoScalingGroups"]
    return str(group["Instances"][0]["InstanceId"])


def populate(api: FakeApiServer, iid: str, web: int = 3) -> None:  # noqa: F811
    api.create(node_obj(NODE, "spot", instance_id=iid))
    for i in range(web):
        api.create(pod_obj(f"web-{i}", NODE, labels={"app": "web"}, grace=1))
    api.create(pod_obj("logs-agent", NODE, owner="DaemonSet", labels={"app": "logs"}))
    api.create(pdb_obj("web", min_available=web))  # no eviction allowed: the drain runs until it goes


def pods_on_node(api: FakeApiServer) -> list[str]:  # noqa: F811
    return sorted(p["metadata"]["name"] for p in api.list("Pod") if p["spec"].get("nodeName") == NODE)


def snapshot_in(api: FakeApiServer, loop: asyncio.AbstractEventLoop) -> Callable[[], list[str]]:  # noqa: F811
    """The node's pods read in the API server's own loop, while moto's thread waits for them."""

    async def read() -> list[str]:
        return pods_on_node(api)

    return lambda: asyncio.run_coroutine_threadsafe(read(), loop).result(timeout=10)


def terminate_notice(iid: str) -> str:
    event = lifecycle("terminate", EC2InstanceId=iid, AutoScalingGroupName=ASG, LifecycleHookName=HOOK)
    event["detail"]["LifecycleActionToken"] = TOKEN
    event["time"] = format_time(datetime.now(UTC))
    return json.dumps(event)


def sources(queue_url: str) -> dict[str, Any]:
    return {"sqs": SqsSource(queue_url, wait_seconds=1), "asgs": AsgSource()}


SETTINGS: dict[str, Any] = {
    "agent_ack_timeout": 0.5,  # no agent on the node: the controller drains it
    "asg_termination_window": 300.0,  # the drain's deadline, far beyond the test
    "activities_interval": 2.0,
    "sqs_wait": 1,
}


@pytest.fixture
def queue(aws: MotoAws) -> str:  # noqa: F811
    sqs = aws.client("sqs")
    return str(sqs.create_queue(QueueName=EVENTS_QUEUE, Attributes={"VisibilityTimeout": "5"})["QueueUrl"])


async def test_terminate_completed_only_after_the_drain_and_heartbeated_while_it_runs(
    api: FakeApiServer,  # noqa: F811
    tmp_path: Path,
    aws: MotoAws,  # noqa: F811
    queue: str,
    hooks: LifecycleAws,
) -> None:
    iid = make_group(aws, heartbeat_timeout=3)  # a heartbeat every second
    populate(api, iid)
    hooks.snapshot = snapshot_in(api, asyncio.get_running_loop())
    hooks.active[TOKEN] = (ASG, HOOK, iid)
    continued = sample("spotd_lifecycle_actions_total", {"transition": "terminate", "outcome": "continue"})
    ctl, task = await run_in_process(api, tmp_path, sources(queue), identity="ctl-a", **SETTINGS)
    try:
        await eventually(lambda: ctl.ready, timeout=20)
        send(aws, queue, terminate_notice(iid))
        await eventually(lambda: hooks.beats() >= 3, timeout=20)  # the PDB holds the drain
        assert hooks.completions == []
        assert len(pods_on_node(api)) == 4
        recorded = read_hook_actions(api.get("Node", NODE)["metadata"]["annotations"])
        assert list(recorded) == [TOKEN] and recorded[TOKEN].heartbeat_timeout == 3.0
        assert queue_depth(aws, queue) == 0  # acknowledged once written on the Node
        api.delete("PodDisruptionBudget", "web", "default")  # the drain can end now
        await eventually(lambda: hooks.completions, timeout=30)
        assert hooks.completions == [(TOKEN, "CONTINUE", ["logs-agent"])]  # after the last pod went
        # The Event announces a finished action: by then it is off the Node (nothing left for a new leader)
        await eventually(lambda: "SpotdLifecycleContinued" in [e.get("reason") for e in api.list("Event")])
        assert LIFECYCLE_ANNOTATION not in api.get("Node", NODE)["metadata"]["annotations"]
        assert (
            sample("spotd_lifecycle_actions_total", {"transition": "terminate", "outcome": "continue"}) == continued + 1
        )
        beats = hooks.beats()
        await asyncio.sleep(1.5)  # more than a heartbeat interval: none after the completion
        assert hooks.beats() == beats
    finally:
        await stop_in_process(ctl, task)


async def test_a_failover_mid_drain_resumes_heartbeats_and_completion_from_the_node(
    api: FakeApiServer,  # noqa: F811
    tmp_path: Path,
    aws: MotoAws,  # noqa: F811
    queue: str,
    hooks: LifecycleAws,
) -> None:
    iid = make_group(aws, heartbeat_timeout=3)
    populate(api, iid)
    hooks.snapshot = snapshot_in(api, asyncio.get_running_loop())
    hooks.active[TOKEN] = (ASG, HOOK, iid)
    a, a_task = await run_in_process(api, tmp_path, sources(queue), identity="ctl-a", **SETTINGS)
    b = b_task = None
    try:
        await eventually(lambda: a.ready, timeout=20)
        b, b_task = await run_in_process(api, tmp_path, sources(queue), identity="ctl-b", **SETTINGS)
        await eventually(lambda: b.inventory.synced, timeout=20)
        send(aws, queue, terminate_notice(iid))
        await eventually(lambda: hooks.beats() >= 2, timeout=20)
        assert queue_depth(aws, queue) == 0  # the message is gone: B can only learn it from the Node
        assert not b.elector.is_leader.is_set()
        await stop_in_process(a, a_task)  # the leader goes mid-drain; B takes the Lease
        await eventually(lambda: b.elector.is_leader.is_set(), timeout=20)
        after_a = hooks.beats()
        await eventually(lambda: hooks.beats() >= after_a + 2, timeout=20)  # B's heartbeats, same token
        assert hooks.completions == []
        assert len(pods_on_node(api)) == 4
        api.delete("PodDisruptionBudget", "web", "default")
        await eventually(lambda: hooks.completions, timeout=30)  # B's takeover drains, then completes
        assert hooks.completions == [(TOKEN, "CONTINUE", ["logs-agent"])]
    finally:
        if b is not None and b_task is not None:
            await stop_in_process(b, b_task)
        if not a_task.done():
            await stop_in_process(a, a_task)


async def test_a_launch_action_waits_in_the_queue_until_its_node_is_ready(
    api: FakeApiServer,  # noqa: F811
    tmp_path: Path,
    aws: MotoAws,  # noqa: F811
    queue: str,
    hooks: LifecycleAws,
) -> None:
    iid = make_group(aws, heartbeat_timeout=600)
    aws.client("autoscaling").put_lifecycle_hook(
        LifecycleHookName="spotd-launch",
        AutoScalingGroupName=ASG,
        LifecycleTransition="autoscaling:EC2_INSTANCE_LAUNCHING",
        HeartbeatTimeout=600,
    )
    hooks.active[LAUNCH_TOKEN] = (ASG, "spotd-launch", iid)
    hooks.snapshot = snapshot_in(api, asyncio.get_running_loop())
    deferred = sample("spotd_sqs_messages_total", {"outcome": "deferred"})
    event = lifecycle("launch", EC2InstanceId=iid, AutoScalingGroupName=ASG, LifecycleHookName="spotd-launch")
    event["detail"]["LifecycleActionToken"] = LAUNCH_TOKEN
    event["time"] = format_time(datetime.now(UTC))
    settings = {**SETTINGS, "complete_launch_hooks": True}
    ctl, task = await run_in_process(api, tmp_path, sources(queue), identity="ctl-a", **settings)
    try:
        await eventually(lambda: ctl.ready, timeout=20)
        send(aws, queue, json.dumps(event))
        # no node for the instance yet (it boots): kept in the queue, not completed, not foreign
        await eventually(lambda: sample("spotd_sqs_messages_total", {"outcome": "deferred"}) > deferred, timeout=20)
        assert hooks.completions == [] and queue_depth(aws, queue) == 1
        api.create(node_obj(NODE, "spot", instance_id=iid, ready=False))
        api.create(pod_obj("logs-agent", NODE, owner="DaemonSet", labels={"app": "logs"}))
        await eventually(lambda: sample("spotd_sqs_messages_total", {"outcome": "deferred"}) > deferred + 1, timeout=20)
        assert hooks.completions == []  # registered, not Ready
        node = api.get("Node", NODE)
        node["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
        api.update(node)
        await eventually(lambda: hooks.completions, timeout=30)  # the message came back: the node is Ready
        assert hooks.completions == [(LAUNCH_TOKEN, "CONTINUE", ["logs-agent"])]
        await eventually(lambda: queue_depth(aws, queue) == 0, timeout=10)
    finally:
        await stop_in_process(ctl, task)
