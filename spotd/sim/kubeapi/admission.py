"""ValidatingAdmissionPolicy (admissionregistration.k8s.io/v1) evaluated as the API server does, in CEL.

Pure: load policy and binding objects (dicts), then `check(attrs)` answers None (admitted) or the Denial the
API server would return. The CEL is evaluated by cel-expr-python, the Python binding of the CEL C++ runtime
(same language definition as cel-go in the API server: heterogeneous equality, macros, the strings
extension's `join`). It is imported when the first policy is loaded, so the package works without it.

What the API server does and this does too: matchConstraints.resourceRules and excludeResourceRules (groups,
versions, operations, resources with `*`, `x/*`, `*/sub`, resourceNames, scope), objectSelector,
matchConditions (a false one skips the policy, an error follows failurePolicy), variables, validations with
message / messageExpression / reason, failurePolicy, the binding's matchResources and validationActions
(only Deny refuses), the variables `object`, `oldObject`, `request` (the AdmissionRequest with its empty
optional fields left out, as the API server converts it), and the refusal: 422 Invalid unless the
validation names another reason, message `<resource> "<name>" is forbidden: ValidatingAdmissionPolicy
'<policy>' with binding '<binding>' denied request: <message>`.

What it does not: params (paramKind/paramRef), namespaceSelector other than empty, auditAnnotations,
authorizer and namespaceObject variables, the Kubernetes-only CEL libraries (quantity, url, ip, ...), cost
limits, type checking against the OpenAPI schema. Variables are computed in order before the validations,
not lazily; an expression that names a failed variable (`variables.name`) fails with that variable's error,
as it would when the API server evaluates it on use. A policy that uses anything unsupported is refused
when loaded (ValueError), never silently half-applied.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .auth import AdmissionAttributes

# Kubernetes caps an evaluated messageExpression at 5 KiB and refuses multi-line ones.
MAX_MESSAGE_BYTES = 5 * 1024
POLICY_KIND = "ValidatingAdmissionPolicy"
BINDING_KIND = "ValidatingAdmissionPolicyBinding"
# reasonToCode in the API server's policy plugin; a validation's reason must be one of these.
_REASON_CODES = {"Unauthorized": 401, "Forbidden": 403, "Invalid": 422, "RequestEntityTooLarge": 413}


@dataclass(frozen=True)
class Denial:
    """What the API server answers: Status code, reason and message; cause is Status.details.causes[0]."""

    code: int
    reason: str
    message: str
    cause: str = ""


class _Program:
    """One compiled CEL expression; evaluation returns (value, None) or (None, error text)."""

    def __init__(self, env: Any, expression: str, where: str) -> None:
        self.expression = expression
        try:
            self._compiled = env.compile(expression)
        except Exception as exc:  # the binding raises RuntimeError with the checker's report
            raise ValueError(f"{where}: compilation failed: {exc}") from None

    def eval(self, data: Mapping[str, Any]) -> tuple[Any, str | None]:
        try:
            result = self._compiled.eval(data=data)
        except Exception as exc:  # an error of the runtime itself, not of the expression
            return None, str(exc)
        if result.type().name() == "ERROR":
            return None, str(result.value())
        return result.plain_value(), None


@dataclass
class _Validation:
    program: _Program
    message: str
    message_expression: _Program | None
    reason: str


@dataclass
class _Policy:
    name: str
    failure_policy: str
    constraints: Mapping[str, Any]
    conditions: list[tuple[str, _Program]]
    variables: list[tuple[str, _Program]]
    validations: list[_Validation]


@dataclass
class _Binding:
    name: str
    policy_name: str
    actions: tuple[str, ...]
    match_resources: Mapping[str, Any] | None


class ValidatingAdmissionPolicies:
    """The policies and bindings of a cluster; `check` is what the API server's policy plugin decides."""

    def __init__(self, objects: Iterable[Mapping[str, Any]] = ()) -> None:
        self._env: Any = None
        self._policies: dict[str, _Policy] = {}
        self._bindings: dict[str, _Binding] = {}
        for obj in objects:
            self.add(obj)

    def add(self, obj: Mapping[str, Any]) -> None:
        """Load (or replace) one policy or binding; ValueError if it is invalid or uses what is not supported."""
        kind, name = obj.get("kind"), (obj.get("metadata") or {}).get("name", "")
        if obj.get("apiVersion") != "admissionregistration.k8s.io/v1" or kind not in (POLICY_KIND, BINDING_KIND):
            raise ValueError(f"not a {POLICY_KIND} or binding of admissionregistration.k8s.io/v1: {kind}/{name}")
        if not name:
            raise ValueError(f"{kind} without metadata.name")
        spec = obj.get("spec") or {}
        if kind == POLICY_KIND:
            self._policies[name] = self._load_policy(name, spec)
        else:
            self._bindings[name] = _load_binding(name, spec)

    def remove(self, kind: str, name: str) -> None:
        (self._policies if kind == POLICY_KIND else self._bindings).pop(name, None)

    def check(self, attrs: AdmissionAttributes) -> Denial | None:
        """None when every bound policy admits the request, else the first refusal. Never raises."""
        try:
            return self._check(attrs)
        except Exception as exc:  # a bug here must not take the fake API server down: refuse, say why
            return Denial(500, "InternalError", f"admission policy evaluation failed: {exc!r}")

    # ---- loading ----

    def _cel_env(self) -> Any:
        if self._env is None:
            from cel_expr_python import cel
            from cel_expr_python.ext import ext_strings

            # object/oldObject are dynamic in the API server too; request is typed there, dyn here.
            names = ("object", "oldObject", "request", "variables")
            self._env = cel.NewEnv(variables={n: cel.Type.DYN for n in names}, extensions=[ext_strings.ExtStrings()])
        return self._env

    def _load_policy(self, name: str, spec: Mapping[str, Any]) -> _Policy:
        for unsupported in ("paramKind", "auditAnnotations"):
            if spec.get(unsupported):
                raise ValueError(f"{POLICY_KIND} {name}: {unsupported} is not supported by this evaluator")
        constraints = spec.get("matchConstraints") or {}
        if not constraints.get("resourceRules"):
            raise ValueError(f"{POLICY_KIND} {name}: matchConstraints.resourceRules is required")
        _check_selectors(name, constraints)
        failure = spec.get("failurePolicy", "Fail")
        if failure not in ("Fail", "Ignore"):
            raise ValueError(f"{POLICY_KIND} {name}: failurePolicy {failure!r}")
        env = self._cel_env()
        conditions = [
            (c["name"], _Program(env, c["expression"], f"{name} matchConditions[{c['name']}]"))
            for c in spec.get("matchConditions") or []
        ]
        variables = [
            (v["name"], _Program(env, v["expression"], f"{name} variables[{v['name']}]"))
            for v in spec.get("variables") or []
        ]
        validations = []
        for i, v in enumerate(spec.get("validations") or []):
            reason = v.get("reason", "Invalid")
            if reason not in _REASON_CODES:
                raise ValueError(f"{POLICY_KIND} {name}: validations[{i}].reason {reason!r}")
            message_expression = v.get("messageExpression")
            validations.append(
                _Validation(
                    _Program(env, v["expression"], f"{name} validations[{i}]"),
                    v.get("message", ""),
                    _Program(env, message_expression, f"{name} validations[{i}].messageExpression")
                    if message_expression
                    else None,
                    reason,
                )
            )
        if not validations:
            raise ValueError(f"{POLICY_KIND} {name}: no validations")
        return _Policy(name, failure, constraints, conditions, variables, validations)

    # ---- checking ----

    def _check(self, attrs: AdmissionAttributes) -> Denial | None:
        for binding in self._bindings.values():
            policy = self._policies.get(binding.policy_name)
            if policy is None or "Deny" not in binding.actions:
                continue  # a binding to a missing policy is ignored; Warn and Audit never refuse
            if not _matches(policy.constraints, attrs, required=True):
                continue
            if binding.match_resources is not None and not _matches(binding.match_resources, attrs, required=False):
                continue
            refusal = _evaluate(policy, attrs)
            if refusal is not None:
                reason, text = refusal
                return _denial(attrs, policy.name, binding.name, reason, text)
        return None


