"""`spotd simulate-reclaim --scenario fallback`: the controller's flags at scale, the report (pure), refusals,
and the whole rehearsal (embedded cluster, CA model, real agents, real controller over moto SQS)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from spotd.cli.main import main
from spotd.rehearsal.cycle_report import (
    OTHER,
    RECLAIM,
    RETURN,
    Disruption,
    Milestones,
    NodeLife,
    PodWait,
    build_fallback_report,
    percentile,
    to_json,
    to_text,
)
from spotd.rehearsal.fallback import FALLBACK_SELECTOR
from spotd.rehearsal.running_controller import controller_argv, controller_options, scaled_duration_flags

OPTIONS = {
    "--kubeconfig": None,
    "--min-on-demand-age": "2h",
    "--interval": "30s",
    "--lease-duration": "15s",
    "--sqs-wait": "20s",
    "--max-concurrent-drains": "1",
    "--eviction-qps": "5",
    "--dry-run": False,
    "--alertmanager-timeout": "10s",
}


def test_every_behaviour_duration_of_the_controller_is_scaled_leases_and_the_long_poll_are_not() -> None:
    assert scaled_duration_flags(OPTIONS) == {"--min-on-demand-age": 7200.0, "--interval": 30.0}
    argv, notes = controller_argv(OPTIONS, [], 1 / 60, ["--kubeconfig", "k"], FALLBACK_SELECTOR)
    assert argv == ["--kubeconfig", "k", "--interval", "0.5s", "--min-on-demand-age", "120s"]
    assert any("no --fallback-selector" in n for n in notes)


def test_user_flags_come_last_with_their_durations_scaled() -> None:
    options = {**OPTIONS, "--surge-timeout": "10m", "--fallback-selector": ""}
    argv, notes = controller_argv(
        options,
        ["--surge-timeout", "0", "--min-on-demand-age=30m", "--max-drains-per-hour", "60"],
        1 / 60,
        [],
        FALLBACK_SELECTOR,
    )
    assert argv[-5:] == ["--surge-timeout", "0s", "--min-on-demand-age=30s", "--max-drains-per-hour", "60"]
    assert ["--fallback-selector", FALLBACK_SELECTOR] == argv[argv.index("--fallback-selector") :][:2]
    assert any("--fallback-selector" in n for n in notes)


def test_the_controller_of_this_tree_declares_its_duration_flags() -> None:
    durations = scaled_duration_flags(controller_options())
    assert durations["--min-on-demand-age"] == 7200.0
    assert "--ice-cooldown" in durations and "--probe-quiet-period" in durations
    assert not any(flag.startswith("--lease-") for flag in durations)


T0 = datetime(2026, 11, 30, 10, 0, tzinfo=UTC)


def at(wall_seconds: float) -> datetime:
    return T0 + timedelta(seconds=wall_seconds)


def milestones(end: float = 60.0) -> Milestones:
    return Milestones(reclaim_at=T0, deadline_at=at(2), restored_at=at(20), finished_at=at(end))


def test_report_gives_real_node_hours_waits_and_disruptions() -> None:
    # at 1/60: a wall second is a real minute
    nodes = [
        NodeLife("spot-01", "spot-us-east-1a", "spot", False, at(-10), at(2)),
        NodeLife("fallback-1", "fallback-us-east-1a", "on-demand", True, at(5), at(35)),  # 30 min
        NodeLife("fallback-2", "fallback-us-east-1a", "on-demand", True, at(6), at(36)),  # 30 min
        NodeLife("spot-us-east-1a-3", "spot-us-east-1a", "spot", False, at(30)),
    ]
    waits = [
        PodWait("Deployment/shop/web", "web-a", at(1), at(5)),  # 4 min
        PodWait("Deployment/shop/web", "web-b", at(1), at(1.5)),  # 30 s
        PodWait("Deployment/shop/web", "web-c", at(31), at(32)),  # after restore: 1 min
        PodWait("Deployment/overprovisioning/pause", "pause-a", at(1), None, counted=False),
    ]
    disruptions = [
        Disruption("Deployment/shop/web", "web-1", at(0.5), RECLAIM),
        Disruption("Deployment/shop/web", "web-2", at(30), RETURN),
        Disruption("Deployment/shop/web", "web-3", at(1), OTHER),
    ]
    r = build_fallback_report(
        scale=1 / 60,
        reclaimed=["spot-01"],
        milestones=milestones(),
        nodes=nodes,
        waits=waits,
        disruptions=disruptions,
        on_fallback_at_end={},
    )
    assert r.ok, r.verdict
    assert r.fallback_nodes == 2 and r.max_fallback_nodes == 2
    assert r.on_demand_node_hours == pytest.approx(1.0)
    assert r.on_demand_node_hours_after_restore == pytest.approx(31 / 60)  # 15 + 16 min after +20m
    assert r.returned_at == pytest.approx(36 * 60)
    assert r.fallback_first_ready == pytest.approx(5 * 60)
    assert r.spot_nodes_launched == 1
    assert r.pods_waited == 3 and r.pending_max == pytest.approx(240) and r.pending_at_end == 0
    assert r.pending_after_restore_max == pytest.approx(60)
    web = next(w for w in r.workloads if w.workload == "Deployment/shop/web")
    assert web.disrupted == 3 and web.by_cause == {RECLAIM: 1, RETURN: 1, OTHER: 1}
    pause = next(w for w in r.workloads if w.workload.endswith("pause"))
    assert not pause.counted and pause.pending_at_end == 1
    text = to_text(r)
    assert "1.00 on-demand node-hours" in text and "back on Spot: +36m00s" in text
    assert text.splitlines()[-1].startswith("OK: every workload back on Spot")
    data = json.loads(to_json(r))
    assert data["ok"] is True and data["milestones"]["restored_at"].startswith("2026-11-30T10:00:20")


def test_report_is_not_ok_while_fallback_nodes_or_pending_pods_remain() -> None:
    r = build_fallback_report(
        scale=1 / 60,
        reclaimed=["spot-01"],
        milestones=milestones(),
        nodes=[NodeLife("fallback-1", "fallback-us-east-1a", "on-demand", True, at(5))],
        waits=[PodWait("Deployment/shop/web", "web-a", at(50), None)],
        disruptions=[],
        on_fallback_at_end={"Deployment/shop/web": 3},
    )
    assert not r.ok
    assert r.returned_at is None
    assert r.verdict == "controller did not return to Spot: 1 fallback on-demand nodes still up; 1 pods still Pending"
    assert "back on Spot: NOT SEEN" in to_text(r)
    assert r.on_demand_node_hours == pytest.approx(55 / 60)


def test_report_says_when_no_fallback_was_needed() -> None:
    r = build_fallback_report(
        scale=1 / 60,
        reclaimed=["spot-01"],
        milestones=milestones(),
        nodes=[],
        waits=[PodWait("Deployment/shop/web", "web-a", at(1), at(1.1))],
        disruptions=[Disruption("Deployment/shop/web", "web-1", at(0.5), RECLAIM)],
        on_fallback_at_end={},
    )
    assert r.ok and r.returned_at == 0.0
    assert r.verdict == "no fallback was needed: no on-demand node launched, nothing Pending"


def test_percentile_is_nearest_rank() -> None:
    assert percentile([], 95) == 0.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([float(i) for i in range(1, 101)], 95) == 95.0


@pytest.mark.parametrize(
    "flags",
    [
        ["--kubeconfig", "/nonexistent"],
        ["--node", "spot-01"],
        ["--via", "imds"],
        ["--count", "20"],
    ],
)
def test_refusals(capsys: pytest.CaptureFixture[str], flags: list[str]) -> None:
    assert main(["simulate-reclaim", "--scenario", "fallback", *flags]) == 2
    assert "error:" in capsys.readouterr().err


def test_the_fallback_and_the_return_to_spot_through_surges(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "simulate-reclaim",
            *("--scenario", "fallback", "--output", "json"),  # the controller at its defaults
        ]
    )
    out, err = capsys.readouterr()
    report: dict[str, Any] = json.loads(out)
    assert report["fallback_nodes"] >= 1, err  # CA fell back to on-demand while Spot was short
    assert report["pods_waited"] > 0 and report["pending_max"] > 60  # the reclaim left pods Pending minutes
    assert any(w["by_cause"]["reclaim"] for w in report["workloads"])
    assert code == 0, (report["verdict"], err)
    assert report["ok"] and report["returned_at"] > 20 * 60  # after Spot was restored at +20m
    assert report["spot_nodes_launched"] >= 1
    assert any(w["by_cause"]["return"] for w in report["workloads"])
    # make-before-break: the drained pods found the room the placeholders held; nothing waited a surge long
    assert report["pending_after_restore_max"] <= 15 * 60, report["pending_after_restore_max"]
    notes = " ".join(report["notes"])
    assert "controller log:" in notes
    log = Path(notes.split("controller log: ", 1)[1].split(";", 1)[0]).read_text()
    assert '"surge_ready"' in log and '"replacements_landed"' in log  # each return drain surged first
