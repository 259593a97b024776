"""The embedded cluster's workload controllers: ReplicaSet, Deployment, StatefulSet and DaemonSet behaviour."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import defaultdict
from typing import Any

from spotd.controller.node_groups import tolerates
from spotd.sim.kubeapi.server import FakeApiServer
from spotd.sim.scheduler import Obj, Scheduler, terminating

# the NoExecute tolerations the DaemonSet controller adds to its pods (AddOrUpdateDaemonPodTolerations): it
# starts none on a node with another NoExecute taint, which the taint manager would evict at once
DAEMON_POD_TOLERATIONS = [
    {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute"},
    {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute"},
]


def is_ready(pod: Obj) -> bool:
    if pod["metadata"].get("deletionTimestamp"):
        return False
    conditions = pod.get("status", {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def controller_of(obj: Obj) -> tuple[str, str] | None:
    for ref in obj["metadata"].get("ownerReferences") or []:
        if ref.get("controller"):
            return ref.get("kind", ""), ref.get("name", "")
    return None


def owner_ref(obj: Obj) -> Obj:
    meta = obj["metadata"]
    return {
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
    }


class Controllers:
    """Replacement pods, workload statuses and the scheduler, one reconcile pass after each burst of changes."""

    def __init__(self, api: FakeApiServer, rng: random.Random, time_scale: float) -> None:
        self.api = api
        self.rng = rng
        self.scheduler = Scheduler(api, time_scale)
        self.dirty = asyncio.Event()
        self.passes = 0

    @property
    def store(self) -> Any:
        return self.api.store

    def pod_name(self, prefix: str) -> str:
        return f"{prefix}-" + "".join(self.rng.choices("bcdfghjklmnpqrstvwxz2456789", k=5))

    def new_pod(self, owner: Obj, name: str, node: str | None = None) -> Obj:
        template = owner["spec"]["template"]
        pod: Obj = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": owner["metadata"]["namespace"],
                "labels": dict(template["metadata"].get("labels") or {}),
                "annotations": dict(template["metadata"].get("annotations") or {}),
                "ownerReferences": [owner_ref(owner)],
            },
            "spec": {**template["spec"]},
            "status": {"phase": "Pending"},
        }
        if node:
            pod["spec"]["nodeName"] = node
        return pod

    async def run(self) -> None:
        """Until cancelled: one reconcile pass after each burst of changes."""
        sub = self.api.subscribe()

        async def listen() -> None:
            async for _ in sub:
                self.dirty.set()

        listener = asyncio.get_running_loop().create_task(listen())
        try:
            while True:
                await self.dirty.wait()
                await asyncio.sleep(0.02)  # coalesce a burst of writes into one pass
                self.dirty.clear()
                self.reconcile()
        finally:
            sub.close()
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener

    def reconcile(self, initial: bool = False) -> None:
        self.passes += 1
        nodes = {n["metadata"]["name"]: n for n in self.store.iter_objects("Node")}
        by_owner: dict[tuple[str, str, str], list[Obj]] = defaultdict(list)
        for pod in list(self.store.iter_objects("Pod")):  # a gone node's pods: the API server's pod GC (podgc.py)
            ref = controller_of(pod)
            if ref:
                by_owner[(ref[0], pod["metadata"]["namespace"], ref[1])].append(pod)
        self._replica_sets(by_owner)
        self._stateful_sets(by_owner)
        self._daemon_sets(by_owner, nodes, initial)
        self.scheduler.schedule(nodes, initial)
        self._statuses()

    def _replica_sets(self, by_owner: dict[tuple[str, str, str], list[Obj]]) -> None:
        for rs in list(self.store.iter_objects("ReplicaSet")):
            meta = rs["metadata"]
            # terminating pods no longer count: their replacements start at once, as the real controller does
            active = [p for p in by_owner[("ReplicaSet", meta["namespace"], meta["name"])] if not terminating(p)]
            for _ in range(int(rs["spec"].get("replicas", 1)) - len(active)):
                self.api.create(self.new_pod(rs, self.pod_name(meta["name"])))

    def _stateful_sets(self, by_owner: dict[tuple[str, str, str], list[Obj]]) -> None:
        for sts in list(self.store.iter_objects("StatefulSet")):
            meta = sts["metadata"]
            present = {p["metadata"]["name"] for p in by_owner[("StatefulSet", meta["namespace"], meta["name"])]}
            for ordinal in range(int(sts["spec"].get("replicas", 1))):
                name = f"{meta['name']}-{ordinal}"
                if name not in present:  # a StatefulSet waits for the old pod to be gone entirely
                    self.api.create(self.new_pod(sts, name))

    def _daemon_sets(
        self, by_owner: dict[tuple[str, str, str], list[Obj]], nodes: dict[str, Obj], initial: bool
    ) -> None:
        for ds in list(self.store.iter_objects("DaemonSet")):
            meta = ds["metadata"]
            covered = {p["spec"].get("nodeName") for p in by_owner[("DaemonSet", meta["namespace"], meta["name"])]}
            tolerations = [*(ds["spec"]["template"]["spec"].get("tolerations") or []), *DAEMON_POD_TOLERATIONS]
            for node, obj in nodes.items():
                no_execute = [t for t in obj.get("spec", {}).get("taints") or [] if t.get("effect") == "NoExecute"]
                if node not in covered and all(tolerates(tolerations, t) for t in no_execute):
                    pod = self.new_pod(ds, self.pod_name(meta["name"]), node)
                    if initial:
                        pod["status"] = {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
                    created = self.api.create(pod)
                    if not initial:
                        self.scheduler.start_later(created)

    def _statuses(self) -> None:
        pods_of: dict[tuple[str, str, str], list[Obj]] = defaultdict(list)
        rs_parent: dict[tuple[str, str], str] = {}
        for rs in self.store.iter_objects("ReplicaSet"):
            ref = controller_of(rs)
            if ref and ref[0] == "Deployment":
                rs_parent[(rs["metadata"]["namespace"], rs["metadata"]["name"])] = ref[1]
        for pod in self.store.iter_objects("Pod"):
            ref = controller_of(pod)
            if not ref:
                continue
            ns = pod["metadata"]["namespace"]
            pods_of[(ref[0], ns, ref[1])].append(pod)
            if ref[0] == "ReplicaSet" and (ns, ref[1]) in rs_parent:
                pods_of[("Deployment", ns, rs_parent[(ns, ref[1])])].append(pod)
        for kind in ("ReplicaSet", "Deployment", "StatefulSet", "DaemonSet"):
            for obj in list(self.store.iter_objects(kind)):
                meta = obj["metadata"]
                pods = [p for p in pods_of[(kind, meta["namespace"], meta["name"])] if not terminating(p)]
                ready = sum(1 for p in pods if is_ready(p))
                if kind == "DaemonSet":
                    status: Obj = {
                        "currentNumberScheduled": sum(1 for p in pods if p["spec"].get("nodeName")),
                        "desiredNumberScheduled": self.store.count("Node"),
                        "numberReady": ready,
                        "numberAvailable": ready,
                        "observedGeneration": meta.get("generation", 1),
                    }
                else:
                    status = {
                        "replicas": len(pods),
                        "readyReplicas": ready,
                        "availableReplicas": ready,
                        "observedGeneration": meta.get("generation", 1),
                    }
                    if kind != "ReplicaSet":
                        status["updatedReplicas"] = len(pods)
                if obj.get("status") != status:
                    self.api.update({**obj, "status": status})
