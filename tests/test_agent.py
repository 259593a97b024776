"""The real agent, as a subprocess, against the fake API server and the fake IMDS: notice to drained node."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from spotd.sim.imds import FakeImds
from spotd.sim.kubeapi.server import FakeApiServer
from tests.agent_harness import DEPLOY, AgentProcess, agent_kubeconfig, eventually, node_obj, pdb_obj, pod_obj

NODE = "ip-10-0-1-10.ec2.internal"
TAINT = "spotd.io/interruption"


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    server = FakeApiServer(termination_scale=0.02)  # pods take (a 50th of) their grace to go, as kubelets do
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def imds() -> AsyncIterator[FakeImds]:
    fake = FakeImds()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
def kubeconfig(api: FakeApiServer, tmp_path: Path) -> str:
    return agent_kubeconfig(api, tmp_path / "kubeconfig", NODE)


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[list[AgentProcess]]:
    started: list[AgentProcess] = []
    yield started
    for agent in started:
        agent.stop(signal.SIGKILL)


def run_agent(agents: list[AgentProcess], tmp: Path, kubeconfig: str, imds: FakeImds, *extra: str) -> AgentProcess:
    agent = AgentProcess(tmp, kubeconfig, imds.url, NODE, *extra).start()
    agents.append(agent)
    return agent


def node(api: FakeApiServer) -> dict[str, Any]:
    found = api.get("Node", NODE)
    assert found is not None
    return found


def our_taint(api: FakeApiServer) -> dict[str, Any] | None:
    taints = node(api).get("spec", {}).get("taints") or []
    return next((t for t in taints if t["key"] == TAINT), None)


def pods_on_node(api: FakeApiServer) -> list[str]:
    return sorted(p["metadata"]["name"] for p in api.list("Pod") if p["spec"].get("nodeName") == NODE)


def node_events(api: FakeApiServer) -> list[str]:
    return [e["reason"] for e in api.list("Event") if e.get("involvedObject", {}).get("name") == NODE]


# What a drain leaves on the node populate() fills: DaemonSet, mirror and completed pods (nobody deletes pods).
LEFT_ON_NODE = ["job-done", "kube-proxy-x", "logs-agent"]


def populate(api: FakeApiServer, web: int = 10) -> None:
    api.create(node_obj(NODE))
    for i in range(web):
        api.create(pod_obj(f"web-{i}", NODE))
    api.create(pod_obj("logs-agent", NODE, owner="DaemonSet", labels={"app": "logs"}))
    api.create(pod_obj("job-done", NODE, owner="Job", phase="Succeeded", labels={"app": "job"}))
    api.create(
        pod_obj(
            "kube-proxy-x",
            NODE,
            owner=None,
            labels={"app": "proxy"},
            annotations={"kubernetes.io/config.mirror": "abc"},
        )
    )


# DaemonSet and mirror pods stay to the end; a completed pod is left alone (no pod delete power).
LEFT_ALONE = ["job-done", "kube-proxy-x", "logs-agent"]


def soon(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


async def test_spot_itn_taints_cordons_labels_and_drains(api, imds, kubeconfig, agents, tmp_path) -> None:
    populate(api)
    agent = run_agent(agents, tmp_path, kubeconfig, imds)
    await agent.ready()
    assert agent.http("/healthz")[0] == 200
    imds.set_instance_action("terminate", soon(120))

    await eventually(lambda: our_taint(api), timeout=10)
    n = node(api)
    assert our_taint(api) == {"key": TAINT, "value": "spot-itn", "effect": "NoSchedule"}
    assert n["spec"]["unschedulable"] is True
    assert n["metadata"]["labels"]["node.kubernetes.io/exclude-from-external-load-balancers"] == "true"
    notice = json.loads(n["metadata"]["annotations"]["spotd.io/notice"])
    assert notice["kind"] == "spot-itn" and notice["source"] == "imds" and notice["action"] == "terminate"

    # DaemonSet and mirror pods stay; the completed pod is left alone; the rest are evicted.
    await eventually(lambda: pods_on_node(api) == LEFT_ALONE, timeout=15)
    wanted = {"SpotInterruptionNotice", "NodeTainted", "NodeCordoned", "DrainStarted", "DrainComplete"}
    await eventually(lambda: wanted <= set(node_events(api)), timeout=5)
    assert agent.metric("spotd_notices_total", kind="spot-itn", source="imds") == 1
    assert agent.metric("spotd_evictions_total", outcome="evicted") == 10
    assert not [r for r in api.requests if r[0] == "DELETE" and "/pods/" in r[1]]
    assert agent.metric("spotd_drains_total", outcome="complete") == 1
    assert (agent.metric("spotd_imds_last_success_timestamp_seconds") or 0) > 0
    finished = agent.events("drain_finished")[-1]
    assert finished["outcome"] == "complete" and finished["node"] == NODE and finished["notice"].startswith("spot-itn/")
    # Drained through the Eviction API, followed by a watch rather than per-pod polling.
    evictions = [r for r in api.requests if r[1].endswith("/eviction")]
    assert len(evictions) >= 10
    pod_gets = [r for r in api.requests if r[0] == "GET" and "/pods/web-" in r[1]]
    assert pod_gets == []


async def test_rebalance_only_prefers_no_schedule(api, imds, kubeconfig, agents, tmp_path) -> None:
    populate(api, web=2)
    agent = run_agent(agents, tmp_path, kubeconfig, imds)
    await agent.ready()
    imds.set_rebalance(datetime.now(UTC))
    await eventually(lambda: our_taint(api), timeout=10)
    assert our_taint(api) == {"key": TAINT, "value": "rebalance", "effect": "PreferNoSchedule"}
    assert not node(api)["spec"].get("unschedulable")
    assert len(pods_on_node(api)) == 5
    # and an interruption after it escalates
    imds.set_instance_action("terminate", soon(120))
    await eventually(lambda: (our_taint(api) or {}).get("effect") == "NoSchedule", timeout=10)
    await eventually(lambda: node(api)["spec"].get("unschedulable"), timeout=5)
    await eventually(lambda: pods_on_node(api) == LEFT_ALONE, timeout=15)


def maintenance_event(state: str, not_before: datetime) -> dict[str, Any]:
    fmt = "%d %b %Y %H:%M:%S GMT"
    return {
        "NotBefore": not_before.strftime(fmt),
        "NotAfter": (not_before + timedelta(hours=2)).strftime(fmt),
        "Code": "system-reboot",
        "Description": "scheduled reboot",
        "EventId": "instance-event-0d59937288b749b32",
        "State": state,
    }


async def test_scheduled_maintenance_drains_at_lead_time_and_uncordons_when_completed(
    api, imds, kubeconfig, agents, tmp_path
) -> None:
    populate(api, web=3)
    agent = run_agent(agents, tmp_path, kubeconfig, imds, "--maintenance-lead-time", "15m")
    await agent.ready()
    # Far in the future: nothing happens yet.
    imds.set_scheduled_events([maintenance_event("active", datetime.now(UTC) + timedelta(hours=3))])
    await eventually(lambda: agent.events("notice_scheduled"), timeout=10)
    assert not node(api)["spec"].get("unschedulable")
    assert len(pods_on_node(api)) == 6
    # Within the lead time: cordon and drain, no taint by default.
    imds.set_scheduled_events([maintenance_event("active", datetime.now(UTC) + timedelta(minutes=10))])
    await eventually(lambda: node(api)["spec"].get("unschedulable"), timeout=10)
    await eventually(lambda: pods_on_node(api) == LEFT_ALONE, timeout=15)
    assert our_taint(api) is None
    # Completed: the node is uncordoned and our annotations go.
    imds.set_scheduled_events([maintenance_event("completed", datetime.now(UTC) - timedelta(minutes=1))])
    await eventually(lambda: not node(api)["spec"].get("unschedulable"), timeout=10)
    assert "spotd.io/notice" not in (node(api)["metadata"].get("annotations") or {})
    await eventually(lambda: "NoticeReleased" in node_events(api), timeout=5)


async def test_asg_termination(api, imds, kubeconfig, agents, tmp_path) -> None:
    populate(api, web=3)
    agent = run_agent(agents, tmp_path, kubeconfig, imds)
    await agent.ready()
    imds.set_lifecycle_state("Terminated")
    await eventually(lambda: (our_taint(api) or {}).get("value") == "asg-termination", timeout=10)
    await eventually(lambda: pods_on_node(api) == LEFT_ALONE, timeout=15)
    assert agent.metric("spotd_notices_total", kind="asg-termination", source="imds") == 1


async def test_a_restart_during_an_asg_termination_keeps_the_node_cordoned(
    api, imds, kubeconfig, agents, tmp_path
) -> None:
    # The ASG gives no time: the deadline is computed at first sighting. A restarted agent computes another
    # one; the notice must still be the one it resumed, not a new one after releasing the old (uncordon).
    populate(api, web=2)
    api.create(pdb_obj("web", min_available=2))  # the drain is still going on at the restart
    first = run_agent(agents, tmp_path, kubeconfig, imds)
    await first.ready()
    imds.set_lifecycle_state("Terminated")
    await eventually(lambda: first.events("eviction_refused"), timeout=10)
    first.stop()
    await asyncio.sleep(1.1)  # the next first sighting is at least a second later
    second = run_agent(agents, tmp_path, kubeconfig, imds)
    await second.ready()
    await eventually(lambda: second.events("eviction_refused"), timeout=10)
    assert not second.events("notice_released")
    assert "NoticeReleased" not in node_events(api)
    assert node(api)["spec"].get("unschedulable") is True


async def test_a_node_clock_running_ahead_does_not_shorten_the_graces(api, imds, kubeconfig, agents, tmp_path) -> None:
    # The agent saw no notice a poll ago, so AWS issued it since, two minutes ahead of its action; a `time`
    # already past on this node's clock says the clock is ahead, not that the window is gone.
    populate(api, web=2)
    agent = run_agent(agents, tmp_path, kubeconfig, imds)
    await agent.ready()
    await asyncio.sleep(1)  # a few empty readings of spot/instance-action
    imds.set_instance_action("terminate", soon(-300))
    await eventually(lambda: len(agent.events("pod_evicted")) == 2, timeout=15)
    # None: the pod's own grace fits the time left (it was 1 s when the past `time` was believed).
    assert [e["grace"] for e in agent.events("pod_evicted")] == [None, None]


async def test_pdb_refusal_retried_then_forced_at_the_deadline(api, imds, kubeconfig, agents, tmp_path) -> None:
    populate(api, web=2)
    api.create(pdb_obj("web", min_available=2))
    api.load_manifests([DEPLOY / "optional" / "agent-deadline-delete.yaml"])  # the operator's knowing choice
    agent = run_agent(agents, tmp_path, kubeconfig, imds, "--safety-margin", "3s", "--deadline-action", "delete")
    await agent.ready()
    imds.set_instance_action("terminate", soon(7))
    await eventually(lambda: agent.events("eviction_refused"), timeout=10)
    assert "web-0" in pods_on_node(api)
    # refused evictions are retried quickly (well under kubectl's 5 s)
    await eventually(lambda: (agent.metric("spotd_evictions_total", outcome="pdb_blocked") or 0) >= 6, timeout=5)
    # at deadline - margin, with --deadline-action delete: the pods are deleted (never with grace 0), loudly
    await eventually(lambda: "web-0" not in pods_on_node(api), timeout=10)
    await eventually(lambda: "PodsDeletedAtDeadline" in node_events(api), timeout=5)
    assert agent.metric("spotd_evictions_total", outcome="forced") == 2
    deletes = [r for r in api.requests if r[0] == "DELETE" and "/pods/" in r[1]]
    assert deletes and all(int(r[2]["gracePeriodSeconds"]) >= 1 for r in deletes)


async def test_pdb_refusal_left_at_the_deadline_is_named(api, imds, kubeconfig, agents, tmp_path) -> None:
    populate(api, web=2)
    api.create(pdb_obj("web", min_available=2))
    agent = run_agent(agents, tmp_path, kubeconfig, imds, "--safety-margin", "2s", "--deadline-action", "leave")
    await agent.ready()
    imds.set_instance_action("terminate", soon(4))
    await eventually(lambda: "DrainIncomplete" in node_events(api), timeout=15)
    event = next(e for e in api.list("Event") if e["reason"] == "DrainIncomplete")
    assert "default/web-0" in event["message"] and "default/web-1" in event["message"]
    assert agent.metric("spotd_drain_pods_left") == 2
    assert agent.metric("spotd_drains_total", outcome="incomplete") == 1
    assert "web-0" in pods_on_node(api)


async def test_restart_mid_drain_resumes_from_the_node_annotation(api, imds, kubeconfig, agents, tmp_path) -> None:
    populate(api, web=3)
    api.create(pdb_obj("web", min_available=3))  # nothing can be evicted yet
    first = run_agent(agents, tmp_path, kubeconfig, imds)
    await first.ready()
    imds.set_instance_action("terminate", soon(90))
    await eventually(lambda: first.events("eviction_refused"), timeout=10)
    first.stop(signal.SIGKILL)
    assert json.loads(node(api)["metadata"]["annotations"]["spotd.io/notice"])["kind"] == "spot-itn"
    # IMDS stops answering: the restarted agent must still resume from what the node says.
    imds.fail_next(None, status=503, times=10_000)
    second = run_agent(agents, tmp_path, kubeconfig, imds)
    await second.ready()
    await eventually(lambda: second.events("notice_resumed"), timeout=10)
    api.delete("PodDisruptionBudget", "web", "default")
    await eventually(lambda: pods_on_node(api) == LEFT_ALONE, timeout=15)


async def test_imds_errors_and_token_expiry_never_miss_a_notice(api, imds, kubeconfig, agents, tmp_path) -> None:
    populate(api, web=1)
    imds.token_max_ttl = 2  # tokens die quickly: the agent must fetch new ones
    agent = run_agent(agents, tmp_path, kubeconfig, imds)
    await agent.ready()
    imds.fail_next("spot/instance-action", status=503, times=3)
    imds.fail_next("events/recommendations/rebalance", status=429, times=2)
    imds.set_instance_action("terminate", soon(120))
    await eventually(lambda: our_taint(api), timeout=10)
    imds.expire_tokens()
    await eventually(
        lambda: (agent.metric("spotd_imds_requests_total", path="api/token", outcome="ok") or 0) >= 2, timeout=10
    )
    assert (agent.metric("spotd_imds_requests_total", path="spot/instance-action", outcome="error") or 0) >= 1
    assert agent.proc is not None and agent.proc.poll() is None


async def test_malformed_notice_is_logged_counted_and_skipped(api, imds, kubeconfig, agents, tmp_path) -> None:
    populate(api, web=1)
    agent = run_agent(agents, tmp_path, kubeconfig, imds)
    await agent.ready()
    imds.set_raw("spot/instance-action", '{"action": "explode", "time": "soon"}')
    await eventually(lambda: agent.metric("spotd_notices_malformed_total", source="imds"), timeout=10)
    assert our_taint(api) is None
    assert agent.metric("spotd_notices_total", kind="spot-itn", source="imds") is None
    malformed = agent.events("notice_malformed")
    assert len(malformed) == 1 and "explode" in malformed[0]["error"]  # logged once, not every poll
    imds.set_raw("spot/instance-action", None)
    imds.set_instance_action("terminate", soon(120))
    await eventually(lambda: our_taint(api), timeout=10)
    assert agent.proc is not None and agent.proc.poll() is None


async def test_api_conflict_throttling_and_errors_are_retried(api, imds, kubeconfig, agents, tmp_path) -> None:
    populate(api, web=3)
    agent = run_agent(agents, tmp_path, kubeconfig, imds)
    await agent.ready()
    api.inject_fault("PATCH", r"/api/v1/nodes/", 409, times=1)
    api.inject_fault("POST", r"/pods/web-0/eviction", 500, times=2)
    api.inject_fault("POST", r"/pods/web-1/eviction", 429, times=2, retry_after=1)
    imds.set_instance_action("terminate", soon(120))
    await eventually(lambda: our_taint(api), timeout=10)
    await eventually(lambda: pods_on_node(api) == LEFT_ALONE, timeout=15)
    assert (agent.metric("spotd_node_actions_total", action="notice", outcome="conflict") or 0) >= 1


async def test_a_retry_after_that_is_not_a_sane_number_is_bounded(api, imds, kubeconfig, agents, tmp_path) -> None:
    # "nan" used to put the retry to sleep for ever, a huge value past the deadline: the pod stayed.
    populate(api, web=3)
    agent = run_agent(agents, tmp_path, kubeconfig, imds)
    await agent.ready()
    api.inject_fault("POST", r"/pods/web-0/eviction", 429, times=1, retry_after=float("nan"))  # type: ignore[arg-type]
    api.inject_fault("POST", r"/pods/web-1/eviction", 429, times=1, retry_after=10**9)
    api.inject_fault("POST", r"/pods/web-2/eviction", 429, times=1, retry_after=-5)
    imds.set_instance_action("terminate", soon(120))
    await eventually(lambda: pods_on_node(api) == LEFT_ALONE, timeout=30)


async def test_dry_run_changes_nothing(api, imds, kubeconfig, agents, tmp_path) -> None:
    populate(api, web=2)
    before = json.dumps(node(api), sort_keys=True)
    agent = run_agent(agents, tmp_path, kubeconfig, imds, "--dry-run")
    await agent.ready()
    imds.set_instance_action("terminate", soon(120))
    await eventually(lambda: agent.events("would_drain_pod"), timeout=10)
    await eventually(lambda: agent.events("would_patch_node"), timeout=5)  # the node writer is its own task
    assert json.dumps(node(api), sort_keys=True) == before
    assert len(pods_on_node(api)) == 5
    assert node_events(api) == []


def rehearsal_request(api: FakeApiServer, name: str, deadline: datetime, kind: str = "spot-itn") -> None:
    """What `spotd simulate-reclaim` writes, as the operator: a labelled ConfigMap in spotd's namespace."""
    if api.get("Namespace", "spotd") is None:
        api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "spotd"}})
    api.create(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": "spotd", "labels": {"spotd.io/rehearsal": "true"}},
            "data": {"nodes": NODE, "kind": kind, "deadline": deadline.strftime("%Y-%m-%dT%H:%M:%SZ")},
        }
    )


