"""The agent's node responder: turns the notices present now into node changes and a drain.

It holds what the agent is acting on (also kept on the node as annotations, so a restarted agent resumes),
asks spotd.decide what to do, and has spotd.kube do it. Alerts and Events are fire-and-forget.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from spotd.agent.metrics import NOTICE_ACTIVE, NOTICES
from spotd.agent.node_client import NodeClient
from spotd.agent.node_patch import AgentState, NodeView, notice_patch, release_patch
from spotd.agent.policy import NoticePolicy, Response, Step, governing_notice, plan_release, plan_response
from spotd.alerts.model import AlertNode, node_drain_incomplete_alert, spot_interruption_alert
from spotd.alerts.sender import Alerter
from spotd.common.metrics import LOOP_ERRORS
from spotd.drain.executor import DrainOptions, DrainResult, drain_node
from spotd.kube.events import EventRecorder
from spotd.kube.keys import NOTICE_ANNOTATION, STATE_ANNOTATION
from spotd.kube.ratelimit import RateLimiter
from spotd.notices.record import MalformedNotice, Notice, NoticeKind

_PATCH_TRIES = 5


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
            complete = self.acting.kind in seen.complete_for
            verdict = plan_release(self.acting, seen.notices, complete, self.boot_changed)
            if verdict.release:
                await self._release(verdict.reason)
        candidates = list(seen.notices)
        if self.acting is not None:
            candidates.append(self.acting)
        notice = governing_notice(candidates)
        if notice is None:
            return
        if self.acting is not None and notice.key == self.acting.key:
            notice = self.acting  # keep the first sighting, so the annotation does not churn
        response = plan_response(notice, self.policies)
        if not response.due(now):
            if self.waiting_key != notice.key:
                self.waiting_key = notice.key
                self.log.info("notice_scheduled", notice=notice.key, act_at=response.act_at.isoformat())
                self.events.record(
                    self.nodes.name, "NoticeScheduled", f"{response.reason}; acting at {response.act_at:%H:%M:%S}Z"
                )
            return
        if self.acting is None or notice.key != self.acting.key:
            await self._act(response)
        elif self.view is not None and notice_patch(self.view, response, self._state_for(response)) is not None:
            await self._apply(response)  # someone undid a step (kubectl uncordon): do it again
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
        self.alerter.fire(spot_interruption_alert(notice, self.node_info()))
        self.events.record(
            self.nodes.name,
            "SpotInterruptionNotice" if notice.kind == NoticeKind.SPOT_ITN else "NodeNotice",
            response.reason,
            "Warning",
        )
        if previous is not None and self.drain_task is not None and previous.deadline != notice.deadline:
            await self._stop_drain()  # a new deadline: restart the drain with it
        await self._apply(response)
        self.acting = notice

    async def _apply(self, response: Response) -> None:
        if self.nodes.dry_run and self.dry_run_shown == response.notice.key:
            return  # nothing changes in a dry run: say it once per notice, not every poll
        self.dry_run_shown = response.notice.key if self.nodes.dry_run else None
        state = self._state_for(response)
        before, after = await self._patch_node(lambda view: notice_patch(view, response, state), "notice")
        if before is not None and after is not None:
            self._log_steps(before, after, response)
        self.state = state

    async def _patch_node(
        self, compute: Callable[[NodeView], dict[str, Any] | None], action: str
    ) -> tuple[NodeView | None, NodeView | None]:
        """Patch from the freshest view, re-reading on 409; (view patched from, result) or Nones if nothing
        was needed, it was a dry run, or it gave up."""
        for _ in range(_PATCH_TRIES):
            if self.view is None:
                self.view = await self.nodes.get()
            before = self.view  # the node watch may replace self.view while the patch is in flight
            patch = compute(before)
            if patch is None:
                return None, None
            updated = await self.nodes.patch(patch, action)
            if updated is None and self.nodes.dry_run:
                return None, None
            if updated is None:  # 409: someone changed the node; read it again and recompute
                self.view = await self.nodes.get()
                continue
            self.view = updated
            return before, updated
        self.log.error("node_patch_gave_up", action=action, notice=self.acting.key if self.acting else None)
        return None, None

    def _log_steps(self, before: NodeView, after: NodeView, response: Response) -> None:
        node = self.nodes.name
        if Step.TAINT in response.steps and before.taints != after.taints:
            self.log.info("node_tainted", notice=response.notice.key, effect=response.taint_effect)
            self.events.record(
                node, "NodeTainted", f"spotd.io/interruption={response.taint_value}:{response.taint_effect}"
            )
        if not before.unschedulable and after.unschedulable:
            self.log.info("node_cordoned", notice=response.notice.key)
            self.events.record(node, "NodeCordoned", f"cordoned for {response.reason}")
        if Step.EXCLUDE_LB in response.steps and before.labels != after.labels:
            self.log.info("node_excluded_from_load_balancers", notice=response.notice.key)
            self.events.record(node, "ExcludedFromLoadBalancers", "labelled out of external load balancers")

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
            with contextlib.suppress(TimeoutError):  # a stop (release, shutdown) ends the back-off too
                await asyncio.wait_for(self.drain_stop.wait(), min(30.0, 0.5 * 2**self.drain_failures))
            return None

    async def _drain_once(self, response: Response) -> DrainResult:
        node, notice = self.nodes.name, response.notice
        self.events.record(node, "DrainStarted", f"draining for {response.reason}")
        result = await drain_node(
            self.nodes.client,
            node,
            self.drain_options,
            response.deadline,
            log=self.log.bind(notice=notice.key),
            limiter=self.limiter,
            stop=self.drain_stop,
        )
        self.log.info(
            "drain_finished",
            notice=notice.key,
            outcome=result.outcome,
            seconds=round(result.duration, 3),
            evicted=len(result.evicted),
            deleted=len(result.deleted),
            forced=list(result.forced),
            left=list(result.left),
            skipped=len(result.skipped),
        )
        if result.outcome == "complete":
            self.events.record(
                node,
                "DrainComplete",
                f"{len(result.evicted)} pods evicted, "
                f"{len(result.deleted)} completed pods deleted in {result.duration:.1f}s",
            )
        elif result.outcome in ("incomplete", "blocked"):
            pods = ", ".join(result.left or result.blocked)
            self.events.record(node, "DrainIncomplete", f"pods left at the deadline: {pods}", "Warning")
            self.alerter.fire(
                node_drain_incomplete_alert(self.node_info(), result.left or result.blocked, response.deadline)
            )
        if result.forced:
            self.events.record(
                node, "PodsForceDeleted", "deleted at the deadline: " + ", ".join(result.forced), "Warning"
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
        await self._patch_node(lambda view: release_patch(view, state), "release")
        self.log.info("notice_released", notice=acting.key, reason=reason)
        self.events.record(self.nodes.name, "NoticeReleased", f"{acting.kind}: {reason}; node uncordoned")
        self.alerter.resolve("SpotInterruptionNotice", spot_interruption_alert(acting, self.node_info()).labels)
        NOTICE_ACTIVE.labels(str(acting.kind)).set(0)
        self.acting, self.state, self.drained_key = None, None, None

    async def close(self) -> None:
        """On shutdown: stop the drain in flight; the node annotation records where it stopped."""
        if self.drain_task is not None and not self.drain_task.done():
            self.log.warning("drain_interrupted_by_shutdown", notice=self.acting.key if self.acting else None)
        await self._stop_drain()
