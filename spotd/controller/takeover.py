"""The controller drains a node whose agent is silent (issue 19, agent-down coverage).

A Spot warning, a state change away (stopping, stopped, shutting-down, terminated) or an ASG termination
read from the queue for a node of this cluster gives that node's agent --agent-ack-timeout (5 s) to record
the notice on its Node (spotd.io/notice, which the inventory follows). If it does not, the controller
taints (spotd.io/interruption=<kind>:NoSchedule), cordons and drains the node itself with the same drain
engine as the agent: evictions only, deadline-aware (the grace capped by the time left, never below 1 s),
PDB refusals retried until the deadline minus the safety margin and then left (never deleted). Should the
agent record the notice later, the controller's drain stops there and the agent carries on: pods already
gone stay gone, none is evicted twice by the two.

A new leader resumes what its predecessor followed (resumable_takeovers): the Spot warnings and state
changes the queue saw first are on the Node (spotd.io/queue-notice, written before the message was deleted),
and one whose deadline is ahead, on a node with pods left to drain, is followed again (the agent's
acknowledgement first, then the drain). ASG terminations are resumed with their lifecycle actions.

A rehearsal's notice (`spotd simulate-reclaim --via-queue`) is followed the same way; its instance lives on,
so at the deadline the node is released (the taint removed, uncordoned) unless a real notice came meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from spotd.common.parsing import parse_iso_time
from spotd.common.waits import wait_set
from spotd.controller.metrics import TAKEOVERS
from spotd.drain.executor import DrainOptions, DrainResult, drain_node
from spotd.drain.plan import PodPolicy
from spotd.kube.events import EventRecorder
from spotd.kube.keys import INTERRUPTION_TAINT_KEY, STATE_ANNOTATION
from spotd.kube.nodes import add_node_taint, merge_patch_node, merge_patch_node_retrying, patched, read_node
from spotd.kube.ratelimit import RateLimiter
from spotd.notices.episodes import queue_episodes
from spotd.notices.metrics import NOTICE_TO_CORDON
from spotd.notices.queue_events import ASG_TERMINATION, SPOT_ITN, STATE_CHANGE, InstanceEvent

TAKEOVER_KINDS = frozenset({SPOT_ITN, STATE_CHANGE, ASG_TERMINATION})
Spawn = Callable[[Coroutine[Any, Any, None]], "asyncio.Task[None] | None"]


def acknowledges(agent_kind: str, kind: str) -> bool:
    """Whether the notice the agent records (its kind, "" for none) acknowledges a queue notice of kind.
    A state change has no IMDS twin: the agent acting on the instance's end (Spot, ASG) covers it."""
    if not agent_kind:
        return False
    if kind == STATE_CHANGE:
        return agent_kind in (SPOT_ITN, ASG_TERMINATION)
    return agent_kind == kind


def takeover_deadline(event: InstanceEvent, received: datetime, asg_window: timedelta) -> datetime:
    """When the instance goes: the event's own deadline; an ASG termination carries none (the hook waits
    for us), so received + the window, as the agent gives it."""
    return event.deadline if event.deadline is not None else received + asg_window


RESUMED_KINDS = (SPOT_ITN, STATE_CHANGE)  # an ASG termination is resumed with its lifecycle action


def agent_cordons(annotations: Mapping[str, str]) -> bool:
    """Whether the node's agent, acting on a notice, has cordon among its steps (its spotd.io/state); an
    unreadable state counts as yes: the controller then leaves the cordon alone."""
    text = annotations.get(STATE_ANNOTATION)
    if not text:
        return False
    try:
        steps = json.loads(text).get("steps")
    except (ValueError, AttributeError):
        return True
    return not isinstance(steps, list) or "cordon" in steps


def resumable_takeovers(annotations: Mapping[str, str], now: datetime) -> list[InstanceEvent]:
    """The queue notices recorded on a Node (spotd.io/queue-notice) that a new leader follows again: a Spot
    warning or state change whose deadline is still ahead (pure; an unreadable entry is skipped)."""
    out = []
    episodes = queue_episodes(annotations)
    for kind in RESUMED_KINDS:
        entry = episodes.get(kind)
        if entry is None:
            continue
        try:
            at = parse_iso_time(str(entry.get("at") or ""))
            deadline = parse_iso_time(str(entry.get("deadline") or ""))
        except ValueError:
            continue
        if deadline <= now:
            continue
        action, event_id = str(entry.get("action") or ""), str(entry.get("event_id") or "")
        out.append(InstanceEvent(kind, (), at=at, deadline=deadline, action=action, event_id=event_id))
    return out


