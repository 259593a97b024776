"""A mass reclaim on the real control plane (issue 18), printed as figures (run on demand, never in tests).

    SPOTD_CONTROLPLANE=DIR .venv/bin/python bench/bench_real_burst.py [--nodes 100] [--pods-per-node 4]

A real control plane (spotd/sim/controlplane.py: etcd, kube-apiserver, controller-manager, scheduler, kwok;
deploy/ applied) with --nodes kwok Spot nodes running --pods-per-node pods each (two Deployments: `web` under a
PodDisruptionBudget of --web-max-unavailable, `worker` without) and --on-demand-nodes roomy nodes for the
replacements. Every Spot node has its own agent *process* (`python -m spotd agent`, about 35 MB each), with a
TokenRequest token bound to spotd's DaemonSet pod on its node (deploy/'s RBAC and admission policies apply) and
its own fake IMDS (all of them in one helper process, so that answering the polls does not hold up this
process's watches), polled every --poll-interval: 1 s rather than the agents' 250 ms default, because a
hundred agents polling four times a second keep a Python IMDS stand-in busy on one of the machine's two
cores, and the agents' own notice_received time is reported as well. After --settle seconds (the agents'
start-up storm), every node is given a Spot interruption notice at once (deadline --notice ahead). Reported:

- notice -> tainted and cordoned, per node (seen by this process's watch): p50, p99, max;
- notice -> empty (the node's last non-DaemonSet pod gone from the API server): p50, p99, max;
- evictions granted and refused (the API server's apiserver_request_total, 201 and 429), and every other 429;
- requests per node to the API server: the API server's audit log (agents' requests, by the token's node-name
  claim), from the notice to the end, and from the agent's start;
- the API server's own latency over the burst: apiserver_request_duration_seconds (all clients, watches
  excluded) as histogram quantiles, overall and for the agents' writes;
- the check: no node loses its taint or its cordon once it has both (every node event after that is looked at,
  and every node is read again at the end). Exit status 1 when it fails.

The machine is shared: the load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.parse
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lightkube import AsyncClient, KubeConfig
from lightkube.resources.core_v1 import Node, Pod
from prometheus_client.parser import text_string_to_metric_families

from spotd.kube.keys import INTERRUPTION_TAINT_KEY
from spotd.sim import builders
from spotd.sim.controlplane import KWOK_ANNOTATION, RealCluster, find_controlplane
from spotd.sim.imds import FakeImds
from tests.agent_harness import AgentProcess

NS = "burst"
NODE_NAME_CLAIM = "authentication.kubernetes.io/node-name"
AUDIT_POLICY = """apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Metadata
    userGroups: ["system:serviceaccounts:spotd"]
  - level: None
"""


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def histogram_quantile(q: float, buckets: dict[float, float]) -> float:
    """Prometheus' histogram_quantile over cumulative buckets {le: count} (linear within a bucket)."""
    edges = sorted(buckets)
    total = buckets[edges[-1]]
    if total <= 0:
        return float("nan")
    rank = q * total
    lower, below = 0.0, 0.0
    for le in edges:
        count = buckets[le]
        if count >= rank:
            if le == float("inf"):
                return lower
            return lower + (le - lower) * ((rank - below) / (count - below) if count > below else 0.0)
        lower, below = le, count
    return lower


def scrape(real: RealCluster) -> tuple[dict[tuple[str, str, str], dict[float, float]], Counter[tuple[str, ...]]]:
    """(verb, resource, subresource) -> cumulative buckets of apiserver_request_duration_seconds, and
    apiserver_request_total by (verb, resource, subresource, code)."""
    status, text = real.request("GET", "/metrics")
    assert status == 200, text
    durations: dict[tuple[str, str, str], dict[float, float]] = defaultdict(lambda: defaultdict(float))
    totals: Counter[tuple[str, ...]] = Counter()
    for family in text_string_to_metric_families(str(text)):
        for s in family.samples:
            if s.name == "apiserver_request_duration_seconds_bucket":
                key = (s.labels["verb"], s.labels.get("resource", ""), s.labels.get("subresource", ""))
                durations[key][float(s.labels["le"])] += s.value
            elif s.name == "apiserver_request_total":
                l = s.labels  # noqa: E741
                totals[(l["verb"], l.get("resource", ""), l.get("subresource", ""), l["code"])] += s.value
    return durations, totals


