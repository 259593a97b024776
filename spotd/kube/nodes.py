"""Reading and changing one Node: taint, cordon, exclude from load balancers, remember the notice.

Every change is one merge patch carrying the resourceVersion it was computed from, so a concurrent
writer (kubectl, another controller) makes it fail with 409 instead of being overwritten.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lightkube import AsyncClient
from lightkube.core.exceptions import ApiError
from lightkube.resources.core_v1 import Node
from lightkube.types import PatchType

from spotd.kube.client import http_of
from spotd.kube.metrics import NODE_ACTIONS
from spotd.kube.ratelimit import RateLimiter

ZONE_LABEL = "topology.kubernetes.io/zone"
INSTANCE_TYPE_LABEL = "node.kubernetes.io/instance-type"


@dataclass(frozen=True)
class NodeView:
    """The parts of a Node the agent reads."""

    name: str
    uid: str = ""
    resource_version: str = ""
    unschedulable: bool = False
    taints: tuple[Mapping[str, Any], ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    boot_id: str = ""
    provider_id: str = ""

    @classmethod
    def from_node(cls, node: Node) -> NodeView:
        meta, spec, status = node.metadata, node.spec, node.status
        taints = tuple(t.to_dict() for t in (spec.taints or [])) if spec else ()
        boot_id = status.nodeInfo.bootID if status and status.nodeInfo else ""
        return cls(
            name=meta.name if meta and meta.name else "",
            uid=(meta.uid or "") if meta else "",
            resource_version=(meta.resourceVersion or "") if meta else "",
            unschedulable=bool(spec.unschedulable) if spec else False,
            taints=taints,
            labels=dict(meta.labels or {}) if meta else {},
            annotations=dict(meta.annotations or {}) if meta else {},
            boot_id=boot_id or "",
            provider_id=(spec.providerID or "") if spec else "",
        )

    @property
    def zone(self) -> str:
        return self.labels.get(ZONE_LABEL, "")

    @property
    def instance_type(self) -> str:
        return self.labels.get(INSTANCE_TYPE_LABEL, "")

    @property
    def instance_id(self) -> str:
        return self.provider_id.rsplit("/", 1)[-1] if self.provider_id.startswith("aws://") else ""


class NodeClient:
    """GET and PATCH of one node, through the shared rate limiter; --dry-run logs instead of patching."""

    def __init__(self, client: AsyncClient, name: str, limiter: RateLimiter, log: Any, dry_run: bool) -> None:
        self.client = client
        self.name = name
        self._limiter = limiter
        self._log = log
        self.dry_run = dry_run

    async def get(self) -> NodeView:
        await self._limiter.acquire()
        return NodeView.from_node(await self.client.get(Node, self.name))

    async def patch(self, patch: dict[str, Any], action: str) -> NodeView | None:
        """Apply; returns the new view, or None on a 409 (the caller re-reads and recomputes)."""
        if self.dry_run:
            self._log.info("would_patch_node", node=self.name, action=action, patch=patch)
            NODE_ACTIONS.labels(action, "dry_run").inc()
            return None
        await self._limiter.acquire()
        try:
            node = await self.client.patch(Node, self.name, patch, patch_type=PatchType.MERGE)
        except ApiError as exc:
            if exc.status.code == 409:
                NODE_ACTIONS.labels(action, "conflict").inc()
                return None
            NODE_ACTIONS.labels(action, "error").inc()
            raise
        NODE_ACTIONS.labels(action, "ok").inc()
        return NodeView.from_node(node)


# --- the raw JSON path (the controller: no lightkube models, one node-patch path) ---------------------


async def read_node(client: Any, name: str) -> tuple[int, dict[str, Any]]:
    """GET one node as raw JSON: (HTTP status, body; {} unless 200)."""
    resp = await http_of(client).get(f"/api/v1/nodes/{name}")
    return resp.status_code, (resp.json() if resp.status_code == 200 else {})


async def merge_patch_node(client: Any, name: str, patch: dict[str, Any]) -> int:
    """One JSON merge patch of a node; returns the HTTP status (a resourceVersion in the patch makes it
    conditional: 409 when the node changed since)."""
    resp = await http_of(client).patch(
        f"/api/v1/nodes/{name}", json=patch, headers={"Content-Type": "application/merge-patch+json"}
    )
    return resp.status_code


def patched(status: int) -> bool:
    """A patch status that means the change is in."""
    return 0 < status < 300


async def merge_patch_node_retrying(
    client: Any, name: str, patch: dict[str, Any], log: Any, tries: int = 6, first_delay: float = 0.2
) -> int:
    """A patch that must not be lost (putting a node back, recording a drain): retried on errors and
    5xx for about 6 s with tries=6. Returns the last status (0: never answered); 404 ends at once."""
    status = 0
    for attempt in range(tries):
        try:
            status = await merge_patch_node(client, name, patch)
        except Exception as exc:  # the API server went away for a moment
            status = 0
            log.warning("node_patch_retry", node=name, error=repr(exc), attempt=attempt)
        if patched(status) or status == 404 or (400 <= status < 500 and status not in (409, 429)):
            return status
        if attempt + 1 < tries:
            await asyncio.sleep(first_delay * 2**attempt)
    return status


async def add_node_taint(client: Any, name: str, taint: dict[str, str], tries: int = 5) -> tuple[int, bool]:
    """Add one taint to a node unless a taint with its key is there: (status, added). The taints list is
    replaced as a whole by a merge patch, so the patch carries the resourceVersion read (409: read again)."""
    status = 0
    for _ in range(tries):
        status, body = await read_node(client, name)
        if status != 200:
            return status, False
        taints = list((body.get("spec") or {}).get("taints") or [])
        if any(t.get("key") == taint["key"] for t in taints):
            return status, False
        patch = {
            "metadata": {"resourceVersion": (body.get("metadata") or {}).get("resourceVersion")},
            "spec": {"taints": [*taints, taint]},
        }
        status = await merge_patch_node(client, name, patch)
        if status != 409:
            return status, patched(status)
    return status, False
