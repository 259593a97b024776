"""Executing the controller's drains: surge (make-before-break), cordon, drain, record the outcome, check
where the replacements landed (or read a probe's result); restart recovery.

A drain is handed what it needs (`DrainDeps`) and reports its end through `DrainDeps.finished`; it reads
and changes no other state of the controller.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from spotd.alerts.model import ON_DEMAND_DRAIN_BLOCKED, AlertNode, on_demand_drain_blocked_alert
from spotd.capacity.signals import ANY, Pool
from spotd.common.metrics import LOOP_ERRORS
from spotd.common.parsing import parse_iso_time
from spotd.controller import surge as surges
from spotd.controller.landing import Follow
from spotd.controller.metrics import CONTROLLER_DRAINS
from spotd.controller.placeholders import PAUSE_IMAGE, PLACEHOLDER_PRIORITY_CLASS, SPOT_LABEL_VALUES, pods_to_surge
from spotd.drain.executor import DrainOptions, drain_node
from spotd.drain.plan import PodPolicy
from spotd.inventory.records import NodeInfo, RetryMark
from spotd.kube.client import http_of
from spotd.kube.events import EventRecorder
from spotd.kube.keys import (
    CAPACITY_TYPE_LABELS,
    DO_NOT_DISRUPT_ANNOTATION,
    DRAIN_ANNOTATION,
    DRAIN_RETRY_ANNOTATION,
    DRAINED_ANNOTATION,
    DRAINING_ANNOTATION,
    SPOT,
)
from spotd.kube.lease import micro_time
from spotd.kube.nodes import merge_patch_node, merge_patch_node_retrying, patched, read_node
from spotd.kube.ratelimit import RateLimiter


class AlertSink(Protocol):
    def fire(self, alert: Any) -> None: ...

    def resolve(self, alertname: str, labels: dict[str, str]) -> None: ...


@dataclass
class DrainJob:
    """One drain in flight: its node and pool, and what the probe needs to see where the pods land."""

    node: str
    pool: Pool
    started: datetime
    probe: bool
    instance_id: str = ""
    attempts_before: int = 0  # drains of this node that ended badly in a row (its back-off annotation)
    resumed: bool = False  # a drain a previous leader began (the node is cordoned and marked already)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    abort: str = ""  # why it was stopped: "aborted_ice", "withdrawn" (scope or opt-out changed)
    abort_reason: str = ""
    cordoned: bool = False  # by us, for this drain: only then is uncordoning ours to do
    owners: frozenset[tuple[str, str, str]] = frozenset()
    pods_before: frozenset[tuple[str, str]] = frozenset()
    surged: bool | None = None  # None: no surge; True: ready before the cordon; False: failed, node untouched
    follow: Follow | None = None  # the evicted pods' owners, for the landing check after a complete drain


@dataclass(frozen=True)
class DrainOutcome:
    """How a drain ended. landed_on_spot: a probe's answer (None: not a probe, or it says nothing).
    surge_ready: how its surge ended (None: none tried). short: its replacements landed on on-demand."""

    node: str
    outcome: str  # complete | aborted_ice | timeout | blocked | failed | interrupted | surge_failed
    detail: str = ""
    landed_on_spot: bool | None = None
    alerted: bool = False  # OnDemandDrainBlocked fired for the node
    surge_ready: bool | None = None
    short: bool = False


@dataclass(frozen=True)
class PoolNews:
    """What a drain learned of its pool's Spot capacity: how its surge ended (surge_ready, detail), or that
    its replacements landed on on-demand (short). Booked the moment it is known, before any Event says it."""

    surge_ready: bool | None = None
    detail: str = ""
    short: bool = False


@dataclass(frozen=True)
class DrainSettings:
    """The flags a drain reads."""

    drain_timeout: float = 600.0
    evict_unreplicated: bool = False
    evict_local_storage: bool = False
    terminate_drained: bool = False
    probe_settle: float = 300.0
    dry_run: bool = False
    evict_jobs: bool = False
    retry_backoff: float = 1800.0
    retry_backoff_cap: float = 28800.0
    own_node: str = ""  # the node this replica runs on
    surge_timeout: float = 0.0  # make-before-break; 0: drain-then-replace (and the probe is a drain)
    landing_timeout: float = 300.0
    placeholder_namespace: str = "spotd"
    placeholder_priority_class: str = PLACEHOLDER_PRIORITY_CLASS
    placeholder_image: str = PAUSE_IMAGE
    capacity_label: str | None = None  # --capacity-type-label

    @property
    def poll(self) -> float:
        """How often a surge and a landing check look: 5 s, sooner when the timeouts are scaled down."""
        return min(5.0, max(0.05, min(self.surge_timeout or 300.0, self.landing_timeout or 300.0) / 60))


@dataclass(frozen=True)
class DrainDeps:
    """Everything a drain may use. placements(job): capacity types of the nodes where the drained pods'
    replacements run (for the probe); terminate(instance_id): ASG termination (None: not possible);
    leading(): whether we still hold the lease; finished(job, outcome): the controller's bookkeeping;
    learned(job, news): the pool book, told before the Event that announces the news;
    spot_groups(job): the Spot ASGs that could take the node's pods (cluster-autoscaler's back-off gate);
    capacity_of(node): a node's capacity type as the inventory knows it (None: read the Node)."""

    client: Any
    events: EventRecorder
    alerter: AlertSink
    limiter: RateLimiter
    clock: Callable[[], datetime]
    log: Any
    settings: DrainSettings
    leading: Callable[[], bool]
    placements: Callable[[DrainJob], list[str]]
    finished: Callable[[DrainJob, DrainOutcome], None]
    learned: Callable[[DrainJob, PoolNews], None] = lambda _job, _news: None
    terminate: Callable[[str], Awaitable[str]] | None = None
    # the node as just read (raw JSON) -> why it is not fallback capacity (any more), or None
    scope_check: Callable[[dict[str, Any]], str | None] = lambda _node: None
    spot_groups: Callable[[DrainJob], list[str]] = lambda _job: []
    capacity_of: Callable[[str], str | None] | None = None


