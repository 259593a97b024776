"""The built-in admission plugins kube-apiserver runs on every request, as far as the fake models them:
NamespaceLifecycle (staging/src/k8s.io/apiserver/pkg/admission/plugin/namespace/lifecycle) and Priority
(plugin/pkg/admission/priority). They run before the admission hooks (ValidatingAdmissionPolicies and the
tests' own), and before validation: they are mutating plugins, first in kube-apiserver's order.

NamespaceLifecycle:
- a write (create or update, subresources included: an eviction is a create of pods/eviction) of a namespaced
  object in a namespace that does not exist: 404 NotFound of the namespace (`namespaces "x" not found`);
- a create in a namespace whose phase is Terminating: 403 Forbidden, `<resource> "<name>" is forbidden: unable
  to create new content in namespace x because it is being terminated`, cause NamespaceTerminating;
- deleting default, kube-system or kube-public: 403 Forbidden, `this namespace may not be deleted`.

Priority, for a pod's create: spec.priority from its priorityClassName's PriorityClass (403 Forbidden `no
PriorityClass with name x was found` when there is none); without a class name, the globalDefault class
(its name written into the pod; the lowest value if several) or priority 0; a spec.priority or
spec.preemptionPolicy given that differs from the class's: 403. On update an omitted priority is kept.
PriorityClasses: a second globalDefault is refused (403).
"""

from __future__ import annotations

from typing import Any

from . import errors
from .resources import Resource
from .store import Obj, Store

IMMORTAL_NAMESPACES = frozenset({"default", "kube-system", "kube-public"})
# created by kube-apiserver at start (the scheduling/bootstrap-system-priority-classes post-start hook)
SYSTEM_PRIORITY_CLASSES: tuple[Obj, ...] = (
    {
        "apiVersion": "scheduling.k8s.io/v1",
        "kind": "PriorityClass",
        "metadata": {"name": "system-node-critical"},
        "value": 2000001000,
        "description": "Used for system critical pods that must not be moved from their current node.",
        "preemptionPolicy": "PreemptLowerPriority",
    },
    {
        "apiVersion": "scheduling.k8s.io/v1",
        "kind": "PriorityClass",
        "metadata": {"name": "system-cluster-critical"},
        "value": 2000000000,
        "description": "Used for system critical pods that must run in the cluster, but can be moved to another "
        "node if necessary.",
        "preemptionPolicy": "PreemptLowerPriority",
    },
)
DEFAULT_PREEMPTION_POLICY = "PreemptLowerPriority"


def forbidden(res: Resource, obj: Obj | None, name: str, why: str) -> errors.ApiError:
    """admission.NewForbidden: the resource (no subresource), the object's name, else its generateName (names
    are not generated yet when admission runs), else the request's."""
    meta = (obj or {}).get("metadata") or {}
    name = meta.get("name") or meta.get("generateName") or name or "Unknown"
    resource = f"{res.plural}.{res.group}" if res.group else res.plural
    details: dict[str, Any] = {"name": name, "kind": res.plural}
    if res.group:
        details["group"] = res.group
    return errors.ApiError(403, f'{resource} "{name}" is forbidden: {why}', "Forbidden", details)


class BuiltinAdmission:
    """NamespaceLifecycle and Priority over the fake's store; `admit` raises the ApiError they would answer and
    mutates `obj` as they do."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def admit(
        self,
        operation: str,
        res: Resource,
        subresource: str | None,
        namespace: str | None,
        name: str,
        obj: Obj | None,
        old: Obj | None = None,
    ) -> None:
        self.namespace_lifecycle(operation, res, namespace, name, obj)
        if subresource:
            return  # Priority ignores subresources
        if res.kind == "Pod" and obj is not None:
            self.priority(operation, res, name, obj, old)
        elif res.kind == "PriorityClass" and obj is not None and operation in ("CREATE", "UPDATE"):
            self.validate_priority_class(operation, res, name, obj)

    # ---- NamespaceLifecycle -------------------------------------------------------------------------------

    def namespace_lifecycle(
        self, operation: str, res: Resource, namespace: str | None, name: str, obj: Obj | None
    ) -> None:
        if res.kind == "Namespace":
            if operation == "DELETE" and name in IMMORTAL_NAMESPACES:
                raise forbidden(res, None, name, "this namespace may not be deleted")
            return
        if not res.namespaced or not namespace or operation == "DELETE":
            return
        found = self.store.get("Namespace", "", namespace)
        if found is None:
            raise errors.not_found("", "namespaces", namespace)
        if operation == "CREATE" and (found.get("status") or {}).get("phase") == "Terminating":
            error = forbidden(
                res, obj, name, f"unable to create new content in namespace {namespace} because it is being terminated"
            )
            cause = {
                "reason": "NamespaceTerminating",
                "message": f"namespace {namespace} is being terminated",
                "field": "metadata.namespace",
            }
            assert error.details is not None
            error.details["causes"] = [cause]
            raise error

    # ---- Priority -----------------------------------------------------------------------------------------

    def _default_class(self) -> Obj | None:
        """The globalDefault PriorityClass; the one with the lowest value if a race left several."""
        defaults = [pc for pc in self.store.iter_objects("PriorityClass") if pc.get("globalDefault")]
        return min(defaults, key=lambda pc: int(pc.get("value", 0)), default=None)

    def priority(self, operation: str, res: Resource, name: str, pod: Obj, old: Obj | None) -> None:
        spec = pod.setdefault("spec", {})
        if operation == "UPDATE":
            old_spec = (old or {}).get("spec") or {}
            for key in ("priority", "preemptionPolicy"):  # set at create; validation forbids changing them
                if spec.get(key) is None and old_spec.get(key) is not None:
                    spec[key] = old_spec[key]
            return
        if operation != "CREATE":
            return
        class_name = spec.get("priorityClassName")
        if not class_name:
            found = self._default_class()
            if found is not None:
                spec["priorityClassName"] = found["metadata"]["name"]
        else:
            found = self.store.get("PriorityClass", "", class_name)
            if found is None:
                raise forbidden(res, pod, name, f"no PriorityClass with name {class_name} was found")
        value = int(found.get("value", 0)) if found is not None else 0
        policy = (found or {}).get("preemptionPolicy") or DEFAULT_PREEMPTION_POLICY
        given = spec.get("priority")
        if given is not None and int(given) != value:
            raise forbidden(
                res,
                pod,
                name,
                f"the integer value of priority ({given}) must not be provided in pod spec; priority admission "
                f"controller computed {value} from the given PriorityClass name",
            )
        spec["priority"] = value
        wanted = spec.get("preemptionPolicy")
        if wanted is not None and wanted != policy:
            raise forbidden(
                res,
                pod,
                name,
                f"the string value of PreemptionPolicy ({wanted}) must not be provided in pod spec; priority "
                f"admission controller computed {policy} from the given PriorityClass name",
            )
        spec["preemptionPolicy"] = policy

    def validate_priority_class(self, operation: str, res: Resource, name: str, pc: Obj) -> None:
        if not pc.get("globalDefault"):
            return
        current = self._default_class()
        if current is None:
            return
        current_name = current["metadata"]["name"]
        if operation == "CREATE" or current_name != ((pc.get("metadata") or {}).get("name") or name):
            raise forbidden(
                res, pc, name, f"PriorityClass {current_name} is already marked as default. Only one default can exist"
            )