def diff_buckets(
    after: dict[tuple[str, str, str], dict[float, float]], before: dict[tuple[str, str, str], dict[float, float]]
) -> dict[tuple[str, str, str], dict[float, float]]:
    return {k: {le: v - before.get(k, {}).get(le, 0.0) for le, v in b.items()} for k, b in after.items()}


def merged(buckets: dict[tuple[str, str, str], dict[float, float]], keep: Any) -> dict[float, float]:
    out: dict[float, float] = defaultdict(float)
    for key, b in buckets.items():
        if keep(key):
            for le, v in b.items():
                out[le] += v
    return out


def deployment(name: str, replicas: int) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "terminationGracePeriodSeconds": 30,
                    "topologySpreadConstraints": [
                        {
                            "maxSkew": 1,
                            "topologyKey": "kubernetes.io/hostname",
                            "whenUnsatisfiable": "ScheduleAnyway",
                            "labelSelector": {"matchLabels": {"app": name}},
                        }
                    ],
                    "containers": [
                        {
                            "name": name,
                            "image": f"registry.example.com/{name}:1",
                            "resources": {
                                "requests": {"cpu": "100m", "memory": "64Mi"},
                                "limits": {"cpu": "100m", "memory": "64Mi"},
                            },
                        }
                    ],
                },
            },
        },
    }


def kwok_node(name: str, capacity: str, cpu: str, pods: str, unschedulable: bool = False) -> dict[str, Any]:
    node = builders.node(
        name,
        capacity,
        instance_type="m5.xlarge" if capacity == builders.SPOT else "m5.16xlarge",
        zone=("us-east-1a", "us-east-1b", "us-east-1c")[int(name[-2:]) % 3],
        allocatable={"cpu": cpu, "memory": "60Gi", "pods": pods},
    )
    node["metadata"]["annotations"] = {KWOK_ANNOTATION: "fake"}
    if unschedulable:
        node["spec"]["unschedulable"] = True
    return node


