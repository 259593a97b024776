"""Agent speed and footprint, printed as figures (run on demand, never asserted in tests).

    .venv/bin/python bench/bench_agent.py [--samples 50] [--pods 110] [--idle 60] [--runs 3]

Every part runs the agent at its defaults (--poll-interval 250ms, --slow-poll-interval 5s) unless
--poll-interval is given.

1. notice seen -> node tainted and cordoned: p50/p99 over --samples IMDS Spot interruption notices
   (goal: p99 at most 350 ms);
2. drain of a node with --pods pods (5 DaemonSet, the rest evictable, instant termination) by the agent,
   side by side with `kubectl drain` on the same fake API server in the same run (goal: 10x faster);
3. footprint, installed and run as the image and the DaemonSet do (spotd without test tools, in
   .bench/venv; PYTHONOPTIMIZE=2): idle CPU as CPU time consumed (each thread's run time from the
   scheduler, /proc/<pid>/task/*/schedstat) over --idle seconds by --runs agents side by side, each on its
   own node and fake IMDS, median of the runs (CPU time rather than wall-clock share, so other load on the
   machine inflates it little); resident
   memory idle; and the peak (VmHWM) of an agent that drains a node of --pods pods
   (goals: 0.3 % of one core, 36 MB idle, 48 MB peak).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from spotd.sim.imds import FakeImds
from spotd.sim.kubeapi.server import FakeApiServer
from tests.agent_harness import AgentProcess, eventually, free_port, node_obj, pod_obj

NODE = "bench-node"


def populate(api: FakeApiServer, node: str, pods: int) -> None:
    if api.get("DaemonSet", "daemonset-1", "default") is None:  # kubectl drain looks the owner up
        api.create(
            {
                "apiVersion": "apps/v1",
                "kind": "DaemonSet",
                "metadata": {"name": "daemonset-1", "namespace": "default"},
                "spec": {
                    "selector": {"matchLabels": {"app": "ds"}},
                    "template": {
                        "metadata": {"labels": {"app": "ds"}},
                        "spec": {"containers": [{"name": "c", "image": "x"}]},
                    },
                },
            }
        )
    api.create(node_obj(node))
    for i in range(5):
        api.create(pod_obj(f"ds-{node}-{i}", node, owner="DaemonSet", labels={"app": f"ds{i}"}))
    for i in range(pods - 5):
        api.create(pod_obj(f"web-{node}-{i}", node, labels={"app": "web"}, grace=0))


def pods_on(api: FakeApiServer, node: str) -> int:
    return sum(
        1 for p in api.list("Pod") if p["spec"].get("nodeName") == node and not p["metadata"].get("deletionTimestamp")
    )


def tainted_and_cordoned(api: FakeApiServer, node: str) -> bool:
    n = api.get("Node", node) or {}
    taints = (n.get("spec") or {}).get("taints") or []
    return bool((n.get("spec") or {}).get("unschedulable")) and any(t["key"] == "spotd.io/interruption" for t in taints)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def agent_defaults() -> tuple[float, float]:
    """The agent's own --poll-interval and --slow-poll-interval defaults."""
    from spotd.agent.main import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--node-name", "x"])
    return args.poll_interval, args.slow_poll_interval