@dataclass(frozen=True)
class TakeoverSettings:
    ack_timeout: float = 5.0
    asg_termination_window: float = 120.0
    safety_margin: float = 10.0
    dry_run: bool = False
    ack_poll: float = 1.0  # besides each node change: how often the agent's record is looked at (no API call)


class Takeovers:
    """agent_kind(node): the kind of the notice the node's agent records, from the inventory."""

    def __init__(
        self,
        client: Any,
        events: EventRecorder,
        log: Any,
        clock: Callable[[], datetime],
        agent_kind: Callable[[str], str],
        settings: TakeoverSettings,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.client, self.events, self.log, self.clock = client, events, log, clock
        self.agent_kind = agent_kind
        self.settings = settings
        self.limiter = limiter or RateLimiter(50, 100)
        self.running: dict[str, asyncio.Task[None]] = {}
        self.rehearsing: set[str] = set()  # nodes whose running follow is a queue rehearsal
        self._changed = asyncio.Event()
        for kind in TAKEOVER_KINDS:  # at 0 from the start: a series born at 1 is no rate() to Prometheus
            NOTICE_TO_CORDON.labels(kind, "controller")

    def consider(self, spawn: Spawn, node: str, event: InstanceEvent) -> None:
        """A queue notice for a node of ours: follow it unless one is followed for that node already. A real
        notice replaces a rehearsal's follow (cancelled: it never releases the node the real one needs)."""
        if event.kind not in TAKEOVER_KINDS:
            return
        if node in self.running:
            if event.rehearsal or node not in self.rehearsing:
                return
            self.log.warning("rehearsal_superseded", node=node, kind=event.kind)
            self.rehearsing.discard(node)
            self.running.pop(node).cancel()
        task = spawn(self.follow(node, event))
        if task is not None:
            self.running[node] = task
            if event.rehearsal:
                self.rehearsing.add(node)

            def done(finished: asyncio.Task[None]) -> None:
                if self.running.get(node) is finished:  # not the real follow that replaced it
                    self.running.pop(node, None)
                    self.rehearsing.discard(node)

            task.add_done_callback(done)

    def notify(self) -> None:
        """A node changed (the inventory's hook): waiters look at their node's record again."""
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _acknowledged_within(self, node: str, kind: str, seconds: float | None) -> bool:
        """Whether the agent records the notice within seconds (None: wait for ever)."""
        loop = asyncio.get_running_loop()
        until = None if seconds is None else loop.time() + seconds
        while True:
            changed = self._changed  # taken before the look: a change after it wakes us
            if acknowledges(self.agent_kind(node), kind):
                return True
            left = self.settings.ack_poll if until is None else min(until - loop.time(), self.settings.ack_poll)
            if left <= 0:
                return False
            await wait_set(changed, left)  # not wait_for: it can swallow a lost lease's cancellation

    async def _stop_when_acknowledged(self, node: str, kind: str, stop: asyncio.Event) -> None:
        await self._acknowledged_within(node, kind, None)
        stop.set()

    async def follow(self, node: str, event: InstanceEvent) -> None:
        """Wait for the agent's acknowledgement; without it, taint, cordon and drain the node."""
        received = self.clock()
        started = asyncio.get_running_loop().time()  # the monotonic twin of received, for the cordon's timing
        deadline = takeover_deadline(event, received, timedelta(seconds=self.settings.asg_termination_window))
        log = self.log.bind(node=node, kind=event.kind, deadline=deadline.isoformat())
        if await self._acknowledged_within(node, event.kind, self.settings.ack_timeout):
            TAKEOVERS.labels("acknowledged").inc()
            log.info("agent_acknowledged")
            return
        log.warning("agent_silent_draining", waited=self.settings.ack_timeout)
        self.events.record(
            node,
            "SpotdAgentSilent",
            f"{event.kind} {event.action} from the queue not acknowledged by the node's agent within "
            f"{self.settings.ack_timeout:g}s: the controller drains the node (deadline {deadline:%H:%M:%S}Z)",
            "Warning",
        )
        if self.settings.dry_run:
            TAKEOVERS.labels("dry_run").inc()
            log.info("would_drain_node", reason="agent silent")
            return
        prior_cordon = False
        try:
            if event.rehearsal:  # the release puts back only what the rehearsal changed
                status, body = await read_node(self.client, node)
                prior_cordon = status != 200 or bool((body.get("spec") or {}).get("unschedulable"))
            await self._taint_and_cordon(node, event.kind, log, started)
            stop = asyncio.Event()
            options = DrainOptions(
                policy=PodPolicy(), deadline_action="leave", safety_margin=self.settings.safety_margin
            )
            watcher = asyncio.create_task(self._stop_when_acknowledged(node, event.kind, stop))
            try:
                result = await drain_node(
                    self.client,
                    node,
                    options,
                    deadline,
                    log=log,
                    limiter=self.limiter,
                    stop=stop,
                )
            finally:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
        except Exception as exc:  # the loop goes on; the next notice for this node tries again
            TAKEOVERS.labels("failed").inc()
            log.exception("takeover_failed", error=repr(exc))
            return
        outcome = "acknowledged" if stop.is_set() else result.outcome
        TAKEOVERS.labels(outcome if outcome in TAKEOVERS_KNOWN else "failed").inc()
        self._report(node, outcome, result, log)
        if event.rehearsal and outcome != "acknowledged":
            await self._release_rehearsal(node, event, deadline, log, prior_cordon)

    async def _release_rehearsal(
        self, node: str, event: InstanceEvent, deadline: datetime, log: Any, prior_cordon: bool
    ) -> None:
        """At the deadline of a rehearsal: the interruption taint we added off, and our cordon (not one that
        was there before) lifted; nothing when a real notice now holds the node (a real queue notice recorded
        on it, or its agent acting on one with a cordon: the node is theirs)."""
        wait = (deadline - self.clock()).total_seconds()
        if wait > 0:
            await asyncio.sleep(wait)
        status = 0
        for _ in range(5):  # the taints are replaced whole: conditional on the resourceVersion read
            status, body = await read_node(self.client, node)
            if status != 200:
                break
            annotations = (body.get("metadata") or {}).get("annotations") or {}
            if resumable_takeovers(annotations, self.clock()):
                log.warning("rehearsal_not_released", reason="a real queue notice is pending for the node")
                return
            agent_cordon = agent_cordons(annotations) if self.agent_kind(node) else False
            if agent_cordon:
                log.info("rehearsal_not_released", reason="the agent acts on a real notice and cordons")
                return
            taints = list((body.get("spec") or {}).get("taints") or [])
            kept = [t for t in taints if not (t.get("key") == INTERRUPTION_TAINT_KEY and t.get("value") == event.kind)]
            spec: dict[str, Any] = {"taints": kept or None}
            if not prior_cordon:
                spec["unschedulable"] = None
            patch = {"metadata": {"resourceVersion": (body.get("metadata") or {}).get("resourceVersion")}, "spec": spec}
            status = await merge_patch_node(self.client, node, patch)
            if status != 409:
                break
        if not patched(status):
            log.warning("rehearsal_release_failed", status=status)
            return
        log.info("rehearsal_released")
        self.events.record(node, "SpotdRehearsalReleased", f"rehearsal {event.rehearsal} over: node released")

    async def _taint_and_cordon(self, node: str, kind: str, log: Any, started: float) -> None:
        taint = {"key": INTERRUPTION_TAINT_KEY, "value": kind, "effect": "NoSchedule"}
        status, _added = await add_node_taint(self.client, node, taint)
        if not patched(status):
            log.warning("takeover_taint_failed", status=status)  # the drain goes on: it matters more
        status = await merge_patch_node_retrying(self.client, node, {"spec": {"unschedulable": True}}, log)
        if not patched(status):
            log.warning("takeover_cordon_failed", status=status)
        else:  # from the queue message's arrival: the ack timeout the agent was given is part of it
            NOTICE_TO_CORDON.labels(kind, "controller").observe(asyncio.get_running_loop().time() - started)

    def _report(self, node: str, outcome: str, result: DrainResult, log: Any) -> None:
        left = list(result.left or result.blocked)
        log.warning("takeover_drain_finished", outcome=outcome, evicted=len(result.evicted), left=left)
        if outcome == "acknowledged":
            message = "the node's agent took the notice up: it carries on with the drain"
            self.events.record(node, "SpotdTakeoverHandedOver", message)
        elif outcome == "complete":
            self.events.record(
                node, "SpotdTakeoverComplete", f"drained by the controller: {len(result.evicted)} evicted"
            )
        else:
            message = f"drain {outcome}: left {', '.join(left) or 'none'}"
            self.events.record(node, "SpotdTakeoverIncomplete", message, "Warning")


TAKEOVERS_KNOWN = frozenset({"acknowledged", "complete", "incomplete", "interrupted", "blocked", "dry_run"})