def wait(real: RealCluster, what: str, check: Any, timeout: float) -> None:
    started = time.monotonic()
    real.wait_for(check, timeout)
    print(f"  {what}: {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)


def deployments_ready(real: RealCluster) -> bool:
    for name in ("web", "worker"):
        status, body = real.request("GET", f"/apis/apps/v1/namespaces/{NS}/deployments/{name}")
        if status != 200 or (body.get("status") or {}).get("readyReplicas") != body["spec"]["replicas"]:
            return False
    return True


def agent_pods(real: RealCluster) -> dict[str, dict[str, Any]]:
    query = urllib.parse.urlencode({"labelSelector": "app.kubernetes.io/component=agent"})
    status, body = real.request("GET", f"/api/v1/namespaces/spotd/pods?{query}")
    if status != 200:
        return {}
    return {
        p["spec"]["nodeName"]: p
        for p in body["items"]
        if p["spec"].get("nodeName") and (p.get("status") or {}).get("phase") == "Running"
    }


class Watcher:
    """This process's view of the Spot nodes and the burst pods, from two watches, with receipt times."""

    def __init__(self, spot: list[str]) -> None:
        self.spot = set(spot)
        self.held: dict[str, float] = {}  # node -> first time seen tainted and cordoned
        self.lost: list[str] = []  # "node: what" for every event without them after that
        self.pods: dict[str, str] = {}  # pod uid -> node, while the pod exists
        self.emptied: dict[str, float] = {}  # node -> time its last pod went
        self.seen: set[str] = set()
        self.nodes_seen = asyncio.Event()
        self.pods_seen = asyncio.Event()

    async def watch_nodes(self, client: AsyncClient) -> None:
        async for kind, node in client.watch(Node):
            now = time.time()
            name = node.metadata.name
            if name not in self.spot:
                continue
            tainted = any(t.key == INTERRUPTION_TAINT_KEY for t in (node.spec.taints or []))
            cordoned = bool(node.spec.unschedulable)
            if tainted and cordoned:
                self.held.setdefault(name, now)
            elif name in self.held:
                self.lost.append(
                    f"{name}: {kind} tainted={tainted} cordoned={cordoned} rv={node.metadata.resourceVersion}"
                )
            self.seen.add(name)
            if self.seen >= self.spot:
                self.nodes_seen.set()

    async def watch_pods(self, client: AsyncClient, expected: int) -> None:
        async for kind, pod in client.watch(Pod, namespace=NS):
            uid, node = pod.metadata.uid, pod.spec.nodeName
            if kind == "DELETED":
                gone = self.pods.pop(uid, None)
                if gone in self.spot and gone not in self.pods.values():
                    self.emptied[gone] = time.time()
            elif node:
                self.pods[uid] = node
            if len(self.pods) >= expected:
                self.pods_seen.set()


async def bench(args: argparse.Namespace) -> int:
    bin_dir = find_controlplane(None)
    work = Path(tempfile.mkdtemp(prefix="spotd-burst-"))
    (work / "audit-policy.yaml").write_text(AUDIT_POLICY)
    audit_log = work / "audit.log"
    real = RealCluster(
        bin_dir,
        work / "controlplane",
        apiserver_args=(
            f"--audit-policy-file={work / 'audit-policy.yaml'}",
            f"--audit-log-path={audit_log}",
            "--audit-log-format=json",
            "--audit-log-maxsize=0",
        ),
    )
    spot = [f"burst-spot-{i:03d}" for i in range(1, args.nodes + 1)]
    ondemand = [f"burst-od-{i:02d}" for i in range(1, args.on_demand_nodes + 1)]
    agents: list[AgentProcess] = []
    imds: asyncio.subprocess.Process | None = None
    tasks: list[asyncio.Task[None]] = []
    print(f"work directory {work}", file=sys.stderr, flush=True)
    try:
        t = time.monotonic()
        await asyncio.to_thread(real.start)
        print(f"  control plane up: {time.monotonic() - t:.1f} s", file=sys.stderr, flush=True)
        version = json.loads(real.kubectl("version", "-o", "json"))["serverVersion"]["gitVersion"]
        # Spot nodes first, on-demand ones cordoned until the pods are placed: the pods start on Spot
        nodes = [kwok_node(n, builders.SPOT, "4", "58") for n in spot]
        nodes += [kwok_node(n, builders.ON_DEMAND, "64", "250", unschedulable=True) for n in ondemand]
        real.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
        for node in nodes:
            status, body = await asyncio.to_thread(real.request, "POST", "/api/v1/nodes", node)
            assert status == 201, body
        total = args.nodes * args.pods_per_node
        web = total // 2
        real.apply(
            deployment("web", web),
            deployment("worker", total - web),
            {
                "apiVersion": "policy/v1",
                "kind": "PodDisruptionBudget",
                "metadata": {"name": "web", "namespace": NS},
                "spec": {"maxUnavailable": args.web_max_unavailable, "selector": {"matchLabels": {"app": "web"}}},
            },
        )
        await asyncio.to_thread(
            wait, real, f"{total} pods Ready on the Spot nodes", lambda: deployments_ready(real), 900
        )
        everywhere = set(spot) | set(ondemand)
        await asyncio.to_thread(
            wait, real, "spotd's DaemonSet pod on every node", lambda: everywhere <= set(agent_pods(real)), 900
        )
        for name in ondemand:
            real.request(
                "PATCH",
                f"/api/v1/nodes/{name}",
                {"spec": {"unschedulable": None}},
                content_type="application/merge-patch+json",
            )
        # the fake IMDS servers in a process of their own: answering the agents' polls would otherwise hold up
        # this process's watches, and with them the times measured
        ids = {n["metadata"]["name"]: n["spec"]["providerID"].rsplit("/", 1)[-1] for n in nodes}
        imds = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--serve-imds",
            json.dumps({n: ids[n] for n in spot}),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert imds.stdout is not None and imds.stdin is not None
        urls = json.loads(await imds.stdout.readline())
        # one agent process per Spot node: its token bound to spotd's pod there, its own fake IMDS
        pods = agent_pods(real)
        for name in spot:
            token = real.service_account_token("spotd", "spotd-agent", bound_pod=pods[name], seconds=7200)
            kubeconfig = real.write_kubeconfig_for(work / f"agent-{name}.kubeconfig", token, "spotd")
            poll = ("--poll-interval", args.poll_interval, "--log-level", "info")
            agents.append(AgentProcess(work, str(kubeconfig), urls[name], name, *poll).start())
        t = time.monotonic()
        await asyncio.to_thread(wait_ready, agents, 900)
        print(f"  {len(agents)} agent processes ready: {time.monotonic() - t:.1f} s", file=sys.stderr, flush=True)
        rss = [resident_mb(a) for a in agents]
        await asyncio.sleep(args.settle)  # the start-up storm of the agent processes passes before the notice

        config = KubeConfig.from_file(str(real.work / "admin.kubeconfig"))
        client = AsyncClient(config, timeout=None)
        watcher = Watcher(spot)
        tasks.append(asyncio.create_task(watcher.watch_nodes(client)))
        tasks.append(asyncio.create_task(watcher.watch_pods(client, total)))
        await asyncio.wait_for(asyncio.gather(watcher.nodes_seen.wait(), watcher.pods_seen.wait()), 120)
        per_node = Counter(watcher.pods.values())
        on_spot = sum(per_node[n] for n in spot)
        await asyncio.sleep(2)

        before = await asyncio.to_thread(scrape, real)
        load = os.getloadavg()
        notice_at = datetime.now(UTC)
        deadline = notice_at + timedelta(seconds=args.notice)
        imds.stdin.write(f"{deadline.isoformat()}\n".encode())
        await imds.stdin.drain()
        given: dict[str, float] = json.loads(await imds.stdout.readline())
        print(f"  notice given to {len(spot)} nodes at {notice_at:%H:%M:%S.%f}", file=sys.stderr, flush=True)

        end_by = time.monotonic() + args.notice
        while time.monotonic() < end_by:
            if len(watcher.held) == len(spot) and all(n in watcher.emptied for n in spot if per_node[n]):
                break
            await asyncio.sleep(0.2)
        burst_end = time.time()
        await asyncio.sleep(args.hold)  # the nodes stay tainted and cordoned while the replacements settle
        after = await asyncio.to_thread(scrape, real)
        budget = budget_status(real)
        final_lost = []
        for name in spot:
            status, node = real.request("GET", f"/api/v1/nodes/{name}")
            spec = node.get("spec") or {}
            if not (
                spec.get("unschedulable") and any(t["key"] == INTERRUPTION_TAINT_KEY for t in spec.get("taints") or [])
            ):
                final_lost.append(f"{name}: at the end {spec}")
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.close()

        # ---- figures ----
        cordon = [watcher.held[n] - given[n] for n in spot if n in watcher.held]
        empty = [watcher.emptied[n] - given[n] for n in spot if n in watcher.emptied]
        seen = {a.args[a.args.index("--node-name") + 1]: noticed_at(a) for a in agents}
        seen_to_cordon = [watcher.held[n] - seen[n] for n in spot if n in watcher.held and seen.get(n)]
        durations = diff_buckets(*[after[0], before[0]])
        totals = after[1] - before[1]
        requests = audit_requests(audit_log, notice_at, spot)
        print()
        print(
            f"{len(spot)}-node burst on the real control plane (kube-apiserver {version}, etcd, kwok; deploy/ "
            f"applied): {len(agents)} agent processes (RSS median {statistics.median(rss):.1f} MB), {on_spot} pods "
            f"on the Spot nodes ({min(per_node[n] for n in spot)}-{max(per_node[n] for n in spot)} per node), "
            f"{len(ondemand)} on-demand nodes for the replacements; load average "
            f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f} at the notice ({os.cpu_count()} cores, shared)"
        )
        print(
            f"notice -> tainted and cordoned ({len(cordon)}/{len(spot)} nodes): p50 {quantile(cordon, 0.5):.2f} s, "
            f"p99 {quantile(cordon, 0.99):.2f} s, max {max(cordon):.2f} s"
        )
        if seen_to_cordon:
            print(
                f"  from the agent's notice_received to tainted and cordoned: p50 {quantile(seen_to_cordon, 0.5):.2f} "
                f"s, p99 {quantile(seen_to_cordon, 0.99):.2f} s (before it: the IMDS poll, every {args.poll_interval})"
            )
        print(
            f"notice -> empty ({len(empty)}/{sum(1 for n in spot if per_node[n])} nodes): "
            f"p50 {quantile(empty, 0.5):.2f} s, p99 {quantile(empty, 0.99):.2f} s, max {max(empty):.2f} s"
            if empty
            else "notice -> empty: no node emptied"
        )
        left = sum(1 for node in watcher.pods.values() if node in watcher.spot)
        print(f"  pods still on the Spot nodes at the end: {left} of {on_spot}")
        print(f"  web's budget at the end: {budget}")
        evictions = {code: v for (verb, res, sub, code), v in totals.items() if res == "pods" and sub == "eviction"}
        throttled = {k: v for k, v in totals.items() if k[3] == "429" and not (k[1] == "pods" and k[2] == "eviction")}
        print(
            f"evictions: {int(evictions.get('201', 0))} granted (201), {int(evictions.get('429', 0))} refused (429), "
            f"other answers { ({c: int(v) for c, v in evictions.items() if c not in ('201', '429')}) }; "
            f"other 429s: {int(sum(throttled.values()))}"
        )
        burst = [requests["burst"][n] for n in spot]
        since = [requests["all"][n] for n in spot]
        print(
            f"requests per node to the API server (audit log, agents' tokens): from the notice "
            f"{statistics.median(burst):.0f} median, {max(burst)} max ({sum(burst)} in all); since the agent started "
            f"{statistics.median(since):.0f} median"
        )
        print(
            "  by verb and resource, from the notice: "
            + ", ".join(f"{k} {v}" for k, v in requests["kinds"].most_common(8))
        )
        not_watch = merged(durations, lambda k: k[0] not in ("WATCH", "CONNECT"))
        n_requests = int(max(not_watch.values()) if not_watch else 0)
        print(
            f"API server latency over the burst (apiserver_request_duration_seconds, {n_requests} requests of every "
            f"client, watches excluded): p50 {1000 * histogram_quantile(0.5, not_watch):.0f} ms, "
            f"p99 {1000 * histogram_quantile(0.99, not_watch):.0f} ms"
        )
        for label, keep in (
            ("PATCH nodes", lambda k: k[:2] == ("PATCH", "nodes") and k[2] == ""),
            ("POST pods/eviction", lambda k: k == ("POST", "pods", "eviction")),
            ("LIST pods", lambda k: k[:2] == ("LIST", "pods")),
        ):
            b = merged(durations, keep)
            if b and max(b.values()) > 0:
                print(
                    f"  {label}: {int(max(b.values()))} requests, p50 {1000 * histogram_quantile(0.5, b):.0f} ms, "
                    f"p99 {1000 * histogram_quantile(0.99, b):.0f} ms"
                )
        lost = watcher.lost + final_lost
        verdict = "PASS" if not lost and len(cordon) == len(spot) else "FAIL"
        print(
            f"check: no node lost its taint or cordon under the burst ({len(watcher.held)} held, watched until "
            f"{args.hold:.0f} s after the end): {verdict}"
        )
        for line in lost[:20]:
            print(f"  lost: {line}")
        print(f"(burst took {burst_end - given[spot[0]]:.1f} s; control plane logs and audit log in {work})")
        return 0 if verdict == "PASS" else 1
    finally:
        for task in tasks:
            task.cancel()
        for a in agents:
            if a.proc is not None and a.proc.poll() is None:
                a.proc.terminate()
        for a in agents:
            if a.proc is not None:
                try:
                    a.proc.wait(30)
                except Exception:
                    a.proc.kill()
        if imds is not None and imds.returncode is None:
            imds.kill()
            await imds.wait()
        real.stop()
        shutil.rmtree(real.work / "etcd", ignore_errors=True)  # about 100 MB; the logs and audit log stay


