"""`spotd simulate-reclaim --embedded --control-plane [DIR]`: the embedded rehearsal on a real control plane
(kube-apiserver, etcd, kube-controller-manager, kube-scheduler and kwok on 127.0.0.1, deploy/ applied), started
for the run and stopped after it. The cluster is spotd.sim.kwok_cluster's; the agents run in this process, each
with a token bound to spotd's DaemonSet pod on its node; the rehearsal acts as the cluster's admin."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from spotd.rehearsal.report import Report
from spotd.rehearsal.runner import Rehearsal, RehearsalConfig
from spotd.rehearsal.targets import Target
from spotd.sim.cluster import ClusterSpec, notify_imds
from spotd.sim.controlplane import RealCluster
from spotd.sim.kwok_cluster import KwokCluster

# (node, imds_url, kubeconfig) -> AgentConfig
AgentConfigFactory = Callable[[str, str, str], Any]


async def run_on_control_plane(
    rehearsal_config: RehearsalConfig,
    spec: ClusterSpec,
    bin_dir: Path,
    agent_config: AgentConfigFactory,
    workdir: Path | None = None,
) -> Report:
    """Start the control plane from `bin_dir` (spotd.sim.controlplane.find_controlplane's), populate it, run the
    agents, rehearse, stop it; the control plane's logs stay in `workdir`."""
    workdir = workdir or Path(tempfile.mkdtemp(prefix="spotd-simulate-real-"))
    real = RealCluster(bin_dir, workdir / "controlplane")
    cluster = KwokCluster(real, spec, rehearsal_config.namespace)
    tasks: list[asyncio.Task[None]] = []
    started = time.monotonic()
    try:
        await asyncio.to_thread(real.start)
        version = await asyncio.to_thread(real.kubectl, "version", "-o", "json")
        await asyncio.to_thread(cluster.populate)
        await asyncio.to_thread(cluster.wait_settled)
        kubeconfigs = await asyncio.to_thread(cluster.agent_kubeconfigs, workdir)
        await cluster.start_imds()
        print(
            f"real control plane ({_server_version(version)}, {bin_dir}): {spec.spot_nodes} Spot + "
            f"{spec.on_demand_nodes} on-demand kwok nodes, {len(kubeconfigs)} agents, settled in "
            f"{time.monotonic() - started:.0f} s; its logs and admin kubeconfig in {real.work}",
            file=sys.stderr,
            flush=True,
        )
        tasks.append(asyncio.get_running_loop().create_task(cluster.run_agents(kubeconfigs, agent_config)))

        async def terminate(targets: Sequence[Target]) -> None:
            for t in targets:
                await asyncio.to_thread(cluster.remove_node, t.name)

        admin = str(real.work / "admin.kubeconfig")
        rehearsal = Rehearsal(
            replace(rehearsal_config, kubeconfig=admin),
            terminator=terminate,
            notifier=partial(notify_imds, cluster.imds),
        )
        return await rehearsal.run()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await cluster.stop_imds()
        real.stop()
        shutil.rmtree(real.work / "etcd", ignore_errors=True)  # the store is the run's alone; the logs stay


def _server_version(kubectl_version_json: str) -> str:
    try:
        return str(json.loads(kubectl_version_json)["serverVersion"]["gitVersion"])
    except (ValueError, KeyError, TypeError):
        return "version unknown"
