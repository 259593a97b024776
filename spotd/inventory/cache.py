"""A watch-based inventory of nodes and pods, kept slim enough for 5,000 nodes and 150,000 pods.

List once (paged), then watch from the list's resourceVersion; on 410 Gone relist. The raw JSON API is
decoded with msgspec into the structs of spotd.kube.records, which name only the fields read, and each
pod is kept as a small slotted record from there, so memory grows with what the policy needs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import httpx
import msgspec

from spotd.common import log as spotd_log
from spotd.common.metrics import LOOP_ERRORS
from spotd.inventory.metrics import INVENTORY_EVENTS, INVENTORY_RELISTS
from spotd.inventory.records import (
    POD_UNSCHEDULABLE,
    NodeExtra,
    NodeInfo,
    NodePods,
    PendingPod,
    PodRecord,
    RawEvent,
    RawList,
    RawNode,
    RawPod,
    RawStatusObject,
    node_extra,
    node_info,
    pod_record,
    summarize,
)
from spotd.kube.client import http_of

_log = spotd_log.get("spotd.inventory")


class Malformed(ValueError):
    pass


class Gone(Exception):
    """The watch's resourceVersion is too old (410): relist."""


NodeHook = Callable[[NodeInfo | None, NodeInfo | None], None]


class Inventory:
    """Nodes and pods of the cluster, from one list and a watch each.

    `synced` is set once both first lists are in. `on_node` is called (old, new) on every node change
    after that; the controller turns a new Ready Spot node into a LAUNCHED signal.
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        capacity_label: str | None = None,
        page_size: int = 500,
        watch_timeout: int = 290,
        on_node: NodeHook | None = None,
        retry_delay: float = 1.0,
    ) -> None:
        self._http = http
        self._capacity_label = capacity_label
        self._page_size = page_size
        self._watch_timeout = watch_timeout
        self._retry_delay = retry_delay
        self.on_node = on_node
        self.nodes: dict[str, NodeInfo] = {}
        self.node_extra: dict[str, NodeExtra] = {}
        self.by_instance: dict[str, str] = {}  # EC2 instance id (from spec.providerID) -> node name
        self.pods: dict[tuple[str, str], PodRecord] = {}
        self._by_node: dict[str, set[tuple[str, str]]] = {}
        self._unschedulable: set[tuple[str, str]] = set()
        self._summaries: dict[str, NodePods] = {}
        self.nodes_synced = asyncio.Event()
        self.pods_synced = asyncio.Event()
        self.relists = 0
        self._relisting: set[str] = set()
        self.last_contact = 0.0  # wall time of the last list, watch start or watch event (0: never)

    @classmethod
    def from_client(cls, client: Any, **kw: Any) -> Inventory:
        return cls(http_of(client), **kw)

    @property
    def synced(self) -> bool:
        return self.nodes_synced.is_set() and self.pods_synced.is_set() and not self._relisting

    async def wait_synced(self) -> None:
        await self.nodes_synced.wait()
        await self.pods_synced.wait()

    # --- reading --------------------------------------------------------------------------------------

    @property
    def pending_unschedulable(self) -> int:
        return len(self._unschedulable)

    @property
    def pending_pods(self) -> list[PendingPod]:
        """The pods Pending for lack of capacity, with their node constraints."""
        out = []
        for key in self._unschedulable:
            pod = self.pods.get(key)
            if pod is not None and pod.pending is not None:
                out.append(pod.pending)
        return out

    def node_of_instance(self, instance_id: str) -> NodeInfo | None:
        """The node whose spec.providerID names this instance, through the index (no scan)."""
        name = self.by_instance.get(instance_id)
        return self.nodes.get(name) if name else None

    def pods_of(self, node: str) -> list[PodRecord]:
        return [self.pods[k] for k in self._by_node.get(node, ()) if k in self.pods]

    def node_pods(self, node: str) -> NodePods:
        """The node's pod summary, cached until one of its pods changes."""
        found = self._summaries.get(node)
        if found is None:
            found = self._summaries[node] = summarize(self.pods_of(node))
        return found

    # --- applying -------------------------------------------------------------------------------------

    def _put_pod(self, rec: PodRecord) -> None:
        key = (rec.namespace, rec.name)
        self._drop_pod(key)
        self.pods[key] = rec
        if rec.node:
            self._by_node.setdefault(rec.node, set()).add(key)
            self._summaries.pop(rec.node, None)
        if rec.flags & POD_UNSCHEDULABLE:
            self._unschedulable.add(key)

    def _drop_pod(self, key: tuple[str, str]) -> None:
        old = self.pods.pop(key, None)
        if old is None:
            return
        if old.node:
            keys = self._by_node.get(old.node)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_node[old.node]
            self._summaries.pop(old.node, None)
        self._unschedulable.discard(key)

    def apply_pod(self, kind: str, raw: bytes | msgspec.Raw) -> str:
        try:
            pod = msgspec.json.decode(raw, type=RawPod)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise Malformed(f"pod: {exc}") from None
        if not pod.metadata.name or not pod.metadata.namespace:
            raise Malformed("pod without metadata.name or namespace")
        if kind == "DELETED":
            self._drop_pod((pod.metadata.namespace, pod.metadata.name))
        else:
            self._put_pod(pod_record(pod))
        return pod.metadata.resourceVersion

    def apply_node(self, kind: str, raw: bytes | msgspec.Raw) -> str:
        try:
            node = msgspec.json.decode(raw, type=RawNode)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise Malformed(f"node: {exc}") from None
        name = node.metadata.name
        if not name:
            raise Malformed("node without metadata.name")
        old = self.nodes.get(name)
        new: NodeInfo | None = None
        if old is not None and old.instance_id and self.by_instance.get(old.instance_id) == name:
            del self.by_instance[old.instance_id]
        if kind == "DELETED":
            self.nodes.pop(name, None)
            self.node_extra.pop(name, None)
        else:
            new = node_info(node, self._capacity_label)
            self.nodes[name] = new
            self.node_extra[name] = node_extra(node)
            if new.instance_id:
                self.by_instance[new.instance_id] = name
        if self.on_node is not None and self.nodes_synced.is_set() and not self._relisting and old != new:
            self.on_node(old, new)
        return node.metadata.resourceVersion

    # --- the loops -------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Keep both kinds in sync until cancelled."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._follow("node", "/api/v1/nodes", self.nodes_synced))
            group.create_task(self._follow("pod", "/api/v1/pods", self.pods_synced))

    async def _follow(self, kind: str, path: str, synced: asyncio.Event) -> None:
        version = ""
        while True:
            try:
                if not version:
                    version = await self._relist(kind, path)
                    synced.set()
                version = await self._watch(kind, path, version)
            except Gone:
                INVENTORY_RELISTS.labels(kind).inc()
                _log.info("watch_expired", kind=kind, version=version)
                version = ""
            except (httpx.HTTPError, Malformed, OSError) as exc:
                _log.warning("watch_error", kind=kind, error=repr(exc))
                await asyncio.sleep(self._retry_delay)
            except Exception as exc:  # a bug in one event must not end the inventory: relist and carry on
                LOOP_ERRORS.labels(f"inventory_{kind}").inc()
                _log.exception("watch_failed", kind=kind, error=repr(exc))
                version = ""
                await asyncio.sleep(self._retry_delay)

    async def _relist(self, kind: str, path: str) -> str:
        """A full, paged list; the maps are replaced only once the whole list is in."""
        apply = self.apply_pod if kind == "pod" else self.apply_node
        saved = self._swap_out(kind)
        params: dict[str, str | int] = {"limit": self._page_size}
        INVENTORY_RELISTS.labels(kind).inc()
        self._relisting.add(kind)
        try:
            while True:
                resp = await self._http.get(path, params=params)
                if resp.status_code == 410:  # the continue token expired: start again
                    self._swap_out(kind)
                    params = {"limit": self._page_size}
                    continue
                resp.raise_for_status()
                try:
                    page = msgspec.json.decode(resp.content, type=RawList)
                except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                    raise Malformed(f"{kind} list: {exc}") from None
                for item in page.items or ():
                    try:
                        apply("ADDED", item)
                    except Malformed as exc:
                        INVENTORY_EVENTS.labels(kind, "malformed").inc()
                        _log.warning("inventory_malformed", kind=kind, error=str(exc))
                if not page.metadata.cont:
                    break
                params = {"limit": self._page_size, "continue": page.metadata.cont}
        except BaseException:
            self._restore(kind, saved)
            raise
        finally:
            self._relisting.discard(kind)
        self.relists += 1
        self.last_contact = time.time()
        if kind == "node" and self.on_node is not None and self.nodes_synced.is_set():
            old_nodes = saved[0]
            for name in old_nodes.keys() | self.nodes.keys():
                if old_nodes.get(name) != self.nodes.get(name):
                    self.on_node(old_nodes.get(name), self.nodes.get(name))
        _log.info("inventory_listed", kind=kind, count=len(self.pods if kind == "pod" else self.nodes))
        return page.metadata.resourceVersion

    def _swap_out(self, kind: str) -> tuple[Any, ...]:
        if kind == "pod":
            saved: tuple[Any, ...] = (self.pods, self._by_node, self._unschedulable, self._summaries)
            self.pods, self._by_node, self._unschedulable, self._summaries = {}, {}, set(), {}
        else:
            saved = (self.nodes, self.node_extra, self.by_instance)
            self.nodes, self.node_extra, self.by_instance = {}, {}, {}
        return saved

    def _restore(self, kind: str, saved: tuple[Any, ...]) -> None:
        if kind == "pod":
            self.pods, self._by_node, self._unschedulable, self._summaries = saved
        else:
            self.nodes, self.node_extra, self.by_instance = saved

    async def _watch(self, kind: str, path: str, version: str) -> str:
        """Follow one watch until the server closes it; returns the last resourceVersion seen."""
        apply = self.apply_pod if kind == "pod" else self.apply_node
        params = {
            "watch": "true",
            "resourceVersion": version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(self._watch_timeout),
        }
        timeout = httpx.Timeout(10.0, read=self._watch_timeout + 30.0)
        async with self._http.stream("GET", path, params=params, timeout=timeout) as resp:
            if resp.status_code == 410:
                raise Gone()
            resp.raise_for_status()
            self.last_contact = time.time()
            async for line in resp.aiter_lines():
                self.last_contact = time.time()
                if not line.strip():
                    continue
                version = self._apply_line(kind, apply, line, version)
        return version

    def _apply_line(self, kind: str, apply: Callable[[str, msgspec.Raw], str], line: str, version: str) -> str:
        try:
            event = msgspec.json.decode(line, type=RawEvent)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            INVENTORY_EVENTS.labels(kind, "malformed").inc()
            _log.warning("watch_event_malformed", kind=kind, error=str(exc), line=line[:200])
            return version
        if event.type == "ERROR":
            try:
                status = msgspec.json.decode(event.object, type=RawStatusObject)
            except (msgspec.DecodeError, msgspec.ValidationError):
                status = RawStatusObject()
            if status.code == 410 or status.reason in ("Expired", "Gone"):
                INVENTORY_EVENTS.labels(kind, "expired").inc()
                raise Gone()
            INVENTORY_EVENTS.labels(kind, "malformed").inc()
            _log.warning("watch_error_event", kind=kind, code=status.code, message=status.message)
            return version
        if event.type == "BOOKMARK":
            try:
                meta = msgspec.json.decode(event.object, type=RawPod).metadata
            except (msgspec.DecodeError, msgspec.ValidationError):
                return version
            return meta.resourceVersion or version
        if event.type not in ("ADDED", "MODIFIED", "DELETED"):
            INVENTORY_EVENTS.labels(kind, "unknown").inc()
            _log.warning("watch_event_unknown", kind=kind, type=event.type)
            return version
        try:
            new_version = apply(event.type, event.object)
        except Malformed as exc:
            INVENTORY_EVENTS.labels(kind, "malformed").inc()
            _log.warning("watch_event_malformed", kind=kind, error=str(exc))
            return version
        INVENTORY_EVENTS.labels(kind, "applied").inc()
        return new_version or version


class LazyNodePods(Mapping[str, NodePods]):
    """The inventory's per-node pod summaries, computed only for the nodes the policy reads."""

    def __init__(self, inventory: Inventory) -> None:
        self._inventory = inventory

    def __getitem__(self, name: str) -> NodePods:
        return self._inventory.node_pods(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._inventory.nodes)

    def __len__(self) -> int:
        return len(self._inventory.nodes)