async def test_rehearsal_request_is_a_notice_and_withdrawing_it_releases(
    api, imds, kubeconfig, agents, tmp_path
) -> None:
    populate(api, web=2)
    api.create(pdb_obj("web", min_available=2))  # hold the drain so the withdrawal happens mid-drain
    agent = run_agent(agents, tmp_path, kubeconfig, imds)
    await agent.ready()
    rehearsal_request(api, "rehearsal-1", soon(60))
    await eventually(lambda: our_taint(api), timeout=10)
    assert json.loads(node(api)["metadata"]["annotations"]["spotd.io/notice"])["source"] == "simulation"
    assert agent.metric("spotd_notices_total", kind="spot-itn", source="simulation") == 1
    api.delete("ConfigMap", "rehearsal-1", "spotd")
    await eventually(lambda: our_taint(api) is None and not node(api)["spec"].get("unschedulable"), timeout=10)
    await eventually(lambda: "NoticeReleased" in node_events(api), timeout=5)


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["--poll-interval", "abc"], {}, "--poll-interval: 'abc' is not a duration"),
        (["--poll-interval", "0"], {}, "must be greater than zero"),
        ([], {"SPOTD_POLL_INTERVAL": "2x"}, "SPOTD_POLL_INTERVAL (--poll-interval): '2x' is not a duration"),
        (["--deadline-action", "explode"], {}, "--deadline-action"),
        (["--on-spot-itn", "taint,nuke"], {}, "--on-spot-itn: 'nuke' is not a step"),
        (["--listen", "nowhere"], {}, "--listen"),
        (["--imds-endpoint", "169.254.169.254"], {}, "--imds-endpoint: '169.254.169.254' is not an http(s) URL"),
    ],
)
def test_bad_configuration_fails_at_start_with_one_line(args: list[str], env: dict[str, str], expected: str) -> None:
    import os

    proc = subprocess.run(
        [sys.executable, "-m", "spotd", "agent", "--node-name", "n1", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **env},
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert expected in lines[0]


def test_help_lists_every_command() -> None:
    out = subprocess.run([sys.executable, "-m", "spotd", "--help"], capture_output=True, text=True, timeout=30).stdout
    for command in ("agent", "controller", "simulate-reclaim", "version"):
        assert command in out


def test_agent_never_imports_boto3() -> None:
    code = "import sys, spotd.agent; assert 'boto3' not in sys.modules and 'botocore' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


async def test_agent_pushes_interruption_and_incomplete_drain_alerts_to_alertmanager(
    api, imds, kubeconfig, agents, tmp_path
) -> None:
    from tests.alertmanager import AlertmanagerSet, require_tool

    binary = require_tool("alertmanager")
    populate(api, web=2)
    api.create(pdb_obj("web", min_available=2))
    with AlertmanagerSet(binary, n=1) as am:
        agent = run_agent(
            agents,
            tmp_path,
            kubeconfig,
            imds,
            "--alertmanager-url",
            am.urls[0],
            "--cluster-name",
            "prod-eu",
            "--safety-margin",
            "2s",
            "--deadline-action",
            "leave",
        )
        await agent.ready()
        imds.set_instance_action("terminate", soon(4))
        alerts = await eventually(lambda: am.members[0].alerts(alertname="SpotInterruptionNotice"), timeout=10)
        labels = alerts[0]["labels"]
        assert labels["node"] == NODE and labels["cluster"] == "prod-eu" and labels["kind"] == "spot-itn"
        assert labels["zone"] == "us-east-1a" and labels["instance_type"] == "m5.large"
        assert labels["instance_id"].startswith("i-")
        critical = await eventually(lambda: am.members[0].alerts(alertname="NodeDrainIncomplete"), timeout=15)
        assert critical[0]["labels"]["severity"] == "critical"
        assert "default/web-0" in critical[0]["annotations"]["description"]


async def test_dead_alertmanager_does_not_slow_the_drain(api, imds, kubeconfig, agents, tmp_path) -> None:
    from tests.agent_harness import free_port

    populate(api, web=20)
    dead = f"http://127.0.0.1:{free_port()}"
    agent = run_agent(agents, tmp_path, kubeconfig, imds, "--alertmanager-url", dead)
    await agent.ready()
    imds.set_instance_action("terminate", soon(120))
    await eventually(lambda: pods_on_node(api) == LEFT_ALONE, timeout=15)
    finished = (await eventually(lambda: agent.events("drain_finished"), timeout=5))[-1]
    assert finished["outcome"] == "complete"
    # it did try, and failed: the alert sender is its own task, not ordered with the drain
    await eventually(lambda: (agent.metric("spotd_alerts_sent_total", outcome="error") or 0) >= 1, timeout=5)
    assert agent.stop() == 0  # SIGTERM: a clean exit


async def test_kubectl_uncordon_during_a_notice_is_undone(api, imds, kubeconfig, agents, tmp_path) -> None:
    """kubectl as a second client: an operator's uncordon races the agent, which puts its steps back."""
    import asyncio

    populate(api, web=1)
    agent = run_agent(agents, tmp_path, kubeconfig, imds)
    await agent.ready()
    imds.set_instance_action("terminate", soon(120))
    await eventually(lambda: node(api)["spec"].get("unschedulable"), timeout=10)
    operator = str(api.write_kubeconfig(tmp_path / "operator-kubeconfig"))
    proc = await asyncio.create_subprocess_exec(
        "kubectl",
        "--kubeconfig",
        operator,
        "uncordon",
        NODE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out.decode()
    assert b"uncordoned" in out
    await eventually(lambda: node(api)["spec"].get("unschedulable"), timeout=10)
    assert our_taint(api) is not None


def test_unusable_kubeconfig_is_a_one_line_start_error(tmp_path: Path) -> None:
    bad = tmp_path / "kubeconfig"
    bad.write_text("clusters: [unclosed\n")
    proc = subprocess.run(
        [sys.executable, "-m", "spotd", "agent", "--node-name", "n1", "--kubeconfig", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("spotd agent: error: --kubeconfig: cannot load Kubernetes credentials from ")


async def test_api_server_restart_does_not_kill_the_agent(api, imds, kubeconfig, agents, tmp_path) -> None:
    """Watches reconnect through a dead API server (refused, then back): the agent lives on and acts."""
    import asyncio

    populate(api, web=2)
    agent = run_agent(agents, tmp_path, kubeconfig, imds)
    await agent.ready()
    await api.stop()  # every watch breaks; reconnects are refused for a while
    await eventually(lambda: agent.http("/readyz")[0] == 503, timeout=10)
    await asyncio.sleep(1.5)
    await api.start()  # same port, same objects
    await agent.ready(timeout=15)
    assert agent.proc is not None and agent.proc.poll() is None
    imds.set_instance_action("terminate", soon(120))
    await eventually(lambda: pods_on_node(api) == LEFT_ALONE, timeout=15)
    assert agent.events("watch_failed")


async def test_notice_inside_the_safety_margin_still_evicts(api, imds, kubeconfig, agents, tmp_path) -> None:
    """Seen (or resumed) with less time left than the safety margin: evictions still, with what time is left."""
    populate(api, web=3)
    agent = run_agent(agents, tmp_path, kubeconfig, imds, "--safety-margin", "10s")
    await agent.ready()
    imds.set_instance_action("terminate", soon(6))
    await eventually(lambda: pods_on_node(api) == LEFT_ALONE, timeout=10)
    # a pod goes at the API server a moment after its eviction was answered, before the agent counts it
    await eventually(lambda: agent.events("drain_finished"), timeout=5)
    assert agent.metric("spotd_evictions_total", outcome="evicted") == 3
    assert not [r for r in api.requests if r[0] == "DELETE" and "/pods/" in r[1]]


async def test_a_drain_that_cannot_start_is_retried(api, imds, kubeconfig, agents, tmp_path) -> None:
    populate(api, web=2)
    agent = run_agent(agents, tmp_path, kubeconfig, imds)
    await agent.ready()
    api.inject_fault("GET", r"^/api/v1/pods$", 500, times=2)  # the drain's pod list fails twice
    imds.set_instance_action("terminate", soon(120))
    await eventually(lambda: pods_on_node(api) == LEFT_ALONE, timeout=15)
    assert len(agent.events("drain_failed")) == 2
    await eventually(lambda: "DrainFailed" in node_events(api), timeout=5)  # Events are sent in the background
    assert node_events(api).count("DrainFailed") == 1  # said once, not on every retry
