"""Make-before-break, pure: the placeholder pods that warm Spot capacity for a fallback node's pods, and
whether a surge of them is ready, still waiting or failed.

A placeholder is a pause container with a pod's effective requests and node constraints, plus a required
node affinity to Spot. Resources that cannot be overcommitted (GPUs and other extended resources, hugepages)
also get a limit equal to the request: the API server refuses a request for one without it. Nothing here does
I/O: surge.py creates, follows and deletes them.

What a placeholder copies, and why (docs/controller.md, "Make-before-break"):
- nodeSelector, required node affinity, tolerations, schedulerName: they describe which nodes the pod
  may use, and mean the same on a placeholder.
- the zones of the zonal volumes it mounts (taken from the PVs, looked up by the caller).
- required pod affinity and anti-affinity, with their namespaces pinned to the pod's own namespace: they
  then count the workload's real pods as they did for the pod. The placeholders do not carry the
  workload's labels (they would count in its selectors), so two placeholders of replicas that repel each
  other may warm the same node: the landing check after the drain catches that case.
- not topologySpreadConstraints: they count pods in the placeholder's own namespace only (the field has
  no namespaces), where no pod matches, so a copy would constrain nothing; the landing check covers it.
- not the preferred terms: scores, not feasibility; a surge asks only whether room exists.
"""

from __future__ import annotations

import copy
import hashlib
from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Any

from spotd.common.quantity import format_quantity, parse_quantity
from spotd.drain.plan import PodFacts, PodPolicy, PodVerdict, decide_pod
from spotd.kube.keys import (
    MIRROR_ANNOTATION,
    PLACEHOLDER_FOR_LABEL,
    PLACEHOLDER_NODE_ANNOTATION,
    PLACEHOLDER_POD_ANNOTATION,
    SAFE_TO_EVICT_ANNOTATION,
    SPOT,
    ZONE_LABELS,
)

Obj = dict[str, Any]

