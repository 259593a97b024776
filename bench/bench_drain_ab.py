"""Is a drain slower than at another commit? The same drain by both agents, alternated, on one fake API server.

    .venv/bin/python bench/bench_drain_ab.py --base <commit> [--runs 7] [--pods 110]

Wall-clock drain times on a shared machine vary several-fold from run to run (other load takes the CPU);
alternating the two agents exposes both to the same noise, and the agent's CPU time for the drain
(/proc/<pid>/stat) is compared too, which that noise inflates little. The base commit's tree comes from
`git archive` into a temporary directory and runs on this venv's packages, at its own defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_agent import cpu_seconds, populate
from spotd.sim.imds import FakeImds
from spotd.sim.kubeapi.server import FakeApiServer
from tests.agent_harness import AgentProcess, eventually

ROOT = Path(__file__).resolve().parent.parent


async def one_drain(
    api: FakeApiServer, tmp: Path, kubeconfig: str, tree: Path, node: str, pods: int
) -> tuple[float, float]:
    populate(api, node, pods)
    async with FakeImds() as imds:
        os.chdir(tree)  # `python -m spotd` imports the spotd of the working directory
        agent = AgentProcess(tmp, kubeconfig, imds.url, node, "--log-level", "info", env={"PYTHONOPTIMIZE": "2"})
        agent.args.remove("--poll-interval")  # each agent at its own defaults
        agent.args.remove("0.2s")
        agent.start()
        try:
            await agent.ready(timeout=60)
            await asyncio.sleep(1)
            assert agent.proc is not None
            cpu0 = cpu_seconds(agent.proc.pid)
            imds.set_instance_action("terminate", datetime.now(UTC) + timedelta(minutes=2))
            finished = await eventually(lambda: agent.events("drain_finished"), timeout=60, interval=0.01)
            return float(finished[-1]["seconds"]), cpu_seconds(agent.proc.pid) - cpu0
        finally:
            agent.stop()


def extract(commit: str, into: Path) -> None:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the commit to compare with")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--pods", type=int, default=110)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        base = tmp / "base"
        base.mkdir()
        extract(args.base, base)
        trees = {f"base {args.base[:10]}": base, "this tree": ROOT}
        api = FakeApiServer(termination_scale=0.0)
        await api.start()
        kubeconfig = str(api.write_kubeconfig(tmp / "kubeconfig"))
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in trees}
        try:
            for i in range(args.runs):
                for n, (name, tree) in enumerate(trees.items()):
                    results[name].append(await one_drain(api, tmp, kubeconfig, tree, f"ab-{n}-{i}", args.pods))
        finally:
            os.chdir(ROOT)
            await api.stop()
    print(f"drain of a node with {args.pods} pods, {args.runs} runs each, alternated (median, min to max)")
    for name, values in results.items():
        wall, cpu = [w for w, _ in values], [c for _, c in values]
        print(
            f"  {name:18s} drain {statistics.median(wall):.3f} s ({min(wall):.3f} to {max(wall):.3f})  "
            f"agent CPU {statistics.median(cpu):.2f} s ({min(cpu):.2f} to {max(cpu):.2f})"
        )


if __name__ == "__main__":
    asyncio.run(main())
