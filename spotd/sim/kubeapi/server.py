"""FakeApiServer: the aiohttp application (authentication, authorization, discovery, resource routes,
fault injection, request and access logs) and the synchronous store helpers tests and the simulation use
without HTTP."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

from aiohttp import web

from . import errors, manifests, resources
from .auth import (
    ADMIN,
    AdmissionAttributes,
    Authenticator,
    UserInfo,
    freeze_extra,
    new_token,
    self_signed_certificate,
    service_account_user,
)
from .codec import clone
from .handlers import USER_KEY, ResourceHandlers, json_response, parse_path, query_flag
from .plugins import SYSTEM_PRIORITY_CLASSES
from .podgc import NodeLifecycle
from .policy import DisruptionController
from .rbac import AccessRecord, Authorizer, access_review_attributes, forbidden, request_attributes
from .store import Obj, Store, Subscription
from .watch import serve_watch

ADMIN_TOKEN = "fake-admin-token"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class RecordedRequest(NamedTuple):
    """One request as received; unpacks as (method, path, query, content_type, at).

    at: when it was received, on the monotonic clock (time.monotonic(), as the agent counts time)."""

    method: str
    path: str
    query: dict[str, str]
    content_type: str
    at: float = 0.0


@dataclass
class Fault:
    method: str
    path_regex: re.Pattern[str]
    status: int
    times: int
    body: dict[str, Any] | None
    delay: float
    retry_after: int | None
    query_regex: re.Pattern[str] | None = None

    def matches(self, method: str, path: str, query: str = "") -> bool:
        if self.query_regex is not None and self.query_regex.search(query) is None:
            return False
        return self.times > 0 and self.method in ("*", method) and self.path_regex.search(path) is not None


class FakeApiServer:
    """A Kubernetes API server good enough for kubectl, client-go style clients, the official Python
    client and lightkube: HTTPS on 127.0.0.1 with a self-signed certificate (kubectl sends credentials
    to TLS servers only; `tls=False` for plain HTTP, which lightkube and the official client still
    authenticate to), bearer tokens mapped to identities, RBAC from the Roles and bindings in its store,
    admission hooks.

    `ADMIN_TOKEN` (system:masters) is what `write_kubeconfig` writes unless given another token: a test
    runs a program as its real identity by handing it `service_account_token(...)` instead.
    Every authorization decision goes to `access_log` and to each set in `access_sinks` (a session-wide
    collector; `report_access=False` keeps a server out of them, for tests that provoke denials)."""

    access_sinks: ClassVar[list[set[AccessRecord]]] = []

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        termination_scale: float = 1.0,
        history_size: int = 20_000,
        bookmark_interval: float = 60.0,
        pdb_lag: float = 0.05,
        report_access: bool = True,
        tls: bool = True,
    ) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        self.bookmark_interval = bookmark_interval
        self.store = Store(history_size=history_size)
        self.disruption = DisruptionController(self.store, termination_scale, pdb_lag)
        self.node_lifecycle = NodeLifecycle(self.store, self.disruption)  # taint eviction and pod GC
        # ValidatingAdmissionPolicies stored in the fake apply to every request, as on a real server.
        self.admission_hooks: list[Callable[[AdmissionAttributes], None]] = [self._admit_by_policies]
        self._policies: Any = None
        self._policies_key: tuple[tuple[str, str, str], ...] = ()
        self.handlers = ResourceHandlers(self.store, self.disruption, self.admission_hooks)
        self.authenticator = Authenticator()
        self.authenticator.add(ADMIN_TOKEN, ADMIN)
        self.authorizer = Authorizer(self.store)
        self.access_log: set[AccessRecord] = set()
        self.report_access = report_access
        self.requests: list[RecordedRequest] = []
        self._faults: list[Fault] = []
        self._runner: web.AppRunner | None = None
        for ns in ("default", "kube-system", "kube-public", "kube-node-lease"):
            self.store.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        for priority_class in SYSTEM_PRIORITY_CLASSES:  # as kube-apiserver creates them at start
            self.store.create(priority_class)

    @property
    def pdb_lag(self) -> float:
        """Seconds between a change of a budget's pods and its status catching up (0: at once)."""
        return self.disruption.lag

    @pdb_lag.setter
    def pdb_lag(self, value: float) -> None:
        self.disruption.lag = value

    @property
    def termination_scale(self) -> float:
        return self.disruption.termination_scale

    @termination_scale.setter
    def termination_scale(self, value: float) -> None:
        self.disruption.termination_scale = value

    # ---- lifecycle ------------------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self._ssl_context())
        await site.start()
        if self.port == 0:
            self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        self.disruption.cancel_all()
        self.node_lifecycle.cancel_all()
        self.store.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        cert, key = self_signed_certificate()
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "tls.crt").write_bytes(cert)
            Path(tmp, "tls.key").write_bytes(key)
            context.load_cert_chain(Path(tmp, "tls.crt"), Path(tmp, "tls.key"))
        return context

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    @property
    def ca_certificate(self) -> bytes | None:
        """The serving certificate (PEM) a client trusts when `tls` is on."""
        return self_signed_certificate()[0] if self.tls else None

    def write_kubeconfig(self, path: str | Path, namespace: str = "default", token: str | None = None) -> Path:
        """A kubeconfig (JSON, which is YAML) for kubectl, lightkube and the official client, trusting the
        serving certificate and presenting `token` (default: the admin's, ADMIN_TOKEN)."""
        path = Path(path)
        cluster: dict[str, str] = {"server": self.url}
        if self.tls:
            cluster["certificate-authority-data"] = base64.b64encode(self_signed_certificate()[0]).decode()
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": cluster}],
            "users": [{"name": "fake", "user": {"token": token or ADMIN_TOKEN}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": namespace}}],
            "current-context": "fake",
            "preferences": {},
        }
        path.write_text(json.dumps(config, indent=2))
        return path

    # ---- identities ------------------------------------------------------------------------------------

    def add_token(
        self,
        token: str,
        username: str,
        groups: Iterable[str] = (),
        extra: Mapping[str, Iterable[str]] | None = None,
        uid: str = "",
    ) -> str:
        """Make `token` authenticate as this user (add system:authenticated to groups yourself, as a real
        authenticator does); returns the token."""
        return self.authenticator.add(token, UserInfo(username, uid, tuple(groups), freeze_extra(extra)))

    def service_account_token(
        self,
        namespace: str,
        name: str,
        node_name: str | None = None,
        pod_name: str | None = None,
    ) -> str:
        """A new token for system:serviceaccount:{namespace}:{name} (groups system:serviceaccounts,
        system:serviceaccounts:{namespace}, system:authenticated). Bound to a node (and a pod) it carries
        the node-name (node-uid when the Node exists), pod-name and pod-uid extra values and a credential-id,
        as a pod's projected token does. The ServiceAccount need not exist."""
        account = self.store.get("ServiceAccount", namespace, name)
        node = self.store.get("Node", "", node_name) if node_name else None
        pod = self.store.get("Pod", namespace, pod_name) if pod_name else None
        user = service_account_user(
            namespace,
            name,
            uid=(account or {}).get("metadata", {}).get("uid", ""),
            node_name=node_name,
            node_uid=(node or {}).get("metadata", {}).get("uid"),
            pod_name=pod_name,
            pod_uid=(pod or {}).get("metadata", {}).get("uid"),
        )
        return self.authenticator.add(new_token(), user)

    def user_for(self, token: str) -> UserInfo | None:
        return self.authenticator.user_for(token)

    def _admit_by_policies(self, attrs: AdmissionAttributes) -> None:
        from .admission import BINDING_KIND, POLICY_KIND, ValidatingAdmissionPolicies

        objs = [o for kind in (POLICY_KIND, BINDING_KIND) for o in self.store.iter_objects(kind)]
        if not objs:
            return
        key = tuple(sorted((o["kind"], o["metadata"]["name"], o["metadata"]["resourceVersion"]) for o in objs))
        if key != self._policies_key:  # compile the CEL once per change of the policies
            self._policies, self._policies_key = ValidatingAdmissionPolicies(objs), key
        denial = self._policies.check(attrs)
        if denial is not None:
            details = {"name": attrs.name, "kind": attrs.resource, "causes": [{"message": denial.cause}]}
            raise errors.ApiError(denial.code, denial.message, denial.reason, details=details)

    def load_manifests(self, paths: Iterable[str | Path] | str | Path) -> list[Obj]:
        """Apply YAML files (or a kustomization directory, as `kubectl apply -k`): create each object, or
        replace it when it exists. Kinds the fake does not serve (PrometheusRule, ...) are skipped, as
        `kubectl apply` without their CRD fails for them alone. Returns what was stored."""
        applied = []
        for doc in manifests.documents(paths):
            try:
                res = resources.resource_for_kind(doc.get("kind", ""))
            except KeyError:
                continue
            meta = doc.get("metadata") or {}
            if self.store.get(res.kind, self._ns(res.kind, meta.get("namespace")), meta.get("name", "")) is None:
                applied.append(self.create(doc))
            else:
                applied.append(self.update({**doc, "metadata": {**meta, "resourceVersion": None}}))
        return applied

    # ---- synchronous store helpers (no HTTP; results are copies) --------------------------------------

    def create(self, obj: Obj) -> Obj:
        """Store a new object as a POST would, except that a creationTimestamp you set is kept (to fake
        ages); 409 ApiError when it exists."""
        return clone(self.store.create(obj, keep_timestamp=True))

    def get(self, kind: str, name: str, namespace: str | None = None) -> Obj | None:
        if kind == "PodDisruptionBudget":
            self.disruption.before_read()
        obj = self.store.get(kind, self._ns(kind, namespace), name)
        return None if obj is None else clone(obj)

    def list(self, kind: str, namespace: str | None = None) -> list[Obj]:
        """All objects of a kind (in one namespace, or all), in the order the API lists them."""
        if kind == "PodDisruptionBudget":
            self.disruption.before_read()
        store = self.store
        return [clone(store.get(kind, *key)) for key in store.sorted_keys(kind, namespace)]

    def update(self, obj: Obj) -> Obj:
        """Replace the object (status included); 409 ApiError on a stale resourceVersion when one is given."""
        return clone(self.store.update(obj))

    def delete(
        self, kind: str, name: str, namespace: str | None = None, grace_period_seconds: int | None = None
    ) -> Obj:
        """Remove at once; for a Pod with grace_period_seconds, a graceful delete as over HTTP."""
        ns = self._ns(kind, namespace)
        if kind == "Pod" and grace_period_seconds is not None:
            return clone(self.disruption.delete_pod(ns, name, grace_period_seconds))
        return clone(self.store.remove(kind, ns, name))

    def subscribe(self) -> Subscription:
        """Every later change of every kind as (event_type, object); stop with .close()."""
        return Subscription(self.store)

    @staticmethod
    def _ns(kind: str, namespace: str | None) -> str:
        return (namespace or "default") if resources.is_namespaced(kind) else ""

    # ---- faults and the request log -------------------------------------------------------------------

    def inject_fault(
        self,
        method: str,
        path_regex: str,
        status: int,
        times: int = 1,
        body: dict[str, Any] | None = None,
        delay: float = 0.0,
        retry_after: int | None = None,
        query_regex: str | None = None,
    ) -> None:
        """The next `times` requests with this method ("*" for any) whose path (and query, when given) matches
        answer `status`, after `delay` seconds. status 0 holds them `delay` seconds, then answers them as
        usual (a slow API server: what the store holds may change meanwhile)."""
        self._faults.append(
            Fault(
                method.upper() if method != "*" else "*",
                re.compile(path_regex),
                status,
                times,
                body,
                delay,
                retry_after,
                re.compile(query_regex) if query_regex is not None else None,
            )
        )

    def break_watches(self, kind: str) -> int:
        """End every open watch stream of `kind`, as an API server restart or a dropped connection does;
        returns how many. Clients resume from their last version (add a fault to make the resume fail)."""
        return self.store.end_watches(kind)

    def clear_faults(self) -> None:
        self._faults.clear()

    def _record(self, record: AccessRecord) -> None:
        self.access_log.add(record)
        if self.report_access:
            for sink in self.access_sinks:
                sink.add(record)

    def _authorize(self, request: web.Request) -> UserInfo:
        """Authenticate (401) and authorize (403) a request, recording the decision."""
        path = request.path.rstrip("/") or "/"
        user = self.authenticator.authenticate(request.headers.get("Authorization"), path)
        attrs = request_attributes(request.method, path, request.query)
        allowed = self.authorizer.allows(user, attrs)
        self._record(attrs.record(user, allowed))
        if not allowed:
            raise forbidden(user, attrs)
        return user

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.requests.append(
            RecordedRequest(
                request.method,
                request.path,
                dict(request.query),
                request.headers.get("Content-Type", ""),
                time.monotonic(),
            )
        )
        try:
            request[USER_KEY] = self._authorize(request)
        except errors.ApiError as exc:
            return json_response(exc.status(), exc.code)
        fault = next((f for f in self._faults if f.matches(request.method, request.path, request.query_string)), None)
        if fault is not None:
            fault.times -= 1
            if fault.times <= 0:
                self._faults.remove(fault)
            if fault.delay:
                await asyncio.sleep(fault.delay)
            if fault.status == 0:
                return await self._answer(request, handler)
            details: dict[str, Any] | None = None
            headers = {}
            if fault.retry_after is not None:
                headers["Retry-After"] = str(fault.retry_after)
                details = {"retryAfterSeconds": fault.retry_after}
            body = fault.body or errors.status_body(
                fault.status, f"injected fault: HTTP {fault.status}", details=details
            )
            return json_response(body, fault.status, headers)
        return await self._answer(request, handler)

    @staticmethod
    async def _answer(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except errors.ApiError as exc:
            headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else {}
            return json_response(exc.status(), exc.code, headers)

    # ---- routing --------------------------------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.path.rstrip("/") or "/"
        if request.method == "GET":
            discovery = self._discovery(path)
            if discovery is not None:
                return discovery
        t = parse_path(path)
        if t is None:
            raise errors.ApiError(404, "the server could not find the requested resource")
        h, method = self.handlers, request.method
        if t.res.kind == "SelfSubjectAccessReview":
            if method == "POST" and t.name is None:
                return await self._access_review(request)
            raise errors.ApiError(405, f"the server does not allow this method on the requested resource ({method})")
        if t.name is None:
            if method == "GET":
                if t.legacy_watch or query_flag(request.query, "watch"):
                    return await serve_watch(h, request, t, self.bookmark_interval)
                return h.list(request, t)
            if method == "POST":
                return await h.create(request, t)
        elif t.subresource in ("eviction", "binding"):
            if method == "POST":
                return await (h.evict(request, t) if t.subresource == "eviction" else h.bind(request, t))
        elif t.legacy_watch and method == "GET":
            return await serve_watch(h, request, t, self.bookmark_interval)
        elif method == "GET":
            return h.get(request, t)
        elif method == "PUT":
            return await h.replace(request, t)
        elif method == "PATCH":
            return await h.patch(request, t)
        elif method == "DELETE" and t.subresource is None:
            return await h.delete(request, t)
        raise errors.ApiError(405, f"the server does not allow this method on the requested resource ({method})")

    async def _access_review(self, request: web.Request) -> web.Response:
        """SelfSubjectAccessReview (`kubectl auth can-i`): may the requester do this? Not recorded in the
        access log: a question, not a use."""
        body = await self.handlers.body(request)
        if not isinstance(body, dict):
            raise errors.bad_request("the body must be an object")
        attrs = access_review_attributes(body.get("spec") or {})
        allowed = self.authorizer.allows(request[USER_KEY], attrs)
        status: dict[str, Any] = {"allowed": allowed}
        if not allowed:
            status["reason"] = ""
        review = {
            **body,
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SelfSubjectAccessReview",
            "metadata": {"creationTimestamp": None, **(body.get("metadata") or {})},
            "status": status,
        }
        return json_response(review, 201)

    def _discovery(self, path: str) -> web.Response | None:
        if path == "/version":
            return json_response(resources.version_info())
        if path in ("/healthz", "/livez", "/readyz"):
            return web.Response(text="ok", content_type="text/plain")
        if path == "/api":
            return json_response(resources.api_versions(f"{self.host}:{self.port}"))
        if path == "/apis":
            return json_response(resources.api_group_list())
        parts = path.strip("/").split("/")
        if parts[0] == "api" and len(parts) == 2:
            found = resources.api_resource_list("", parts[1])
        elif parts[0] == "apis" and len(parts) == 2 and parts[1] in resources.GROUP_VERSIONS:
            return json_response(resources.api_group(parts[1]))
        elif parts[0] == "apis" and len(parts) == 3:
            found = resources.api_resource_list(parts[1], parts[2])
        else:
            return None
        if found is None:
            raise errors.ApiError(404, "the server could not find the requested resource")
        return json_response(found)
