"""`spotd agent`: one per node. Polls IMDS for notices, watches its Node, and has the Responder act.

Wiring only: flags and config, the loops as tasks in one TaskGroup, the health server. SIGTERM cancels
the group; a drain in flight stops and the node annotation records where it was.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx
from lightkube import AsyncClient, operators
from lightkube.core.exceptions import ApiError
from lightkube.resources.core_v1 import ConfigMap, Node

from spotd.agent.node_client import NodeClient
from spotd.agent.node_patch import NodeView
from spotd.agent.policy import TAINT_EFFECTS, NoticePolicy, default_policies, parse_steps
from spotd.agent.responder import Responder, Sighting
from spotd.alerts.flags import AlertConfig, add_alert_arguments, alert_config_from_args
from spotd.alerts.model import AlertNode
from spotd.alerts.sender import Alerter
from spotd.cli.flags import duration, host_port, positive_duration
from spotd.common import log as spotd_log
from spotd.common.health import HealthServer, Heartbeat
from spotd.common.metrics import LOOP_ERRORS, REGISTRY
from spotd.drain.executor import DrainOptions
from spotd.drain.plan import PodPolicy
from spotd.kube.client import WATCH_TIMEOUT, KubeConfigError, load_config, make_client
from spotd.kube.events import EventRecorder
from spotd.kube.keys import REHEARSAL_LABEL, SIMULATION_ANNOTATION
from spotd.kube.ratelimit import RateLimiter
from spotd.kube.watch import RESYNC, resilient_watch
from spotd.notices.imds import URGENT_PATHS, ImdsClient, NoticePoller, PollResult
from spotd.notices.metrics import NOTICES_MALFORMED
from spotd.notices.record import (
    Notice,
    NoticeKind,
    RehearsalRequestRefused,
    parse_rehearsal_request,
    rehearsal_nodes,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--node-name", required=True, help="this node's name (downward API spec.nodeName)")
    p.add_argument("--kubeconfig", help="kubeconfig file; in-cluster credentials when absent")
    p.add_argument("--imds-endpoint", default="http://169.254.169.254", help="instance metadata service URL")
    p.add_argument("--imds-v1-fallback", action="store_true", help="use IMDSv1 if the token request is refused")
    p.add_argument("--imds-token-ttl", type=positive_duration, default=21600.0, help="IMDSv2 token TTL (6h)")
    p.add_argument(
        "--poll-interval",
        type=positive_duration,
        default=0.25,
        help="how often the Spot interruption notice (spot/instance-action) is read (250ms)",
    )
    p.add_argument(
        "--slow-poll-interval",
        type=positive_duration,
        default=5.0,
        help="how often rebalance, scheduled maintenance and ASG lifecycle are read (5s)",
    )
    p.add_argument("--listen", type=host_port, default=("0.0.0.0", 9101), help="HOST:PORT of /healthz /readyz /metrics")
    p.add_argument("--dry-run", action="store_true", help="log every action, change nothing")
    p.add_argument(
        "--deadline-action",
        choices=("delete", "leave"),
        default="leave",
        help="pods still refused at deadline minus safety margin: leave them (default) or delete them "
        "(needs the optional pods/delete ClusterRole, deploy/optional/agent-deadline-delete.yaml)",
    )
    p.add_argument(
        "--namespace",
        default=os.environ.get("POD_NAMESPACE") or "spotd",
        help="spotd's own namespace, where rehearsal requests are read (POD_NAMESPACE, else spotd)",
    )
    p.add_argument(
        "--safety-margin",
        type=duration,
        default=10.0,
        help="stop retrying refused evictions this long before the deadline (10s)",
    )
    p.add_argument(
        "--maintenance-lead-time",
        type=duration,
        default=900.0,
        help="cordon and drain this long before a scheduled maintenance's NotBefore (15m)",
    )
    p.add_argument(
        "--asg-termination-window",
        type=positive_duration,
        default=120.0,
        help="deadline given to an ASG termination, which carries no time (2m)",
    )
    for kind, default in (
        ("spot-itn", "taint,cordon,exclude-lb,drain"),
        ("asg-termination", "taint,cordon,exclude-lb,drain"),
        ("rebalance", "taint"),
        ("scheduled-maintenance", "cordon,drain"),
    ):
        p.add_argument(
            f"--on-{kind}",
            default=default,
            metavar="STEPS",
            help=f"steps for a {kind} notice, from taint,cordon,exclude-lb,drain or none ({default})",
        )
    p.add_argument("--interruption-taint-effect", choices=TAINT_EFFECTS, default="NoSchedule")
    p.add_argument("--rebalance-taint-effect", choices=TAINT_EFFECTS, default="PreferNoSchedule")
    p.add_argument("--api-qps", type=float, default=50.0, help="client-side API request rate (50/s)")
    p.add_argument("--api-burst", type=int, default=100, help="client-side API burst (100)")
    p.add_argument(
        "--watch-timeout",
        type=positive_duration,
        default=WATCH_TIMEOUT,
        help="the API server ends each watch after this long, and a watch silent for a tenth longer is taken "
        "as dead and started again (5m)",
    )
    add_alert_arguments(p)


@dataclass(frozen=True)
class AgentConfig:
    node_name: str
    kubeconfig: str | None
    imds_endpoint: str
    imds_v1_fallback: bool
    imds_token_ttl: int
    poll_interval: float
    slow_poll_interval: float
    listen: tuple[str, int]
    dry_run: bool
    policies: dict[NoticeKind, NoticePolicy]
    drain: DrainOptions
    asg_termination_window: timedelta
    api_qps: float
    api_burst: int
    alerts: AlertConfig
    log_level: str
    namespace: str = "spotd"
    watch_timeout: float = WATCH_TIMEOUT


def config_from_args(args: argparse.Namespace) -> AgentConfig:
    """Validate once at start; a ValueError names the flag."""
    if not args.node_name.strip():
        raise ValueError("--node-name: empty")
    if not 1 <= args.imds_token_ttl <= 21600:
        raise ValueError(f"--imds-token-ttl: {args.imds_token_ttl:g}s is outside IMDS's 1s to 6h")
    if not args.imds_endpoint.startswith(("http://", "https://")):
        raise ValueError(f"--imds-endpoint: {args.imds_endpoint!r} is not an http(s) URL")
    policies = default_policies(timedelta(seconds=args.maintenance_lead_time))
    for kind in NoticeKind:
        flag = f"--on-{kind}"
        try:
            steps = parse_steps(getattr(args, f"on_{kind.value.replace('-', '_')}"))
        except ValueError as exc:
            raise ValueError(f"{flag}: {exc}") from None
        effect = args.rebalance_taint_effect if kind == NoticeKind.REBALANCE else args.interruption_taint_effect
        policies[kind] = NoticePolicy(steps, effect, policies[kind].lead_time)
    try:
        load_config(args.kubeconfig)  # no credentials is a start-up error, not a crash in the loop
    except KubeConfigError as exc:
        raise ValueError(f"--kubeconfig: {exc}") from None
    if args.api_qps <= 0 or args.api_burst < 1:
        raise ValueError("--api-qps/--api-burst: must be positive")
    return AgentConfig(
        node_name=args.node_name.strip(),
        kubeconfig=args.kubeconfig,
        imds_endpoint=args.imds_endpoint.rstrip("/"),
        imds_v1_fallback=args.imds_v1_fallback,
        imds_token_ttl=int(args.imds_token_ttl),
        poll_interval=args.poll_interval,
        slow_poll_interval=max(args.poll_interval, args.slow_poll_interval),
        listen=args.listen,
        dry_run=args.dry_run,
        policies=policies,
        drain=DrainOptions(PodPolicy(), args.deadline_action, args.safety_margin, args.dry_run),
        asg_termination_window=timedelta(seconds=args.asg_termination_window),
        api_qps=args.api_qps,
        api_burst=args.api_burst,
        alerts=alert_config_from_args(args),
        log_level=args.log_level,
        namespace=args.namespace.strip() or "spotd",
        watch_timeout=args.watch_timeout,
    )


def newer(a: NodeView, b: NodeView) -> bool:
    """Whether a is a later version of the node than b (a watch may trail the view our own patch returned)."""
    if a.resource_version.isdigit() and b.resource_version.isdigit():
        return int(a.resource_version) > int(b.resource_version)
    return a.resource_version != b.resource_version


class Agent:
    def __init__(self, config: AgentConfig, client: AsyncClient, alerter: Alerter) -> None:
        self.config = config
        self.client = client
        self.log = spotd_log.get("spotd.agent").bind(node=config.node_name)
        self.limiter = RateLimiter(config.api_qps, config.api_burst)
        self.imds = imds = ImdsClient(
            config.imds_endpoint,
            token_ttl=config.imds_token_ttl,
            v1_fallback=config.imds_v1_fallback,
            timeout=min(1.0, max(0.5, config.poll_interval)),
        )
        self.poller = NoticePoller(imds, asg_termination_window=config.asg_termination_window, log=self.log)
        self.nodes = NodeClient(client, config.node_name, self.limiter, self.log, config.dry_run)
        self.events = EventRecorder(client, "spotd-agent", config.node_name, self.log, config.dry_run)
        self.responder = Responder(
            self.nodes, self.events, alerter, config.policies, config.drain, self.limiter, self.log
        )
        self.heartbeat = Heartbeat(time.monotonic)
        self.imds_result = PollResult((), False)
        self.polled = False
        self.reconciled: PollResult | None = None  # the poll result last reconciled, successfully
        self.simulated: Notice | None = None
        self.requests: dict[str, tuple[str, Notice | None]] = {}  # ConfigMap name -> (resourceVersion, notice)
        self.annotation_warned: str | None = None
        self.node_ready = False

    def sighting(self) -> Sighting:
        notices = list(self.imds_result.notices)
        # Before the first poll nothing is known to be gone.
        complete = {k for k in NoticeKind if self.imds_result.covers(k)} if self.polled else set()
        if self.simulated is not None:
            notices.append(self.simulated)
        return Sighting(tuple(notices), frozenset(complete))

    def warn_annotation(self, view: NodeView) -> None:
        """The old `spotd.io/simulate-reclaim` annotation triggers nothing: anyone who may patch a Node could
        write one. Say so once per value."""
        text = view.annotations.get(SIMULATION_ANNOTATION)
        if not text or text == self.annotation_warned:
            return
        self.annotation_warned = text
        self.log.warning("simulation_annotation_ignored", annotation=SIMULATION_ANNOTATION)
        self.events.record(
            self.config.node_name,
            "SimulationAnnotationIgnored",
            f"{SIMULATION_ANNOTATION} triggers nothing; rehearsals are ConfigMaps labelled {REHEARSAL_LABEL} "
            f"in namespace {self.config.namespace} (spotd simulate-reclaim writes them)",
            "Warning",
        )

    def read_request(self, event: str, cm: ConfigMap) -> bool:
        """Take in one rehearsal request (a ConfigMap event); True when the notice for this node changed."""
        meta = cm.metadata
        if meta is None or not meta.name:
            return False
        name, version = meta.name, meta.resourceVersion or ""
        if event == "DELETED":
            return self.requests.pop(name, None) is not None
        known = self.requests.get(name)
        if known is not None and known[0] == version:
            return False
        data = dict(cm.data or {})
        try:
            if self.config.node_name not in rehearsal_nodes(data):
                return self.requests.pop(name, None) is not None
            notice: Notice | None = parse_rehearsal_request(data, meta.uid or name, datetime.now(UTC))
        except RehearsalRequestRefused as exc:
            notice = None
            NOTICES_MALFORMED.labels("rehearsal").inc()
            self.log.warning("rehearsal_refused", request=f"{self.config.namespace}/{name}", reason=str(exc))
            self.events.record(
                self.config.node_name,
                "RehearsalRefused",
                f"rehearsal request {self.config.namespace}/{name} refused: {exc}",
                "Warning",
            )
        self.requests[name] = (version, notice)
        return True

    def choose_rehearsal(self) -> None:
        accepted = [n for _, (_, n) in sorted(self.requests.items()) if n is not None]
        self.simulated = accepted[0] if accepted else None

    async def start(self) -> None:
        """Read the node once (retrying until the API server answers) and resume any notice in flight."""
        attempt = 0
        while True:
            try:
                view = await self.nodes.get()
                break
            except Exception as exc:  # keep trying; /readyz says not ready meanwhile
                attempt += 1
                self.log.warning("node_read_failed", error=repr(exc), attempt=attempt)
                await asyncio.sleep(min(5.0, 0.2 * 2**attempt))
        self.node_ready = True
        self.warn_annotation(view)
        self.responder.resume_from(view)

    async def learn_instance(self) -> None:
        """Alert labels from IMDS where the Node lacks them; in the background, never fatal."""
        info = await self.imds.instance_info()
        self.responder.instance = AlertNode(self.config.node_name, info.instance_id, info.zone, info.instance_type)

    def quiet(self) -> bool:
        """Nothing to reconcile: no notice now nor in hand, and the same poll result as last reconciled.

        While a notice is present every poll reconciles, as before: its time to act may come, a drain may
        need restarting, someone may have undone a step.
        """
        return (
            self.imds_result is self.reconciled
            and not self.imds_result.notices
            and self.simulated is None
            and self.responder.acting is None
        )

    async def poll_loop(self) -> None:
        """The Spot interruption path every poll interval; every notice path every slow interval."""
        interval, slow = self.config.poll_interval, self.config.slow_poll_interval
        next_full = 0.0
        while True:
            started = time.monotonic()
            paths = None if started >= next_full else URGENT_PATHS
            if paths is None:
                next_full = started + slow
            try:
                self.imds_result = await self.poller.poll_once(datetime.now(UTC), paths)
                self.polled = True
                if not self.quiet():
                    await self.responder.reconcile(self.sighting())
                    self.reconciled = self.imds_result
            except (ApiError, OSError, httpx.HTTPError) as exc:
                LOOP_ERRORS.labels("poll").inc()
                self.log.warning("reconcile_failed", error=repr(exc))
            except Exception as exc:  # the loop never dies; the next cycle tries again
                LOOP_ERRORS.labels("poll").inc()
                self.log.exception("poll_loop_error", error=repr(exc))
            self.heartbeat.beat("poll", 30 + 10 * interval)
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    async def rehearsal_loop(self) -> None:
        """One namespaced watch, by label, of the rehearsal requests (ConfigMaps only operators may write)."""
        watch = resilient_watch(
            self.client,
            ConfigMap,
            log=self.log,
            what="rehearsals",
            namespace=self.config.namespace,
            labels={REHEARSAL_LABEL: operators.exists()},
        )
        async for event, cm in watch:
            if event == RESYNC:  # requests deleted while the watch was down: list and drop them
                changed = await self.relist_requests()
            else:
                try:
                    changed = self.read_request(event, cm)
                except Exception as exc:  # a request nobody foresaw must not end the watch (nor the agent)
                    NOTICES_MALFORMED.labels("rehearsal").inc()
                    self.log.warning("rehearsal_request_unreadable", error=repr(exc))
                    changed = False
            if changed:
                self.choose_rehearsal()
            if changed and self.polled:  # before the first poll nothing is known of IMDS: it reconciles then
                try:
                    await self.responder.reconcile(self.sighting())
                except Exception as exc:  # the watch never dies of it; the next poll cycle tries again
                    LOOP_ERRORS.labels("rehearsal").inc()
                    self.log.warning("reconcile_failed", error=repr(exc))

    async def relist_requests(self) -> bool:
        try:
            listing = self.client.list(
                ConfigMap, namespace=self.config.namespace, labels={REHEARSAL_LABEL: operators.exists()}
            )
            present = {cm.metadata.name async for cm in listing if cm.metadata and cm.metadata.name}
        except Exception as exc:  # the next reconnect tries again
            self.log.warning("rehearsal_list_failed", error=repr(exc))
            return False
        gone = set(self.requests) - present
        for name in gone:
            del self.requests[name]
        return bool(gone)

    async def node_loop(self) -> None:
        """Watch our own Node: the view the responder patches from (and the old annotation, to warn)."""
        watch = resilient_watch(
            self.client, Node, log=self.log, what="node", fields={"metadata.name": self.config.node_name}
        )
        async for event, node in watch:
            if event == RESYNC:  # the new watch starts with the node as it is now (ADDED)
                self.node_ready = False
                continue
            self.node_ready = True
            if event == "DELETED":
                continue
            view = NodeView.from_node(node)
            if self.responder.view is None or newer(view, self.responder.view):
                self.responder.view = view
            self.warn_annotation(view)


async def serve(config: AgentConfig, *, health_server: bool = True) -> None:
    """Run one agent until cancelled. `spotd agent` and the embedded simulation (many agents, one process) use it."""
    log = spotd_log.get("spotd.agent").bind(node=config.node_name)
    client = make_client(config.kubeconfig, lean=True, watch_timeout=config.watch_timeout)
    alerter = Alerter(config.alerts, log=log)
    agent = Agent(config, client, alerter)
    server = HealthServer(*config.listen, REGISTRY, agent.heartbeat.alive, lambda: agent.node_ready)
    if health_server:
        await server.start()
    log.info(
        "agent_started",
        listen=f"{config.listen[0]}:{server.port}" if health_server else None,
        imds=config.imds_endpoint,
        poll_interval=config.poll_interval,
        slow_poll_interval=config.slow_poll_interval,
        dry_run=config.dry_run,
    )
    try:
        await agent.start()
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(agent.learn_instance())
            tasks.create_task(agent.poll_loop())
            tasks.create_task(agent.node_loop())
            tasks.create_task(agent.rehearsal_loop())
            tasks.create_task(alerter.run())
    finally:
        log.info("agent_stopping")
        await agent.responder.close()
        await agent.events.flush()
        await agent.imds.aclose()
        await server.stop()
        await client.close()


async def run(config: AgentConfig) -> int:
    spotd_log.configure(config.log_level)
    current = asyncio.current_task()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: current.cancel() if current else None)
    try:
        await serve(config)
    except asyncio.CancelledError:
        pass
    spotd_log.get("spotd.agent").info("agent_stopped", node=config.node_name)
    return 0
