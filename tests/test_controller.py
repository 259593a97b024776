"""End to end: the real `spotd controller` process(es) against the fake API server and moto (SQS, ASG, EC2).

Covers: only the lease holder acts and a standby takes over after kill -9; an ICE from SQS keeps the
on-demand nodes of its pool; a new Spot node plus the cooldown lets the oldest on-demand node go, with
its PDB honoured; malformed and unknown SQS messages are counted and deleted; SIGTERM mid-drain
uncordons; a restart after kill -9 mid-drain recovers the node; --dry-run changes nothing.
The controller processes sign as the IAM user whose only policy is deploy/iam-policy.json (tests/moto_server.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from spotd.common.parsing import format_time
from spotd.sim import builders
from spotd.sim.kubeapi.server import FakeApiServer
from tests.agent_harness import DEPLOY, LOG_RUNS, AgentProcess, eventually, pdb_obj, pod_obj
from tests.moto_server import EVENTS_QUEUE, MotoAws, aws, moto_endpoint  # noqa: F401  (pytest fixtures)

OLD = timedelta(hours=5)
# Short enough that a failover test waits seconds, long enough that a loaded machine's stall of a few seconds
# (two suites and stress-ng on two cores: a 2 s renew deadline was missed once, mid-drain) is not a lost lease
LEASE = {"duration": 6.0, "renew_deadline": 4.0, "retry": 0.3}


def node_obj(
    name: str, capacity: str, itype: str = "m5.large", zone: str = "us-east-1a", pool: str = "fallback"
) -> dict[str, Any]:
    """A Ready node; on-demand ones are in the node-pool=fallback group (the tests' --fallback-selector)."""
    labels = {"node-pool": pool} if capacity == "on-demand" and pool else {}
    return builders.node(
        name, capacity, capacity_label=builders.KARPENTER_CAPACITY_LABEL, instance_type=itype, zone=zone, labels=labels
    )


def add_node(api: FakeApiServer, name: str, capacity: str, age: timedelta = timedelta(0), **kw: str) -> None:
    """The API server stamps creationTimestamp itself: reach into its store to age the node."""
    api.create(node_obj(name, capacity, **kw))
    if age:
        stored = api.store.get("Node", "", name)
        stored["metadata"]["creationTimestamp"] = format_time(datetime.now(UTC) - age)[:19] + "Z"


def add_pods(api: FakeApiServer, node: str, count: int, app: str = "web", **kw: Any) -> None:
    for i in range(count):
        pod = pod_obj(f"{app}-{node}-{i}", node, labels={"app": app}, grace=1, **kw)
        pod["metadata"]["ownerReferences"][0]["name"] = f"{app}-rs"
        api.create(pod)


async def replicaset(api: FakeApiServer, spot_node: str, hold: asyncio.Event | None = None) -> None:
    """Stand-in for the ReplicaSet controller and the scheduler: a deleted pod comes back on the Spot node
    (once `hold` is set, when given: a test that asserts a PDB refusal keeps the replacements from running
    until one has been refused, or the race between a replacement and the next eviction decides it)."""
    count = 0
    async for kind, obj in api.subscribe():
        if kind != "DELETED" or obj.get("kind") != "Pod" or obj["spec"].get("nodeName") == spot_node:
            continue
        if hold is not None:
            await hold.wait()
        count += 1
        app = obj["metadata"].get("labels", {}).get("app", "web")
        pod = pod_obj(f"{app}-r{count}", spot_node, labels={"app": app}, grace=1)
        pod["metadata"]["ownerReferences"] = obj["metadata"].get("ownerReferences")
        api.create(pod)


def ice_message(itype: str, zone: str, at: datetime) -> str:
    when = format_time(at)
    return json.dumps(
        {
            "version": "0",
            "id": f"ice-{itype}-{zone}",
            "detail-type": "EC2 Instance Launch Unsuccessful",
            "source": "aws.autoscaling",
            "time": when,
            "region": "us-east-1",
            "detail": {
                "StatusCode": "Failed",
                "AutoScalingGroupName": "eks-spot",
                "ActivityId": f"act-{itype}-{zone}",
                "Details": {"Availability Zone": zone},
                "StatusMessage": (
                    f"We currently do not have sufficient {itype} capacity in the Availability Zone you requested "
                    f"({zone}). Our system will be working on provisioning additional capacity. Launching EC2 "
                    "instance failed."
                ),
                "StartTime": when,
                "EndTime": when,
            },
        }
    )


def controller_command() -> list[str]:
    return [sys.executable, "-m", "spotd", "controller"]


class ControllerProcess(AgentProcess):
    """`python -m spotd controller` with short timings, logs to a file."""

    def __init__(self, tmp: Path, kubeconfig: str, identity: str, *extra: str, queue_url: str = "") -> None:
        self._port = 0
        self.identity = identity
        self.log_path = tmp / f"controller-{identity}-{next(LOG_RUNS)}.log"
        self.args = [
            *controller_command(),
            "--kubeconfig", kubeconfig,
            "--listen", "127.0.0.1:0",
            "--lease-namespace", "spotd",
            "--min-on-demand-age", "1h",
            "--ice-cooldown", "8s",
            "--lease-duration", f"{LEASE['duration']}s",
            "--lease-renew-deadline", f"{LEASE['renew_deadline']}s",
            "--lease-renew-period", "0.5s",
            "--lease-retry-period", f"{LEASE['retry']}s",
            "--interval", "0.3s",
            "--sqs-wait", "1s",
            "--activities-interval", "2s",
            "--drain-timeout", "40s",
            "--probe-quiet-period", "0",
            "--surge-timeout", "0",  # drain-then-replace: no scheduler here to run placeholders
            "--fallback-selector", "node-pool=fallback",
            "--log-level", "info",
            *(["--sqs-queue-url", queue_url] if queue_url else []),
            *extra,
        ]  # fmt: skip
        self.env = {**os.environ, "POD_NAME": identity}
        self.proc = None

    def leading(self) -> bool:
        return self.metric("spotd_leader", identity=self.identity) == 1.0

    def drains(self, outcome: str) -> float:
        return self.metric("spotd_controller_drains_total", outcome=outcome) or 0.0


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[FakeApiServer]:
    server = FakeApiServer(host="127.0.0.1", port=0, termination_scale=0.2)
    await server.start()
    # The controller as deployed: its ServiceAccount's token, under deploy/'s RBAC and admission policies.
    server.load_manifests([DEPLOY])
    token = server.service_account_token("spotd", "spotd-controller")
    server.write_kubeconfig(tmp_path / "kubeconfig", token=token)
    yield server
    await server.stop()


@pytest.fixture
def procs() -> Iterator[list[ControllerProcess]]:
    started: list[ControllerProcess] = []
    yield started
    for p in started:
        p.stop(signal.SIGKILL, timeout=5)


@pytest.fixture
def queue(aws: MotoAws) -> Any:  # noqa: F811
    sqs = aws.client("sqs")  # the test's hand; the controller signs as its own IAM user (the environment)
    url = sqs.create_queue(QueueName=EVENTS_QUEUE)["QueueUrl"]
    return sqs, url


@pytest.fixture
def source(aws: MotoAws) -> str:  # noqa: F811
    """A capacity source for the controller under test (issue 19: without one it reads no pool as Spot
    available and drains nothing): moto's queue, empty; its URL."""
    return str(aws.client("sqs").create_queue(QueueName=EVENTS_QUEUE)["QueueUrl"])


def queue_source(url: str, **more: Any) -> dict[str, Any]:
    """run_in_process's sources: the queue at url (and whatever else the test hands the Controller)."""
    from spotd.capacity.sources.sqs import SqsSource

    return {"sqs": SqsSource(url, wait_seconds=1), **more}


def start(
    procs: list[ControllerProcess], tmp: Path, identity: str, *extra: str, queue_url: str = ""
) -> ControllerProcess:
    p = ControllerProcess(tmp, str(tmp / "kubeconfig"), identity, *extra, queue_url=queue_url).start()
    procs.append(p)  # type: ignore[arg-type]
    return p  # type: ignore[return-value]


def node(api: FakeApiServer, name: str) -> dict[str, Any]:
    found = api.get("Node", name)
    assert found is not None
    return found


def pods_on(api: FakeApiServer, name: str) -> list[str]:
    return [p["metadata"]["name"] for p in api.list("Pod") if p["spec"].get("nodeName") == name]


def the_lease(api: FakeApiServer) -> dict[str, Any]:
    """The election's Lease (the namespace also holds the pool book's, spotd-pool-book)."""
    lease = api.get("Lease", "spotd-controller", "spotd")
    assert lease is not None
    return lease


def lease_time(lease: dict[str, Any], field: str) -> datetime:
    return datetime.fromisoformat(lease["spec"][field].replace("Z", "+00:00"))


def events_for(api: FakeApiServer, name: str) -> list[str]:
    return [e.get("reason", "") for e in api.list("Event") if e.get("involvedObject", {}).get("name") == name]


@contextlib.asynccontextmanager
async def running(coro: Any) -> AsyncIterator[None]:
    task = asyncio.create_task(coro)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.mark.slow
async def test_only_the_leader_acts_and_the_standby_takes_over(
    api: FakeApiServer,
    tmp_path: Path,
    procs: list[ControllerProcess],
    source: str,
) -> None:
    add_node(api, "spot-1", "spot")
    add_node(api, "od-1", "on-demand", OLD + timedelta(hours=1))
    add_node(api, "od-2", "on-demand", OLD)
    add_node(api, "od-3", "on-demand", OLD - timedelta(hours=1))
    add_pods(api, "od-1", 2)
    add_pods(api, "od-2", 2)
    add_pods(api, "od-3", 2)
    async with running(replicaset(api, "spot-1")):
        a = start(procs, tmp_path, "ctl-a", "--max-drains-per-hour", "1", queue_url=source)
        await eventually(a.leading, timeout=20)
        b = start(procs, tmp_path, "ctl-b", "--max-drains-per-hour", "2", queue_url=source)
        await b.ready(timeout=20)
        # A drains the oldest, then its hourly budget holds the second.
        await eventually(lambda: a.drains("complete") == 1, timeout=30)
        assert pods_on(api, "od-1") == [] and len(pods_on(api, "od-2")) == 2 == len(pods_on(api, "od-3"))
        assert node(api, "od-1")["spec"].get("unschedulable") is True
        assert "spotd.io/drained" in node(api, "od-1")["metadata"]["annotations"]
        await eventually(lambda: "SpotdDrainStarted" in events_for(api, "od-1"), timeout=5)  # sent in the background
        assert not b.leading() and b.events("drain_starting") == []
        assert b.metric("spotd_controller_drains_total", outcome="complete") == 0.0

        renewed = lease_time(the_lease(api), "renewTime")  # A's last renewal or an earlier one
        a.stop(signal.SIGKILL)
        await eventually(b.leading, timeout=10, interval=0.05)
        taken = the_lease(api)
        assert taken["spec"]["holderIdentity"] == "ctl-b"
        # No release after kill -9: B got the lease by its expiry, never before it.
        assert lease_time(taken, "acquireTime") >= renewed + timedelta(seconds=LEASE["duration"])
        await eventually(lambda: b.drains("complete") == 1, timeout=30)
        assert pods_on(api, "od-2") == []
        assert [e["node"] for e in b.events("drain_starting")] == ["od-2"]

        # The hourly budget is read from the nodes: A's drain counts for B too (2 = A's + B's).
        def od3_kept() -> list[str]:
            return [e["reason"] for e in b.events("node_kept") if e["node"] == "od-3"][-1:]

        await eventually(lambda: od3_kept() == ["--max-drains-per-hour (2) reached"], timeout=10)
        assert len(pods_on(api, "od-3")) == 2
        assert [e["node"] for e in a.events("drain_starting")] == ["od-1"]


@pytest.mark.slow
async def test_ice_keeps_its_pool_and_a_spot_launch_plus_cooldown_drains_the_oldest(
    api: FakeApiServer, tmp_path: Path, queue: Any, procs: list[ControllerProcess]
) -> None:
    sqs, url = queue
    now = datetime.now(UTC)
    add_node(api, "od-c5", "on-demand", OLD + timedelta(hours=2), itype="c5.large", zone="us-east-1b")  # oldest
    add_node(api, "od-old", "on-demand", OLD)
    add_node(api, "od-young", "on-demand")
    add_pods(api, "od-c5", 2, app="batch")
    add_pods(api, "od-old", 3)
    add_pods(api, "od-young", 1)
    api.create(pdb_obj("web", min_available=2, app="web"))  # 3 web pods: one at a time
    sqs.send_message(QueueUrl=url, MessageBody=ice_message("m5.large", "us-east-1a", now - timedelta(seconds=5)))
    sqs.send_message(QueueUrl=url, MessageBody=ice_message("c5.large", "us-east-1b", now - timedelta(seconds=5)))
    sqs.send_message(QueueUrl=url, MessageBody="this is not json")
    sqs.send_message(QueueUrl=url, MessageBody=json.dumps({"detail-type": "EC2 Instance Terminate Successful",
                                                           "source": "aws.autoscaling", "detail": {}}))  # fmt: skip
    c = start(procs, tmp_path, "ctl", queue_url=url)
    await eventually(lambda: c.events("sources_ready"), timeout=20)
    await eventually(lambda: c.metric("spotd_sqs_messages_total", outcome="malformed") == 1.0, timeout=10)
    assert c.metric("spotd_sqs_messages_total", outcome="ignored") == 1.0
    assert c.metric("spotd_ice_signals_total", pool="m5.large/us-east-1a", source="sqs") == 1.0
    attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"])
    assert attrs["Attributes"]["ApproximateNumberOfMessages"] == "0"

    def kept() -> dict[str, str]:
        return {e["node"]: e["reason"] for e in c.events("node_kept")}

    # sources_ready comes before the first decision pass: wait for the pass that keeps all three
    await eventually(lambda: kept().keys() >= {"od-c5", "od-old", "od-young"}, timeout=10)
    await asyncio.sleep(2.0)  # more passes: still nothing drained
    assert c.events("drain_starting") == []
    reasons, ice = kept(), "no Spot capacity: ICE"
    assert reasons["od-c5"].startswith(ice) and reasons["od-old"].startswith(ice)
    assert reasons["od-young"].startswith("younger than")

    replacements = asyncio.Event()
    async with running(replicaset(api, "spot-new", hold=replacements)):
        add_node(api, "spot-new", "spot")  # a Spot node of m5.large/us-east-1a joins: LAUNCHED (source node)
        # no replacement runs yet: the PDB must refuse an eviction before the drain can go on
        await eventually(lambda: c.events("eviction_refused"), timeout=40)
        assert c.drains("complete") == 0
        replacements.set()
        await eventually(lambda: c.drains("complete") == 1, timeout=40)
    assert [e["node"] for e in c.events("drain_starting")] == ["od-old"]
    assert pods_on(api, "od-old") == [] and len(pods_on(api, "od-c5")) == 2 and len(pods_on(api, "od-young")) == 1
    assert node(api, "od-c5")["spec"].get("unschedulable") in (None, False)
    assert not [r for r in api.requests if r.method == "DELETE" and "/pods/" in r.path]  # evictions only
    await eventually(lambda: set(events_for(api, "od-old")) >= {"SpotdDrainStarted", "SpotdDrainComplete"})
    assert c.metric("spotd_nodes", capacity_type="on-demand") == 3.0
    assert c.metric("spotd_pool_spot_available", pool="c5.large/us-east-1b") == 0.0


@pytest.mark.slow
async def test_sigterm_mid_drain_uncordons_and_a_restart_after_kill_recovers(
    api: FakeApiServer,
    tmp_path: Path,
    procs: list[ControllerProcess],
    source: str,
) -> None:
    add_node(api, "od-old", "on-demand", OLD)
    add_node(api, "spot-0", "spot")  # Spot is known in the pool
    add_pods(api, "od-old", 2)
    api.create(pdb_obj("web", min_available=2, app="web"))  # nothing may go: the drain hangs
    c = start(procs, tmp_path, "ctl-1", queue_url=source)
    await eventually(lambda: node(api, "od-old")["spec"].get("unschedulable"), timeout=20)
    assert "spotd.io/draining" in node(api, "od-old")["metadata"]["annotations"]
    assert await asyncio.to_thread(c.stop, signal.SIGTERM) == 0
    uncordoned = node(api, "od-old")
    assert not uncordoned["spec"].get("unschedulable")
    assert "spotd.io/draining" not in (uncordoned["metadata"].get("annotations") or {})
    assert len(pods_on(api, "od-old")) == 2

    c2 = start(procs, tmp_path, "ctl-2", queue_url=source)
    await eventually(lambda: c2.events("drain_starting"), timeout=20)
    c2.stop(signal.SIGKILL)  # no chance to clean up: the marker stays
    assert node(api, "od-old")["spec"].get("unschedulable") is True

    api.delete("PodDisruptionBudget", "web", "default")
    async with running(replicaset(api, "spot-1")):
        add_node(api, "spot-1", "spot")
        c3 = start(procs, tmp_path, "ctl-3", queue_url=source)
        await eventually(lambda: c3.events("drain_resumed"), timeout=60)  # after ctl-2's lease runs out
        await eventually(lambda: c3.drains("complete") == 1, timeout=30)
    assert pods_on(api, "od-old") == []


@pytest.mark.slow
async def test_dry_run_changes_nothing(
    api: FakeApiServer,
    tmp_path: Path,
    procs: list[ControllerProcess],
    source: str,
) -> None:
    add_node(api, "od-old", "on-demand", OLD)
    add_node(api, "spot-0", "spot")
    add_pods(api, "od-old", 2)
    c = start(procs, tmp_path, "ctl", "--dry-run", queue_url=source)
    await eventually(lambda: c.events("would_drain"), timeout=20)
    await asyncio.sleep(1.0)
    assert not node(api, "od-old")["spec"].get("unschedulable")
    assert len(pods_on(api, "od-old")) == 2
    assert not [r for r in api.requests if r.method in ("POST", "PATCH", "PUT", "DELETE") and "/leases" not in r.path]


def test_bad_flag_values_fail_at_start(tmp_path: Path) -> None:
    out = subprocess.run(
        [*controller_command(), "--min-on-demand-age", "abc"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert "--min-on-demand-age" in out.stderr and "'abc' is not a duration" in out.stderr


@pytest.mark.slow
async def test_new_ice_during_a_drain_stops_it_and_a_drain_timeout_gives_up(
    api: FakeApiServer, tmp_path: Path, queue: Any, procs: list[ControllerProcess]
) -> None:
    sqs, url = queue
    add_node(api, "od-old", "on-demand", OLD)
    add_node(api, "spot-0", "spot")
    add_pods(api, "od-old", 2)
    api.create(pdb_obj("web", min_available=2, app="web"))  # the drain cannot finish
    c = start(procs, tmp_path, "ctl", queue_url=url)
    await eventually(lambda: c.events("drain_starting"), timeout=20)
    sqs.send_message(QueueUrl=url, MessageBody=ice_message("m5.xlarge", "us-east-1a", datetime.now(UTC)))
    await eventually(lambda: c.drains("aborted_ice") == 1, timeout=15)
    await eventually(lambda: not node(api, "od-old")["spec"].get("unschedulable"), timeout=5)
    await eventually(lambda: "SpotdDrainStopped" in events_for(api, "od-old"))
    assert len(pods_on(api, "od-old")) == 2
    await asyncio.to_thread(c.stop, signal.SIGTERM)

    t = start(procs, tmp_path, "ctl-t", "--drain-timeout", "2s", "--ice-cooldown", "0s", queue_url=url)
    await eventually(lambda: t.drains("timeout") >= 1, timeout=30)
    await eventually(lambda: not node(api, "od-old")["spec"].get("unschedulable"), timeout=5)
    assert len(pods_on(api, "od-old")) == 2  # PDB honoured to the letter: nothing forced


def test_config_from_flags_env_and_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import argparse

    from spotd.controller import main as controller

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\nclusters: [{name: c, cluster: {server: 'http://127.0.0.1:1'}}]\n"
        "contexts: [{name: c, context: {cluster: c, user: u}}]\nusers: [{name: u, user: {}}]\n"
    )
    monkeypatch.setenv("SPOTD_KUBECONFIG", str(kubeconfig))
    monkeypatch.setenv("SPOTD_MAX_CONCURRENT_DRAINS", "3")
    monkeypatch.setenv("SPOTD_DRY_RUN", "true")
    monkeypatch.setenv("POD_NAME", "pod-x")
    parser = argparse.ArgumentParser()
    controller.add_arguments(parser)
    config = controller.config_from_args(
        parser.parse_args(["--min-on-demand-age", "3h", "--max-concurrent-drains", "2"])
    )
    assert config.min_on_demand_age == 3 * 3600 and config.max_concurrent_drains == 2  # the flag wins
    assert config.dry_run and config.identity == "pod-x" and config.ice_cooldown == 900
    assert config.asg_tags == (("k8s.io/cluster-autoscaler/enabled", "true"),)
    for argv, message in [
        (["--min-on-demand-age", "abc"], "--min-on-demand-age: 'abc' is not a duration"),
        (["--ice-cooldown=-5m"], "--ice-cooldown"),
        (["--max-drains-per-hour", "0"], "--max-drains-per-hour: 0 is below 1"),
        (["--listen", "nope"], "--listen"),
        (["--lease-duration", "5s", "--lease-renew-deadline", "10s"], "lease timings"),
        (["--kubeconfig", str(tmp_path / "missing")], "--kubeconfig: cannot load Kubernetes credentials"),
    ]:
        with pytest.raises(ValueError, match=message):
            controller.config_from_args(parser.parse_args(argv))


# --- the active probe, in process (the pool book is reachable) -------------------------------------------


async def run_in_process(
    api: FakeApiServer, tmp_path: Path, sources: dict[str, Any] | None = None, **overrides: Any
) -> tuple[Any, asyncio.Task[Any]]:
    sources = sources or {}
    from spotd.controller.config import ControllerConfig
    from spotd.controller.main import Controller
    from spotd.controller.policy import parse_label_selector
    from spotd.kube.client import make_client

    settings: dict[str, Any] = {
        "kubeconfig": str(tmp_path / "kubeconfig"),
        "identity": "probe-test",
        "lease_namespace": "spotd",
        "min_on_demand_age": 3600.0,
        "ice_cooldown": 60.0,
        "interval": 0.2,
        "lease_duration": LEASE["duration"],
        "lease_renew_deadline": LEASE["renew_deadline"],
        "lease_renew_period": 0.5,
        "lease_retry_period": 0.3,
        "probe_quiet_period": 1.0,
        "probe_settle": 5.0,
        "drain_timeout": 20.0,
        "surge_timeout": 0.0,  # drain-then-replace; tests/test_make_before_break.py runs the surge
        "fallback_selector": parse_label_selector("node-pool=fallback"),
        "fallback_selector_text": "node-pool=fallback",
        **overrides,
    }
    ctl = Controller(ControllerConfig(**settings), make_client(settings["kubeconfig"]), **sources)

    async def main() -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(ctl.elector.run())
            group.create_task(ctl.inventory.run())
            group.create_task(ctl.leadership())

    return ctl, asyncio.create_task(main())


async def stop_in_process(ctl: Any, task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await ctl.client.close()


@pytest.mark.parametrize(("landing", "on_spot"), [("spot-other", True), ("od-other", False)])
async def test_active_probe_drains_one_node_and_reads_where_its_pods_land(
    api: FakeApiServer, tmp_path: Path, landing: str, on_spot: bool, source: str
) -> None:
    from spotd.capacity.signals import CapacitySignal, Pool, SignalKind

    add_node(api, "od-a", "on-demand", OLD + timedelta(hours=1))
    add_node(api, "od-b", "on-demand", OLD)
    add_node(api, "spot-other", "spot", itype="r5.large", zone="us-east-1c")  # another pool: no LAUNCHED here
    add_node(api, "od-other", "on-demand", itype="r5.large", zone="us-east-1c")
    add_pods(api, "od-a", 2)
    add_pods(api, "od-b", 2)
    pool = Pool("m5.large", "us-east-1a")
    ctl, task = await run_in_process(api, tmp_path, queue_source(source), max_concurrent_drains=2)
    try:
        await eventually(lambda: ctl.ready, timeout=20)  # a term starts from a fresh book: signal after it
        ice = CapacitySignal(pool, SignalKind.ICE, "sqs", datetime.now(UTC) - timedelta(seconds=30), "capacity")
        ctl.on_signals([ice])
        async with running(replicaset(api, landing)):
            await eventually(lambda: ctl.book.get(pool) and ctl.book.get(pool).last_probe, timeout=30)
        record = ctl.book.get(pool)
        assert pods_on(api, "od-a") == []  # the oldest was the probe
        if on_spot:
            assert record.launch_source == "probe" and record.probe_failures == 0
            # Spot is back for the pool (after the cooldown); here the cooldown is long, so nothing else yet.
        else:
            assert record.probe_failures == 1 and record.last_launch is None
        assert len(pods_on(api, "od-b")) == 2  # a single node per probe, even with two drains allowed
    finally:
        await stop_in_process(ctl, task)


@pytest.mark.slow
async def test_a_leader_that_loses_its_lease_stops_at_once_and_leaves_the_node_marked(
    api: FakeApiServer, tmp_path: Path, procs: list[ControllerProcess], source: str
) -> None:
    add_node(api, "od-old", "on-demand", OLD)
    add_node(api, "spot-0", "spot")
    add_pods(api, "od-old", 2)
    api.create(pdb_obj("web", min_available=2, app="web"))  # the drain hangs
    c = start(procs, tmp_path, "ctl", queue_url=source)
    await eventually(lambda: c.events("drain_starting"), timeout=20)
    lease = api.get("Lease", "spotd-controller", "spotd")
    assert lease is not None
    lease["spec"]["holderIdentity"] = "intruder"
    lease["spec"]["renewTime"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    lease["spec"]["leaseDurationSeconds"] = 60
    api.update(lease)
    await eventually(lambda: c.events("drain_interrupted"), timeout=5)
    assert c.events("drain_interrupted")[0]["leading"] is False
    assert c.metric("spotd_leader", identity="ctl") == 0.0
    marked = node(api, "od-old")
    assert marked["spec"].get("unschedulable") is True  # not ours to touch any more: the next leader recovers it
    assert "spotd.io/draining" in marked["metadata"]["annotations"]


# --- one decision pass, in process, no I/O ---------------------------------------------------------------


class RecordingAlerter:
    def __init__(self) -> None:
        self.fired: list[Any] = []
        self.resolved: list[tuple[str, dict[str, str]]] = []

    def fire(self, alert: Any) -> None:
        self.fired.append(alert)

    def resolve(self, alertname: str, labels: dict[str, str]) -> None:
        self.resolved.append((alertname, dict(labels)))


def test_decision_pass_signals_verdicts_metrics_and_alerts(tmp_path: Path, source: str) -> None:
    from spotd.capacity.signals import CapacitySignal, Pool, SignalKind
    from spotd.capacity.sources.sqs import SqsSource
    from spotd.controller.config import ControllerConfig
    from spotd.controller.main import Controller
    from spotd.controller.policy import parse_label_selector
    from spotd.kube.client import make_client

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": "http://127.0.0.1:9"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    now = datetime.now(UTC)
    alerter = RecordingAlerter()
    ctl = Controller(
        ControllerConfig(
            kubeconfig=str(kubeconfig),
            identity="unit",
            probe_quiet_period=0,
            fallback_selector=parse_label_selector("node-pool=fallback"),
            fallback_selector_text="node-pool=fallback",
        ),
        make_client(str(kubeconfig)),
        sqs=SqsSource(source, wait_seconds=0),
        alerter=alerter,  # type: ignore[arg-type]
        clock=lambda: now,
    )
    asyncio.run(ctl.sqs.poll_once(ctl.on_signals))  # the queue's backlog read (empty): a capacity source

    def put(name: str, capacity: str, age: timedelta, itype: str = "m5.large", zone: str = "us-east-1a") -> None:
        obj = node_obj(name, capacity, itype, zone)
        obj["metadata"]["creationTimestamp"] = format_time(now - age)
        if capacity == "unlabelled":
            del obj["metadata"]["labels"]["karpenter.sh/capacity-type"]
            obj["metadata"]["labels"]["node-pool"] = "fallback"
            obj["spec"]["providerID"] = "aws:///us-east-1a/i-0123456789abcdef0"
        ctl.inventory.apply_node("ADDED", json.dumps(obj).encode())

    put("od-a", "on-demand", timedelta(hours=5))
    put("od-b", "on-demand", timedelta(hours=4), itype="c5.large", zone="us-east-1b")
    put("spot-early", "spot", timedelta(hours=3))
    put("mystery", "unlabelled", timedelta(hours=9))
    ctl.lifecycles["i-0123456789abcdef0"] = "on-demand"  # what EC2 said
    ice = CapacitySignal(Pool("m5.large", "us-east-1a"), SignalKind.ICE, "sqs", now - timedelta(hours=1), "capacity")
    ice_b = CapacitySignal(Pool("c5.large", "us-east-1b"), SignalKind.ICE, "sqs", now - timedelta(hours=1), "capacity")
    ctl.on_signals([ice, ice_b])

    verdicts = {v.node: v for v in ctl.decision_pass(now)}
    # the Spot node predates the ICE: no return; the unlabelled node is on-demand by EC2 and the oldest
    assert set(verdicts) == {"od-a", "od-b", "mystery"}
    assert not any(v.drain for v in verdicts.values())
    names = sorted(a.labels["alertname"] for a in alerter.fired)
    assert names.count("SpotCapacityUnavailable") == 2 and names.count("OnDemandFallbackActive") == 2

    put("spot-late", "spot", timedelta(minutes=30))  # a Spot launch after the ICE, cooldown (15m) over
    verdicts = {v.node: v for v in ctl.decision_pass(now)}
    assert verdicts["mystery"].drain and "Spot available" in verdicts["mystery"].reason
    assert not verdicts["od-a"].drain and "max-concurrent-drains" in verdicts["od-a"].reason
    assert not verdicts["od-b"].drain and verdicts["od-b"].reason.startswith("no Spot capacity")
    assert ("SpotCapacityUnavailable", {"pool": "m5.large/us-east-1a"}) in alerter.resolved
    assert ("OnDemandFallbackActive", {"pool": "m5.large/us-east-1a"}) in alerter.resolved


@pytest.mark.slow
async def test_unlabelled_node_typed_by_ec2_is_drained_and_terminated_through_its_asg(
    aws: MotoAws,  # noqa: F811
    api: FakeApiServer,
    tmp_path: Path,
    procs: list[ControllerProcess],
    source: str,
) -> None:
    ec2, autoscaling = aws.client("ec2"), aws.client("autoscaling")
    image = ec2.describe_images()["Images"][0]["ImageId"]
    ec2.create_launch_template(
        LaunchTemplateName="od-lt", LaunchTemplateData={"ImageId": image, "InstanceType": "m5.large"}
    )
    autoscaling.create_auto_scaling_group(
        AutoScalingGroupName="workers-od",
        MinSize=0,
        MaxSize=5,
        DesiredCapacity=2,
        AvailabilityZones=["us-east-1a"],
        LaunchTemplate={"LaunchTemplateName": "od-lt"},
        Tags=[{"Key": "k8s.io/cluster-autoscaler/enabled", "Value": "true", "PropagateAtLaunch": False}],
    )
    group = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=["workers-od"])["AutoScalingGroups"][0]
    victim = group["Instances"][0]["InstanceId"]
    obj = node_obj("od-unlabelled", "on-demand")
    del obj["metadata"]["labels"]["karpenter.sh/capacity-type"]
    obj["spec"]["providerID"] = f"aws:///us-east-1a/{victim}"
    api.create(obj)
    api.store.get("Node", "", "od-unlabelled")["metadata"]["creationTimestamp"] = "2020-01-01T00:00:00Z"
    add_node(api, "spot-1", "spot")
    add_pods(api, "od-unlabelled", 2)
    async with running(replicaset(api, "spot-1")):
        c = start(procs, tmp_path, "ctl", "--terminate-drained", queue_url=source)
        await eventually(lambda: c.drains("complete") == 1, timeout=30)
        await eventually(lambda: c.events("node_terminated"), timeout=10)
    assert c.metric("spotd_nodes", capacity_type="on-demand") == 1.0
    group = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=["workers-od"])["AutoScalingGroups"][0]
    assert group["DesiredCapacity"] == 1
    assert victim not in [i["InstanceId"] for i in group["Instances"]]
    await eventually(lambda: "SpotdNodeTerminated" in events_for(api, "od-unlabelled"))


async def test_a_node_left_marked_as_draining_is_put_back_on_a_later_pass(api: FakeApiServer, tmp_path: Path) -> None:
    """Putting a node back can fail (API down); the mark stays, and a later pass uncordons it."""
    from spotd.kube.keys import DRAINING_ANNOTATION

    add_node(api, "od-stuck", "on-demand", timedelta(minutes=10))
    add_pods(api, "od-stuck", 2)  # not drained: an empty node marked as draining counts as drained
    ctl, task = await run_in_process(api, tmp_path, drain_timeout=20.0)
    try:
        await eventually(lambda: ctl.ready, timeout=20)
        stuck = node(api, "od-stuck")
        stuck["spec"]["unschedulable"] = True
        long_ago = format_time(datetime.now(UTC) - timedelta(minutes=5))
        stuck["metadata"].setdefault("annotations", {})[DRAINING_ANNOTATION] = long_ago
        api.update(stuck)
        await eventually(lambda: not node(api, "od-stuck")["spec"].get("unschedulable"), timeout=10)
        assert DRAINING_ANNOTATION not in (node(api, "od-stuck")["metadata"].get("annotations") or {})
    finally:
        await stop_in_process(ctl, task)


async def test_a_decision_loop_cancelled_as_it_is_woken_stops(api: FakeApiServer, tmp_path: Path) -> None:
    """A lost lease or a SIGTERM cancels the decision loop; one that came in the same turn as a wake was lost
    (Python 3.11's asyncio.wait_for returned normally then): the loop went on deciding, and lead() never ended,
    so the replica never stood for the lease again (issue 21, found on a loaded machine)."""
    from spotd.common.metrics import REGISTRY

    def passes() -> float:
        return REGISTRY.get_sample_value("spotd_decision_pass_seconds_count") or 0.0

    before = passes()
    ctl, task = await run_in_process(api, tmp_path, interval=30.0)  # after a pass: waits for a wake, 30 s
    try:
        await eventually(lambda: passes() > before, timeout=20)
        (loop,) = [t for t in asyncio.all_tasks() if t.get_coro().__qualname__ == "Controller.decision_loop"]
        ctl.wake.set()  # a node changed...
        loop.cancel()  # ...as the lease was lost
        await asyncio.wait({loop}, timeout=5)
        assert loop.cancelled()
    finally:
        await stop_in_process(ctl, task)
