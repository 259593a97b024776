"""The drain engine: evict every pod of a node at once, follow their deletion with a watch.

Decisions (which pods, what grace, how long to back off) come from spotd.decide; this module executes.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
from lightkube import ALL_NS, AsyncClient
from lightkube.core.exceptions import ApiError
from lightkube.models.meta_v1 import DeleteOptions, ObjectMeta
from lightkube.resources.core_v1 import Pod

from spotd.drain.metrics import DRAIN_DURATION, DRAINS, EVICTIONS, PODS_LEFT
from spotd.drain.plan import PodFacts, PodPolicy, PodVerdict, eviction_grace, plan_drain, retry_delay
from spotd.kube.keys import DO_NOT_DISRUPT_ANNOTATION, MIRROR_ANNOTATION, SAFE_TO_EVICT_ANNOTATION
from spotd.kube.ratelimit import RateLimiter
from spotd.kube.watch import RESYNC, resilient_watch

_RETRYABLE = frozenset({409, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class DrainOptions:
    """deadline_action: what to do at deadline - safety_margin with pods still refused ('delete' or 'leave').

    Voluntary drains (the controller's) never delete: PDBs are honoured to the letter.
    """

    policy: PodPolicy = PodPolicy()  # noqa: RUF009 - frozen, so sharing the default is safe
    deadline_action: str = "delete"
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


def _retry_after(exc: ApiError) -> float | None:
    response = getattr(exc, "response", None)
    value = response.headers.get("Retry-After") if response is not None else None
    try:
        return float(value) if value else None
    except ValueError:
        return None


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
    ) -> None:
        self.client, self.node, self.options, self.deadline = client, node, options, deadline
        self.log = log.bind(node=node)
        self.limiter = limiter
        self.stop = stop
        self.pending: dict[str, PodFacts] = {}  # uid -> pod we still wait to see gone
        self.started: set[str] = set()
        self.evicted: list[str] = []
        self.deleted: list[str] = []
        self.forced: list[str] = []
        self.refusal_logged: set[str] = set()  # uids whose PDB refusal was logged (once a pod)
        self.refusals: dict[str, str] = {}  # pod ref -> what refused its eviction (names the PDB)
        self.evicted_uids: set[str] = set()  # eviction accepted: the pod is on its way out
        self.changed = asyncio.Event()
        self.watch_broken = False
        self.tasks: set[asyncio.Task[None]] = set()

    # -- time --
    def seconds_left(self) -> float | None:
        return None if self.deadline is None else (self.deadline - datetime.now(UTC)).total_seconds()

    def cutoff_left(self) -> float | None:
        """Seconds until refused evictions stop being retried."""
        left = self.seconds_left()
        if left is None:
            return None
        return left if self.options.voluntary else left - self.options.safety_margin

    async def pause(self, seconds: float) -> None:
        """Sleep, but wake at once when the drain is stopped."""
        if seconds > 0:
            try:
                await asyncio.wait_for(self.stop.wait(), seconds)
            except TimeoutError:
                pass

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
        if not uid or uid in self.started:
            return
        facts = pod_facts(pod)
        verdict = plan_drain([facts], self.options.policy).decisions[0].verdict
        if verdict == PodVerdict.EVICT:
            self.launch(uid, facts, self.evict(uid, facts))
        elif verdict == PodVerdict.DELETE:
            self.launch(uid, facts, self.delete(uid, facts, None, forced=False))

    def launch(self, uid: str, facts: PodFacts, work: Any) -> None:
        self.started.add(uid)
        self.pending[uid] = facts
        task = asyncio.get_running_loop().create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def gone(self, uid: str) -> None:
        if self.pending.pop(uid, None) is not None:
            self.changed.set()

    async def evict(self, uid: str, pod: PodFacts) -> None:
        attempt = 0
        while uid in self.pending and not self.stop.is_set():
            cutoff = self.cutoff_left()
            if cutoff is not None and cutoff <= 0:
                return
            left = self.seconds_left()
            grace = None if self.options.voluntary else eviction_grace(pod, left, self.options.safety_margin)
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
                if code == 429 and _is_pdb_refusal(exc):
                    EVICTIONS.labels("pdb_blocked").inc()
                    if uid not in self.refusal_logged:
                        self.refusal_logged.add(uid)
                        self.refusals[pod.ref] = _refusal_cause(exc)
                        self.log.info("eviction_refused", pod=pod.ref, reason="disruption budget")
                    delay = retry_delay(attempt)
                elif code in _RETRYABLE:
                    delay = _retry_after(exc) or retry_delay(attempt)
                    self.log.warning("eviction_retry", pod=pod.ref, status=code, message=exc.status.message)
                else:
                    EVICTIONS.labels("failed").inc()
                    self.log.error("eviction_failed", pod=pod.ref, status=code, message=exc.status.message)
                    return  # left to the deadline action
            except (httpx.HTTPError, OSError) as exc:
                delay = retry_delay(attempt)
                self.log.warning("eviction_retry", pod=pod.ref, error=repr(exc))
            else:
                EVICTIONS.labels("evicted").inc()
                self.evicted_uids.add(uid)
                self.evicted.append(pod.ref)
                self.log.info("pod_evicted", pod=pod.ref, grace=grace)
                return
            attempt += 1
            if cutoff is not None:
                delay = min(delay, max(cutoff, 0.0))
            await self.pause(delay)

    async def delete(self, uid: str, pod: PodFacts, grace: int | None, forced: bool) -> None:
        attempt = 0
        while uid in self.pending and not self.stop.is_set():
            await self.limiter.acquire()
            try:
                if grace is None:
                    await self.client.delete(Pod, pod.name, namespace=pod.namespace)
                else:
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
                EVICTIONS.labels("forced" if forced else "deleted").inc()
                (self.forced if forced else self.deleted).append(pod.ref)
                self.evicted_uids.add(uid)
                self.log.info("pod_deleted", pod=pod.ref, forced=forced, grace=grace)
                return
            await self.pause(retry_delay(attempt))
            attempt += 1

    async def follow(self, resource_version: str | None) -> None:
        """Watch the node's pods: deletions end the wait, new pods are drained too."""
        watch = resilient_watch(
            self.client,
            Pod,
            log=self.log,
            what="pods",
            resource_version=resource_version,
            namespace=ALL_NS,
            fields={"spec.nodeName": self.node},
        )
        async for event, pod in watch:
            if event == RESYNC:  # deletions may have been missed: wait_until lists again
                self.watch_broken = True
                self.changed.set()
                continue
            uid = pod.metadata.uid if pod.metadata else None
            if not uid:
                continue
            if event == "DELETED":
                self.gone(uid)
            elif event == "ADDED":
                self.consider(pod)

    async def reconcile(self) -> None:
        """After a broken watch, deletions may have been missed: list once and settle."""
        self.watch_broken = False
        pods, _ = await self.list_pods()
        present = {p.metadata.uid for p in pods if p.metadata}
        for uid in list(self.pending):
            if uid not in present:
                self.gone(uid)
        for pod in pods:
            self.consider(pod)

    async def wait_until(self, limit: float | None) -> None:
        """Until every pending pod is gone, the drain is stopped, or `limit` seconds (None: no limit)."""
        end = None if limit is None else time.monotonic() + limit
        while self.pending and not self.stop.is_set():
            if self.watch_broken:
                await self.reconcile()
                continue
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
        try:
            for pod in pods:
                self.consider(pod)
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
            for task in list(self.tasks):
                task.cancel()
            await asyncio.gather(watcher, *self.tasks, return_exceptions=True)
        return self.result(time.monotonic() - start, skipped)

    async def at_cutoff(self) -> None:
        """Pods not evicted by deadline - margin: refused by a PDB, stuck on API errors, or never tried
        because the notice came (or was resumed) too late."""
        refused = {uid: pod for uid, pod in self.pending.items() if uid not in self.evicted_uids}
        if not refused:
            return
        if self.options.deadline_action != "delete":
            self.log.warning("deadline_pods_left", pods=[p.ref for p in refused.values()])
            return
        left = self.seconds_left() or 0.0
        grace = max(0, int(left) - 1)
        self.log.warning("deadline_force_delete", pods=[p.ref for p in refused.values()], grace=grace)
        await asyncio.gather(*(self.delete(uid, pod, grace, forced=True) for uid, pod in refused.items()))

    def result(self, duration: float, skipped: tuple[str, ...]) -> DrainResult:
        left = tuple(sorted(p.ref for p in self.pending.values()))
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
) -> DrainResult:
    """Evict every evictable pod of the node and wait until they are gone, the deadline passes, or stop is set.

    deadline: when the node goes away (None: no limit; voluntary drains pass their drain timeout here).
    Refused evictions are retried with short growing back-off until deadline - safety_margin; then
    options.deadline_action applies (never for voluntary drains).
    """
    drain = _Drain(client, node_name, options, deadline, log, limiter or RateLimiter(0, 1), stop or asyncio.Event())
    return await drain.run()
