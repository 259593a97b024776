"""What the disruption controller, the kubelet and the eviction subresource do for pods: PDB status that
follows the pods a short lag behind, graceful deletion that ends when the pod really stops, and evictions
that respect budgets by their status (and decrement it, as the real eviction subresource does)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import math
import time
from typing import Any

from . import errors
from .codec import now_rfc3339, parse_time
from .selectors import Selector, from_label_selector_object, labels_match
from .store import Change, Key, Obj, Store

STOP_SECONDS_ANNOTATION = "sim.spotd.io/stop-seconds"
DEFAULT_GRACE_SECONDS = 30
_SCALED_KINDS = ("ReplicaSet", "Deployment", "StatefulSet", "ReplicationController")
# built-in controllers whose pods a budget may select but that have no /scale: the disruption controller's error
_UNSCALED_KINDS = {"Job": "jobs.batch", "DaemonSet": "daemonsets.apps", "CronJob": "cronjobs.batch"}
DELETION_TIMEOUT_SECONDS = 120  # an evicted pod not deleted by then counts as healthy again
MAX_DISRUPTED_PODS = 2000  # eviction.go's MaxDisruptedPodSize: past it, evictions are refused (403)
EVICTION_CONDITION = {
    "type": "DisruptionTarget",
    "status": "True",
    "reason": "EvictionByEvictionAPI",
    "message": "Eviction API: evicting",
}


def is_terminating(pod: Obj) -> bool:
    return bool(pod["metadata"].get("deletionTimestamp"))


def kubelet_alive(node: Obj | None) -> bool:
    """A node whose kubelet runs: it exists and its Ready condition is True (False or Unknown: not)."""
    conditions = ((node or {}).get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def set_pod_condition(pod: Obj, condition: Obj) -> Obj:
    """apipod.UpdatePodCondition: the pod with `condition` set (lastTransitionTime moves only with its status)."""
    status = dict(pod.get("status") or {})
    conditions = list(status.get("conditions") or [])
    for i, c in enumerate(conditions):
        if c.get("type") == condition["type"]:
            same = c.get("status") == condition["status"] and c.get("lastTransitionTime")
            conditions[i] = {**c, **condition, "lastTransitionTime": c["lastTransitionTime"] if same else now_rfc3339()}
            break
    else:
        conditions.append({**condition, "lastProbeTime": None, "lastTransitionTime": now_rfc3339()})
    status["conditions"] = conditions
    return {**pod, "status": status}


def is_healthy(pod: Obj) -> bool:
    """The disruption controller's notion: Ready condition True and not being deleted."""
    if is_terminating(pod):
        return False
    conditions = pod.get("status", {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _selector(pdb: Obj) -> Selector | None:
    try:
        return from_label_selector_object(pdb.get("spec", {}).get("selector"))
    except errors.ApiError:
        return None


def _scaled(value: Any, total: int) -> int:
    """intstr int or "N%" of total, rounded up (GetScaledValueFromIntOrPercent with roundUp=true)."""
    if isinstance(value, str) and value.endswith("%"):
        return math.ceil(int(value[:-1]) * total / 100)
    return int(value)


def _controller_ref(obj: Obj) -> Obj | None:
    """metav1.GetControllerOf: the owner reference marked controller."""
    for ref in obj["metadata"].get("ownerReferences") or []:
        if ref.get("controller"):
            return dict(ref)
    return None


def _replicas(owner: Obj) -> int:
    replicas = (owner.get("spec") or {}).get("replicas")
    return 1 if replicas is None else int(replicas)  # the API default


class _SyncFailed(Exception):
    """The disruption controller could not compute a budget's expected pods."""


def _set_condition(conditions: list[Obj] | None, wanted: Obj) -> list[Obj]:
    """apimeta.SetStatusCondition: replace the condition of that type, keeping its lastTransitionTime unless
    the status changes; the others are kept."""
    out, found = [], False
    for c in conditions or []:
        if c.get("type") != wanted["type"]:
            out.append(c)
            continue
        found = True
        same = c.get("status") == wanted["status"] and c.get("lastTransitionTime")
        out.append({**wanted, "lastTransitionTime": c["lastTransitionTime"] if same else now_rfc3339()})
    if not found:
        out.append({**wanted, "lastTransitionTime": now_rfc3339()})
    return out


def _fail_safe(pdb: Obj, error: str) -> dict[str, Any]:
    """The disruption controller's failSafe: the status as it was, no disruption allowed, and the condition
    False with reason SyncFailed (its observedGeneration unchanged: a budget never computed keeps 0, which the
    eviction subresource answers with 429 "still being processed")."""
    status = dict(pdb.get("status") or {})
    status["disruptionsAllowed"] = 0
    condition = {
        "type": "DisruptionAllowed",
        "status": "False",
        "reason": "SyncFailed",
        "message": error,
        "observedGeneration": status.get("observedGeneration", 0),
    }
    status["conditions"] = _set_condition(status.get("conditions"), condition)
    return status


class DisruptionController:
    """Keeps every PodDisruptionBudget's status following its pods `lag` seconds behind (as the disruption
    controller does) and carries out pod deletions and evictions."""

    def __init__(self, store: Store, termination_scale: float = 1.0, lag: float = 0.0) -> None:
        self.store = store
        self.termination_scale = termination_scale
        self.lag = lag
        self._dirty: set[Key] = set()
        self._flush_scheduled = False
        self._flush_handle: asyncio.TimerHandle | asyncio.Handle | None = None
        self._timers: dict[Key, tuple[float, str, asyncio.TimerHandle]] = {}
        self._stalled: dict[str, dict[Key, str]] = {}  # node -> pods its dead kubelet did not finish (uid)
        store.hooks.append(self._on_change)

    # ---- PodDisruptionBudget status -------------------------------------------------------------------

    def _on_change(self, ch: Change) -> None:
        if ch.kind == "Pod":
            for pdb in self.store.iter_objects("PodDisruptionBudget", ch.namespace):
                sel = _selector(pdb)
                if sel is None:
                    continue
                for pod in (ch.obj, ch.old):
                    if pod is not None and labels_match(sel, pod["metadata"].get("labels")):
                        self._dirty.add((ch.namespace, pdb["metadata"]["name"]))
                        break
        elif ch.kind == "PodDisruptionBudget":
            if ch.type == "ADDED" or (ch.old is not None and ch.old.get("spec") != ch.obj.get("spec")):
                self._dirty.add((ch.namespace, ch.obj["metadata"]["name"]))
        elif ch.kind == "Node":
            name = ch.obj["metadata"]["name"]
            if ch.type == "DELETED":
                self._stalled.pop(name, None)  # its kubelet will not come back: pod GC's orphans (podgc.py)
            elif name in self._stalled and kubelet_alive(ch.obj):
                with contextlib.suppress(RuntimeError):  # without a loop: at the next change
                    asyncio.get_running_loop().call_soon(self._kubelet_back, name)
            return
        elif ch.kind in _SCALED_KINDS:
            for pdb in self.store.iter_objects("PodDisruptionBudget", ch.namespace):
                self._dirty.add((ch.namespace, pdb["metadata"]["name"]))
        else:
            return
        if self._dirty and not self._flush_scheduled:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # no loop: flushed lazily on the next PDB read
            self._flush_scheduled = True
            if self.lag > 0:
                self._flush_handle = loop.call_later(self.lag, self.flush)
            else:
                self._flush_handle = loop.call_soon(self.flush)

    def before_read(self) -> None:
        """A PDB is about to be read: without a lag (or without an event loop to run the recompute later)
        its status is brought up to date first; with one, the reader sees the status as it stands."""
        if self._dirty and (self.lag <= 0 or not self._flush_scheduled):
            self.flush()

    def flush(self) -> None:
        """Recompute the status of every PDB touched since the last flush (coalesces bursts of pod writes)."""
        self._flush_scheduled = False
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        dirty, self._dirty = self._dirty, set()
        for ns, name in sorted(dirty):
            pdb = self.store.get("PodDisruptionBudget", ns, name)
            if pdb is None:
                continue
            status = self.compute_status(pdb)
            if status != pdb.get("status"):
                self.store.update({**pdb, "status": status}, check_version=False)

    def compute_status(self, pdb: Obj) -> dict[str, Any]:
        """The status the disruption controller writes (pkg/controller/disruption, trySync): currentHealthy,
        desiredHealthy, expectedPods, disruptionsAllowed (0 whenever expectedPods is 0) and the
        DisruptionAllowed condition. When the expected count cannot be computed (maxUnavailable or a
        percentage minAvailable over a pod whose controller has no scale: a Job, a DaemonSet, a custom
        resource, a controller that is gone), its failSafe instead: the last status with no disruption allowed
        and the condition False, reason SyncFailed, naming the error."""
        ns, spec = pdb["metadata"]["namespace"], pdb.get("spec") or {}
        sel = _selector(pdb)
        pods = (
            []
            if sel is None
            else [p for p in self.store.iter_objects("Pod", ns) if labels_match(sel, p["metadata"].get("labels"))]
        )
        disrupted = self._still_disrupted(pdb, pods)
        healthy = sum(1 for p in pods if is_healthy(p) and p["metadata"]["name"] not in disrupted)
        min_available, max_unavailable = spec.get("minAvailable"), spec.get("maxUnavailable")
        try:
            if max_unavailable is not None:
                expected = self._expected_scale(ns, pods)
                desired = max(0, expected - _scaled(max_unavailable, expected))
            elif isinstance(min_available, int):
                expected, desired = len(pods), min_available  # an integer needs no controller: every pod counts
            elif min_available is not None:
                expected = self._expected_scale(ns, pods)
                desired = _scaled(min_available, expected)
            else:
                expected, desired = 0, 0  # neither: nothing expected, so nothing allowed
        except _SyncFailed as exc:
            return _fail_safe(pdb, str(exc))
        allowed = healthy - desired
        if expected <= 0 or allowed <= 0:
            allowed = 0
        generation = pdb["metadata"].get("generation", 1)
        sufficient = allowed > 0
        condition = {
            "type": "DisruptionAllowed",
            "status": "True" if sufficient else "False",
            "reason": "SufficientPods" if sufficient else "InsufficientPods",
            "message": "",
            "observedGeneration": generation,
        }
        status: dict[str, Any] = {
            "observedGeneration": generation,
            "disruptionsAllowed": allowed,
            "currentHealthy": healthy,
            "desiredHealthy": desired,
            "expectedPods": expected,
            "conditions": _set_condition((pdb.get("status") or {}).get("conditions"), condition),
        }
        if disrupted:
            status["disruptedPods"] = disrupted
        return status

    @staticmethod
    def _still_disrupted(pdb: Obj, pods: list[Obj]) -> dict[str, str]:
        """status.disruptedPods kept for pods evicted but not yet terminating, for DELETION_TIMEOUT_SECONDS
        (buildDisruptedPodMap): they count as unhealthy meanwhile."""
        recorded = (pdb.get("status") or {}).get("disruptedPods") or {}
        if not recorded:
            return {}
        now = dt.datetime.now(dt.UTC)
        kept = {}
        for pod in pods:
            name = pod["metadata"]["name"]
            when = parse_time(recorded.get(name, ""))
            if when is None or is_terminating(pod):
                continue
            if (now - when).total_seconds() <= DELETION_TIMEOUT_SECONDS:
                kept[name] = recorded[name]
        return kept

    def _expected_scale(self, ns: str, pods: list[Obj]) -> int:
        """getExpectedScale: the sum of the scales of the pods' controllers. A pod without a controller
        reference is left out (the real controller records an UnmanagedPods warning); one whose controller
        has no scale, or cannot be found, fails the computation (_SyncFailed)."""
        scales: dict[str, int] = {}  # by controller uid
        for pod in pods:
            ref = _controller_ref(pod)
            if ref is None or ref.get("uid") in scales:
                continue
            found = self._scale_of(ns, ref)
            if found is None:
                raise _SyncFailed(f'found no controllers for pod "{pod["metadata"]["name"]}"')
            scales[found[0]] = found[1]
        return sum(scales.values())

    def _scale_of(self, ns: str, ref: Obj) -> tuple[str, int] | None:
        """(uid, replicas) of the controller a pod's reference names, as the disruption controller's finders
        look it up (ReplicationController, a ReplicaSet's Deployment, a ReplicaSet, a StatefulSet, then the
        /scale subresource); None when none is found; _SyncFailed when the kind has no scale."""
        kind, name, uid = ref.get("kind", ""), ref.get("name", ""), ref.get("uid")
        group = str(ref.get("apiVersion", "")).rpartition("/")[0]
        if kind not in _SCALED_KINDS:
            plural = _UNSCALED_KINDS.get(kind) or f"{kind.lower()}s.{group}".rstrip(".")
            raise _SyncFailed(f"{plural} does not implement the scale subresource")
        owner = self.store.get(kind, ns, name)
        if owner is None or owner["metadata"].get("uid") != uid:
            return None  # not found, or a new object under the same name: not this pod's controller
        if kind == "ReplicaSet":  # a Deployment's ReplicaSet scales with the Deployment
            parent = _controller_ref(owner)
            if parent is not None and parent.get("kind") == "Deployment":
                deployment = self.store.get("Deployment", ns, parent.get("name", ""))
                if deployment is not None and deployment["metadata"].get("uid") == parent.get("uid"):
                    return str(deployment["metadata"]["uid"]), _replicas(deployment)
        return str(uid), _replicas(owner)

    def matching_pdbs(self, pod: Obj) -> list[Obj]:
        labels = pod["metadata"].get("labels")
        ns = pod["metadata"]["namespace"]
        found = []
        for pdb in self.store.iter_objects("PodDisruptionBudget", ns):
            sel = _selector(pdb)
            # a null or empty selector matches nothing here (the disruption controller counts every pod for {})
            if sel and labels_match(sel, labels):
                found.append(pdb)
        return found

    # ---- graceful deletion ----------------------------------------------------------------------------

    def delete_pod(self, ns: str, name: str, grace: int | None, dry_run: bool = False) -> Obj:
        """DELETE of a pod: at once when unscheduled, finished or grace 0; otherwise mark it terminating
        (deletionTimestamp) and remove it when it really stops: min(grace, stop-seconds annotation) scaled
        by termination_scale. A second delete with a shorter grace shortens the wait."""
        pod = self.store.get("Pod", ns, name)
        if pod is None:
            raise errors.not_found("", "pods", name)
        if grace is None:
            grace = int(pod.get("spec", {}).get("terminationGracePeriodSeconds", DEFAULT_GRACE_SECONDS))
        grace = max(0, int(grace))
        phase = pod.get("status", {}).get("phase")
        if not pod.get("spec", {}).get("nodeName") or phase in ("Succeeded", "Failed") or grace == 0:
            if dry_run:
                return pod
            self._cancel_timer((ns, name))
            return self.store.delete("Pod", ns, name)  # held by finalizers, if any
        meta = pod["metadata"]
        if is_terminating(pod) and grace >= int(meta.get("deletionGracePeriodSeconds", grace)):
            return pod  # a longer grace never extends a deletion in progress
        if dry_run:
            return pod
        new_meta = {**meta, "deletionTimestamp": now_rfc3339(grace), "deletionGracePeriodSeconds": grace}
        updated = self.store.update({**pod, "metadata": new_meta}, check_version=False, set_deletion=True)
        stop = meta.get("annotations", {}).get(STOP_SECONDS_ANNOTATION)
        try:
            runs_for = min(grace, float(stop)) if stop is not None else grace
        except ValueError:
            runs_for = grace
        self._schedule_removal((ns, name), meta["uid"], runs_for * self.termination_scale)
        return updated

    def _schedule_removal(self, key: Key, uid: str, delay: float) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._finish(key, uid)
            return
        deadline = time.monotonic() + max(0.0, delay)
        current = self._timers.get(key)
        if current is not None:
            if current[0] <= deadline:
                return
            current[2].cancel()
        handle = loop.call_later(max(0.0, deadline - time.monotonic()), self._finish, key, uid)
        self._timers[key] = (deadline, uid, handle)

    def _finish(self, key: Key, uid: str) -> None:
        """The kubelet has stopped the pod's containers and deletes it for good (grace 0; finalizers hold it).
        Only a live kubelet does: on a node that is NotReady or gone the pod stays Terminating until the node
        comes back, pod GC force-deletes it (out-of-service taint, podgc.py) or someone deletes it with
        grace 0."""
        self._timers.pop(key, None)
        pod = self.store.get("Pod", *key)
        if pod is None or pod["metadata"]["uid"] != uid or not is_terminating(pod):
            return
        node = (pod.get("spec") or {}).get("nodeName") or ""
        if not kubelet_alive(self.store.get("Node", "", node)):
            self._stalled.setdefault(node, {})[key] = uid
            return
        self.store.delete("Pod", *key)

    def _kubelet_back(self, node: str) -> None:
        """A node Ready again: its kubelet finishes the deletions it missed."""
        for key, uid in self._stalled.pop(node, {}).items():
            self._finish(key, uid)

    def _cancel_timer(self, key: Key) -> None:
        current = self._timers.pop(key, None)
        if current is not None:
            current[2].cancel()

    def cancel_all(self) -> None:
        for _, _, handle in self._timers.values():
            handle.cancel()
        self._timers.clear()

    # ---- eviction -------------------------------------------------------------------------------------

    def evict(self, ns: str, name: str, eviction: Obj, dry_run: bool = False) -> None:
        """POST pods/{name}/eviction: 429 when the pod's budget allows no disruption, 500 when several
        budgets select the pod, otherwise the condition DisruptionTarget (reason EvictionByEvictionAPI) written
        on the pod, then a graceful delete honouring deleteOptions.gracePeriodSeconds."""
        pod = self.store.get("Pod", ns, name)
        if pod is None:
            raise errors.not_found("", "pods", name)
        body_name = eviction.get("metadata", {}).get("name")
        if body_name and body_name != name:
            raise errors.bad_request(f"name in URL does not match name in Eviction object: {body_name} != {name}")
        options = eviction.get("deleteOptions") or {}
        check_preconditions(pod, options, "pods")
        grace = options.get("gracePeriodSeconds")
        phase = pod.get("status", {}).get("phase")
        if not (is_terminating(pod) or phase in ("Succeeded", "Failed", "Pending")):
            self.before_read()
            self._check_and_decrement(pod, dry_run)
        if not dry_run:  # addConditionAndDeletePod: why the pod goes, written before it is deleted
            self.store.update(set_pod_condition(pod, EVICTION_CONDITION), check_version=False)
        self.delete_pod(ns, name, grace, dry_run=dry_run)

    def _check_and_decrement(self, pod: Obj, dry_run: bool) -> None:
        """The budget as its status last said (stale until the disruption controller catches up): 429 when
        it allows no disruption; otherwise one disruption fewer and the pod in disruptedPods."""
        pdbs = self.matching_pdbs(pod)
        if len(pdbs) > 1:
            raise errors.ApiError(
                500, "This pod has more than one PodDisruptionBudget, which the eviction subresource does not support."
            )
        if not pdbs:
            return
        pdb = pdbs[0]
        status = pdb.get("status") or {}
        healthy, desired = status.get("currentHealthy", 0), status.get("desiredHealthy", 0)
        policy = pdb.get("spec", {}).get("unhealthyPodEvictionPolicy") or "IfHealthyBudget"
        if not is_healthy(pod) and (policy == "AlwaysAllow" or (healthy >= desired and desired > 0)):
            return
        if status.get("observedGeneration", 0) < pdb["metadata"].get("generation", 1):
            name = pdb["metadata"]["name"]
            raise _too_many(pdb, f"The disruption budget {name} is still being processed by the server.", 10)
        allowed = status.get("disruptionsAllowed", 0)
        if allowed < 0:
            raise _pdb_forbidden(pdb, "pdb disruptions allowed is negative")
        if len(status.get("disruptedPods") or {}) > MAX_DISRUPTED_PODS:
            raise _pdb_forbidden(pdb, "DisruptedPods map too big - too many evictions not confirmed by PDB controller")
        if allowed == 0:
            raise _too_many(pdb, disruption_denied_message(pdb))
        if dry_run:
            return
        new_status = {
            **status,
            "disruptionsAllowed": allowed - 1,
            "disruptedPods": {**(status.get("disruptedPods") or {}), pod["metadata"]["name"]: now_rfc3339()},
        }
        if allowed - 1 == 0:
            new_status["conditions"] = [
                {**c, "status": "False", "reason": "InsufficientPods", "lastTransitionTime": now_rfc3339()}
                if c.get("type") == "DisruptionAllowed"
                else c
                for c in status.get("conditions") or []
            ]
        self.store.update({**pdb, "status": new_status}, check_version=False)


def disruption_denied_message(pdb: Obj) -> str:
    """The cause of a 429 for a budget allowing no disruption, as the eviction subresource words it
    (disruptionDeniedMessage): a failed sync first (the health counts are not to be trusted then), then the
    health counts when they explain it, then the condition's own reason and message, else plainly."""
    name = pdb["metadata"]["name"]
    status = pdb.get("status") or {}
    healthy, desired = status.get("currentHealthy", 0), status.get("desiredHealthy", 0)
    condition = next((c for c in status.get("conditions") or [] if c.get("type") == "DisruptionAllowed"), None)
    failed = condition is not None and condition.get("status") == "False" and bool(condition.get("message"))
    denied = f"The disruption budget {name} does not allow evicting pods currently"
    if failed and condition is not None and condition.get("reason") == "SyncFailed":
        return f"{denied} because it failed sync: {condition['message']}"
    if healthy <= desired:
        return f"The disruption budget {name} needs {desired} healthy pods and has {healthy} currently"
    if failed and condition is not None:
        return f"{denied} ({condition.get('reason')}): {condition['message']}"
    return denied


def _too_many(pdb: Obj, cause: str, retry_after: int = 0) -> errors.ApiError:
    """errors.NewTooManyRequests with the DisruptionBudget cause (a Retry-After only when one is suggested)."""
    details: dict[str, Any] = {"causes": [{"reason": "DisruptionBudget", "message": cause}]}
    if retry_after:
        details["retryAfterSeconds"] = retry_after
    return errors.ApiError(
        429,
        "Cannot evict pod as it would violate the pod's disruption budget.",
        details=details,
        retry_after=retry_after or None,
    )


def _pdb_forbidden(pdb: Obj, why: str) -> errors.ApiError:
    name = pdb["metadata"]["name"]
    details = {"name": name, "group": "policy", "kind": "poddisruptionbudget"}
    return errors.ApiError(403, f'poddisruptionbudget.policy "{name}" is forbidden: {why}', details=details)


def check_preconditions(obj: Obj, options: dict[str, Any], plural: str, group: str = "") -> None:
    """DeleteOptions.preconditions: uid and resourceVersion must match, else 409 Conflict."""
    pre = options.get("preconditions") or {}
    meta = obj["metadata"]
    for field in ("uid", "resourceVersion"):
        wanted = pre.get(field)
        if wanted and wanted != meta.get(field):
            raise errors.conflict(
                group,
                plural,
                meta["name"],
                f"Precondition failed: {field.upper() if field == 'uid' else 'ResourceVersion'} in precondition: "
                f"{wanted}, {field.upper() if field == 'uid' else 'ResourceVersion'} in object meta: {meta.get(field)}",
            )