def pool_of(node: NodeInfo) -> Pool:
    """The node's pool (instance type and zone, "*" where unknown)."""
    return Pool(node.instance_type or ANY, node.zone or ANY)


async def _cordon(deps: DrainDeps, name: str) -> str | None:
    """Cordon with our marker, conditional on the version read; None when done, else why not."""
    status, body = await read_node(deps.client, name)
    if status != 200:
        return f"node read failed ({status})"
    meta, spec = body.get("metadata") or {}, body.get("spec") or {}
    if spec.get("unschedulable"):
        return "cordoned by someone else meanwhile"
    annotations = meta.get("annotations") or {}
    if str(annotations.get(DRAIN_ANNOTATION, "")).lower() == "false":
        return f"annotated {DRAIN_ANNOTATION}=false meanwhile"
    if str(annotations.get(DO_NOT_DISRUPT_ANNOTATION, "")).lower() == "true":
        return f"annotated {DO_NOT_DISRUPT_ANNOTATION}=true meanwhile"
    out = deps.scope_check(body)
    if out is not None:  # relabelled since the decision: read again, not from the cache
        return f"{out} meanwhile"
    patch = {
        "metadata": {
            "resourceVersion": meta.get("resourceVersion"),
            "annotations": {DRAINING_ANNOTATION: micro_time(deps.clock())},
        },
        "spec": {"unschedulable": True},
    }
    status = await merge_patch_node(deps.client, name, patch)
    return None if patched(status) else f"cordon failed ({status})"


async def uncordon(deps: DrainDeps, name: str) -> None:
    """Put a node back (retried); a failure leaves our marker, and recover() tries again on a later pass."""
    patch = {"metadata": {"annotations": {DRAINING_ANNOTATION: None}}, "spec": {"unschedulable": None}}
    status = await merge_patch_node_retrying(deps.client, name, patch, deps.log)
    if patched(status):
        deps.log.info("node_uncordoned", node=name, status=status)
    else:
        LOOP_ERRORS.labels("uncordon").inc()
        deps.log.error("node_uncordon_failed", node=name, status=status)


