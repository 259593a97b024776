"""One episode per (instance, kind), whichever witness sees it first (pure).

Two witnesses hear of an interruption: the agent on the node (IMDS) and the controller (the queue). The
first records the episode on the Node, where the other reads it; the second adds nothing but a metric,
so an episode gives one alert and one drain. The agent's record is its `spotd.io/notice` annotation (the
notice it acts on); the controller's is `spotd.io/queue-notice`, a JSON object with one entry per kind.
A rehearsal (source "simulation") is no witness of a real episode.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from spotd.common.parsing import format_time
from spotd.kube.keys import NOTICE_ANNOTATION, QUEUE_NOTICE_ANNOTATION
from spotd.notices.record import MalformedNotice, Notice

if TYPE_CHECKING:  # the agent reads episodes and never loads the queue's parser
    from spotd.notices.queue_events import InstanceEvent

IMDS = "imds"
QUEUE = "queue"


def agent_notice(annotations: Mapping[str, str]) -> Notice | None:
    """The real notice the agent records on its node (None: none, unreadable, or a rehearsal)."""
    text = annotations.get(NOTICE_ANNOTATION)
    if not text:
        return None
    try:
        notice = Notice.from_json(text)
    except MalformedNotice:
        return None
    return None if notice.source == "simulation" else notice


def queue_episodes(annotations: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """The controller's record: kind -> what the queue said ({} when absent or unreadable)."""
    text = annotations.get(QUEUE_NOTICE_ANNOTATION)
    if not text:
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, dict)}


def first_witness(annotations: Mapping[str, str], kind: str) -> str | None:
    """Who recorded this node's episode of this kind first: "imds" (the agent), "queue", or None."""
    notice = agent_notice(annotations)
    if notice is not None and str(notice.kind) == kind:
        return IMDS
    if kind in queue_episodes(annotations):
        return QUEUE
    return None


def episode_entry(event: InstanceEvent, seen_at: Any) -> dict[str, str]:
    """What the controller records of an episode the queue saw first."""
    entry = {"seen_at": format_time(seen_at), "at": format_time(event.at)}
    if event.deadline is not None:
        entry["deadline"] = format_time(event.deadline)
    if event.not_after is not None:
        entry["not_after"] = format_time(event.not_after)
    for name in ("action", "event_id", "asg", "hook"):
        value = getattr(event, name)
        if value:
            entry[name] = value
    return entry


def queue_episode_patch(
    annotations: Mapping[str, str], resource_version: str, event: InstanceEvent, seen_at: Any
) -> dict[str, Any] | None:
    """The merge patch recording the queue's episode on the node, conditional on the resourceVersion read;
    None when a witness recorded it already (the agent, or the queue before: a redelivered message)."""
    if first_witness(annotations, event.kind) is not None:
        return None
    episodes = queue_episodes(annotations)
    episodes[event.kind] = episode_entry(event, seen_at)
    text = json.dumps(episodes, sort_keys=True, separators=(",", ":"))
    return {"metadata": {"resourceVersion": resource_version, "annotations": {QUEUE_NOTICE_ANNOTATION: text}}}
