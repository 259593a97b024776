"""The raw JSON the inventory decodes (msgspec structs of only the fields read) and the slim records built from it.

Pure: no I/O. Each pod becomes a small slotted record (strings shared through sys.intern), so memory grows
with what the policy needs, not with the size of the objects.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec

from spotd.common.parsing import instance_id_from_provider_id, parse_iso_time
from spotd.kube.keys import (
    DO_NOT_DISRUPT_ANNOTATION,
    DRAIN_ANNOTATION,
    DRAIN_RETRY_ANNOTATION,
    DRAINED_ANNOTATION,
    DRAINING_ANNOTATION,
    INSTANCE_TYPE_LABELS,
    MIRROR_ANNOTATION,
    NOTICE_ANNOTATION,
    OUT_OF_SERVICE_TAINT_KEY,
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


class _SelectorRequirement(msgspec.Struct):
    key: str = ""
    operator: str = ""
    values: list[str] | None = None


class _SelectorTerm(msgspec.Struct):
    matchExpressions: list[_SelectorRequirement] | None = None
    matchFields: list[_SelectorRequirement] | None = None


class _NodeSelector(msgspec.Struct):
    nodeSelectorTerms: list[_SelectorTerm] | None = None


class _NodeAffinity(msgspec.Struct):
    requiredDuringSchedulingIgnoredDuringExecution: _NodeSelector | None = None


class _Affinity(msgspec.Struct):
    nodeAffinity: _NodeAffinity | None = None


class _PodSpec(msgspec.Struct):
    nodeName: str | None = None
    volumes: list[_Volume] | None = None
    nodeSelector: dict[str, str] | None = None
    affinity: _Affinity | None = None


class _Status(msgspec.Struct):
    phase: str | None = None
    conditions: list[_Condition] | None = None


class RawPod(msgspec.Struct):
    metadata: _Meta = msgspec.field(default_factory=_Meta)
    spec: _PodSpec = msgspec.field(default_factory=_PodSpec)
    status: _Status = msgspec.field(default_factory=_Status)


class _Taint(msgspec.Struct):
    key: str = ""
    effect: str = ""


class _NodeSpec(msgspec.Struct):
    unschedulable: bool | None = None
    providerID: str | None = None
    taints: list[_Taint] | None = None


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
POD_JOB = 512
POD_DO_NOT_DISRUPT = 1024

# What the scheduler writes when no node has room (as opposed to a selector nothing matches, which no
# amount of capacity fixes and must not hold the controller back forever).
_CAPACITY_MESSAGES = ("Insufficient", "Too many pods")


@dataclass(frozen=True, slots=True)
class Requirement:
    """One node label requirement (a selector's or a required node affinity's): In, NotIn, Exists,
    DoesNotExist (Gt/Lt are read as not satisfied: fail closed means "could compete")."""

    key: str
    operator: str
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        value = labels.get(self.key)
        if self.operator == "In":
            return value is not None and value in self.values
        if self.operator == "NotIn":
            return value is None or value not in self.values
        if self.operator == "Exists":
            return value is not None
        if self.operator == "DoesNotExist":
            return value is None
        return True  # an operator we do not read: assume the pod could run there (it then holds drains)


def matches_all(requirements: Iterable[Requirement], labels: Mapping[str, str]) -> bool:
    return all(r.matches(labels) for r in requirements)


@dataclass(frozen=True, slots=True)
class PendingPod:
    """A pod Pending for lack of capacity, with the node constraints it was scheduled with.

    selector: its nodeSelector; terms: its required node affinity terms (ORed; each ANDed); term_nodes: per
    term, the node names its matchFields allow (metadata.name In, as the DaemonSet controller pins each of its
    pods to one node), None when the term names none."""

    key: str
    selector: tuple[Requirement, ...] = ()
    terms: tuple[tuple[Requirement, ...], ...] = ()
    term_nodes: tuple[frozenset[str] | None, ...] = ()

    def could_run_on(self, labels: Mapping[str, str], name: str | None = None) -> bool:
        """Whether the pod could run on a node with these labels (and this name: None, any)."""
        if not matches_all(self.selector, labels):
            return False
        if not self.terms:
            return True
        for i, term in enumerate(self.terms):
            nodes = self.term_nodes[i] if i < len(self.term_nodes) else None
            if matches_all(term, labels) and (nodes is None or name is None or name in nodes):
                return True
        return False


class PodRecord:
    """One pod, as little as the policy and the probe need. pending: constraints of a Pending pod."""

    __slots__ = ("flags", "name", "namespace", "node", "owner_kind", "owner_name", "pending", "phase")

    def __init__(
        self,
        namespace: str,
        name: str,
        node: str,
        phase: str,
        owner_kind: str,
        owner_name: str,
        flags: int,
        pending: PendingPod | None = None,
    ) -> None:
        self.namespace, self.name, self.node, self.phase = namespace, name, node, phase
        self.owner_kind, self.owner_name, self.flags = owner_kind, owner_name, flags
        self.pending = pending

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
    if owner_kind == "Job":
        flags |= POD_JOB
    if annotations.get(DO_NOT_DISRUPT_ANNOTATION, "").strip().lower() == "true":
        flags |= POD_DO_NOT_DISRUPT
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
    pending = _pending(meta.namespace, meta.name, spec) if flags & POD_UNSCHEDULABLE else None
    return PodRecord(
        intern(meta.namespace),
        meta.name,
        intern(node),
        intern(phase),
        intern(owner_kind),
        intern(owner_name),
        flags,
        pending,
    )


def _pending(namespace: str, name: str, spec: _PodSpec) -> PendingPod:
    selector = tuple(Requirement(k, "In", (v,)) for k, v in sorted((spec.nodeSelector or {}).items()))
    terms: tuple[tuple[Requirement, ...], ...] = ()
    affinity = spec.affinity.nodeAffinity if spec.affinity else None
    required = affinity.requiredDuringSchedulingIgnoredDuringExecution if affinity else None
    term_nodes: tuple[frozenset[str] | None, ...] = ()
    if required is not None:
        terms = tuple(
            tuple(Requirement(e.key, e.operator, tuple(e.values or ())) for e in t.matchExpressions or ())
            for t in required.nodeSelectorTerms or ()
        )
        term_nodes = tuple(_field_nodes(t.matchFields or ()) for t in required.nodeSelectorTerms or ())
    return PendingPod(f"{namespace}/{name}", selector, terms, term_nodes)


def _field_nodes(fields: Iterable[_SelectorRequirement]) -> frozenset[str] | None:
    """The node names a term's matchFields allow: metadata.name In (ANDed when repeated); None when there
    is none. Other field requirements are not read: the pod may then run anywhere (it holds drains)."""
    nodes: frozenset[str] | None = None
    for f in fields:
        if f.key == "metadata.name" and f.operator == "In":
            names = frozenset(f.values or ())
            nodes = names if nodes is None else nodes & names
    return nodes


def _time(text: str | None) -> datetime:
    try:
        return parse_iso_time(text or "")
    except ValueError:
        return _EPOCH


@dataclass(frozen=True, slots=True)
class RetryMark:
    """The controller's back-off annotation: a drain that ended badly is not tried before `after`."""

    after: datetime
    attempts: int = 1
    started: datetime | None = None
    outcome: str = ""

    def to_json(self) -> str:
        data: dict[str, Any] = {
            "after": _iso(self.after),
            "attempts": self.attempts,
            "outcome": self.outcome,
        }
        if self.started is not None:
            data["started"] = _iso(self.started)
        return json.dumps(data, sort_keys=True, separators=(",", ":"))


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_retry_mark(text: str | None) -> RetryMark | None:
    """The back-off annotation, or None when absent or unreadable (the writer always writes a readable one)."""
    if not text:
        return None
    try:
        data = json.loads(text)
        after = parse_iso_time(str(data["after"]))
        started = parse_iso_time(str(data["started"])) if data.get("started") else None
        return RetryMark(after, max(1, int(data.get("attempts", 1))), started, str(data.get("outcome", "")))
    except (ValueError, TypeError, KeyError):
        return None