async def drain(deps: DrainDeps, job: DrainJob, reason: str) -> None:
    """Cordon, drain, then record the outcome; on cancellation put the node back if we still lead.

    deps.finished is called exactly once, after the node reached its final state (a probe's after its
    pods have landed)."""
    log = deps.log.bind(node=job.node)
    result = DrainOutcome(job.node, "interrupted")
    try:
        try:
            outcome, detail = await _drain(deps, job, reason, log)
        except asyncio.CancelledError:
            # Shutdown while leading: put the node back. Lease lost: another leader owns the cluster now
            # and finds our marker annotation; do nothing more here.
            leading = deps.leading()
            log.warning("drain_interrupted", leading=leading)
            if leading and job.cordoned and job.node == deps.settings.own_node:
                # We run on this node and are being evicted by our own drain: leave it cordoned and
                # marked; the standby that takes over resumes the drain.
                log.warning("drain_handed_over")
                deps.events.record(job.node, "SpotdDrainHandedOver", "spotd controller moving off this node")
            elif leading and job.cordoned:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(3):
                        await uncordon(deps, job.node)
                deps.events.record(job.node, "SpotdDrainStopped", "spotd controller shutting down; uncordoned")
            raise
        except Exception as exc:
            outcome, detail = "failed", repr(exc)
            LOOP_ERRORS.labels("controller_drain").inc()
        result = DrainOutcome(job.node, outcome, detail)
        try:
            result = await _finish(deps, job, result, log)
        except Exception as exc:  # a failed patch after the drain must not stop the leader's other work
            LOOP_ERRORS.labels("controller_drain").inc()
            log.error("drain_finish_failed", outcome=outcome, error=repr(exc))
    finally:
        deps.finished(job, result)


async def _drain(deps: DrainDeps, job: DrainJob, reason: str, log: Any) -> tuple[str, str]:
    if job.resumed:
        job.cordoned = True
        log.info("drain_resumed", reason=reason)
        deps.events.record(job.node, "SpotdDrainResumed", f"Resuming a drain a previous leader began: {reason}")
    else:
        if deps.settings.surge_timeout > 0:
            not_ready = await _surge_first(deps, job, log)
            if not_ready is not None:
                return "surge_failed", not_ready
            if job.stop.is_set():  # an ICE in the zone while the placeholders waited: do not cordon at all
                if job.abort == "withdrawn":
                    return "withdrawn", job.abort_reason
                return job.abort or "aborted_ice", "a new ICE arrived during the surge"
        refused = await _cordon(deps, job.node)
        if refused is not None:
            return "blocked", refused
        job.cordoned = True
        log.info("drain_starting", reason=reason, probe=job.probe, surged=job.surged)
        deps.events.record(job.node, "SpotdDrainStarted", f"Draining on-demand node back to Spot: {reason}")
    options = DrainOptions(policy=_policy(deps.settings), deadline_action="leave")
    deadline = deps.clock() + timedelta(seconds=deps.settings.drain_timeout)
    result = await drain_node(deps.client, job.node, options, deadline, log=log, limiter=deps.limiter, stop=job.stop)
    if result.outcome == "complete":
        return "complete", ""
    if job.abort == "withdrawn":
        return "withdrawn", job.abort_reason
    if job.abort:
        return job.abort, "a new ICE arrived during the drain"
    if result.outcome == "blocked":
        return "blocked", result.reason or ""
    return "timeout", f"not empty after --drain-timeout: {result.reason or ''}"


def _policy(settings: DrainSettings) -> PodPolicy:
    return PodPolicy(
        voluntary=True,
        evict_unreplicated=settings.evict_unreplicated,
        evict_local_storage=settings.evict_local_storage,
        evict_jobs=settings.evict_jobs,
    )


async def _node_pods(deps: DrainDeps, name: str) -> list[dict[str, Any]]:
    """The node's pods, raw JSON, fresh from the API (the placeholders copy fields the inventory drops)."""
    resp = await http_of(deps.client).get("/api/v1/pods", params={"fieldSelector": f"spec.nodeName={name}"})
    resp.raise_for_status()
    return list(resp.json().get("items") or [])


