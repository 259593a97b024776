"""events.k8s.io/v1 Events share storage with core/v1 Events, as in Kubernetes: stored in the core shape,
converted on the way in and out."""

from __future__ import annotations

from typing import Any

from .store import Obj

# events.k8s.io/v1 field -> core/v1 field
_RENAMES = {
    "regarding": "involvedObject",
    "note": "message",
    "reportingController": "reportingComponent",
    "deprecatedSource": "source",
    "deprecatedFirstTimestamp": "firstTimestamp",
    "deprecatedLastTimestamp": "lastTimestamp",
    "deprecatedCount": "count",
}
_SAME = ("metadata", "related", "reason", "type", "action", "reportingInstance", "eventTime", "series")


def to_core(event: Obj) -> Obj:
    """An events.k8s.io/v1 Event in the core/v1 shape the store keeps."""
    core: dict[str, Any] = {"apiVersion": "v1", "kind": "Event"}
    for key in _SAME:
        if key in event:
            core[key] = event[key]
    for new, old in _RENAMES.items():
        if new in event:
            core[old] = event[new]
    core.setdefault("involvedObject", {})
    return core


def from_core(core: Obj) -> Obj:
    """A stored core/v1 Event as events.k8s.io/v1."""
    event: dict[str, Any] = {"apiVersion": "events.k8s.io/v1", "kind": "Event"}
    for key in _SAME:
        if key in core:
            event[key] = core[key]
    for new, old in _RENAMES.items():
        if old in core:
            event[new] = core[old]
    return event