def _load_binding(name: str, spec: Mapping[str, Any]) -> _Binding:
    if spec.get("paramRef"):
        raise ValueError(f"{BINDING_KIND} {name}: paramRef is not supported by this evaluator")
    policy = spec.get("policyName")
    actions = tuple(spec.get("validationActions") or ())
    if not policy or not actions or not set(actions) <= {"Deny", "Warn", "Audit"}:
        raise ValueError(f"{BINDING_KIND} {name}: needs policyName and validationActions of Deny, Warn, Audit")
    match_resources = spec.get("matchResources")
    if match_resources:
        _check_selectors(name, match_resources)
    return _Binding(name, policy, actions, match_resources)


def _check_selectors(name: str, match: Mapping[str, Any]) -> None:
    if match.get("namespaceSelector"):
        raise ValueError(f"{name}: a non-empty namespaceSelector is not supported by this evaluator")


def _evaluate(policy: _Policy, attrs: AdmissionAttributes) -> tuple[str, str] | None:
    """(reason, message) of the first validation that refuses, or None."""
    data: dict[str, Any] = {
        "object": attrs.obj,
        "oldObject": attrs.old_obj,
        "request": _request(attrs),
        "variables": {},
    }
    fail = policy.failure_policy == "Fail"
    errors = []
    for name, program in policy.conditions:
        value, error = program.eval(data)
        if error is not None:
            errors.append(f"matchCondition '{name}' resulted in error: {error}")
        elif value is not True:
            return None  # any false condition: the policy does not apply, errors or not
    if errors:
        return ("Invalid", "; ".join(errors)) if fail else None
    variables: dict[str, Any] = {}
    failed: dict[str, str] = {}  # variable -> the error at its root
    for name, program in policy.variables:
        root = _failed_reference(program.expression, failed)
        if root is None:
            value, error = program.eval({**data, "variables": variables})
            if error is None:
                variables[name] = value
                continue
            root = f"variable '{name}' resulted in error: {error}"
        failed[name] = root
    data["variables"] = variables
    for validation in policy.validations:
        expression = validation.program.expression
        value, error = None, _failed_reference(expression, failed)
        if error is None:
            value, error = validation.program.eval(data)
        if error is not None:
            if fail:
                return "Invalid", f"expression '{expression}' resulted in error: {error}"
            continue
        if value is not True:
            return validation.reason, _message(validation, data)
    return None


