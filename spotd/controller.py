"""spotd controller: moves on-demand fallback nodes back to Spot once Spot capacity is back. Wiring only.

One TaskGroup: health server, lease, inventory (always, so a standby is warm), and while leading the
capacity readers (SQS, ASG activities) and the decision loop. The rules live in spotd.ondemand (which
node) and spotd.capacity.pools (is Spot back); the drain itself is spotd.kube.drain.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from spotd import log as spotd_log
from spotd import ondemand
from spotd.alerts import AlertConfig, Alerter, alert_config_from_args
from spotd.alerts import NodeInfo as AlertNode
from spotd.alerts.model import (
    ON_DEMAND_DRAIN_BLOCKED,
    ON_DEMAND_FALLBACK_ACTIVE,
    SPOT_CAPACITY_UNAVAILABLE,
    on_demand_drain_blocked_alert,
    on_demand_fallback_alert,
    spot_capacity_unavailable_alert,
)
from spotd.capacity import UNAVAILABLE, CapacitySignal, CapacityType, Pool, PoolBook, SignalKind
from spotd.capacity.metrics import count_signals, export_pool_states
from spotd.capacity.signals import ANY
from spotd.controller_metrics import (
    CONTROLLER_DRAINS,
    DECISION_PASS_SECONDS,
    LEADER,
    NODES,
    OLDEST_ON_DEMAND_AGE,
    ON_DEMAND_AGE,
    ON_DEMAND_OVER_AGE,
)
from spotd.decide import DrainPolicy as PodPolicy
from spotd.kube.drain import DrainOptions, drain_node
from spotd.kube.events import EventRecorder
from spotd.kube.inventory import DRAINING_ANNOTATION, Inventory
from spotd.kube.lease import LeaderElector, LeaseConfig, http_of, micro_time
from spotd.kube.ratelimit import RateLimiter
from spotd.metrics import LOOP_ERRORS, REGISTRY
from spotd.ondemand import DrainPolicy, NodeInfo, NodePods, SpotAnswer, Verdict
from spotd.parsing import parse_duration, parse_host_port

_log = spotd_log.get("spotd.controller")

DRAINED_ANNOTATION = "spotd.io/drained"
COMPONENT = "spotd-controller"


# --- configuration ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ControllerConfig:
    kubeconfig: str | None = None
    listen: tuple[str, int] = ("0.0.0.0", 8080)
    sqs_queue_url: str = ""
    min_on_demand_age: float = 7200.0
    ice_cooldown: float = 900.0
    lease_name: str = "spotd-controller"
    lease_namespace: str = "kube-system"
    identity: str = ""
    lease_duration: float = 15.0
    lease_renew_deadline: float = 10.0
    lease_renew_period: float = 5.0
    lease_retry_period: float = 2.0
    capacity_type_label: str | None = None
    max_concurrent_drains: int = 1
    max_drains_per_hour: int = 6
    drain_timeout: float = 600.0
    evict_unreplicated: bool = False
    evict_local_storage: bool = False
    terminate_drained: bool = False
    probe_quiet_period: float = 3600.0
    probe_settle: float = 300.0
    interval: float = 30.0
    activities_interval: float = 60.0
    activities_history: float = 21600.0
    asg_tags: tuple[tuple[str, str | None], ...] = (("k8s.io/cluster-autoscaler/enabled", "true"),)
    eviction_qps: float = 5.0
    sqs_wait: int = 20
    dry_run: bool = False
    log_level: str = "info"
    alerts: AlertConfig = AlertConfig()  # noqa: RUF009 - frozen, sharing the default is safe

    @property
    def policy(self) -> DrainPolicy:
        return DrainPolicy(
            min_on_demand_age=self.min_on_demand_age,
            max_concurrent_drains=self.max_concurrent_drains,
            max_drains_per_hour=self.max_drains_per_hour,
            evict_unreplicated=self.evict_unreplicated,
            evict_local_storage=self.evict_local_storage,
        )

    def summary(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _env(flag: str) -> str:
    return "SPOTD_" + flag.lstrip("-").upper().replace("-", "_")


def _env_bool(flag: str) -> bool:
    return os.environ.get(_env(flag), "").strip().lower() in ("1", "true", "yes", "on")


_DURATIONS = {
    "--min-on-demand-age": "2h",
    "--ice-cooldown": "15m",
    "--lease-duration": "15s",
    "--lease-renew-deadline": "10s",
    "--lease-renew-period": "5s",
    "--lease-retry-period": "2s",
    "--drain-timeout": "10m",
    "--probe-quiet-period": "1h",
    "--probe-settle": "5m",
    "--interval": "30s",
    "--activities-interval": "60s",
    "--activities-history": "6h",
    "--sqs-wait": "20s",
}
_BOOLS = {
    "--evict-unreplicated": "evict pods that no controller would recreate",
    "--evict-local-storage": "evict pods with emptyDir volumes (their data is lost)",
    "--terminate-drained": "terminate a drained node through its ASG, decrementing desired capacity",
    "--dry-run": "log every decision, change nothing",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The controller's flags; each has an environment default SPOTD_<FLAG>, and a flag given wins."""

    def text(flag: str, default: str | None, help: str, **kw: Any) -> None:
        parser.add_argument(flag, default=os.environ.get(_env(flag), default), help=f"{help} (env {_env(flag)})", **kw)

    text("--kubeconfig", None, "kubeconfig file; in-cluster credentials when absent")
    text("--listen", "0.0.0.0:8080", "HOST:PORT of /healthz /readyz /metrics")
    text("--sqs-queue-url", "", "SQS queue with the EventBridge Auto Scaling events; none: activities only")
    text("--lease-name", "spotd-controller", "name of the coordination.k8s.io Lease")
    text("--lease-namespace", os.environ.get("POD_NAMESPACE", "kube-system"), "namespace of the Lease")
    text("--lease-identity", os.environ.get("POD_NAME", ""), "holder identity; default POD_NAME, else host-pid")
    text("--capacity-type-label", None, "node label naming spot/on-demand, read before the usual ones")
    text("--max-concurrent-drains", "1", "on-demand nodes drained at the same time")
    text("--max-drains-per-hour", "6", "drains started in any hour")
    text("--eviction-qps", "5", "evictions per second at most")
    text(
        "--asg-tag",
        "k8s.io/cluster-autoscaler/enabled=true",
        "comma-separated KEY or KEY=VALUE tags selecting the ASGs whose activities are read",
    )
    for flag, default in _DURATIONS.items():
        text(flag, default, f"duration (default {default})")
    for flag, help in _BOOLS.items():
        parser.add_argument(flag, action="store_true", default=_env_bool(flag), help=f"{help} (env {_env(flag)})")


