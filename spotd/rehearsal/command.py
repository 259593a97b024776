"""`spotd simulate-reclaim`: rehearse a mass Spot reclaim on a cluster, or on an embedded simulated one.

Wiring only: flags and config here, the rehearsal in spotd.rehearsal, the verdicts in spotd.report, the
embedded cluster in spotd.sim.cluster. With --kubeconfig it acts on that cluster; without (or with
--embedded) it starts the embedded cluster in-process, runs the real agent for each node and rehearses on it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import tempfile
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import httpx
from lightkube.core.exceptions import ApiError

from spotd.cli.flags import duration, positive_duration
from spotd.kube.client import KubeConfigError
from spotd.notices.record import NoticeKind
from spotd.rehearsal.cycle_report import FallbackReport
from spotd.rehearsal.cycle_report import to_json as fallback_json
from spotd.rehearsal.cycle_report import to_text as fallback_text
from spotd.rehearsal.fallback import FallbackConfig
from spotd.rehearsal.fallback import add_arguments as add_fallback_arguments
from spotd.rehearsal.report import Report, to_json, to_text
from spotd.rehearsal.runner import Rehearsal, RehearsalConfig
from spotd.rehearsal.targets import RehearsalRefused, Target
from spotd.sim.cluster import ClusterSpec, spec_from_args
from spotd.sim.cluster import add_arguments as add_cluster_arguments
from spotd.sim.controlplane import ControlPlaneUnavailable, find_controlplane

EMBEDDED_DEFAULT_COUNT = 12
FALLBACK_DEFAULT_COUNT = 6


def count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--node", action="append", default=[], metavar="NAME", help="a node to reclaim (repeatable)")
    p.add_argument("--selector", metavar="LABELS", help="choose among nodes with these labels (a=b,c!=d,e)")
    p.add_argument("--count", type=count, help=f"how many nodes to reclaim at once ({EMBEDDED_DEFAULT_COUNT} embedded)")
    p.add_argument(
        "--kind", choices=[str(k) for k in NoticeKind], default=str(NoticeKind.SPOT_ITN), help="the notice (spot-itn)"
    )
    p.add_argument("--notice", type=positive_duration, default=120.0, help="time from notice to deadline (120s)")
    p.add_argument(
        "--recovery-timeout",
        type=duration,
        default=60.0,
        help="how long after the last node drained workloads have to be whole again (60s)",
    )
    p.add_argument("--kubeconfig", help="the cluster to rehearse on; without it, the embedded simulated cluster")
    p.add_argument("--embedded", action="store_true", help="use the embedded cluster even with --kubeconfig")
    p.add_argument(
        "--control-plane",
        nargs="?",
        const="",
        metavar="DIR",
        help="embedded: on a real control plane (kube-apiserver, etcd, controller-manager, scheduler, kwok) "
        "from DIR's binaries, else $SPOTD_CONTROLPLANE's, else scripts/controlplane's (a build when not cached); "
        "without the flag, the fake API server",
    )
    p.add_argument("--output", choices=("text", "json"), default="text", help="report as tables or one JSON object")
    p.add_argument("--any-capacity-type", action="store_true", help="allow nodes that are not Spot")
    p.add_argument("--terminate", action="store_true", help="terminate the instances at the deadline (needs --yes)")
    p.add_argument("--yes", action="store_true", help="confirm --terminate")
    p.add_argument(
        "--via",
        choices=("request", "annotation", "fis", "imds"),
        default="request",
        help="request: a rehearsal request (a ConfigMap in spotd's namespace) the agents read, removed at the "
        "end ('annotation' is its former name); fis: an AWS FIS Spot interruption "
        "experiment; imds (embedded): the notice is set in each node's fake IMDS",
    )
    p.add_argument("--fis-role-arn", help="IAM role FIS assumes (--via fis)")
    p.add_argument(
        "--via-queue",
        metavar="QUEUE_URL",
        help="instead of --via: send EventBridge-shaped Spot interruption warnings, marked as a rehearsal, to "
        "the controller's SQS queue; the agents hear nothing, the controller drains the nodes as for silent "
        "agents and releases them at the deadline (the agent-down path; needs sqs:SendMessage on the queue)",
    )
    p.add_argument(
        "--namespace",
        default=os.environ.get("POD_NAMESPACE") or "spotd",
        help="spotd's namespace, where the agents read rehearsal requests (POD_NAMESPACE, else spotd)",
    )
    add_cluster_arguments(p)
    p.add_argument("--agent-log", help="embedded: file for the agents' logs (a temporary file)")
    add_fallback_arguments(p)


@dataclass(frozen=True)
class SimulateConfig:
    rehearsal: RehearsalConfig
    embedded: bool
    cluster: ClusterSpec
    output: str
    agent_poll_interval: float
    agent_log: str | None
    log_level: str
    fallback: FallbackConfig | None = None
    control_plane: str | None = None  # embedded on a real control plane: its binaries' directory, "" to find it


def config_from_args(args: argparse.Namespace) -> SimulateConfig:
    """Validate once at start; a ValueError names the flag."""
    embedded = args.embedded or not args.kubeconfig
    if args.scenario == "fallback":
        return fallback_config_from_args(args, embedded)
    if args.control_plane is not None and not embedded:
        raise ValueError("--control-plane: only with the embedded cluster (no --kubeconfig, or --embedded)")
    names = tuple(n.strip() for n in args.node if n.strip())
    if names and (args.count or args.selector):
        raise ValueError("--node: give either --node NAME ... or --selector/--count, not both")
    number = args.count
    if not names and number is None:
        if not embedded:
            raise ValueError("--count: give --node NAME ... or --count N (with --selector LABELS)")
        number = EMBEDDED_DEFAULT_COUNT
    if args.selector:
        from spotd.rehearsal.targets import parse_selector

        try:
            parse_selector(args.selector)
        except ValueError as exc:
            raise ValueError(f"--selector: {exc}") from None
    if args.terminate and not args.yes:
        raise ValueError("--terminate: this terminates real instances at the deadline; add --yes to confirm")
    if args.via == "imds":
        if not embedded:
            raise ValueError("--via imds: only in embedded mode (on a cluster, --via fis)")
        if args.kind not in (NoticeKind.SPOT_ITN, NoticeKind.REBALANCE):
            raise ValueError("--via imds: only --kind spot-itn or rebalance")
    via = "request" if args.via == "annotation" else args.via
    queue_url = str(getattr(args, "via_queue", None) or "").strip()
    if queue_url:
        if args.via not in ("request", "annotation"):
            raise ValueError(f"--via-queue: not with --via {args.via} (it is the way the notice goes)")
        if embedded:
            raise ValueError("--via-queue: needs a cluster (--kubeconfig) whose spotd controller reads the queue")
        if args.kind != NoticeKind.SPOT_ITN:
            raise ValueError("--via-queue: only --kind spot-itn (an EC2 Spot Instance Interruption Warning)")
        if args.terminate:  # the controller gives the nodes back at the deadline: nothing is to end there
            raise ValueError("--via-queue: not with --terminate (the controller releases the nodes at the deadline)")
        via = "queue"
    if via in ("request", "queue") and args.notice > 900:
        raise ValueError("--notice: the agents refuse a rehearsal whose deadline is more than 15 minutes ahead")
    if args.via == "fis":
        if embedded:
            raise ValueError("--via fis: needs a real cluster (--kubeconfig)")
        if not args.fis_role_arn:
            raise ValueError("--via fis: --fis-role-arn is required")
        if args.kind != NoticeKind.SPOT_ITN:
            raise ValueError("--via fis: only --kind spot-itn")
        if not 120 <= args.notice <= 900:
            raise ValueError("--notice: FIS takes 2 to 15 minutes before the interruption")
    rehearsal = RehearsalConfig(
        kubeconfig=None if embedded else args.kubeconfig,
        nodes=names,
        selector=args.selector,
        count=number,
        kind=NoticeKind(args.kind),
        notice=args.notice,
        recovery_timeout=args.recovery_timeout,
        any_capacity_type=args.any_capacity_type,
        terminate=args.terminate,
        via=via,
        fis_role_arn=args.fis_role_arn,
        queue_url=queue_url,
        seed=args.seed if args.seed is not None else (1 if embedded else None),
        namespace=args.namespace.strip() or "spotd",
    )
    return SimulateConfig(
        rehearsal=rehearsal,
        embedded=embedded,
        cluster=spec_from_args(args),
        output=args.output,
        agent_poll_interval=args.agent_poll_interval,
        agent_log=args.agent_log,
        log_level=args.log_level,
        control_plane=args.control_plane,
    )


def fallback_config_from_args(args: argparse.Namespace, embedded: bool) -> SimulateConfig:
    """--scenario fallback: embedded only, a spot-itn notice through the annotation, N random Spot nodes."""
    if not embedded:
        raise ValueError("--scenario fallback: only on the embedded cluster (no --kubeconfig, or --embedded)")
    refused = {
        "--node": bool(args.node),
        "--selector": bool(args.selector),
        "--terminate": args.terminate,
        "--via": args.via not in ("request", "annotation"),
        "--via-queue": bool(getattr(args, "via_queue", None)),
        "--kind": args.kind != NoticeKind.SPOT_ITN,
        "--any-capacity-type": args.any_capacity_type,
        "--control-plane": args.control_plane is not None,
    }
    for flag, given in refused.items():
        if given:
            raise ValueError(f"{flag}: not with --scenario fallback (it reclaims --count random Spot nodes)")
    cluster = spec_from_args(args)
    fallback = FallbackConfig(
        count=args.count or FALLBACK_DEFAULT_COUNT,
        scale=cluster.time_scale,
        notice=args.notice,
        spot_short_for=args.spot_short_for,
        observe_for=args.observe_for,
        controller_args=tuple(args.controller_arg),
        seed=cluster.seed,
    )
    if fallback.count > cluster.spot_nodes:
        raise ValueError(f"--count: {fallback.count} is more than the {cluster.spot_nodes} Spot nodes (--nodes)")
    return SimulateConfig(
        rehearsal=RehearsalConfig(kubeconfig=None, count=fallback.count, notice=args.notice),
        embedded=True,
        cluster=cluster,
        output=args.output,
        agent_poll_interval=args.agent_poll_interval,
        agent_log=args.agent_log,
        log_level=args.log_level,
        fallback=fallback,
    )


def print_report(report: Report | FallbackReport, output: str) -> None:
    if isinstance(report, FallbackReport):
        print(fallback_json(report) if output == "json" else fallback_text(report), flush=True)
        return
    print(to_json(report) if output == "json" else to_text(report), flush=True)


async def run(config: SimulateConfig) -> int:
    """Exit status: 0 every node drained in time and every workload recovered, 1 not, 2 refused to start."""
    current = asyncio.current_task()
    loop = asyncio.get_running_loop()
    terminated = asyncio.Event()

    def on_sigterm() -> None:
        terminated.set()
        if current is not None:
            current.cancel()

    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    report: Report | FallbackReport
    try:
        if config.fallback is not None:
            report = await run_fallback_embedded(config, config.fallback)
        elif config.embedded and config.control_plane is not None:
            report = await run_embedded_on_control_plane(config)
        elif config.embedded:
            report = await run_embedded(config)
        else:
            report = await Rehearsal(config.rehearsal).run()
    except RehearsalRefused as exc:
        print(f"spotd simulate-reclaim: {exc}", file=sys.stderr)
        return 2
    except ControlPlaneUnavailable as exc:
        print(f"spotd simulate-reclaim: --control-plane: {exc}", file=sys.stderr)
        return 2
    except KubeConfigError as exc:
        print(f"spotd simulate-reclaim: {exc}", file=sys.stderr)
        return 2
    except ApiError as exc:
        print(f"spotd simulate-reclaim: the API server refused: {exc.status.message}", file=sys.stderr)
        return 2
    except (httpx.HTTPError, OSError) as exc:
        print(f"spotd simulate-reclaim: cannot reach the API server: {exc!r}", file=sys.stderr)
        return 2
    except asyncio.CancelledError:
        done = "embedded cluster and controller stopped" if config.fallback else "rehearsal request removed"
        print(f"spotd simulate-reclaim: interrupted; {done}", file=sys.stderr)
        if terminated.is_set():
            return 143
        raise  # Ctrl-C: asyncio.run turns it into KeyboardInterrupt, the CLI exits 130
    print_report(report, config.output)
    return 0 if report.ok else 1


# ---- embedded mode ---------------------------------------------------------------------------------------


def agent_config_factory(kubeconfig: str, poll_interval: float, log_level: str, extra: tuple[str, ...] = ()) -> Any:
    """A function (node, imds_url) -> AgentConfig, parsed through the agent's own flags and defaults."""
    from spotd.agent import main as agent

    parser = argparse.ArgumentParser()
    agent.add_arguments(parser)
    parser.add_argument("--log-level", default=log_level)
    base = agent.config_from_args(
        parser.parse_args(
            ["--node-name", "x", "--kubeconfig", kubeconfig, "--poll-interval", f"{poll_interval}s", *extra]
        )
    )

    def make(node: str, imds_url: str) -> Any:
        return replace(base, node_name=node, imds_endpoint=imds_url)

    return make


