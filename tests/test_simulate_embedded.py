"""`spotd simulate-reclaim` with no kubeconfig: the embedded cluster, the real agents in-process, the
rehearsal over real sockets to the embedded API server, and the report."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from spotd.cli.main import main
from spotd.sim.cluster import ClusterSpec, EmbeddedCluster
from spotd.sim.kubeapi.server import FakeApiServer
from spotd.sim.scheduler import cpu_millis, mem_mebibytes, tolerates
from tests.agent_harness import eventually


def simulate(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any], str]:
    code = main(["simulate-reclaim", "--output", "json", *args])
    out, err = capsys.readouterr()
    return code, json.loads(out) if out.strip().startswith("{") else {}, err + out


def test_the_readme_command_shows_a_mass_reclaim(capsys: pytest.CaptureFixture[str]) -> None:
    code, report, output = simulate(capsys, "--count", "12")
    assert code == 0, output
    assert report["ok"] is True
    assert len(report["nodes"]) == 12
    assert all(n["name"].startswith("spot-") for n in report["nodes"])
    assert all(n["drained_at"] and n["pods_left"] == 0 for n in report["nodes"])
    assert {n["reason"] for n in report["nodes"]} == {"drained before the deadline"}
    assert sum(n["pods_evicted"] for n in report["nodes"]) > 12
    kinds = {w["kind"] for w in report["workloads"]}
    assert {"Deployment", "StatefulSet"} <= kinds
    dipped = [w for w in report["workloads"] if w["min_ready"] < w["desired"]]
    assert dipped and all(w["recovered_at"] for w in dipped)
    assert "agent logs:" in output


def test_text_report_is_a_table(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["simulate-reclaim", "--count", "2", "--nodes", "4", "--on-demand-nodes", "1", "--pods-per-node", "3"])
    out = capsys.readouterr().out
    assert code == 0, out
    lines = out.splitlines()
    assert any(line.startswith("NODE") and "CORDONED" in line for line in lines)
    assert any(line.startswith("WORKLOAD") and "RECOVERED" in line for line in lines)
    assert lines[-1].startswith("OK")


def test_reclaiming_every_spot_node_with_nowhere_to_go_is_not_ok(capsys: pytest.CaptureFixture[str]) -> None:
    code, report, output = simulate(
        capsys,
        *("--nodes", "2", "--on-demand-nodes", "0", "--pods-per-node", "3", "--count", "2"),
        *("--notice", "12s", "--recovery-timeout", "1s"),
    )
    assert code == 1, output
    assert report["ok"] is False
    assert any(not w["ok"] and w["recovered_at"] is None and w["pending"] > 0 for w in report["workloads"])


def test_on_demand_nodes_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, output = simulate(capsys, "--node", "ondemand-01", "--nodes", "2", "--on-demand-nodes", "1")
    assert code == 2
    assert "not Spot" in output and "ondemand-01" in output


def test_flag_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate-reclaim", "--terminate"]) == 2
    assert "--yes" in capsys.readouterr().err
    assert main(["simulate-reclaim", "--node", "a", "--count", "2"]) == 2
    assert main(["simulate-reclaim", "--via", "fis"]) == 2
    assert "real cluster" in capsys.readouterr().err


# ---- the embedded cluster's pieces ----------------------------------------------------------------------


def test_quantities_and_tolerations() -> None:
    assert (cpu_millis("250m"), cpu_millis("2"), mem_mebibytes("1Gi"), mem_mebibytes("512Mi")) == (250, 2000, 1024, 512)
    taint = {"key": "spotd.io/interruption", "value": "spot-itn", "effect": "NoSchedule"}
    assert tolerates([{"operator": "Exists"}], taint)
    assert tolerates([{"key": "spotd.io/interruption", "operator": "Exists"}], taint)
    assert not tolerates([{"key": "other", "operator": "Exists"}], taint)
    assert not tolerates([{"key": "spotd.io/interruption", "value": "rebalance"}], taint)


async def test_populated_cluster_is_placed_ready_and_mixed() -> None:
    api = FakeApiServer()
    await api.start()
    try:
        EmbeddedCluster(api, ClusterSpec()).populate()
        nodes = api.list("Node")
        capacity = [n["metadata"]["labels"]["eks.amazonaws.com/capacityType"] for n in nodes]
        assert (capacity.count("SPOT"), capacity.count("ON_DEMAND")) == (30, 3)
        pods = api.list("Pod")
        assert all(p["spec"].get("nodeName") and p["status"]["phase"] == "Running" for p in pods)
        assert {p["spec"]["priority"] for p in pods} >= {-10, 0, 100000}
        assert {k for k in ("Deployment", "StatefulSet", "DaemonSet", "PodDisruptionBudget", "PriorityClass")} == {
            k for k in ("Deployment", "StatefulSet", "DaemonSet", "PodDisruptionBudget", "PriorityClass") if api.list(k)
        }
        assert all(n["spec"]["providerID"].startswith("aws:///us-east-1") for n in nodes)
    finally:
        await api.stop()


async def test_scheduler_preempts_placeholders_and_respects_taints() -> None:
    import asyncio

    from spotd.sim.scheduler import requests_of

    api = FakeApiServer(termination_scale=0.01)
    await api.start()
    sim = EmbeddedCluster(api, ClusterSpec(spot_nodes=2, on_demand_nodes=0, pods_per_node=1, time_scale=0.01))
    sim.populate()
    task = asyncio.get_running_loop().create_task(sim.run_controllers())
    try:
        # spot-01 is tainted and one of its critical pods evicted: its replacement fits on spot-02 only once
        # the placeholder there (overprovisioning, priority -10) makes way; the room is checked, not assumed
        before = {p["metadata"]["uid"]: p for p in api.list("Pod")}
        on_02 = [p for p in before.values() if p["spec"]["nodeName"] == "spot-02"]
        moved = api.get("Pod", "cache-0", "data")
        assert moved is not None and moved["spec"]["nodeName"] == "spot-01" and moved["spec"]["priority"] > 0
        allocatable = api.get("Node", "spot-02")["status"]["allocatable"]  # type: ignore[index]
        free = cpu_millis(allocatable["cpu"]) - sum(requests_of(p)[0] for p in on_02)
        placeholders = {p["metadata"]["uid"] for p in on_02 if p["spec"]["priority"] < 0}
        freed = sum(requests_of(before[uid])[0] for uid in placeholders)
        assert free < requests_of(moved)[0] <= free + freed, (free, freed)
        node = api.get("Node", "spot-01")
        assert node is not None
        node["spec"]["taints"] = [{"key": "spotd.io/interruption", "value": "spot-itn", "effect": "NoSchedule"}]
        api.update(node)
        api.delete("Pod", "cache-0", "data")

        def replaced() -> bool:
            """The StatefulSet's new cache-0 runs on spot-02 (waited on: it appears only after the old one is
            gone and the controllers' next pass); nothing new goes to the tainted node meanwhile."""
            pods = api.list("Pod")
            placed = [p for p in pods if p["spec"].get("nodeName") == "spot-01" and p["metadata"]["uid"] not in before]
            assert not placed, "scheduled onto a tainted node"
            new = api.get("Pod", "cache-0", "data")
            return bool(
                new
                and new["metadata"]["uid"] not in before
                and new["spec"].get("nodeName") == "spot-02"
                and new["status"].get("phase") == "Running"
            )

        await eventually(replaced, timeout=30)
        left = {p["metadata"]["uid"] for p in api.list("Pod") if p["spec"].get("nodeName") == "spot-02"}
        assert placeholders and not placeholders & left  # the placeholder made way
        assert {p["metadata"]["uid"] for p in on_02} - placeholders <= left  # and nothing else did
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await api.stop()


def test_terminate_removes_the_nodes_at_the_deadline(capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    code, report, output = simulate(
        capsys,
        *("--nodes", "3", "--on-demand-nodes", "1", "--pods-per-node", "3", "--count", "1"),
        *("--notice", "12s", "--terminate", "--yes"),
    )
    assert code == 0, output
    assert time.monotonic() - started >= 11  # waited for the deadline
    assert "terminated i-0" in output
    assert report["nodes"][0]["drained_at"] is not None


def test_via_imds_the_agents_poll_the_notice(capsys: pytest.CaptureFixture[str]) -> None:
    code, report, output = simulate(
        capsys,
        *("--nodes", "3", "--on-demand-nodes", "1", "--pods-per-node", "3", "--count", "1"),
        *("--via", "imds", "--agent-poll-interval", "0.3s"),
    )
    assert code == 0, output
    assert "IMDS" in output
    node = report["nodes"][0]
    assert node["tainted_at"] and node["drained_at"] and node["pods_left"] == 0
    log = output.split("agent logs: ")[1].split()[0]
    text = Path(log).read_text()
    assert '"source": "imds"' in text and '"source": "simulation"' not in text