def cpu_seconds(pid: int) -> float:
    """CPU time of all the process's threads, in nanoseconds from the scheduler (/proc/<pid>/task/*/schedstat),
    else user + system from /proc/<pid>/stat, whose 10 ms clock tick reads a minute in steps of 0.017 %."""
    try:
        return sum(int((t / "schedstat").read_text().split()[0]) for t in Path(f"/proc/{pid}/task").iterdir()) / 1e9
    except (OSError, ValueError, IndexError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def notice_latency(tmp: Path, samples: int, poll: float) -> list[float]:
    """Each sample: a fresh agent on a fresh node, a notice at a random point of its poll cycle."""
    latencies = []
    api = FakeApiServer(termination_scale=0.0)
    await api.start()
    kubeconfig = str(api.write_kubeconfig(tmp / "kubeconfig"))
    try:
        for i in range(samples):
            node = f"lat-{i}"
            api.create(node_obj(node))
            async with FakeImds() as imds:
                agent = AgentProcess(
                    tmp, kubeconfig, imds.url, node, "--log-level", "warning", "--poll-interval", f"{poll}s"
                ).start()
                try:
                    await agent.ready()
                    await asyncio.sleep((i % 10) / 10 * poll)  # spread notices over the poll cycle
                    start = time.monotonic()
                    imds.set_instance_action("terminate", datetime.now(UTC) + timedelta(minutes=2))
                    while not tainted_and_cordoned(api, node):  # noqa: ASYNC110 - a tight timing probe
                        await asyncio.sleep(0.002)
                    latencies.append(time.monotonic() - start)
                finally:
                    agent.stop()
    finally:
        await api.stop()
    return latencies


async def agent_drain(api: FakeApiServer, tmp: Path, kubeconfig: str, node: str, *extra: str) -> tuple[float, float]:
    """(agent drain seconds, notice-to-empty seconds) for one node."""
    async with FakeImds() as imds:
        poll, slow = agent_defaults()
        flags = ("--log-level", "info", "--poll-interval", f"{poll}s", "--slow-poll-interval", f"{slow}s")
        agent = AgentProcess(tmp, kubeconfig, imds.url, node, *flags, *extra).start()
        try:
            await agent.ready()
            start = time.monotonic()
            imds.set_instance_action("terminate", datetime.now(UTC) + timedelta(minutes=2))
            await eventually(lambda: pods_on(api, node) == 5, timeout=120, interval=0.005)
            notice_to_empty = time.monotonic() - start
            finished = await eventually(lambda: agent.events("drain_finished"), timeout=10)
            return float(finished[-1]["seconds"]), notice_to_empty
        finally:
            agent.stop()


async def black_hole() -> tuple[asyncio.Server, str]:
    """An Alertmanager that accepts connections and never answers."""

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client gives up

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def drain_side_by_side(tmp: Path, pods: int) -> dict[str, tuple[float, float]]:
    """Drains of identical nodes on one fake API server: the agent (without Alertmanager, with a dead one,
    with a black-holed one) and kubectl drain. Values: (drain seconds, notice-to-empty seconds)."""
    api = FakeApiServer(termination_scale=0.0)
    await api.start()
    kubeconfig = str(api.write_kubeconfig(tmp / "kubeconfig-drain"))
    hole, hole_url = await black_hole()
    results: dict[str, tuple[float, float]] = {}
    try:
        for name in ("agent", "agent-dead-am", "agent-blackhole-am", "kubectl"):
            populate(api, name, pods)
        results["spotd"] = await agent_drain(api, tmp, kubeconfig, "agent")
        dead = f"http://127.0.0.1:{free_port()}"
        results["spotd, Alertmanager dead"] = await agent_drain(
            api, tmp, kubeconfig, "agent-dead-am", "--alertmanager-url", dead
        )
        results["spotd, Alertmanager black hole"] = await agent_drain(
            api, tmp, kubeconfig, "agent-blackhole-am", "--alertmanager-url", hole_url
        )
        kubectl = shutil.which("kubectl")
        if kubectl is not None:
            start = time.monotonic()
            proc = await asyncio.create_subprocess_exec(
                kubectl,
                "--kubeconfig",
                kubeconfig,
                "drain",
                "kubectl",
                "--ignore-daemonsets",
                "--delete-emptydir-data",
                "--timeout=300s",
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
            _, err = await proc.communicate()
            seconds = time.monotonic() - start
            if proc.returncode != 0:
                print(f"kubectl drain failed: {err.decode()[-500:]}", file=sys.stderr)
            results["kubectl drain"] = (seconds, seconds)
        return results
    finally:
        hole.close()
        await api.stop()


def production_python() -> str:
    """The agent as the image installs it (spotd without the test tools), in .bench/venv."""
    root = Path(__file__).resolve().parent.parent
    venv = root / ".bench" / "venv"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(root)],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # As the image does: .opt-2.pyc files for the DaemonSet's PYTHONOPTIMIZE=2.
    subprocess.run(
        [str(python), "-OO", "-m", "compileall", "-q", str(venv / "lib")], check=True, stdout=subprocess.DEVNULL
    )
    return str(python)


def daemonset_env() -> dict[str, str]:
    """The agent container's literal environment in deploy/daemonset.yaml (PYTHONOPTIMIZE, malloc
    thresholds), and PYTHONSAFEPATH so that `python -m spotd` runs the installed package, as the image's
    `spotd` does, not the source tree in the working directory."""
    import yaml

    manifest = yaml.safe_load((Path(__file__).resolve().parent.parent / "deploy" / "daemonset.yaml").read_text())
    (container,) = [c for c in manifest["spec"]["template"]["spec"]["containers"] if c["name"] == "agent"]
    env = {e["name"]: str(e["value"]) for e in container.get("env", []) if "value" in e}
    return {**env, "PYTHONSAFEPATH": "1"}


async def footprint(tmp: Path, idle: float, runs: int, pods: int) -> dict[str, float]:
    """Idle CPU (median of `runs` agents side by side) and RSS, and the peak RSS of an agent draining a node."""
    api = FakeApiServer(termination_scale=0.0)
    await api.start()
    kubeconfig = str(api.write_kubeconfig(tmp / "kubeconfig-idle"))
    python = production_python()
    poll, slow = agent_defaults()
    flags = ("--log-level", "info", "--poll-interval", f"{poll}s", "--slow-poll-interval", f"{slow}s")
    env = daemonset_env()
    out: dict[str, float] = {}
    try:
        imdss = [FakeImds() for _ in range(runs)]
        agents = []
        for i, imds in enumerate(imdss):
            await imds.start()
            api.create(node_obj(f"idle-{i}"))
            agents.append(AgentProcess(tmp, kubeconfig, imds.url, f"idle-{i}", *flags, python=python, env=env).start())
        try:
            for agent in agents:
                await agent.ready(timeout=60)
            await asyncio.sleep(5)  # past start-up
            pids = [a.proc.pid for a in agents if a.proc is not None]
            cpu0, t0 = [cpu_seconds(p) for p in pids], time.monotonic()
            await asyncio.sleep(idle)
            elapsed = time.monotonic() - t0
            used = [cpu_seconds(p) - c for p, c in zip(pids, cpu0, strict=True)]
            out["cpu_seconds_per_minute"] = statistics.median(used) / elapsed * 60
            out["cpu_percent"] = statistics.median(used) / elapsed * 100
            out["cpu_percent_min"], out["cpu_percent_max"] = min(used) / elapsed * 100, max(used) / elapsed * 100
            out["rss_idle"] = statistics.median(rss_mb(p) for p in pids)
        finally:
            for agent in agents:
                agent.stop()
            for imds in imdss:
                await imds.stop()
        populate(api, "peak-node", pods)
        async with FakeImds() as imds:
            agent = AgentProcess(tmp, kubeconfig, imds.url, "peak-node", *flags, python=python, env=env).start()
            try:
                await agent.ready(timeout=60)
                assert agent.proc is not None
                cpu0 = cpu_seconds(agent.proc.pid)
                imds.set_instance_action("terminate", datetime.now(UTC) + timedelta(minutes=2))
                await eventually(lambda: agent.events("drain_finished"), timeout=120, interval=0.05)
                out["cpu_drain"] = cpu_seconds(agent.proc.pid) - cpu0
                await asyncio.sleep(1)  # events and alerts flushed
                out["rss_peak_drain"] = peak_rss_mb(agent.proc.pid)
                out["rss_after_drain"] = rss_mb(agent.proc.pid)
            finally:
                agent.stop()
    finally:
        await api.stop()
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--poll-interval", type=float, help="the agent's --poll-interval (default: its own)")
    parser.add_argument("--pods", type=int, default=110)
    parser.add_argument("--idle", type=float, default=60.0, help="seconds of idle CPU measured (at least 60)")
    parser.add_argument("--runs", type=int, default=3, help="idle agents measured side by side; the median")
    parser.add_argument("--only", choices=("latency", "drain", "footprint"), help="run one part")
    args = parser.parse_args()
    poll = args.poll_interval or agent_defaults()[0]
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        print(
            f"spotd agent bench  python {sys.version.split()[0]}  {os.cpu_count()} cores  {datetime.now(UTC):%Y-%m-%d}"
        )
        if args.only in (None, "latency"):
            lat = await notice_latency(tmp, args.samples, poll)
            print(
                f"notice -> tainted+cordoned ({len(lat)} notices, poll {poll:g}s): "
                f"p50 {statistics.median(lat) * 1000:.0f} ms  p99 {pct(lat, 0.99) * 1000:.0f} ms  "
                f"max {max(lat) * 1000:.0f} ms  (goal p99 <= 350 ms)"
            )
        if args.only in (None, "drain"):
            drains = await drain_side_by_side(tmp, args.pods)
            print(f"drain of a node with {args.pods} pods ({args.pods - 5} evictable, instant termination):")
            for name, (drain, total) in drains.items():
                print(f"  {name:32s} drain {drain:7.3f} s   notice to empty {total:7.3f} s")
            if "kubectl drain" in drains:
                ratio = drains["kubectl drain"][0] / drains["spotd"][1]
                print(f"  spotd, notice to empty, is {ratio:.0f}x faster than kubectl drain alone (goal 10x)")
        if args.only in (None, "footprint"):
            slow = agent_defaults()[1]
            fp = await footprint(tmp, args.idle, args.runs, args.pods)
            print(
                f"agent idle at defaults (poll {poll:g}s, slow poll {slow:g}s), "
                f"{args.runs} agents over {args.idle:g} s:\n"
                f"  CPU {fp['cpu_percent']:.3f} % of one core (median; runs {fp['cpu_percent_min']:.3f} to "
                f"{fp['cpu_percent_max']:.3f}) = {fp['cpu_seconds_per_minute']:.3f} CPU-s per minute (goal <= 0.3 %)\n"
                f"  RSS idle {fp['rss_idle']:.1f} MB (goal <= 36)\n"
                f"  RSS peak while draining {args.pods} pods {fp['rss_peak_drain']:.1f} MB, after "
                f"{fp['rss_after_drain']:.1f} MB (goal <= 48); CPU time for that drain {fp['cpu_drain']:.2f} s"
            )


if __name__ == "__main__":
    asyncio.run(main())
