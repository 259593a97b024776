"""The controller as the second witness: instance events from the queue matched to this cluster's nodes.

Today only the agent on a node hears that node's notice (IMDS). The queue carries the same news from
EventBridge (docs/controller.md, "The second witness"); this module turns an InstanceEvent into what it
means for this cluster. An instance no node of this cluster runs on (spec.providerID, through the
inventory's index, never a list per message) is another cluster's: acknowledged and counted, not acted on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from spotd.controller.metrics import QUEUE_EVENTS
from spotd.inventory.records import NodeInfo
from spotd.notices.queue_events import InstanceEvent


class InventoryNotReady(RuntimeError):
    """The inventory is not listed yet: the message goes back to the queue (an unknown instance could be
    ours), rather than being acknowledged as foreign."""


class Witness:
    """node_of_instance: the inventory's index; synced: whether the inventory is listed."""

    def __init__(
        self, node_of_instance: Callable[[str], NodeInfo | None], synced: Callable[[], bool], log: Any
    ) -> None:
        self.node_of_instance = node_of_instance
        self.synced = synced
        self.log = log

    def nodes_of(self, event: InstanceEvent) -> list[NodeInfo]:
        """This cluster's nodes among the event's instances."""
        found = (self.node_of_instance(iid) for iid in event.instance_ids)
        return [node for node in found if node is not None]

    async def on_event(self, event: InstanceEvent) -> str:
        """One instance event -> the message's outcome: "handled" (a node of ours), "foreign"."""
        if not self.synced():
            raise InventoryNotReady("inventory not listed yet")
        nodes = self.nodes_of(event)
        if not nodes:
            QUEUE_EVENTS.labels(event.kind, "foreign").inc()
            self.log.info(
                "queue_event_foreign",
                kind=event.kind,
                instances=list(event.instance_ids),
                account=event.account,
                region=event.region,
                event_id=event.event_id,
            )
            return "foreign"
        for node in nodes:
            QUEUE_EVENTS.labels(event.kind, "matched").inc()
            self.log.info(
                "queue_event",
                kind=event.kind,
                node=node.name,
                instance=node.instance_id,
                action=event.action,
                deadline=event.deadline.isoformat() if event.deadline else None,
                event_id=event.event_id,
            )
        return "handled"
