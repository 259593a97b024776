"""The metric alert rules: checked and unit-tested by a real promtool, and the PrometheusRule kept equal.

deploy/rules/spotd.rules.yml is the source; deploy/prometheusrule.yaml is generated from it (comments
included). To regenerate after editing the rules:  .venv/bin/python tests/test_alert_rules.py --write
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

try:
    from tests.alertmanager import require_tool
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from alertmanager import require_tool  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parent.parent
RULE_FILE = ROOT / "deploy" / "rules" / "spotd.rules.yml"
PROMETHEUS_RULE = ROOT / "deploy" / "prometheusrule.yaml"
UNIT_TESTS = sorted((ROOT / "tests" / "rules").glob("*.yml"))
DOCS = ROOT / "docs" / "alerts.md"
PUSHED_ALERTS = (
    "SpotInterruptionNotice",
    "NodeDrainIncomplete",
    "SpotCapacityUnavailable",
    "OnDemandFallbackActive",
    "OnDemandDrainBlocked",
)

HEADER = """\
# GENERATED from deploy/rules/spotd.rules.yml: edit that file, then run
#     .venv/bin/python tests/test_alert_rules.py --write
# A PrometheusRule for the Prometheus operator (CRD monitoring.coreos.com/v1). The operator loads only the
# rules its Prometheus' ruleSelector matches: kube-prometheus-stack selects `release: <its Helm release>`
# by default, so add that label (for example with a kustomize patch) if your selector asks for it.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: spotd
  namespace: spotd
  labels:
    app.kubernetes.io/name: spotd
    app.kubernetes.io/component: alerting
spec:
"""


def render_prometheus_rule(rule_text: str) -> str:
    """The PrometheusRule: HEADER, then the rule file indented under spec, comments and all."""
    body = "".join(f"  {line}" if line.strip() else line for line in rule_text.splitlines(keepends=True))
    return HEADER + body


def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    binary = require_tool("promtool")
    return subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def load_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(RULE_FILE.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def test_promtool_checks_the_rule_file() -> None:
    result = promtool("check", "rules", str(RULE_FILE))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(load_rules())} rules found" in result.stdout


def test_promtool_checks_the_prometheus_rule_spec(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yml"
    spec.write_text(yaml.safe_dump(yaml.safe_load(PROMETHEUS_RULE.read_text())["spec"]))
    result = promtool("check", "rules", str(spec))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass() -> None:
    assert UNIT_TESTS, "no promtool unit tests in tests/rules/"
    result = promtool("test", "rules", *(p.name for p in UNIT_TESTS), cwd=ROOT / "tests" / "rules")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAILED" not in result.stdout


def test_prometheus_rule_is_generated_from_the_rule_file() -> None:
    expected = render_prometheus_rule(RULE_FILE.read_text())
    assert PROMETHEUS_RULE.read_text() == expected, (
        "deploy/prometheusrule.yaml differs from deploy/rules/spotd.rules.yml: "
        "run .venv/bin/python tests/test_alert_rules.py --write"
    )
    resource = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert resource["apiVersion"] == "monitoring.coreos.com/v1" and resource["kind"] == "PrometheusRule"
    assert resource["metadata"]["name"] == "spotd" and resource["metadata"]["namespace"] == "spotd"
    assert resource["spec"] == yaml.safe_load(RULE_FILE.read_text())


def test_every_rule_has_severity_annotations_and_a_for() -> None:
    names = [rule["alert"] for rule in load_rules()]
    assert len(names) == len(set(names))
    for rule in load_rules():
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}, rule["alert"]
        assert {"summary", "description", "runbook"} <= set(rule["annotations"]), rule["alert"]
        assert "for" in rule, rule["alert"]
        assert rule["alert"].startswith("Spotd"), "metric alerts are named Spotd*: pushed ones are not"


def test_every_alert_is_unit_tested_firing_and_quiet() -> None:
    fired: set[str] = set()
    quiet: set[str] = set()
    for path in UNIT_TESTS:
        for group in yaml.safe_load(path.read_text())["tests"]:
            for case in group.get("alert_rule_test", []):
                (fired if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = {rule["alert"] for rule in load_rules()}
    assert names - fired == set(), "alerts never shown firing in tests/rules"
    assert names - quiet == set(), "alerts never shown quiet in tests/rules"


def test_docs_describe_every_alert() -> None:
    text = DOCS.read_text()
    missing = [name for name in (*PUSHED_ALERTS, *(r["alert"] for r in load_rules())) if name not in text]
    assert missing == []


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: tests/test_alert_rules.py --write   (regenerates deploy/prometheusrule.yaml)")
    PROMETHEUS_RULE.write_text(render_prometheus_rule(RULE_FILE.read_text()))
    print(f"wrote {PROMETHEUS_RULE.relative_to(ROOT)}")
