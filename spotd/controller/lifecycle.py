"""ASG lifecycle hooks (issue 19): a terminate hook is completed with CONTINUE only after the node's drain
ends, and heartbeated while it runs; a launch hook is completed when the node is Ready (opt-in).

A terminate lifecycle action read from the queue for a node of this cluster is written on the Node
(spotd.io/lifecycle-hook: JSON, one entry per token, with the ASG, the hook, the instance, the hook's
HeartbeatTimeout and the drain's deadline) before its message is deleted, so that a new leader resumes
the heartbeats and the completion after a failover. The drain is the agent's (it hears the same
termination from IMDS) or, with the agent silent, the controller's takeover (spotd.controller.takeover):
whichever runs it, it has ended when no pod is left to drain on the node (DaemonSet, mirror and finished
pods are never drained), or when its deadline passed, what was left then named in the log and the Event.
Only then CONTINUE. A terminate is never ABANDONed: the hook's own DefaultResult applies only if spotd
never completes it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from spotd.capacity.sources.lifecycle import CONTINUE, LifecycleActionGone, LifecycleActions
from spotd.common.metrics import LOOP_ERRORS
from spotd.common.parsing import format_time, parse_iso_time
from spotd.controller.metrics import LIFECYCLE_ACTIONS, LIFECYCLE_HEARTBEATS
from spotd.inventory.records import POD_DAEMONSET, POD_MIRROR, POD_TERMINAL, NodeInfo, PodRecord
from spotd.kube.client import http_of
from spotd.kube.events import EventRecorder
from spotd.kube.nodes import merge_patch_node, patched, read_node
from spotd.notices.queue_events import ASG_TERMINATION, InstanceEvent

# the controller: the terminate lifecycle actions it completes for this node, JSON {token: {...}}
LIFECYCLE_ANNOTATION = "spotd.io/lifecycle-hook"
# AWS's least HeartbeatTimeout: what the heartbeat interval assumes when the hook's is unknown
MIN_HEARTBEAT_TIMEOUT = 30.0
TERMINATE, LAUNCH = "terminate", "launch"

Spawn = Callable[[Coroutine[Any, Any, None]], "asyncio.Task[None] | None"]


class HookNotRecorded(RuntimeError):
    """The Node could not be read or patched: the message goes back to the queue and is tried again."""


# --- the record on the Node (pure) ------------------------------------------------------------------------


@dataclass(frozen=True)
class HookAction:
    """One terminate lifecycle action: what completing it needs, and when the drain's time is up.

    received: when the queue delivered it; deadline: the drain's (received + --asg-termination-window, as
    the agent gives an ASG termination); heartbeat_timeout: the hook's, from DescribeLifecycleHooks (None:
    unknown, the heartbeats then assume AWS's least)."""

    asg: str
    hook: str
    token: str
    instance_id: str
    received: datetime
    deadline: datetime
    heartbeat_timeout: float | None = None

    def to_entry(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "asg": self.asg,
            "hook": self.hook,
            "instance": self.instance_id,
            "received": format_time(self.received),
            "deadline": format_time(self.deadline),
        }
        if self.heartbeat_timeout is not None:
            entry["heartbeat_timeout"] = self.heartbeat_timeout
        return entry

    @classmethod
    def from_entry(cls, token: str, entry: Any) -> HookAction | None:
        if not isinstance(entry, dict):
            return None
        try:
            timeout = entry.get("heartbeat_timeout")
            return cls(
                asg=str(entry["asg"]),
                hook=str(entry["hook"]),
                token=token,
                instance_id=str(entry["instance"]),
                received=parse_iso_time(str(entry["received"])),
                deadline=parse_iso_time(str(entry["deadline"])),
                heartbeat_timeout=float(timeout) if timeout is not None else None,
            )
        except (KeyError, TypeError, ValueError):
            return None

    def event(self) -> InstanceEvent:
        """The termination as the takeover follows it (the deadline kept from the first receipt)."""
        return InstanceEvent(
            ASG_TERMINATION,
            (self.instance_id,),
            at=self.received,
            deadline=self.deadline,
            action="terminate",
            asg=self.asg,
            hook=self.hook,
            token=self.token,
        )


def read_hook_actions(annotations: Mapping[str, str]) -> dict[str, HookAction]:
    """token -> action, from the node's annotation ({} when absent or unreadable)."""
    text = annotations.get(LIFECYCLE_ANNOTATION)
    if not text:
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    found = {token: HookAction.from_entry(token, entry) for token, entry in data.items()}
    return {token: action for token, action in found.items() if action is not None}