def capacity_label_of(labels: Mapping[str, str], configured: str | None) -> str | None:
    """The capacity-type label the placeholders ask for: --capacity-type-label, else the first well-known
    one the fallback node carries (the cluster's Spot nodes carry the same key)."""
    if configured:
        return configured
    return next((key for key in CAPACITY_TYPE_LABELS if labels.get(key)), None)


async def _surge_first(deps: DrainDeps, job: DrainJob, log: Any) -> str | None:
    """Make-before-break: warm Spot room for the node's evictable pods before touching the node. None when
    ready (job.follow says what to follow after the drain); else why not (placeholders already deleted)."""
    settings = deps.settings
    status, body = await read_node(deps.client, job.node)
    if status != 200:
        job.surged = False
        return f"node read failed ({status})"
    labels = (body.get("metadata") or {}).get("labels") or {}
    label = capacity_label_of(labels, settings.capacity_label)
    if label is None:
        job.surged = False
        return "no capacity-type label on the node: placeholders cannot ask for Spot"
    policy = _policy(settings)
    pods = await _node_pods(deps, job.node)
    gate = await surges.backoff_gate(deps.client, deps.spot_groups(job), deps.clock(), log)
    if not gate.ok:
        job.surged = False
        deps.events.record(job.node, "SpotdSurgeSkipped", f"No surge, node left as it is: {gate.reason}"[:1000])
        return f"cluster-autoscaler: {gate.reason}"
    outcome = await surges.surge(
        deps.client,
        job.node,
        pods,
        namespace=settings.placeholder_namespace,
        capacity_label=label,
        spot_values=SPOT_LABEL_VALUES.get(label, ("spot",)),
        timeout=settings.surge_timeout,
        log=log,
        events=deps.events,
        clock=deps.clock,
        priority_class=settings.placeholder_priority_class,
        zone_of_claim=await surges.zones_of_claims(deps.client, pods, policy),
        policy=policy,
        capacity_of=deps.capacity_of,
        image=settings.placeholder_image,
        poll=settings.poll,
        decided=lambda ended: deps.learned(job, PoolNews(surge_ready=ended.ready, detail=ended.reason)),
    )
    job.surged = outcome.ready
    if not outcome.ready:
        return outcome.reason
    # What to follow after the drain: the pods as they are now, just before the cordon.
    evicted = pods_to_surge(await _node_pods(deps, job.node), policy)
    job.follow = await surges.follow_before_drain(surges.api_pods(deps.client), job.node, evicted)
    return None


async def _landing(deps: DrainDeps, job: DrainJob, log: Any) -> bool:
    """After a complete drain: where did the evicted pods' replacements land? True: short (on on-demand)."""
    if job.follow is None or job.follow.expected == 0:
        return False
    landing = await surges.replacements_landed(
        deps.client,
        job.follow,
        capacity_label=deps.settings.capacity_label or "",
        timeout=deps.settings.landing_timeout,
        log=log,
        capacity_of=deps.capacity_of,
        poll=deps.settings.poll,
    )
    placed = ", ".join(f"{pod} on {where}" for pod, where in sorted(landing.placed.items()))
    if landing.returned:
        message = f"Returned to Spot: {landing.reason}; {placed}"
        deps.events.record(job.node, "SpotdDrainReturned", message[:1000])
    elif landing.short:
        deps.learned(job, PoolNews(short=True))
        message = f"Not returned to Spot, pool {job.pool} marked short: {landing.reason}; {placed}"
        deps.events.record(job.node, "SpotdDrainNotReturned", message[:1000], type="Warning")
    else:
        message = f"Where the replacements run is not known yet: {landing.reason}; {placed}"
        deps.events.record(job.node, "SpotdDrainLandingUnknown", message[:1000])
    return landing.short