# Notices after whose deadline the instance is gone for good (spotd.notices.record.NoticeKind values); a
# scheduled reboot or a Spot stop/hibernate comes back, and an out-of-service taint would outlive it.
_ENDING_NOTICES = frozenset({"spot-itn", "asg-termination"})


def notice_deadline(text: str | None) -> datetime | None:
    """The deadline of the notice the agent recorded in spotd.io/notice (spotd.notices.record.Notice JSON),
    when it ends the instance (a Spot interruption that terminates, an ASG termination); else None."""
    if not text:
        return None
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or not data.get("deadline") or data.get("kind") not in _ENDING_NOTICES:
            return None
        if data.get("source") == "simulation":  # a rehearsal: the instance lives on, whatever the node says
            return None
        if str(data.get("action") or "terminate") != "terminate":
            return None
        return parse_iso_time(str(data["deadline"]))
    except (ValueError, TypeError):
        return None


def notice_kind(text: str | None) -> str:
    """The kind of the real notice the agent records in spotd.io/notice ("" for none or a rehearsal)."""
    if not text:
        return ""
    try:
        data = json.loads(text)
    except ValueError:
        return ""
    if not isinstance(data, dict) or data.get("source") == "simulation":
        return ""
    kind = data.get("kind")
    return kind if isinstance(kind, str) else ""