def hook_actions_patch(
    annotations: Mapping[str, str], resource_version: str, add: HookAction | None = None, remove: str = ""
) -> dict[str, Any] | None:
    """The merge patch adding or removing one action, conditional on the resourceVersion read; None when
    there is nothing to change (added already: a redelivered message keeps its first deadline)."""
    actions = read_hook_actions(annotations)
    if add is not None:
        if add.token in actions:
            return None
        actions[add.token] = add
    if remove:
        if remove not in actions:
            return None
        del actions[remove]
    value: str | None = None
    if actions:
        value = json.dumps({t: a.to_entry() for t, a in actions.items()}, sort_keys=True, separators=(",", ":"))
    return {"metadata": {"resourceVersion": resource_version, "annotations": {LIFECYCLE_ANNOTATION: value}}}


# --- decisions (pure) -------------------------------------------------------------------------------------


def heartbeat_interval(timeout: float | None) -> float:
    """A third of the hook's HeartbeatTimeout (two more chances before it runs out), at least 1 s."""
    return max(1.0, (timeout if timeout and timeout > 0 else MIN_HEARTBEAT_TIMEOUT) / 3)


def pods_to_drain(pods: Iterable[PodRecord]) -> list[str]:
    """The pods an interruption drain waits for: all but DaemonSet, mirror and finished ones (a pod being
    deleted still runs until it is gone)."""
    return sorted(p.key for p in pods if not p.flags & (POD_DAEMONSET | POD_MIRROR | POD_TERMINAL))


@dataclass(frozen=True)
class HookVerdict:
    complete: bool
    reason: str
    left: tuple[str, ...] = ()


def terminate_verdict(present: bool, left: Sequence[str], now: datetime, deadline: datetime) -> HookVerdict:
    """Whether the node's drain has ended, so that its terminate action may be completed (CONTINUE)."""
    if not present:
        return HookVerdict(True, "the node is gone")
    if not left:
        return HookVerdict(True, "drained: no pod left to drain")
    if now >= deadline:
        return HookVerdict(True, f"drain deadline {format_time(deadline)} passed", tuple(left))
    return HookVerdict(False, f"{len(left)} pods left to drain before {format_time(deadline)}", tuple(left))


def launch_verdict(node: NodeInfo | None, our_asg: bool, now: datetime, expires: datetime) -> str:
    """A launch action: "complete" (its node is Ready), "wait" (an ASG of ours, the node not Ready yet),
    "expired" (the hook ran out meanwhile: AWS applied its DefaultResult), "foreign" (not ours)."""
    if node is not None and node.ready:
        return "complete"
    if node is None and not our_asg:
        return "foreign"
    return "expired" if now >= expires else "wait"


# --- following the actions --------------------------------------------------------------------------------


@dataclass(frozen=True)
class HookSettings:
    asg_termination_window: float = 120.0
    complete_launch_hooks: bool = False
    dry_run: bool = False
    poll: float = 1.0  # how often the node's pods are looked at (the inventory: no API call)
    retry: float = 5.0  # after a failed heartbeat or completion


@dataclass(frozen=True)
class InventoryReads:
    """What the follower reads of the inventory (no API call): present(node), pods_left(node), the
    deadline the node's agent records (agent_deadline), the node of an instance, the ASGs of this cluster."""

    present: Callable[[str], bool]
    pods_left: Callable[[str], list[str]]
    agent_deadline: Callable[[str], datetime | None]
    node_of_instance: Callable[[str], NodeInfo | None]
    our_asg: Callable[[str], bool]


