"""The embedded cluster of `spotd simulate-reclaim --control-plane` (issue 18): spotd.sim.cluster's nodes and
workload mix on the real control plane (spotd.sim.controlplane). The nodes are kwok's to run; the real
Deployment, ReplicaSet, StatefulSet and DaemonSet controllers make the pods, the real scheduler places them, the
real disruption controller answers evictions. Each node has a FakeImds and an agent in this process, the agent
with a TokenRequest token bound to spotd's DaemonSet pod on its node: deploy/'s RBAC and admission policies
hold it to its node as on a real cluster.

The pods' start and stop annotations (--time-scale) mean nothing here: kwok runs a pod at once and ends a
deleted one at once."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import random
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from spotd.sim.cluster import (
    MIX,
    PRIORITY_CLASSES,
    ClusterSpec,
    imds_for,
    node_objects,
    replicas_of,
    workload_objects,
)
from spotd.sim.controlplane import KWOK_ANNOTATION, RealCluster
from spotd.sim.imds import FakeImds

Obj = dict[str, Any]
AGENT_SELECTOR = "app.kubernetes.io/component=agent"


class KwokCluster:
    """`populate()` and `wait_settled()` block (call them in a thread); `start_imds()` and `run_agents()` are the
    embedded cluster's, one agent per node that spotd's DaemonSet runs on."""

    def __init__(self, real: RealCluster, spec: ClusterSpec, namespace: str = "spotd") -> None:
        self.real = real
        self.spec = spec
        self.namespace = namespace
        self.rng = random.Random(spec.seed)
        self.nodes: list[Obj] = []
        self.imds: dict[str, FakeImds] = {}
        self.agents: dict[str, asyncio.Task[None]] = {}

    # ---- objects ----
    def populate(self) -> None:
        """Priority classes, namespaces, the Spot and on-demand nodes (kwok's), every workload of the mix and
        its PodDisruptionBudget; the controllers and the scheduler do the rest."""
        objects: list[Obj] = []
        for name, value in PRIORITY_CLASSES.items():
            if name.startswith("system-"):
                continue  # the API server's own
            objects.append(
                {
                    "apiVersion": "scheduling.k8s.io/v1",
                    "kind": "PriorityClass",
                    "metadata": {"name": name},
                    "value": value,
                    "globalDefault": name == "default",
                    "preemptionPolicy": "Never" if value < 0 else "PreemptLowerPriority",
                }
            )
        for ns in sorted({w.namespace for w in MIX} - {"kube-system"}):
            objects.append({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        self.real.apply(*objects)
        self.nodes = node_objects(self.spec, self.rng)
        for node in self.nodes:
            node["metadata"].setdefault("annotations", {})[KWOK_ANNOTATION] = "fake"
            status, body = self.real.request("POST", "/api/v1/nodes", node)
            if status != 201:
                raise RuntimeError(f"node {node['metadata']['name']}: {status} {body}")
        workloads: list[Obj] = []
        for w in MIX:
            if replicas_of(w, self.spec) == 0 and w.kind != "DaemonSet":
                continue
            body = workload_objects(w, self.spec)
            # the Priority admission plugin fills it in from the class (and refuses a value given beside it)
            body["spec"]["template"]["spec"].pop("priority", None)
            workloads.append(body)
            if w.pdb is not None:
                workloads.append(
                    {
                        "apiVersion": "policy/v1",
                        "kind": "PodDisruptionBudget",
                        "metadata": {"name": w.name, "namespace": w.namespace},
                        "spec": {**copy.deepcopy(w.pdb), "selector": {"matchLabels": {"app": w.name}}},
                    }
                )
        self.real.apply(*workloads)

    def wait_settled(self, timeout: float = 300.0) -> None:
        """Until every workload of the mix is whole (ready as desired) and spotd's agent pod runs on every node:
        the rehearsal's baseline is a settled cluster."""
        names = [n["metadata"]["name"] for n in self.nodes]

        def whole() -> bool:
            for w in MIX:
                if replicas_of(w, self.spec) == 0 and w.kind != "DaemonSet":
                    continue
                plural = w.kind.lower() + "s"
                status, body = self.real.request("GET", f"/apis/apps/v1/namespaces/{w.namespace}/{plural}/{w.name}")
                if status != 200:
                    return False
                st = body.get("status") or {}
                if w.kind == "DaemonSet":
                    if not st.get("desiredNumberScheduled") or st.get("numberReady") != st["desiredNumberScheduled"]:
                        return False
                elif (st.get("readyReplicas") or 0) < body["spec"]["replicas"]:
                    return False
            return set(names) <= set(self.agent_pods())

        self.real.wait_for(whole, timeout)

    def agent_pods(self) -> dict[str, Obj]:
        """Node name -> spotd's running agent pod on it (the DaemonSet's, run by kwok)."""
        query = urllib.parse.urlencode({"labelSelector": AGENT_SELECTOR})
        status, body = self.real.request("GET", f"/api/v1/namespaces/{self.namespace}/pods?{query}")
        if status != 200:
            return {}
        return {
            p["spec"]["nodeName"]: p
            for p in body["items"]
            if p["spec"].get("nodeName") and (p.get("status") or {}).get("phase") == "Running"
        }

    def agent_kubeconfigs(self, where: Path) -> dict[str, Path]:
        """Node name -> a kubeconfig with a TokenRequest token bound to the agent pod on that node (the token's
        node-name claim is the server's own, so deploy/'s admission policies tie the agent to its node)."""
        out: dict[str, Path] = {}
        for node, pod in sorted(self.agent_pods().items()):
            token = self.real.service_account_token(self.namespace, pod["spec"]["serviceAccountName"], bound_pod=pod)
            out[node] = self.real.write_kubeconfig_for(where / f"agent-{node}.kubeconfig", token, self.namespace)
        return out

    # ---- nodes: IMDS and agents ----
    async def start_imds(self) -> dict[str, FakeImds]:
        for node in self.nodes:
            imds = imds_for(node)
            await imds.start()
            self.imds[node["metadata"]["name"]] = imds
        return self.imds

    async def stop_imds(self) -> None:
        await asyncio.gather(*(i.stop() for i in self.imds.values()), return_exceptions=True)
        self.imds.clear()

    async def run_agents(self, kubeconfigs: dict[str, Path], agent_config: Callable[[str, str, str], Any]) -> None:
        """Run `spotd.agent.serve` for every node with a kubeconfig, until cancelled;
        agent_config(node, imds_url, kubeconfig) -> AgentConfig."""
        from spotd.agent.main import serve

        async with asyncio.TaskGroup() as tasks:
            for name, kubeconfig in kubeconfigs.items():
                config = agent_config(name, self.imds[name].url, str(kubeconfig))
                self.agents[name] = tasks.create_task(serve(config, health_server=False), name=f"agent-{name}")

    def remove_node(self, name: str) -> None:
        """A terminated instance: its agent stops, the Node goes (blocking); the real pod GC collects its pods."""
        agent = self.agents.pop(name, None)
        if agent is not None:
            agent.cancel()
        with contextlib.suppress(OSError):
            self.real.request("DELETE", f"/api/v1/nodes/{name}")
