"""The embedded cluster's scheduler (taints, resources, preemption) and kubelet, with their quantities (pure)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from spotd.controller.node_groups import node_selection_matches, tolerates
from spotd.sim.kubeapi.errors import ApiError
from spotd.sim.kubeapi.policy import set_pod_condition
from spotd.sim.kubeapi.server import FakeApiServer

Obj = dict[str, Any]
START_SECONDS_ANNOTATION = "sim.spotd.io/start-seconds"


# ---- quantities and matching (pure) ---------------------------------------------------------------------


def cpu_millis(text: str | int | None) -> int:
    if text is None:
        return 0
    text = str(text)
    return int(text[:-1]) if text.endswith("m") else int(float(text) * 1000)


def mem_mebibytes(text: str | int | None) -> int:
    if text is None:
        return 0
    text = str(text)
    for suffix, factor in (("Gi", 1024), ("Mi", 1), ("Ki", 1 / 1024)):
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(int(text) / 2**20)


def selects_node(pod: Obj, labels: dict[str, str], name: str = "") -> bool:
    """The pod's nodeSelector and required node affinity hold for a node with these labels (and name), as
    kube-scheduler's NodeAffinity: one implementation, the controller's (spotd.controller.node_groups)."""
    return node_selection_matches(pod.get("spec") or {}, labels, name)


def requests_of(pod: Obj) -> tuple[int, int]:
    cpu = mem = 0
    for c in pod.get("spec", {}).get("containers") or []:
        req = (c.get("resources") or {}).get("requests") or {}
        cpu += cpu_millis(req.get("cpu"))
        mem += mem_mebibytes(req.get("memory"))
    return cpu, mem


PREEMPTION_CONDITION = {"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}


class Scheduler:
    """Binds pending pods to nodes, preempting lower-priority pods; the kubelet then marks them Ready."""

    def __init__(self, api: FakeApiServer, time_scale: float) -> None:
        self.api = api
        self.time_scale = time_scale
        self.nominated: dict[str, str] = {}  # pod uid -> node its preemption made room on

    @property
    def store(self) -> Any:
        return self.api.store

    def schedule(self, nodes: dict[str, Obj], initial: bool) -> None:
        used: dict[str, list[int]] = {n: [0, 0, 0] for n in nodes}
        on_node: dict[str, list[Obj]] = defaultdict(list)
        pending: list[Obj] = []
        for pod in self.store.iter_objects("Pod"):
            node = pod.get("spec", {}).get("nodeName")
            if node in used:
                cpu, mem = requests_of(pod)
                used[node][0] += cpu
                used[node][1] += mem
                used[node][2] += 1
                on_node[node].append(pod)
            elif not node and not terminating(pod):
                pending.append(pod)
        pending.sort(key=lambda p: (-_priority(p), p["metadata"].get("creationTimestamp", ""), p["metadata"]["name"]))
        # a pod that preempted others has the room it made reserved (nominatedNodeName), or the replacements
        # of its victims would take it back
        self.nominated = {uid: n for uid, n in self.nominated.items() if n in used}
        live = {p["metadata"]["uid"] for p in pending}
        for uid in [u for u in self.nominated if u not in live]:
            del self.nominated[uid]
        for pod in pending:
            node = self.nominated.get(pod["metadata"]["uid"])
            if node is not None:
                _add(used[node], requests_of(pod), 1)
        for pod in pending:
            uid = pod["metadata"]["uid"]
            cpu, mem = requests_of(pod)
            nominated = self.nominated.get(uid)
            if nominated is not None:
                _add(used[nominated], (cpu, mem), -1)
            fits = [
                n
                for n, obj in nodes.items()
                if schedulable(obj, pod) and _fits(_room(obj, used[n], None), (cpu, mem, 1))
            ]
            if fits:
                node = (
                    nominated if nominated in fits else max(fits, key=lambda n: (_room(nodes[n], used[n], None)[0], n))
                )
                self._bind(pod, node, initial)
                _add(used[node], (cpu, mem), 1)
                self.nominated.pop(uid, None)
            elif not initial:
                self._preempt(pod, nodes, used, on_node)
                nominated = self.nominated.get(uid)
                if nominated is not None:
                    _add(used[nominated], (cpu, mem), 1)

    def _bind(self, pod: Obj, node: str, initial: bool) -> None:
        new = {**pod, "spec": {**pod["spec"], "nodeName": node}}
        new["status"] = {
            "phase": "Running" if initial else "Pending",
            "conditions": [{"type": "PodScheduled", "status": "True"}],
        }
        if initial:
            new["status"]["conditions"].append({"type": "Ready", "status": "True"})
            self.api.update(new)
            return
        self.start_later(self.api.update(new))

    def start_later(self, pod: Obj) -> None:
        """The kubelet: the pod turns Running and Ready after its start time (scaled)."""
        try:
            start = float(pod["metadata"].get("annotations", {}).get(START_SECONDS_ANNOTATION, 1.0))
        except ValueError:
            start = 1.0
        meta = pod["metadata"]
        asyncio.get_running_loop().call_later(
            start * self.time_scale, self._mark_ready, meta["namespace"], meta["name"], meta["uid"]
        )

    def _mark_ready(self, namespace: str, name: str, uid: str) -> None:
        pod = self.store.get("Pod", namespace, name)
        if pod is None or pod["metadata"]["uid"] != uid or terminating(pod):
            return
        status = {
            "phase": "Running",
            "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}],
        }
        with contextlib.suppress(ApiError):
            self.api.update({**pod, "status": status})

    def _preempt(
        self, pod: Obj, nodes: dict[str, Obj], used: dict[str, list[int]], on_node: dict[str, list[Obj]]
    ) -> None:
        """Make room by deleting lower-priority pods on one node (the overprovisioning placeholders)."""
        uid, priority = pod["metadata"]["uid"], _priority(pod)
        if pod["spec"].get("preemptionPolicy") == "Never" or priority < 0:
            self._unschedulable(pod)
            return
        nominated = self.nominated.get(uid)
        if nominated in nodes and any(terminating(p) for p in on_node[nominated]):
            return  # room is being made there already
        cpu, mem = requests_of(pod)
        for name, node in sorted(nodes.items(), key=lambda kv: kv[0]):
            if not schedulable(node, pod):
                continue
            room = list(_room(node, used[name], on_node[name]))
            victims = []
            for victim in sorted(on_node[name], key=_priority):
                if _fits(room, (cpu, mem, 1)):
                    break
                if _priority(victim) >= priority or terminating(victim):
                    continue
                vcpu, vmem = requests_of(victim)
                room = [room[0] + vcpu, room[1] + vmem, room[2] + 1]
                victims.append(victim)
            if _fits(room, (cpu, mem, 1)) and victims:
                scheduler = pod["spec"].get("schedulerName") or "default-scheduler"
                why = {
                    **PREEMPTION_CONDITION,
                    "message": f"{scheduler}: preempting to accommodate a higher priority pod",
                }
                for victim in victims:  # prepareCandidate: why the victim goes, then its deletion (its own grace)
                    with contextlib.suppress(ApiError):
                        self.api.update(set_pod_condition(victim, why))
                    self.delete(victim, int(victim["spec"].get("terminationGracePeriodSeconds", 30)))
                self.nominated[uid] = name
                return
        self._unschedulable(pod)

    def _unschedulable(self, pod: Obj) -> None:
        conditions = pod.get("status", {}).get("conditions") or []
        wanted = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}
        if wanted not in conditions:
            with contextlib.suppress(ApiError):
                self.api.update({**pod, "status": {**pod.get("status", {}), "conditions": [wanted]}})

    def delete(self, pod: Obj, grace: int) -> None:
        with contextlib.suppress(ApiError):
            self.api.delete("Pod", pod["metadata"]["name"], pod["metadata"]["namespace"], grace_period_seconds=grace)


def terminating(pod: Obj) -> bool:
    return bool(pod["metadata"].get("deletionTimestamp"))


def _priority(pod: Obj) -> int:
    return int(pod.get("spec", {}).get("priority") or 0)


def schedulable(node: Obj, pod: Obj) -> bool:
    """The node takes the pod, resources aside: not cordoned, taints tolerated, selectors and affinity hold."""
    if node.get("spec", {}).get("unschedulable") and not _tolerates_unschedulable(pod):
        return False
    meta = node.get("metadata") or {}
    if not selects_node(pod, meta.get("labels") or {}, meta.get("name", "")):
        return False
    tolerations = pod.get("spec", {}).get("tolerations") or []
    for taint in node.get("spec", {}).get("taints") or []:
        if taint.get("effect") in ("NoSchedule", "NoExecute") and not tolerates(tolerations, taint):
            return False
    return True


def _tolerates_unschedulable(pod: Obj) -> bool:
    taint = {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}
    return tolerates(pod.get("spec", {}).get("tolerations") or [], taint)


def _add(used: list[int], requests: tuple[int, int], sign: int) -> None:
    used[0] += sign * requests[0]
    used[1] += sign * requests[1]
    used[2] += sign


def _fits(room: Iterable[int], need: Iterable[int]) -> bool:
    return all(r >= n for r, n in zip(room, need, strict=True))


def _room(node: Obj, used: list[int], terminating_freed: list[Obj] | None) -> tuple[int, int, int]:
    """Free (cpu millis, MiB, pods); with terminating_freed, the terminating pods' share counts as free."""
    alloc = node.get("status", {}).get("allocatable") or {}
    cpu = cpu_millis(alloc.get("cpu", "0")) - used[0]
    mem = mem_mebibytes(alloc.get("memory", "0")) - used[1]
    pods = int(alloc.get("pods", 110)) - used[2]
    for pod in terminating_freed or []:
        if terminating(pod):
            pcpu, pmem = requests_of(pod)
            cpu, mem, pods = cpu + pcpu, mem + pmem, pods + 1
    return cpu, mem, pods