def budget_status(real: RealCluster) -> str:
    """web's PodDisruptionBudget status: allowed, healthy of expected, and the pods it counts as disrupted
    (an eviction's decrement; the disruption controller forgets one after 2 minutes if the pod is not deleted)."""
    status, body = real.request("GET", f"/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/web")
    if status != 200:
        return f"unreadable ({status})"
    st = body.get("status") or {}
    disrupted = st.get("disruptedPods") or {}
    return (
        f"disruptionsAllowed {st.get('disruptionsAllowed')}, currentHealthy {st.get('currentHealthy')} of "
        f"{st.get('expectedPods')} (desired {st.get('desiredHealthy')}), disruptedPods {len(disrupted)}"
    )


def noticed_at(agent: AgentProcess) -> float | None:
    """When the agent logged notice_received (its JSON timestamp, this machine's clock)."""
    for entry in agent.logs():
        if entry.get("event") == "notice_received":
            return datetime.fromisoformat(str(entry["timestamp"]).replace("Z", "+00:00")).timestamp()
    return None


async def serve_imds(instances: dict[str, str]) -> None:
    """--serve-imds: a FakeImds per node; prints {node: url}, then on a deadline line on stdin gives every node
    its instance-action at once and prints {node: the time it was set}."""
    servers = {node: FakeImds(instance_id=iid, lifecycle="spot") for node, iid in instances.items()}
    for server in servers.values():
        await server.start()
    print(json.dumps({node: s.url for node, s in servers.items()}), flush=True)
    line = await asyncio.to_thread(sys.stdin.readline)
    deadline = datetime.fromisoformat(line.strip())
    given = {}
    for node, server in servers.items():
        server.set_instance_action("terminate", deadline)
        given[node] = time.time()
    print(json.dumps(given), flush=True)
    await asyncio.to_thread(sys.stdin.readline)  # until the bench ends (EOF)


