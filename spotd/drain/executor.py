"""The drain engine: evict every pod of a node at once, follow their deletion with a watch.

Decisions (which pods, what grace, how long to back off) come from spotd.drain.plan; this module executes.
Time is counted on the monotonic clock from the drain's start: a wall-clock step does not move the deadline.
It never asks for a grace period below MIN_GRACE_SECONDS (0 would be a force delete), and deletes a pod only
with `deadline_action="delete"`, for pods still refused at the cutoff.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
from lightkube import ALL_NS, AsyncClient
from lightkube.core.exceptions import ApiError
from lightkube.models.meta_v1 import DeleteOptions, ObjectMeta
from lightkube.resources.core_v1 import Pod

from spotd.common.waits import wait_set
from spotd.drain.metrics import DRAIN_DURATION, DRAINS, EVICTIONS, PODS_LEFT
from spotd.drain.plan import (
    MIN_GRACE_SECONDS,
    PodDecision,
    PodFacts,
    PodPolicy,
    PodVerdict,
    eviction_grace,
    plan_drain,
    retry_delay,
    shorter_grace,
)
from spotd.kube.client import watch_timeout_of
from spotd.kube.keys import DO_NOT_DISRUPT_ANNOTATION, MIRROR_ANNOTATION, SAFE_TO_EVICT_ANNOTATION
from spotd.kube.ratelimit import RateLimiter

_RETRYABLE = frozenset({409, 429, 500, 502, 503, 504})
_WATCH_MAX_BACKOFF = 5.0  # seconds between lists while the pod watch keeps failing


@dataclass(frozen=True)
class DrainOptions:
    """deadline_action: what to do at deadline - safety_margin with pods still refused ('leave', the
    default, or 'delete', which needs the optional pods/delete ClusterRole).

    Voluntary drains (the controller's) never delete: PDBs are honoured to the letter.
    """

    policy: PodPolicy = PodPolicy()  # noqa: RUF009 - frozen, so sharing the default is safe
    deadline_action: str = "leave"
    safety_margin: float = 10.0
    dry_run: bool = False

    @property
    def voluntary(self) -> bool:
        return self.policy.voluntary


@dataclass(frozen=True)
class DrainResult:
    outcome: str  # complete | incomplete | interrupted | blocked | dry_run
    evicted: tuple[str, ...] = ()
    deleted: tuple[str, ...] = ()
    forced: tuple[str, ...] = ()
    left: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    blocked: tuple[str, ...] = ()
    duration: float = 0.0
    reason: str = ""


def pod_facts(pod: Pod) -> PodFacts:
    meta, spec, status = pod.metadata, pod.spec, pod.status
    annotations = (meta.annotations or {}) if meta else {}
    owners = tuple(o.kind for o in (meta.ownerReferences or []) if o.controller) if meta else ()
    volumes = (spec.volumes or []) if spec else []
    return PodFacts(
        namespace=(meta.namespace or "") if meta else "",
        name=(meta.name or "") if meta else "",
        phase=(status.phase or "Pending") if status else "Pending",
        owner_kinds=owners,
        mirror=MIRROR_ANNOTATION in annotations,
        terminating=bool(meta and meta.deletionTimestamp),
        local_storage=any(v.emptyDir is not None for v in volumes),
        safe_to_evict=annotations.get(SAFE_TO_EVICT_ANNOTATION),
        do_not_disrupt=annotations.get(DO_NOT_DISRUPT_ANNOTATION, "").strip().lower() == "true",
        priority=(spec.priority or 0) if spec else 0,
        grace_seconds=_grace(spec),
        deletion_grace_seconds=meta.deletionGracePeriodSeconds if meta else None,
    )


def _grace(spec: Any) -> int:
    value = spec.terminationGracePeriodSeconds if spec else None
    return 30 if value is None else int(value)


def _is_pdb_refusal(exc: ApiError) -> bool:
    details = exc.status.details
    return any(c.reason == "DisruptionBudget" for c in (details.causes or [])) if details else False


def _refusal_cause(exc: ApiError) -> str:
    """What the API server said refused the eviction (it names the PodDisruptionBudget)."""
    details = exc.status.details
    causes = [c.message for c in (details.causes or []) if c.message] if details else []
    return causes[0] if causes else (exc.status.message or "disruption budget")


_RETRY_AFTER_CAP = 10.0  # seconds: a server's word, but a drain has two minutes


def _retry_after(exc: ApiError) -> float | None:
    """The server's Retry-After in seconds, at most _RETRY_AFTER_CAP; None when absent or not a number
    ("nan" or "inf" would never wake the retry, a huge value would wait past the deadline)."""
    response = getattr(exc, "response", None)
    value = response.headers.get("Retry-After") if response is not None else None
    try:
        seconds = float(value) if value else None
    except ValueError:
        return None
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return None
    return min(seconds, _RETRY_AFTER_CAP)


class _Drain:
    def __init__(
        self,
        client: AsyncClient,
        node: str,
        options: DrainOptions,
        deadline: datetime | None,
        log: Any,
        limiter: RateLimiter,
        stop: asyncio.Event,
        overdue_at: datetime | None = None,
        on_overdue: Callable[[tuple[str, ...]], None] | None = None,
    ) -> None:
        self.client, self.node, self.options = client, node, options
        # The wall clock is read once, here; from now on only the monotonic clock counts.
        now, mono = datetime.now(UTC), time.monotonic()
        self.deadline = None if deadline is None else mono + (deadline - now).total_seconds()
        self.overdue_at = None if overdue_at is None else mono + (overdue_at - now).total_seconds()
        self.on_overdue = on_overdue
        self.log = log.bind(node=node)
        self.limiter = limiter
        # The drain's own stop: the caller's (interrupted), or a pod that came to block the drain midway.
        self.outer_stop = stop
        self.stop = asyncio.Event()
        self.blocked: list[PodDecision] = []
        self.pending: dict[str, PodFacts] = {}  # uid -> pod we still wait to see gone
        self.started: set[str] = set()
        self.evicted: list[str] = []
        self.deleted: list[str] = []
        self.forced: list[str] = []
        self.refusal_logged: set[str] = set()  # uids whose PDB refusal was logged (once a pod)
        self.refusals: dict[str, str] = {}  # pod ref -> what refused its eviction (names the PDB)
        self.evicted_uids: set[str] = set()  # eviction accepted: the pod is on its way out
        self.refused: set[str] = set()  # the last eviction of these was refused: the deadline action's pods
        self.untried: set[str] = set()  # evictions launched but not yet answered once
        self.first_round = asyncio.Event()
        self.first_round.set()
        self.overdue_reported = False
        self.changed = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()

    # -- time --
    def seconds_left(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def cutoff_left(self) -> float | None:
        """Seconds until refused evictions stop being retried."""
        left = self.seconds_left()
        if left is None:
            return None
        return left if self.options.voluntary else left - self.options.safety_margin

    async def pause(self, seconds: float) -> None:
        """Sleep, but wake at once when the drain is stopped."""
        if seconds > 0:
            await wait_set(self.stop, seconds)  # not wait_for: it could swallow a lost lease's cancellation

    # -- API --
    async def list_pods(self) -> tuple[list[Pod], str | None]:
        await self.limiter.acquire()
        listing = self.client.list(Pod, namespace=ALL_NS, fields={"spec.nodeName": self.node})
        pods = [p async for p in listing]
        try:
            rv: str | None = listing.resourceVersion
        except Exception:  # an empty list may carry no version; the watch then starts from now
            rv = None
        return pods, rv

    def consider(self, pod: Pod) -> None:
        """Start work for a pod we have not seen yet (from the list or a watch ADDED)."""
        uid = pod.metadata.uid if pod.metadata else None
        if not uid:
            return
        if uid in self.started:  # a re-list, or a watch replaying from the list's version: decide it again
            self.reconsider(pod)
            return
        facts = pod_facts(pod)
        decision = plan_drain([facts], self.options.policy).decisions[0]
        if decision.verdict == PodVerdict.BLOCK:  # arrived during a voluntary drain it forbids
            self.halt(decision)
        elif decision.verdict in (PodVerdict.EVICT, PodVerdict.WAIT):  # a terminating pod counts until gone
            self.launch(uid, facts, self.evict(uid, facts))

    def reconsider(self, pod: Pod) -> None:
        """A pod still to be evicted changed (a watch MODIFIED): one annotated or relabelled so that a
        voluntary drain must not touch it (karpenter.sh/do-not-disrupt, a Job) stops the drain."""
        uid = pod.metadata.uid if pod.metadata else None
        if not uid or uid not in self.pending or uid in self.evicted_uids:
            return
        decision = plan_drain([pod_facts(pod)], self.options.policy).decisions[0]
        if decision.verdict == PodVerdict.BLOCK:
            self.halt(decision)

    def halt(self, decision: PodDecision) -> None:
        self.blocked.append(decision)
        self.log.warning("drain_blocked", pod=decision.pod.ref, reason=decision.reason)
        self.stop.set()

    def launch(self, uid: str, facts: PodFacts, work: Any) -> None:
        self.started.add(uid)
        self.pending[uid] = facts
        self.untried.add(uid)
        self.first_round.clear()
        task = asyncio.get_running_loop().create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def gone(self, uid: str) -> None:
        if self.pending.pop(uid, None) is not None:
            self.changed.set()
            if self.overdue_reported:  # past the time pods should be gone: the gauge follows them out
                PODS_LEFT.set(len(self.pending))

    def tried(self, uid: str) -> None:
        self.untried.discard(uid)
        if not self.untried:
            self.first_round.set()

    async def evict(self, uid: str, pod: PodFacts) -> None:
        """Evict until accepted, gone, or the cutoff; always once, even when the notice came too late."""
        try:
            await self._evict(uid, pod)
        finally:
            self.tried(uid)

    async def _evict(self, uid: str, pod: PodFacts) -> None:
        attempt = 0
        while uid in self.pending and not self.stop.is_set():
            left = self.seconds_left()
            margin = self.options.safety_margin
            if pod.terminating:
                # Asked again only when its deletion would end too late: the shorter grace shortens it.
                grace = None if self.options.voluntary else shorter_grace(pod, left, margin)
                if grace is None:
                    return
            else:
                grace = None if self.options.voluntary else eviction_grace(pod, left, margin)
            eviction = Pod.Eviction(
                metadata=ObjectMeta(name=pod.name, namespace=pod.namespace),
                deleteOptions=DeleteOptions(gracePeriodSeconds=grace) if grace is not None else None,
            )
            await self.limiter.acquire()
            delay: float | None
            try:
                await self.client.create(eviction, name=pod.name, namespace=pod.namespace)
            except ApiError as exc:
                code = exc.status.code or 0
                if code == 404:
                    self.gone(uid)
                    return
                self.refused.add(uid)
                if code == 429 and _is_pdb_refusal(exc):
                    EVICTIONS.labels("pdb_blocked").inc()
                    self.refusals[pod.ref] = _refusal_cause(exc)  # the latest: a stale budget's first word may differ
                    if uid not in self.refusal_logged:
                        self.refusal_logged.add(uid)
                        self.log.info("eviction_refused", pod=pod.ref, reason="disruption budget")
                    delay = retry_delay(attempt)
                elif code in _RETRYABLE:
                    delay = _retry_after(exc) or retry_delay(attempt)
                    self.log.warning("eviction_retry", pod=pod.ref, status=code, message=exc.status.message)
                else:
                    EVICTIONS.labels("failed").inc()
                    self.log.error("eviction_failed", pod=pod.ref, status=code, message=exc.status.message)
                    return  # left to the deadline action
            except (httpx.PoolTimeout, httpx.ConnectError, httpx.ConnectTimeout) as exc:
                # Never sent (the client's queue was full, or no connection): not a refusal, so the deadline
                # action never deletes a pod the API server was not asked to evict. After a full queue, no
                # back-off: the wait was the queue.
                delay = 0.0 if isinstance(exc, httpx.PoolTimeout) else retry_delay(attempt)
                self.log.warning("eviction_not_sent", pod=pod.ref, error=repr(exc))
            except (httpx.HTTPError, OSError) as exc:
                self.refused.add(uid)
                delay = retry_delay(attempt)
                self.log.warning("eviction_retry", pod=pod.ref, error=repr(exc))
            else:
                EVICTIONS.labels("evicted").inc()
                self.refused.discard(uid)
                self.evicted_uids.add(uid)
                self.evicted.append(pod.ref)
                self.log.info("pod_evicted", pod=pod.ref, grace=grace, terminating=pod.terminating)
                return
            self.tried(uid)
            attempt += 1
            cutoff = self.cutoff_left()
            if cutoff is not None:
                if cutoff <= 0:
                    return  # left to the deadline action
                delay = min(delay, cutoff)
            await self.pause(delay)

    async def delete(self, uid: str, pod: PodFacts, grace: int) -> None:
        """--deadline-action delete: a graceful delete, never below MIN_GRACE_SECONDS."""
        grace = max(MIN_GRACE_SECONDS, grace)
        attempt = 0
        while uid in self.pending and not self.stop.is_set():
            await self.limiter.acquire()
            try:
                await self.client.delete(Pod, pod.name, namespace=pod.namespace, grace_period=grace)
            except ApiError as exc:
                if exc.status.code == 404:
                    self.gone(uid)
                    return
                if (exc.status.code or 0) not in _RETRYABLE or attempt >= 5:
                    EVICTIONS.labels("failed").inc()
                    self.log.error("pod_delete_failed", pod=pod.ref, status=exc.status.code)
                    return
            except (httpx.HTTPError, OSError) as exc:
                if attempt >= 5:
                    self.log.error("pod_delete_failed", pod=pod.ref, error=repr(exc))
                    return
            else:
                EVICTIONS.labels("forced").inc()
                self.forced.append(pod.ref)
                self.evicted_uids.add(uid)
                self.log.info("pod_deleted", pod=pod.ref, forced=True, grace=grace)
                return
            await self.pause(retry_delay(attempt))
            attempt += 1

    async def follow(self, resource_version: str | None) -> None:
        """Watch the node's pods from `resource_version` (the first list's): deletions end the wait, new pods
        are drained too. After any error (a dropped stream whose resume fails, 410 Expired) the pods are listed
        again and the watch resumes from that list's resourceVersion, so a pod deleted between the list and the
        new watch still comes as DELETED; a version expired by then (410) is an error too: list again."""
        version, failures = resource_version, 0
        while True:
            try:
                # lightkube resumes by itself from the last event's version when a stream ends; errors raise.
                watch = self.client.watch(
                    Pod,
                    namespace=ALL_NS,
                    fields={"spec.nodeName": self.node},
                    resource_version=version,  # type: ignore[arg-type]  # None: from now (lightkube's default)
                    server_timeout=watch_timeout_of(self.client),  # type: ignore[arg-type]  # a silent watch fails
                )
                async for event, pod in watch:
                    failures = 0
                    self.on_event(event, pod)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # connection refused or reset, 410 Expired, a line that does not parse
                failures += 1
                self.log.warning("watch_failed", watch="pods", error=repr(exc), failures=failures)
            version, failures = await self.relist(failures)

    async def relist(self, failures: int) -> tuple[str | None, int]:
        """List again (after a back-off growing with `failures`) until a list succeeds; its resourceVersion and
        the failures counted meanwhile."""
        while True:
            await asyncio.sleep(min(_WATCH_MAX_BACKOFF, 0.1 * 2**failures))
            try:
                return await self.reconcile(), failures
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                self.log.warning("relist_failed", error=repr(exc), failures=failures)

    def on_event(self, event: str, pod: Pod) -> None:
        uid = pod.metadata.uid if pod.metadata else None
        if not uid:
            return
        if event == "DELETED":
            self.gone(uid)
        elif event == "ADDED":
            self.consider(pod)
        elif event == "MODIFIED":
            self.reconsider(pod)
        if uid in self.pending and pod.status is not None and pod.status.phase in ("Succeeded", "Failed"):
            self.gone(uid)  # finished: nothing runs in it any more, it no longer holds the node up

    async def reconcile(self) -> str | None:
        """After a broken watch, deletions may have been missed: list once and settle. Returns the list's
        resourceVersion, from which the next watch resumes."""
        pods, rv = await self.list_pods()
        present = {
            p.metadata.uid for p in pods if p.metadata and not (p.status and p.status.phase in ("Succeeded", "Failed"))
        }
        for uid in list(self.pending):
            if uid not in present:
                self.gone(uid)
        for pod in pods:
            self.consider(pod)
        return rv

    async def wait_until(self, limit: float | None) -> None:
        """Until every pending pod is gone, the drain is stopped, or `limit` seconds (None: no limit)."""
        end = None if limit is None else time.monotonic() + limit
        while self.pending and not self.stop.is_set():
            timeout = 5.0 if end is None else min(5.0, end - time.monotonic())
            if timeout <= 0:
                return
            self.changed.clear()
            stopper = asyncio.ensure_future(self.stop.wait())
            changer = asyncio.ensure_future(self.changed.wait())
            try:
                await asyncio.wait({stopper, changer}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopper.cancel()
                changer.cancel()

    async def run(self) -> DrainResult:
        start = time.monotonic()
        pods, rv = await self.list_pods()
        facts = [pod_facts(p) for p in pods]
        plan = plan_drain(facts, self.options.policy)
        skipped = tuple(d.pod.ref for d in plan.decisions if d.verdict == PodVerdict.SKIP)
        if plan.blocked:
            reason = "; ".join(f"{d.pod.ref}: {d.reason}" for d in plan.blocked)
            blocked = tuple(d.pod.ref for d in plan.blocked)
            return DrainResult("blocked", blocked=blocked, skipped=skipped, reason=reason)
        if self.options.dry_run:
            for d in plan.decisions:
                self.log.info("would_drain_pod", pod=d.pod.ref, verdict=str(d.verdict), reason=d.reason)
            return DrainResult("dry_run", skipped=skipped, reason="dry run")
        self.log.info("drain_started", pods=len(pods), skipped=len(skipped), seconds_left=self.seconds_left())
        watcher = asyncio.get_running_loop().create_task(self.follow(rv))
        relay = asyncio.get_running_loop().create_task(self._relay_stop())
        try:
            for pod in pods:
                self.consider(pod)
            if self.overdue_at is not None:
                await self.report_overdue()
            await self.wait_until(self.cutoff_left())
            if self.pending and not self.stop.is_set() and not self.options.voluntary:
                await self.at_cutoff()
            if not self.options.voluntary:
                await self.wait_until(self.seconds_left())
        finally:
            if not self.pending and self.tasks:
                # Every pod is gone; an eviction's answer may still trail its pod's DELETED event.
                await asyncio.wait(list(self.tasks), timeout=2.0)
            watcher.cancel()
            relay.cancel()
            for task in list(self.tasks):
                task.cancel()
            await asyncio.gather(watcher, relay, *self.tasks, return_exceptions=True)
        return self.result(time.monotonic() - start, skipped)

    async def _relay_stop(self) -> None:
        await self.outer_stop.wait()
        self.stop.set()

    async def wait_first_round(self) -> None:
        """Until every eviction launched so far was answered once (or the drain stops)."""
        stopper = asyncio.ensure_future(self.stop.wait())
        rounder = asyncio.ensure_future(self.first_round.wait())
        try:
            await asyncio.wait({stopper, rounder}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            rounder.cancel()

    async def report_overdue(self) -> None:
        """At `overdue_at` (a maintenance's NotBefore; at once after the first round when it is past), name
        the pods still on the node. The drain goes on."""
        assert self.overdue_at is not None
        await self.wait_until(self.overdue_at - time.monotonic())
        await self.wait_first_round()
        if not self.pending or self.stop.is_set():
            return
        left = tuple(sorted(p.ref for p in self.pending.values()))
        PODS_LEFT.set(len(left))
        self.overdue_reported = True
        self.log.warning("drain_overdue", pods=list(left))
        if self.on_overdue is not None:
            self.on_overdue(left)

    async def at_cutoff(self) -> None:
        """Pods not evicted by deadline - margin: refused by a PDB or stuck on API errors. Every pod was
        tried at least once first, also when the notice came (or was resumed) too late."""
        await self.wait_first_round()
        refused = {uid: pod for uid, pod in self.pending.items() if uid in self.refused}
        if not refused or self.stop.is_set():
            return
        if self.options.deadline_action != "delete":
            self.log.warning("deadline_pods_left", pods=[p.ref for p in refused.values()])
            return
        left = self.seconds_left() or 0.0
        grace = max(MIN_GRACE_SECONDS, int(left) - 1)
        self.log.warning("deadline_delete", pods=[p.ref for p in refused.values()], grace=grace)
        await asyncio.gather(*(self.delete(uid, pod, grace) for uid, pod in refused.items()))

    def result(self, duration: float, skipped: tuple[str, ...]) -> DrainResult:
        left = tuple(sorted(p.ref for p in self.pending.values()))
        if self.blocked:  # a pod that forbids the drain is on the node, whatever else has left
            DRAINS.labels("blocked").inc()
            DRAIN_DURATION.observe(duration)
            reason = "; ".join(f"{d.pod.ref}: {d.reason}" for d in self.blocked)
            blocked = tuple(d.pod.ref for d in self.blocked)
            return DrainResult(
                "blocked", evicted=tuple(self.evicted), left=left, skipped=skipped, blocked=blocked, reason=reason
            )
        if not left:
            outcome = "complete"
        elif self.stop.is_set():
            outcome = "interrupted"
        else:
            outcome = "incomplete"
        for _ in left:
            EVICTIONS.labels("left").inc()
        DRAINS.labels(outcome).inc()
        DRAIN_DURATION.observe(duration)
        PODS_LEFT.set(len(left))
        return DrainResult(
            outcome,
            evicted=tuple(self.evicted),
            deleted=tuple(self.deleted),
            forced=tuple(self.forced),
            left=left,
            skipped=skipped,
            duration=duration,
            reason="" if not left else f"{len(left)} pods still on the node{self._why(left)}",
        )

    def _why(self, left: tuple[str, ...]) -> str:
        refused = [ref for ref in left if ref in self.refusals]
        return f"; {refused[0]}: {self.refusals[refused[0]]}" if refused else ""


async def drain_node(
    client: AsyncClient,
    node_name: str,
    options: DrainOptions,
    deadline: datetime | None,
    *,
    log: Any,
    limiter: RateLimiter | None = None,
    stop: asyncio.Event | None = None,
    overdue_at: datetime | None = None,
    on_overdue: Callable[[tuple[str, ...]], None] | None = None,
) -> DrainResult:
    """Evict every evictable pod of the node and wait until they are gone, the deadline passes, or stop is set.

    deadline: when the node goes away (None: no limit; voluntary drains pass their drain timeout here).
    Refused evictions are retried with short growing back-off until deadline - safety_margin; then
    options.deadline_action applies (never for voluntary drains) to the pods still refused.
    overdue_at: when pods still on the node are worth saying so (on_overdue gets their names); the drain
    goes on. "Empty" means no evictable pod left that is not finished: completed pods are left alone.
    """
    drain = _Drain(
        client,
        node_name,
        options,
        deadline,
        log,
        limiter or RateLimiter(0, 1),
        stop or asyncio.Event(),
        overdue_at,
        on_overdue,
    )
    return await drain.run()