PAUSE_IMAGE = "registry.k8s.io/pause:3.10"
PLACEHOLDER_PRIORITY_CLASS = "spotd-placeholder"
# pause exits at SIGTERM at once: 1 s costs nothing, and a pod deleted with grace 0 would leave the API
# before its kubelet released the room (the "never grace 0" rule needs no exception for our own pods)
PLACEHOLDER_GRACE_SECONDS = 1
# the uid and gid the pause image runs as (its Dockerfile: USER 65535:65535)
PAUSE_USER = 65535
# The value each capacity-type label gives Spot nodes (kube.keys.CAPACITY_TYPE_LABELS), for the placeholders'
# required affinity: the placeholders ask for the cluster's own spelling, as its node templates carry it.
SPOT_LABEL_VALUES: dict[str, tuple[str, ...]] = {
    "eks.amazonaws.com/capacityType": ("SPOT",),
    "karpenter.sh/capacity-type": ("spot",),
    "node.kubernetes.io/lifecycle": ("spot", "Ec2Spot"),
}
# container states from which a placeholder cannot start by itself: the surge fails at once
_STUCK_REASONS = frozenset(
    {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError", "CreateContainerError"}
)


# ---- which pods, and what they request -----------------------------------------------------------------


def pod_facts_of(pod: Obj) -> PodFacts:
    """The drain plan's facts about a pod, from its raw JSON (the executor reads lightkube models)."""
    meta, spec, status = pod.get("metadata") or {}, pod.get("spec") or {}, pod.get("status") or {}
    annotations = meta.get("annotations") or {}
    grace = spec.get("terminationGracePeriodSeconds")
    return PodFacts(
        namespace=meta.get("namespace", ""),
        name=meta.get("name", ""),
        phase=status.get("phase") or "Pending",
        owner_kinds=tuple(o.get("kind", "") for o in meta.get("ownerReferences") or [] if o.get("controller")),
        mirror=MIRROR_ANNOTATION in annotations,
        terminating=bool(meta.get("deletionTimestamp")),
        local_storage=any("emptyDir" in v for v in spec.get("volumes") or []),
        safe_to_evict=annotations.get(SAFE_TO_EVICT_ANNOTATION),
        priority=int(spec.get("priority") or 0),
        grace_seconds=30 if grace is None else int(grace),
    )


def pods_to_surge(pods: Sequence[Obj], policy: PodPolicy | None = None) -> list[Obj]:
    """The pods a drain would evict (drain.plan semantics): not DaemonSet, mirror, finished or terminating."""
    policy = policy or PodPolicy(voluntary=True)
    return [p for p in pods if decide_pod(pod_facts_of(p), policy).verdict == PodVerdict.EVICT]


def _requests(container: Obj) -> dict[str, Decimal]:
    """A container's requests as the API server stored them: a resource with a limit and no request gets the
    limit as its request (SetDefaults_Pod), so a manifest written with limits only reserves them."""
    resources = container.get("resources") or {}
    raw = {**(resources.get("limits") or {}), **(resources.get("requests") or {})}
    return {name: parse_quantity(value) for name, value in raw.items()}


def overcommit_allowed(resource: str) -> bool:
    """Whether a request may stay below its limit (the API server's IsOvercommitAllowed): cpu, memory and the
    other kubernetes.io resources may; extended resources (nvidia.com/gpu, vpc.amazonaws.com/efa: a domain
    outside kubernetes.io) and hugepages-* may not, and a request for one without an equal limit is a 422."""
    native = "/" not in resource or "kubernetes.io/" in resource
    return native and not resource.startswith("hugepages-")


def placeholder_resources(pod: Obj) -> Obj:
    """A placeholder container's resources: the pod's effective requests, and for every resource that cannot
    be overcommitted a limit equal to its request (without it the API server refuses the placeholder)."""
    requests = effective_requests(pod)
    resources: Obj = {"requests": requests}
    limits = {name: value for name, value in requests.items() if not overcommit_allowed(name)}
    if limits:
        resources["limits"] = limits
    return resources


def _add(into: dict[str, Decimal], more: Mapping[str, Decimal]) -> None:
    for name, value in more.items():
        into[name] = into.get(name, Decimal(0)) + value


def effective_requests(pod: Obj) -> dict[str, str]:
    """What the scheduler reserves for a pod: per resource, the larger of the regular containers' sum (plus
    the sidecars, init containers with restartPolicy Always) and each init container's own request (plus
    the sidecars started before it); then the pod overhead. A container's requests are as the API server
    defaults them (a limit without a request counts as the request). Quantities as requests are written."""
    spec = pod.get("spec") or {}
    total: dict[str, Decimal] = {}
    for container in spec.get("containers") or []:
        _add(total, _requests(container))
    sidecars: dict[str, Decimal] = {}
    peak: dict[str, Decimal] = {}
    for init in spec.get("initContainers") or []:
        needs = _requests(init)
        if init.get("restartPolicy") == "Always":
            _add(sidecars, needs)
            needs = dict(sidecars)
        else:
            _add(needs, sidecars)
        for name, value in needs.items():
            peak[name] = max(peak.get(name, Decimal(0)), value)
    _add(total, sidecars)
    for name, value in peak.items():
        total[name] = max(total.get(name, Decimal(0)), value)
    _add(total, {name: parse_quantity(v) for name, v in (spec.get("overhead") or {}).items()})
    return {name: format_quantity(value, name) for name, value in sorted(total.items()) if value > 0}


# ---- the placeholder manifests ---------------------------------------------------------------------------


def node_label_value(node_name: str) -> str:
    """The value of spotd.io/placeholder-for: the node's name, or a hash of it when it is no valid label value
    (node names may be 253 characters, label values 63)."""
    if len(node_name) <= 63 and node_name[:1].isalnum() and node_name[-1:].isalnum():
        return node_name
    return "sha1-" + hashlib.sha1(node_name.encode()).hexdigest()[:40]


def _requirement(key: str, values: Sequence[str]) -> Obj:
    return {"key": key, "operator": "In", "values": list(values)}


def _node_affinity(spec: Obj, extra: list[Obj]) -> Obj:
    """The pod's required node affinity with `extra` ANDed in: terms are ORed, so each term gets them all."""
    required = ((spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution"
    ) or {}
    terms = copy.deepcopy(required.get("nodeSelectorTerms") or []) or [{}]
    for term in terms:
        term["matchExpressions"] = [*(term.get("matchExpressions") or []), *copy.deepcopy(extra)]
    return {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}}


def _pod_terms(spec: Obj, kind: str, namespace: str) -> list[Obj]:
    """Required pod (anti-)affinity terms, their namespaces pinned to the pod's when they named none (a term
    without namespaces means the pod's own namespace, which for a placeholder would be ours)."""
    terms = ((spec.get("affinity") or {}).get(kind) or {}).get("requiredDuringSchedulingIgnoredDuringExecution")
    out = []
    for term in copy.deepcopy(terms or []):
        if not term.get("namespaces") and term.get("namespaceSelector") is None:
            term["namespaces"] = [namespace]
        out.append(term)
    return out


def volume_zones(pod: Obj, zone_of_claim: Mapping[tuple[str, str], Collection[str]]) -> list[str] | None:
    """The zones the pod's zonal volumes allow (the intersection over its claims); None when none is zonal."""
    namespace = (pod.get("metadata") or {}).get("namespace", "")
    allowed: set[str] | None = None
    for volume in (pod.get("spec") or {}).get("volumes") or []:
        claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
        zones = zone_of_claim.get((namespace, claim)) if claim else None
        if zones:
            allowed = set(zones) if allowed is None else allowed & set(zones)
    return None if allowed is None else sorted(allowed)


def placeholder_pods(
    node_name: str,
    pods: Sequence[Obj],
    *,
    namespace: str,
    capacity_label: str,
    spot_values: Sequence[str],
    priority_class: str = PLACEHOLDER_PRIORITY_CLASS,
    zone_of_claim: Mapping[tuple[str, str], Collection[str]] | None = None,
    zone_label: str = ZONE_LABELS[0],
    image: str = PAUSE_IMAGE,
    policy: PodPolicy | None = None,
) -> list[Obj]:
    """One placeholder Pod manifest per pod a drain of `node_name` would evict, in the order of `pods`.

    capacity_label / spot_values: the cluster's capacity-type label and the value(s) it gives Spot nodes
    (e.g. eks.amazonaws.com/capacityType=SPOT). zone_of_claim: (namespace, claimName) -> the zones of the
    bound PV's node affinity (the caller reads the PVCs and PVs). The manifests use generateName: every
    surge creates new pods, so a leftover of an earlier surge never collides with them."""
    values = [spot_values] if isinstance(spot_values, str) else list(spot_values)
    out = []
    for pod in pods_to_surge(pods, policy):
        meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
        pod_namespace = meta.get("namespace", "")
        extra = [_requirement(capacity_label, values)]
        zones = volume_zones(pod, zone_of_claim or {})
        if zones is not None:
            extra.append(_requirement(zone_label, zones))
        affinity: Obj = {"nodeAffinity": _node_affinity(spec, extra)}
        for kind in ("podAffinity", "podAntiAffinity"):
            terms = _pod_terms(spec, kind, pod_namespace)
            if terms:
                affinity[kind] = {"requiredDuringSchedulingIgnoredDuringExecution": terms}
        placeholder_spec: Obj = {
            "priorityClassName": priority_class,
            "terminationGracePeriodSeconds": PLACEHOLDER_GRACE_SECONDS,
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "restartPolicy": "Always",
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": PAUSE_USER,
                "runAsGroup": PAUSE_USER,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [
                {
                    "name": "pause",
                    "image": image,
                    "imagePullPolicy": "IfNotPresent",
                    "resources": placeholder_resources(pod),
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "readOnlyRootFilesystem": True,
                        "capabilities": {"drop": ["ALL"]},
                    },
                }
            ],
            "affinity": affinity,
        }
        for key in ("nodeSelector", "tolerations", "schedulerName"):
            if spec.get(key):
                placeholder_spec[key] = copy.deepcopy(spec[key])
        out.append(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "generateName": "spotd-placeholder-",
                    "namespace": namespace,
                    "labels": {
                        PLACEHOLDER_FOR_LABEL: node_label_value(node_name),
                        "app.kubernetes.io/name": "spotd",
                        "app.kubernetes.io/component": "placeholder",
                    },
                    "annotations": {
                        PLACEHOLDER_NODE_ANNOTATION: node_name,
                        PLACEHOLDER_POD_ANNOTATION: f"{pod_namespace}/{meta.get('name', '')}",
                    },
                },
                "spec": placeholder_spec,
            }
        )
    return out


