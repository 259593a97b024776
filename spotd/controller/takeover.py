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
The rehearsal is written on the Node (spotd.io/queue-rehearsal, with the cordon found there) before the
node is touched, so a new leader releases it at the deadline (resumable_release); a rehearsal that cannot be
written there is not acted on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from spotd.common.parsing import format_time, parse_iso_time
from spotd.common.waits import wait_set
from spotd.controller.metrics import TAKEOVERS
from spotd.drain.executor import DrainOptions, DrainResult, drain_node
from spotd.drain.plan import PodPolicy
from spotd.kube.events import EventRecorder
from spotd.kube.keys import INTERRUPTION_TAINT_KEY, QUEUE_REHEARSAL_ANNOTATION, STATE_ANNOTATION
from spotd.kube.nodes import add_node_taint, merge_patch_node, merge_patch_node_retrying, patched, read_node
from spotd.kube.ratelimit import RateLimiter
from spotd.notices.episodes import agent_notice, queue_episodes
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
class RehearsalRecord:
    """A queue rehearsal the controller acts on, as written on its Node (spotd.io/queue-rehearsal)."""

    rehearsal: str
    kind: str
    deadline: datetime
    started: datetime
    prior_cordon: bool  # the node was cordoned before the rehearsal: the release leaves that cordon
    tainted: bool = True  # the record's write added the interruption taint (none with its key was there)

    def to_json(self) -> str:
        return json.dumps(
            {
                "id": self.rehearsal,
                "kind": self.kind,
                "deadline": format_time(self.deadline),
                "started": format_time(self.started),
                "prior_cordon": self.prior_cordon,
                "tainted": self.tainted,
            },
            sort_keys=True,
            separators=(",", ":"),
        )


class UnreadableRehearsal(ValueError):
    """A spotd.io/queue-rehearsal whose cordon from before cannot be known: the node is left as it is."""


