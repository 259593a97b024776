"""The Grafana dashboard (deploy/dashboards/spotd.json): every query parses (a real promtool), every metric it
names is one a running `spotd agent` or `spotd controller` exports, and a real Prometheus scraping both
during a rehearsal (an IMDS notice the agent drains, the same episode and an ICE from the controller's
queue) answers the key panels with data.

Grafana's variables are replaced by what a query would carry: `$__rate_interval` and `$__range` by
durations, `$cluster` and `$pool` by a value or `.*` (Grafana's All).
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import signal
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from spotd.common.parsing import format_time
from spotd.kube.keys import NOTICE_ANNOTATION
from spotd.sim import builders
from spotd.sim.imds import FakeImds
from spotd.sim.kubeapi.server import FakeApiServer
from tests.agent_harness import DEPLOY, AgentProcess, agent_kubeconfig, eventually, free_port, pdb_obj, pod_obj
from tests.alertmanager import require_tool
from tests.moto_server import EVENTS_QUEUE, MotoAws, aws, moto_endpoint  # noqa: F401  (pytest fixtures)
from tests.test_controller import ControllerProcess, ice_message
from tests.test_queue_events import spot_itn

DASHBOARD = DEPLOY / "dashboards" / "spotd.json"
SPOT_NODE = "spot-1"
INSTANCE = "i-0aaaaaaaaaaaaaaa1"
POOL = "m5.large/us-east-1a"
CLUSTER = "rehearsal"  # the cluster label Prometheus adds to both targets (relabelling), as remote-write would

# Grafana's built-in variables, as a query at Prometheus would carry them.
BUILT_IN = {"__rate_interval": "5m", "__range": "30m", "__interval": "15s"}

# ---- reading the dashboard ------------------------------------------------------------------------------


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels") or [])


def label_values(var: dict[str, Any]) -> tuple[str, str]:
    """(selector, label) of a query variable: only label_values(selector, label) is checked."""
    query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
    match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query)
    assert match, f"variable {var['name']}: not label_values(selector, label): {query!r}"
    return match.group(1), match.group(2)


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable (the selector inside label_values)."""
    found = []
    for panel in all_panels(dashboard["panels"]):
        for target in panel.get("targets") or []:
            found.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            found.append((f"variable {var['name']!r}", label_values(var)[0]))
    return found


def variables(dashboard: dict[str, Any]) -> set[str]:
    return {var["name"] for var in dashboard["templating"]["list"]}


def render(expr: str, values: dict[str, str]) -> str:
    """The query as Prometheus receives it: `$name`, `${name}` and `[[name]]` replaced; an unknown one fails."""

    def value(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        if name not in values:
            raise KeyError(f"undefined variable ${name} in {expr!r}")
        return values[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]", value, expr)


def values_for(dashboard: dict[str, Any], **chosen: str) -> dict[str, str]:
    """Every variable: built-ins, then the dashboard's own (All, `.*`, unless chosen)."""
    own = {name: chosen.get(name, ".*") for name in variables(dashboard) if name != "datasource"}
    return {**BUILT_IN, **own}


# ---- which metrics a query names --------------------------------------------------------------------------

KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
            "group_right", "atan2", "inf", "nan"}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects. Strings, label matchers, ranges and label lists go
    first; what is left that is neither a function call nor a keyword is a metric name."""
    assert "__name__" not in expr, f"a selector by __name__ is not checked: {expr!r}"
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)
    text = re.sub(r"\[[^\[\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", text)
    names: set[str] = set()
    for match in re.finditer(r"(?<![\w.:])([A-Za-z_:][\w:]*)(\s*\()?", text):
        word, call = match.groups()
        if not call and word.lower() not in KEYWORDS:
            names.add(word)
    return names


# The series names a family of each type gives (the parser strips _total and the histogram suffixes).
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "unknown": ("",),
}


def exported_series(metrics_text: str) -> set[str]:
    """Every series name a /metrics page can give Prometheus, families without samples yet included (a
    labelled counter is exported, with no series, until its first event)."""
    names: set[str] = set()
    for family in text_string_to_metric_families(metrics_text):
        names.update(family.name + suffix for suffix in SUFFIXES[family.type])
        names.update(sample.name for sample in family.samples)
    return names


def unexported(dashboard: dict[str, Any], exported: set[str]) -> dict[str, set[str]]:
    """Where the dashboard names a metric no scraped process exports, and which."""
    values = values_for(dashboard)
    missing = {}
    for where, expr in queries(dashboard):
        unknown = metric_names(render(expr, values)) - exported
        if unknown:
            missing[where] = unknown
    return missing


# ---- (1) every query parses ---------------------------------------------------------------------------------


def promtool_check(dashboard: dict[str, Any], tmp_path: Path) -> tuple[int, str]:
    """`promtool check rules` on a rule file holding every query as a recording rule: its exit code and
    its output, each rule's name replaced by the panel or variable the query comes from."""
    values = values_for(dashboard)
    found = queries(dashboard)
    rules = [
        {"record": f"spotd_dashboard:query_{i}", "expr": render(expr, values)} for i, (_, expr) in enumerate(found)
    ]
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, sort_keys=False))
    binary = require_tool("promtool")
    result = subprocess.run([binary, "check", "rules", str(path)], capture_output=True, text=True, timeout=120)
    output = re.sub(r"spotd_dashboard:query_(\d+)", lambda m: found[int(m.group(1))][0], result.stdout + result.stderr)
    return result.returncode, output