class LifecycleHooks:
    """Terminate actions followed to their completion (one task per token); launch actions completed."""

    def __init__(
        self,
        actions: LifecycleActions,
        client: Any,
        events: EventRecorder,
        log: Any,
        clock: Callable[[], datetime],
        view: InventoryReads,
        settings: HookSettings,
        resumed: Callable[[str, HookAction], object] | None = None,
    ) -> None:
        self.actions, self.client, self.events, self.log, self.clock = actions, client, events, log, clock
        self.view = view
        self.settings = settings
        self.resumed = resumed  # a new leader resumes an action: the controller follows the takeover again
        self.running: dict[str, asyncio.Task[None]] = {}

    async def on_terminate(self, spawn: Spawn, node: NodeInfo, event: InstanceEvent) -> None:
        """A terminate action for a node of ours: recorded on the Node (HookNotRecorded: not recorded, the
        message goes back to the queue), then followed until its drain ends."""
        timeout = await self._heartbeat_timeout(event.asg, event.hook)
        received = self.clock()
        action = HookAction(
            event.asg,
            event.hook,
            event.token,
            node.instance_id,
            received,
            received + timedelta(seconds=self.settings.asg_termination_window),
            timeout,
        )
        action = await self._record(node.name, action)
        self.follow(spawn, node.name, action)

    async def _heartbeat_timeout(self, asg: str, hook: str) -> float | None:
        try:
            timeout = await self.actions.heartbeat_timeout(asg, hook)
        except Exception as exc:  # the heartbeats assume AWS's least timeout
            LOOP_ERRORS.labels("lifecycle").inc()
            self.log.warning("lifecycle_hook_unread", asg=asg, hook=hook, error=repr(exc))
            return None
        if timeout is None:
            self.log.warning("lifecycle_hook_not_found", asg=asg, hook=hook)
        return timeout

    async def _record(self, node: str, action: HookAction) -> HookAction:
        """Write the action on the Node (kept as first recorded when there already); returns what is there."""
        if self.settings.dry_run:
            self.log.info("would_record_lifecycle_action", node=node, asg=action.asg, hook=action.hook)
            return action
        for _ in range(5):  # 409: the node changed since read
            status, body = await read_node(self.client, node)
            if status != 200:
                raise HookNotRecorded(f"node {node}: read answered {status}")
            meta = body.get("metadata") or {}
            annotations = meta.get("annotations") or {}
            patch = hook_actions_patch(annotations, str(meta.get("resourceVersion", "")), add=action)
            if patch is None:
                return read_hook_actions(annotations)[action.token]
            status = await merge_patch_node(self.client, node, patch)
            if status == 409:
                continue
            if not patched(status):
                raise HookNotRecorded(f"node {node}: patch answered {status}")
            self.log.info(
                "lifecycle_action_recorded",
                node=node,
                asg=action.asg,
                hook=action.hook,
                heartbeat_timeout=action.heartbeat_timeout,
                deadline=format_time(action.deadline),
            )
            return action
        raise HookNotRecorded(f"node {node}: changed under every patch")

    async def _forget(self, node: str, token: str) -> None:
        """Remove a finished action from the Node (best effort: the node is going away)."""
        if self.settings.dry_run:
            return
        for _ in range(5):
            status, body = await read_node(self.client, node)
            if status != 200:
                return
            meta = body.get("metadata") or {}
            patch = hook_actions_patch(
                meta.get("annotations") or {}, str(meta.get("resourceVersion", "")), remove=token
            )
            if patch is None:
                return
            status = await merge_patch_node(self.client, node, patch)
            if status != 409:
                return

    def follow(self, spawn: Spawn, node: str, action: HookAction) -> None:
        """Heartbeat and complete this action, unless it is followed already."""
        if action.token in self.running:
            return
        task = spawn(self._follow(node, action))
        if task is not None:
            self.running[action.token] = task
            task.add_done_callback(lambda _t: self.running.pop(action.token, None))

    async def _follow(self, node: str, action: HookAction) -> None:
        log = self.log.bind(node=node, asg=action.asg, hook=action.hook, instance=action.instance_id)
        loop = asyncio.get_running_loop()
        interval = heartbeat_interval(action.heartbeat_timeout)
        next_beat = loop.time()  # at once: after a failover nobody knows when the last one was
        while True:
            agent = self.view.agent_deadline(node)
            deadline = max(action.deadline, agent) if agent is not None else action.deadline
            verdict = terminate_verdict(self.view.present(node), self.view.pods_left(node), self.clock(), deadline)
            if verdict.complete:
                if await self._complete(node, action, verdict, log):
                    return
                next_beat = min(next_beat, loop.time() + self.settings.retry)
            elif loop.time() >= next_beat:
                beat = await self._heartbeat(action, log)
                if beat == "gone":
                    await self._forget(node, action.token)
                    return
                next_beat = loop.time() + (interval if beat == "ok" else min(interval, self.settings.retry))
            await asyncio.sleep(max(0.0, min(self.settings.poll, next_beat - loop.time())))

    async def _heartbeat(self, action: HookAction, log: Any) -> str:
        if self.settings.dry_run:
            LIFECYCLE_HEARTBEATS.labels("dry_run").inc()
            log.info("would_heartbeat_lifecycle_action")
            return "ok"
        try:
            await self.actions.heartbeat(action.asg, action.hook, action.token, action.instance_id)
        except LifecycleActionGone as exc:
            LIFECYCLE_HEARTBEATS.labels("gone").inc()
            log.warning("lifecycle_action_gone", error=str(exc))
            return "gone"
        except Exception as exc:  # throttling was retried already; the next beat comes sooner
            LIFECYCLE_HEARTBEATS.labels("failed").inc()
            LOOP_ERRORS.labels("lifecycle").inc()
            log.warning("lifecycle_heartbeat_failed", error=repr(exc))
            return "failed"
        LIFECYCLE_HEARTBEATS.labels("ok").inc()
        log.debug("lifecycle_heartbeat")
        return "ok"

    async def _complete(self, node: str, action: HookAction, verdict: HookVerdict, log: Any) -> bool:
        """CONTINUE; True once nothing more is to be done for the action."""
        left = ", ".join(verdict.left)
        if self.settings.dry_run:
            LIFECYCLE_ACTIONS.labels(TERMINATE, "dry_run").inc()
            log.info("would_complete_lifecycle_action", result=CONTINUE, reason=verdict.reason, left=list(verdict.left))
            return True
        completed = False
        try:
            await self.actions.complete(action.asg, action.hook, action.token, action.instance_id, CONTINUE)
        except LifecycleActionGone as exc:
            LIFECYCLE_ACTIONS.labels(TERMINATE, "gone").inc()
            log.warning("lifecycle_action_gone", error=str(exc))
        except Exception as exc:
            LIFECYCLE_ACTIONS.labels(TERMINATE, "failed").inc()
            LOOP_ERRORS.labels("lifecycle").inc()
            log.warning("lifecycle_complete_failed", error=repr(exc))
            return False
        else:
            completed = True
            LIFECYCLE_ACTIONS.labels(TERMINATE, "continue").inc()
            log.warning("lifecycle_action_completed", result=CONTINUE, reason=verdict.reason, left=list(verdict.left))
        # Off the Node before the Event: whoever reads the Event finds no pending action there to resume.
        await self._forget(node, action.token)
        if completed:
            message = f"lifecycle hook {action.hook} of {action.asg} completed (CONTINUE): {verdict.reason}"
            if verdict.left:
                self.events.record(node, "SpotdLifecycleContinued", f"{message}; left: {left}"[:1000], "Warning")
            else:
                self.events.record(node, "SpotdLifecycleContinued", message)
        return True

    async def resume(self, spawn: Spawn) -> int:
        """At the start of a term: follow every action a previous leader recorded on the Nodes (one list of
        Nodes). Returns how many."""
        resp = await http_of(self.client).get("/api/v1/nodes")
        resp.raise_for_status()
        count = 0
        for item in resp.json().get("items") or []:
            meta = item.get("metadata") or {}
            for action in read_hook_actions(meta.get("annotations") or {}).values():
                name = str(meta.get("name", ""))
                self.log.info("lifecycle_action_resumed", node=name, asg=action.asg, hook=action.hook)
                self.follow(spawn, name, action)
                if self.resumed is not None:
                    self.resumed(name, action)
                count += 1
        return count

    async def on_launch(self, event: InstanceEvent) -> str:
        """A launch action (--complete-launch-hooks): CONTINUE once the instance's node is Ready. Until
        then the message is "deferred" (not deleted: SQS gives it back after the visibility timeout, and
        is the record a new leader reads); "foreign" when neither the node nor the ASG is ours."""
        (iid,) = event.instance_ids[:1] or ("",)
        node = self.view.node_of_instance(iid)
        timeout = await self._heartbeat_timeout(event.asg, event.hook)
        expires = event.at + timedelta(seconds=timeout or MIN_HEARTBEAT_TIMEOUT)
        verdict = launch_verdict(node, self.view.our_asg(event.asg), self.clock(), expires)
        log = self.log.bind(instance=iid, asg=event.asg, hook=event.hook, node=node.name if node else None)
        if verdict in ("foreign", "wait", "expired"):
            if verdict != "foreign":
                LIFECYCLE_ACTIONS.labels(LAUNCH, verdict).inc()
                log.info("lifecycle_launch_" + verdict)
            return {"wait": "deferred", "expired": "handled"}.get(verdict, "foreign")
        assert node is not None
        if self.settings.dry_run:
            LIFECYCLE_ACTIONS.labels(LAUNCH, "dry_run").inc()
            log.info("would_complete_lifecycle_action", result=CONTINUE, reason="node Ready")
            return "handled"
        try:
            await self.actions.complete(event.asg, event.hook, event.token, iid, CONTINUE)
        except LifecycleActionGone as exc:
            LIFECYCLE_ACTIONS.labels(LAUNCH, "gone").inc()
            log.warning("lifecycle_action_gone", error=str(exc))
            return "handled"
        LIFECYCLE_ACTIONS.labels(LAUNCH, "continue").inc()
        log.info("lifecycle_action_completed", result=CONTINUE, reason="node Ready")
        self.events.record(node.name, "SpotdLifecycleContinued", f"launch hook {event.hook} completed: node Ready")
        return "handled"