async def run_embedded(config: SimulateConfig) -> Report:
    from spotd.common import log as spotd_log
    from spotd.sim.cluster import EmbeddedCluster, notify_imds
    from spotd.sim.kubeapi.server import FakeApiServer

    workdir = Path(tempfile.mkdtemp(prefix="spotd-simulate-"))
    log_path = Path(config.agent_log) if config.agent_log else workdir / "agents.log"
    log_file = log_path.open("a")
    spotd_log.configure(config.log_level, stream=log_file)
    api = FakeApiServer(host="127.0.0.1", port=0, termination_scale=config.cluster.time_scale)
    await api.start()
    tasks: list[asyncio.Task[None]] = []
    cluster = EmbeddedCluster(api, config.cluster)
    try:
        kubeconfig = str(api.write_kubeconfig(workdir / "kubeconfig"))
        cluster.populate()
        await cluster.start_imds()
        spec = config.cluster
        print(
            f"embedded cluster: {spec.spot_nodes} Spot + {spec.on_demand_nodes} on-demand nodes, "
            f"{api.store.count('Pod')} pods at {api.url}; agent logs: {log_path}",
            file=sys.stderr,
            flush=True,
        )
        make = agent_config_factory(kubeconfig, config.agent_poll_interval, config.log_level)
        tasks.append(asyncio.get_running_loop().create_task(cluster.run_controllers()))
        tasks.append(asyncio.get_running_loop().create_task(cluster.run_agents(make)))

        async def terminate(targets: list[Target] | Any) -> None:
            for t in targets:
                cluster.remove_node(t.name)

        rehearsal = Rehearsal(
            replace(config.rehearsal, kubeconfig=kubeconfig),
            terminator=terminate,
            notifier=partial(notify_imds, cluster.imds),
        )
        return await rehearsal.run()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await cluster.stop_imds()
        await api.stop()
        spotd_log.configure(config.log_level)  # back to stderr before the file goes
        log_file.close()