def test_every_query_parses(tmp_path: Path) -> None:
    dashboard = load_dashboard()
    returncode, output = promtool_check(dashboard, tmp_path)
    assert returncode == 0, output
    assert f"SUCCESS: {len(queries(dashboard))} rules found" in output


def test_promtool_reports_a_query_that_does_not_parse(tmp_path: Path) -> None:
    dashboard = load_dashboard()
    broken = copy.deepcopy(dashboard)
    panel = next(p for p in all_panels(broken["panels"]) if p.get("targets"))
    panel["targets"][0]["expr"] = "sum by (kind) (rate(spotd_notices_total[$__rate_interval])"  # one ) short
    returncode, output = promtool_check(broken, tmp_path)
    assert returncode != 0
    assert f"panel {panel['title']!r} A" in output and "unclosed left parenthesis" in output, output


def test_the_dashboard_uses_its_datasource_variable_and_defines_every_variable() -> None:
    dashboard = load_dashboard()
    (datasource,) = [v for v in dashboard["templating"]["list"] if v["name"] == "datasource"]
    assert datasource["type"] == "datasource" and datasource["query"] == "prometheus"
    uid = {"type": "prometheus", "uid": "${datasource}"}
    for panel in all_panels(dashboard["panels"]):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == uid, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        assert all(t["datasource"] == uid for t in panel["targets"]), panel["title"]
    for where, expr in queries(dashboard):
        render(expr, values_for(dashboard))  # KeyError on a variable the dashboard does not define
        assert metric_names(render(expr, values_for(dashboard))), f"{where} names no metric"
    ids = [p["id"] for p in all_panels(dashboard["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (kind) (increase(spotd_notices_total{cluster=~"a|b"}[5m]))', {"spotd_notices_total"}),
        ("histogram_quantile(0.99, sum by (le) (rate(x_bucket[1m])))", {"x_bucket"}),
        ('a unless on (instance) b offset 10m or c{l="d(e)"} > bool 1e3', {"a", "b", "c"}),
        ("time() - max(x) by (source) and on (instance) (y == 1)", {"x", "y"}),
        ("sum without (le) (x) * on (i) group_left (n) y", {"x", "y"}),
    ],
)
def test_metric_names_are_read_from_promql(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


# ---- (2) every metric it names is exported by a running agent or controller ---------------------------------


async def start_cluster(tmp_path: Path) -> FakeApiServer:
    """The fake API server under deploy/'s RBAC: a Spot node with two web pods a PDB keeps (so the agent's
    drain leaves them at the deadline), and a young on-demand node in the fallback scope."""
    api = FakeApiServer(host="127.0.0.1", port=0, termination_scale=0.02)
    await api.start()
    api.load_manifests([DEPLOY])
    api.write_kubeconfig(tmp_path / "kubeconfig", token=api.service_account_token("spotd", "spotd-controller"))
    karpenter = builders.KARPENTER_CAPACITY_LABEL
    api.create(builders.node(SPOT_NODE, "spot", capacity_label=karpenter, instance_id=INSTANCE))
    api.create(builders.node("od-1", "on-demand", capacity_label=karpenter, labels={"node-pool": "fallback"}))
    for i in range(2):
        api.create(pod_obj(f"web-{i}", SPOT_NODE, labels={"app": "web"}, grace=1))
    api.create(pdb_obj("web", min_available=2, app="web"))
    return api


class Spotd:
    """An agent on the Spot node and a controller reading the queue, as subprocesses."""

    def __init__(self, api: FakeApiServer, imds: FakeImds, tmp_path: Path, queue_url: str) -> None:
        kubeconfig = agent_kubeconfig(api, tmp_path / "agent.kubeconfig", SPOT_NODE)
        margin = ("--safety-margin", "2s", "--deadline-action", "leave")
        self.agent = AgentProcess(tmp_path, kubeconfig, imds.url, SPOT_NODE, *margin)
        self.controller = ControllerProcess(tmp_path, str(tmp_path / "kubeconfig"), "ctl", queue_url=queue_url)

    async def start(self) -> None:
        self.agent.start()
        self.controller.start()
        await self.agent.ready(timeout=60)
        await eventually(self.controller.leading, timeout=30, interval=0.1)

    def stop(self) -> None:
        self.agent.stop(signal.SIGKILL)
        self.controller.stop(signal.SIGKILL, timeout=5)


@pytest.fixture
async def spotd(tmp_path: Path, aws: MotoAws) -> AsyncIterator[tuple[FakeApiServer, FakeImds, Spotd, Any]]:  # noqa: F811
    sqs = aws.client("sqs")  # the test's hand; the controller signs as its own IAM user
    queue_url = sqs.create_queue(QueueName=EVENTS_QUEUE)["QueueUrl"]
    api = await start_cluster(tmp_path)
    imds = FakeImds()
    await imds.start()
    processes = Spotd(api, imds, tmp_path, queue_url)
    try:
        await processes.start()
        yield api, imds, processes, (sqs, queue_url)
    finally:
        processes.stop()
        await imds.stop()
        await api.stop()


def scraped_series(*processes: AgentProcess) -> set[str]:
    series: set[str] = set()
    for process in processes:
        status, text = process.http("/metrics")
        assert status == 200, f"{process.log_path.name}: /metrics answered {status}"
        series |= exported_series(text)
    return series


async def test_every_metric_the_dashboard_names_is_exported(spotd: tuple[Any, Any, Spotd, Any]) -> None:
    _, _, processes, _ = spotd
    exported = scraped_series(processes.agent, processes.controller)
    assert "spotd_notices_total" in exported and "spotd_controller_takeovers_total" in exported
    dashboard = load_dashboard()
    assert unexported(dashboard, exported) == {}

    # The check fails for a name no process exports, and for a family named without its series suffix.
    bogus = copy.deepcopy(dashboard)
    first, second = [p for p in all_panels(bogus["panels"]) if p.get("targets")][:2]
    first["targets"][0]["expr"] = first["targets"][0]["expr"].replace("spotd_notices_total", "spotd_notice_total")
    second["targets"].append({"refId": "Z", "expr": 'rate(spotd_drain_duration_seconds{cluster=~"$cluster"}[5m])'})
    assert unexported(bogus, exported) == {
        f"panel {first['title']!r} A": {"spotd_notice_total"},
        f"panel {second['title']!r} Z": {"spotd_drain_duration_seconds"},
    }


# ---- (3) a real Prometheus scraping both during a rehearsal ---------------------------------------------------


def require_prometheus() -> str:
    """Debian's prometheus (scripts/setup --test installs it with promtool); $SPOTD_PROMETHEUS_BIN overrides.
    Fails under CI, skips elsewhere, as tests/alertmanager.py's require_tool does."""
    override = os.environ.get("SPOTD_PROMETHEUS_BIN")
    found = override if override and os.access(override, os.X_OK) else shutil.which("prometheus")
    if found:
        return found
    message = "prometheus not found: apt-get install -y prometheus (scripts/setup --test), or set SPOTD_PROMETHEUS_BIN"
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail(f"CI: {message}", pytrace=False)
    pytest.skip(message)


class Prometheus:
    """A real Prometheus on 127.0.0.1, its data in tmp_path, scraping the given targets every second."""

    def __init__(self, tmp_path: Path, targets: dict[str, int]) -> None:
        self.port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {
                    "job_name": job,
                    "static_configs": [{"targets": [f"127.0.0.1:{port}"]}],
                    "relabel_configs": [{"target_label": "cluster", "replacement": CLUSTER}],
                }
                for job, port in targets.items()
            ],
        }
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log_path = tmp_path / "prometheus.log"
        self.args = [
            require_prometheus(),
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'prometheus-data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Prometheus:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def get(self, path: str, **params: str) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.port}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return dict(json.loads(r.read()))
        except urllib.error.HTTPError as e:  # 400 bad_data, 422 execution: the body says why
            return dict(json.loads(e.read()))

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        answer = self.get("/api/v1/query", query=expr)
        assert answer["status"] == "success", f"{expr}: {answer}"
        return list(answer["data"]["result"])


def by_label(result: list[dict[str, Any]], *labels: str) -> dict[tuple[str, ...], float]:
    return {tuple(r["metric"].get(label, "") for label in labels): float(r["value"][1]) for r in result}


def event_reasons(api: FakeApiServer, name: str) -> list[str]:
    return [e.get("reason", "") for e in api.list("Event") if e.get("involvedObject", {}).get("name") == name]


def panel_queries(dashboard: dict[str, Any], title: str, values: dict[str, str]) -> list[str]:
    (panel,) = [p for p in all_panels(dashboard["panels"]) if p["title"] == title]
    return [render(t["expr"], values) for t in panel["targets"]]


def key_panel_checks() -> dict[str, Any]:
    """Panel title -> what its answer must show once the rehearsal has run (a check of every target's result)."""

    def has(labels: tuple[str, ...], key: tuple[str, ...], floor: float, target: int = 0) -> Any:
        return lambda results: by_label(results[target], *labels).get(key, -1.0) >= floor

    def finite(results: list[list[dict[str, Any]]]) -> bool:
        return any(math.isfinite(float(r["value"][1])) for r in results[0])

    def data(results: list[list[dict[str, Any]]]) -> bool:
        return all(results)

    def any_value(floor: float) -> Any:
        return lambda results: any(float(r["value"][1]) >= floor for r in results[0])

    def finite_for(labels: tuple[str, ...], key: tuple[str, ...]) -> Any:
        return lambda results: all(math.isfinite(by_label(r, *labels).get(key, math.nan)) for r in results)

    return {
        "Notices in the time range": has(("kind",), ("spot-itn",), 1),
        "Notices being acted on": data,
        "Node patches by outcome": has(("action", "outcome"), ("notice", "ok"), 1),
        "Notice to cordon": finite_for(("kind", "actor"), ("spot-itn", "agent")),
        "Drain outcomes in the time range": has(("outcome",), ("incomplete",), 1),
        "Drain time": finite,
        "Drain time distribution": data,
        "Pods left at the deadline in the time range": has((), (), 2),
        "Pods left at the deadline, by agent": any_value(2),
        "Evictions by outcome": has(("outcome",), ("pdb_blocked",), 1),
        "Fallback nodes": has(("cluster",), (CLUSTER,), 1),
        "Nodes by capacity type": has(("capacity_type",), ("on-demand",), 1),
        "On-demand nodes: oldest, and past --min-on-demand-age": has(("cluster",), (CLUSTER,), 1),
        "Spot available per pool": has(("pool",), (POOL,), 0),
        "ICE signals by pool": has(("pool", "source"), (POOL, "sqs"), 1),
        "Surges and landings in the time range": data,
        "Episode sightings in the time range": lambda results: (
            has(("kind", "witness", "order"), ("spot-itn", "imds", "first"), 1)(results)
            and has(("kind", "witness", "order"), ("spot-itn", "queue", "second"), 1)(results)
        ),
        "Controller takeovers by outcome": data,
        "Alerts by delivery outcome": data,
    }


@pytest.mark.slow
@pytest.mark.timeout(360)  # its waits add up to more than the default 180 s on a loaded machine
async def test_prometheus_answers_the_key_panels_during_a_rehearsal(
    spotd: tuple[FakeApiServer, FakeImds, Spotd, Any], tmp_path: Path
) -> None:
    api, imds, processes, (sqs, queue_url) = spotd
    prometheus = Prometheus(
        tmp_path, {"spotd-agent": processes.agent.port, "spotd-controller": processes.controller.port}
    )
    prometheus.start()
    try:
        await eventually(prometheus.ready, timeout=60, interval=0.2)
        # Both scraped before anything happens: the agent's counters are born at their first event.
        await eventually(lambda: len(prometheus.query(f'up{{cluster="{CLUSTER}"}} == 1')) == 2, timeout=60)

        imds.set_instance_action("terminate", datetime.now(UTC) + timedelta(seconds=6))
        await eventually(
            lambda: NOTICE_ANNOTATION in (api.get("Node", SPOT_NODE) or {})["metadata"].get("annotations", {}),
            timeout=15,
        )
        now = datetime.now(UTC)
        itn = spot_itn(time=format_time(now), resources=[f"arn:aws:ec2:us-east-1:instance/{INSTANCE}"])
        itn["detail"]["instance-id"] = INSTANCE
        sqs.send_message(QueueUrl=queue_url, MessageBody=json.dumps(itn))  # the queue, second witness
        sqs.send_message(QueueUrl=queue_url, MessageBody=ice_message("m5.large", "us-east-1a", now))
        await eventually(lambda: "DrainIncomplete" in event_reasons(api, SPOT_NODE), timeout=30)
        # one notice, one cordon: one observation, within the two minutes a Spot warning gives
        cordon = {"kind": "spot-itn", "actor": "agent"}
        assert processes.agent.metric("spotd_notice_to_cordon_seconds_count", **cordon) == 1
        assert processes.agent.metric("spotd_notice_to_cordon_seconds_bucket", le="120.0", **cordon) == 1

        dashboard = load_dashboard()
        values = values_for(dashboard, cluster=CLUSTER)
        checks = key_panel_checks()
        last: dict[str, Any] = {}

        def every_key_panel_shows_its_data() -> bool:
            for title in checks:
                last[title] = [prometheus.query(expr) for expr in panel_queries(dashboard, title, values)]
            return all(check(last[title]) for title, check in checks.items())

        try:
            await eventually(every_key_panel_shows_its_data, timeout=60, interval=0.5)
        except AssertionError:
            failing = {t: last[t] for t, check in checks.items() if not check(last[t])}
            raise AssertionError(f"key panels without their data: {json.dumps(failing, indent=1)[:4000]}") from None

        # Every other query is accepted and evaluated by the real engine (an error is 400/422, not an empty answer).
        for _, expr in queries(dashboard):
            prometheus.query(render(expr, values))
        # The variables' values: what label_values(selector, label) lists in Grafana.
        for var in dashboard["templating"]["list"]:
            if var["type"] != "query":
                continue
            selector, label = label_values(var)
            answer = prometheus.get(f"/api/v1/label/{label}/values", **{"match[]": render(selector, values)})
            assert answer["status"] == "success", answer
            assert {"cluster": CLUSTER, "pool": POOL}[label] in answer["data"], (var["name"], answer)
    finally:
        prometheus.stop()


def test_kustomize_ships_the_dashboard_as_a_configmap_for_grafanas_sidecar() -> None:
    kubectl = require_tool("kubectl")
    out = subprocess.run([kubectl, "kustomize", str(DEPLOY)], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    (configmap,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "spotd-grafana-dashboard"]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["spotd.json"]) == load_dashboard()
