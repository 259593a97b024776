"""The raw JSON the inventory decodes (msgspec structs of only the fields read) and the slim records built from it.

Pure: no I/O. Each pod becomes a small slotted record (strings shared through sys.intern), so memory grows
with what the policy needs, not with the size of the objects.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec

from spotd.common.parsing import instance_id_from_provider_id, parse_iso_time
from spotd.kube.keys import (
    DRAIN_ANNOTATION,
    INSTANCE_TYPE_LABELS,
    MIRROR_ANNOTATION,
    SAFE_TO_EVICT_ANNOTATION,
    ZONE_LABELS,
    capacity_type_from_labels,
    first_label,
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


# --- what is decoded: only the fields read -----------------------------------------------------------


class _Owner(msgspec.Struct):
    kind: str = ""
    name: str = ""
    controller: bool | None = None


class _Meta(msgspec.Struct):
    name: str = ""
    namespace: str = ""
    resourceVersion: str = ""
    creationTimestamp: str | None = None
    deletionTimestamp: str | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None
    ownerReferences: list[_Owner] | None = None


class _Condition(msgspec.Struct):
    type: str = ""
    status: str = ""
    reason: str | None = None
    message: str | None = None


class _Volume(msgspec.Struct):
    emptyDir: dict[str, Any] | None = None


class _PodSpec(msgspec.Struct):
    nodeName: str | None = None
    volumes: list[_Volume] | None = None


class _Status(msgspec.Struct):
    phase: str | None = None
    conditions: list[_Condition] | None = None


class RawPod(msgspec.Struct):
    metadata: _Meta = msgspec.field(default_factory=_Meta)
    spec: _PodSpec = msgspec.field(default_factory=_PodSpec)
    status: _Status = msgspec.field(default_factory=_Status)


class _NodeSpec(msgspec.Struct):
    unschedulable: bool | None = None
    providerID: str | None = None


class RawNode(msgspec.Struct):
    metadata: _Meta = msgspec.field(default_factory=_Meta)
    spec: _NodeSpec = msgspec.field(default_factory=_NodeSpec)
    status: _Status = msgspec.field(default_factory=_Status)


class _ListMeta(msgspec.Struct):
    resourceVersion: str = ""
    # "continue" is a keyword; msgspec renames it
    cont: str | None = msgspec.field(default=None, name="continue")


class RawList(msgspec.Struct):
    metadata: _ListMeta = msgspec.field(default_factory=_ListMeta)
    items: list[msgspec.Raw] | None = None


class RawEvent(msgspec.Struct):
    type: str
    object: msgspec.Raw


class RawStatusObject(msgspec.Struct):
    code: int | None = None
    reason: str | None = None
    message: str | None = None


# --- the slim records -------------------------------------------------------------------------------

POD_DAEMONSET = 1
POD_UNREPLICATED = 2
POD_LOCAL_STORAGE = 4
POD_NOT_SAFE_TO_EVICT = 8
POD_MIRROR = 16
POD_UNSCHEDULABLE = 32
POD_TERMINAL = 64
POD_SAFE_TO_EVICT = 128
POD_TERMINATING = 256

# What the scheduler writes when no node has room (as opposed to a selector nothing matches, which no
# amount of capacity fixes and must not hold the controller back forever).
_CAPACITY_MESSAGES = ("Insufficient", "Too many pods")


class PodRecord:
    """One pod, as little as the policy and the probe need."""

    __slots__ = ("flags", "name", "namespace", "node", "owner_kind", "owner_name", "phase")

    def __init__(
        self, namespace: str, name: str, node: str, phase: str, owner_kind: str, owner_name: str, flags: int
    ) -> None:
        self.namespace, self.name, self.node, self.phase = namespace, name, node, phase
        self.owner_kind, self.owner_name, self.flags = owner_kind, owner_name, flags

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def __repr__(self) -> str:
        return f"PodRecord({self.key} on {self.node or '-'} {self.phase} flags={self.flags})"


def pod_record(pod: RawPod) -> PodRecord:
    meta, spec, status = pod.metadata, pod.spec, pod.status
    intern = sys.intern
    owner_kind = owner_name = ""
    for ref in meta.ownerReferences or ():
        if ref.controller or not owner_kind:
            owner_kind, owner_name = ref.kind, ref.name
    annotations = meta.annotations or {}
    flags = 0
    if owner_kind == "DaemonSet":
        flags |= POD_DAEMONSET
    if not owner_kind:
        flags |= POD_UNREPLICATED
    if any(v.emptyDir is not None for v in spec.volumes or ()):
        flags |= POD_LOCAL_STORAGE
    safe = annotations.get(SAFE_TO_EVICT_ANNOTATION, "").strip().lower()
    if safe == "false":
        flags |= POD_NOT_SAFE_TO_EVICT
    elif safe == "true":
        flags |= POD_SAFE_TO_EVICT
    if MIRROR_ANNOTATION in annotations:
        flags |= POD_MIRROR
    phase = status.phase or "Pending"
    if phase in ("Succeeded", "Failed"):
        flags |= POD_TERMINAL
    if meta.deletionTimestamp:
        flags |= POD_TERMINATING
    node = spec.nodeName or ""
    if not node and phase == "Pending":
        for cond in status.conditions or ():
            if cond.type == "PodScheduled" and cond.status == "False" and cond.reason == "Unschedulable":
                message = cond.message or ""
                if not message or any(m in message for m in _CAPACITY_MESSAGES):
                    flags |= POD_UNSCHEDULABLE
    return PodRecord(
        intern(meta.namespace),
        meta.name,
        intern(node),
        intern(phase),
        intern(owner_kind),
        intern(owner_name),
        flags,
    )


def _time(text: str | None) -> datetime:
    try:
        return parse_iso_time(text or "")
    except ValueError:
        return _EPOCH


def node_info(node: RawNode, capacity_label: str | None = None) -> NodeInfo:
    meta = node.metadata
    labels = meta.labels or {}
    annotations = meta.annotations or {}
    ready = any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or ())
    return NodeInfo(
        name=meta.name,
        capacity_type=capacity_type_from_labels(labels, capacity_label),
        created=_time(meta.creationTimestamp),
        instance_type=sys.intern(first_label(labels, INSTANCE_TYPE_LABELS)),
        zone=sys.intern(first_label(labels, ZONE_LABELS)),
        ready=ready,
        unschedulable=bool(node.spec.unschedulable),
        drain_annotation=annotations.get(DRAIN_ANNOTATION, ""),
        instance_id=instance_id_from_provider_id(node.spec.providerID or "") or "",
    )


@dataclass(frozen=True, slots=True)
class NodeExtra:
    """What the controller needs besides the policy's NodeInfo."""

    provider_id: str = ""
    draining_since: str = ""  # our own annotation: a drain of ours was in flight


