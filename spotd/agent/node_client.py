"""The agent's reads and writes of its own Node, through the shared rate limiter; --dry-run logs instead."""

from __future__ import annotations

from typing import Any

from lightkube import AsyncClient
from lightkube.core.exceptions import ApiError
from lightkube.resources.core_v1 import Node
from lightkube.types import PatchType

from spotd.agent.metrics import NODE_ACTIONS
from spotd.agent.node_patch import NodeView
from spotd.kube.ratelimit import RateLimiter


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
