"""The controller's flags (each with a SPOTD_<FLAG> environment default), ControllerConfig, and their validation."""

from __future__ import annotations

import argparse
import os
import socket
from dataclasses import dataclass, fields
from typing import Any

from spotd.alerts.flags import AlertConfig, add_alert_arguments, alert_config_from_args
from spotd.common.parsing import parse_duration, parse_host_port
from spotd.controller.placeholders import PAUSE_IMAGE, PLACEHOLDER_PRIORITY_CLASS
from spotd.controller.policy import FallbackScope, OnDemandPolicy, parse_label_selector
from spotd.inventory.records import Requirement
from spotd.kube.client import KubeConfigError, load_config
from spotd.kube.lease import LeaseConfig


@dataclass(frozen=True)
class ControllerConfig:
    kubeconfig: str | None = None
    listen: tuple[str, int] = ("0.0.0.0", 9102)
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
    watch_timeout: float = 300.0  # the API server ends each watch after this; silent a tenth longer: dead
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
    fallback_selector: tuple[Requirement, ...] = ()
    fallback_selector_text: str = ""
    fallback_asg_tag: tuple[str, str | None] | None = None
    retry_backoff: float = 1800.0
    retry_backoff_cap: float = 28800.0
    evict_jobs: bool = False
    node_name: str = ""  # the node this replica runs on (NODE_NAME): a drain of it is handed over, not undone
    surge_timeout: float = 900.0  # make-before-break; 0: drain-then-replace with the active probe
    placeholder_priority_class: str = PLACEHOLDER_PRIORITY_CLASS
    placeholder_namespace: str = "spotd"
    placeholder_image: str = PAUSE_IMAGE
    landing_timeout: float = 300.0
    # the second witness (issue 19): how long the node's agent has to record a queue notice before the
    # controller drains the node itself; the deadline given to an ASG termination (which carries none)
    agent_ack_timeout: float = 5.0
    asg_termination_window: float = 120.0
    complete_launch_hooks: bool = False  # CONTINUE an ASG launch lifecycle action once its node is Ready
    dry_run: bool = False
    log_level: str = "info"
    alerts: AlertConfig = AlertConfig()  # noqa: RUF009 - frozen, sharing the default is safe

    @property
    def policy(self) -> OnDemandPolicy:
        return OnDemandPolicy(
            min_on_demand_age=self.min_on_demand_age,
            max_concurrent_drains=self.max_concurrent_drains,
            max_drains_per_hour=self.max_drains_per_hour,
            evict_unreplicated=self.evict_unreplicated,
            evict_local_storage=self.evict_local_storage,
            evict_jobs=self.evict_jobs,
            scope=self.scope,
        )

    @property
    def scope(self) -> FallbackScope:
        tag = ""
        if self.fallback_asg_tag is not None:
            key, value = self.fallback_asg_tag
            tag = key if value is None else f"{key}={value}"
        return FallbackScope(self.fallback_selector, self.fallback_selector_text, tag)

    def summary(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def lease(self) -> LeaseConfig:
        return LeaseConfig(
            self.lease_name,
            self.lease_namespace,
            self.identity,
            self.lease_duration,
            self.lease_renew_deadline,
            self.lease_renew_period,
            self.lease_retry_period,
        )


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
    "--retry-backoff": "30m",
    "--retry-backoff-cap": "8h",
    "--surge-timeout": "15m",
    "--landing-timeout": "5m",
    "--agent-ack-timeout": "5s",
    "--asg-termination-window": "2m",
    "--watch-timeout": "5m",
}
_BOOLS = {
    "--evict-unreplicated": "evict pods that no controller would recreate",
    "--evict-local-storage": "evict pods with emptyDir volumes (their data is lost)",
    "--terminate-drained": "terminate a drained node through its ASG, decrementing desired capacity",
    "--evict-jobs": "evict running Job pods in voluntary drains (default: a running Job holds the drain)",
    "--complete-launch-hooks": "complete ASG launch lifecycle actions from the queue (CONTINUE) once the node is Ready",
    "--dry-run": "log every decision, change nothing",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The controller's flags; each has an environment default SPOTD_<FLAG>, and a flag given wins."""

    def text(flag: str, default: str | None, help: str, **kw: Any) -> None:
        parser.add_argument(flag, default=os.environ.get(_env(flag), default), help=f"{help} (env {_env(flag)})", **kw)

    text("--kubeconfig", None, "kubeconfig file; in-cluster credentials when absent")
    text("--listen", "0.0.0.0:9102", "HOST:PORT of /healthz /readyz /metrics")
    text("--sqs-queue-url", "", "SQS queue with the EventBridge Auto Scaling events; none: activities only")
    text("--lease-name", "spotd-controller", "name of the coordination.k8s.io Lease")
    text("--lease-namespace", os.environ.get("POD_NAMESPACE", "kube-system"), "namespace of the Lease")
    text("--lease-identity", os.environ.get("POD_NAME", ""), "holder identity; default POD_NAME, else host-pid")
    text("--capacity-type-label", None, "node label naming spot/on-demand, read before the usual ones")
    text("--max-concurrent-drains", "1", "on-demand nodes drained at the same time")
    text("--max-drains-per-hour", "6", "drains started in any hour")
    text("--eviction-qps", "5", "evictions per second at most")
    text(
        "--fallback-selector",
        "",
        "node label selector naming the on-demand fallback nodes that may be drained (e.g. node-pool=fallback)",
    )
    text("--node-name", os.environ.get("NODE_NAME", ""), "the node this replica runs on (downward API)")
    text("--fallback-asg-tag", "", "KEY or KEY=VALUE: nodes whose ASG carries this tag are fallback capacity")
    text(
        "--asg-tag",
        "k8s.io/cluster-autoscaler/enabled=true",
        "comma-separated KEY or KEY=VALUE tags selecting the ASGs whose activities are read",
    )
    text("--placeholder-priority-class", PLACEHOLDER_PRIORITY_CLASS, "PriorityClass of the placeholder pods")
    text(
        "--placeholder-namespace",
        os.environ.get("POD_NAMESPACE", "spotd"),
        "namespace of the placeholder pods (default POD_NAMESPACE, else spotd)",
    )
    text("--placeholder-image", PAUSE_IMAGE, "image of the placeholder pods")
    for flag, default in _DURATIONS.items():
        text(flag, default, f"duration (default {default})")
    for flag, help in _BOOLS.items():
        parser.add_argument(flag, action="store_true", default=_env_bool(flag), help=f"{help} (env {_env(flag)})")
    add_alert_arguments(parser)


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
    selector_text = str(getattr(args, "fallback_selector", "") or "").strip()
    try:
        selector = parse_label_selector(selector_text)
    except ValueError as exc:
        raise ValueError(f"--fallback-selector: {exc}") from None
    asg_tag_text = str(getattr(args, "fallback_asg_tag", "") or "").strip()
    fallback_tag = None
    if asg_tag_text:
        tags = _asg_tags(asg_tag_text)
        if len(tags) != 1:
            raise ValueError(f"--fallback-asg-tag: {asg_tag_text!r} is not one KEY or KEY=VALUE")
        fallback_tag = tags[0]
    if durations["--retry-backoff"] <= 0:
        raise ValueError("--retry-backoff: must be above 0")
    if durations["--watch-timeout"] <= 0:
        raise ValueError("--watch-timeout: must be above 0")
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
        watch_timeout=durations["--watch-timeout"],
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
        fallback_selector=selector,
        fallback_selector_text=selector_text,
        fallback_asg_tag=fallback_tag,
        retry_backoff=durations["--retry-backoff"],
        retry_backoff_cap=max(durations["--retry-backoff-cap"], durations["--retry-backoff"]),
        evict_jobs=bool(getattr(args, "evict_jobs", False)),
        node_name=str(getattr(args, "node_name", "") or ""),
        surge_timeout=durations["--surge-timeout"],
        placeholder_priority_class=str(args.placeholder_priority_class or PLACEHOLDER_PRIORITY_CLASS),
        placeholder_namespace=str(args.placeholder_namespace or "spotd"),
        placeholder_image=str(args.placeholder_image or PAUSE_IMAGE),
        landing_timeout=durations["--landing-timeout"],
        agent_ack_timeout=durations["--agent-ack-timeout"],
        asg_termination_window=durations["--asg-termination-window"],
        complete_launch_hooks=bool(getattr(args, "complete_launch_hooks", False)),
        dry_run=bool(args.dry_run),
        log_level=str(getattr(args, "log_level", None) or "info"),
        alerts=alert_config_from_args(args) if hasattr(args, "alertmanager_url") else AlertConfig(),
    )
    _ = config.lease  # validates the lease timings
    try:
        load_config(config.kubeconfig)  # no credentials is a start-up error, not a crash later
    except KubeConfigError as exc:
        raise ValueError(f"--kubeconfig: {exc}") from None
    return config
