"""Which nodes the rehearsal acts on and how it reads nodes, pods and workloads (pure)."""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from lightkube.resources.core_v1 import Node, Pod

from spotd.common.parsing import format_time, instance_id_from_provider_id
from spotd.drain.executor import pod_facts
from spotd.drain.plan import PodPolicy, PodVerdict
from spotd.drain.plan import decide_pod as decide_drain
from spotd.kube.keys import NOTICE_ANNOTATION, SIMULATION_ANNOTATION
from spotd.notices.record import NoticeKind
from spotd.rehearsal.report import WorkloadRef


class RehearsalRefused(ValueError):
    """The rehearsal will not start: the message says why (non-Spot node, too few nodes, ...)."""


@dataclass(frozen=True)
class Target:
    name: str
    capacity_type: str
    provider_id: str = ""
    zone: str = ""

    @property
    def instance_id(self) -> str:
        return instance_id_from_provider_id(self.provider_id) or ""


CAPACITY_LABELS = (
    ("eks.amazonaws.com/capacityType", {"SPOT": "spot", "ON_DEMAND": "on-demand"}),
    ("karpenter.sh/capacity-type", {"spot": "spot", "on-demand": "on-demand"}),
    ("node.kubernetes.io/lifecycle", {"spot": "spot", "on-demand": "on-demand", "normal": "on-demand"}),
)


def capacity_type(labels: Mapping[str, str]) -> str:
    """'spot', 'on-demand' or 'unknown' from the labels EKS, Karpenter and kops-style groups set."""
    for label, values in CAPACITY_LABELS:
        if label in labels:
            return values.get(labels[label], "unknown")
    return "unknown"


_REQUIREMENT = re.compile(r"^\s*(!?)([A-Za-z0-9._/-]+)\s*(?:(==|=|!=)\s*([A-Za-z0-9._-]*))?\s*$")


def parse_selector(text: str) -> list[tuple[str, str, str]]:
    """'a=b,c!=d,e,!f' -> [(key, op, value)] with op one of = != exists !exists (set-based forms not taken)."""
    out = []
    for part in text.split(","):
        if not part.strip():
            continue
        m = _REQUIREMENT.match(part)
        if m is None:
            raise ValueError(f"{part.strip()!r} is not a label requirement (use key=value, key!=value, key, !key)")
        neg, key, op, value = m.groups()
        if neg and op:
            raise ValueError(f"{part.strip()!r} is not a label requirement")
        out.append((key, "!exists" if neg else "exists" if not op else "!=" if op == "!=" else "=", value or ""))
    return out


def selector_matches(requirements: Iterable[tuple[str, str, str]], labels: Mapping[str, str]) -> bool:
    for key, op, value in requirements:
        if (
            (op == "=" and labels.get(key) != value)
            or (op == "!=" and labels.get(key) == value)
            or (op == "exists" and key not in labels)
            or (op == "!exists" and key in labels)
        ):
            return False
    return True


def choose_nodes(
    nodes: Sequence[Node],
    *,
    names: Sequence[str] = (),
    selector: str | None = None,
    count: int | None = None,
    any_capacity_type: bool = False,
    rng: random.Random | None = None,
) -> list[Target]:
    """The nodes to rehearse on: the named ones, or `count` Spot nodes matching the selector at random.
    Raises RehearsalRefused naming the node and its capacity type, or the shortfall."""
    by_name = {n.metadata.name: n for n in nodes if n.metadata and n.metadata.name}

    def target(node: Node) -> Target:
        labels = dict(node.metadata.labels or {}) if node.metadata else {}
        return Target(
            node.metadata.name if node.metadata and node.metadata.name else "",
            capacity_type(labels),
            (node.spec.providerID or "") if node.spec else "",
            labels.get("topology.kubernetes.io/zone", ""),
        )

    def busy(node: Node) -> bool:
        annotations = (node.metadata.annotations or {}) if node.metadata else {}
        return SIMULATION_ANNOTATION in annotations or NOTICE_ANNOTATION in annotations

    if names:
        missing = [n for n in names if n not in by_name]
        if missing:
            raise RehearsalRefused(f"no such node: {', '.join(missing)}")
        chosen = [target(by_name[n]) for n in dict.fromkeys(names)]
        refused = [t for t in chosen if t.capacity_type != "spot"]
        if refused and not any_capacity_type:
            listed = ", ".join(f"{t.name} ({t.capacity_type})" for t in refused)
            raise RehearsalRefused(
                f"refusing nodes that are not Spot: {listed}; pass --any-capacity-type to rehearse anyway"
            )
        under = [n for n in names if busy(by_name[n])]
        if under:
            raise RehearsalRefused(f"already under a notice: {', '.join(under)}")
        return chosen
    requirements = parse_selector(selector or "")
    matching = [
        n for n in by_name.values() if selector_matches(requirements, (n.metadata.labels if n.metadata else None) or {})
    ]
    candidates = [target(n) for n in matching if not busy(n)]
    eligible = [t for t in candidates if any_capacity_type or t.capacity_type == "spot"]
    wanted = count or 1
    if len(eligible) < wanted:
        what = "nodes" if any_capacity_type else "Spot nodes"
        raise RehearsalRefused(
            f"--count {wanted}: only {len(eligible)} {what} match {selector or 'any labels'!r}"
            " and are not under a notice"
            + ("" if any_capacity_type else f" ({len(candidates) - len(eligible)} others are not Spot)")
        )
    chosen = (rng or random.Random()).sample(sorted(eligible, key=lambda t: t.name), wanted)
    return sorted(chosen, key=lambda t: t.name)


def rehearsal_request_data(nodes: Sequence[str], kind: NoticeKind, deadline: datetime) -> dict[str, str]:
    """The data of a rehearsal request ConfigMap, as the agents read it (spotd.notices.record)."""
    return {"nodes": "\n".join(nodes), "kind": str(kind), "deadline": format_time(deadline)}


def workload_of(pod: Pod, rs_parent: Mapping[tuple[str, str], str]) -> WorkloadRef | None:
    """The Deployment, StatefulSet or (standalone) ReplicaSet a pod belongs to."""
    meta = pod.metadata
    if meta is None:
        return None
    ns = meta.namespace or ""
    for ref in meta.ownerReferences or []:
        if not ref.controller:
            continue
        if ref.kind == "ReplicaSet":
            parent = rs_parent.get((ns, ref.name))
            return WorkloadRef("Deployment", ns, parent) if parent else WorkloadRef("ReplicaSet", ns, ref.name)
        if ref.kind == "StatefulSet":
            return WorkloadRef("StatefulSet", ns, ref.name)
    return None


def pod_ready(pod: Pod) -> bool:
    if pod.metadata is None or pod.metadata.deletionTimestamp:
        return False
    conditions = (pod.status.conditions or []) if pod.status else []
    return any(c.type == "Ready" and c.status == "True" for c in conditions)


def pod_pending(pod: Pod) -> bool:
    return bool(pod.status and pod.status.phase == "Pending" and not (pod.metadata and pod.metadata.deletionTimestamp))


def evictable(pod: Pod) -> bool:
    return decide_drain(pod_facts(pod), PodPolicy()).verdict == PodVerdict.EVICT


def pod_ref(pod: Pod) -> str:
    return f"{pod.metadata.namespace}/{pod.metadata.name}" if pod.metadata else ""
