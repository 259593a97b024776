"""`spotd simulate-reclaim --kubeconfig`: the rehearsal as a subprocess against a FakeApiServer (with the
embedded cluster's controllers, so evicted pods come back), a real `spotd agent` subprocess for the chosen
node, everything over real sockets. Also: Ctrl-C cleans up, an unreschedulable reclaim is not ok, non-Spot
nodes are refused, and the AWS calls of --terminate and --via fis against moto, signed as the operator
whose only policy is deploy/iam-rehearsal-policy.json."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from spotd.kube.keys import REHEARSAL_LABEL
from spotd.rehearsal.aws import fis_template, start_fis_experiment, terminate_instances
from spotd.rehearsal.targets import Target
from spotd.sim.cluster import ClusterSpec, EmbeddedCluster
from spotd.sim.imds import FakeImds
from spotd.sim.kubeapi.server import FakeApiServer
from tests.agent_harness import AgentProcess, agent_kubeconfig, eventually
from tests.moto_server import ACCOUNT, MotoAws, aws, moto_endpoint  # noqa: F401  (pytest fixtures)

NODE = "spot-01"


class Cluster:
    def __init__(self, api: FakeApiServer, sim: EmbeddedCluster, kubeconfig: str, tmp: Path) -> None:
        self.api, self.sim, self.kubeconfig, self.tmp = api, sim, kubeconfig, tmp

    def request(self) -> dict[str, str] | None:
        """The data of the rehearsal request in spotd's namespace, if one is there."""
        found = [
            c for c in self.api.list("ConfigMap", "spotd") if REHEARSAL_LABEL in (c["metadata"].get("labels") or {})
        ]
        assert len(found) <= 1
        return dict(found[0]["data"]) if found else None

    def cordon_all_but(self, node: str) -> None:
        for obj in self.api.list("Node"):
            if obj["metadata"]["name"] != node:
                obj["spec"]["unschedulable"] = True
                self.api.update(obj)

    async def rehearse(self, *args: str) -> asyncio.subprocess.Process:
        # Started as from a terminal: a pytest run in the background (`cmd &`) ignores SIGINT, a child inherits
        # SIG_IGN and Ctrl-C never reaches it (the SIGINT test then timed out in the issue 21 load runs).
        ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        if ignored:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            return await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "spotd",
                "simulate-reclaim",
                "--kubeconfig",
                self.kubeconfig,
                *args,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        finally:
            if ignored:
                signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    api = FakeApiServer(termination_scale=0.05)
    await api.start()
    sim = EmbeddedCluster(api, ClusterSpec(spot_nodes=4, on_demand_nodes=1, pods_per_node=3, time_scale=0.1))
    sim.populate()
    controllers = asyncio.get_running_loop().create_task(sim.run_controllers())
    try:
        yield Cluster(api, sim, str(api.write_kubeconfig(tmp_path / "kubeconfig")), tmp_path)
    finally:
        controllers.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await controllers
        await api.stop()


@pytest.fixture
async def agent(cluster: Cluster) -> AsyncIterator[AgentProcess]:
    imds = FakeImds()
    await imds.start()
    kubeconfig = agent_kubeconfig(cluster.api, cluster.tmp / "agent-kubeconfig", NODE)  # the agent as itself
    proc = AgentProcess(cluster.tmp, kubeconfig, imds.url, NODE, "--safety-margin", "2s").start()
    try:
        await proc.ready()
        yield proc
    finally:
        proc.stop()
        await imds.stop()


async def finish(proc: asyncio.subprocess.Process, timeout: float = 60) -> tuple[int, dict[str, Any], str]:
    communicating = asyncio.ensure_future(proc.communicate())
    done, _ = await asyncio.wait({communicating}, timeout=timeout)
    if not done:  # a hung rehearsal: its threads' stacks (SIGUSR1, spotd.cli), then kill it and show them
        alive = proc.returncode is None
        if alive:
            proc.send_signal(signal.SIGUSR1)
            await asyncio.sleep(1.0)
            proc.kill()
        out, err = await communicating
        raise AssertionError(
            f"simulate-reclaim not finished after {timeout}s (process alive: {alive}); its stderr:\n"
            + err.decode(errors="replace")[-6000:]
        )
    out, err = communicating.result()
    text = out.decode()
    try:
        data = json.loads(text)
    except ValueError:
        data = {}
    return proc.returncode or 0, data, err.decode() + text


async def test_rehearsal_reports_the_real_agent_draining_and_workloads_recovering(
    cluster: Cluster, agent: AgentProcess
) -> None:
    proc = await cluster.rehearse("--node", NODE, "--output", "json", "--recovery-timeout", "20s")
    code, report, output = await finish(proc)
    assert code == 0, output
    assert report["ok"] is True
    [node] = report["nodes"]
    assert node["name"] == NODE and node["kind"] == "spot-itn"
    for key in ("notice_at", "tainted_at", "cordoned_at", "drained_at"):
        assert node[key], key
    assert node["notice_at"] <= node["tainted_at"] <= node["drained_at"]
    assert node["pods_evicted"] >= 1 and node["pods_left"] == 0
    assert report["workloads"], output
    for w in report["workloads"]:
        assert w["ok"], w
        if w["min_ready"] < w["desired"] and w["counted"]:
            assert w["recovered_at"] is not None
    assert cluster.request() is None  # cleaned up at the end, and the agent releases the node
    await eventually(lambda: not (cluster.api.get("Node", NODE) or {}).get("spec", {}).get("unschedulable"), 10)


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
async def test_interruption_removes_the_request(cluster: Cluster, sig: int, status: int) -> None:
    # no agent: the rehearsal would wait for the deadline; interrupt it once the request is written
    proc = await cluster.rehearse("--node", NODE, "--notice", "60s")
    await eventually(lambda: cluster.request() is not None, 15)
    request = cluster.request() or {}
    assert request["kind"] == "spot-itn" and request["deadline"] and request["nodes"] == NODE
    proc.send_signal(sig)
    code, _, output = await finish(proc, 15)
    assert code == status, output
    assert "interrupted" in output
    assert cluster.request() is None, output