def _duration(args: argparse.Namespace, flag: str) -> float:
    value = str(getattr(args, flag.lstrip("-").replace("-", "_")))
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise ValueError(f"{flag}: {exc}") from None
    if seconds < 0:
        raise ValueError(f"{flag}: {value!r} is negative")
    return seconds


def _int(args: argparse.Namespace, flag: str, minimum: int) -> int:
    value = getattr(args, flag.lstrip("-").replace("-", "_"))
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{flag}: {value!r} is not a whole number") from None
    if number < minimum:
        raise ValueError(f"{flag}: {number} is below {minimum}")
    return number


def _asg_tags(text: str) -> tuple[tuple[str, str | None], ...]:
    tags: list[tuple[str, str | None]] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not key.strip():
            raise ValueError(f"--asg-tag: {part!r} has no key")
        tags.append((key.strip(), value.strip() if sep else None))
    return tuple(tags)


def config_from_args(args: argparse.Namespace) -> ControllerConfig:
    """Validate every flag once, at start; a bad value raises ValueError naming the flag."""
    try:
        listen = parse_host_port(str(args.listen))
    except ValueError as exc:
        raise ValueError(f"--listen: {exc}") from None
    try:
        qps = float(args.eviction_qps)
    except ValueError:
        raise ValueError(f"--eviction-qps: {args.eviction_qps!r} is not a number") from None
    durations = {flag: _duration(args, flag) for flag in _DURATIONS}
    if durations["--interval"] <= 0:
        raise ValueError("--interval: must be above 0")
    config = ControllerConfig(
        kubeconfig=args.kubeconfig or None,
        listen=listen,
        sqs_queue_url=str(args.sqs_queue_url or ""),
        min_on_demand_age=durations["--min-on-demand-age"],
        ice_cooldown=durations["--ice-cooldown"],
        lease_name=str(args.lease_name),
        lease_namespace=str(args.lease_namespace),
        identity=str(args.lease_identity or f"{socket.gethostname()}-{os.getpid()}"),
        lease_duration=durations["--lease-duration"],
        lease_renew_deadline=durations["--lease-renew-deadline"],
        lease_renew_period=durations["--lease-renew-period"],
        lease_retry_period=durations["--lease-retry-period"],
        capacity_type_label=args.capacity_type_label or None,
        max_concurrent_drains=_int(args, "--max-concurrent-drains", 1),
        max_drains_per_hour=_int(args, "--max-drains-per-hour", 1),
        drain_timeout=durations["--drain-timeout"],
        evict_unreplicated=bool(args.evict_unreplicated),
        evict_local_storage=bool(args.evict_local_storage),
        terminate_drained=bool(args.terminate_drained),
        probe_quiet_period=durations["--probe-quiet-period"],
        probe_settle=durations["--probe-settle"],
        interval=durations["--interval"],
        activities_interval=durations["--activities-interval"],
        activities_history=durations["--activities-history"],
        asg_tags=_asg_tags(str(args.asg_tag or "")),
        eviction_qps=qps,
        sqs_wait=max(0, min(20, round(durations["--sqs-wait"]))),
        dry_run=bool(args.dry_run),
        log_level=str(getattr(args, "log_level", None) or "info"),
        alerts=alert_config_from_args(args) if hasattr(args, "alertmanager_url") else AlertConfig(),
    )
    LeaseConfig(  # validates the lease timings
        config.lease_name,
        config.lease_namespace,
        config.identity,
        config.lease_duration,
        config.lease_renew_deadline,
        config.lease_renew_period,
        config.lease_retry_period,
    )
    return config


