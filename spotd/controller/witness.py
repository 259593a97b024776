"""The controller as the second witness: instance events from the queue matched to this cluster's nodes.

Today only the agent on a node hears that node's notice (IMDS). The queue carries the same news from
EventBridge (docs/controller.md, "The second witness"); this module turns an InstanceEvent into what it
means for this cluster. An instance no node of this cluster runs on (spec.providerID, through the
inventory's index, never a list per message) is another cluster's: acknowledged and counted, not acted on.

One episode per (instance, kind) (spotd.notices.episodes): the first witness, the agent or the queue,
records it on the Node and raises the alert; the second adds nothing but
spotd_episode_sightings_total{order="second"}.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from spotd.alerts.model import AlertNode, spot_interruption_alert
from spotd.alerts.sender import Alerter
from spotd.controller.metrics import QUEUE_EVENTS
from spotd.inventory.records import NodeInfo
from spotd.kube.events import EventRecorder
from spotd.kube.nodes import merge_patch_node, patched, read_node
from spotd.notices.episodes import QUEUE, first_witness, queue_episode_patch
from spotd.notices.metrics import EPISODE_SIGHTINGS
from spotd.notices.queue_events import ASG_LAUNCH, ASG_TERMINATION, InstanceEvent, rehearsal_refusal
from spotd.notices.record import Notice, NoticeKind

FIRST, SECOND = "first", "second"
_NOTICE_KINDS = frozenset(str(k) for k in NoticeKind)


class InventoryNotReady(RuntimeError):
    """The inventory is not listed yet: the message goes back to the queue (an unknown instance could be
    ours), rather than being acknowledged as foreign."""


class EpisodeNotRecorded(RuntimeError):
    """The Node could not be read or patched: the message goes back to the queue and is tried again."""


class Witness:
    """node_of_instance: the inventory's index; synced: whether the inventory is listed; client, events,
    alerter, clock: to record an episode on its Node and say so."""

    def __init__(
        self,
        node_of_instance: Callable[[str], NodeInfo | None],
        synced: Callable[[], bool],
        log: Any,
        *,
        client: Any = None,
        events: EventRecorder | None = None,
        alerter: Alerter | None = None,
        clock: Callable[[], datetime] | None = None,
        dry_run: bool = False,
        on_matched: Callable[[NodeInfo, InstanceEvent], bool] | None = None,
        on_terminate_hook: Callable[[NodeInfo, InstanceEvent], Awaitable[None]] | None = None,
        on_launch_hook: Callable[[InstanceEvent], Awaitable[str]] | None = None,
    ) -> None:
        self.node_of_instance = node_of_instance
        self.synced = synced
        self.log = log
        self.client, self.events, self.alerter, self.clock = client, events, alerter, clock
        self.dry_run = dry_run
        self.on_matched = on_matched  # an episode the queue saw first (or again): the agent-down cover
        # an ASG terminate lifecycle action for a node of ours, whichever witness was first: recorded on the
        # Node (raising keeps the message) and completed after the drain (spotd.controller.lifecycle)
        self.on_terminate_hook = on_terminate_hook
        # a launch action (--complete-launch-hooks): its node does not exist yet when it arrives
        self.on_launch_hook = on_launch_hook

    def nodes_of(self, event: InstanceEvent) -> list[NodeInfo]:
        """This cluster's nodes among the event's instances."""
        found = (self.node_of_instance(iid) for iid in event.instance_ids)
        return [node for node in found if node is not None]

    async def on_event(self, event: InstanceEvent) -> str:
        """One instance event -> the message's outcome: "handled" (a node of ours), "foreign"."""
        if not self.synced():
            raise InventoryNotReady("inventory not listed yet")
        if event.kind == ASG_LAUNCH and self.on_launch_hook is not None:
            outcome = await self.on_launch_hook(event)
            QUEUE_EVENTS.labels(event.kind, "matched" if outcome != "foreign" else "foreign").inc()
            return outcome
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
        if event.rehearsal:
            for node in nodes:
                self.rehearse(node, event)
            return "handled"
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
            if event.kind != ASG_LAUNCH and self.client is not None:
                first = await self.record_episode(node, event)
                if first == QUEUE and self.on_matched is not None:
                    self.on_matched(node, event)
            if event.kind == ASG_TERMINATION and event.token and self.on_terminate_hook is not None:
                await self.on_terminate_hook(node, event)
        return "handled"

    def rehearse(self, node: NodeInfo, event: InstanceEvent) -> None:
        """A `simulate-reclaim --via-queue` message: no episode (a rehearsal is no witness of a real one), no
        alert; the agent never hears of it (IMDS says nothing), so the takeover rehearses the agent-down path:
        the node is drained after --agent-ack-timeout and released at the deadline."""
        assert self.clock is not None
        refused = rehearsal_refusal(event, self.clock())
        QUEUE_EVENTS.labels(event.kind, "rehearsal_refused" if refused else "rehearsal").inc()
        log = self.log.bind(node=node.name, kind=event.kind, rehearsal=event.rehearsal)
        if refused:
            log.warning("queue_rehearsal_refused", reason=refused)
            if self.events is not None:
                self.events.record(
                    node.name, "SpotdRehearsalRefused", f"rehearsal {event.rehearsal}: {refused}", "Warning"
                )
            return
        assert event.deadline is not None
        followed = self.on_matched is not None and self.on_matched(node, event)
        log.warning("queue_rehearsal", deadline=event.deadline.isoformat(), followed=followed)
        if self.events is None:
            return
        what = f"rehearsal {event.rehearsal}: {event.kind} from the queue, deadline {event.deadline:%H:%M:%S}Z"
        if not followed:  # a notice for the node is followed already (a real one, or another rehearsal)
            message = f"{what}; not acted on: the controller already follows a notice for this node"
            self.events.record(node.name, "SpotdQueueRehearsal", message, "Warning")
        elif self.dry_run:
            self.events.record(node.name, "SpotdQueueRehearsal", f"{what}; dry run: nothing is done to the node")
        else:
            message = f"{what}; the node is drained as for a silent agent and released at the deadline"
            self.events.record(node.name, "SpotdQueueRehearsal", message)

    async def record_episode(self, node: NodeInfo, event: InstanceEvent) -> str:
        """Record the episode on the Node unless a witness did; returns the first witness ("queue": this
        sighting, or an earlier one from the queue; "imds": the agent recorded it)."""
        assert self.clock is not None
        for _ in range(5):  # 409: the node changed since read (the agent writing its notice): read again
            status, body = await read_node(self.client, node.name)
            if status != 200:
                raise EpisodeNotRecorded(f"node {node.name}: read answered {status}")
            meta = body.get("metadata") or {}
            annotations = meta.get("annotations") or {}
            now = self.clock()
            patch = queue_episode_patch(annotations, str(meta.get("resourceVersion", "")), event, now)
            if patch is None:
                first = first_witness(annotations, event.kind) or QUEUE
                EPISODE_SIGHTINGS.labels(event.kind, QUEUE, SECOND).inc()
                self.log.info("episode_seen_second", node=node.name, kind=event.kind, first=first)
                return first
            if self.dry_run:
                self.log.info("would_record_episode", node=node.name, kind=event.kind, patch=patch)
                return QUEUE
            status = await merge_patch_node(self.client, node.name, patch)
            if status == 409:
                continue
            if not patched(status):
                raise EpisodeNotRecorded(f"node {node.name}: patch answered {status}")
            EPISODE_SIGHTINGS.labels(event.kind, QUEUE, FIRST).inc()
            self.log.warning("episode_recorded", node=node.name, kind=event.kind, witness=QUEUE)
            self.announce(node, event, now)
            return QUEUE
        raise EpisodeNotRecorded(f"node {node.name}: changed under every patch")

    def announce(self, node: NodeInfo, event: InstanceEvent, now: datetime) -> None:
        """The episode's one alert (the same labels the agent's would carry) and an Event on the node."""
        if self.events is not None:
            when = f", deadline {event.deadline:%H:%M:%S}Z" if event.deadline else ""
            self.events.record(
                node.name, "SpotdQueueNotice", f"{event.kind} {event.action} from the queue{when}".strip(), "Warning"
            )
        if self.alerter is None or event.kind not in _NOTICE_KINDS:
            return
        notice = Notice(
            kind=NoticeKind(event.kind),
            source=QUEUE,
            seen_at=now,
            deadline=event.deadline,
            action=event.action,
            event_id=event.event_id,
            not_after=event.not_after,
        )
        where = AlertNode(node.name, node.instance_id, node.zone, node.instance_type)
        self.alerter.fire(spot_interruption_alert(notice, where))
