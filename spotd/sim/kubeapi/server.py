"""FakeApiServer: the aiohttp application (discovery, resource routes, fault injection, request log)
and the synchronous store helpers tests and the simulation use without HTTP."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from aiohttp import web

from . import errors, resources
from .codec import clone
from .handlers import ResourceHandlers, json_response, parse_path, query_flag
from .policy import Disruption
from .store import Obj, Store, Subscription
from .watch import serve_watch

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class RecordedRequest(NamedTuple):
    """One request as received; unpacks as (method, path, query, content_type)."""

    method: str
    path: str
    query: dict[str, str]
    content_type: str


@dataclass
class Fault:
    method: str
    path_regex: re.Pattern[str]
    status: int
    times: int
    body: dict[str, Any] | None
    delay: float
    retry_after: int | None

    def matches(self, method: str, path: str) -> bool:
        return self.times > 0 and self.method in ("*", method) and self.path_regex.search(path) is not None


class FakeApiServer:
    """A Kubernetes API server good enough for kubectl, client-go style clients, the official Python
    client and lightkube: plain HTTP on 127.0.0.1, no authentication (bearer tokens are ignored)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        termination_scale: float = 1.0,
        history_size: int = 20_000,
        bookmark_interval: float = 60.0,
    ) -> None:
        self.host = host
        self.port = port
        self.bookmark_interval = bookmark_interval
        self.store = Store(history_size=history_size)
        self.disruption = Disruption(self.store, termination_scale)
        self.handlers = ResourceHandlers(self.store, self.disruption)
        self.requests: list[RecordedRequest] = []
        self._faults: list[Fault] = []
        self._runner: web.AppRunner | None = None
        for ns in ("default", "kube-system", "kube-public", "kube-node-lease"):
            self.store.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})

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
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        if self.port == 0:
            self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        self.disruption.cancel_all()
        self.store.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def write_kubeconfig(self, path: str | Path, namespace: str = "default") -> Path:
        """A kubeconfig (JSON, which is YAML) for kubectl, lightkube and the official client."""
        path = Path(path)
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": "fake-token"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": namespace}}],
            "current-context": "fake",
            "preferences": {},
        }
        path.write_text(json.dumps(config, indent=2))
        return path

    # ---- synchronous store helpers (no HTTP; results are copies) --------------------------------------

    def create(self, obj: Obj) -> Obj:
        """Store a new object as a POST would, except that a creationTimestamp you set is kept (to fake
        ages); 409 ApiError when it exists."""
        return clone(self.store.create(obj, keep_timestamp=True))

    def get(self, kind: str, name: str, namespace: str | None = None) -> Obj | None:
        if kind == "PodDisruptionBudget":
            self.disruption.flush()
        obj = self.store.get(kind, self._ns(kind, namespace), name)
        return None if obj is None else clone(obj)

    def list(self, kind: str, namespace: str | None = None) -> list[Obj]:
        """All objects of a kind (in one namespace, or all), in the order the API lists them."""
        if kind == "PodDisruptionBudget":
            self.disruption.flush()
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
    ) -> None:
        """The next `times` requests with this method ("*" for any) whose path matches answer `status`."""
        self._faults.append(
            Fault(
                method.upper() if method != "*" else "*",
                re.compile(path_regex),
                status,
                times,
                body,
                delay,
                retry_after,
            )
        )

    def clear_faults(self) -> None:
        self._faults.clear()

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.requests.append(
            RecordedRequest(request.method, request.path, dict(request.query), request.headers.get("Content-Type", ""))
        )
        fault = next((f for f in self._faults if f.matches(request.method, request.path)), None)
        if fault is not None:
            fault.times -= 1
            if fault.times <= 0:
                self._faults.remove(fault)
            if fault.delay:
                await asyncio.sleep(fault.delay)
            details: dict[str, Any] | None = None
            headers = {}
            if fault.retry_after is not None:
                headers["Retry-After"] = str(fault.retry_after)
                details = {"retryAfterSeconds": fault.retry_after}
            body = fault.body or errors.status_body(
                fault.status, f"injected fault: HTTP {fault.status}", details=details
            )
            return json_response(body, fault.status, headers)
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