# --- the controller -----------------------------------------------------------------------------------


@dataclass
class DrainJob:
    node: str
    pool: Pool
    started: datetime
    probe: bool
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    abort: str = ""  # why it was stopped: "aborted_ice"
    cordoned: bool = False  # by us, for this drain: only then is uncordoning ours to do
    owners: frozenset[tuple[str, str, str]] = frozenset()
    pods_before: frozenset[tuple[str, str]] = frozenset()


class _LazyPods(Mapping[str, NodePods]):
    """The inventory's per-node pod summaries, computed only for the nodes the policy reads."""

    def __init__(self, inventory: Inventory) -> None:
        self._inventory = inventory

    def __getitem__(self, name: str) -> NodePods:
        return self._inventory.node_pods(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._inventory.nodes)

    def __len__(self) -> int:
        return len(self._inventory.nodes)


def pool_of(node: NodeInfo) -> Pool:
    return Pool(node.instance_type or ANY, node.zone or ANY)


class Controller:
    """The controller's state and loops. sqs, asgs, lookup: the capacity readers (None: not used)."""

    def __init__(
        self,
        config: ControllerConfig,
        client: Any,
        *,
        sqs: Any = None,
        asgs: Any = None,
        lookup: Any = None,
        alerter: Alerter | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.config = config
        self.alerter = alerter or Alerter(AlertConfig())
        self._alerted: dict[str, set[str]] = {SPOT_CAPACITY_UNAVAILABLE: set(), ON_DEMAND_FALLBACK_ACTIVE: set()}
        self._blocked_alerts: set[str] = set()
        self.client = client
        self.sqs, self.asgs, self.lookup = sqs, asgs, lookup
        self.clock = clock
        self.log = _log.bind(identity=config.identity)
        self.book = PoolBook()
        self.wake = asyncio.Event()
        self.inventory = Inventory.from_client(
            client, capacity_label=config.capacity_type_label, on_node=lambda _o, _n: self.wake.set()
        )
        self.elector = LeaderElector(
            client,
            LeaseConfig(
                config.lease_name,
                config.lease_namespace,
                config.identity,
                config.lease_duration,
                config.lease_renew_deadline,
                config.lease_renew_period,
                config.lease_retry_period,
            ),
            on_change=lambda leading: LEADER.labels(config.identity).set(1 if leading else 0),
        )
        LEADER.labels(config.identity).set(0)
        self.events = EventRecorder(client, COMPONENT, config.identity, self.log, dry_run=config.dry_run)
        self.limiter = RateLimiter(config.eviction_qps, max(1, int(config.eviction_qps)))
        self.lifecycles: dict[str, str] = {}  # instance id -> spot | on-demand | unknown, from EC2
        self.launch_seen: set[str] = set()  # Spot nodes already turned into a LAUNCHED signal
        self.in_flight: dict[str, DrainJob] = {}
        self.history: deque[datetime] = deque()
        self.reasons: dict[str, str] = {}  # last reason logged per node, so a steady state logs once
        self.ready = False
        self.last_pass = time.monotonic()
        self._group: asyncio.TaskGroup | None = None

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
                ondemand.SPOT,
                ondemand.ON_DEMAND,
            ):
                node = replace(node, capacity_type=self.lifecycles[node.instance_id])
            out.append(node)
        return out

    async def resolve_lifecycles(self) -> None:
        """EC2 DescribeInstances for the nodes no label types; cached for the life of the process."""
        if self.lookup is None:
            return
        wanted = [
            n.instance_id
            for n in self.inventory.nodes.values()
            if n.capacity_type is None and n.instance_id and n.instance_id not in self.lifecycles
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

    def launch_signals(self, nodes: list[NodeInfo]) -> list[CapacitySignal]:
        """A Ready Spot node not yet counted is a LAUNCHED signal for its pool, at its creation time."""
        latest: dict[Pool, NodeInfo] = {}
        present = set()
        for node in nodes:
            present.add(node.name)
            if node.capacity_type != ondemand.SPOT or not node.ready or node.name in self.launch_seen:
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

        def answer(node: NodeInfo) -> SpotAnswer:
            pool = pool_of(node)
            if pool not in cache:
                verdict = self.book.spot_available(pool, now, cooldown)
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
        nodes = self.resolved_nodes()
        launched = self.launch_signals(nodes)
        if launched:
            count_signals(launched)
            self.book = self.book.record_all(launched)
        while self.history and self.history[0] < now - timedelta(hours=1):
            self.history.popleft()
        verdicts = ondemand.choose_drains(
            nodes,
            _LazyPods(self.inventory),
            self.inventory.pending_unschedulable,
            self.spot_answer(now),
            now,
            self.config.policy,
            self.in_flight.keys(),
            self.history,
        )
        self._export(nodes, now)
        self._alert(nodes, now)
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

    def _export(self, nodes: list[NodeInfo], now: datetime) -> None:
        counts = {"spot": 0, "on-demand": 0, "unknown": 0}
        oldest = 0.0
        over = 0
        for node in nodes:
            counts[node.capacity_type or "unknown"] += 1
            if node.capacity_type == ondemand.ON_DEMAND:
                age = node.age(now)
                ON_DEMAND_AGE.observe(age)
                oldest = max(oldest, age)
                over += age >= self.config.min_on_demand_age
        for ctype, count in counts.items():
            NODES.labels(ctype).set(count)
        OLDEST_ON_DEMAND_AGE.set(oldest)
        ON_DEMAND_OVER_AGE.set(over)
        export_pool_states(self.book, now, timedelta(seconds=self.config.ice_cooldown))

    def _alert(self, nodes: list[NodeInfo], now: datetime) -> None:
        """Spot short in a pool; on-demand fallback kept because of it. Fired while true, resolved after."""
        cooldown = timedelta(seconds=self.config.ice_cooldown)
        firing: dict[str, set[str]] = {name: set() for name in self._alerted}
        for pool in self.book.pools():
            verdict = self.book.spot_available(pool, now, cooldown)
            record = self.book.get(pool)
            if verdict.state == UNAVAILABLE and record is not None and record.last_ice is not None:
                alert = spot_capacity_unavailable_alert(
                    str(pool), pool.zone, pool.instance_type, verdict.reason, record.last_ice
                )
                self.alerter.fire(alert)
                firing[SPOT_CAPACITY_UNAVAILABLE].add(str(pool))
        kept: dict[str, list[NodeInfo]] = {}
        answer = self.spot_answer(now)
        for node in nodes:
            if node.capacity_type == ondemand.ON_DEMAND and node.age(now) >= self.config.min_on_demand_age:
                if not answer(node).available:
                    kept.setdefault(str(pool_of(node)), []).append(node)
        for pool_name, held in kept.items():
            oldest = max(n.age(now) for n in held)
            names = sorted(n.name for n in held)
            self.alerter.fire(on_demand_fallback_alert(pool_name, names, timedelta(seconds=oldest), now))
            firing[ON_DEMAND_FALLBACK_ACTIVE].add(pool_name)
        for name, pools in self._alerted.items():
            for gone in pools - firing[name]:
                self.alerter.resolve(name, {"pool": gone})
        self._alerted = firing
        for name in self._blocked_alerts - self.inventory.nodes.keys():  # the node is gone
            self.alerter.resolve(ON_DEMAND_DRAIN_BLOCKED, {"node": name})
        self._blocked_alerts &= self.inventory.nodes.keys()

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
            self.history.append(now)
            job = DrainJob(v.node, pool_of(node), now, v.probe)
            pods = self.inventory.pods_of(v.node)
            job.owners = frozenset((p.namespace, p.owner_kind, p.owner_name) for p in pods if p.owner_kind)
            job.pods_before = frozenset((p.namespace, p.name) for p in pods)
            self.in_flight[v.node] = job
            self._group.create_task(self.drain(job, v.reason))

    # --- executing a drain ----------------------------------------------------------------------------

    async def _patch_node(self, name: str, patch: dict[str, Any]) -> int:
        resp = await http_of(self.client).patch(
            f"/api/v1/nodes/{name}", json=patch, headers={"Content-Type": "application/merge-patch+json"}
        )
        return resp.status_code

    async def _cordon(self, name: str) -> str | None:
        """Cordon with our marker, conditional on the version read; None when done, else why not."""
        resp = await http_of(self.client).get(f"/api/v1/nodes/{name}")
        if resp.status_code != 200:
            return f"node read failed ({resp.status_code})"
        body = resp.json()
        meta, spec = body.get("metadata") or {}, body.get("spec") or {}
        if spec.get("unschedulable"):
            return "cordoned by someone else meanwhile"
        if str((meta.get("annotations") or {}).get(ondemand.DRAIN_ANNOTATION, "")).lower() == "false":
            return f"annotated {ondemand.DRAIN_ANNOTATION}=false meanwhile"
        patch = {
            "metadata": {
                "resourceVersion": meta.get("resourceVersion"),
                "annotations": {DRAINING_ANNOTATION: micro_time(self.clock())},
            },
            "spec": {"unschedulable": True},
        }
        status = await self._patch_node(name, patch)
        return None if status < 300 else f"cordon failed ({status})"

    async def _uncordon(self, name: str) -> None:
        patch = {"metadata": {"annotations": {DRAINING_ANNOTATION: None}}, "spec": {"unschedulable": None}}
        status = await self._patch_node(name, patch)
        self.log.info("node_uncordoned", node=name, status=status)

    async def drain(self, job: DrainJob, reason: str) -> None:
        """Cordon, drain, then record the outcome; on cancellation put the node back if we still lead.

        The job stays in flight until its outcome is recorded (a probe's until its pods have landed)."""
        log = self.log.bind(node=job.node)
        try:
            try:
                outcome, detail = await self._drain(job, reason, log)
            except asyncio.CancelledError:
                # Shutdown while leading: put the node back. Lease lost: another leader owns the cluster now
                # and finds our marker annotation; do nothing more here.
                leading = self.elector.is_leader.is_set()
                log.warning("drain_interrupted", leading=leading)
                if leading and job.cordoned:
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(3):
                            await self._uncordon(job.node)
                    self.events.record(job.node, "SpotdDrainStopped", "spotd controller shutting down; uncordoned")
                raise
            except Exception as exc:
                outcome, detail = "failed", repr(exc)
                LOOP_ERRORS.labels("controller_drain").inc()
            try:
                await self._finish(job, outcome, detail, log)
            except Exception as exc:  # a failed patch after the drain must not stop the leader's other work
                LOOP_ERRORS.labels("controller_drain").inc()
                log.error("drain_finish_failed", outcome=outcome, error=repr(exc))
        finally:
            self.in_flight.pop(job.node, None)

    async def _drain(self, job: DrainJob, reason: str, log: Any) -> tuple[str, str]:
        refused = await self._cordon(job.node)
        if refused is not None:
            return "blocked", refused
        job.cordoned = True
        log.info("drain_starting", reason=reason, probe=job.probe)
        self.events.record(job.node, "SpotdDrainStarted", f"Draining on-demand node back to Spot: {reason}")
        options = DrainOptions(
            policy=PodPolicy(
                voluntary=True,
                evict_unreplicated=self.config.evict_unreplicated,
                evict_local_storage=self.config.evict_local_storage,
            ),
            deadline_action="leave",
        )
        deadline = self.clock() + timedelta(seconds=self.config.drain_timeout)
        result = await drain_node(
            self.client, job.node, options, deadline, log=log, limiter=self.limiter, stop=job.stop
        )
        if result.outcome == "complete":
            return "complete", ""
        if result.outcome == "blocked":
            return "blocked", result.reason or ""
        if job.abort:
            return job.abort, "a new ICE arrived during the drain"
        return "timeout", f"not empty after --drain-timeout: {result.reason or ''}"

    async def _finish(self, job: DrainJob, outcome: str, detail: str, log: Any) -> None:
        """Alert, Event, the node's annotations; the outcome is counted once the node is in its final state."""
        node = self.inventory.nodes.get(job.node)
        if outcome in ("timeout", "blocked", "failed"):
            who = AlertNode(job.node, node.instance_id if node else "", job.pool.zone, job.pool.instance_type)
            self.alerter.fire(on_demand_drain_blocked_alert(who, f"{outcome}: {detail}", str(job.pool)))
            self._blocked_alerts.add(job.node)
        else:
            self.alerter.resolve(ON_DEMAND_DRAIN_BLOCKED, {"node": job.node})
            self._blocked_alerts.discard(job.node)
        try:
            if outcome == "complete":
                log.info("drain_complete", probe=job.probe)
                self.events.record(job.node, "SpotdDrainComplete", "Drained; node left to cluster-autoscaler")
                drained = {DRAINING_ANNOTATION: None, DRAINED_ANNOTATION: micro_time(self.clock())}
                await self._patch_node(job.node, {"metadata": {"annotations": drained}})
                if self.config.terminate_drained:
                    await self._terminate(job, log)
            else:
                log.warning("drain_stopped", outcome=outcome, detail=detail)
                self.events.record(job.node, "SpotdDrainStopped", f"{outcome}: {detail}"[:1000], type="Warning")
                if job.cordoned:
                    await self._uncordon(job.node)
        finally:
            CONTROLLER_DRAINS.labels(outcome).inc()
        if job.probe and outcome not in ("blocked", "failed"):  # those say nothing about capacity
            await self._probe_result(job, outcome == "complete", log)
        self.wake.set()

    async def _terminate(self, job: DrainJob, log: Any) -> None:
        node = self.inventory.nodes.get(job.node)
        iid = node.instance_id if node else ""
        if not iid or self.asgs is None:
            log.warning("terminate_skipped", reason="no instance id or no ASG reader")
            return
        try:
            activity = await self.asgs.terminate_instance(iid, decrement_desired=True)
            log.info("node_terminated", instance_id=iid, activity=activity)
            self.events.record(job.node, "SpotdNodeTerminated", f"Terminated {iid} through its ASG")
        except Exception as exc:
            LOOP_ERRORS.labels("controller_terminate").inc()
            log.warning("terminate_failed", instance_id=iid, error=repr(exc))

    async def _probe_result(self, job: DrainJob, drained: bool, log: Any) -> None:
        """Where did the probed node's pods land? On Spot: the pool is back; else back off."""
        landed_on_spot = False
        if drained and job.owners:
            end = time.monotonic() + self.config.probe_settle
            while True:
                placed = self._replacements(job)
                if placed and (len(placed) >= len(job.pods_before) or time.monotonic() >= end):
                    landed_on_spot = any(ctype == ondemand.SPOT for ctype in placed)
                    break
                if time.monotonic() >= end:
                    break
                await asyncio.sleep(min(5.0, max(0.5, self.config.probe_settle / 20)))
        now = self.clock()
        pools = [p for p in self.book.pools() if p.contains(job.pool)] or [job.pool]
        for pool in pools:
            self.book = self.book.record_probe_result(pool, now, landed_on_spot)
        log.info("probe_result", pool=str(job.pool), landed_on_spot=landed_on_spot)

    def _replacements(self, job: DrainJob) -> list[str]:
        """Capacity types of the nodes where new pods of the drained pods' owners run."""
        types = {n.name: n.capacity_type or "unknown" for n in self.resolved_nodes()}
        out = []
        for key, pod in self.inventory.pods.items():
            if key in job.pods_before or not pod.node or pod.node == job.node:
                continue
            if (pod.namespace, pod.owner_kind, pod.owner_name) in job.owners:
                out.append(types.get(pod.node, "unknown"))
        return out

    async def recover(self) -> None:
        """Nodes a previous leader was draining when it stopped: uncordon them; the policy decides anew."""
        for name, extra in list(self.inventory.node_extra.items()):
            if extra.draining_since and name not in self.in_flight:
                self.log.warning("drain_abandoned", node=name, since=extra.draining_since, dry_run=self.config.dry_run)
                if not self.config.dry_run:
                    await self._uncordon(name)
                    self.events.record(name, "SpotdDrainStopped", "a previous controller's drain was interrupted")

    # --- the loops ------------------------------------------------------------------------------------

    async def decision_loop(self) -> None:
        waiting_since = time.monotonic()
        last_note = waiting_since
        while not self._sources_ready():  # the sources have no common event: look every 0.2 s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), 0.2)
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
        self.ready = True
        self.log.info("sources_ready", nodes=len(self.inventory.nodes), pods=len(self.inventory.pods))
        await self.recover()
        while True:
            self.wake.clear()
            self.last_pass = time.monotonic()
            if self.inventory.synced:
                try:
                    await self.resolve_lifecycles()
                    now = self.clock()
                    self.act(self.decision_pass(now), now)
                except Exception as exc:
                    LOOP_ERRORS.labels("decisions").inc()
                    self.log.exception("decision_pass_failed", error=repr(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.config.interval)
            await asyncio.sleep(min(1.0, self.config.interval))  # a burst of events is one pass

    async def lead(self) -> None:
        """Everything only the leader does; cancelled the moment the lease is lost."""
        self.log.info("leading")
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                if self.sqs is not None:
                    group.create_task(self.sqs.run(self.on_signals, lambda: self.asgs.asgs if self.asgs else {}))
                if self.asgs is not None:
                    group.create_task(self.asgs.run(self.on_signals, self.config.activities_interval))
                group.create_task(self.decision_loop())
        finally:
            self._group = None
            self.ready = False

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


class _Stop(Exception):
    """SIGTERM/SIGINT: leave the TaskGroup."""


async def run(config: ControllerConfig | argparse.Namespace) -> int:
    """Entry point for `spotd controller` (a validated config, or the parsed flags); runs until SIGTERM/SIGINT."""
    if isinstance(config, argparse.Namespace):
        config = config_from_args(config)
    spotd_log.configure(config.log_level)
    from spotd.capacity.aws import AsgSource, InstanceLookup, SqsSource
    from spotd.kube.client import make_client
    from spotd.server import HealthServer

    client = make_client(config.kubeconfig)
    lookup = InstanceLookup()
    sqs = SqsSource(config.sqs_queue_url, lookup=lookup, wait_seconds=config.sqs_wait) if config.sqs_queue_url else None
    asgs = AsgSource(tag_filters=config.asg_tags, history=timedelta(seconds=config.activities_history), lookup=lookup)
    alerter = Alerter(config.alerts, log=_log)
    controller = Controller(config, client, sqs=sqs, asgs=asgs, lookup=lookup, alerter=alerter)
    controller.log.info("controller_starting", **{k: str(v) for k, v in config.summary().items() if k != "alerts"})
    server = HealthServer(config.listen[0], config.listen[1], REGISTRY, controller.alive, controller.readiness)
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
