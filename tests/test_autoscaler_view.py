"""Table tests for cluster-autoscaler's view: the priority expander's ranking and the status ConfigMap's
back-offs, in the YAML format (cluster-autoscaler 1.30+) and the older text one."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from spotd.controller.autoscaler_view import (
    GroupStatus,
    PrioritiesFormatError,
    StatusFormatError,
    groups_in_backoff,
    parse_priorities,
    parse_status,
    rank_of,
    spot_ranks_above_fallback,
    surge_allowed,
)

NOW = datetime(2026, 11, 30, 12, 0, 30, tzinfo=UTC)

PRIORITIES = """\
10:
  - .*-on-demand-.*
50:
  - .*-spot-.*
  - ^gpu-spot$
"""


def test_parse_priorities_and_rank() -> None:
    prios = parse_priorities(PRIORITIES)
    assert sorted(prios) == [10, 50]
    assert rank_of(prios, "eks-spot-m5-abc") == 50
    assert rank_of(prios, "eks-on-demand-m5-abc") == 10
    assert rank_of(prios, "gpu-spot") == 50
    assert rank_of(prios, "other") is None


@pytest.mark.parametrize(
    ("text", "spot", "fallback", "ok", "reason"),
    [
        (PRIORITIES, ["eks-spot-a", "eks-spot-b"], ["eks-on-demand-a"], True, "eks-spot-b ranks first (50)"),
        ("10:\n  - .*spot.*\n50:\n  - .*on-demand.*\n", ["eks-spot-a"], ["eks-on-demand-a"], False,
         "fallback group(s) ['eks-on-demand-a'] rank at or above the best Spot group eks-spot-a (10)"),
        ("10:\n  - .*\n", ["eks-spot-a"], ["eks-on-demand-a"], False, "rank at or above"),
        ("10:\n  - .*spot.*\n", ["eks-spot-a"], ["eks-on-demand-a"], True, "ranks first"),  # fallback unmatched
        ("10:\n  - .*on-demand.*\n", ["eks-spot-a"], ["eks-on-demand-a"], False, "no Spot group matches"),
        ("10: .*spot.*\n", ["eks-spot-a"], [], True, "ranks first"),  # one pattern as a plain string
        (PRIORITIES, [], ["eks-on-demand-a"], False, "no Spot node group known"),
    ],
)  # fmt: skip
def test_spot_ranks_above_fallback(text: str, spot: list[str], fallback: list[str], ok: bool, reason: str) -> None:
    verdict = spot_ranks_above_fallback(parse_priorities(text), spot, fallback)
    assert verdict.ok is ok
    assert reason in verdict.reason


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", "not a mapping"),
        ("- a\n- b\n", "not a mapping"),
        ("high:\n  - .*\n", "'high' is not an integer"),
        ("10:\n  - 3\n", "not a list of patterns"),
        ("10:\n  - '(unclosed'\n", "pattern '(unclosed'"),
        ("10: [", "not YAML"),
    ],
)
def test_priorities_refused(text: str, error: str) -> None:
    with pytest.raises(PrioritiesFormatError, match=error.replace("(", r"\(").replace("[", r"\[")):
        parse_priorities(text)


# As clusterstate/api/types.go marshals it (cluster-autoscaler 1.30+), time from ConfigMapLastUpdateFormat.
STATUS_YAML = """\
time: 2026-11-30 12:00:10.123456789 +0000 UTC
autoscalerStatus: Running
clusterWide:
  health:
    status: Healthy
    nodeCounts:
      registered: {total: 4, ready: 4, notStarted: 0}
      longUnregistered: 0
      unregistered: 0
  scaleUp:
    status: InProgress
    lastProbeTime: "2026-11-30T12:00:10Z"
    lastTransitionTime: "2026-11-30T11:50:00Z"
nodeGroups:
- name: eks-spot-m5-abc
  health:
    status: Healthy
    cloudProviderTarget: 1
    minSize: 0
    maxSize: 10
  scaleUp:
    status: Backoff
    backoffInfo:
      errorCode: InsufficientInstanceCapacity
      errorMessage: We currently do not have sufficient m5.large capacity
    lastProbeTime: "2026-11-30T12:00:10Z"
    lastTransitionTime: "2026-11-30T11:55:00Z"
- name: eks-spot-c5-def
  health:
    status: Healthy
  scaleUp:
    status: NoActivity
- name: eks-on-demand-m5-ghi
  health:
    status: Healthy
  scaleUp:
    status: InProgress
