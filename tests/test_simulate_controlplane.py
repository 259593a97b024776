"""`spotd simulate-reclaim --embedded --control-plane DIR`: the embedded rehearsal on a real control plane
(spotd/sim/controlplane.py, started by the command itself), the agents with tokens bound to spotd's DaemonSet
pods, and its report's checks; without binaries, one clear line (issue 18)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from spotd.cli.main import main
from spotd.sim.controlplane import controlplane_binaries


@pytest.fixture(scope="module")
def binaries() -> Path:
    if os.environ.get("CI") != "true" and not os.environ.get("SPOTD_CONTROLPLANE") and shutil.which("go") is None:
        pytest.skip("no Go to build the control plane (scripts/controlplane); CI=true makes this a failure")
    return controlplane_binaries()


def simulate(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any], str]:
    code = main(["simulate-reclaim", "--output", "json", *args])
    out, err = capsys.readouterr()
    return code, json.loads(out) if out.strip().startswith("{") else {}, err + out


@pytest.mark.timeout(600)
def test_the_embedded_rehearsal_runs_on_the_real_control_plane(
    binaries: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    agent_log = tmp_path / "agents.log"
    code, report, output = simulate(
        capsys,
        *("--embedded", "--control-plane", str(binaries), "--agent-log", str(agent_log)),
        *("--nodes", "6", "--on-demand-nodes", "2", "--pods-per-node", "3", "--count", "2", "--notice", "90s"),
    )
    assert code == 0, output
    assert "real control plane (v1." in output and "8 agents" in output
    assert report["ok"] is True
    assert len(report["nodes"]) == 2
    assert all(n["drained_at"] and n["pods_left"] == 0 for n in report["nodes"]), report["nodes"]
    assert sum(n["pods_evicted"] for n in report["nodes"]) > 0
    assert all(w["recovered_at"] for w in report["workloads"] if w["min_ready"] < w["desired"] and w["ok"])
    # each agent acted as itself: its pod-bound token let it write its own node, and nothing was refused
    lines = [json.loads(line) for line in agent_log.read_text().splitlines() if line.startswith("{")]
    cordoned = {line.get("node") for line in lines if line.get("event") == "node_cordoned"}
    assert {n["name"] for n in report["nodes"]} <= cordoned, sorted(cordoned)
    assert not [line for line in lines if line.get("level") in ("warning", "error")]


def test_missing_binaries_are_one_clear_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["simulate-reclaim", "--embedded", "--control-plane", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("spotd simulate-reclaim: --control-plane: ") and "lacks etcd, kube-apiserver" in err[0]


def test_no_go_and_no_directory_is_one_clear_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SPOTD_CONTROLPLANE", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no go on it
    assert main(["simulate-reclaim", "--control-plane"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "SPOTD_CONTROLPLANE" in err[0] and "Go" in err[0]


def test_the_flag_is_for_the_embedded_reclaim_only(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    kubeconfig = str(tmp_path / "kubeconfig")
    assert main(["simulate-reclaim", "--kubeconfig", kubeconfig, "--count", "1", "--control-plane"]) == 2
    assert "only with the embedded cluster" in capsys.readouterr().err
    assert main(["simulate-reclaim", "--scenario", "fallback", "--control-plane"]) == 2
    assert "--control-plane: not with --scenario fallback" in capsys.readouterr().err
