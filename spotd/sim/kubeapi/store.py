"""Objects, the global resourceVersion counter (one, as etcd), the bounded change history and the watch
fan-out. Stored objects are never mutated in place: every write stores a new dict, so history entries and
watchers can share them; callers outside the package get copies."""

from __future__ import annotations

import asyncio
import bisect
import datetime as dt
import itertools
import random
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from . import errors, strategy
from .codec import clone, dumps, format_rfc3339, now_rfc3339, parse_time
from .resources import Resource, resource_for_kind

Obj = dict[str, Any]
Key = tuple[str, str]  # (namespace or "", name)
Matcher = Callable[[Obj], bool]
Converter = Callable[[Obj], Obj]

_NAME_CHARS = "bcdfghjklmnpqrstvwxz2456789"


@dataclass(slots=True)
class Change:
    """One committed write; `old` is the previous state for MODIFIED (None otherwise)."""

    type: str
    kind: str
    namespace: str
    obj: Obj
    old: Obj | None
    rv: int
    _lines: dict[tuple[str, bool, str], bytes] = field(default_factory=dict)

    def line(self, event_type: str, use_old: bool, group: str, convert: Converter | None) -> bytes:
        """The watch-stream line, serialized once per (type, object, group) whatever the watcher count."""
        key = (event_type, use_old, group)
        cached = self._lines.get(key)
        if cached is None:
            obj = self.obj
            if use_old and self.old is not None:
                # the real watch cache sends the last matching state, stamped with the change's version
                obj = {**self.old, "metadata": {**self.old["metadata"], "resourceVersion": str(self.rv)}}
            if convert is not None:
                obj = convert(obj)
            cached = b'{"type":"' + event_type.encode() + b'","object":' + dumps(obj) + b"}\n"
            self._lines[key] = cached
        return cached


class Watcher:
    """One watch stream's filter and queue of ready-to-send lines (None ends the stream)."""

    def __init__(
        self,
        kind: str,
        namespace: str | None,
        matcher: Matcher | None,
        group: str = "",
        convert: Converter | None = None,
        node: str | None = None,
    ) -> None:
        self.kind = kind
        self.node = node  # pods pinned to one node by spec.nodeName=: offered only that node's pods
        self.namespace = namespace
        self.matcher = matcher
        self.group = group
        self.convert = convert
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    def offer(self, ch: Change) -> None:
        if self.namespace is not None and ch.namespace != self.namespace:
            return
        event_type, use_old = ch.type, False
        if self.matcher is not None:
            now = self.matcher(ch.obj)
            before = self.matcher(ch.old) if ch.old is not None else False
            if ch.type == "MODIFIED":
                if now and not before:
                    event_type = "ADDED"
                elif before and not now:
                    event_type, use_old = "DELETED", True
                elif not now:
                    return
            elif not now:
                return
        self.queue.put_nowait(ch.line(event_type, use_old, self.group, self.convert))