"""

# The older text format, as cluster-autoscaler wrote it before the YAML one.
STATUS_TEXT = """\
Cluster-autoscaler status at 2026-11-30 12:00:10.152766082 +0000 UTC:
Cluster-wide:
  Health:      Healthy (ready=3 unready=0 notStarted=0 longNotStarted=0 registered=3 longUnregistered=0)
               LastProbeTime:      2026-11-30 12:00:10.151651586 +0000 UTC m=+54.671652928
               LastTransitionTime: 2026-11-30 11:10:22.083690777 +0000 UTC m=+14.603692120
  ScaleUp:     InProgress (ready=3 registered=3)
               LastProbeTime:      2026-11-30 12:00:10.151651586 +0000 UTC m=+54.671652928
               LastTransitionTime: 2026-11-30 11:10:22.083690777 +0000 UTC m=+14.603692120
  ScaleDown:   NoCandidates (candidates=0)
               LastProbeTime:      2026-11-30 12:00:10.151651586 +0000 UTC m=+54.671652928
               LastTransitionTime: 2026-11-30 11:10:22.083690777 +0000 UTC m=+14.603692120

NodeGroups:
  Name:        eks-spot-m5-abc
  Health:      Healthy (ready=1 unready=0 notStarted=0 longNotStarted=0 registered=1 longUnregistered=0 cloudProviderTarget=2 (minSize=0, maxSize=10))
               LastProbeTime:      2026-11-30 12:00:10.151651586 +0000 UTC m=+54.671652928
               LastTransitionTime: 2026-11-30 11:10:22.083690777 +0000 UTC m=+14.603692120
  ScaleUp:     Backoff (ready=1 cloudProviderTarget=2)
               LastProbeTime:      2026-11-30 12:00:10.151651586 +0000 UTC m=+54.671652928
               LastTransitionTime: 2026-11-30 11:55:00.000000000 +0000 UTC m=+14.603692120
  ScaleDown:   NoCandidates (candidates=0)
               LastProbeTime:      2026-11-30 12:00:10.151651586 +0000 UTC m=+54.671652928
               LastTransitionTime: 2026-11-30 11:10:22.083690777 +0000 UTC m=+14.603692120

  Name:        eks-spot-c5-def
  Health:      Healthy (ready=0 unready=0 notStarted=0 longNotStarted=0 registered=0 longUnregistered=0 cloudProviderTarget=0 (minSize=0, maxSize=10))
               LastProbeTime:      2026-11-30 12:00:10.151651586 +0000 UTC m=+54.671652928
               LastTransitionTime: 2026-11-30 11:10:22.083690777 +0000 UTC m=+14.603692120
  ScaleUp:     NoActivity (ready=0 cloudProviderTarget=0)
               LastProbeTime:      2026-11-30 12:00:10.151651586 +0000 UTC m=+54.671652928
               LastTransitionTime: 2026-11-30 11:10:22.083690777 +0000 UTC m=+14.603692120
"""  # noqa: E501


@pytest.mark.parametrize("text", [STATUS_YAML, STATUS_TEXT], ids=["yaml", "text"])
def test_status_backoffs(text: str) -> None:
    status = parse_status(text)
    assert status.time == datetime(2026, 11, 30, 12, 0, 10, tzinfo=UTC)
    backoffs = groups_in_backoff(status, NOW)
    assert list(backoffs) == ["eks-spot-m5-abc"]
    assert backoffs["eks-spot-m5-abc"].since == datetime(2026, 11, 30, 11, 55, tzinfo=UTC)
    assert {g.name: g.scale_up for g in status.groups}["eks-spot-c5-def"] == "NoActivity"


def test_status_yaml_keeps_the_error() -> None:
    group = groups_in_backoff(parse_status(STATUS_YAML), NOW)["eks-spot-m5-abc"]
    assert group.error.startswith("InsufficientInstanceCapacity: We currently do not have")
    assert group.health == "Healthy"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "just some words",
        "- a list\n",
        "somethingElse: 1\n",
        "nodeGroups:\n- health: {status: Healthy}\n",  # a group without a name
        "Cluster-autoscaler status at yesterday:\nNodeGroups:\n  Health:  Healthy\n",  # a field before a Name
    ],
)
def test_unknown_status_formats_are_refused(text: str) -> None:
    with pytest.raises(StatusFormatError):
        parse_status(text)


def test_stale_or_timeless_status_fails_closed() -> None:
    status = parse_status(STATUS_YAML)
    with pytest.raises(StatusFormatError, match="old"):
        groups_in_backoff(status, NOW + timedelta(hours=1))
    with pytest.raises(StatusFormatError, match="no time"):
        groups_in_backoff(parse_status("autoscalerStatus: Initializing\n"), NOW)


@pytest.mark.parametrize(
    ("spot", "ok", "reason"),
    [
        (["eks-spot-m5-abc"], False, "every Spot group is in back-off (eks-spot-m5-abc: InsufficientInstance"),
        (["eks-spot-m5-abc", "eks-spot-c5-def"], True, "not in back-off: ['eks-spot-c5-def']"),
        (["eks-spot-c5-def"], True, "not in back-off"),
        ([], True, "back-offs not checked"),
    ],
)
def test_surge_allowed(spot: list[str], ok: bool, reason: str) -> None:
    backoffs = {"eks-spot-m5-abc": GroupStatus("eks-spot-m5-abc", scale_up="Backoff", error="InsufficientInstance")}
    verdict = surge_allowed(backoffs, spot)
    assert verdict.ok is ok
    assert reason in verdict.reason
