"""meta.k8s.io/v1 Table responses, what `kubectl get` asks for: Node and Pod columns as kubectl prints
them, Name and Age for everything else."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

from .codec import parse_time
from .store import Obj

Column = tuple[str, str, str]  # name, type, format


def _age(obj: Obj) -> str:
    created = parse_time(obj["metadata"].get("creationTimestamp", ""))
    if created is None:
        return "<unknown>"
    seconds = max(0, int((dt.datetime.now(dt.UTC) - created).total_seconds()))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def _node_row(node: Obj) -> list[Any]:
    conditions = node.get("status", {}).get("conditions") or []
    ready = next((c.get("status") for c in conditions if c.get("type") == "Ready"), None)
    status = {"True": "Ready", "False": "NotReady"}.get(ready or "", "Unknown")
    if node.get("spec", {}).get("unschedulable"):
        status += ",SchedulingDisabled"
    labels = node["metadata"].get("labels") or {}
    roles = sorted(k.split("/", 1)[1] for k in labels if k.startswith("node-role.kubernetes.io/")) or ["<none>"]
    version = node.get("status", {}).get("nodeInfo", {}).get("kubeletVersion", "")
    return [node["metadata"]["name"], status, ",".join(roles), _age(node), version]


def _pod_row(pod: Obj) -> list[Any]:
    spec, status = pod.get("spec", {}), pod.get("status", {})
    containers = spec.get("containers") or []
    statuses = status.get("containerStatuses") or []
    ready = sum(1 for s in statuses if s.get("ready"))
    restarts = sum(int(s.get("restartCount", 0)) for s in statuses)
    reason = status.get("reason") or status.get("phase") or "Unknown"
    if pod["metadata"].get("deletionTimestamp"):
        reason = "Terminating"
    return [
        pod["metadata"]["name"],
        f"{ready}/{len(containers)}",
        reason,
        restarts,
        _age(pod),
        status.get("podIP") or "<none>",
        spec.get("nodeName") or "<none>",
    ]


def _pdb_row(pdb: Obj) -> list[Any]:
    spec = pdb.get("spec", {})
    allowed = pdb.get("status", {}).get("disruptionsAllowed", 0)
    return [
        pdb["metadata"]["name"],
        str(spec.get("minAvailable", "N/A")),
        str(spec.get("maxUnavailable", "N/A")),
        allowed,
        _age(pdb),
    ]


def _lease_row(lease: Obj) -> list[Any]:
    return [lease["metadata"]["name"], lease.get("spec", {}).get("holderIdentity", ""), _age(lease)]


def _event_row(event: Obj) -> list[Any]:
    involved = event.get("involvedObject") or event.get("regarding") or {}
    last = event.get("lastTimestamp") or event.get("eventTime") or event["metadata"].get("creationTimestamp", "")
    return [
        _age({"metadata": {"creationTimestamp": last}}),
        event.get("type", ""),
        event.get("reason", ""),
        f"{str(involved.get('kind', '')).lower()}/{involved.get('name', '')}",
        event.get("message") or event.get("note") or "",
    ]


def _default_row(obj: Obj) -> list[Any]:
    return [obj["metadata"]["name"], _age(obj)]


_COLUMNS: dict[str, tuple[list[Column], Callable[[Obj], list[Any]]]] = {
    "Node": (
        [
            ("Name", "string", "name"),
            ("Status", "string", ""),
            ("Roles", "string", ""),
            ("Age", "string", ""),
            ("Version", "string", ""),
        ],
        _node_row,
    ),
    "Pod": (
        [
            ("Name", "string", "name"),
            ("Ready", "string", ""),
            ("Status", "string", ""),
            ("Restarts", "integer", ""),
            ("Age", "string", ""),
            ("IP", "string", ""),
            ("Node", "string", ""),
        ],
        _pod_row,
    ),
    "PodDisruptionBudget": (
        [
            ("Name", "string", "name"),
            ("Min Available", "string", ""),
            ("Max Unavailable", "string", ""),
            ("Allowed Disruptions", "integer", ""),
            ("Age", "string", ""),
        ],
        _pdb_row,
    ),
    "Event": (
        [
            ("Last Seen", "string", ""),
            ("Type", "string", ""),
            ("Reason", "string", ""),
            ("Object", "string", ""),
            ("Message", "string", ""),
        ],
        _event_row,
    ),
    "Lease": ([("Name", "string", "name"), ("Holder", "string", ""), ("Age", "string", "")], _lease_row),
}
_WIDE_ONLY = {"IP", "Node"}


def wants_table(accept: str) -> bool:
    return "as=Table" in accept


def to_table(
    kind: str,
    objects: list[Obj],
    resource_version: str,
    include_object: str = "Metadata",
    continue_token: str | None = None,
) -> dict[str, Any]:
    """A Table with one row per object; `object` in each row is PartialObjectMetadata unless asked for."""
    columns, row = _COLUMNS.get(kind, ([("Name", "string", "name"), ("Age", "string", "")], _default_row))
    definitions = [
        {"name": n, "type": t, "format": f, "description": n, "priority": 1 if n in _WIDE_ONLY else 0}
        for n, t, f in columns
    ]
    rows = []
    for obj in objects:
        entry: dict[str, Any] = {"cells": row(obj)}
        if include_object == "Object":
            entry["object"] = obj
        elif include_object != "None":
            entry["object"] = {
                "kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": obj["metadata"],
            }
        rows.append(entry)
    meta: dict[str, Any] = {"resourceVersion": resource_version}
    if continue_token:
        meta["continue"] = continue_token
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": meta,
        "columnDefinitions": definitions,
        "rows": rows,
    }