def rehearsal_record(annotations: Mapping[str, str]) -> RehearsalRecord | None:
    """The queue rehearsal recorded on a Node (None: none); UnreadableRehearsal when one is there but
    cannot be read (pure)."""
    text = annotations.get(QUEUE_REHEARSAL_ANNOTATION)
    if not text:
        return None
    try:
        data = json.loads(text)
        prior, tainted = data["prior_cordon"], data.get("tainted", True)
        if not isinstance(prior, bool) or not isinstance(tainted, bool) or not data["id"] or not data["kind"]:
            raise ValueError("id, kind and boolean prior_cordon and tainted are needed")
        return RehearsalRecord(
            str(data["id"]),
            str(data["kind"]),
            parse_iso_time(str(data["deadline"])),
            parse_iso_time(str(data["started"])),
            prior,
            tainted,
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise UnreadableRehearsal(f"{QUEUE_REHEARSAL_ANNOTATION}: {exc}") from None


def real_notice_since(annotations: Mapping[str, str], record: RehearsalRecord, now: datetime) -> str | None:
    """Why a rehearsal's node must not be released (None: it may be): a real queue notice pending for it, or
    one the queue saw since the rehearsal began (its deadline past: the instance is going) (pure)."""
    if resumable_takeovers(annotations, now):
        return "a real queue notice is pending for the node"
    for kind, entry in queue_episodes(annotations).items():
        if kind not in TAKEOVER_KINDS:
            continue
        try:
            seen = parse_iso_time(str(entry.get("seen_at") or ""))
        except ValueError:
            return f"a real {kind} notice is recorded with no readable time"
        if seen >= record.started:
            return f"a real {kind} notice came during the rehearsal"
    return None


STALE_RECORD = timedelta(hours=1)  # a rehearsal's record this long past its deadline is never acted on


def has_interruption_taint(spec: Mapping[str, Any]) -> bool:
    """Any spotd.io/interruption taint, whatever its kind (the agent's and the takeover's share the key)."""
    return any(t.get("key") == INTERRUPTION_TAINT_KEY for t in spec.get("taints") or [])


def without_our_taint(spec: Mapping[str, Any], kind: str) -> list[dict[str, Any]]:
    """The node's taints but the interruption taint the takeover adds for kind."""
    taints = list(spec.get("taints") or [])
    return [t for t in taints if not (t.get("key") == INTERRUPTION_TAINT_KEY and t.get("value") == kind)]


def release_hold(
    annotations: Mapping[str, str], spec: Mapping[str, Any], record: RehearsalRecord, now: datetime
) -> tuple[str, bool] | None:
    """Why a rehearsal's node is left as it is at the release, only its record removed, and whether a real
    notice holds it (None: released) (pure): a real notice holds it (the queue's, or the agent's with a
    cordon); the interruption taint the record's write added is gone (someone gave the node back by hand:
    a cordon now is someone else's); or the record is stale (a release that never happened long ago: what
    the node carries now is not the rehearsal's)."""
    held = real_notice_since(annotations, record, now)
    if held is not None:
        return held, True
    if agent_notice(annotations) is not None and agent_cordons(annotations):
        return "the agent acts on a real notice and cordons", True
    if now - record.deadline > STALE_RECORD:
        return f"the record is stale (deadline {format_time(record.deadline)})", False
    if record.tainted and not has_interruption_taint(spec):
        # (any value: the agent acting on a real notice since puts its own kind under the same key)
        return f"the {INTERRUPTION_TAINT_KEY} taint is gone: the node was given back by hand", False
    return None


def release_patch(annotations: Mapping[str, str], spec: Mapping[str, Any], record: RehearsalRecord) -> dict[str, Any]:
    """The spec the release writes (pure): our taint off unless the agent now acts on a notice of the same
    kind (the taint is its own then), our cordon lifted unless it was there before."""
    out: dict[str, Any] = {}
    notice = agent_notice(annotations)
    if record.tainted and (notice is None or str(notice.kind) != record.kind):
        out["taints"] = without_our_taint(spec, record.kind) or None
    if not record.prior_cordon:
        out["unschedulable"] = None
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

    def consider(self, spawn: Spawn, node: str, event: InstanceEvent) -> bool:
        """A queue notice for a node of ours: follow it unless one is followed for that node already (False:
        not followed). A real notice replaces a rehearsal's follow (cancelled: it never releases the node the
        real one needs)."""
        if event.kind not in TAKEOVER_KINDS:
            return False
        if node in self.running:
            if event.rehearsal or node not in self.rehearsing:
                return False
            self.log.warning("rehearsal_superseded", node=node, kind=event.kind)
            self.rehearsing.discard(node)
            self.running.pop(node).cancel()
            return self._track(node, spawn(self.follow(node, event, superseded=True)), False)
        return self._track(node, spawn(self.follow(node, event)), bool(event.rehearsal))

    def _track(self, node: str, task: asyncio.Task[None] | None, rehearsal: bool) -> bool:
        if task is None:
            return False
        self.running[node] = task
        if rehearsal:
            self.rehearsing.add(node)

        def done(finished: asyncio.Task[None]) -> None:
            if self.running.get(node) is finished:  # not the real follow that replaced it
                self.running.pop(node, None)
                self.rehearsing.discard(node)

        task.add_done_callback(done)
        return True

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

    async def follow(self, node: str, event: InstanceEvent, superseded: bool = False) -> None:
        """Wait for the agent's acknowledgement; without it, taint, cordon and drain the node. superseded: a
        rehearsal was followed for the node; its record goes (the taint and cordon are this notice's now)."""
        received = self.clock()
        started = asyncio.get_running_loop().time()  # the monotonic twin of received, for the cordon's timing
        deadline = takeover_deadline(event, received, timedelta(seconds=self.settings.asg_termination_window))
        log = self.log.bind(node=node, kind=event.kind, deadline=deadline.isoformat())
        if superseded and not self.settings.dry_run:
            await self._drop_rehearsal_record(node, log)
        if await self._acknowledged_within(node, event.kind, self.settings.ack_timeout):
            TAKEOVERS.labels("acknowledged").inc()
            log.info("agent_acknowledged")
            if event.rehearsal:  # the agent acts on a real notice of this kind: the rehearsal does nothing
                self.events.record(
                    node,
                    "SpotdRehearsalHeld",
                    f"rehearsal {event.rehearsal}: the node's agent acts on a real {event.kind} notice; nothing "
                    "is done for the rehearsal",
                )
            return
        log.warning("agent_silent_draining", waited=self.settings.ack_timeout)
        acts = "dry run: the controller would drain" if self.settings.dry_run else "the controller drains"
        self.events.record(
            node,
            "SpotdAgentSilent",
            f"{event.kind} {event.action} from the queue not acknowledged by the node's agent within "
            f"{self.settings.ack_timeout:g}s: {acts} the node (deadline {deadline:%H:%M:%S}Z)",
            "Warning",
        )
        if self.settings.dry_run:
            TAKEOVERS.labels("dry_run").inc()
            log.info("would_drain_node", reason="agent silent")
            return
        record = None
        if event.rehearsal:  # on the Node first: whoever leads at the deadline releases it
            record = await self._record_rehearsal(node, event, deadline, received, log)
            if record is None:
                return
        try:
            await self._take_over(node, event.kind, deadline, log, started, tainted=record is not None)
        except Exception as exc:  # the loop goes on; the next notice for this node tries again
            TAKEOVERS.labels("failed").inc()
            log.exception("takeover_failed", error=repr(exc))
            if record is None:
                return
        if record is not None:
            await self.release_rehearsal(node, record, log)

    async def _take_over(
        self, node: str, kind: str, deadline: datetime, log: Any, started: float, tainted: bool = False
    ) -> None:
        """tainted: a rehearsal's record write tainted and cordoned the node (and no real notice's timing
        is observed for it)."""
        if not tainted:
            await self._taint_and_cordon(node, kind, log, started)
        stop = asyncio.Event()
        options = DrainOptions(policy=PodPolicy(), deadline_action="leave", safety_margin=self.settings.safety_margin)
        watcher = asyncio.create_task(self._stop_when_acknowledged(node, kind, stop))
        try:
            result = await drain_node(self.client, node, options, deadline, log=log, limiter=self.limiter, stop=stop)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        outcome = "acknowledged" if stop.is_set() else result.outcome
        TAKEOVERS.labels(outcome if outcome in TAKEOVERS_KNOWN else "failed").inc()
        self._report(node, outcome, result, log)

    async def _record_rehearsal(
        self, node: str, event: InstanceEvent, deadline: datetime, received: datetime, log: Any
    ) -> RehearsalRecord | None:
        """Write the rehearsal on the Node with the cordon it has now, conditional on what was read (None:
        not written; the rehearsal is refused, nothing touched)."""
        reason = ""
        for _ in range(5):
            status, body = await read_node(self.client, node)
            if status != 200:
                reason = f"the node could not be read ({status})"
                break
            meta = body.get("metadata") or {}
            try:
                held = rehearsal_record(meta.get("annotations") or {})
            except UnreadableRehearsal as exc:
                reason = str(exc)
                break
            if held is not None and held.rehearsal != event.rehearsal:
                reason = f"rehearsal {held.rehearsal} still holds the node until {held.deadline:%H:%M:%S}Z"
                break
            spec = body.get("spec") or {}
            if held is not None:
                prior, tainted = held.prior_cordon, held.tainted
            else:
                prior, tainted = bool(spec.get("unschedulable")), not has_interruption_taint(spec)
            record = RehearsalRecord(event.rehearsal, event.kind, deadline, received, prior, tainted)
            # the rehearsal's whole footprint in one write, conditional on what was read: the record says
            # exactly what this patch changed (no moment with the record and no cordon or taint)
            patch: dict[str, Any] = {
                "metadata": {
                    "resourceVersion": meta.get("resourceVersion"),
                    "annotations": {QUEUE_REHEARSAL_ANNOTATION: record.to_json()},
                },
                "spec": {"unschedulable": True},
            }
            if tainted and not has_interruption_taint(spec):
                taint = {"key": INTERRUPTION_TAINT_KEY, "value": event.kind, "effect": "NoSchedule"}
                patch["spec"]["taints"] = [*(spec.get("taints") or []), taint]
            status = await merge_patch_node(self.client, node, patch)
            if status != 409:
                if patched(status):
                    return record
                reason = f"the rehearsal could not be recorded on the node ({status})"
                break
        else:
            reason = "the node changed under every write"
        TAKEOVERS.labels("failed").inc()
        log.warning("queue_rehearsal_not_started", reason=reason)
        self.events.record(
            node, "SpotdRehearsalRefused", f"rehearsal {event.rehearsal}: {reason}: nothing done", "Warning"
        )
        return None

    def resume_release(self, spawn: Spawn, node: str, record: RehearsalRecord) -> None:
        """A new leader: a rehearsal its predecessor acted on is released at its deadline (at once when past),
        as a follow of the node (a real notice for it takes over, a second rehearsal is refused)."""
        if node not in self.running:
            log = self.log.bind(node=node, kind=record.kind)
            self._track(node, spawn(self.release_rehearsal(node, record, log)), rehearsal=True)

    async def release_rehearsal(self, node: str, record: RehearsalRecord, log: Any) -> None:
        """At the deadline of a rehearsal: the interruption taint we added off, our cordon (not one that was
        there before) lifted and the record removed; only the record when the node is not ours to give back
        (release_hold). Tried again, backing off to a minute, until done (the term's end cancels it: the next
        leader finds the record)."""
        log = log.bind(rehearsal=record.rehearsal)
        if self.settings.dry_run:
            log.info("would_release_rehearsal", deadline=record.deadline.isoformat())
            return
        wait = (record.deadline - self.clock()).total_seconds()
        if wait > 0:
            await asyncio.sleep(wait)
        delay, said = 1.0, False
        while True:
            try:
                refused = await self._release_once(node, record, log)
            except Exception as exc:  # a timeout, the API server away: as a refusal
                refused = repr(exc)
            if refused is None:
                return
            log.warning("rehearsal_release_failed", error=refused, retry_in=delay)
            if not said:
                said = True
                self.events.record(
                    node,
                    "SpotdRehearsalNotReleased",
                    f"rehearsal {record.rehearsal}: the release failed ({refused}); the controller tries again",
                    "Warning",
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 60.0)

    async def _release_once(self, node: str, record: RehearsalRecord, log: Any) -> str | None:
        """One try of the release: None when it is done (released, held, or nothing left to do), else why
        the API server refused it."""
        status = 0
        for _ in range(5):  # the taints are replaced whole: conditional on the resourceVersion read
            status, body = await read_node(self.client, node)
            if status == 404:
                log.info("rehearsal_not_released", reason="the node is gone")
                return None
            if status != 200:
                return f"read answered {status}"
            meta = body.get("metadata") or {}
            annotations = meta.get("annotations") or {}
            try:
                current = rehearsal_record(annotations)
            except UnreadableRehearsal:
                current = None
            if current is None or current.rehearsal != record.rehearsal:
                log.warning("rehearsal_not_released", reason="its record is no longer on the node")
                return None
            spec = body.get("spec") or {}
            held = release_hold(annotations, spec, record, self.clock())
            patch: dict[str, Any] = {
                "metadata": {
                    "resourceVersion": meta.get("resourceVersion"),
                    "annotations": {QUEUE_REHEARSAL_ANNOTATION: None},
                }
            }
            if held is None:
                patch["spec"] = release_patch(annotations, spec, record)
            status = await merge_patch_node(self.client, node, patch)
            if status == 409:
                continue
            if not patched(status):
                return f"patch answered {status}"
            if held is not None:
                reason, real = held
                log.warning("rehearsal_not_released", reason=reason)
                message = f"rehearsal {record.rehearsal} over; the node is left as it is: {reason}"
                left = [
                    w
                    for w, on in (("cordoned", spec.get("unschedulable")), ("tainted", has_interruption_taint(spec)))
                    if on
                ]
                if real or not left:
                    self.events.record(node, "SpotdRehearsalHeld", message)
                else:  # what stays may be the rehearsal's own: someone must look
                    message += (
                        f"; it stays {' and '.join(left)}: uncordon it and remove the {INTERRUPTION_TAINT_KEY} "
                        "taint if nothing else should hold it"
                    )
                    self.events.record(node, "SpotdRehearsalHeld", message, "Warning")
                return None
            log.info("rehearsal_released")
            message = f"rehearsal {record.rehearsal} over: node released"
            self.events.record(node, "SpotdRehearsalReleased", message)
            return None
        return f"the node changed under every patch ({status})"

    async def _drop_rehearsal_record(self, node: str, log: Any) -> None:
        """A real notice took the node from a rehearsal: its record goes, so no leader releases the node for
        it (best effort: a record left is held at the release by the real notice on the node)."""
        try:
            for _ in range(5):
                status, body = await read_node(self.client, node)
                meta = body.get("metadata") or {}
                if status != 200 or QUEUE_REHEARSAL_ANNOTATION not in (meta.get("annotations") or {}):
                    return
                patch = {
                    "metadata": {
                        "resourceVersion": meta.get("resourceVersion"),
                        "annotations": {QUEUE_REHEARSAL_ANNOTATION: None},
                    }
                }
                status = await merge_patch_node(self.client, node, patch)
                if status != 409:
                    log.info("rehearsal_record_dropped", status=status)
                    return
        except Exception as exc:  # the real takeover matters more
            log.warning("rehearsal_record_not_dropped", error=repr(exc))

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
