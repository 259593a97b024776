"""What a DELETE of a Namespace starts on a real cluster, as far as the fake models it: the registry marks it
(deletionTimestamp, status.phase Terminating; pkg/registry/core/namespace/storage: the `kubernetes` finalizer
holds it) and the namespace controller (pkg/controller/namespace/deletion) deletes everything in it, pods as
a DELETE without options (their own grace, ended by their kubelet), waits for what finalizers or graceful
deletions still hold, then removes the namespace. Meanwhile NamespaceLifecycle admission (plugins.py) refuses
new content with 403 NamespaceTerminating.

The controller acts on the next loop turn after the mark and after every change in a terminating namespace
(the real one retries on a back-off). Not modelled: spec.finalizers (the fake's namespaces have none; a
namespace is removed once empty), the NamespaceDeletionContentFailure/... conditions, the namespace's own
metadata.finalizers (orphan/foreground deletion).
"""

from __future__ import annotations

import asyncio
import contextlib

from . import errors, resources
from .codec import now_rfc3339
from .policy import DisruptionController
from .store import Change, Obj, Store


class NamespaceController:
    """Marks namespaces deleted over the API and empties them, then removes them."""

    def __init__(self, store: Store, disruption: DisruptionController) -> None:
        self.store = store
        self.disruption = disruption
        self._terminating: set[str] = set()
        self._scheduled = False
        store.hooks.append(self._on_change)

    def mark(self, name: str) -> Obj:
        """The DELETE: the namespace Terminating (a second DELETE changes nothing); emptied and removed later."""
        namespace = self.store.get("Namespace", "", name)
        if namespace is None:
            raise errors.not_found("", "namespaces", name)
        if not namespace["metadata"].get("deletionTimestamp"):
            meta = {**namespace["metadata"], "deletionTimestamp": now_rfc3339()}
            status = {**(namespace.get("status") or {}), "phase": "Terminating"}
            namespace = self.store.update(
                {**namespace, "metadata": meta, "status": status}, check_version=False, set_deletion=True
            )
        self._terminating.add(name)
        self._schedule()
        return namespace

    def _on_change(self, ch: Change) -> None:
        if ch.namespace in self._terminating and ch.kind != "Namespace":
            self._schedule()

    def _schedule(self) -> None:
        if self._scheduled:
            return
        with contextlib.suppress(RuntimeError):  # no loop (the test's own hand): at the next change with one
            asyncio.get_running_loop().call_soon(self.run)
            self._scheduled = True

    def run(self) -> None:
        """One pass: delete what is left in each terminating namespace; remove those that are empty."""
        self._scheduled = False
        for name in sorted(self._terminating):
            if self._empty(name):
                self._terminating.discard(name)
                with contextlib.suppress(errors.ApiError):  # removed meanwhile by the test's own hand
                    self.store.remove("Namespace", "", name)

    def _empty(self, namespace: str) -> bool:
        left = False
        for res in resources.RESOURCES:
            if not res.namespaced:
                continue
            for obj in list(self.store.iter_objects(res.kind, namespace)):
                left = True
                meta = obj["metadata"]
                if meta.get("deletionTimestamp"):
                    continue  # a graceful deletion or finalizers hold it: wait
                with contextlib.suppress(errors.ApiError):
                    if res.kind == "Pod":
                        self.disruption.delete_pod(namespace, meta["name"], None)
                    else:
                        self.store.delete(res.kind, namespace, meta["name"])
        return not left