# ---- following a surge -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlaceholderState:
    """What a surge needs to know about one placeholder it created; gone: no longer in the API."""

    name: str
    phase: str = "Pending"
    node: str = ""
    node_capacity: str | None = None  # spot | on-demand | None when unknown
    unschedulable: str = ""  # the PodScheduled=False message, when the scheduler found no node
    stuck: str = ""  # a container state it cannot leave by itself (image pull errors)
    gone: bool = False
    terminating: bool = False


def placeholder_state(pod: Obj, node_capacity: Mapping[str, str | None]) -> PlaceholderState:
    """A placeholder's state from its raw JSON; node_capacity: node name -> capacity type."""
    meta, spec, status = pod.get("metadata") or {}, pod.get("spec") or {}, pod.get("status") or {}
    node = spec.get("nodeName") or ""
    unschedulable = ""
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            unschedulable = cond.get("message") or cond.get("reason") or "Unschedulable"
    stuck = ""
    for cs in status.get("containerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in _STUCK_REASONS:
            stuck = f"{waiting['reason']}: {waiting.get('message', '')}".strip(": ")
    return PlaceholderState(
        name=meta.get("name", ""),
        phase=status.get("phase") or "Pending",
        node=node,
        node_capacity=node_capacity.get(node) if node else None,
        unschedulable=unschedulable,
        stuck=stuck,
        terminating=bool(meta.get("deletionTimestamp")),
    )


class SurgeState(StrEnum):
    WAITING = "waiting"
    READY = "ready"
    FAILED = "failed"


@dataclass(frozen=True)
class SurgeVerdict:
    state: SurgeState
    reason: str


def surge_verdict(
    placeholders: Sequence[PlaceholderState], now: datetime, started: datetime, timeout: float
) -> SurgeVerdict:
    """Ready when every placeholder runs on a Spot node; failed when one is gone, terminating, finished, stuck
    on its image, running on a node that is not Spot, or when `timeout` seconds have passed; else waiting.

    Unschedulable is never final by itself: cluster-autoscaler may still add a node, and the timeout decides.
    """
    if not placeholders:
        return SurgeVerdict(SurgeState.FAILED, "no placeholder to follow")
    for ph in placeholders:
        if ph.gone or ph.terminating:
            return SurgeVerdict(SurgeState.FAILED, f"placeholder {ph.name} was deleted or preempted")
        if ph.phase in ("Succeeded", "Failed"):
            return SurgeVerdict(SurgeState.FAILED, f"placeholder {ph.name} ended ({ph.phase})")
        if ph.stuck:
            return SurgeVerdict(SurgeState.FAILED, f"placeholder {ph.name} cannot start: {ph.stuck}")
        if ph.phase == "Running" and ph.node_capacity is not None and ph.node_capacity != SPOT:
            return SurgeVerdict(
                SurgeState.FAILED, f"placeholder {ph.name} runs on {ph.node}, capacity type {ph.node_capacity}"
            )
    running = [ph for ph in placeholders if ph.phase == "Running" and ph.node_capacity == SPOT]
    if len(running) == len(placeholders):
        nodes = sorted({ph.node for ph in running})
        return SurgeVerdict(SurgeState.READY, f"{len(running)} placeholder(s) running on Spot node(s) {nodes}")
    if now - started >= timedelta(seconds=timeout):
        pending = [ph for ph in placeholders if ph not in running]
        why = next((ph.unschedulable for ph in pending if ph.unschedulable), "")
        detail = f" ({why})" if why else ""
        return SurgeVerdict(
            SurgeState.FAILED,
            f"{len(pending)} of {len(placeholders)} placeholder(s) not running on Spot after {timeout:g}s{detail}",
        )
    return SurgeVerdict(SurgeState.WAITING, f"{len(running)} of {len(placeholders)} placeholder(s) running on Spot")


def nodes_of(placeholders: Sequence[PlaceholderState]) -> dict[str, list[str]]:
    """Spot node -> the placeholders it runs: where the surge made room (for the report and the Event)."""
    out: dict[str, list[str]] = defaultdict(list)
    for ph in placeholders:
        if ph.node:
            out[ph.node].append(ph.name)
    return dict(out)


# the zone keys a PV's node affinity may use: the well-known label, its beta name, the EBS CSI driver's own
PV_ZONE_KEYS = (*ZONE_LABELS, "topology.ebs.csi.aws.com/zone")


def pv_zones(pv: Obj) -> list[str]:
    """The zones a PersistentVolume's required node affinity allows (In on a zone key, any term); [] when it
    names none (not zonal, or a node-local volume whose pods cannot move anyway)."""
    required = ((pv.get("spec") or {}).get("nodeAffinity") or {}).get("required") or {}
    zones: set[str] = set()
    for term in required.get("nodeSelectorTerms") or []:
        for req in term.get("matchExpressions") or []:
            if req.get("key") in PV_ZONE_KEYS and req.get("operator") == "In":
                zones.update(req.get("values") or [])
    return sorted(zones)
