"""Resource requests: path parsing, CRUD, PATCH, eviction and binding, each write passed to the admission
hooks before it is stored. Watches are in watch.py."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from . import errors, events, patch, plugins, protobuf, strategy
from .auth import ADMIN, AdmissionAttributes, UserInfo
from .codec import clone, dumps, loads
from .namespaces import NamespaceController
from .policy import DisruptionController, check_preconditions
from .resources import BY_PATH, EVENTS_V1_FIELD_ALIASES, Resource, field_labels
from .selectors import make_matcher, parse_field_selector, parse_label_selector, required_value
from .store import Matcher, Obj, Store, generate_name
from .tables import to_table, wants_table

JSON = "application/json"
# the authenticated UserInfo, set on each request by the server's middleware (RequestKey from aiohttp 3.12)
USER_KEY: Any = web.RequestKey("spotd.user", UserInfo) if hasattr(web, "RequestKey") else "spotd.user"
AdmissionHook = Callable[[AdmissionAttributes], None]


def json_response(body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    # exactly "application/json": lightkube only decodes error bodies with that exact Content-Type
    return web.Response(body=dumps(body), status=status, headers={"Content-Type": JSON, **(headers or {})})


@dataclass(frozen=True)
class RequestTarget:
    res: Resource
    namespace: str | None
    name: str | None
    subresource: str | None
    legacy_watch: bool = False


def parse_path(path: str) -> RequestTarget | None:
    """/api/v1/... or /apis/{group}/{version}/... into the served resource and its coordinates."""
    parts = [p for p in path.split("/") if p]
    if len(parts) >= 2 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    legacy_watch = bool(rest) and rest[0] == "watch"
    if legacy_watch:
        rest = rest[1:]
    namespace = None
    if len(rest) >= 3 and rest[0] == "namespaces":
        res = BY_PATH.get((group, version, rest[2]))
        if res is not None and res.namespaced:
            namespace, rest = rest[1], rest[2:]
    if not rest or len(rest) > 3:
        return None
    res = BY_PATH.get((group, version, rest[0]))
    if res is None or (namespace is None and res.namespaced and len(rest) > 1):
        return None
    name = rest[1] if len(rest) > 1 else None
    sub = rest[2] if len(rest) > 2 else None
    if sub is not None and sub not in res.subresources:
        return None
    return RequestTarget(res, namespace, name, sub, legacy_watch)


def query_flag(query: Mapping[str, str], name: str) -> bool:
    return query.get(name, "").lower() in ("true", "1")


def encode_continue(rv: int, last: tuple[str, str]) -> str:
    raw = json.dumps({"v": "meta.k8s.io/v1", "rv": rv, "start": f"{last[0]}/{last[1]}"}).encode()
    return base64.urlsafe_b64encode(raw).decode()


def decode_continue(token: str) -> tuple[str, str]:
    try:
        start = json.loads(base64.urlsafe_b64decode(token.encode()))["start"]
        ns, name = start.split("/", 1)
        return ns, name
    except (ValueError, KeyError, TypeError):
        raise errors.bad_request(f"continue key is not valid: {token}") from None


class ResourceHandlers:
    """One method per verb; each takes the parsed RequestTarget and returns a response."""

    def __init__(
        self, store: Store, disruption: DisruptionController, admission_hooks: list[AdmissionHook] | None = None
    ) -> None:
        self.store = store
        self.disruption = disruption
        self.admission_hooks = admission_hooks if admission_hooks is not None else []
        self.builtin = plugins.BuiltinAdmission(store)
        self.namespaces = NamespaceController(store, disruption)  # a namespace DELETE: Terminating, emptied

    def admit_builtin(self, t: RequestTarget, operation: str, obj: Obj | None, old: Obj | None = None) -> None:
        """kube-apiserver's own admission plugins (plugins.py), first: they may refuse or change `obj`."""
        self.builtin.admit(operation, t.res, t.subresource, t.namespace, t.name or "", obj, old)

    def admit(
        self,
        request: web.Request,
        t: RequestTarget,
        operation: str,
        obj: Obj | None,
        old: Obj | None,
        *,
        kind: str | None = None,
        dry_run: bool = False,
    ) -> None:
        """Every admission hook sees the write; the first to raise an ApiError refuses it."""
        if not self.admission_hooks:
            return
        user: UserInfo = request.get(USER_KEY, ADMIN)
        meta = (obj or old or {}).get("metadata") or {}
        attrs = AdmissionAttributes(
            operation=operation,
            group=t.res.group,
            version=t.res.version,
            resource=t.res.plural,
            subresource=t.subresource or "",
            kind=kind or t.res.kind,
            name=t.name or meta.get("name") or "",
            namespace=t.namespace or "",
            # as the request's API group spells them (events.k8s.io Events are stored in the core shape)
            obj=None if obj is None else clone(self.out(t.res, obj)),
            old_obj=None if old is None else clone(self.out(t.res, old)),
            user=user,
            dry_run=dry_run,
        )
        for hook in list(self.admission_hooks):
            hook(attrs)

    # ---- conversions ---------------------------------------------------------------------------------

    @staticmethod
    def out(res: Resource, obj: Obj) -> Obj:
        return events.from_core(obj) if res.group == "events.k8s.io" else obj

    @staticmethod
    def into(res: Resource, obj: Obj) -> Obj:
        if obj.get("kind") not in (None, "", res.kind):
            raise errors.bad_request(f"the kind in the data ({obj['kind']}) does not match the URL ({res.kind})")
        if res.group == "events.k8s.io":
            return events.to_core(obj)
        return {**obj, "apiVersion": res.api_version, "kind": res.kind}

    async def body(self, request: web.Request, *, optional: bool = False) -> Any:
        """The decoded request body (JSON, YAML for apply, or the protobuf kubectl sends); None when
        `optional` and empty."""
        raw = await request.read()
        if not raw:
            if optional:
                return None
            raise errors.bad_request("the request body is empty")
        if request.content_type == protobuf.PROTOBUF:
            return protobuf.decode(raw)
        try:
            return loads(raw)
        except ValueError:
            if request.content_type == patch.APPLY_PATCH:
                import yaml  # PyYAML: only server-side apply sends YAML

                return yaml.safe_load(raw)
            raise errors.bad_request("the request body is not valid JSON") from None

    def existing(self, t: RequestTarget) -> Obj:
        obj = self.store.get(t.res.kind, t.namespace or "", t.name or "")
        if obj is None:
            raise errors.not_found(t.res.group, t.res.plural, t.name or "")
        return obj

    def respond(self, request: web.Request, t: RequestTarget, obj: Obj, status: int = 200) -> web.Response:
        if wants_table(request.headers.get("Accept", "")):
            rv = obj["metadata"].get("resourceVersion", "")
            return json_response(to_table(t.res.kind, [obj], rv, request.query.get("includeObject", "Metadata")))
        return json_response(self.out(t.res, obj), status)

    # ---- read ----------------------------------------------------------------------------------------

    def get(self, request: web.Request, t: RequestTarget) -> web.Response:
        if t.res.kind == "PodDisruptionBudget":
            self.disruption.before_read()
        return self.respond(request, t, self.existing(t))

    def selection(self, t: RequestTarget, query: Mapping[str, str]) -> tuple[Matcher | None, str | None]:
        """The list/watch predicate, and the node name when pods are selected by spec.nodeName."""
        labels = parse_label_selector(query.get("labelSelector"))
        aliases = EVENTS_V1_FIELD_ALIASES if t.res.group == "events.k8s.io" else None
        fields = parse_field_selector(query.get("fieldSelector"), field_labels(t.res), aliases)
        if t.name is not None:  # legacy /watch/.../{name}
            fields = (*fields, *parse_field_selector(f"metadata.name={t.name}", {"metadata.name"}))
        node = required_value(fields, "spec.nodeName") if t.res.kind == "Pod" else None
        return make_matcher(labels, fields), node

    def list(self, request: web.Request, t: RequestTarget) -> web.Response:
        query = request.query
        matcher, node = self.selection(t, query)
        if t.res.kind == "PodDisruptionBudget":
            self.disruption.before_read()
        try:
            limit = max(0, int(query.get("limit") or 0))
        except ValueError:
            raise errors.bad_request(f"invalid limit: {query.get('limit')}") from None
        start = decode_continue(query["continue"]) if query.get("continue") else None
        if node:  # pods selected by spec.nodeName come from the node index, not a scan of every pod
            keys = self.store.pod_keys_on_node(node, t.namespace)
        else:
            keys = self.store.sorted_keys(t.res.kind, t.namespace)
        items: list[Obj] = []
        next_token, remaining = None, None
        i = self.store.keys_after(keys, start)
        while i < len(keys) and not (limit and len(items) >= limit):
            found = self.store.get(t.res.kind, *keys[i])
            i += 1
            if found is not None and (matcher is None or matcher(found)):
                items.append(found)
        if i < len(keys):
            next_token = encode_continue(self.store.rv, keys[i - 1])
            remaining = len(keys) - i if matcher is None else None
        rv = str(self.store.rv)
        if wants_table(request.headers.get("Accept", "")):
            return json_response(to_table(t.res.kind, items, rv, query.get("includeObject", "Metadata"), next_token))
        meta: dict[str, Any] = {"resourceVersion": rv}
        if next_token:
            meta["continue"] = next_token
            if remaining is not None:
                meta["remainingItemCount"] = remaining
        body = {
            "kind": f"{t.res.kind}List",
            "apiVersion": t.res.api_version,
            "metadata": meta,
            "items": [self.out(t.res, o) for o in items],
        }
        return json_response(body)

    # ---- write ---------------------------------------------------------------------------------------

    def _check_identity(self, t: RequestTarget, obj: Obj) -> None:
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise errors.bad_request("metadata must be an object")
        if t.res.namespaced:
            if meta.get("namespace") and meta["namespace"] != t.namespace:
                raise errors.bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request"
                )
            meta["namespace"] = t.namespace
        if t.name is not None and meta.get("name") and meta["name"] != t.name:
            raise errors.bad_request(
                f"the name of the object ({meta['name']}) does not match the name on the URL ({t.name})"
            )
        if t.name is not None:
            meta["name"] = t.name

    @staticmethod
    def _prepare_create(t: RequestTarget, obj: Obj) -> None:
        """The registry's BeforeCreate: the generated name, the defaults, validation (422); before the
        validating admission, which sees the generated name."""
        generate_name(t.res.kind, obj["metadata"])
        if t.res.kind == "Pod":
            strategy.default_pod(obj)
            strategy.validate_pod(obj)

    async def create(self, request: web.Request, t: RequestTarget) -> web.Response:
        if t.res.namespaced and t.namespace is None:
            raise errors.ApiError(405, "the server does not allow this method on the requested resource")
        body = await self.body(request)
        if not isinstance(body, dict):
            raise errors.bad_request("the body must be an object")
        obj = self.into(t.res, body)
        self._check_identity(t, obj)
        dry_run = request.query.get("dryRun") == "All"
        self.admit_builtin(t, "CREATE", obj)
        self._prepare_create(t, obj)
        self.admit(request, t, "CREATE", obj, None, dry_run=dry_run)
        if dry_run:
            return json_response(self.out(t.res, obj), 201)
        created = self.store.create(obj)
        return json_response(self.out(t.res, created), 201)

    def _merge_subresource(self, t: RequestTarget, old: Obj, new: Obj) -> Obj:
        """Status writes change only status (and metadata); main writes never change status."""
        if not t.res.has_status:
            return new
        if t.subresource == "status":
            return {
                **{k: v for k, v in old.items() if k not in ("status", "metadata")},
                "metadata": new.get("metadata", old["metadata"]),
                "status": new.get("status", {}),
            }
        merged = {k: v for k, v in new.items() if k != "status"}
        if "status" in old:
            merged["status"] = old["status"]
        return merged

    def _write(self, request: web.Request, t: RequestTarget, old: Obj, new: Obj) -> web.Response:
        new = self._merge_subresource(t, old, new)
        new.setdefault("metadata", {})
        # identity cannot change through an update
        for key in ("name", "namespace", "uid"):
            if key in old["metadata"]:
                new["metadata"][key] = old["metadata"][key]
        dry_run = request.query.get("dryRun") == "All"
        self.admit_builtin(t, "UPDATE", new, old)
        self.admit(request, t, "UPDATE", new, old, dry_run=dry_run)
        if dry_run:
            return json_response(self.out(t.res, new))
        stored = self.store.update(new)
        return self.respond(request, t, stored)

    async def replace(self, request: web.Request, t: RequestTarget) -> web.Response:
        body = await self.body(request)
        if not isinstance(body, dict):
            raise errors.bad_request("the body must be an object")
        obj = self.into(t.res, body)
        self._check_identity(t, obj)
        old = self.existing(t)
        return self._write(request, t, old, obj)

    async def patch(self, request: web.Request, t: RequestTarget) -> web.Response:
        body = await self.body(request)
        content_type = request.content_type
        old = self.store.get(t.res.kind, t.namespace or "", t.name or "")
        if old is None:
            if content_type == patch.APPLY_PATCH and isinstance(body, dict):
                obj = self.into(t.res, body)
                self._check_identity(t, obj)
                self.admit_builtin(t, "CREATE", obj)
                self._prepare_create(t, obj)
                self.admit(request, t, "CREATE", obj, None)
                return json_response(self.out(t.res, self.store.create(obj)), 201)
            raise errors.not_found(t.res.group, t.res.plural, t.name or "")
        current = self.out(t.res, old)
        if content_type != patch.JSON_PATCH and not isinstance(body, dict):
            raise errors.bad_request("the patch must be a JSON object")
        patched = self.into(t.res, patch.apply_patch(content_type, current, body))
        if not isinstance(patched.get("metadata"), dict):
            patched["metadata"] = {}
        wanted = patched["metadata"].get("resourceVersion")
        if wanted and wanted != old["metadata"]["resourceVersion"]:
            raise errors.conflict(t.res.group, t.res.plural, t.name or "")
        return self._write(request, t, old, patched)

    async def delete(self, request: web.Request, t: RequestTarget) -> web.Response:
        options = await self.body(request, optional=True) or {}
        if not isinstance(options, dict):
            raise errors.bad_request("the body must be a DeleteOptions object")
        grace = request.query.get("gracePeriodSeconds", options.get("gracePeriodSeconds"))
        try:
            grace_seconds = None if grace is None else int(grace)
        except ValueError:
            raise errors.bad_request(f"invalid gracePeriodSeconds: {grace}") from None
        dry_run = request.query.get("dryRun") == "All" or options.get("dryRun") == ["All"]
        old = self.existing(t)
        check_preconditions(old, options, t.res.plural, t.res.group)
        self.admit_builtin(t, "DELETE", None, old)
        self.admit(request, t, "DELETE", None, old, dry_run=dry_run)
        if t.res.kind == "Pod":
            obj = self.disruption.delete_pod(t.namespace or "", t.name or "", grace_seconds, dry_run)
        elif t.res.kind == "Namespace" and not dry_run:
            obj = self.namespaces.mark(t.name or "")
        elif dry_run:
            obj = old
        else:
            obj = self.store.delete(t.res.kind, t.namespace or "", t.name or "")
        return json_response(self.out(t.res, obj))

    # ---- pod subresources ----------------------------------------------------------------------------

    async def evict(self, request: web.Request, t: RequestTarget) -> web.Response:
        body = await self.body(request)
        if not isinstance(body, dict) or body.get("kind", "Eviction") != "Eviction":
            raise errors.bad_request("the body must be a policy/v1 Eviction")
        dry_run = request.query.get("dryRun") == "All" or (body.get("deleteOptions") or {}).get("dryRun") == ["All"]
        self.existing(t)
        self.admit_builtin(t, "CREATE", body)
        self.admit(request, t, "CREATE", body, None, kind="Eviction", dry_run=dry_run)
        self.disruption.evict(t.namespace or "", t.name or "", body, dry_run)
        return json_response(errors.status_body(201, ""), 201)

    async def bind(self, request: web.Request, t: RequestTarget) -> web.Response:
        body = await self.body(request)
        node = (body.get("target") or {}).get("name") if isinstance(body, dict) else None
        if not node:
            raise errors.bad_request("binding target name is required")
        pod = self.existing(t)
        self.admit_builtin(t, "CREATE", body)
        self.admit(request, t, "CREATE", body, None, kind="Binding")
        if pod.get("spec", {}).get("nodeName"):
            raise errors.conflict(
                "",
                "pods/binding",
                t.name or "",
                f'pod {t.name} is already assigned to node "{pod["spec"]["nodeName"]}"',
            )
        new = clone(pod)
        new["spec"]["nodeName"] = node
        conditions = [c for c in new.setdefault("status", {}).get("conditions", []) if c.get("type") != "PodScheduled"]
        new["status"]["conditions"] = [*conditions, {"type": "PodScheduled", "status": "True"}]
        self.store.update(new, check_version=False)
        return json_response(errors.status_body(201, ""), 201)
