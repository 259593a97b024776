"""cluster-autoscaler's view, pure: its priority expander's ranking and its status ConfigMap's back-offs.

Two ConfigMaps in kube-system, read-only:
- `cluster-autoscaler-priority-expander`, `data.priorities`: YAML, priority (integer, higher wins) -> list
  of regular expressions matched against node group names (Go's regexp, unanchored).
- `cluster-autoscaler-status`, `data.status`: YAML (clusterstate/api types: `autoscalerStatus`,
  `nodeGroups[].name`, `nodeGroups[].scaleUp.status` = Backoff ...), as cluster-autoscaler 1.30 and later
  write it, or the older text ("Cluster-autoscaler status at ...:", "NodeGroups:", "Name:", "ScaleUp:
  Backoff (...)"). Anything else raises StatusFormatError: the caller fails closed (no surge into a group
  whose back-off it cannot read).

The status says that a group is in back-off, not until when: the back-off ends when a later read no
longer says Backoff. `since` is the condition's lastTransitionTime, for the report.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import yaml

PRIORITY_EXPANDER_CONFIGMAP = "cluster-autoscaler-priority-expander"
STATUS_CONFIGMAP = "cluster-autoscaler-status"
AUTOSCALER_NAMESPACE = "kube-system"
BACKOFF = "Backoff"


class PrioritiesFormatError(ValueError):
    """data.priorities is not a mapping of integers to lists of regular expressions."""


class StatusFormatError(ValueError):
    """data.status is in no format this module knows."""


@dataclass(frozen=True)
class AutoscalerVerdict:
    ok: bool
    reason: str


# ---- the priority expander ---------------------------------------------------------------------------------


def parse_priorities(text: str) -> dict[int, tuple[re.Pattern[str], ...]]:
    """data.priorities -> priority -> compiled patterns. Raises PrioritiesFormatError."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PrioritiesFormatError(f"not YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(doc, dict) or not doc:
        raise PrioritiesFormatError("not a mapping of priorities to lists of node group patterns")
    out: dict[int, tuple[re.Pattern[str], ...]] = {}
    for key, patterns in doc.items():
        try:
            priority = int(key)
        except (TypeError, ValueError):
            raise PrioritiesFormatError(f"priority {key!r} is not an integer") from None
        if isinstance(patterns, str):
            patterns = [patterns]
        if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
            raise PrioritiesFormatError(f"priority {priority}: not a list of patterns")
        try:
            out[priority] = tuple(re.compile(p) for p in patterns)
        except re.error as exc:
            raise PrioritiesFormatError(f"priority {priority}: pattern {exc.pattern!r}: {exc}") from None
    return out


def rank_of(priorities: Mapping[int, Iterable[re.Pattern[str]]], group: str) -> int | None:
    """The highest priority whose patterns match the group's name (unanchored, as Go's MatchString); None
    when none does (cluster-autoscaler then considers the group only if no group matches at all)."""
    ranks = [prio for prio, patterns in priorities.items() if any(p.search(group) for p in patterns)]
    return max(ranks) if ranks else None


def spot_ranks_above_fallback(
    priorities: Mapping[int, Iterable[re.Pattern[str]]], spot_groups: Iterable[str], fallback_groups: Iterable[str]
) -> AutoscalerVerdict:
    """ok when the best-ranked Spot group ranks strictly above every fallback group: only then does
    cluster-autoscaler, given a pod both could run, scale up Spot first."""
    spot = {g: rank_of(priorities, g) for g in spot_groups}
    fallback = {g: rank_of(priorities, g) for g in fallback_groups}
    if not spot:
        return AutoscalerVerdict(False, "no Spot node group known")
    ranked_spot = {g: r for g, r in spot.items() if r is not None}
    if not ranked_spot:
        return AutoscalerVerdict(False, f"no Spot group matches a priority: {sorted(spot)}")
    best_group, best = max(ranked_spot.items(), key=lambda kv: (kv[1], kv[0]))
    rivals = sorted(g for g, r in fallback.items() if r is not None and r >= best)
    if rivals:
        why = f"fallback group(s) {rivals} rank at or above the best Spot group {best_group} ({best})"
        return AutoscalerVerdict(False, why)
    return AutoscalerVerdict(True, f"Spot group {best_group} ranks first ({best})")


# ---- the status ConfigMap ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupStatus:
    name: str
    health: str = ""
    scale_up: str = ""
    since: datetime | None = None  # scaleUp lastTransitionTime
    error: str = ""  # backoffInfo errorCode: errorMessage


@dataclass(frozen=True)
class AutoscalerStatus:
    time: datetime | None
    groups: tuple[GroupStatus, ...]