async def _finish(deps: DrainDeps, job: DrainJob, result: DrainOutcome, log: Any) -> DrainOutcome:
    """Alert, Event, the node's annotations; the outcome is counted once the node is in its final state."""
    outcome, detail = result.outcome, result.detail
    if outcome == "surge_failed":  # the node was never touched: no alert, no node back-off (the pool's)
        log.warning("drain_not_started", outcome=outcome, detail=detail, probe=job.probe)
        CONTROLLER_DRAINS.labels(outcome).inc()
        return DrainOutcome(job.node, outcome, detail, surge_ready=False)
    alerted = outcome in ("timeout", "blocked", "failed")
    if alerted:
        who = AlertNode(job.node, job.instance_id, job.pool.zone, job.pool.instance_type)
        deps.alerter.fire(on_demand_drain_blocked_alert(who, f"{outcome}: {detail}", str(job.pool)))
    else:
        deps.alerter.resolve(ON_DEMAND_DRAIN_BLOCKED, {"node": job.node})
    # The node is written first, then the log line and the Event say so (also when the write fails or is
    # cancelled): a reader of the Event finds the node marked drained, or put back with its back-off.
    try:
        if outcome == "complete":
            drained = {
                DRAINING_ANNOTATION: None,
                DRAIN_RETRY_ANNOTATION: None,
                DRAINED_ANNOTATION: micro_time(deps.clock()),
            }
            try:
                status = await merge_patch_node_retrying(
                    deps.client, job.node, {"metadata": {"annotations": drained}}, log
                )
                if not patched(status):  # the controller remembers it and never puts this node back (recover)
                    LOOP_ERRORS.labels("drained_mark").inc()
                    log.error("drained_mark_failed", status=status)
            finally:
                log.info("drain_complete", probe=job.probe)
                deps.events.record(job.node, "SpotdDrainComplete", "Drained; node left to cluster-autoscaler")
            if deps.settings.terminate_drained:
                await _terminate(deps, job, log)
        elif outcome in ("aborted_ice", "withdrawn"):  # Spot ran out again, or the node is no longer ours
            try:
                if job.cordoned:
                    await uncordon(deps, job.node)
            finally:
                log.warning("drain_stopped", outcome=outcome, detail=detail)
                deps.events.record(job.node, "SpotdDrainStopped", f"{outcome}: {detail}"[:1000], type="Warning")
        else:
            mark = retry_mark(job, outcome, deps.clock(), deps.settings)
            recorded = False
            try:
                recorded = await _put_back_with_backoff(deps, job, mark, log)
            finally:
                after = mark.after.isoformat()
                log.warning("drain_stopped", outcome=outcome, detail=detail, retry_after=after, recorded=recorded)
                # The Event promises a back-off only when the Node holds it (the next pass reads it from there).
                then = (
                    f"not tried again before {after} (attempt {mark.attempts})"
                    if recorded
                    else "its back-off could not be written on the node: a later pass puts the node back"
                )
                deps.events.record(job.node, "SpotdDrainStopped", f"{outcome}: {detail}; {then}"[:1000], type="Warning")
    finally:
        CONTROLLER_DRAINS.labels(outcome).inc()
    landed: bool | None = None
    short = False
    if job.surged is not None:  # make-before-break: the surge was the probe; the landing check follows
        if outcome == "complete":
            short = await _landing(deps, job, log)
    elif job.probe and outcome not in ("blocked", "failed"):  # those say nothing about capacity
        landed = await _probe_result(deps, job, outcome == "complete", log)
    return DrainOutcome(job.node, outcome, detail, landed, alerted, surge_ready=job.surged, short=short)


def retry_mark(job: DrainJob, outcome: str, now: datetime, settings: DrainSettings) -> RetryMark:
    """The back-off after a drain that ended badly: --retry-backoff, doubling per attempt, capped."""
    attempts = job.attempts_before + 1
    wait = min(settings.retry_backoff * 2 ** min(attempts - 1, 32), settings.retry_backoff_cap)
    return RetryMark(now + timedelta(seconds=wait), attempts, job.started, outcome)


