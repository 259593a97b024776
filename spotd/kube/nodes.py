"""Reading and patching Nodes as raw JSON: the controller's one node-patch path (no lightkube models).

A patch that carries the resourceVersion it was computed from fails with 409 when a concurrent writer
(kubectl, another controller) changed the node meanwhile, instead of overwriting it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from spotd.kube.client import http_of


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
