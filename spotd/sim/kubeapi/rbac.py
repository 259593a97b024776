"""Authorization as the real RBAC authorizer decides it: the request's attributes (verb, API group,
resource, subresource, name, namespace or path) parsed as the real RequestInfoFactory parses a URL, and
the rules of the Roles and ClusterRoles the user's bindings in the store grant, plus the bootstrap
policy every cluster carries (discovery, health, self reviews for everyone authenticated; all for
system:masters)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from . import errors
from .auth import AUTHENTICATED, MASTERS, UNAUTHENTICATED, UserInfo
from .store import Obj, Store

RBAC_GROUP = "rbac.authorization.k8s.io"
_METHOD_VERBS = {"POST": "create", "GET": "get", "HEAD": "get", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}
_NAMESPACE_SUBRESOURCES = frozenset({"status", "finalize"})


class AccessRecord(NamedTuple):
    """One authorization decision; `resource` is the path for a non-resource request (verb get, ...)."""

    username: str
    verb: str
    api_group: str
    resource: str
    subresource: str
    namespace: str  # "" at the cluster scope
    allowed: bool


@dataclass(frozen=True)
class RequestAttributes:
    """authorizer.Attributes: a resource request (group, resource, ...) or a non-resource one (path)."""

    verb: str
    resource_request: bool
    api_group: str = ""
    api_version: str = ""
    resource: str = ""
    subresource: str = ""
    name: str = ""
    namespace: str = ""
    path: str = ""

    def record(self, user: UserInfo, allowed: bool) -> AccessRecord:
        if not self.resource_request:
            return AccessRecord(user.username, self.verb, "", self.path, "", "", allowed)
        return AccessRecord(
            user.username, self.verb, self.api_group, self.resource, self.subresource, self.namespace, allowed
        )


def _exact_name(field_selector: str) -> str:
    """metadata.name from a field selector requiring it exactly, else ""."""
    for term in field_selector.split(","):
        key, op, value = term.partition("==") if "==" in term else term.partition("=")
        if op and key.strip() == "metadata.name" and not key.strip().endswith("!"):
            return value.strip()
    return ""


def request_attributes(method: str, path: str, query: Mapping[str, str]) -> RequestAttributes:
    """What RBAC is asked about a request, parsed from the URL alone as RequestInfoFactory does (whether
    the resource is served or not)."""
    method = method.upper()
    parts = [p for p in path.split("/") if p]
    if parts[:1] == ["api"] and len(parts) >= 3:
        group, version, rest = "", parts[1], parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 4:
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return RequestAttributes(method.lower() if method != "HEAD" else "get", False, path="/" + "/".join(parts))
    verb = _METHOD_VERBS.get(method, method.lower())
    if rest[0] == "watch" and len(rest) > 1:
        verb, rest = "watch", rest[1:]
    namespace = ""
    if rest[0] == "namespaces" and len(rest) > 1:
        namespace = rest[1]
        if len(rest) > 2 and rest[2] not in _NAMESPACE_SUBRESOURCES:
            rest = rest[2:]
    resource = rest[0]
    name = rest[1] if len(rest) >= 2 else ""
    subresource = rest[2] if len(rest) >= 3 else ""
    if not name and verb == "get":
        verb = "watch" if query.get("watch", "").lower() in ("true", "1") else "list"
        name = _exact_name(query.get("fieldSelector", ""))
    elif not name and verb == "watch":
        name = _exact_name(query.get("fieldSelector", ""))
    if not name and verb == "delete":
        verb = "deletecollection"
    return RequestAttributes(verb, True, group, version, resource, subresource, name, namespace)


# ---- rules ------------------------------------------------------------------------------------------


def _has(values: Iterable[str], wanted: str) -> bool:
    values = list(values or ())
    return "*" in values or wanted in values


def _resource_matches(rule_resources: Iterable[str], resource: str, subresource: str) -> bool:
    combined = f"{resource}/{subresource}" if subresource else resource
    for r in rule_resources or ():
        if r in ("*", combined):
            return True
        if subresource and (r == f"{resource}/*" or r == f"*/{subresource}"):
            return True
    return False


def _path_matches(rule_urls: Iterable[str], path: str) -> bool:
    for url in rule_urls or ():
        if url == "*" or url == path or (url.endswith("*") and path.startswith(url[:-1])):
            return True
    return False


def rule_allows(rule: Mapping[str, Any], attrs: RequestAttributes) -> bool:
    """One PolicyRule against the request (rbac/v1 RuleAllows)."""
    if not _has(rule.get("verbs") or (), attrs.verb):
        return False
    if not attrs.resource_request:
        return _path_matches(rule.get("nonResourceURLs") or (), attrs.path)
    if not _has(rule.get("apiGroups") or (), attrs.api_group):
        return False
    if not _resource_matches(rule.get("resources") or (), attrs.resource, attrs.subresource):
        return False
    names = rule.get("resourceNames") or ()
    return not names or attrs.name in names


# The bootstrap ClusterRoles every cluster binds to every authenticated user (system:discovery,
# system:basic-user, system:public-info-viewer); the last also to unauthenticated requests.
_HEALTH = ["/healthz", "/livez", "/readyz", "/version", "/version/"]
BOOTSTRAP_AUTHENTICATED: tuple[dict[str, Any], ...] = (
    {"verbs": ["get"], "nonResourceURLs": ["/api", "/api/*", "/apis", "/apis/*", "/openapi", "/openapi/*", *_HEALTH]},
    {
        "verbs": ["create"],
        "apiGroups": ["authorization.k8s.io"],
        "resources": ["selfsubjectaccessreviews", "selfsubjectrulesreviews"],
    },
    {"verbs": ["create"], "apiGroups": ["authentication.k8s.io"], "resources": ["selfsubjectreviews"]},
)
BOOTSTRAP_UNAUTHENTICATED: tuple[dict[str, Any], ...] = ({"verbs": ["get"], "nonResourceURLs": _HEALTH},)


def _subject_matches(subject: Mapping[str, Any], user: UserInfo, binding_namespace: str) -> bool:
    kind, name = subject.get("kind"), subject.get("name")
    if kind == "User":
        return name == user.username
    if kind == "Group":
        return name in user.groups
    if kind == "ServiceAccount":
        account = user.service_account
        return account is not None and account == (subject.get("namespace") or binding_namespace, name)
    return False


class Authorizer:
    """RBAC over the Roles, ClusterRoles and bindings stored in the fake, read afresh at every request
    (as the real authorizer's informers see each write at once, give or take milliseconds)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def _role_rules(self, kind: str, name: str, namespace: str) -> list[Obj]:
        role = self.store.get(kind, namespace if kind == "Role" else "", name)
        return list((role or {}).get("rules") or [])

    def rules_for(self, user: UserInfo, namespace: str) -> Iterator[Mapping[str, Any]]:
        """Every rule granted to the user that applies in `namespace` ("" for cluster-scoped requests)."""
        if UNAUTHENTICATED in user.groups:
            yield from BOOTSTRAP_UNAUTHENTICATED
        if AUTHENTICATED in user.groups:
            yield from BOOTSTRAP_AUTHENTICATED
        for binding in self.store.iter_objects("ClusterRoleBinding"):
            if any(_subject_matches(s, user, "") for s in binding.get("subjects") or []):
                ref = binding.get("roleRef") or {}
                yield from self._role_rules("ClusterRole", ref.get("name", ""), "")
        if namespace:
            for binding in self.store.iter_objects("RoleBinding", namespace):
                if any(_subject_matches(s, user, namespace) for s in binding.get("subjects") or []):
                    ref = binding.get("roleRef") or {}
                    yield from self._role_rules(ref.get("kind", "Role"), ref.get("name", ""), namespace)

    def allows(self, user: UserInfo, attrs: RequestAttributes) -> bool:
        if MASTERS in user.groups:
            return True
        namespace = attrs.namespace if attrs.resource_request else ""
        return any(rule_allows(rule, attrs) for rule in self.rules_for(user, namespace))


def forbidden(user: UserInfo, attrs: RequestAttributes) -> errors.ApiError:
    """403 worded as the real server's WithAuthorization filter words it."""
    if not attrs.resource_request:
        return errors.ApiError(403, f'forbidden: User "{user.username}" cannot {attrs.verb} path "{attrs.path}"')
    resource = f"{attrs.resource}/{attrs.subresource}" if attrs.subresource else attrs.resource
    where = f'in the namespace "{attrs.namespace}"' if attrs.namespace else "at the cluster scope"
    why = f'User "{user.username}" cannot {attrs.verb} resource "{resource}" in API group "{attrs.api_group}" {where}'
    qualified = f"{attrs.resource}.{attrs.api_group}" if attrs.api_group else attrs.resource
    message = f'{qualified} "{attrs.name}" is forbidden: {why}' if attrs.name else f"{qualified} is forbidden: {why}"
    details: dict[str, Any] = {"kind": attrs.resource}
    if attrs.name:
        details["name"] = attrs.name
    if attrs.api_group:
        details["group"] = attrs.api_group
    return errors.ApiError(403, message, details=details)


def access_review_attributes(spec: Mapping[str, Any]) -> RequestAttributes:
    """The attributes a SelfSubjectAccessReview asks about."""
    res = spec.get("resourceAttributes")
    if isinstance(res, Mapping):
        return RequestAttributes(
            str(res.get("verb", "")),
            True,
            str(res.get("group", "")),
            str(res.get("version", "")),
            str(res.get("resource", "")),
            str(res.get("subresource", "")),
            str(res.get("name", "")),
            str(res.get("namespace", "")),
        )
    non = spec.get("nonResourceAttributes")
    if isinstance(non, Mapping):
        return RequestAttributes(str(non.get("verb", "")), False, path=str(non.get("path", "")))
    raise errors.invalid(
        "SelfSubjectAccessReview",
        "",
        "spec.resourceAttributes",
        "Required value: exactly one of nonResourceAttributes or resourceAttributes must be specified",
        "authorization.k8s.io",
    )