async def test_pods_that_cannot_be_rescheduled_make_the_rehearsal_not_ok(cluster: Cluster, agent: AgentProcess) -> None:
    cluster.cordon_all_but(NODE)  # nowhere else to go: PDBs hold the drain; a rehearsal never deletes
    proc = await cluster.rehearse("--node", NODE, "--notice", "6s", "--recovery-timeout", "2s", "--output", "json")
    code, report, output = await finish(proc)
    assert code == 1, output
    assert report["ok"] is False
    failing = [w for w in report["workloads"] if not w["ok"]]
    assert failing, output
    assert all(w["recovered_at"] is None for w in failing)
    assert any(w["pending"] > 0 for w in failing)
    assert cluster.request() is None


async def test_refuses_non_spot_nodes_unless_asked(cluster: Cluster) -> None:
    code, _, output = await finish(await cluster.rehearse("--node", "ondemand-01"))
    assert code == 2
    assert "ondemand-01 (on-demand)" in output and "--any-capacity-type" in output
    assert cluster.request() is None
    code, _, output = await finish(await cluster.rehearse("--count", "5"))
    assert code == 2 and "only 4 Spot nodes" in output


# ---- AWS: --terminate and --via fis against moto ---------------------------------------------------------


def _instances(aws: MotoAws, count: int) -> list[Target]:  # noqa: F811
    ec2 = aws.client("ec2")
    image = ec2.describe_images()["Images"][0]["ImageId"]
    ids = [i["InstanceId"] for i in ec2.run_instances(ImageId=image, MinCount=count, MaxCount=count)["Instances"]]
    return [Target(f"n{i}", "spot", f"aws:///us-east-1a/{iid}", "us-east-1a") for i, iid in enumerate(ids)]


def test_terminate_instances_through_ec2(aws: MotoAws) -> None:  # noqa: F811
    targets = _instances(aws, 2)
    aws.act_as(aws.operator)  # the rehearsal runs as an operator: deploy/iam-rehearsal-policy.json
    terminate_instances(targets)
    ec2 = aws.client("ec2")
    states = [
        i["State"]["Name"]
        for r in ec2.describe_instances(InstanceIds=[t.instance_id for t in targets])["Reservations"]
        for i in r["Instances"]
    ]
    assert states and all(s in ("shutting-down", "terminated") for s in states)


def test_fis_experiment_targets_exactly_the_instances(aws: MotoAws) -> None:  # noqa: F811
    targets = _instances(aws, 2)
    aws.act_as(aws.operator)
    experiment = start_fis_experiment(targets, f"arn:aws:iam::{ACCOUNT}:role/spotd-fis", 120)
    fis = aws.client("fis")
    # moto checks the signature of a body-less FIS request against the wrong payload (SignatureDoesNotMatch
    # even for admin), so the test's own reads go with IAM off; the rehearsal's calls above were enforced.
    with aws.unenforced():
        found = fis.get_experiment(id=experiment)["experiment"]
        template = fis.get_experiment_template(id=found["experimentTemplateId"])["experimentTemplate"]
    action = template["actions"]["interrupt"]
    assert action["actionId"] == "aws:ec2:send-spot-instance-interruptions"
    assert action["parameters"] == {"durationBeforeInterruption": "PT2M"}
    arns = template["targets"]["SpotInstances"]["resourceArns"]
    assert sorted(a.rsplit("/", 1)[-1] for a in arns) == sorted(t.instance_id for t in targets)


def test_fis_template_shape() -> None:
    t = fis_template(["arn:aws:ec2:us-east-1:1:instance/i-1"], "arn:role", 300, "tok")
    assert t["targets"]["SpotInstances"]["resourceType"] == "aws:ec2:spot-instance"
    assert t["actions"]["interrupt"]["parameters"]["durationBeforeInterruption"] == "PT5M"
    assert t["stopConditions"] == [{"source": "none"}] and t["roleArn"] == "arn:role"


async def test_a_cancellation_in_the_turn_something_changes_is_not_lost(cluster: Cluster) -> None:
    """Ctrl-C or SIGTERM cancels the rehearsal; one that came in the same turn as a watch event was lost
    (Python 3.11's asyncio.wait_for returned normally then) and the rehearsal ran on to the deadline, its
    request left in place (issue 21: test_interruption_removes_the_request timed out on a loaded machine)."""
    import io

    from spotd.rehearsal.runner import Rehearsal, RehearsalConfig

    progress = io.StringIO()
    rehearsal = Rehearsal(RehearsalConfig(cluster.kubeconfig, nodes=(NODE,), notice=60.0), progress=progress)
    task = asyncio.get_running_loop().create_task(rehearsal.run())
    try:
        # Said once the request is written; the next thing the rehearsal does is wait for something to change.
        await eventually(lambda: "notice given" in progress.getvalue(), 15)
        rehearsal.changed.set()  # what a watch event does...
        task.cancel()  # ...as Ctrl-C comes
        await asyncio.wait({task}, timeout=5)
        assert task.cancelled()
        assert cluster.request() is None
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