def node_info(node: RawNode, capacity_label: str | None = None) -> NodeInfo:
    meta = node.metadata
    labels = meta.labels or {}
    annotations = meta.annotations or {}
    ready = any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or ())
    retry = read_retry_mark(annotations.get(DRAIN_RETRY_ANNOTATION))
    starts = [t for t in (_maybe_time(annotations.get(DRAINING_ANNOTATION)), retry and retry.started) if t]
    drained = _maybe_time(annotations.get(DRAINED_ANNOTATION))
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
        labels=tuple(sorted((sys.intern(k), v) for k, v in labels.items())),
        do_not_disrupt=annotations.get(DO_NOT_DISRUPT_ANNOTATION, "").strip().lower() == "true",
        retry_after=retry.after if retry else None,
        drain_attempts=retry.attempts if retry else 0,
        retry_outcome=retry.outcome if retry else "",
        drain_started=max(starts) if starts else None,
        drained_at=drained,
    )


def _maybe_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return parse_iso_time(text)
    except ValueError:
        return None


def node_extra(node: RawNode) -> NodeExtra:
    annotations = node.metadata.annotations or {}
    return NodeExtra(
        provider_id=node.spec.providerID or "",
        draining_since=annotations.get(DRAINING_ANNOTATION, ""),
        notice_deadline=notice_deadline(annotations.get(NOTICE_ANNOTATION)),
        notice_kind=notice_kind(annotations.get(NOTICE_ANNOTATION)),
        out_of_service=any(t.key == OUT_OF_SERVICE_TAINT_KEY for t in node.spec.taints or ()),
    )


@dataclass(frozen=True, slots=True)
class NodeExtra:
    """What the controller needs besides the policy's NodeInfo."""

    provider_id: str = ""
    draining_since: str = ""  # our own annotation: a drain of ours was in flight
    notice_deadline: datetime | None = None  # the agent's spotd.io/notice: when the instance goes
    notice_kind: str = ""  # the kind of the real notice the agent acts on ("": none, or a rehearsal)
    out_of_service: bool = False  # carries node.kubernetes.io/out-of-service


def summarize(pods: Iterable[PodRecord]) -> NodePods:
    """A node's pods as the drain policy sees them (DaemonSet, mirror and finished pods are not evicted)."""
    evictable = 0
    not_safe: list[str] = []
    unreplicated: list[str] = []
    local: list[str] = []
    jobs: list[str] = []
    keep: list[str] = []
    for pod in pods:
        flags = pod.flags
        if flags & (POD_DAEMONSET | POD_MIRROR | POD_TERMINAL | POD_TERMINATING):
            continue
        evictable += 1
        if flags & POD_NOT_SAFE_TO_EVICT:
            not_safe.append(pod.key)
        if flags & POD_UNREPLICATED:
            unreplicated.append(pod.key)
        if flags & POD_JOB:
            jobs.append(pod.key)
        if flags & POD_DO_NOT_DISRUPT:
            keep.append(pod.key)
        # safe-to-evict=true vouches for local storage, as spotd.decide reads it
        if flags & POD_LOCAL_STORAGE and not flags & POD_SAFE_TO_EVICT:
            local.append(pod.key)
    return NodePods(
        evictable,
        tuple(sorted(not_safe)),
        tuple(sorted(unreplicated)),
        tuple(sorted(local)),
        tuple(sorted(jobs)),
        tuple(sorted(keep)),
    )


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
    labels: tuple[tuple[str, str], ...] = ()
    do_not_disrupt: bool = False  # annotated karpenter.sh/do-not-disrupt=true
    retry_after: datetime | None = None  # our back-off: no drain before
    drain_attempts: int = 0  # drains that ended badly in a row (from the back-off annotation)
    retry_outcome: str = ""
    drain_started: datetime | None = None  # our last drain's start (draining mark or back-off record)
    drained_at: datetime | None = None  # our drained mark

    def age(self, now: datetime) -> float:
        return (now - self.created).total_seconds()


@dataclass(frozen=True, slots=True)
class NodePods:
    """The pods of one node that matter to a voluntary drain (DaemonSet and mirror pods excluded)."""

    evictable: int = 0
    not_safe_to_evict: tuple[str, ...] = ()
    unreplicated: tuple[str, ...] = ()
    local_storage: tuple[str, ...] = ()
    jobs: tuple[str, ...] = ()  # running Job pods
    do_not_disrupt: tuple[str, ...] = ()  # annotated karpenter.sh/do-not-disrupt=true
