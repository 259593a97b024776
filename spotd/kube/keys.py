"""Label, annotation and taint keys: Kubernetes', cluster-autoscaler's, Karpenter's and spotd's own.

Defined once here so that every program spells a key the same way, with the few pure readers of the
well-known node labels.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

# spotd's own, on Nodes
INTERRUPTION_TAINT_KEY = "spotd.io/interruption"
NOTICE_ANNOTATION = "spotd.io/notice"  # the agent: the notice it acts on (restart recovery)
STATE_ANNOTATION = "spotd.io/state"  # the agent: what it changed, so a release undoes only that
# the controller: the episodes the queue saw first, JSON {kind: {"seen_at", "deadline", ...}} (issue 19)
QUEUE_NOTICE_ANNOTATION = "spotd.io/queue-notice"
# the controller: a queue rehearsal it drains the node for, JSON {"id", "kind", "deadline", "started",
# "prior_cordon"}, written before the node is touched so that a new leader releases it at the deadline
QUEUE_REHEARSAL_ANNOTATION = "spotd.io/queue-rehearsal"
SIMULATION_ANNOTATION = "spotd.io/simulate-reclaim"  # no longer acted on: the agent warns when it sees one
REHEARSAL_LABEL = "spotd.io/rehearsal"  # on a ConfigMap in spotd's own namespace: a rehearsal request
DRAIN_ANNOTATION = "spotd.io/drain"  # "false": the controller never drains this node
DRAINING_ANNOTATION = "spotd.io/draining"  # the controller: a drain of ours is in flight (restart recovery)
DRAINED_ANNOTATION = "spotd.io/drained"  # the controller: drained, left to the autoscaler
# the controller: a drain that ended in timeout/blocked/failed, JSON {"after", "attempts", "started",
# "outcome"}: not tried again before "after" (survives restarts and hand-overs)
DRAIN_RETRY_ANNOTATION = "spotd.io/drain-retry-after"
OUT_OF_SERVICE_TAINT_KEY = "node.kubernetes.io/out-of-service"  # Kubernetes' non-graceful node shutdown
OUT_OF_SERVICE_TAINT_VALUE = "nodeshutdown"
# spotd's own, on the controller's placeholder pods (make-before-break, docs/controller.md)
PLACEHOLDER_FOR_LABEL = "spotd.io/placeholder-for"  # the fallback node surged for (a hash when too long)
PLACEHOLDER_NODE_ANNOTATION = "spotd.io/placeholder-for"  # that node's full name
PLACEHOLDER_POD_ANNOTATION = "spotd.io/placeholder-of"  # namespace/name of the pod whose room it holds

# Kubernetes and its autoscalers
EXCLUDE_LB_LABEL = "node.kubernetes.io/exclude-from-external-load-balancers"
SAFE_TO_EVICT_ANNOTATION = "cluster-autoscaler.kubernetes.io/safe-to-evict"
MIRROR_ANNOTATION = "kubernetes.io/config.mirror"
DO_NOT_DISRUPT_ANNOTATION = "karpenter.sh/do-not-disrupt"  # "true" on a pod or node: no voluntary disruption
# Labels Karpenter puts on the nodes it manages (it consolidates them itself)
KARPENTER_NODE_LABELS = ("karpenter.sh/nodepool", "karpenter.sh/provisioner-name")

# The labels clusters put on nodes to say how they were bought, most specific first.
CAPACITY_TYPE_LABELS = (
    "eks.amazonaws.com/capacityType",
    "karpenter.sh/capacity-type",
    "node.kubernetes.io/lifecycle",
)
INSTANCE_TYPE_LABELS = ("node.kubernetes.io/instance-type", "beta.kubernetes.io/instance-type")
ZONE_LABELS = ("topology.kubernetes.io/zone", "failure-domain.beta.kubernetes.io/zone")


SPOT = "spot"


ON_DEMAND = "on-demand"


_SPOT_VALUES = frozenset({"spot", "ec2spot", "preemptible"})


_ON_DEMAND_VALUES = frozenset({"ondemand", "normal", "regular", "od", "reserved"})


def normalize_capacity_type(value: str | None) -> str | None:
    """'SPOT', 'spot', 'Ec2Spot' -> 'spot'; 'ON_DEMAND', 'on-demand', 'normal' -> 'on-demand'; else None."""
    if not value:
        return None
    key = value.strip().lower().replace("-", "").replace("_", "")
    if key in _SPOT_VALUES:
        return SPOT
    if key in _ON_DEMAND_VALUES:
        return ON_DEMAND
    return None


def capacity_type_from_labels(labels: Mapping[str, str], extra_label: str | None = None) -> str | None:
    """The node's capacity type from its labels ('spot' | 'on-demand'), or None when no label says.

    extra_label (from --capacity-type-label) is read first: a cluster-specific label is the most deliberate.
    """
    keys = ((extra_label,) if extra_label else ()) + CAPACITY_TYPE_LABELS
    for key in keys:
        found = normalize_capacity_type(labels.get(key))
        if found is not None:
            return found
    return None


def first_label(labels: Mapping[str, str], keys: Iterable[str]) -> str:
    for key in keys:
        value = labels.get(key)
        if value:
            return value
    return ""