def _time(value: Any) -> datetime | None:
    """metav1.Time in the YAML format (RFC 3339) or Go's time.String() in the text one; None if neither."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    # Go's "2006-01-02 15:04:05.999999999 -0700 MST" (ConfigMapLastUpdateFormat), maybe with " m=+54.67"
    go = re.match(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)(?:\.\d+)? ([+-]\d{4})\b", text)
    if go:
        return datetime.strptime(f"{go.group(1)} {go.group(2)}", "%Y-%m-%d %H:%M:%S %z").astimezone(UTC)
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _status_yaml(doc: Mapping[str, Any]) -> AutoscalerStatus:
    groups = []
    for group in doc.get("nodeGroups") or []:
        if not isinstance(group, dict) or not isinstance(group.get("name"), str):
            raise StatusFormatError("a node group without a name")
        health = group.get("health") or {}
        scale_up = group.get("scaleUp") or {}
        info = scale_up.get("backoffInfo") or {}
        error = ": ".join(str(x) for x in (info.get("errorCode"), info.get("errorMessage")) if x)
        groups.append(
            GroupStatus(
                name=group["name"],
                health=str(health.get("status") or ""),
                scale_up=str(scale_up.get("status") or ""),
                since=_time(scale_up.get("lastTransitionTime")),
                error=error,
            )
        )
    return AutoscalerStatus(_time(doc.get("time")), tuple(groups))


_TEXT_HEADER = re.compile(r"^Cluster-autoscaler status at (.+?):?\s*$")
_TEXT_FIELD = re.compile(r"^\s*(Name|Health|ScaleUp|ScaleDown):\s*(.*?)\s*$")
_TEXT_TRANSITION = re.compile(r"^\s*LastTransitionTime:\s*(.+?)\s*$")


def _status_text(text: str) -> AutoscalerStatus:
    lines = text.splitlines()
    header = _TEXT_HEADER.match(lines[0].strip()) if lines else None
    if header is None:
        raise StatusFormatError("neither YAML nor the text that starts 'Cluster-autoscaler status at'")
    groups: list[GroupStatus] = []
    current: dict[str, Any] | None = None
    field_name = ""
    in_groups = False

    def close() -> None:
        if current is not None:
            groups.append(GroupStatus(**current))

    for line in lines[1:]:
        if line.strip() == "NodeGroups:":
            in_groups = True
            continue
        if not in_groups:
            continue
        m = _TEXT_FIELD.match(line)
        if m:
            field_name, value = m.group(1), m.group(2)
            word = value.split(" ", 1)[0]
            if field_name == "Name":
                close()
                current = {"name": value}
            elif current is None:
                raise StatusFormatError(f"{field_name} before a node group's Name")
            elif field_name == "Health":
                current["health"] = word
            elif field_name == "ScaleUp":
                current["scale_up"] = word
            continue
        t = _TEXT_TRANSITION.match(line)
        if t and current is not None and field_name == "ScaleUp":
            current["since"] = _time(t.group(1))
    close()
    return AutoscalerStatus(_time(header.group(1)), tuple(groups))


def parse_status(text: str) -> AutoscalerStatus:
    """data.status -> per node group health and scale-up state. Raises StatusFormatError."""
    if text.lstrip().startswith("Cluster-autoscaler status at"):
        return _status_text(text.strip())
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError:
        doc = None
    if not isinstance(doc, dict) or not ({"autoscalerStatus", "nodeGroups", "clusterWide"} & doc.keys()):
        raise StatusFormatError("neither the YAML status (autoscalerStatus, nodeGroups) nor the older text")
    return _status_yaml(doc)


def groups_in_backoff(status: AutoscalerStatus, now: datetime, stale_after: float = 600.0) -> dict[str, GroupStatus]:
    """Node group name -> its status, for each group whose scale-up is in back-off. A status older than
    `stale_after` seconds (cluster-autoscaler down) or without a time raises StatusFormatError: a stale view
    says nothing about the back-offs of now, and the caller fails closed."""
    if status.time is None:
        raise StatusFormatError("the status carries no time")
    age = (now - status.time).total_seconds()
    if age > stale_after:
        raise StatusFormatError(f"the status is {age:.0f}s old: cluster-autoscaler is not writing it")
    return {g.name: g for g in status.groups if g.scale_up == BACKOFF}


def surge_allowed(backoffs: Mapping[str, GroupStatus], spot_groups: Iterable[str]) -> AutoscalerVerdict:
    """ok unless every Spot group that could take the placeholders is in back-off (a surge into them would
    only wait out --surge-timeout)."""
    groups = sorted(set(spot_groups))
    if not groups:
        return AutoscalerVerdict(True, "no Spot group named: back-offs not checked")
    backed_off = [g for g in groups if g in backoffs]
    if len(backed_off) == len(groups):
        errors = "; ".join(f"{g}: {backoffs[g].error or 'back-off'}" for g in backed_off)
        return AutoscalerVerdict(False, f"every Spot group is in back-off ({errors})")
    free = [g for g in groups if g not in backoffs]
    return AutoscalerVerdict(True, f"Spot group(s) not in back-off: {free}")