def resident_mb(agent: AgentProcess) -> float:
    assert agent.proc is not None
    status = Path(f"/proc/{agent.proc.pid}/status").read_text()
    return next(int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmRSS:"))


def wait_ready(agents: list[AgentProcess], timeout: float) -> None:
    """Until every agent answers /readyz 200 (one at a time, in a thread: the IMDS servers share the loop)."""
    deadline = time.monotonic() + timeout
    for a in agents:
        while a.http("/readyz")[0] != 200:
            if a.proc is not None and a.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {a.proc.returncode}; log {a.log_path}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"agent not ready in {timeout} s; log {a.log_path}")
            time.sleep(0.2)


def audit_requests(path: Path, notice_at: datetime, spot: list[str]) -> dict[str, Any]:
    """Requests made with the agents' tokens, by the token's node: from the notice, and in all."""
    burst: Counter[str] = Counter()
    everything: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    since = notice_at.isoformat().replace("+00:00", "Z")
    for line in path.read_text().splitlines():
        event = json.loads(line)
        node = ((event.get("user") or {}).get("extra") or {}).get(NODE_NAME_CLAIM, [None])[0]
        if node is None:
            continue
        everything[node] += 1
        if event["requestReceivedTimestamp"] >= since:
            burst[node] += 1
            ref = event.get("objectRef") or {}
            resource = ref.get("resource", "") + ("/" + ref["subresource"] if ref.get("subresource") else "")
            kinds[f"{event['verb']} {resource}"] += 1
    return {"burst": burst, "all": everything, "kinds": kinds}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=100, help="Spot nodes noticed at once, one agent process each (100)")
    p.add_argument("--pods-per-node", type=int, default=4, help="workload pods per Spot node (4)")
    p.add_argument("--on-demand-nodes", type=int, default=10, help="roomy nodes the replacements go to (10)")
    p.add_argument("--notice", type=float, default=120.0, help="seconds from the notice to its deadline (120)")
    p.add_argument("--hold", type=float, default=10.0, help="seconds to keep watching after the last node emptied")
    p.add_argument("--web-max-unavailable", default="50%", help="web's PodDisruptionBudget (50%%)")
    p.add_argument("--poll-interval", default="1s", help="the agents' IMDS poll (1s; their default is 250ms)")
    p.add_argument("--settle", type=float, default=60.0, help="seconds between the agents' start and the notice")
    p.add_argument("--serve-imds", metavar="JSON", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_imds:
        asyncio.run(serve_imds(json.loads(args.serve_imds)))
        return 0
    return asyncio.run(bench(args))


if __name__ == "__main__":
    sys.exit(main())
