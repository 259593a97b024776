"""Kubernetes Events on Nodes, recorded in the background so that no step waits for them."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from lightkube import AsyncClient
from lightkube.core.exceptions import ApiError
from lightkube.models.core_v1 import EventSource, ObjectReference
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Event

from spotd.common.metrics import LOOP_ERRORS

_MAX_PENDING = 200


class EventRecorder:
    """record() returns at once; the create runs as a task. Failures are logged, never raised."""

    def __init__(self, client: AsyncClient, component: str, host: str, log: Any, dry_run: bool = False) -> None:
        self._client = client
        self._component = component
        self._host = host
        self._log = log
        self._dry_run = dry_run
        self._tasks: set[asyncio.Task[None]] = set()

    def record(self, node: str, reason: str, message: str, type: str = "Normal", node_uid: str = "") -> None:
        self.record_object("Node", node, "", reason, message, type, node_uid)

    def record_object(
        self, kind: str, name: str, namespace: str, reason: str, message: str, type: str = "Normal", uid: str = ""
    ) -> None:
        """An Event on any core/v1 object (namespace "" for a cluster-scoped one: the Event goes to default)."""
        if self._dry_run:
            self._log.info("would_record_event", node=name, kind=kind, reason=reason, message=message)
            return
        if len(self._tasks) >= _MAX_PENDING:
            self._log.warning("event_dropped", node=name, reason=reason)
            return
        task = asyncio.get_running_loop().create_task(self._create(kind, name, namespace, reason, message, type, uid))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _create(
        self, kind: str, node: str, namespace: str, reason: str, message: str, type: str, node_uid: str
    ) -> None:
        now = datetime.now(UTC)
        event = Event(
            metadata=ObjectMeta(generateName=f"{node}.", namespace=namespace or "default"),
            involvedObject=ObjectReference(
                kind=kind, name=node, namespace=namespace or None, uid=node_uid or None, apiVersion="v1"
            ),
            reason=reason,
            message=message[:1024],
            type=type,
            source=EventSource(component=self._component, host=self._host),
            reportingComponent=self._component,
            reportingInstance=self._host,
            firstTimestamp=now,
            lastTimestamp=now,
            count=1,
        )
        try:
            await self._client.create(event)
        except (ApiError, OSError) as exc:
            LOOP_ERRORS.labels("events").inc()
            self._log.warning("event_failed", node=node, reason=reason, error=str(exc))
        except Exception as exc:  # an Event is never worth crashing a drain
            LOOP_ERRORS.labels("events").inc()
            self._log.warning("event_failed", node=node, reason=reason, error=repr(exc))

    async def flush(self, timeout: float = 2.0) -> None:
        """Give pending Events a moment on shutdown."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)


async def node_event_times(client: Any, reason: str, component: str) -> list[tuple[str, datetime]]:
    """(node, time) of the Events with this reason that this component recorded on Nodes (namespace
    default, where record() puts them); the API server keeps Events for an hour by default."""
    from spotd.common.parsing import parse_iso_time
    from spotd.kube.client import http_of

    resp = await http_of(client).get(
        "/api/v1/namespaces/default/events",
        params={"fieldSelector": f"reason={reason},involvedObject.kind=Node"},
    )
    resp.raise_for_status()
    out = []
    for item in resp.json().get("items") or ():
        source = (item.get("source") or {}).get("component") or item.get("reportingComponent") or ""
        when = item.get("lastTimestamp") or item.get("firstTimestamp") or item.get("eventTime")
        name = (item.get("involvedObject") or {}).get("name")
        if source != component or not when or not name:
            continue
        try:
            out.append((str(name), parse_iso_time(str(when))))
        except ValueError:
            continue
    return out
