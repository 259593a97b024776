"""The agent's node responder: turns the notices present now into node changes and a drain.

It holds what the agent is acting on (also kept on the node as annotations, so a restarted agent resumes),
asks spotd.agent.policy what to do, and has spotd.kube do it. Alerts and Events are fire-and-forget, and so
are the node's taint, cordon, label and annotations: a background writer retries them, and the drain
starts at once whatever they answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from spotd.agent.metrics import NOTICE_ACTIVE, NOTICES
from spotd.agent.node_client import NodeClient
from spotd.agent.node_patch import AgentState, NodeView, notice_patch, release_patch
from spotd.agent.policy import NoticePolicy, Response, Step, choose_response, plan_release
from spotd.alerts.model import AlertNode, node_drain_incomplete_alert, spot_interruption_alert
from spotd.alerts.sender import Alerter
from spotd.common.metrics import LOOP_ERRORS
from spotd.common.waits import wait_set
from spotd.drain.executor import DrainOptions, DrainResult, drain_node
from spotd.drain.metrics import PODS_LEFT
from spotd.kube.events import EventRecorder
from spotd.kube.keys import NOTICE_ANNOTATION, STATE_ANNOTATION
from spotd.kube.ratelimit import RateLimiter
from spotd.notices.episodes import IMDS, QUEUE, first_witness
from spotd.notices.metrics import EPISODE_SIGHTINGS, NOTICE_TO_CORDON
from spotd.notices.record import MalformedNotice, Notice, NoticeKind

_PATCH_TRIES = 5
_PatchGoal = tuple[Callable[[NodeView], dict[str, Any] | None], str, Response | None]


@dataclass(frozen=True)
class Sighting:
    """What the sources say now. complete_for: kinds whose absence from `notices` means they are gone."""

    notices: tuple[Notice, ...]
    complete_for: frozenset[NoticeKind]


class Responder:
    def __init__(
        self,
        nodes: NodeClient,
        events: EventRecorder,
        alerter: Alerter,
        policies: dict[NoticeKind, NoticePolicy],
        drain_options: DrainOptions,
        limiter: RateLimiter,
        log: Any,
    ) -> None:
        self.nodes = nodes
        self.events = events
        self.alerter = alerter
        self.policies = policies
        self.drain_options = drain_options
        self.limiter = limiter
        self.log = log.bind(node=nodes.name)
        self.view: NodeView | None = None
        self.instance = AlertNode(nodes.name, "", "", "")  # from IMDS, where the Node lacks a field
        self.acting: Notice | None = None
        self.state: AgentState | None = None
        self.drain_task: asyncio.Task[DrainResult | None] | None = None
        self.drain_failures = 0
        self.dry_run_shown: str | None = None  # --dry-run: the notice whose would-be patch was logged
        self.drain_stop = asyncio.Event()
        self.drained_key: str | None = None
        self.waiting_key: str | None = None
        self.lock = asyncio.Lock()
        # When the acting notice was taken up, on both clocks: deadlines are counted down on the monotonic one.
        self.anchor: tuple[float, datetime] = (time.monotonic(), datetime.now(UTC))
        self.node_goal: _PatchGoal | None = None  # what the background writer is to make true on the node
        self.node_wake = asyncio.Event()
        self.node_task: asyncio.Task[None] | None = None
        self.node_failures = 0
        self.unconfirmed = False  # the acting notice was resumed from the node and not seen since
        self.cordon_timed: str | None = None  # the notice whose cordon spotd_notice_to_cordon_seconds counted
        for kind, policy in policies.items():  # at 0 from the start: a series born at 1 is no rate() to Prometheus
            if Step.CORDON in policy.steps:
                NOTICE_TO_CORDON.labels(str(kind), "agent")

    # ---- state ----
    def resume_from(self, view: NodeView) -> None:
        """Pick up a notice a previous agent process was acting on."""
        self.view = view
        text = view.annotations.get(NOTICE_ANNOTATION)
        if not text:
            return
        try:
            self.acting = Notice.from_json(text)
        except MalformedNotice as exc:
            self.log.warning("notice_annotation_unreadable", error=str(exc))
            return
        self.state = AgentState.from_json(view.annotations.get(STATE_ANNOTATION))
        self.anchor = (time.monotonic(), datetime.now(UTC))
        self.unconfirmed = True  # until a source shows it again
        NOTICE_ACTIVE.labels(str(self.acting.kind)).set(1)
        self.log.info("notice_resumed", notice=self.acting.key, source=self.acting.source)

    def node_info(self) -> AlertNode:
        view = self.view or NodeView(self.nodes.name)
        imds = self.instance
        return AlertNode(
            self.nodes.name,
            view.instance_id or imds.instance_id,
            view.zone or imds.zone,
            view.instance_type or imds.instance_type,
        )

    @property
    def boot_changed(self) -> bool:
        return bool(self.state and self.view and self.state.boot_id and self.state.boot_id != self.view.boot_id)

    # ---- the one entry point ----
    async def reconcile(self, seen: Sighting, now: datetime | None = None) -> None:
        async with self.lock:
            await self._reconcile(seen, now or datetime.now(UTC))

    async def _reconcile(self, seen: Sighting, now: datetime) -> None:
        if self.acting is not None:
            source = next((n for n in seen.notices if n.key == self.acting.key), None)
            if self.unconfirmed and source is not None:
                self.unconfirmed = False
                # The annotation is anyone's to write: keep from it only what can make us act sooner.
                seen_at = min(self.acting.seen_at, source.seen_at)
                before = self.acting.absent_before
                before = before if before is not None and before <= seen_at else None
                self.acting = replace(source, seen_at=seen_at, absent_before=before)
                await self._stop_drain()  # restarted below with the deadline the source now vouches for
            complete = self.acting.kind in seen.complete_for
            verdict = plan_release(self.acting, seen.notices, complete, self.boot_changed, self.unconfirmed)
            if verdict.release:
                await self._release(verdict.reason)
        acting = self.acting
        # The acting notice stands for its own key: its first sighting is kept, so nothing churns.
        candidates = [n for n in seen.notices if acting is None or n.key != acting.key]
        if acting is not None:
            candidates.append(acting)
        choice = choose_response(candidates, self.policies, now)
        waiting = choice.waiting
        if waiting is not None and self.waiting_key != waiting.notice.key:
            self.waiting_key = waiting.notice.key
            self.log.info("notice_scheduled", notice=waiting.notice.key, act_at=waiting.act_at.isoformat())
            self.events.record(
                self.nodes.name, "NoticeScheduled", f"{waiting.reason}; acting at {waiting.act_at:%H:%M:%S}Z"
            )
        response = choice.due
        if response is None:
            return
        if acting is None or response.notice.key != acting.key:
            await self._act(response)
        elif self.view is not None and notice_patch(self.view, response, self._state_for(response)) is not None:
            self._apply(response)  # someone undid a step (kubectl uncordon): do it again
        if Step.DRAIN in response.steps:
            self._ensure_drain(response)

    # ---- acting ----
    def _state_for(self, response: Response) -> AgentState:
        schedulable_now = bool(self.view and not self.view.unschedulable)
        # Cordoned before our first step: someone else's cordon, kept on release. Once the node is
        # schedulable again (an operator uncordoned it), any cordon from here on is ours.
        prior = self.state.prior_unschedulable if self.state else not schedulable_now
        prior = prior and not schedulable_now
        boot_id = self.state.boot_id if self.state and self.state.notice_key else ""
        boot_id = boot_id or (self.view.boot_id if self.view else "")
        return AgentState(response.notice.key, tuple(str(s) for s in response.steps), prior, boot_id)

    async def _act(self, response: Response) -> None:
        notice = response.notice
        previous = self.acting
        self.log.info(
            "notice_received",
            notice=notice.key,
            kind=str(notice.kind),
            source=notice.source,
            deadline=notice.deadline.isoformat() if notice.deadline else None,
            steps=list(response.steps),
        )
        NOTICES.labels(str(notice.kind), notice.source).inc()
        if previous is not None:
            NOTICE_ACTIVE.labels(str(previous.kind)).set(0)
        NOTICE_ACTIVE.labels(str(notice.kind)).set(1)
        if self._first_witness(notice):
            self.alerter.fire(spot_interruption_alert(notice, self.node_info()))
        self.events.record(
            self.nodes.name,
            "SpotInterruptionNotice" if notice.kind == NoticeKind.SPOT_ITN else "NodeNotice",
            response.reason,
            "Warning",
        )
        if previous is not None and self.drain_task is not None and previous.deadline != notice.deadline:
            await self._stop_drain()  # a new deadline: restart the drain with it
        self.acting = notice
        self.anchor = (time.monotonic(), datetime.now(UTC))
        self._apply(response)

    def _first_witness(self, notice: Notice) -> bool:
        """One episode per kind (spotd.notices.episodes): when the controller recorded this one first from
        its queue, it raised the alert; the agent still acts (its drain is the one with the deadline)."""
        if notice.source == "simulation":
            return True
        annotations = self.view.annotations if self.view is not None else {}
        second = first_witness(annotations, str(notice.kind)) == QUEUE
        EPISODE_SIGHTINGS.labels(str(notice.kind), IMDS, "second" if second else "first").inc()
        if second:
            self.log.info("episode_seen_second", kind=str(notice.kind), first=QUEUE)
        return not second

    def _apply(self, response: Response) -> None:
        """Hand the node's new look to the background writer; returns at once."""
        if self.nodes.dry_run and self.dry_run_shown == response.notice.key:
            return  # nothing changes in a dry run: say it once per notice, not every poll
        self.dry_run_shown = response.notice.key if self.nodes.dry_run else None
        state = self._state_for(response)
        self.state = state
        self._want_node(lambda view: notice_patch(view, response, state), "notice", response)

    def _want_node(
        self, compute: Callable[[NodeView], dict[str, Any] | None], action: str, response: Response | None
    ) -> None:
        self.node_goal = (compute, action, response)
        self.node_wake.set()
        if self.node_task is None or self.node_task.done():
            self.node_task = asyncio.get_running_loop().create_task(self._write_node())

    async def _write_node(self) -> None:
        """Make the latest goal true on the node, retrying with back-off; failures are logged, counted
        (spotd_node_actions_total{outcome="error"}) and said once per run of failures in an Event."""
        while True:
            await self.node_wake.wait()
            self.node_wake.clear()
            goal = self.node_goal
            if goal is None:
                continue
            compute, action, response = goal
            try:
                done, before, after = await self._patch_node(compute, action)
            except Exception as exc:  # 5xx, 403, a webhook down, the API server away
                done, before, after = False, None, None
                self.log.warning("node_patch_failed", action=action, error=repr(exc), failures=self.node_failures + 1)
                if self.node_failures == 0:
                    self.events.record(
                        self.nodes.name, "NodePatchFailed", f"{action}: {exc!r} (retrying)"[:500], "Warning"
                    )
            if not done:
                self.node_failures += 1
                LOOP_ERRORS.labels("node_patch").inc()
                # a new goal ends the back-off early; wait_set keeps a shutdown's cancellation (wait_for lost it)
                await wait_set(self.node_wake, min(5.0, 0.1 * 2**self.node_failures))
                self.node_wake.set()
                continue
            self.node_failures = 0
            if self.node_goal is goal:
                self.node_goal = None
            if response is not None and before is not None and after is not None:
                self._log_steps(before, after, response)

    async def _patch_node(
        self, compute: Callable[[NodeView], dict[str, Any] | None], action: str
    ) -> tuple[bool, NodeView | None, NodeView | None]:
        """Patch from the freshest view, re-reading on 409: (done, view patched from, result); done is
        False when it gave up on conflicts. API errors raise."""
        for _ in range(_PATCH_TRIES):
            if self.view is None:
                self.view = await self.nodes.get()
            before = self.view  # the node watch may replace self.view while the patch is in flight
            patch = compute(before)
            if patch is None:
                return True, None, None
            updated = await self.nodes.patch(patch, action)
            if updated is None and self.nodes.dry_run:
                return True, None, None
            if updated is None:  # 409: someone changed the node; read it again and recompute
                self.view = await self.nodes.get()
                continue
            self.view = updated
            return True, before, updated
        self.log.error("node_patch_gave_up", action=action, notice=self.acting.key if self.acting else None)
        return False, None, None

    def _log_steps(self, before: NodeView, after: NodeView, response: Response) -> None:
        node = self.nodes.name
        if Step.TAINT in response.steps and before.taints != after.taints:
            self.log.info("node_tainted", notice=response.notice.key, effect=response.taint_effect)
            self.events.record(
                node, "NodeTainted", f"spotd.io/interruption={response.taint_value}:{response.taint_effect}"
            )
        if not before.unschedulable and after.unschedulable:
            self.log.info("node_cordoned", notice=response.notice.key)
            self._time_cordon(response)
            self.events.record(node, "NodeCordoned", f"cordoned for {response.reason}")
        if Step.EXCLUDE_LB in response.steps and before.labels != after.labels:
            self.log.info("node_excluded_from_load_balancers", notice=response.notice.key)
            self.events.record(node, "ExcludedFromLoadBalancers", "labelled out of external load balancers")

    def _time_cordon(self, response: Response) -> None:
        """Count the time from the notice being due (its first sighting, or its act_at) to its first cordon;
        a cordon made again (after kubectl uncordon) is not counted twice."""
        if self.cordon_timed == response.notice.key:
            return
        self.cordon_timed = response.notice.key
        mono, wall = self.anchor  # the monotonic clock since the notice was taken up: a clock step moves nothing
        seconds = (wall - response.act_at).total_seconds() + time.monotonic() - mono
        NOTICE_TO_CORDON.labels(str(response.notice.kind), "agent").observe(max(0.0, seconds))

    # ---- draining ----
    def _ensure_drain(self, response: Response) -> None:
        key = response.notice.key
        if self.drained_key == key or (self.drain_task is not None and not self.drain_task.done()):
            return
        self.drain_stop = asyncio.Event()
        self.drain_task = asyncio.get_running_loop().create_task(self._drain(response))

    async def _drain(self, response: Response) -> DrainResult | None:
        try:
            result = await self._drain_once(response)
            self.drain_failures = 0
            return result
        except Exception as exc:  # e.g. RBAC forbids listing pods: say so, back off, let reconcile retry
            self.drain_failures += 1
            LOOP_ERRORS.labels("drain").inc()
            self.log.error("drain_failed", notice=response.notice.key, error=repr(exc), failures=self.drain_failures)
            if self.drain_failures == 1:
                self.events.record(self.nodes.name, "DrainFailed", f"drain could not run: {exc!r}"[:500], "Warning")
            await wait_set(self.drain_stop, min(30.0, 0.5 * 2**self.drain_failures))  # a stop ends it too
            return None

    def _counted_down(self, when: datetime | None) -> datetime | None:
        """`when` as read at the anchor, moved by the monotonic time since: a wall-clock step does not move it."""
        if when is None:
            return None
        mono, wall = self.anchor
        return datetime.now(UTC) + (when - wall) - timedelta(seconds=time.monotonic() - mono)

    def _overdue(self, response: Response, left: tuple[str, ...]) -> None:
        """Pods still on the node at a maintenance's NotBefore: say so; the drain goes on."""
        self.events.record(self.nodes.name, "DrainIncomplete", f"pods left at NotBefore: {', '.join(left)}", "Warning")
        self.alerter.fire(node_drain_incomplete_alert(self.node_info(), left, response.report_at))

    async def _drain_once(self, response: Response) -> DrainResult:
        node, notice = self.nodes.name, response.notice
        self.events.record(node, "DrainStarted", f"draining for {response.reason}")
        options = self.drain_options
        deadline = self._counted_down(response.deadline)
        if not response.deadline_action:  # rehearsals and maintenance never delete
            options = replace(options, deadline_action="leave")
        if self.unconfirmed:
            # Read back from the node only (anyone who may patch the Node could have written it): until a
            # source shows it, evictions as a voluntary drain, pods' own graces, no deadline action.
            options, deadline = replace(options, deadline_action="leave"), None
        result = await drain_node(
            self.nodes.client,
            node,
            options,
            deadline,
            log=self.log.bind(notice=notice.key),
            limiter=self.limiter,
            stop=self.drain_stop,
            overdue_at=self._counted_down(response.report_at),
            on_overdue=lambda left: self._overdue(response, left),
        )
        self.log.info(
            "drain_finished",
            notice=notice.key,
            outcome=result.outcome,
            seconds=round(result.duration, 3),
            evicted=len(result.evicted),
            forced=list(result.forced),
            left=list(result.left),
            skipped=len(result.skipped),
        )
        if result.outcome == "complete":
            self.events.record(node, "DrainComplete", f"{len(result.evicted)} pods evicted in {result.duration:.1f}s")
        elif result.outcome in ("incomplete", "blocked"):
            pods = ", ".join(result.left or result.blocked)
            self.events.record(node, "DrainIncomplete", f"pods left at the deadline: {pods}", "Warning")
            self.alerter.fire(
                node_drain_incomplete_alert(self.node_info(), result.left or result.blocked, response.deadline)
            )
        if result.forced:
            self.events.record(
                node, "PodsDeletedAtDeadline", "deleted at the deadline: " + ", ".join(result.forced), "Warning"
            )
        if result.outcome != "interrupted":
            self.drained_key = notice.key
        return result

    async def _stop_drain(self) -> None:
        if self.drain_task is not None and not self.drain_task.done():
            self.drain_stop.set()
            await asyncio.gather(self.drain_task, return_exceptions=True)
        self.drain_task = None

    # ---- releasing ----
    async def _release(self, reason: str) -> None:
        acting = self.acting
        assert acting is not None
        await self._stop_drain()
        state = self.state

        def compute(view: NodeView) -> dict[str, Any] | None:
            return release_patch(view, state)

        try:  # once in line, so that a notice coming next computes from the released node
            done, _, _ = await self._patch_node(compute, "release")
        except Exception as exc:
            done = False
            self.log.warning("node_patch_failed", action="release", error=repr(exc))
        if done:
            if self.node_goal is not None and self.node_goal[1] == "notice":
                self.node_goal = None  # what the released notice wanted is moot
        else:
            self._want_node(compute, "release", None)
        PODS_LEFT.set(0)
        self.log.info("notice_released", notice=acting.key, reason=reason, written=done)
        # Say what the node holds now: a release the API refused is still the background writer's to do.
        if done:
            self.events.record(
                self.nodes.name, "NoticeReleased", f"{acting.kind}: {reason}; our taint and cordon removed"
            )
        else:
            self.events.record(
                self.nodes.name,
                "NoticeReleased",
                f"{acting.kind}: {reason}; the node could not be written yet: retrying to remove our taint and cordon",
                "Warning",
            )
        self.alerter.resolve("SpotInterruptionNotice", spot_interruption_alert(acting, self.node_info()).labels)
        NOTICE_ACTIVE.labels(str(acting.kind)).set(0)
        self.acting, self.state, self.drained_key, self.unconfirmed = None, None, None, False
        self.cordon_timed = None

    async def close(self) -> None:
        """On shutdown: stop the drain in flight; the node annotation records where it stopped."""
        if self.drain_task is not None and not self.drain_task.done():
            self.log.warning("drain_interrupted_by_shutdown", notice=self.acting.key if self.acting else None)
        await self._stop_drain()
        if self.node_task is not None:
            self.node_task.cancel()
            await asyncio.gather(self.node_task, return_exceptions=True)
