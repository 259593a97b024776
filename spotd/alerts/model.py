"""Alerts as Alertmanager sees them, and the pure builders for every alert spotd pushes.

An Alert's identity is its labels (alertname included), as in Alertmanager: firing the same labels again
updates the alert, it does not make a second one. Empty label values are left out, since Prometheus and
Alertmanager treat an empty label as an absent one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any

from spotd.common.parsing import format_time
from spotd.notices.record import Notice, NoticeKind

Identity = tuple[tuple[str, str], ...]

SPOT_INTERRUPTION_NOTICE = "SpotInterruptionNotice"
NODE_DRAIN_INCOMPLETE = "NodeDrainIncomplete"
SPOT_CAPACITY_UNAVAILABLE = "SpotCapacityUnavailable"
ON_DEMAND_FALLBACK_ACTIVE = "OnDemandFallbackActive"
ON_DEMAND_DRAIN_BLOCKED = "OnDemandDrainBlocked"

# A Spot reclaim is routine: it goes to chat, not to the pager. Pods left behind at the deadline are real
# impact, so that alone is critical. Advisory notices (rebalance, maintenance) are informational.
NOTICE_SEVERITY = {
    NoticeKind.SPOT_ITN: "warning",
    NoticeKind.ASG_TERMINATION: "warning",
    NoticeKind.REBALANCE: "info",
    NoticeKind.SCHEDULED_MAINTENANCE: "info",
}
_MAX_LISTED = 20


@dataclass(frozen=True)
class AlertNode:
    """The node an alert is about; "" for whatever is not known."""

    node: str = ""
    instance_id: str = ""
    zone: str = ""
    instance_type: str = ""

    def labels(self) -> dict[str, str]:
        return {
            "node": self.node,
            "instance_id": self.instance_id,
            "zone": self.zone,
            "instance_type": self.instance_type,
        }

    def describe(self) -> str:
        """'ip-10-0-1-2 (i-0abc, m5.large in us-east-1a)', leaving out what is unknown."""
        where = " in ".join(p for p in (self.instance_type, self.zone) if p)
        details = ", ".join(p for p in (self.instance_id, where) if p)
        name = self.node or self.instance_id or "unknown node"
        return f"{name} ({details})" if details and details != name else name


@dataclass(frozen=True)
class Alert:
    """One alert. ends_at None: active until resolved; a time: it ends then by itself."""

    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    starts_at: datetime
    ends_at: datetime | None = None
    generator_url: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        labels = {k: str(v) for k, v in self.labels.items() if v != ""}
        if not labels.get("alertname"):
            raise ValueError("an alert needs an alertname label")
        object.__setattr__(self, "labels", MappingProxyType(labels))
        object.__setattr__(self, "annotations", MappingProxyType(dict(self.annotations)))

    @property
    def alertname(self) -> str:
        return self.labels["alertname"]

    @property
    def identity(self) -> Identity:
        return identity_of(self.labels)

    def ended(self, now: datetime) -> bool:
        return self.ends_at is not None and self.ends_at <= now

    def to_api(self, extra_labels: Mapping[str, str], valid_until: datetime) -> dict[str, Any]:
        """The JSON object POST /api/v2/alerts takes. extra_labels yield to the alert's own labels;
        valid_until is the endsAt sent for an alert without an end of its own."""
        body: dict[str, Any] = {
            "labels": {**{k: v for k, v in extra_labels.items() if v != ""}, **self.labels},
            "annotations": dict(self.annotations),
            "startsAt": format_time(self.starts_at),
            "endsAt": format_time(self.ends_at or valid_until),
        }
        if self.generator_url:
            body["generatorURL"] = self.generator_url
        return body


def identity_of(labels: Mapping[str, str]) -> Identity:
    return tuple(sorted((k, str(v)) for k, v in labels.items() if v != ""))


def _now(now: datetime | None) -> datetime:
    return now if now is not None else datetime.now(UTC)


def _listed(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def _age(delta: timedelta) -> str:
    minutes = int(delta.total_seconds() // 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m"


def spot_interruption_alert(notice: Notice, node: AlertNode, linger: timedelta = timedelta(minutes=5)) -> Alert:
    """One alert per notice, label kind=<notice kind>; it ends linger after the notice's deadline
    (the end of the window for scheduled maintenance). A rebalance recommendation has no deadline: it
    stays active until resolved."""
    labels = {
        "alertname": SPOT_INTERRUPTION_NOTICE,
        "severity": NOTICE_SEVERITY.get(notice.kind, "warning"),
        "kind": str(notice.kind),
        **node.labels(),
    }
    if notice.kind is NoticeKind.SCHEDULED_MAINTENANCE:
        # Several maintenance events can be scheduled for one instance; each is its own alert.
        labels["event_id"] = notice.event_id
    end = notice.not_after or notice.deadline
    who = node.describe()
    when = format_time(notice.deadline) if notice.deadline else ""
    if notice.kind is NoticeKind.SPOT_ITN:
        summary = f"Spot interruption notice for {who}"
        description = f"AWS will {notice.action or 'terminate'} the instance at {when}; spotd is draining it."
    elif notice.kind is NoticeKind.ASG_TERMINATION:
        summary = f"Auto Scaling is terminating {who}"
        description = f"The Auto Scaling group is terminating the instance by {when}; spotd is draining it."
    elif notice.kind is NoticeKind.REBALANCE:
        summary = f"Rebalance recommendation for {who}"
        description = "AWS reports elevated interruption risk for this Spot instance."
    else:
        summary = f"Scheduled maintenance for {who}"
        window = f"{when} to {format_time(notice.not_after)}" if notice.not_after else f"from {when}"
        description = f"{notice.action or 'Maintenance'} {notice.event_id} scheduled {window}."
        if notice.description:
            description += f" {notice.description}"
    return Alert(
        labels=labels,
        annotations={"summary": summary, "description": description},
        starts_at=notice.seen_at,
        ends_at=end + linger if end is not None else None,
    )


def node_drain_incomplete_alert(
    node: AlertNode,
    pods_left: Sequence[str],
    deadline: datetime | None,
    linger: timedelta = timedelta(minutes=15),
    now: datetime | None = None,
) -> Alert:
    """Pods were still on the node at the deadline (None: when the drain gave up, now). Critical; an
    event, so it ends linger later."""
    at = deadline if deadline is not None else _now(now)
    return Alert(
        labels={"alertname": NODE_DRAIN_INCOMPLETE, "severity": "critical", **node.labels()},
        annotations={
            "summary": f"{len(pods_left)} pods left on {node.describe()} at the interruption deadline",
            "description": (
                f"The drain did not finish before {format_time(at)}; these pods were killed with "
                f"the instance: {_listed(pods_left)}. Check their PodDisruptionBudgets and grace periods."
            ),
        },
        starts_at=at,
        ends_at=at + linger,
    )


def spot_capacity_unavailable_alert(pool: str, zone: str, instance_type: str, reason: str, since: datetime) -> Alert:
    """Spot capacity is short (ICE) in a pool; active until resolved."""
    where = " in ".join(p for p in (instance_type, zone) if p) or "any zone"
    return Alert(
        labels={
            "alertname": SPOT_CAPACITY_UNAVAILABLE,
            "severity": "warning",
            "pool": pool,
            "zone": zone,
            "instance_type": instance_type,
        },
        annotations={
            "summary": f"No Spot capacity for pool {pool} ({where})",
            "description": f"Since {format_time(since)}: {reason}",
        },
        starts_at=since,
    )


def on_demand_fallback_alert(
    pool: str, nodes: Sequence[str], oldest_age: timedelta, now: datetime | None = None
) -> Alert:
    """On-demand nodes older than the minimum age run in place of Spot; active until resolved."""
    return Alert(
        labels={"alertname": ON_DEMAND_FALLBACK_ACTIVE, "severity": "warning", "pool": pool},
        annotations={
            "summary": f"{len(nodes)} on-demand fallback nodes in pool {pool}",
            "description": (
                f"Spot is unavailable, so these on-demand nodes stay (oldest {_age(oldest_age)}): {_listed(nodes)}."
            ),
        },
        starts_at=_now(now),
    )


def on_demand_drain_blocked_alert(node: AlertNode, reason: str, pool: str = "", now: datetime | None = None) -> Alert:
    """A voluntary drain of an on-demand node stopped; reason says why. Active until resolved."""
    return Alert(
        labels={
            "alertname": ON_DEMAND_DRAIN_BLOCKED,
            "severity": "warning",
            "pool": pool,
            **node.labels(),
        },
        annotations={
            "summary": f"Drain of on-demand node {node.describe()} stopped",
            "description": f"spotd stopped moving this node back to Spot: {reason}",
        },
        starts_at=_now(now),
    )
