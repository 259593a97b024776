"""The one place that builds Node, Pod and PodDisruptionBudget objects for the fakes: the embedded cluster, the
cluster-autoscaler model, the tests and the benches all call these, so a field a real object has is added once.
"""

from __future__ import annotations

import hashlib
from typing import Any

Obj = dict[str, Any]

SPOT, ON_DEMAND = "spot", "on-demand"
EKS_CAPACITY_LABEL = "eks.amazonaws.com/capacityType"
KARPENTER_CAPACITY_LABEL = "karpenter.sh/capacity-type"
# How each label spells the two capacity types.
_CAPACITY_VALUES = {
    EKS_CAPACITY_LABEL: {SPOT: "SPOT", ON_DEMAND: "ON_DEMAND"},
    KARPENTER_CAPACITY_LABEL: {SPOT: "spot", ON_DEMAND: "on-demand"},
}


def instance_id_for(name: str) -> str:
    """A stable EC2-shaped instance id for a node name (the same in every process, unlike hash())."""
    return "i-0" + hashlib.sha256(name.encode()).hexdigest()[:16]


def node(
    name: str,
    capacity: str = SPOT,
    *,
    capacity_label: str = EKS_CAPACITY_LABEL,
    instance_type: str = "m5.large",
    zone: str = "us-east-1a",
    labels: dict[str, str] | None = None,
    instance_id: str | None = None,
    boot_id: str = "boot-1",
    allocatable: dict[str, str] | None = None,
    capacity_resources: dict[str, str] | None = None,
    taints: list[Obj] | None = None,
    ready: bool = True,
) -> Obj:
    """A Node as a kubelet on EC2 registers it: well-known labels, an aws:// providerID, nodeInfo, allocatable."""
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "node.kubernetes.io/instance-type": instance_type,
                "topology.kubernetes.io/zone": zone,
                "topology.kubernetes.io/region": zone[:-1],
                capacity_label: _CAPACITY_VALUES.get(capacity_label, {}).get(capacity, capacity),
                **(labels or {}),
            },
        },
        "spec": {
            "providerID": f"aws:///{zone}/{instance_id or instance_id_for(name)}",
            **({"taints": [dict(t) for t in taints]} if taints else {}),
        },
        "status": {
            "conditions": [{"type": "Ready", "status": "True" if ready else "False", "reason": "KubeletReady"}],
            "allocatable": allocatable or {"cpu": "2", "memory": "8Gi", "pods": "110"},
            "capacity": capacity_resources or allocatable or {"cpu": "2", "memory": "8Gi", "pods": "110"},
            "nodeInfo": {
                "bootID": boot_id,
                "architecture": "amd64",
                "containerRuntimeVersion": "containerd://1.7.11",
                "kernelVersion": "6.1.0",
                "kubeProxyVersion": "v1.30.0",
                "kubeletVersion": "v1.30.0",
                "machineID": "ec2" + boot_id,
                "operatingSystem": "linux",
                "osImage": "Amazon Linux 2023",
                "systemUUID": "ec2" + boot_id,
            },
        },
    }


def pod(
    name: str,
    node_name: str | None,
    *,
    namespace: str = "default",
    owner: str | None = "ReplicaSet",
    owner_name: str | None = None,
    phase: str = "Running",
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    grace: int = 30,
    empty_dir: bool = False,
    requests: dict[str, str] | None = None,
) -> Obj:
    """A Pod bound to node_name (None: Pending), owned by a controller of kind `owner` (None: a bare pod)."""
    meta: Obj = {"name": name, "namespace": namespace, "labels": labels or {"app": "web"}}
    if annotations:
        meta["annotations"] = annotations
    if owner:
        owned_by = owner_name or f"{owner.lower()}-1"
        meta["ownerReferences"] = [
            {
                "apiVersion": "apps/v1",
                "kind": owner,
                "name": owned_by,
                "uid": f"uid-{owner}-{owned_by}",
                "controller": True,
            }
        ]
    container: Obj = {"name": "c", "image": "registry.k8s.io/pause:3.10"}
    if requests:
        container["resources"] = {"requests": dict(requests)}
    spec: Obj = {"terminationGracePeriodSeconds": grace, "containers": [container]}
    if node_name:
        spec["nodeName"] = node_name
    if empty_dir:
        spec["volumes"] = [{"name": "scratch", "emptyDir": {}}]
    ready = "True" if phase == "Running" and node_name else "False"
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": spec,
        "status": {"phase": phase, "conditions": [{"type": "Ready", "status": ready}]},
    }


def pdb(name: str, *, min_available: int | str, app: str = "web", namespace: str = "default") -> Obj:
    """A PodDisruptionBudget over the pods labelled app=<app>."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"minAvailable": min_available, "selector": {"matchLabels": {"app": app}}},
    }
