"""What kube-controller-manager does to the pods of a node whose kubelet is gone, as far as the fake models
it: the taint-eviction controller (pkg/controller/tainteviction) and pod GC's gcTerminating and gcOrphaned
(pkg/controller/podgc/gc_controller.go).

- A pod bound to a node with NoExecute taints is deleted (its own grace) when it does not tolerate one of
  them, or once the shortest tolerationSeconds of the tolerations used has passed; the condition
  DisruptionTarget (reason DeletionByTaintManager) is written first. On a live node the kubelet then stops
  it; on a dead one it stays Terminating. Taints removed or tolerated forever: a pending eviction is dropped.
- A Terminating pod on a node that is not Ready and carries node.kubernetes.io/out-of-service (any effect)
  is marked Failed and force-deleted (grace 0): the non-graceful node shutdown recovery spotd's controller
  starts with that taint. Finalizers still hold it.
- The pods of a deleted Node are marked Failed, given DisruptionTarget (reason DeletionByPodGC) and
  force-deleted once it has stayed gone for the quarantine (40 s), scaled as pod termination is.
- The node lifecycle controller's doNoScheduleTaintingPass for a cordon: node.kubernetes.io/unschedulable
  (NoSchedule) is added to a Node whose spec.unschedulable is true and removed when it is not, in a write of
  its own, so a client's resourceVersion-conditional patch after a cordon conflicts as on a real cluster.

The controllers act as soon as a node or one of its pods changes (the real pod GC looks every 20 s);
tolerationSeconds and the quarantine are scaled by the server's termination_scale. Not modelled: the node
lifecycle controller's not-ready/unreachable taints (nor the 300 s tolerations admission adds for them),
pod GC of pods bound to a node name that never had a Node (tests bind pods to such names), of terminated pods
past the threshold, of unscheduled terminating pods, and the Events of both controllers.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from typing import Any

from . import errors
from .policy import DisruptionController, is_terminating, kubelet_alive, set_pod_condition
from .store import Change, Key, Obj, Store

OUT_OF_SERVICE_TAINT_KEY = "node.kubernetes.io/out-of-service"
ORPHAN_QUARANTINE_SECONDS = 40  # gc_controller.go quarantineTime: how long a node must stay gone
TAINT_MANAGER_CONDITION = {
    "type": "DisruptionTarget",
    "status": "True",
    "reason": "DeletionByTaintManager",
    "message": "Taint manager: deleting due to NoExecute taint",
}
ORPHAN_CONDITION = {
    "type": "DisruptionTarget",
    "status": "True",
    "reason": "DeletionByPodGC",
    "message": "PodGC: node no longer exists",
}


def tolerates_taint(toleration: Obj, taint: Obj) -> bool:
    """core/v1 Toleration.ToleratesTaint: effect (empty: any), key (empty: any), then Equal or Exists."""
    if toleration.get("effect") and toleration["effect"] != taint.get("effect"):
        return False
    if toleration.get("key") and toleration["key"] != taint.get("key"):
        return False
    operator = toleration.get("operator") or "Equal"
    if operator == "Exists":
        return True
    return operator == "Equal" and (toleration.get("value") or "") == (taint.get("value") or "")


def eviction_delay(tolerations: Iterable[Obj], taints: list[Obj]) -> float | None:
    """How long the taint manager lets a pod stay on a node with these NoExecute taints: 0 when one is not
    tolerated, the shortest tolerationSeconds of the tolerations used (GetMatchingTolerations,
    getMinTolerationTime; 0 or less: at once), None when they are all tolerated forever."""
    tolerations = list(tolerations)
    used = []
    for taint in taints:
        match = next((t for t in tolerations if tolerates_taint(t, taint)), None)
        if match is None:
            return 0.0
        used.append(match)
    seconds = [int(t["tolerationSeconds"]) for t in used if t.get("tolerationSeconds") is not None]
    if not seconds:
        return None
    return float(max(0, min(seconds)))


UNSCHEDULABLE_TAINT = {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}


class NodeLifecycle:
    """Watches the store (a hook) and acts on the nodes whose state or pods changed, on the next loop turn."""

    def __init__(self, store: Store, disruption: DisruptionController) -> None:
        self.store = store
        self.disruption = disruption
        self._dirty: set[str] = set()
        self._scheduled = False
        self._evictions: dict[Key, tuple[float, str, asyncio.TimerHandle]] = {}  # (deadline, uid, timer)
        self._orphans: dict[str, asyncio.TimerHandle] = {}  # deleted nodes in quarantine
        store.hooks.append(self._on_change)

    def _on_change(self, ch: Change) -> None:
        if ch.kind == "Node":
            name = ch.obj["metadata"]["name"]
            if ch.type == "DELETED":
                self._quarantine(name)
            self._dirty.add(name)
        elif ch.kind == "Pod" and ch.type != "DELETED":
            node = (ch.obj.get("spec") or {}).get("nodeName")
            if node:
                self._dirty.add(node)
        elif ch.kind == "Pod":
            self._cancel_eviction((ch.namespace, ch.obj["metadata"]["name"]))
            return
        else:
            return
        if self._scheduled:
            return
        with contextlib.suppress(RuntimeError):  # no loop (the test's own hand): at the next change with one
            asyncio.get_running_loop().call_soon(self.run)
            self._scheduled = True

    def run(self) -> None:
        """One pass over the nodes that changed."""
        self._scheduled = False
        dirty, self._dirty = self._dirty, set()
        for name in sorted(dirty):
            node = self.store.get("Node", "", name)
            if node is not None:
                node = self._taint_unschedulable(node)
                self._evict_for_taints(node)
                self._collect_terminating(node)

    def cancel_all(self) -> None:
        for _, _, handle in self._evictions.values():
            handle.cancel()
        self._evictions.clear()
        for handle in self._orphans.values():
            handle.cancel()
        self._orphans.clear()

    def _pods_on(self, node: str) -> list[Obj]:
        found = (self.store.get("Pod", *key) for key in self.store.pod_keys_on_node(node))
        return [p for p in found if p is not None]

    # ---- the node lifecycle controller's NoSchedule taint for a cordon ----------------------------------

    def _taint_unschedulable(self, node: Obj) -> Obj:
        """doNoScheduleTaintingPass for spec.unschedulable: node.kubernetes.io/unschedulable:NoSchedule follows
        a cordon and goes with an uncordon, in a write of its own (a new resourceVersion after the client's)."""
        spec = node.get("spec") or {}
        taints = spec.get("taints") or []
        tainted = any(t.get("key") == UNSCHEDULABLE_TAINT["key"] and t.get("effect") == "NoSchedule" for t in taints)
        if tainted == bool(spec.get("unschedulable")):
            return node
        if tainted:
            kept = [
                t
                for t in taints
                if not (t.get("key") == UNSCHEDULABLE_TAINT["key"] and t.get("effect") == "NoSchedule")
            ]
        else:
            kept = [*taints, dict(UNSCHEDULABLE_TAINT)]
        new_spec = {k: v for k, v in spec.items() if k != "taints"}
        if kept:
            new_spec["taints"] = kept
        try:
            return dict(self.store.update({**node, "spec": new_spec}, check_version=False))
        except errors.ApiError:  # gone meanwhile
            return node

    # ---- taint eviction -------------------------------------------------------------------------------

    def _evict_for_taints(self, node: Obj) -> None:
        """processPodOnNode for every pod of the node (terminating ones too: the real controller does not skip
        them; deleting one again with its own grace changes nothing but the condition)."""
        taints = [t for t in (node.get("spec") or {}).get("taints") or [] if t.get("effect") == "NoExecute"]
        for pod in self._pods_on(node["metadata"]["name"]):
            meta = pod["metadata"]
            key = (meta["namespace"], meta["name"])
            delay = eviction_delay((pod.get("spec") or {}).get("tolerations") or [], taints) if taints else None
            if delay is None:
                self._cancel_eviction(key)
            elif delay == 0:
                self._cancel_eviction(key)
                self._evict(key, meta["uid"])
            else:
                self._schedule_eviction(key, meta["uid"], delay * self.disruption.termination_scale)

    def _schedule_eviction(self, key: Key, uid: str, delay: float) -> None:
        """A pod tolerating the taints for a while: deleted then, unless an earlier eviction is already due."""
        deadline = time.monotonic() + delay
        current = self._evictions.get(key)
        if current is not None and current[1] == uid and current[0] <= deadline:
            return
        self._cancel_eviction(key)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop: nothing keeps time
        handle = loop.call_later(delay, self._evict, key, uid)
        self._evictions[key] = (deadline, uid, handle)

    def _cancel_eviction(self, key: Key) -> None:
        current = self._evictions.pop(key, None)
        if current is not None:
            current[2].cancel()

    def _evict(self, key: Key, uid: str) -> None:
        """addConditionAndDeletePod: DisruptionTarget, then a DELETE with the pod's own grace."""
        self._evictions.pop(key, None)
        pod = self.store.get("Pod", *key)
        if pod is None or pod["metadata"]["uid"] != uid:
            return
        self._write(set_pod_condition(pod, TAINT_MANAGER_CONDITION))
        with contextlib.suppress(errors.ApiError):
            self.disruption.delete_pod(key[0], key[1], None)

    # ---- pod GC ---------------------------------------------------------------------------------------

    def _collect_terminating(self, node: Obj) -> None:
        """gcTerminating: the Terminating pods of a node that is not Ready and has the out-of-service taint."""
        taints = (node.get("spec") or {}).get("taints") or []
        if kubelet_alive(node) or not any(t.get("key") == OUT_OF_SERVICE_TAINT_KEY for t in taints):
            return
        for pod in self._pods_on(node["metadata"]["name"]):
            if is_terminating(pod):
                self._force_delete(pod)

    def _quarantine(self, node: str) -> None:
        """gcOrphaned: a Node gone; its pods are collected if it is still gone after the quarantine."""
        current = self._orphans.pop(node, None)
        if current is not None:
            current.cancel()
        with contextlib.suppress(RuntimeError):  # no loop: nothing keeps time
            delay = ORPHAN_QUARANTINE_SECONDS * self.disruption.termination_scale
            self._orphans[node] = asyncio.get_running_loop().call_later(delay, self._collect_orphans, node)

    def _collect_orphans(self, node: str) -> None:
        self._orphans.pop(node, None)
        if self.store.get("Node", "", node) is not None:
            return  # back under the same name: not an orphan
        for pod in self._pods_on(node):
            self._force_delete(pod, ORPHAN_CONDITION)

    def _force_delete(self, pod: Obj, condition: Obj | None = None) -> None:
        """markFailedAndDeletePodWithCondition: phase Failed (and the condition) unless the pod has finished,
        then a DELETE with grace 0 (finalizers still hold it)."""
        status = pod.get("status") or {}
        if status.get("phase") not in ("Succeeded", "Failed"):
            failed = {**pod, "status": {**status, "phase": "Failed"}}
            pod = self._write(set_pod_condition(failed, condition) if condition else failed) or pod
        meta = pod["metadata"]
        with contextlib.suppress(errors.ApiError):
            self.disruption.delete_pod(meta["namespace"], meta["name"], 0)

    def _write(self, pod: Obj) -> Any:
        try:
            return self.store.update(pod, check_version=False)
        except errors.ApiError:  # gone meanwhile: nothing to do
            return None
