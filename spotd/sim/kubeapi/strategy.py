"""What the API server's registry does to a new Pod before storing it, as far as the fake models it: the
defaulting of pkg/apis/core/v1/defaults.go (SetDefaults_Pod, SetDefaults_PodSpec) and the container resource
rules of pkg/apis/core/validation (validateResourceRequirements, ValidateResourceQuantityValue).

Defaulting: a container (or init container) with a limit and no request for a resource gets the request
equal to the limit; grace period 30 s, restartPolicy Always, the default scheduler, phase Pending.

Validation (422 Invalid, every error listed, as errors.NewInvalid reports a field.ErrorList):
- a request for a resource that cannot be overcommitted (an extended resource such as nvidia.com/gpu or
  vpc.amazonaws.com/efa: any name with a domain outside kubernetes.io; hugepages-*) needs a limit
  ("Limit must be set for non overcommitable resources") and must equal it ("must be equal to <name> limit
  of <limit>");
- a request above its limit ("must be less than or equal to <name> limit of <limit>");
- a negative quantity, a fractional quantity of an extended resource ("must be an integer");
- hugepages without cpu or memory in the same container ("HugePages require cpu or memory").

Not modelled: the rest of pod validation (names, images, volumes, probes, security contexts, resource names),
pod-level resources (spec.resources), updates (in-place resize).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from spotd.common.quantity import parse_quantity

from . import errors

Obj = dict[str, Any]

DEFAULT_NAMESPACE_PREFIX = "kubernetes.io/"
HUGEPAGES_PREFIX = "hugepages-"


def is_native(resource: str) -> bool:
    """A resource in the kubernetes.io/ namespace (unprefixed names are implicitly there): IsNativeResource."""
    return "/" not in resource or DEFAULT_NAMESPACE_PREFIX in resource


def is_hugepages(resource: str) -> bool:
    return resource.startswith(HUGEPAGES_PREFIX)


def overcommit_allowed(resource: str) -> bool:
    """IsOvercommitAllowed: only native resources that are not hugepages may have requests below limits."""
    return is_native(resource) and not is_hugepages(resource)


def is_extended(resource: str) -> bool:
    """IsExtendedResourceName (without the qualified-name check): nvidia.com/gpu, vpc.amazonaws.com/efa, ..."""
    return not is_native(resource) and not resource.startswith("requests.")


@dataclass(frozen=True)
class FieldError:
    """One entry of a field.ErrorList: where, which kind (the StatusCause type) and its text."""

    field: str
    type: str  # FieldValueRequired | FieldValueInvalid | FieldValueForbidden
    detail: str
    value: str | None = None

    def body(self) -> str:
        """field.Error.ErrorBody: what StatusCause.message carries."""
        if self.type == "FieldValueRequired":
            return f"Required value: {self.detail}"
        if self.type == "FieldValueForbidden":
            return f"Forbidden: {self.detail}"
        return f'Invalid value: "{self.value}": {self.detail}'

    def __str__(self) -> str:
        return f"{self.field}: {self.body()}"


def invalid(kind: str, name: str, found: list[FieldError], group: str = "") -> errors.ApiError:
    """errors.NewInvalid: 422, reason Invalid, one cause per error, the message listing them all."""
    listed = str(found[0]) if len(found) == 1 else "[" + ", ".join(map(str, found)) + "]"
    details: dict[str, Any] = {
        "name": name,
        "kind": kind,
        "causes": [{"reason": e.type, "message": e.body(), "field": e.field} for e in found],
    }
    if group:
        details["group"] = group
    return errors.ApiError(422, f'{kind} "{name}" is invalid: {listed}', details=details)


# ---- defaulting -------------------------------------------------------------------------------------------


def default_pod(pod: Obj) -> None:
    """SetDefaults_Pod and SetDefaults_PodSpec, the fields the fake relies on; in place, idempotent."""
    spec = pod.setdefault("spec", {})
    for key in ("containers", "initContainers"):
        for container in spec.get(key) or []:
            resources = container.get("resources")
            if not isinstance(resources, dict) or not resources.get("limits"):
                continue
            requests = resources.setdefault("requests", {})
            for name, value in resources["limits"].items():
                requests.setdefault(name, value)
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("schedulerName", "default-scheduler")
    pod.setdefault("status", {}).setdefault("phase", "Pending")


# ---- validation -------------------------------------------------------------------------------------------


def _quantity(value: Any, where: str, found: list[FieldError]) -> Decimal | None:
    try:
        return parse_quantity(value)
    except ValueError:
        found.append(FieldError(where, "FieldValueInvalid", "quantities must match the regular expression", str(value)))
        return None


def resource_errors(resources: Any, path: str) -> list[FieldError]:
    """validateResourceRequirements for one container's resources (names sorted: Go's map order is random)."""
    if not isinstance(resources, dict):
        return []
    limits: dict[str, Any] = resources.get("limits") or {}
    requests: dict[str, Any] = resources.get("requests") or {}
    found: list[FieldError] = []
    parsed_limits: dict[str, Decimal] = {}
    for name in sorted(limits):
        value = _quantity(limits[name], f"{path}.limits[{name}]", found)
        if value is not None:
            parsed_limits[name] = value
            found.extend(_value_errors(name, value, str(limits[name]), f"{path}.limits[{name}]"))
    for name in sorted(requests):
        where = f"{path}.requests[{name}]"
        value = _quantity(requests[name], where, found)
        if value is None:
            continue
        found.extend(_value_errors(name, value, str(requests[name]), where))
        limit = parsed_limits.get(name)
        if name in limits and limit is not None:
            if value != limit and not overcommit_allowed(name):
                found.append(
                    FieldError(
                        f"{path}.requests",
                        "FieldValueInvalid",
                        f"must be equal to {name} limit of {limits[name]}",
                        str(requests[name]),
                    )
                )
            elif value > limit:
                found.append(
                    FieldError(
                        f"{path}.requests",
                        "FieldValueInvalid",
                        f"must be less than or equal to {name} limit of {limits[name]}",
                        str(requests[name]),
                    )
                )
        elif name not in limits and not overcommit_allowed(name):
            found.append(
                FieldError(f"{path}.limits", "FieldValueRequired", "Limit must be set for non overcommitable resources")
            )
    names = set(limits) | set(requests)
    if any(is_hugepages(n) for n in names) and not names & {"cpu", "memory"}:
        found.append(FieldError(path, "FieldValueForbidden", "HugePages require cpu or memory"))
    return found


def _value_errors(name: str, value: Decimal, text: str, where: str) -> list[FieldError]:
    """ValidateResourceQuantityValue: not negative; whole for the integer (extended) resources."""
    if value < 0:
        return [FieldError(where, "FieldValueInvalid", "must be greater than or equal to 0", text)]
    if is_extended(name) and value != value.to_integral_value():
        return [FieldError(where, "FieldValueInvalid", "must be an integer", text)]
    return []


def pod_errors(pod: Obj) -> list[FieldError]:
    """What pod validation finds wrong with a new pod's container resources."""
    spec = pod.get("spec") or {}
    found: list[FieldError] = []
    for key in ("containers", "initContainers"):  # ValidatePodSpec's order
        for i, container in enumerate(spec.get(key) or []):
            if isinstance(container, dict):
                found.extend(resource_errors(container.get("resources"), f"spec.{key}[{i}].resources"))
    return found


def validate_pod(pod: Obj) -> None:
    """422 Invalid when the new pod breaks the rules above."""
    found = pod_errors(pod)
    if found:
        raise invalid("Pod", (pod.get("metadata") or {}).get("name", ""), found)