async def run_embedded_on_control_plane(config: SimulateConfig) -> Report:
    """run_embedded's rehearsal on a real control plane (spotd.rehearsal.on_control_plane)."""
    from spotd.common import log as spotd_log
    from spotd.rehearsal.on_control_plane import run_on_control_plane

    assert config.control_plane is not None
    # nothing started or written before the binaries are known: without them, one line and exit 2
    bin_dir = await asyncio.to_thread(find_controlplane, config.control_plane or None)
    workdir = Path(tempfile.mkdtemp(prefix="spotd-simulate-real-"))
    log_path = Path(config.agent_log) if config.agent_log else workdir / "agents.log"
    print(f"embedded cluster on a real control plane; agent logs: {log_path}", file=sys.stderr, flush=True)
    log_file = log_path.open("a")
    spotd_log.configure(config.log_level, stream=log_file)

    def agent_config(node: str, imds_url: str, kubeconfig: str) -> Any:
        # each agent its own kubeconfig: a token bound to spotd's DaemonSet pod on its node
        return agent_config_factory(kubeconfig, config.agent_poll_interval, config.log_level)(node, imds_url)

    try:
        return await run_on_control_plane(config.rehearsal, config.cluster, bin_dir, agent_config, workdir)
    finally:
        spotd_log.configure(config.log_level)
        log_file.close()


async def run_fallback_embedded(config: SimulateConfig, fallback: FallbackConfig) -> FallbackReport:
    """The fallback scenario (spotd.rehearsal.fallback), its logs in a temporary directory."""
    from spotd.common import log as spotd_log
    from spotd.rehearsal.fallback import run_fallback

    workdir = Path(tempfile.mkdtemp(prefix="spotd-fallback-"))
    log_path = Path(config.agent_log) if config.agent_log else workdir / "agents.log"
    log_file = log_path.open("a")
    spotd_log.configure(config.log_level, stream=log_file)
    print(f"fallback rehearsal: agent logs: {log_path}", file=sys.stderr, flush=True)
    # the agents' safety margin (10 s before the deadline) scales with the notice
    margin = ("--safety-margin", f"{10 * fallback.scale:.3f}s")

    def factory(kubeconfig: str) -> Any:
        return agent_config_factory(kubeconfig, config.agent_poll_interval, config.log_level, margin)

    try:
        return await run_fallback(fallback, config.cluster, workdir, factory, config.log_level)
    finally:
        spotd_log.configure(config.log_level)
        log_file.close()
