"""The Notice record and the parsing of every IMDS payload that can carry one (pure).

A notice source (IMDS, a rehearsal request) produces Notices; the node actions consume them.
Neither side knows the other: this record is all that passes between them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from spotd.common.parsing import format_time, parse_iso_time, parse_maintenance_time


class NoticeKind(StrEnum):
    SPOT_ITN = "spot-itn"
    REBALANCE = "rebalance"
    SCHEDULED_MAINTENANCE = "scheduled-maintenance"
    ASG_TERMINATION = "asg-termination"


class MalformedNotice(ValueError):
    """A payload that should have held a notice but could not be read; logged, counted and skipped."""


SPOT_ACTIONS = frozenset({"terminate", "stop", "hibernate"})
MAINTENANCE_STATES = frozenset({"active", "completed", "canceled"})


@dataclass(frozen=True)
class Notice:
    """One reason for this node to go away (or be disturbed), as the agent acts on it.

    deadline: when the instance is expected to stop; None for advisory notices (rebalance).
    not_after: end of a scheduled-maintenance window. event_id: identifies a maintenance event.
    absent_before: when IMDS last answered that the notice was not there, if that was the reading just
    before its first sighting (so it was issued after then); None when unknown (an agent that started
    with the notice already present).
    """

    kind: NoticeKind
    source: str
    seen_at: datetime
    deadline: datetime | None
    action: str = ""
    event_id: str = ""
    not_after: datetime | None = None
    state: str = "active"
    description: str = ""
    absent_before: datetime | None = None

    @property
    def key(self) -> str:
        """Stable identity: the same notice polled twice, or by a restarted agent, has the same key."""
        if self.kind is NoticeKind.ASG_TERMINATION:
            # One per instance life; its deadline is computed at first sighting, so it cannot name it.
            # A rehearsal names itself (event_id rehearsal-<id>): it never stands for the real one.
            return f"{self.kind}/{self.event_id or 'Terminated'}"
        ident = self.event_id or (format_time(self.deadline) if self.deadline else "")
        return f"{self.kind}/{ident}"

    def seconds_left(self, now: datetime) -> float | None:
        return None if self.deadline is None else (self.deadline - now).total_seconds()

    def with_source(self, source: str) -> Notice:
        return replace(self, source=source)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, value in asdict(self).items():
            if isinstance(value, datetime):
                out[name] = format_time(value)
            elif value is None or value == "":
                continue
            else:
                out[name] = str(value)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Any) -> Notice:
        if not isinstance(data, dict):
            raise MalformedNotice("notice is not a JSON object")
        try:
            kind = NoticeKind(data["kind"])
        except (KeyError, ValueError):
            raise MalformedNotice(f"unknown notice kind {data.get('kind')!r}") from None
        try:
            return cls(
                kind=kind,
                source=str(data.get("source", "unknown")),
                seen_at=parse_iso_time(data["seen_at"]),
                deadline=parse_iso_time(data["deadline"]) if data.get("deadline") else None,
                action=str(data.get("action", "")),
                event_id=str(data.get("event_id", "")),
                not_after=parse_iso_time(data["not_after"]) if data.get("not_after") else None,
                state=str(data.get("state", "active")),
                description=str(data.get("description", "")),
                absent_before=parse_iso_time(data["absent_before"]) if data.get("absent_before") else None,
            )
        except KeyError as exc:
            raise MalformedNotice(f"notice lacks {exc.args[0]!r}") from None
        except ValueError as exc:
            raise MalformedNotice(str(exc)) from None

    @classmethod
    def from_json(cls, text: str) -> Notice:
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise MalformedNotice(f"notice is not JSON: {exc}") from None
        return cls.from_dict(data)


def _load_json(body: str, what: str) -> Any:
    try:
        return json.loads(body)
    except ValueError as exc:
        raise MalformedNotice(f"{what} is not JSON: {exc}") from None


def parse_instance_action(body: str, now: datetime, source: str = "imds") -> Notice:
    """spot/instance-action: {"action": "terminate", "time": "2017-09-18T08:22:00Z"}."""
    data = _load_json(body, "instance-action")
    if not isinstance(data, dict):
        raise MalformedNotice("instance-action is not a JSON object")
    action = data.get("action")
    if not isinstance(action, str) or action not in SPOT_ACTIONS:  # a list or dict is unhashable
        raise MalformedNotice(f"instance-action has unknown action {action!r}")
    try:
        deadline = parse_iso_time(data.get("time", ""))
    except ValueError as exc:
        raise MalformedNotice(f"instance-action time: {exc}") from None
    return Notice(NoticeKind.SPOT_ITN, source, now, deadline, action=str(action))


def parse_rebalance(body: str, now: datetime, source: str = "imds") -> Notice:
    """events/recommendations/rebalance: {"noticeTime": "2020-10-27T08:22:00Z"}."""
    data = _load_json(body, "rebalance recommendation")
    if not isinstance(data, dict):
        raise MalformedNotice("rebalance recommendation is not a JSON object")
    try:
        notice_time = parse_iso_time(data.get("noticeTime", ""))
    except ValueError as exc:
        raise MalformedNotice(f"rebalance noticeTime: {exc}") from None
    # The recommendation has no deadline; its noticeTime identifies it.
    return Notice(NoticeKind.REBALANCE, source, now, None, event_id=format_time(notice_time))


def parse_scheduled_events(body: str, now: datetime, source: str = "imds") -> list[Notice]:
    """events/maintenance/scheduled: a JSON list of events. Returns every well-formed one, any state.

    Raises MalformedNotice when the body is not a list; a malformed entry fails the whole payload, since
    skipping it could uncordon a node whose maintenance is still due.
    """
    data = _load_json(body, "scheduled events")
    if not isinstance(data, list):
        raise MalformedNotice("scheduled events is not a JSON list")
    notices = []
    for i, event in enumerate(data):
        if not isinstance(event, dict):
            raise MalformedNotice(f"scheduled event {i} is not a JSON object")
        state = str(event.get("State", "")).lower()
        if state not in MAINTENANCE_STATES:
            raise MalformedNotice(f"scheduled event {i} has unknown State {event.get('State')!r}")
        event_id = event.get("EventId")
        if not isinstance(event_id, str) or not event_id:
            raise MalformedNotice(f"scheduled event {i} has no EventId")
        try:
            not_before = parse_maintenance_time(event.get("NotBefore", ""))
            not_after = parse_maintenance_time(event["NotAfter"]) if event.get("NotAfter") else None
        except ValueError as exc:
            raise MalformedNotice(f"scheduled event {event_id}: {exc}") from None
        notices.append(
            Notice(
                NoticeKind.SCHEDULED_MAINTENANCE,
                source,
                now,
                not_before,
                action=str(event.get("Code", "")),
                event_id=event_id,
                not_after=not_after,
                state=state,
                description=str(event.get("Description", ""))[:200],
            )
        )
    return notices


def parse_target_lifecycle_state(body: str, now: datetime, window: timedelta, source: str = "imds") -> Notice | None:
    """autoscaling/target-lifecycle-state: plain text 'InService', 'Terminated', ...

    Only 'Terminated' is a notice; the ASG gives no time, so the deadline is now + window (the lifecycle
    hook's heartbeat, or the default two minutes).
    """
    state = body.strip()
    if not state or len(state) > 64 or not state.replace(":", "").isalnum():
        raise MalformedNotice(f"target-lifecycle-state {body[:64]!r} is not a lifecycle state")
    if state != "Terminated":
        return None
    return Notice(NoticeKind.ASG_TERMINATION, source, now, now + window, action="terminate")


REHEARSAL_MAX_AHEAD = timedelta(minutes=15)


class RehearsalRequestRefused(ValueError):
    """A rehearsal request the agent will not act on; the message is the reason its Event gives."""


def rehearsal_nodes(data: Mapping[str, str]) -> list[str]:
    """The `nodes` of a rehearsal request: a JSON list, or names separated by commas, spaces or lines."""
    text = str(data.get("nodes", "")).strip()
    if text.startswith("["):
        try:
            names = json.loads(text)
        except ValueError:
            raise RehearsalRequestRefused("nodes is not a JSON list") from None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise RehearsalRequestRefused("nodes is not a list of node names")
        return [n.strip() for n in names if n.strip()]
    return [n for n in text.replace(",", " ").split() if n]


def parse_rehearsal_request(data: Mapping[str, str], request_id: str, now: datetime) -> Notice:
    """A rehearsal request (ConfigMap data: nodes, kind, deadline, optional id) as a Notice with source
    "simulation". Raises RehearsalRequestRefused when it is malformed, its deadline is past or more than
    REHEARSAL_MAX_AHEAD ahead: a rehearsal can never be made into an immediate deadline."""
    try:
        kind = NoticeKind(str(data.get("kind", "")).strip())
    except ValueError:
        raise RehearsalRequestRefused(f"unknown kind {data.get('kind')!r}") from None
    text = str(data.get("deadline", "")).strip()
    if not text:
        raise RehearsalRequestRefused("no deadline")
    try:
        deadline = parse_iso_time(text)
    except ValueError as exc:
        raise RehearsalRequestRefused(f"deadline: {exc}") from None
    if deadline <= now:
        raise RehearsalRequestRefused(f"deadline {format_time(deadline)} is in the past")
    if deadline > now + REHEARSAL_MAX_AHEAD:
        raise RehearsalRequestRefused(f"deadline {format_time(deadline)} is more than 15 minutes ahead")
    ident = str(data.get("id", "")).strip() or request_id
    action = "terminate" if kind in (NoticeKind.SPOT_ITN, NoticeKind.ASG_TERMINATION) else ""
    if kind == NoticeKind.REBALANCE:  # advice only: the deadline just bounds how long the request may be
        return Notice(kind, "simulation", now, None, event_id=f"rehearsal-{ident}")
    return Notice(kind, "simulation", now, deadline, action=action, event_id=f"rehearsal-{ident}")