def summarize(pods: Iterable[PodRecord]) -> NodePods:
    """A node's pods as the drain policy sees them (DaemonSet, mirror and finished pods are not evicted)."""
    evictable = 0
    not_safe: list[str] = []
    unreplicated: list[str] = []
    local: list[str] = []
    for pod in pods:
        flags = pod.flags
        if flags & (POD_DAEMONSET | POD_MIRROR | POD_TERMINAL | POD_TERMINATING):
            continue
        evictable += 1
        if flags & POD_NOT_SAFE_TO_EVICT:
            not_safe.append(pod.key)
        if flags & POD_UNREPLICATED:
            unreplicated.append(pod.key)
        # safe-to-evict=true vouches for local storage, as spotd.decide reads it
        if flags & POD_LOCAL_STORAGE and not flags & POD_SAFE_TO_EVICT:
            local.append(pod.key)
    return NodePods(evictable, tuple(sorted(not_safe)), tuple(sorted(unreplicated)), tuple(sorted(local)))


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What the policy needs to know about one node."""

    name: str
    capacity_type: str | None
    created: datetime
    instance_type: str = ""
    zone: str = ""
    ready: bool = True
    unschedulable: bool = False
    drain_annotation: str = ""
    instance_id: str = ""

    def age(self, now: datetime) -> float:
        return (now - self.created).total_seconds()


@dataclass(frozen=True, slots=True)
class NodePods:
    """The pods of one node that matter to a voluntary drain (DaemonSet and mirror pods excluded)."""

    evictable: int = 0
    not_safe_to_evict: tuple[str, ...] = ()
    unreplicated: tuple[str, ...] = ()
    local_storage: tuple[str, ...] = ()
