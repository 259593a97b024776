"""The pool book survives a leadership change (issue 19): short marks, ICE, launches and the probe back-off.

A new term used to start from an empty book, rebuilt from the ASG activities and the SQS backlog; but the
SQS messages the previous leader consumed are gone, and short marks and probe back-offs come from drains,
not from any source: a new leader read a short pool as available. The leader now keeps the book in the
annotation spotd.io/pool-book of a Lease of its own, spotd-pool-book, in its namespace (not the election's
Lease: a write there would race the elector's renewals, and a lost race is a lost lease), written about once
a second when the book changed, and read at the start of a term before any source.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from spotd.capacity.pools import PoolBook, book_from_json, book_to_json
from spotd.common.metrics import LOOP_ERRORS
from spotd.kube.client import http_of

BOOK_LEASE = "spotd-pool-book"  # deploy/rbac.yaml grants get and update on this name
BOOK_ANNOTATION = "spotd.io/pool-book"


class BookStore:
    """Load and save the book in the Lease `name` of `namespace`."""

    def __init__(self, client: Any, namespace: str, log: Any, *, name: str = BOOK_LEASE, dry_run: bool = False) -> None:
        self.client, self.namespace, self.name, self.log = client, namespace, name, log
        self.dry_run = dry_run
        self.saved: PoolBook | None = None

    @property
    def _path(self) -> str:
        return f"/apis/coordination.k8s.io/v1/namespaces/{self.namespace}/leases/{self.name}"

    async def load(self) -> PoolBook:
        """The saved book; empty when none was saved. An unreadable one is said and read as empty (only the
        leader writes it, and every pool has its sources read again at the start of the term)."""
        resp = await http_of(self.client).get(self._path)
        if resp.status_code == 404:
            return PoolBook()
        resp.raise_for_status()
        text = ((resp.json().get("metadata") or {}).get("annotations") or {}).get(BOOK_ANNOTATION)
        if not text:
            return PoolBook()
        try:
            return book_from_json(text)
        except ValueError as exc:
            LOOP_ERRORS.labels("pool_book").inc()
            self.log.error("pool_book_unreadable", lease=self.name, error=str(exc))
            return PoolBook()

    async def save(self, book: PoolBook) -> None:
        """Write the book (update conditional on the version read; create when absent; 409: read again)."""
        text = book_to_json(book)
        http = http_of(self.client)
        for _ in range(3):
            resp = await http.get(self._path)
            if resp.status_code == 404:
                body = {
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {
                        "name": self.name,
                        "namespace": self.namespace,
                        "annotations": {BOOK_ANNOTATION: text},
                    },
                    "spec": {},
                }
                created = await http.post(self._path.rsplit("/", 1)[0], json=body)
                if created.status_code == 409:
                    continue
                created.raise_for_status()
                return
            resp.raise_for_status()
            lease = resp.json()
            lease.setdefault("metadata", {}).setdefault("annotations", {})[BOOK_ANNOTATION] = text
            updated = await http.put(self._path, json=lease)
            if updated.status_code == 409:
                continue
            updated.raise_for_status()
            return
        raise RuntimeError(f"lease {self.name}: changed under every write")

    async def load_until_loaded(self, retry: float) -> PoolBook:
        """At the start of a term, before any source: the saved book, asked again every `retry` seconds on
        an API error (the term decides nothing meanwhile: an empty book would read short pools as available)."""
        while True:
            try:
                book = await self.load()
            except Exception as exc:
                LOOP_ERRORS.labels("pool_book").inc()
                self.log.warning("pool_book_unread", lease=self.name, error=repr(exc))
                await asyncio.sleep(retry)
                continue
            self.saved = book
            self.log.info("pool_book_loaded", lease=self.name, pools=len(book.pools()))
            return book

    async def keep(self, current: Callable[[], PoolBook], interval: float = 1.0) -> None:
        """While leading: save the book whenever it changed, at most every interval seconds."""
        while True:
            await asyncio.sleep(interval)
            book = current()
            if book == self.saved:
                continue
            if self.dry_run:
                self.saved = book
                self.log.debug("would_save_pool_book", pools=len(book.pools()))
                continue
            try:
                await self.save(book)
            except Exception as exc:  # tried again at the next change or interval
                LOOP_ERRORS.labels("pool_book").inc()
                self.log.warning("pool_book_save_failed", lease=self.name, error=repr(exc))
                continue
            self.saved = book