class Subscription:
    """`FakeApiServer.subscribe()`: every change of every kind as (event_type, copy of object)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._queue: asyncio.Queue[Change | None] = asyncio.Queue()
        store.subscribers.add(self)

    def offer(self, ch: Change | None) -> None:
        self._queue.put_nowait(ch)

    def __aiter__(self) -> AsyncIterator[tuple[str, Obj]]:
        return self

    async def __anext__(self) -> tuple[str, Obj]:
        ch = await self._queue.get()
        if ch is None:
            self.close()
            raise StopAsyncIteration
        return ch.type, clone(ch.obj)

    def pending(self) -> list[tuple[str, Obj]]:
        """The changes already queued, without waiting (for tests and step-wise simulations)."""
        ready = []
        while not self._queue.empty():
            ch = self._queue.get_nowait()
            if ch is None:
                self._queue.put_nowait(None)  # let the iterator still see the end
                break
            ready.append((ch.type, clone(ch.obj)))
        return ready

    def close(self) -> None:
        self._store.subscribers.discard(self)

    async def aclose(self) -> None:
        self.close()


class Store:
    """All objects by kind, namespace and name, with a pod-by-node index and watch fan-out."""

    def __init__(self, history_size: int = 20_000) -> None:
        self.rv = 0
        self.compacted_rv = 0  # watches must start at or after this version, older ones get 410 Gone
        self._objects: dict[str, dict[str, dict[str, Obj]]] = {}
        self._pods_by_node: dict[str, set[Key]] = {}
        self._sorted: dict[str, list[Key]] = {}  # cached key order for paginated lists
        self._history: deque[Change] = deque()
        self._history_size = history_size
        self.watchers: dict[str, set[Watcher]] = {}
        self._node_watchers: dict[str, set[Watcher]] = {}  # one agent per node watching its pods
        self.subscribers: set[Subscription] = set()
        self.hooks: list[Callable[[Change], None]] = []

    # ---- reads (stored objects: do not mutate) ------------------------------------------------------

    def get(self, kind: str, namespace: str, name: str) -> Obj | None:
        return self._objects.get(kind, {}).get(namespace, {}).get(name)

    def count(self, kind: str) -> int:
        return sum(len(names) for names in self._objects.get(kind, {}).values())

    def iter_objects(self, kind: str, namespace: str | None = None) -> Iterator[Obj]:
        by_ns = self._objects.get(kind, {})
        if namespace is not None:
            yield from by_ns.get(namespace, {}).values()
            return
        for names in by_ns.values():
            yield from names.values()

    def pod_keys_on_node(self, node_name: str, namespace: str | None = None) -> list[Key]:
        """Keys of the pods bound to a node, in etcd order, from the node index."""
        keys = self._pods_by_node.get(node_name, set())
        return sorted(k for k in keys if namespace is None or k[0] == namespace)

    def sorted_keys(self, kind: str, namespace: str | None) -> list[Key]:
        """All keys of a kind in etcd order (namespace, then name); cached until the next add or delete."""
        if namespace is not None:
            return [(namespace, n) for n in sorted(self._objects.get(kind, {}).get(namespace, {}))]
        keys = self._sorted.get(kind)
        if keys is None:
            keys = sorted((ns, n) for ns, names in self._objects.get(kind, {}).items() for n in names)
            self._sorted[kind] = keys
        return keys

    @staticmethod
    def keys_after(keys: list[Key], start_after: Key | None) -> int:
        return 0 if start_after is None else bisect.bisect_right(keys, start_after)

    # ---- writes ---------------------------------------------------------------------------------------

    def create(self, obj: Obj, *, keep_timestamp: bool = False) -> Obj:
        """Store a new object; fills name (generateName), uid, resourceVersion, creationTimestamp (a given
        one is kept with `keep_timestamp`), generation and the default namespace, then the API defaults.
        409 AlreadyExists; 422 without a name, or a pod the API server's validation refuses (strategy.py)."""
        res = resource_for_kind(obj.get("kind", ""))
        obj = clone(obj)
        obj["apiVersion"], obj["kind"] = res.api_version, res.kind
        meta = obj.setdefault("metadata", {})
        if res.namespaced:
            meta["namespace"] = meta.get("namespace") or "default"
        else:
            meta.pop("namespace", None)
        generate_name(res.kind, meta)
        _apply_defaults(obj)
        if res.kind == "Pod":  # validation comes before storage: a 422 before a 409
            strategy.validate_pod(obj)
        ns, name = meta.get("namespace", ""), meta["name"]
        if self.get(res.kind, ns, name) is not None:
            raise errors.already_exists(res.group, res.plural, name)
        meta["uid"] = str(uuid.uuid4())
        if not (keep_timestamp and meta.get("creationTimestamp")):
            meta["creationTimestamp"] = now_rfc3339()
        meta["generation"] = 1
        for transient in ("resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds", "selfLink"):
            meta.pop(transient, None)
        self._commit("ADDED", res, obj, None)
        return obj

    def update(self, obj: Obj, *, check_version: bool = True, set_deletion: bool = False) -> Obj:
        """Replace an object; 404 when missing, 409 Conflict when `metadata.resourceVersion` is set and stale.
        Identity fields (uid, creationTimestamp, and the deletion state unless `set_deletion`, which only graceful
        deletion uses) are kept; generation moves with the spec."""
        res = resource_for_kind(obj.get("kind", ""))
        obj = clone(obj)
        obj["apiVersion"], obj["kind"] = res.api_version, res.kind
        meta = obj.setdefault("metadata", {})
        ns = (meta.get("namespace") or "default") if res.namespaced else ""
        name = meta.get("name") or ""
        old = self.get(res.kind, ns, name)
        if old is None:
            raise errors.not_found(res.group, res.plural, name)
        wanted = meta.get("resourceVersion")
        if check_version and wanted and wanted != old["metadata"]["resourceVersion"]:
            raise errors.conflict(res.group, res.plural, name)
        old_meta = old["metadata"]
        if res.namespaced:
            meta["namespace"] = ns
        kept_fields: tuple[str, ...] = ("uid", "creationTimestamp")
        if not set_deletion:
            kept_fields += ("deletionTimestamp", "deletionGracePeriodSeconds")
        for kept in kept_fields:
            if kept in old_meta:
                meta[kept] = old_meta[kept]
            else:
                meta.pop(kept, None)
        if old_meta.get("deletionTimestamp"):
            added = [f for f in meta.get("finalizers") or [] if f not in (old_meta.get("finalizers") or [])]
            if added:  # ValidateNoNewFinalizers
                why = "Forbidden: no new finalizers can be added if the object is being deleted"
                found = ", ".join(f'"{f}"' for f in added)
                raise errors.invalid(
                    res.kind, name, "metadata.finalizers", f"{why}, found new finalizers []string{{{found}}}", res.group
                )
        # the first deletion mark bumps the generation too (rest.BeforeDelete, markAsDeleting)
        first_mark = set_deletion and meta.get("deletionTimestamp") and not old_meta.get("deletionTimestamp")
        meta["generation"] = old_meta.get("generation", 1) + (1 if first_mark or _spec_changed(old, obj) else 0)
        if _unchanged(old, obj):
            return old  # the real server does not write (nor bump resourceVersion) on a no-op update
        if old_meta.get("deletionGracePeriodSeconds") == 0 and not meta.get("finalizers"):
            # ShouldDeleteDuringUpdate: the update removing the last finalizer of an object marked for deletion
            # with grace 0 (a DELETE that only waited for them) deletes it
            self._commit("DELETED", res, obj, old)
            return obj
        self._commit("MODIFIED", res, obj, old)
        return obj

    def delete(self, kind: str, namespace: str, name: str) -> Obj:
        """A DELETE with grace 0 (or of a kind without graceful deletion): removed at once, unless it has
        finalizers: then only marked, deletionGracePeriodSeconds 0 and deletionTimestamp when the deletion was
        asked (a graceful one's start; now for a first one), and removed by the update that takes off the last
        finalizer (store.go updateForGracefulDeletionAndFinalizers, markAsDeleting; rest.BeforeDelete)."""
        obj = self.get(kind, namespace, name)
        if obj is None or not obj["metadata"].get("finalizers"):
            return self.remove(kind, namespace, name)
        meta = obj["metadata"]
        grace = meta.get("deletionGracePeriodSeconds")
        if grace == 0:
            return obj  # already marked: nothing changes
        started = parse_time(meta.get("deletionTimestamp") or "")
        when = now_rfc3339() if started is None else format_rfc3339(started - dt.timedelta(seconds=grace or 0))
        marked = {**meta, "deletionTimestamp": when, "deletionGracePeriodSeconds": 0}
        return self.update({**obj, "metadata": marked}, check_version=False, set_deletion=True)

    def remove(self, kind: str, namespace: str, name: str) -> Obj:
        """Delete at once; 404 when missing. The DELETED event carries the deletion's resourceVersion."""
        res = resource_for_kind(kind)
        old = self.get(kind, namespace, name)
        if old is None:
            raise errors.not_found(res.group, res.plural, name)
        obj = {**old, "metadata": dict(old["metadata"])}
        self._commit("DELETED", res, obj, old)
        return obj

    def _commit(self, event_type: str, res: Resource, obj: Obj, old: Obj | None) -> None:
        self.rv += 1
        meta = obj["metadata"]
        meta["resourceVersion"] = str(self.rv)
        ns, name = meta.get("namespace", ""), meta["name"]
        by_ns = self._objects.setdefault(res.kind, {})
        if event_type == "DELETED":
            names = by_ns.get(ns, {})
            names.pop(name, None)
            if not names:
                by_ns.pop(ns, None)
            self._sorted.pop(res.kind, None)
        else:
            if event_type == "ADDED":
                self._sorted.pop(res.kind, None)
            by_ns.setdefault(ns, {})[name] = obj
        if res.kind == "Pod":
            self._index_pod(ns, name, old, None if event_type == "DELETED" else obj)
        ch = Change(event_type, res.kind, ns, obj, old if event_type == "MODIFIED" else None, self.rv)
        self._history.append(ch)
        if len(self._history) > self._history_size:
            self.compacted_rv = self._history.popleft().rv
        for hook in self.hooks:
            hook(ch)
        for watcher in self.watchers.get(res.kind, ()):
            watcher.offer(ch)
        if res.kind == "Pod" and self._node_watchers:
            nodes = {(p.get("spec") or {}).get("nodeName") for p in (obj, old) if p is not None}
            for node in nodes:
                for watcher in self._node_watchers.get(node or "", ()):
                    watcher.offer(ch)
        for sub in self.subscribers:
            sub.offer(ch)

    def _index_pod(self, ns: str, name: str, old: Obj | None, new: Obj | None) -> None:
        old_node = (old or {}).get("spec", {}).get("nodeName") or ""
        new_node = (new or {}).get("spec", {}).get("nodeName") or ""
        if old is not None and old_node and old_node != new_node:
            keys = self._pods_by_node.get(old_node)
            if keys is not None:
                keys.discard((ns, name))
                if not keys:
                    del self._pods_by_node[old_node]
        if new is not None and new_node:
            self._pods_by_node.setdefault(new_node, set()).add((ns, name))

    # ---- watch ----------------------------------------------------------------------------------------

    def history_since(self, kind: str, rv: int) -> list[Change]:
        """Changes of `kind` after `rv`; 410 Gone (reason Expired) when the window no longer reaches it."""
        if rv < self.compacted_rv:
            raise errors.gone(f"too old resource version: {rv} ({self.compacted_rv + 1})")
        start = len(self._history)
        while start > 0 and self._history[start - 1].rv > rv:  # newest first: watches usually start recent
            start -= 1
        return [ch for ch in itertools.islice(self._history, start, None) if ch.kind == kind]

    def add_watcher(self, watcher: Watcher) -> None:
        if watcher.kind == "Pod" and watcher.node:
            self._node_watchers.setdefault(watcher.node, set()).add(watcher)
        else:
            self.watchers.setdefault(watcher.kind, set()).add(watcher)

    def remove_watcher(self, watcher: Watcher) -> None:
        if watcher.kind == "Pod" and watcher.node:
            self._node_watchers.get(watcher.node, set()).discard(watcher)
        else:
            self.watchers.get(watcher.kind, set()).discard(watcher)

    def end_watches(self, kind: str) -> int:
        """End the open watch streams of one kind; how many."""
        ended = [
            w for group in (self.watchers, self._node_watchers) for ws in group.values() for w in ws if w.kind == kind
        ]
        for w in ended:
            w.queue.put_nowait(None)
        return len(ended)

    def close(self) -> None:
        """End every watch stream and subscription (server stop)."""
        for watchers in [*self.watchers.values(), *self._node_watchers.values()]:
            for w in watchers:
                w.queue.put_nowait(None)
        for sub in list(self.subscribers):
            sub.offer(None)


