"""Which node groups could replace a node, pure: a group fits when every pod a drain would move could run on
a node the group would launch (its template labels and taints, for one of its instance types and zones).

A pool is then "the Spot groups that fit the node's pods", not the on-demand node's exact instance type.
For an ASG, cluster-autoscaler builds a node template from the group's tags
(`k8s.io/cluster-autoscaler/node-template/label/<key>` = value, `.../taint/<key>` = "value:Effect") and its
instance types and zones; node_group_from_asg reads the same.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from spotd.kube.keys import CAPACITY_TYPE_LABELS, INSTANCE_TYPE_LABELS, SPOT, ZONE_LABELS

Obj = dict[str, Any]

LABEL_TAG_PREFIX = "k8s.io/cluster-autoscaler/node-template/label/"
TAINT_TAG_PREFIX = "k8s.io/cluster-autoscaler/node-template/taint/"
_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")


def requirement_holds(req: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """One node selector requirement (In, NotIn, Exists, DoesNotExist, Gt, Lt) against a label set."""
    key, op, values = req.get("key", ""), req.get("operator"), req.get("values") or []
    if op == "In":
        return key in labels and labels[key] in values
    if op == "NotIn":
        return key not in labels or labels[key] not in values
    if op == "Exists":
        return key in labels
    if op == "DoesNotExist":
        return key not in labels
    if op in ("Gt", "Lt") and key in labels and values:
        try:
            have, want = int(labels[key]), int(values[0])
        except ValueError:
            return False
        return have > want if op == "Gt" else have < want
    return False


def node_selection_matches(spec: Mapping[str, Any], labels: Mapping[str, str], name: str = "") -> bool:
    """A pod spec's nodeSelector and required node affinity (terms ORed, expressions ANDed) against a node's
    labels (and name, for matchFields metadata.name)."""
    if any(labels.get(k) != v for k, v in (spec.get("nodeSelector") or {}).items()):
        return False
    required = ((spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution"
    ) or {}
    terms = required.get("nodeSelectorTerms")
    if not terms:
        return True
    fields = {"metadata.name": name}
    return any(
        bool(term.get("matchExpressions") or term.get("matchFields"))
        and all(requirement_holds(r, labels) for r in term.get("matchExpressions") or [])
        and all(requirement_holds(r, fields) for r in term.get("matchFields") or [])
        for term in terms
    )


def tolerates(tolerations: Iterable[Mapping[str, Any]], taint: Mapping[str, Any]) -> bool:
    """Whether one of the tolerations tolerates the taint (Kubernetes' ToleratesTaint)."""
    for t in tolerations:
        if t.get("effect") and t.get("effect") != taint.get("effect"):
            continue
        if t.get("operator") == "Exists" and not t.get("key"):
            return True
        if t.get("key") != taint.get("key"):
            continue
        if t.get("operator") == "Exists" or t.get("value", "") == taint.get("value", ""):
            return True
    return False


@dataclass(frozen=True)
class NodeGroup:
    """What a node group would launch: its template labels and taints, its instance types and zones."""

    name: str
    capacity_type: str | None  # spot | on-demand | None when unknown
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: tuple[Mapping[str, str], ...] = ()
    instance_types: tuple[str, ...] = ()
    zones: tuple[str, ...] = ()

    def templates(self, capacity_label: str | None = None, capacity_value: str | None = None) -> list[dict[str, str]]:
        """The label sets of the nodes it may launch: one per instance type x zone, with the well-known labels.
        capacity_label/value: the cluster's capacity-type label as the group's nodes carry it."""
        out = []
        for itype in self.instance_types or ("",):
            for zone in self.zones or ("",):
                labels = dict(self.labels)
                if itype:
                    labels.update({key: itype for key in INSTANCE_TYPE_LABELS})
                if zone:
                    labels.update({key: zone for key in ZONE_LABELS})
                if capacity_label and capacity_value:
                    labels.setdefault(capacity_label, capacity_value)
                out.append(labels)
        return out


def node_group_from_asg(
    name: str,
    tags: Mapping[str, str],
    instance_types: Sequence[str],
    zones: Sequence[str],
    capacity_type: str | None,
) -> NodeGroup:
    """A node group from an ASG's tags (cluster-autoscaler's node-template tags), instance types and zones."""
    labels = {k[len(LABEL_TAG_PREFIX) :]: v for k, v in tags.items() if k.startswith(LABEL_TAG_PREFIX)}
    taints = []
    for key, raw in tags.items():
        if not key.startswith(TAINT_TAG_PREFIX):
            continue
        value, _, effect = raw.rpartition(":")
        if effect not in _EFFECTS:  # "value" alone: cluster-autoscaler's default effect
            value, effect = raw, "NoSchedule"
        taints.append({"key": key[len(TAINT_TAG_PREFIX) :], "value": value, "effect": effect})
    return NodeGroup(name, capacity_type, labels, tuple(taints), tuple(instance_types), tuple(zones))


def group_fits(group: NodeGroup, pods: Sequence[Obj], capacity_label: str, capacity_value: str) -> bool:
    """Every pod could run on one of the group's templates: its node selection matches the labels and it
    tolerates the NoSchedule/NoExecute taints. (Resources are not compared: a group fits one pod at a time.)"""
    templates = group.templates(capacity_label, capacity_value)
    hard = [t for t in group.taints if t.get("effect") in ("NoSchedule", "NoExecute")]
    for pod in pods:
        spec = pod.get("spec") or {}
        tolerations = spec.get("tolerations") or []
        if not all(tolerates(tolerations, taint) for taint in hard):
            return False
        if not any(node_selection_matches(spec, labels) for labels in templates):
            return False
    return True


def spot_groups_for(
    pods: Sequence[Obj],
    groups: Iterable[NodeGroup],
    capacity_label: str = CAPACITY_TYPE_LABELS[0],
    spot_value: str = "SPOT",
) -> list[str]:
    """The Spot groups that could take all of a node's pods (placeholders.pods_to_surge): the pool that
    would replace the node. Empty: no Spot group fits, a surge cannot succeed, the node stays on-demand."""
    spot = [g for g in groups if g.capacity_type == SPOT]
    return sorted(g.name for g in spot if group_fits(g, pods, capacity_label, spot_value))
