"""spotd controller: moves on-demand fallback nodes back to Spot once Spot capacity is back. The main loop.

One TaskGroup: health server, lease, inventory (always, so a standby is warm), and while leading the
capacity readers (SQS, ASG activities) and the decision loop. The rules live in controller.policy (which
node) and capacity.pools (is Spot back); flags and config in controller.config; executing a drain in
controller.drains (handed a DrainDeps; the drain engine itself is spotd.drain); metrics and alerts of a
pass in controller.publish (which returns what fires, the state stays here).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Collection, Coroutine
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from spotd.alerts.flags import AlertConfig
from spotd.alerts.sender import Alerter
from spotd.capacity.metrics import count_signals
from spotd.capacity.pools import PoolBook, capacity_source_gap, spot_group_for, spot_where_known
from spotd.capacity.signals import ANY, CapacitySignal, CapacityType, Pool, SignalKind
from spotd.common import log as spotd_log
from spotd.common.metrics import LOOP_ERRORS, REGISTRY
from spotd.common.parsing import parse_iso_time
from spotd.common.waits import wait_set
from spotd.controller import surge as surges
from spotd.controller.book_store import BookStore
from spotd.controller.config import ControllerConfig, add_arguments, config_from_args
from spotd.controller.drains import DrainDeps, DrainJob, DrainOutcome, DrainSettings, PoolNews, drain, pool_of, recover
from spotd.controller.lifecycle import HookSettings, InventoryReads, LifecycleHooks, pods_to_drain
from spotd.controller.metrics import (
    CAPACITY_SOURCE_READY,
    DECISION_PASS_SECONDS,
    DRAINS_HELD,
    FALLBACK_NODES,
    LEADER,
    OUT_OF_SERVICE_TAINTS,
    SCOPE_CONFIGURED,
    SOURCE_LAST_READ,
    SOURCE_READY,
)
from spotd.controller.policy import (
    SpotAnswer,
    Verdict,
    choose_drains,
    drain_withdrawn,
    out_of_scope,
    out_of_service_due,
)
from spotd.controller.publish import NO_POOL_ALERTS, Firing, export_metrics, resolve_gone_nodes, update_pool_alerts
from spotd.controller.status import DrainInFlight, StatusSettings, drain_phase, standby_document, status_document
from spotd.controller.takeover import (
    Takeovers,
    TakeoverSettings,
    UnreadableRehearsal,
    rehearsal_record,
    resumable_takeovers,
)
from spotd.controller.witness import Witness
from spotd.inventory.cache import Inventory, LazyNodePods
from spotd.inventory.records import NodeInfo, RawNode, node_info
from spotd.kube.client import http_of
from spotd.kube.events import EventRecorder, node_event_times
from spotd.kube.keys import ON_DEMAND, OUT_OF_SERVICE_TAINT_KEY, OUT_OF_SERVICE_TAINT_VALUE, SPOT
from spotd.kube.lease import LeaderElector
from spotd.kube.nodes import add_node_taint
from spotd.kube.ratelimit import RateLimiter

__all__ = ["Controller", "ControllerConfig", "add_arguments", "config_from_args", "run"]

_log = spotd_log.get("spotd.controller")

COMPONENT = "spotd-controller"
UNKNOWN_LIFECYCLE_RETRY = 300.0  # seconds before asking EC2 again about an instance it did not return


def distinct_drains(starts: list[tuple[str, datetime]], since: datetime) -> list[datetime]:
    """The distinct drain starts after since: (node, time) pairs of one node within a minute are one drain."""
    out: list[datetime] = []
    last: dict[str, datetime] = {}
    for name, at in sorted(starts, key=lambda x: (x[0], x[1])):
        if at <= since:
            continue
        if name in last and name != "?" and (at - last[name]).total_seconds() <= 60:
            continue
        last[name] = at
        out.append(at)
    return sorted(out)


class Controller:
    """The controller's state and loops. sqs, asgs, lookup: the capacity readers (None: not used);
    hook_actions: the lifecycle action calls (a LifecycleActions; made when absent, used with sqs only)."""

    def __init__(
        self,
        config: ControllerConfig,
        client: Any,
        *,
        sqs: Any = None,
        asgs: Any = None,
        lookup: Any = None,
        hook_actions: Any = None,
        alerter: Alerter | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.config = config
        self.alerter = alerter or Alerter(AlertConfig())
        # Firing alerts, resolved once a pass no longer fires them: pools by alertname (what publish returned),
        # and the nodes whose drain was blocked (reported by the drains).
        self.alerted: Firing = dict(NO_POOL_ALERTS)
        self.blocked_alerts: frozenset[str] = frozenset()
        self.client = client
        self.sqs, self.asgs, self.lookup = sqs, asgs, lookup
        self.clock = clock
        self.log = _log.bind(identity=config.identity)
        self.book = PoolBook()
        self.book_store = BookStore(client, config.lease_namespace, self.log, dry_run=config.dry_run)
        self.wake = asyncio.Event()
        self.inventory = Inventory.from_client(
            client, capacity_label=config.capacity_type_label, on_node=lambda _o, _n: self._node_changed()
        )
        self.elector = LeaderElector(
            client,
            config.lease,
            on_change=lambda leading: LEADER.labels(config.identity).set(1 if leading else 0),
        )
        LEADER.labels(config.identity).set(0)
        self.events = EventRecorder(client, COMPONENT, config.identity, self.log, dry_run=config.dry_run)
        self.witness = Witness(
            self.inventory.node_of_instance,
            lambda: self.inventory.synced,
            self.log,
            client=client,
            events=self.events,
            alerter=self.alerter,
            clock=clock,
            dry_run=config.dry_run,
            on_matched=lambda node, event: self.takeovers.consider(self._spawn, node.name, event),
            on_terminate_hook=lambda node, event: self.hooks.on_terminate(self._spawn, node, event),
            on_launch_hook=(lambda event: self.hooks.on_launch(event)) if config.complete_launch_hooks else None,
        )
        self.hooks = self._lifecycle_hooks(hook_actions)
        self.takeovers = Takeovers(
            client,
            self.events,
            self.log,
            clock,
            self._agent_kind,
            TakeoverSettings(
                ack_timeout=config.agent_ack_timeout,
                asg_termination_window=config.asg_termination_window,
                dry_run=config.dry_run,
            ),
        )
        self.limiter = RateLimiter(config.eviction_qps, max(1, int(config.eviction_qps)))
        self.lifecycles: dict[str, str] = {}  # instance id -> spot | on-demand | unknown, from EC2
        self.unknown_at: dict[str, float] = {}  # instance id -> when EC2 did not know it (monotonic)
        self.launch_seen: set[str] = set()  # Spot nodes already turned into a LAUNCHED signal
        self.in_flight: dict[str, DrainJob] = {}
        self.history: deque[tuple[str, datetime]] = deque()  # drains started: ours, and read from Events
        self.reasons: dict[str, str] = {}  # last reason logged per node, so a steady state logs once
        self.completed: set[str] = set()  # nodes whose drain completed: never put back (see recover)
        self.out_of_service: set[str] = set()  # nodes we gave the out-of-service taint (once each)
        self.priorities_checked: tuple[tuple[str, ...], tuple[str, ...]] | None = None
        self.source_gap: str | None = ""  # why no capacity source feeds the book ("": not looked at this term)
        self.term_started = 0.0  # wall time this term began (for spotd_source_last_read_timestamp_seconds)
        self.ready = False
        self.last_pass = time.monotonic()
        # GET /status (the health server's thread reads it): replaced whole after every pass, never mutated
        self.status_body = json.dumps(standby_document(config.identity, clock())).encode()
        self._group: asyncio.TaskGroup | None = None
        self.drain_deps = DrainDeps(
            client=client,
            events=self.events,
            alerter=self.alerter,
            limiter=self.limiter,
            clock=clock,
            log=self.log,
            settings=DrainSettings(
                drain_timeout=config.drain_timeout,
                evict_unreplicated=config.evict_unreplicated,
                evict_local_storage=config.evict_local_storage,
                terminate_drained=config.terminate_drained,
                probe_settle=config.probe_settle,
                dry_run=config.dry_run,
                evict_jobs=config.evict_jobs,
                retry_backoff=config.retry_backoff,
                retry_backoff_cap=config.retry_backoff_cap,
                own_node=config.node_name,
                surge_timeout=config.surge_timeout,
                landing_timeout=config.landing_timeout,
                placeholder_namespace=config.placeholder_namespace,
                placeholder_priority_class=config.placeholder_priority_class,
                placeholder_image=config.placeholder_image,
                capacity_label=config.capacity_type_label,
            ),
            leading=self.elector.is_leader.is_set,
            placements=self.replacements,
            finished=self.drain_finished,
            learned=self.pool_news,
            terminate=self._terminate if asgs is not None else None,
            scope_check=self._scope_of_raw,
            spot_groups=self.spot_groups_for,
            capacity_of=self.capacity_of,
        )

    # --- the second witness (issue 19) ---------------------------------------------------------------

    def _lifecycle_hooks(self, actions: Any) -> LifecycleHooks:
        from spotd.capacity.sources.lifecycle import LifecycleActions

        def agent_deadline(name: str) -> datetime | None:
            extra = self.inventory.node_extra.get(name)
            return extra.notice_deadline if extra is not None else None

        view = InventoryReads(
            present=lambda name: name in self.inventory.nodes,
            pods_left=lambda name: pods_to_drain(self.inventory.pods_of(name)),
            agent_deadline=agent_deadline,
            node_of_instance=self.inventory.node_of_instance,
            our_asg=lambda name: self.asgs is not None and name in self.asgs.asgs,
        )
        settings = HookSettings(
            asg_termination_window=self.config.asg_termination_window,
            complete_launch_hooks=self.config.complete_launch_hooks,
            dry_run=self.config.dry_run,
        )
        return LifecycleHooks(
            actions or LifecycleActions(),
            self.client,
            self.events,
            self.log,
            self.clock,
            view,
            settings,
            # a terminate action a previous leader recorded: its node's agent may be silent, so the takeover
            # is followed again (an agent that records the notice is left the drain, as on first receipt)
            resumed=lambda node, action: self.takeovers.consider(self._spawn, node, action.event()),
        )

    async def resume_takeovers(self) -> None:
        """At the start of a term: the agent-down drains a previous leader followed (their notices are on
        the Nodes), followed again where the deadline is ahead and pods are left (one list of Nodes)."""
        await self.inventory.wait_synced()
        while True:
            try:
                resp = await http_of(self.client).get("/api/v1/nodes")
                resp.raise_for_status()
            except Exception as exc:  # the API server: tried again shortly
                LOOP_ERRORS.labels("takeover").inc()
                self.log.warning("takeover_resume_failed", error=repr(exc))
                await asyncio.sleep(self.config.lease_retry_period)
                continue
            break
        now, found = self.clock(), 0
        for item in resp.json().get("items") or []:
            meta = item.get("metadata") or {}
            name = str(meta.get("name", ""))
            try:
                record = rehearsal_record(meta.get("annotations") or {})
            except UnreadableRehearsal as exc:  # its cordon from before is unknown: left as it is
                self.log.warning("rehearsal_unreadable", node=name, error=str(exc))
                self.events.record(
                    name,
                    "SpotdRehearsalHeld",
                    f"{exc}: unreadable, so the node is left as it is (remove the annotation once the node is as "
                    "it should be)",
                    "Warning",
                )
                record = None
            if record is not None and not resumable_takeovers(meta.get("annotations") or {}, now):
                # a real notice pending wins: its follow is resumed below, the release would keep off anyway
                self.log.info("rehearsal_release_resumed", node=name, rehearsal=record.rehearsal)
                self.takeovers.resume_release(self._spawn, name, record)
                found += 1
                continue
            if name not in self.inventory.nodes or not pods_to_drain(self.inventory.pods_of(name)):
                continue
            for event in resumable_takeovers(meta.get("annotations") or {}, now):
                self.log.info("takeover_resumed", node=name, kind=event.kind, deadline=str(event.deadline))
                self.takeovers.consider(self._spawn, name, event)
                found += 1
        self.log.info("takeovers_resumed", takeovers=found)

    async def resume_hooks(self) -> None:
        """At the start of a term: the lifecycle actions a previous leader recorded on the Nodes."""
        await self.inventory.wait_synced()
        while True:
            try:
                found = await self.hooks.resume(self._spawn)
            except Exception as exc:  # the API server: tried again shortly
                LOOP_ERRORS.labels("lifecycle").inc()
                self.log.warning("lifecycle_resume_failed", error=repr(exc))
                await asyncio.sleep(self.config.lease_retry_period)
                continue
            self.log.info("lifecycle_actions_resumed", actions=found)
            return

    def _node_changed(self) -> None:
        self.wake.set()
        self.takeovers.notify()

    def _agent_kind(self, name: str) -> str:
        extra = self.inventory.node_extra.get(name)
        return extra.notice_kind if extra is not None else ""

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
        """A task of the leader's work (cancelled when the lease is lost); None when not leading."""
        if self._group is None:
            coro.close()
            return None
        return self._group.create_task(self._guarded(coro))

    async def _guarded(self, coro: Coroutine[Any, Any, None]) -> None:
        """One follow's error (an API timeout at a release) is its own: in the term's TaskGroup it would
        cancel every other takeover, heartbeat and drain and start the term again."""
        try:
            await coro
        except Exception as exc:
            LOOP_ERRORS.labels("leader_task").inc()
            self.log.exception("leader_task_failed", error=repr(exc))

    # --- signals --------------------------------------------------------------------------------------

    def on_signals(self, signals: list[CapacitySignal]) -> None:
        """New capacity signals: into the book; an ICE during a drain stops that drain."""
        self.book = self.book.record_all(signals)
        for sig in signals:
            if sig.kind != SignalKind.ICE:
                continue
            for job in self.in_flight.values():
                same_zone = sig.pool.zone in (ANY, job.pool.zone)
                if same_zone and sig.at >= job.started - timedelta(seconds=5) and not job.stop.is_set():
                    job.abort = "aborted_ice"
                    job.stop.set()
                    self.log.warning("drain_stopping", node=job.node, reason=f"new ICE in {sig.pool}: {sig.reason}")
        self.wake.set()

    def capacity_source(self) -> str | None:
        """Why no capacity source feeds the pool book (no queue, no Spot ASG discovered), or None."""
        spot = [a.name for a in self.asgs.asgs.values() if a.spot] if self.asgs is not None else []
        return capacity_source_gap(None if self.sqs is None else self.sqs.initial_read_done, spot)

    def check_capacity_source(self) -> None:
        """Say when the capacity source goes missing or comes (log, metric, an Event on our pod once a term):
        without one, spot_answer reads no pool as available and nothing is drained."""
        gap = self.capacity_source()
        CAPACITY_SOURCE_READY.set(0 if gap else 1)
        if gap == self.source_gap:
            return
        first = self.source_gap == ""
        self.source_gap = gap
        if gap is None:
            spot = sorted(a.name for a in self.asgs.asgs.values() if a.spot) if self.asgs is not None else []
            self.log.info("capacity_source_ready", queue=self.sqs is not None, spot_asgs=spot)
            return
        self.log.warning("no_capacity_source", reason=gap)
        if first:
            self.events.record_object(
                "Pod",
                self.config.identity,
                self.config.lease_namespace,
                "SpotdNoCapacitySource",
                f"{gap}: no pool is read as Spot available, nothing is drained until one is ready",
                type="Warning",
            )

    def _sources_ready(self) -> bool:
        sqs_ok = self.sqs is None or self.sqs.initial_read_done
        asg_ok = self.asgs is None or self.asgs.initial_read_done
        return bool(sqs_ok and asg_ok and self.inventory.synced)

    # --- the decision pass ----------------------------------------------------------------------------

    def resolved_nodes(self) -> list[NodeInfo]:
        """The inventory's nodes, with the capacity type EC2 told for those no label types."""
        out = []
        for node in self.inventory.nodes.values():
            if node.capacity_type is None and self.lifecycles.get(node.instance_id) in (
                SPOT,
                ON_DEMAND,
            ):
                node = replace(node, capacity_type=self.lifecycles[node.instance_id])
            out.append(node)
        return out

    async def resolve_lifecycles(self) -> None:
        """EC2 DescribeInstances for the nodes no label types; cached, except "unknown", asked again later."""
        if self.lookup is None:
            return
        retry_before = time.monotonic() - UNKNOWN_LIFECYCLE_RETRY
        wanted = [
            n.instance_id
            for n in self.inventory.nodes.values()
            if n.capacity_type is None
            and n.instance_id
            and (n.instance_id not in self.lifecycles or self.unknown_at.get(n.instance_id, 0.0) < retry_before)
        ]
        if not wanted:
            return
        try:
            found = await self.lookup.lifecycle(wanted)
        except Exception as exc:  # boto errors; the next pass asks again
            LOOP_ERRORS.labels("ec2_lookup").inc()
            self.log.warning("instance_lookup_failed", error=repr(exc), instances=len(wanted))
            return
        for iid in wanted:
            self.lifecycles[iid] = found.get(iid, "unknown")
            if iid in found:
                self.unknown_at.pop(iid, None)
            else:  # not (yet) visible to EC2: ask again later, not on every pass
                self.unknown_at[iid] = time.monotonic()

    def launch_signals(self, nodes: list[NodeInfo]) -> list[CapacitySignal]:
        """A Ready Spot node not yet counted is a LAUNCHED signal for its pool, at its creation time."""
        latest: dict[Pool, NodeInfo] = {}
        present = set()
        for node in nodes:
            present.add(node.name)
            if node.capacity_type != SPOT or not node.ready or node.name in self.launch_seen:
                continue
            self.launch_seen.add(node.name)
            pool = pool_of(node)
            if pool not in latest or latest[pool].created < node.created:
                latest[pool] = node
        self.launch_seen &= present
        return [
            CapacitySignal(
                pool,
                SignalKind.LAUNCHED,
                "node",
                n.created,
                f"Spot node {n.name} Ready",
                capacity_type=CapacityType.SPOT,
                key=n.name,
            )
            for pool, n in latest.items()
        ]

    def spot_answer(self, now: datetime) -> Callable[[NodeInfo], SpotAnswer]:
        cooldown = timedelta(seconds=self.config.ice_cooldown)
        quiet = timedelta(seconds=self.config.probe_quiet_period)
        probing = any(job.probe for job in self.in_flight.values())
        cache: dict[Pool, SpotAnswer] = {}
        gap = self.capacity_source()

        def answer(node: NodeInfo) -> SpotAnswer:
            if gap is not None:  # nobody could have told an ICE: not available, and no probe either
                return SpotAnswer(False, f"{gap}: nothing is drained")
            pool = pool_of(node)
            if pool not in cache:
                groups, unread = (self.asgs.asgs.values(), self.asgs.unread.values()) if self.asgs else ((), ())
                verdict = spot_where_known(self.book, pool, now, cooldown, groups, unread)
                due = (
                    not verdict.available
                    and quiet.total_seconds() > 0
                    and not probing
                    and any(p.contains(pool) and self.book.probe_due(p, now, quiet) for p in self.book.pools())
                )
                cache[pool] = SpotAnswer(verdict.available, verdict.reason, due)
            return cache[pool]

        return answer

    def decision_pass(self, now: datetime) -> list[Verdict]:
        """One pass over the warm inventory: signals from new Spot nodes, metrics, verdicts."""
        started = time.perf_counter()
        self.check_capacity_source()
        nodes = self.resolved_nodes()
        launched = self.launch_signals(nodes)
        if launched:
            count_signals(launched)
            self.book = self.book.record_all(launched)
        while self.history and self.history[0][1] < now - timedelta(hours=1):
            self.history.popleft()
        fallback = self.asgs.fallback_instances if self.asgs is not None else frozenset()
        self.withdraw_drains(nodes, fallback)
        verdicts = choose_drains(
            nodes,
            LazyNodePods(self.inventory),
            self.inventory.pending_pods,
            self.spot_answer(now),
            now,
            self.config.policy,
            self.in_flight.keys(),
            self.drain_history(nodes, now),
            fallback,
        )
        scope = self.config.scope
        SCOPE_CONFIGURED.set(1 if scope.configured else 0)
        FALLBACK_NODES.set(len(verdicts))
        DRAINS_HELD.labels("pending_pods").set(1 if any(v.hold == "pending_pods" for v in verdicts) else 0)
        self.export_sources()
        cooldown = timedelta(seconds=self.config.ice_cooldown)
        export_metrics(nodes, self.book, now, self.config.min_on_demand_age, cooldown)
        in_scope = {v.node for v in verdicts}
        self.alerted = update_pool_alerts(
            self.alerter,
            self.alerted,
            self.book,
            [n for n in nodes if n.name in in_scope],
            self.spot_answer(now),
            now,
            cooldown,
            self.config.min_on_demand_age,
        )
        self.blocked_alerts = resolve_gone_nodes(self.alerter, self.blocked_alerts, self.inventory.nodes.keys())
        elapsed = time.perf_counter() - started
        DECISION_PASS_SECONDS.observe(elapsed)
        drains = sum(1 for v in verdicts if v.drain)
        self.log.info(
            "decision_pass",
            seconds=round(elapsed, 4),
            nodes=len(nodes),
            pods=len(self.inventory.pods),
            on_demand=len(verdicts),
            drains=drains,
            pending_unschedulable=self.inventory.pending_unschedulable,
        )
        return verdicts

    def act(self, verdicts: list[Verdict], now: datetime) -> None:
        for v in verdicts:
            if not v.drain:
                # The reason's parenthesis carries ages that change every pass: log a change of kind only.
                kind = v.reason.split(" (", 1)[0]
                if self.reasons.get(v.node) != kind:
                    self.reasons[v.node] = kind
                    self.log.info(
                        "node_kept", node=v.node, reason=v.reason, age=round(v.age), dry_run=self.config.dry_run
                    )
                continue
            self.reasons.pop(v.node, None)
            if self.config.dry_run:
                self.log.info("would_drain", node=v.node, reason=v.reason, probe=v.probe, age=round(v.age))
                continue
            node = self.inventory.nodes.get(v.node)
            if node is None or self._group is None:
                continue
            self.history.append((v.node, now))
            self.completed.discard(v.node)  # a new drain: what we knew of an earlier one no longer holds
            job = DrainJob(
                v.node, pool_of(node), now, v.probe, instance_id=node.instance_id, attempts_before=node.drain_attempts
            )
            pods = self.inventory.pods_of(v.node)
            job.owners = frozenset((p.namespace, p.owner_kind, p.owner_name) for p in pods if p.owner_kind)
            job.pods_before = frozenset((p.namespace, p.name) for p in pods)
            self.in_flight[v.node] = job
            self._group.create_task(drain(self.drain_deps, job, v.reason))

    def publish_status(self, verdicts: list[Verdict], now: datetime) -> None:
        """GET /status after this pass: the verdicts as choose_drains gave them, the book, the drains in flight."""
        config = self.config
        settings = StatusSettings(
            config.identity,
            config.interval,
            config.min_on_demand_age,
            config.surge_timeout,
            config.drain_timeout,
            config.ice_cooldown,
            config.dry_run,
            config.scope,
        )
        in_flight = {
            name: DrainInFlight(
                name, job.started, drain_phase(config.surge_timeout, job.resumed, job.surged, job.cordoned), job.probe
            )
            for name, job in self.in_flight.items()
        }
        document = status_document(
            settings,
            now,
            self.resolved_nodes(),
            verdicts,
            self.spot_answer(now),
            pool_of,
            self.book,
            in_flight,
            self.asgs.fallback_instances if self.asgs is not None else frozenset(),
            capacity_source=self.capacity_source(),
        )
        self.status_body = json.dumps(document).encode()

    # --- what the drains report back ------------------------------------------------------------------

    def drain_finished(self, job: DrainJob, outcome: DrainOutcome) -> None:
        """A drain ended (or was interrupted): out of flight, its alert remembered, a probe's answer booked."""
        self.in_flight.pop(job.node, None)
        if outcome.outcome == "surge_failed":  # nothing was disrupted: not a drain for --max-drains-per-hour
            with contextlib.suppress(ValueError):
                self.history.remove((job.node, job.started))
        if outcome.outcome == "complete":
            self.completed.add(job.node)
        if outcome.alerted:
            self.blocked_alerts |= {job.node}
        elif outcome.outcome != "interrupted":
            self.blocked_alerts -= {job.node}
        now = self.clock()
        containing = [p for p in self.book.pools() if p.contains(job.pool)] or [job.pool]
        if outcome.landed_on_spot is not None:
            for pool in containing:
                self.book = self.book.record_probe_result(pool, now, outcome.landed_on_spot)
        self.wake.set()

    def pool_news(self, job: DrainJob, news: PoolNews) -> None:
        """A surge ended, or a drain's replacements landed on on-demand: into the book at once, before the
        Event that says so (a reader of the Event, or of the placeholders' deletion, finds it booked)."""
        now = self.clock()
        if news.surge_ready is not None:  # a surge is the probe: its answer counts for the wider pools too
            for pool in [p for p in self.book.pools() if p.contains(job.pool)] or [job.pool]:
                self.book = self.book.record_surge(pool, now, news.surge_ready, news.detail)
        if news.short:
            self.book = self.book.record_short(job.pool, now, f"replacements of {job.node} landed on on-demand")
        self.wake.set()

    def spot_groups_for(self, job: DrainJob) -> list[str]:
        """The discovered Spot ASGs that could launch in the node's pool (for cluster-autoscaler's back-off
        gate; their templates are not read yet, so the pool's type and zone decide)."""
        if self.asgs is None:
            return []
        return sorted(a.name for a in self.asgs.asgs.values() if a.spot and spot_group_for(job.pool, [a]) is not None)

    def capacity_of(self, name: str) -> str | None:
        node = self.inventory.nodes.get(name)
        if node is None:
            return None
        return node.capacity_type or self.lifecycles.get(node.instance_id)

    async def start_surges(self) -> None:
        """At the start of a term, with make-before-break on: delete any placeholder a previous leader left,
        and say whether cluster-autoscaler's priority expander ranks a Spot group above the fallback ones."""
        if self.config.surge_timeout <= 0 or self.config.dry_run:
            return
        try:
            await surges.cleanup_stale_placeholders(self.client, self.config.placeholder_namespace, self.log)
        except Exception as exc:  # the next term tries again; a surge deletes its own by label
            LOOP_ERRORS.labels("placeholder_delete").inc()
            self.log.warning("stale_placeholders_unread", error=repr(exc))
        await self.check_priorities()

    async def check_priorities(self) -> None:
        groups = list(self.asgs.asgs.values()) if self.asgs is not None else []
        spot = sorted(a.name for a in groups if a.spot)
        fallback = sorted(a.name for a in groups if not a.spot)
        key = (tuple(spot), tuple(fallback))
        if key == self.priorities_checked:
            return
        self.priorities_checked = key
        try:
            verdict = await surges.check_priorities(self.client, spot, fallback, self.log)
        except Exception as exc:
            self.log.warning("autoscaler_priorities", ok=False, reason=repr(exc))
            return
        if verdict is not None and not verdict.ok:
            self.events.record_object(
                "Pod",
                self.config.identity,
                self.config.lease_namespace,
                "SpotdAutoscalerPriorities",
                f"cluster-autoscaler may fall back to on-demand before Spot: {verdict.reason}"[:1000],
                type="Warning",
            )

    def replacements(self, job: DrainJob) -> list[str]:
        """Capacity types of the nodes where new pods of the drained pods' owners run."""
        types = {n.name: n.capacity_type or "unknown" for n in self.resolved_nodes()}
        out = []
        for key, pod in self.inventory.pods.items():
            if key in job.pods_before or not pod.node or pod.node == job.node:
                continue
            if (pod.namespace, pod.owner_kind, pod.owner_name) in job.owners:
                out.append(types.get(pod.node, "unknown"))
        return out

    async def _terminate(self, instance_id: str) -> str:
        assert self.asgs is not None
        return str(await self.asgs.terminate_instance(instance_id, decrement_desired=True))

    def _scope_of_raw(self, body: dict[str, Any]) -> str | None:
        """Why a node as just read from the API is out of the fallback scope, or None."""
        try:
            node = node_info(msgspec.convert(body, RawNode), self.config.capacity_type_label)
        except msgspec.ValidationError as exc:
            return f"node unreadable ({exc})"
        fallback = self.asgs.fallback_instances if self.asgs is not None else frozenset()
        return out_of_scope(node, self.config.scope, fallback)

    def _marked(self) -> dict[str, str]:
        return {name: extra.draining_since for name, extra in self.inventory.node_extra.items()}

    def withdraw_drains(self, nodes: list[NodeInfo], fallback: Collection[str]) -> None:
        """A drain in flight stops when its node leaves the scope or is annotated to be left alone."""
        by_name = {n.name: n for n in nodes}
        for job in self.in_flight.values():
            node = by_name.get(job.node)
            why = drain_withdrawn(node, self.config.scope, fallback) if node is not None else None
            if why and not job.stop.is_set():
                job.abort, job.abort_reason = "withdrawn", why
                job.stop.set()
                self.log.warning("drain_stopping", node=job.node, reason=why)

    def resume_drain(self, name: str, since: str) -> bool:
        """At the start of a term: take over a drain a previous leader began (it may have run on that node
        and been evicted by its own drain), when its mark is younger than --drain-timeout and the node is
        still a candidate (in scope, Spot available). False: recover() puts it back."""
        node = self.inventory.nodes.get(name)
        if node is None or self._group is None or self.config.dry_run:
            return False
        now = self.clock()
        try:
            age = (now - parse_iso_time(since)).total_seconds()
        except ValueError:
            return False
        fallback = self.asgs.fallback_instances if self.asgs is not None else frozenset()
        if age >= self.config.drain_timeout or drain_withdrawn(node, self.config.scope, fallback) is not None:
            return False
        answer = self.spot_answer(now)(node)
        if not answer.available:
            return False
        self.history.append((name, now))
        self.completed.discard(name)
        job = DrainJob(
            name, pool_of(node), now, False, instance_id=node.instance_id, attempts_before=node.drain_attempts
        )
        job.resumed = True
        job.pods_before = frozenset((p.namespace, p.name) for p in self.inventory.pods_of(name))
        self.in_flight[name] = job
        self._group.create_task(drain(self.drain_deps, job, f"resumed; Spot available: {answer.reason}"))
        return True

    def _drained(self, name: str) -> bool:
        """The node's drain completed: we saw it, or nothing evictable is left on it."""
        return name in self.completed or (self.inventory.synced and self.inventory.node_pods(name).evictable == 0)

    def drain_history(self, nodes: list[NodeInfo], now: datetime) -> list[datetime]:
        """Starts of the last hour's drains, for --max-drains-per-hour, from what the API records: our marks
        on the nodes (draining, drained, the back-off's start) and our SpotdDrainStarted Events (read at
        the start of the term: a node deleted since takes its marks along), with the drains this process
        started. The same drain seen twice (within a minute on one node) counts once."""
        since = now - timedelta(hours=1)
        starts: list[tuple[str, datetime]] = list(self.history)
        for node in nodes:
            at = node.drain_started or node.drained_at
            if at is not None:
                starts.append((node.name, at))
        return distinct_drains(starts, since)

    async def read_drain_events(self) -> None:
        """At the start of a term: the drains previous leaders started in the last hour, from their Events."""
        try:
            found = await node_event_times(self.client, "SpotdDrainStarted", COMPONENT)
        except Exception as exc:  # fail closed: without them, a hand-over could exceed the hourly budget
            LOOP_ERRORS.labels("drain_events").inc()
            self.log.warning("drain_events_unread", error=repr(exc))
            found = [("?", self.clock())] * self.config.max_drains_per_hour
        since = self.clock() - timedelta(hours=1)
        self.history.extend(sorted(((n, t) for n, t in found if t > since), key=lambda x: x[1]))

    async def apply_out_of_service(self, now: datetime) -> None:
        """node.kubernetes.io/out-of-service=nodeshutdown:NoExecute on every node whose interruption
        deadline passed and that went NotReady: the control plane then force-deletes its pods and detaches
        their volumes at once. Once per node; any node, in scope or not."""
        self.out_of_service &= self.inventory.node_extra.keys()  # a node gone: its name may come back
        self.completed &= self.inventory.node_extra.keys()
        for name, extra in list(self.inventory.node_extra.items()):
            node = self.inventory.nodes.get(name)
            if node is None or name in self.out_of_service:
                continue
            reason = out_of_service_due(node, extra, now)
            if reason is None:
                continue
            self.out_of_service.add(name)
            if self.config.dry_run:
                self.log.info("would_taint_out_of_service", node=name, reason=reason)
                continue
            taint = {"key": OUT_OF_SERVICE_TAINT_KEY, "value": OUT_OF_SERVICE_TAINT_VALUE, "effect": "NoExecute"}
            try:
                status, added = await add_node_taint(self.client, name, taint)
            except Exception as exc:  # the next pass tries again
                status, added = 0, False
                self.log.warning("out_of_service_failed", node=name, error=repr(exc))
            if added:
                OUT_OF_SERVICE_TAINTS.labels("applied").inc()
                self.log.warning("node_out_of_service", node=name, reason=reason)
                self.events.record(name, "SpotdOutOfService", f"{OUT_OF_SERVICE_TAINT_KEY} applied: {reason}")
            elif not 200 <= status < 300:
                OUT_OF_SERVICE_TAINTS.labels("failed").inc()
                self.out_of_service.discard(name)  # tried again next pass
                self.log.warning("out_of_service_failed", node=name, status=status)

    def export_sources(self) -> None:
        """spotd_source_ready and _last_read_timestamp_seconds of this term (the leader's only)."""
        states = {"inventory": (self.inventory.synced, self.inventory.last_contact)}
        if self.sqs is not None:
            states["sqs"] = (self.sqs.healthy, self.sqs.last_success)
        if self.asgs is not None:
            states["activities"] = (self.asgs.healthy, self.asgs.last_success)
        for source, (ok, last) in states.items():
            SOURCE_READY.labels(source).set(1 if ok else 0)
            SOURCE_LAST_READ.labels(source).set(max(last, self.term_started))

    def start_term(self) -> None:
        """A new term starts from a fresh read of every source, on the book the last leader saved (lead()
        loads it): this process's own book of an earlier term missed what another leader learnt meanwhile."""
        self.book = PoolBook()
        self.launch_seen = set()
        self.alerted = dict(NO_POOL_ALERTS)
        self.priorities_checked = None
        self.source_gap = ""
        self.term_started = time.time()
        if self.sqs is not None:
            self.sqs.reset()
        if self.asgs is not None:
            self.asgs.reset()
        self.export_sources()

    # --- the loops ------------------------------------------------------------------------------------

    async def decision_loop(self) -> None:
        waiting_since = time.monotonic()
        last_note = waiting_since
        while not self._sources_ready():  # the sources have no common event: look every 0.2 s
            self.wake.clear()  # a wake left set made this a busy loop until the sources were read
            await wait_set(self.wake, 0.2)
            if time.monotonic() - last_note >= 30:  # a source that never completes must be visible
                last_note = time.monotonic()
                self.log.warning(
                    "waiting_for_sources",
                    seconds=round(last_note - waiting_since),
                    sqs=self.sqs is None or self.sqs.initial_read_done,
                    activities=self.asgs is None or self.asgs.initial_read_done,
                    inventory=self.inventory.synced,
                )
        await self.resolve_lifecycles()
        await self.read_drain_events()
        launched = self.launch_signals(self.resolved_nodes())  # the Spot nodes, before recover() decides
        count_signals(launched)
        self.book = self.book.record_all(launched)
        await self.start_surges()
        self.ready = True
        self.log.info("sources_ready", nodes=len(self.inventory.nodes), pods=len(self.inventory.pods))
        await recover(
            self.drain_deps, self._marked(), self.in_flight.keys(), drained=self._drained, resume=self.resume_drain
        )
        while True:
            self.wake.clear()
            self.last_pass = time.monotonic()
            if self.inventory.synced:
                try:
                    await self.resolve_lifecycles()
                    await recover(
                        self.drain_deps,
                        self._marked(),
                        self.in_flight.keys(),
                        self.config.drain_timeout + 60,
                        drained=self._drained,
                    )
                    if self.config.surge_timeout > 0 and not self.config.dry_run:
                        await self.check_priorities()  # again only when the ASGs changed
                    now = self.clock()
                    await self.apply_out_of_service(now)
                    verdicts = self.decision_pass(now)
                    self.act(verdicts, now)
                    self.publish_status(verdicts, now)
                except Exception as exc:
                    LOOP_ERRORS.labels("decisions").inc()
                    self.log.exception("decision_pass_failed", error=repr(exc))
            await wait_set(self.wake, self.config.interval)
            await asyncio.sleep(min(1.0, self.config.interval))  # a burst of events is one pass

    async def lead(self) -> None:
        """Everything only the leader does; cancelled the moment the lease is lost."""
        self.log.info("leading")
        self.start_term()
        # what the previous leader learnt (short pools, probe back-off), before any source adds to it
        self.book = await self.book_store.load_until_loaded(self.config.lease_retry_period)
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                if self.sqs is not None:
                    group.create_task(
                        self.sqs.run(
                            self.on_signals,
                            lambda: self.asgs.asgs if self.asgs else {},
                            on_instances=self.witness.on_event,
                        )
                    )
                    group.create_task(self.resume_hooks())
                # the Nodes' records, whether or not a queue is read now (one read before may have left them)
                group.create_task(self.resume_takeovers())
                if self.asgs is not None:
                    group.create_task(self.asgs.run(self.on_signals, self.config.activities_interval))
                group.create_task(self.decision_loop())
                group.create_task(self.book_store.keep(lambda: self.book))
        finally:
            self._group = None
            self.ready = False
            self.status_body = json.dumps(standby_document(self.config.identity, self.clock())).encode()
            SOURCE_READY.clear()
            SOURCE_LAST_READ.clear()
            CAPACITY_SOURCE_READY.set(0)

    async def leadership(self) -> None:
        """Run `lead` while the lease is held; cancel it the moment the lease is lost (or we are cancelled)."""
        while True:
            await self.elector.wait_leading()
            work = asyncio.create_task(self.lead())
            lost = asyncio.create_task(self.elector.wait_not_leading())
            try:
                await asyncio.wait({work, lost}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                lost.cancel()
                if not work.done():
                    self.log.warning("stopped_leading", leading=self.elector.is_leader.is_set())
                    work.cancel()
                await asyncio.wait({work})
            if not work.cancelled() and work.exception() is not None:
                LOOP_ERRORS.labels("leader").inc()
                self.log.error("leader_work_failed", error=repr(work.exception()))
                await asyncio.sleep(self.config.lease_retry_period)

    def alive(self) -> bool:
        if not self.ready:
            return True
        return time.monotonic() - self.last_pass < max(120.0, 4 * self.config.interval)

    def readiness(self) -> bool:
        return self.inventory.synced and self.elector.healthy

    def announce_scope(self) -> None:
        """At start: what may be drained. Without a declared scope nothing is: said in the log, a metric,
        /readyz and an Event on the controller's pod."""
        scope = self.config.scope
        SCOPE_CONFIGURED.set(1 if scope.configured else 0)
        if scope.configured:
            self.log.info("fallback_scope", selector=scope.selector_text, asg_tag=scope.asg_tag)
            return
        message = self.readiness_detail()
        self.log.warning("no_fallback_scope", message=message)
        self.events.record_object(
            "Pod", self.config.identity, self.config.lease_namespace, "SpotdNoFallbackScope", message, type="Warning"
        )

    def http_server(self) -> Any:
        """The --listen server: /healthz, /readyz, /metrics and /status (what `spotd status` reads)."""
        from spotd.common.health import HealthServer

        host, port = self.config.listen
        return HealthServer(
            host,
            port,
            REGISTRY,
            self.alive,
            self.readiness,
            detail=self.readiness_detail,
            status=lambda: self.status_body,
        )

    def readiness_detail(self) -> str:
        """What /readyz says besides ready / not ready."""
        scope = self.config.scope
        if not scope.configured:
            return "no fallback capacity declared (--fallback-selector / --fallback-asg-tag): nothing is drained"
        parts = [f"--fallback-selector {scope.selector_text}"] if scope.selector else []
        parts += [f"--fallback-asg-tag {scope.asg_tag}"] if scope.asg_tag else []
        return "fallback scope: " + ", ".join(parts)


class _Stop(Exception):
    """SIGTERM/SIGINT: leave the TaskGroup."""


async def run(config: ControllerConfig | argparse.Namespace) -> int:
    """Entry point for `spotd controller` (a validated config, or the parsed flags); runs until SIGTERM/SIGINT."""
    if isinstance(config, argparse.Namespace):
        config = config_from_args(config)
    spotd_log.configure(config.log_level)
    from spotd.capacity.sources.asg import AsgSource, tag_filters
    from spotd.capacity.sources.aws import AwsStartupError, InstanceLookup, check_aws_access
    from spotd.capacity.sources.sqs import SqsSource
    from spotd.kube.client import make_client

    if os.environ.get("AWS_REGION") and not os.environ.get("AWS_DEFAULT_REGION"):
        os.environ["AWS_DEFAULT_REGION"] = os.environ["AWS_REGION"]  # boto3 reads only AWS_DEFAULT_REGION
    try:  # like an unusable kubeconfig: one line, non-zero exit, before anything runs
        caller = await asyncio.to_thread(check_aws_access, config.sqs_queue_url, tag_filters(config.asg_tags))
    except AwsStartupError as exc:
        print(f"spotd controller: error: {exc}", file=sys.stderr)
        return 2
    # a silent (half-open) watch in a drain fails after --watch-timeout and a tenth, then lists again
    client = make_client(config.kubeconfig, watch_timeout=config.watch_timeout)
    lookup = InstanceLookup()
    sqs = SqsSource(config.sqs_queue_url, lookup=lookup, wait_seconds=config.sqs_wait) if config.sqs_queue_url else None
    asgs = AsgSource(
        tag_filters=config.asg_tags,
        history=timedelta(seconds=config.activities_history),
        lookup=lookup,
        fallback_tag=config.fallback_asg_tag,
    )
    try:  # which groups are Spot decides what is read for ICE: a refused read is not a warning
        await asgs.check_discovery()
    except AwsStartupError as exc:
        print(f"spotd controller: error: {exc}", file=sys.stderr)
        return 2
    alerter = Alerter(config.alerts, log=_log)
    controller = Controller(config, client, sqs=sqs, asgs=asgs, lookup=lookup, alerter=alerter)
    controller.log.info(
        "controller_starting", aws_identity=caller, **{k: str(v) for k, v in config.summary().items() if k != "alerts"}
    )
    controller.announce_scope()
    server = controller.http_server()
    await server.start()
    controller.log.info("listening", port=server.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def shutdown(leader_task: asyncio.Task[None]) -> None:
        await stop.wait()
        controller.log.info("controller_stopping")
        leader_task.cancel()  # the drain in flight stops and its node is uncordoned, while we still lead
        with contextlib.suppress(asyncio.CancelledError):
            await leader_task
        raise _Stop()

    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(controller.elector.run())
            group.create_task(controller.inventory.run())
            group.create_task(alerter.run())
            leader_task = group.create_task(controller.leadership())
            group.create_task(shutdown(leader_task))
    except* _Stop:
        pass
    finally:
        await controller.events.flush()
        await server.stop()
        with contextlib.suppress(Exception):
            await client.close()
        controller.log.info("controller_stopped")
    return 0