async def _put_back_with_backoff(deps: DrainDeps, job: DrainJob, mark: RetryMark, log: Any) -> bool:
    """Uncordon (if we cordoned) and write the back-off in one patch, retried: the back-off must not be lost.
    True when the node holds it."""
    patch: dict[str, Any] = {"metadata": {"annotations": {DRAIN_RETRY_ANNOTATION: mark.to_json()}}}
    if job.cordoned:
        patch["metadata"]["annotations"][DRAINING_ANNOTATION] = None
        patch["spec"] = {"unschedulable": None}
    status = await merge_patch_node_retrying(deps.client, job.node, patch, log)
    if patched(status):
        log.info("node_uncordoned" if job.cordoned else "drain_backoff_recorded", status=status)
        return True
    # still marked as draining: recover() puts it back on a later pass; the back-off is lost
    LOOP_ERRORS.labels("uncordon").inc()
    log.error("node_uncordon_failed", status=status)
    return False


async def _terminate(deps: DrainDeps, job: DrainJob, log: Any) -> None:
    if not job.instance_id or deps.terminate is None:
        log.warning("terminate_skipped", reason="no instance id or no ASG reader")
        return
    try:
        activity = await deps.terminate(job.instance_id)
        log.info("node_terminated", instance_id=job.instance_id, activity=activity)
        deps.events.record(job.node, "SpotdNodeTerminated", f"Terminated {job.instance_id} through its ASG")
    except Exception as exc:
        LOOP_ERRORS.labels("controller_terminate").inc()
        log.warning("terminate_failed", instance_id=job.instance_id, error=repr(exc))


async def _probe_result(deps: DrainDeps, job: DrainJob, drained: bool, log: Any) -> bool:
    """Where did the probed node's pods land? True: on Spot (the pool is back)."""
    landed_on_spot = False
    settle = deps.settings.probe_settle
    if drained and job.owners:
        end = time.monotonic() + settle
        while True:
            placed = deps.placements(job)
            if placed and (len(placed) >= len(job.pods_before) or time.monotonic() >= end):
                landed_on_spot = any(ctype == SPOT for ctype in placed)
                break
            if time.monotonic() >= end:
                break
            await asyncio.sleep(min(5.0, max(0.5, settle / 20)))
    log.info("probe_result", pool=str(job.pool), landed_on_spot=landed_on_spot)
    return landed_on_spot


async def recover(
    deps: DrainDeps,
    marked: Mapping[str, str],
    in_flight: Collection[str],
    stale_after: float | None = None,
    drained: Callable[[str], bool] = lambda _name: False,
    resume: Callable[[str, str], bool] = lambda _name, _since: False,
) -> None:
    """Nodes marked as draining (marked: node -> our draining_since) with no drain of ours in flight (a
    previous leader stopped, or putting one back failed): uncordon them; the policy decides anew. When
    leading starts every such node; on each pass (stale_after set) only marks older than that, so a drain
    that just ended is not raced. drained(node): the drain completed (we saw it, or no evictable pod is
    left): never put back; its drained mark is written again instead. resume(node, since): the caller
    takes the drain over (a fresh mark at the start of a term): left as it is."""
    now = deps.clock()
    for name, since in list(marked.items()):
        if not since or name in in_flight:
            continue
        if drained(name):
            marks = {DRAINING_ANNOTATION: None, DRAIN_RETRY_ANNOTATION: None, DRAINED_ANNOTATION: micro_time(now)}
            if not deps.settings.dry_run:
                status = await merge_patch_node_retrying(
                    deps.client, name, {"metadata": {"annotations": marks}}, deps.log, tries=2
                )
                deps.log.info("drained_mark_written", node=name, status=status)
            continue
        if stale_after is None and resume(name, since):
            continue
        if stale_after is not None:
            try:
                age = (now - parse_iso_time(since)).total_seconds()
            except ValueError:
                age = float("inf")  # a mark we cannot read is no drain of ours
            if age < stale_after:
                continue
        deps.log.warning("drain_abandoned", node=name, since=since, dry_run=deps.settings.dry_run)
        if not deps.settings.dry_run:
            await uncordon(deps, name)
            deps.events.record(name, "SpotdDrainStopped", "a drain of ours was interrupted; node put back")