def generate_name(kind: str, meta: Obj) -> None:
    """metadata.name from generateName and five random characters, as the registry's BeforeCreate; 422
    without either."""
    if not meta.get("name"):
        if not meta.get("generateName"):
            raise errors.invalid(kind, "", "metadata.name", "Required value: name or generateName is required")
        meta["name"] = meta["generateName"] + "".join(random.choices(_NAME_CHARS, k=5))


NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"


def _apply_defaults(obj: Obj) -> None:
    """The API defaults the rest of the fake relies on (pods: strategy.default_pod; namespaces' phase)."""
    if obj["kind"] == "Pod":
        strategy.default_pod(obj)
    elif obj["kind"] == "PriorityClass":
        obj.setdefault("preemptionPolicy", "PreemptLowerPriority")
    elif obj["kind"] == "Namespace":
        obj.setdefault("status", {}).setdefault("phase", "Active")
        # the label the registry sets on every namespace (its name), for namespaceSelectors
        obj["metadata"]["labels"] = {
            **(obj["metadata"].get("labels") or {}),
            NAMESPACE_NAME_LABEL: obj["metadata"]["name"],
        }


def _spec_changed(old: Obj, new: Obj) -> bool:
    skip = ("metadata", "status", "apiVersion", "kind")
    return {k: v for k, v in old.items() if k not in skip} != {k: v for k, v in new.items() if k not in skip}


def _unchanged(old: Obj, new: Obj) -> bool:
    strip = ("resourceVersion", "managedFields")
    old_meta = {k: v for k, v in old["metadata"].items() if k not in strip}
    new_meta = {k: v for k, v in new["metadata"].items() if k not in strip}
    return old_meta == new_meta and {k: v for k, v in old.items() if k != "metadata"} == {
        k: v for k, v in new.items() if k != "metadata"
    }