def _failed_reference(expression: str, failed: Mapping[str, str]) -> str | None:
    """The error of the first failed variable the expression names, as a lazy evaluation would meet it."""
    for name, error in failed.items():
        if re.search(rf"\bvariables\s*\.\s*{re.escape(name)}\b", expression):
            return error
    return None


def _message(validation: _Validation, data: Mapping[str, Any]) -> str:
    if validation.message_expression is not None:
        value, error = validation.message_expression.eval(data)
        if error is None and isinstance(value, str):
            text = value.strip()
            if text and len(text.encode()) <= MAX_MESSAGE_BYTES and "\n" not in text:
                return text
    if validation.message.strip():
        return validation.message.strip()
    return f"failed expression: {validation.program.expression.strip()}"


def _denial(attrs: AdmissionAttributes, policy: str, binding: str, reason: str, text: str) -> Denial:
    cause = f"ValidatingAdmissionPolicy '{policy}' with binding '{binding}' denied request: {text}"
    resource = f"{attrs.resource}.{attrs.group}" if attrs.group else attrs.resource
    target = f'{resource} "{attrs.name}"' if attrs.name else resource
    return Denial(_REASON_CODES.get(reason, 422), reason, f"{target} is forbidden: {cause}", cause)


def _request(attrs: AdmissionAttributes) -> dict[str, Any]:
    """The AdmissionRequest as the API server hands it to CEL: empty optional fields are absent."""
    user: dict[str, Any] = {}
    if attrs.user.username:
        user["username"] = attrs.user.username
    if attrs.user.uid:
        user["uid"] = attrs.user.uid
    if attrs.user.groups:
        user["groups"] = list(attrs.user.groups)
    if attrs.user.extra:
        user["extra"] = {k: list(v) for k, v in attrs.user.extra.items()}
    gvk = {"group": attrs.group, "version": attrs.version, "kind": attrs.kind}
    gvr = {"group": attrs.group, "version": attrs.version, "resource": attrs.resource}
    request: dict[str, Any] = {
        "uid": "",
        "kind": gvk,
        "resource": gvr,
        "requestKind": gvk,
        "requestResource": gvr,
        "operation": attrs.operation,
        "userInfo": user,
    }
    optional = {"name": attrs.name, "namespace": attrs.namespace}
    optional.update(subResource=attrs.subresource, requestSubResource=attrs.subresource)
    request.update({k: v for k, v in optional.items() if v})
    return request


# ---- matching: the rules of admissionregistration's MatchResources ----


def _matches(match: Mapping[str, Any], attrs: AdmissionAttributes, required: bool) -> bool:
    rules = match.get("resourceRules")
    if rules is None and required:
        return False
    if rules is not None and not any(_rule_matches(r, attrs) for r in rules):
        return False
    if any(_rule_matches(r, attrs) for r in match.get("excludeResourceRules") or []):
        return False
    selector = match.get("objectSelector")
    if selector:
        candidates = [o for o in (attrs.obj, attrs.old_obj) if o is not None]
        labels = [(o.get("metadata") or {}).get("labels") or {} for o in candidates]
        if not any(_selects(selector, lbl) for lbl in labels):
            return False
    return True


def _rule_matches(rule: Mapping[str, Any], attrs: AdmissionAttributes) -> bool:
    def listed(values: Iterable[str] | None, value: str) -> bool:
        values = list(values or [])
        return "*" in values or value in values

    if not listed(rule.get("operations"), attrs.operation):
        return False
    if not listed(rule.get("apiGroups"), attrs.group) or not listed(rule.get("apiVersions"), attrs.version):
        return False
    scope = rule.get("scope", "*")
    if (scope == "Cluster" and attrs.namespace) or (scope == "Namespaced" and not attrs.namespace):
        return False
    names = rule.get("resourceNames")
    if names and attrs.name not in names:
        return False
    wanted = f"{attrs.resource}/{attrs.subresource}" if attrs.subresource else attrs.resource
    for resource in rule.get("resources") or []:
        if resource in ("*/*", wanted):
            return True
        res, _, sub = resource.partition("/")
        if res == "*" and not sub and not attrs.subresource:
            return True  # "*": every resource, no subresource
        if res == "*" and sub and sub == attrs.subresource:
            return True  # "*/status"
        if res == attrs.resource and sub == "*" and attrs.subresource:
            return True  # "nodes/*": every subresource of nodes, not nodes itself
    return False


def _selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }.get(op)
        if not ok:
            return False
    return True
