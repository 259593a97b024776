"""The Helm chart (charts/spotd), rendered and linted by a real helm built from its Go module (scripts/helm).

deploy/ is the source; the chart is the copy (docs/deployment.md, "Helm"). With default values the chart
renders exactly what deploy/kustomization.yaml renders, object by object; the rule file and the dashboard
the chart carries in files/ are byte copies of deploy/'s. After editing those two in deploy/ run
    .venv/bin/python tests/test_chart.py --write
Every values file of charts/spotd/ci passes `helm lint --strict` and `helm template`, and the RBAC it renders,
loaded into the fake API server, grants the agent, the controller and the `spotd status` group exactly what
deploy/ grants them, under the names that values file gives them.

Under CI=true nothing here skips: a machine that cannot build helm fails the test command.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from spotd.sim.kubeapi import FakeApiServer
from spotd.sim.kubeapi.auth import AUTHENTICATED, UserInfo
from spotd.sim.kubeapi.manifests import documents
from spotd.sim.kubeapi.rbac import RequestAttributes
from spotd.sim.kubeapi.resources import resource_for_kind

try:
    from tests.permissions import granted, group_member
except ImportError:  # run as a script: tests/ itself is on sys.path
    from permissions import granted, group_member  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
CHART = ROOT / "charts" / "spotd"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
OPTIONAL_DELETE = DEPLOY / "optional" / "agent-deadline-delete.yaml"
IN_CI = os.environ.get("CI", "").lower() == "true"
NAMESPACE = "spotd"
# deploy/ file -> the chart's copy of it (Helm reads only files inside the chart).
COPIES = {
    DEPLOY / "rules" / "spotd.rules.yml": CHART / "files" / "spotd.rules.yml",
    DEPLOY / "dashboards" / "spotd.json": CHART / "files" / "dashboards" / "spotd.json",
}

Doc = dict[str, Any]
Key = tuple[str, str, str]  # kind, namespace, name


# ---- helm ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """The helm command: the binary from scripts/test (SPOTD_HELM, built first with its progress shown),
    else built here by scripts/helm; its config, cache and data in a temporary directory."""
    if "SPOTD_HELM_STATUS" in os.environ:
        status, binary, detail = int(os.environ["SPOTD_HELM_STATUS"]), os.environ.get("SPOTD_HELM", ""), ""
    else:
        build = subprocess.run([str(ROOT / "scripts" / "helm")], capture_output=True, text=True, timeout=3600)
        status, binary, detail = build.returncode, (build.stdout.split() or [""])[-1], build.stderr[-3000:]
    if status != 0 or not binary:
        reason = f"scripts/helm exited {status}: {detail.strip() or 'see its output above'}"
        if status == 3 and not IN_CI:
            pytest.skip(reason)
        pytest.fail(reason)
    home = tmp_path_factory.mktemp("helm-home")
    for var in ("HELM_CONFIG_HOME", "HELM_CACHE_HOME", "HELM_DATA_HOME"):
        os.environ[var] = str(home / var.lower())
    yield [binary]


def run_helm(helm: list[str], *args: str) -> str:
    out = subprocess.run([*helm, *args], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, f"helm {' '.join(args)} exited {out.returncode}:\n{out.stderr}{out.stdout[-3000:]}"
    return out.stdout


def render(helm: list[str], *options: str, namespace: str = NAMESPACE) -> list[Doc]:
    """`helm template spotd charts/spotd --namespace NAMESPACE OPTIONS...` as objects."""
    text = run_helm(helm, "template", "spotd", str(CHART), "--namespace", namespace, *options)
    return [d for d in yaml.safe_load_all(text) if isinstance(d, dict)]


def deploy_objects(*paths: Path) -> list[Doc]:
    """What `kubectl apply -k deploy/` stores: the repository's loader (spotd/sim/kubeapi/manifests.py), plus
    the ConfigMaps of the kustomization's configMapGenerator, which the loader does not make. kustomize
    (and the loader) put the namespace on kinds it does not know to be cluster-scoped, such as
    ValidatingAdmissionPolicy; the API server drops it, and so does this."""
    objects = documents(list(paths) or [DEPLOY])
    if not paths:
        objects += generated_config_maps(DEPLOY)
    for obj in objects:
        try:
            namespaced = resource_for_kind(obj["kind"]).namespaced
        except KeyError:
            continue
        if not namespaced:
            obj["metadata"].pop("namespace", None)
    return objects


def generated_config_maps(directory: Path) -> list[Doc]:
    """The configMapGenerator entries as kustomize makes them, for the subset deploy/ uses (files, without
    the name's hash suffix, with labels); anything else fails here rather than being compared wrongly."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    labels = {k: v for entry in spec.get("labels") or [] for k, v in (entry.get("pairs") or {}).items()}
    made = []
    for entry in spec.get("configMapGenerator") or []:
        options = entry.get("options") or {}
        unsupported = (set(entry) - {"name", "files", "options"}) | (set(options) - {"disableNameSuffixHash", "labels"})
        assert not unsupported and options.get("disableNameSuffixHash"), f"configMapGenerator {entry}: not supported"
        data = {Path(f).name: (directory / f).read_text() for f in entry["files"]}
        meta = {
            "name": entry["name"],
            "namespace": spec["namespace"],
            "labels": {**options.get("labels", {}), **labels},
        }
        made.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})
    return made


def key(obj: Doc) -> Key:
    meta = obj.get("metadata") or {}
    return (obj["kind"], meta.get("namespace", ""), meta["name"])


def by_key(objects: list[Doc]) -> dict[Key, Doc]:
    found: dict[Key, Doc] = {}
    for obj in objects:
        assert key(obj) not in found, f"{key(obj)} twice"
        found[key(obj)] = obj
    return found


def differences(expected: Any, actual: Any, path: str = "") -> list[str]:
    """Where two parsed objects differ, one line per leaf ("" when equal)."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        lines = []
        for k in sorted(expected.keys() | actual.keys(), key=str):
            where = f"{path}.{k}"
            if k not in actual:
                lines.append(f"{where}: missing from the chart (deploy/: {expected[k]!r})")
            elif k not in expected:
                lines.append(f"{where}: only in the chart ({actual[k]!r})")
            else:
                lines.extend(differences(expected[k], actual[k], where))
        return lines
    if isinstance(expected, list) and isinstance(actual, list) and len(expected) == len(actual):
        return [
            line
            for i, (e, a) in enumerate(zip(expected, actual, strict=True))
            for line in differences(e, a, f"{path}[{i}]")
        ]
    return [] if expected == actual else [f"{path}: deploy/ {expected!r}, chart {actual!r}"]


# Helm's own annotation, the one difference allowed: the Namespace holds the release's records, so
# `helm uninstall` must keep it (tests/test_chart.py's real install saw the uninstall fail without it).
HELM_KEEP = {"helm.sh/resource-policy": "keep"}


def without_helm_keep(obj: Doc) -> Doc:
    meta = obj.get("metadata") or {}
    if obj.get("kind") != "Namespace" or meta.get("annotations") != HELM_KEEP:
        return obj
    return {**obj, "metadata": {k: v for k, v in meta.items() if k != "annotations"}}


def drift(deploy: list[Doc], chart: list[Doc]) -> list[str]:
    """Every difference between deploy/'s objects and the chart's, object by object (the Namespace's
    helm.sh/resource-policy aside)."""
    want, got = by_key(deploy), by_key([without_helm_keep(o) for o in chart])
    lines = [f"{k}: in deploy/, not rendered by the chart" for k in sorted(want.keys() - got.keys())]
    lines += [f"{k}: rendered by the chart, not in deploy/" for k in sorted(got.keys() - want.keys())]
    for k in sorted(want.keys() & got.keys()):
        lines += [f"{k}{line}" for line in differences(want[k], got[k])]
    return lines


def workload(objects: list[Doc], kind: str) -> Doc:
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


def container(obj: Doc) -> Doc:
    (found,) = obj["spec"]["template"]["spec"]["containers"]
    return found


# ---- deploy/ and the default render ----------------------------------------------------------------------


def test_copies_in_the_chart_are_deploys_files() -> None:
    for source, copy_ in COPIES.items():
        assert copy_.read_bytes() == source.read_bytes(), (
            f"{copy_.relative_to(ROOT)} differs from {source.relative_to(ROOT)}: "
            "run .venv/bin/python tests/test_chart.py --write"
        )


def test_default_values_render_deploy(helm: list[str]) -> None:
    """deploy/ never drifts from the chart: `helm template` with the defaults is `kubectl kustomize deploy/`."""
    found = drift(deploy_objects(), render(helm))
    assert not found, "the chart's default render differs from deploy/:\n" + "\n".join(found)


def test_drift_names_each_difference(helm: list[str]) -> None:
    """The comparison above sees a one-word change, a missing object and an extra one."""
    chart = render(helm)
    deploy = deploy_objects()
    assert drift(deploy, chart) == []
    changed = copy.deepcopy(chart)
    role = next(o for o in changed if key(o) == ("ClusterRole", "", "spotd-agent"))
    role["rules"][0]["verbs"].append("update")
    assert drift(deploy, changed) == [
        "('ClusterRole', '', 'spotd-agent').rules[0].verbs: deploy/ ['get', 'watch', 'patch'], "
        "chart ['get', 'watch', 'patch', 'update']"
    ]
    without_pdb = [o for o in chart if o["kind"] != "PodDisruptionBudget"]
    assert drift(deploy, without_pdb) == [
        "('PodDisruptionBudget', 'spotd', 'spotd-controller'): in deploy/, not rendered by the chart"
    ]
    extra = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x", "namespace": "spotd"}}
    assert drift(deploy, [*chart, extra]) == ["('ConfigMap', 'spotd', 'x'): rendered by the chart, not in deploy/"]


def test_deadline_delete_renders_the_optional_file(helm: list[str]) -> None:
    """agent.deadlineDelete adds deploy/optional/agent-deadline-delete.yaml and the agent's flag, nothing else."""
    default = by_key(render(helm))
    enabled = by_key(render(helm, "--set", "agent.deadlineDelete.enabled=true"))
    added = [enabled[k] for k in enabled.keys() - default.keys()]
    assert drift(deploy_objects(OPTIONAL_DELETE), added) == []
    changed = [k for k in default.keys() & enabled.keys() if default[k] != enabled[k]]
    assert changed == [("DaemonSet", NAMESPACE, "spotd-agent")]
    args = container(enabled[changed[0]])["args"]
    assert args == [*container(default[changed[0]])["args"], "--deadline-action=delete"]


def test_dashboard_config_map_carries_deploys_dashboard(helm: list[str]) -> None:
    """The dashboard is deploy/'s file, byte for byte, where the values put it."""
    objects = render(helm, "--set", "grafanaDashboard.namespace=monitoring")
    config_map = by_key(objects)[("ConfigMap", "monitoring", "spotd-grafana-dashboard")]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["data"]["spotd.json"] == (DEPLOY / "dashboards" / "spotd.json").read_text()


# ---- every values file of charts/spotd/ci ----------------------------------------------------------------


@pytest.fixture(params=CI_VALUES, ids=[p.name for p in CI_VALUES])
def values_file(request: pytest.FixtureRequest) -> Path:
    return Path(request.param)


def values_of(path: Path) -> Doc:
    return yaml.safe_load(path.read_text()) or {}


def test_lint(helm: list[str], values_file: Path) -> None:
    out = run_helm(helm, "lint", "--strict", str(CHART), "--namespace", NAMESPACE, "-f", str(values_file))
    assert "1 chart(s) linted, 0 chart(s) failed" in out, out


def test_schema_refuses_a_misspelt_value(helm: list[str]) -> None:
    """A misspelt value is refused, as argparse refuses a misspelt flag: not silently ignored."""
    out = subprocess.run(
        [*helm, "template", "spotd", str(CHART), "--set", "controller.sqsQueueURL=https://x"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode != 0 and "sqsQueueURL" in out.stderr, out.stderr


def test_service_account_not_created_needs_a_name(helm: list[str]) -> None:
    """Fail closed: without a name the RBAC would be bound to the namespace's "default" ServiceAccount."""
    out = subprocess.run(
        [*helm, "template", "spotd", str(CHART), "--set", "agent.serviceAccount.create=false"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode != 0 and "agent.serviceAccount.name is required" in out.stderr, out.stderr


def test_admission_policies_match_the_agents_service_account(helm: list[str], values_file: Path) -> None:
    """Each policy's matchCondition names the agent's identity as rendered: a policy that matched another
    name would hold nothing. Checked in another namespace too."""
    for namespace in (NAMESPACE, "node-lifecycle"):
        objects = render(helm, "-f", str(values_file), namespace=namespace)
        account = workload(objects, "DaemonSet")["spec"]["template"]["spec"]["serviceAccountName"]
        username = f"system:serviceaccount:{namespace}:{account}"
        for policy in (o for o in objects if o["kind"] == "ValidatingAdmissionPolicy"):
            (condition,) = policy["spec"]["matchConditions"]
            assert condition["expression"].endswith(f"request.userInfo.username == '{username}'"), policy


def test_values_reach_the_workloads(helm: list[str], values_file: Path) -> None:
    """What each values file sets shows in the objects (args, env, image, ServiceAccounts)."""
    values = values_of(values_file)
    objects = render(helm, "-f", str(values_file))
    agent, controller = workload(objects, "DaemonSet"), workload(objects, "Deployment")
    for obj, part in ((agent, "agent"), (controller, "controller")):
        spec = obj["spec"]["template"]["spec"]
        c = container(obj)
        own = values.get(part, {})
        for arg in own.get("extraArgs", []):
            assert arg in c["args"]
        for env in own.get("extraEnv", []):
            assert env in c["env"]
        image = own.get("image", {})
        if image.get("digest"):
            assert c["image"] == f"{image['repository']}@{image['digest']}"
        account = own.get("serviceAccount", {})
        if account.get("name"):
            assert spec["serviceAccountName"] == account["name"]
        if account.get("create", True):
            (sa,) = [
                o
                for o in objects
                if o["kind"] == "ServiceAccount" and o["metadata"]["name"] == spec["serviceAccountName"]
            ]
            assert (sa["metadata"].get("annotations") or {}) == account.get(
                "annotations",
                {"eks.amazonaws.com/role-arn": "arn:aws:iam::111122223333:role/spotd-controller"}
                if part == "controller"
                else {},
            )
        else:
            assert not [o for o in objects if o["kind"] == "ServiceAccount"]
    env = {e["name"]: e.get("value") for e in container(controller)["env"]}
    if "sqsQueueUrl" in values.get("controller", {}):
        assert env.get("SPOTD_SQS_QUEUE_URL") == (values["controller"]["sqsQueueUrl"] or None)
    if values.get("controller", {}).get("fallbackAsgTag"):
        assert f"--fallback-asg-tag={values['controller']['fallbackAsgTag']}" in container(controller)["args"]
    lease = next(a.split("=", 1)[1] for a in container(controller)["args"] if a.startswith("--lease-name="))
    assert lease == values.get("controller", {}).get("leaseName", "spotd-controller")


# ---- RBAC: what each identity may do, as the fake API server's authorizer decides -------------------------

VERBS = ("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection")


def identities(objects: list[Doc], namespace: str) -> dict[str, UserInfo]:
    """The agent's and the controller's ServiceAccounts as the workloads name them, and a member of each
    group the status role is bound to (deploy/: spotd-status)."""
    found = {}
    for kind, part in (("DaemonSet", "agent"), ("Deployment", "controller")):
        account = workload(objects, kind)["spec"]["template"]["spec"]["serviceAccountName"]
        found[part] = UserInfo(f"system:serviceaccount:{namespace}:{account}", groups=(AUTHENTICATED,))
    groups = sorted(
        {
            s["name"]
            for o in objects
            if o["kind"] in ("ClusterRoleBinding", "RoleBinding")
            for s in o.get("subjects") or []
            if s["kind"] == "Group"
        }
    )
    for group in groups:
        found[f"status:{group}"] = UserInfo(f"member-of-{group}", groups=(group, AUTHENTICATED))
    return found


def access(objects: list[Doc], user: UserInfo, names: dict[str, str], namespace: str) -> set[tuple[str, ...]]:
    """Every (verb, group, resource, namespace, name) the user may do, over the resources and names any of
    the roles mention, in the release namespace, another one and at the cluster scope: loaded into a
    FakeApiServer and asked of its RBAC authorizer. `names` maps a resource name to how it is spelt in
    `objects` (the lease name a values file changes); the answer uses the first spelling."""
    api = FakeApiServer()
    api.load_manifests([write_manifests(objects)])
    rules = [r for o in objects if o["kind"] in ("Role", "ClusterRole") for r in o.get("rules") or []]
    resources = {(g, r) for rule in rules for g in rule.get("apiGroups", []) for r in rule.get("resources", [])}
    resources |= {("", "pods"), ("", "nodes"), ("", "secrets"), ("", "configmaps"), ("coordination.k8s.io", "leases")}
    allowed: set[tuple[str, ...]] = set()
    for group, resource in resources:
        base, _, sub = resource.partition("/")
        for verb in VERBS:
            for where in (namespace, "elsewhere", ""):
                for name in ["", "anything", *names]:
                    attrs = RequestAttributes(verb, True, group, "v1", base, sub, names.get(name, name), where)
                    if api.authorizer.allows(user, attrs):
                        allowed.add((verb, group, resource, "release" if where == namespace else where, name))
    return allowed


_written: list[Path] = []


def write_manifests(objects: list[Doc]) -> Path:
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"spotd-chart-{os.getpid()}-{len(_written)}.yaml"
    path.write_text(yaml.safe_dump_all(objects))
    _written.append(path)
    return path


@pytest.fixture(autouse=True, scope="module")
def _remove_written() -> Iterator[None]:
    yield
    for path in _written:
        path.unlink(missing_ok=True)


def test_rbac_grants_what_deploy_grants(helm: list[str], values_file: Path) -> None:
    """The rendered RBAC, loaded into a fake API server, lets the agent, the controller and the status group
    do exactly what deploy/ (and deploy/optional/agent-deadline-delete.yaml when the values enable it) lets
    them do; nothing with rbac.create false."""
    values = values_of(values_file)
    deploy = deploy_objects()
    if values.get("agent", {}).get("deadlineDelete", {}).get("enabled"):
        deploy += deploy_objects(OPTIONAL_DELETE)
    chart = render(helm, "-f", str(values_file))
    want_users, got_users = identities(deploy, NAMESPACE), identities(chart, NAMESPACE)
    lease = values.get("controller", {}).get("leaseName", "spotd-controller")
    rbac_created = values.get("rbac", {}).get("create", True)
    groups = values.get("statusRbac", {}).get("groups", ["spotd-status"])
    status_created = rbac_created and values.get("statusRbac", {}).get("create", True)
    assert sorted(got_users) == sorted(["agent", "controller", *(f"status:{g}" for g in groups if status_created)])
    # Every name a rule of deploy/ grants by name (the Leases, cluster-autoscaler's ConfigMaps).
    names = {
        n: n
        for o in deploy
        if o["kind"] in ("Role", "ClusterRole")
        for r in o["rules"]
        for n in r.get("resourceNames", [])
    }
    for who, got_user in got_users.items():
        want_user = want_users["status:spotd-status" if who.startswith("status:") else who]
        want = access(deploy, want_user, names, NAMESPACE) if rbac_created else set()
        got = access(chart, got_user, {**names, "spotd-controller": lease}, NAMESPACE)
        assert want or not rbac_created, f"deploy/ grants {want_user.username} nothing: the test would prove nothing"
        assert got == want, (
            f"{who} ({got_user.username}) as rendered from {values_file.name}:\n"
            f"  granted by the chart only: {sorted(got - want)}\n  granted by deploy/ only: {sorted(want - got)}"
        )
    if not rbac_created:
        assert not [o for o in chart if o["kind"] in ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")]
        return
    # The same, as tests/permissions.py reads the grants (per identity, verb and resource; no resourceNames).
    deploy_user = {"agent": want_users["agent"].username, "controller": want_users["controller"].username}
    expected = set()
    deploy_grants = granted([write_manifests(deploy)])
    for who, got_user in got_users.items():
        source = deploy_user.get(who, group_member("spotd-status"))
        chart_name = got_user.username if who in deploy_user else group_member(who.removeprefix("status:"))
        expected |= {(chart_name, *g[1:5]) for g in deploy_grants if g.username == source}
    actual = {tuple(g[:5]) for g in granted([write_manifests(chart)])}
    assert actual == expected


# ---- install and upgrade on the real control plane ---------------------------------------------------------

# A release beside deploy/'s (the session's cluster has deploy/ applied): its own namespace and names, and
# agent port 9111 (a host port with hostNetwork: deploy/'s agent holds 9101 on every node).
RELEASE, RELEASE_NAMESPACE = "helm-spotd", "spotd-helm"
REAL_NODES = ("helm-spot-1", "helm-spot-2")
HELM_NODE_LABEL = "spotd-test/helm-release"


def pods_running(real: Any, selector: str, want: int) -> list[Doc]:
    """The release's pods of one component once `want` of them run, are ready and no other is left."""
    found: list[Doc] = []

    def check() -> bool:
        status, body = real.request(
            "GET", f"/api/v1/namespaces/{RELEASE_NAMESPACE}/pods?labelSelector=app.kubernetes.io/component%3D{selector}"
        )
        pods = [p for p in body["items"] if not p["metadata"].get("deletionTimestamp")] if status == 200 else []
        ready = [
            p
            for p in pods
            if p["status"].get("phase") == "Running"
            and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions") or [])
        ]
        found[:] = ready
        return len(ready) == len(pods) == want

    real.wait_for(check, timeout=120)
    return found


def workloads_settled(real: Any, generation_of: dict[str, int]) -> tuple[Doc, Doc]:
    """The DaemonSet and the Deployment once their controllers have acted on the latest spec and every pod
    they want is updated and ready."""
    base = f"/apis/apps/v1/namespaces/{RELEASE_NAMESPACE}"
    seen: dict[str, Doc] = {}

    def check() -> bool:
        _, ds = real.request("GET", f"{base}/daemonsets/{RELEASE}-agent")
        _, dep = real.request("GET", f"{base}/deployments/{RELEASE}-controller")
        seen.update(ds=ds, dep=dep)
        ds_status, dep_status = ds.get("status") or {}, dep.get("status") or {}
        return (
            ds_status.get("observedGeneration") == ds["metadata"]["generation"] > generation_of.get("ds", 0)
            and ds_status.get("desiredNumberScheduled", 0) >= len(REAL_NODES)
            and ds_status.get("numberReady")
            == ds_status.get("updatedNumberScheduled")
            == ds_status.get("desiredNumberScheduled")
            and dep_status.get("observedGeneration") == dep["metadata"]["generation"] > generation_of.get("dep", 0)
            and dep_status.get("readyReplicas") == dep_status.get("updatedReplicas") == dep["spec"]["replicas"]
            and dep_status.get("replicas") == dep["spec"]["replicas"]
        )

    real.wait_for(check, timeout=120)
    return seen["ds"], seen["dep"]


def node_write(real: Any, node: str, token: str) -> tuple[int, str]:
    """A server-side dry-run cordon of `node` as `token`: (200, '') admitted, else (403, the message): refused
    by RBAC, or by an admission policy when the message names one (the policies' reason is Forbidden)."""
    status, body = real.request(
        "PATCH",
        f"/api/v1/nodes/{node}?dryRun=All",
        {"spec": {"unschedulable": True}},
        token=token,
        content_type="application/merge-patch+json",
    )
    return status, (str(body.get("message", "")) if isinstance(body, dict) and status != 200 else "")


def refused_by_own_node_policy(status: int, message: str) -> bool:
    return status == 403 and "-agent-own-node' with binding" in message


def check_identities(real: Any, agents: int, agent_account: str, controller_account: str) -> None:
    """The rendered RBAC and admission policies at work on the real server: the agent's pod-bound token may
    cordon its own node and no other (the policy names this account), the controller's may list nodes but
    not Leases (its Role names its own), neither may read Secrets."""
    (pod,) = [p for p in pods_running(real, "agent", agents) if p["spec"]["nodeName"] == REAL_NODES[0]]
    assert pod["spec"]["serviceAccountName"] == agent_account
    agent = real.service_account_token(RELEASE_NAMESPACE, agent_account, bound_pod=pod)
    # The API server loads a new policy from its informer a moment after the write: wait until it holds.
    real.wait_for(lambda: refused_by_own_node_policy(*node_write(real, REAL_NODES[1], agent)))
    assert node_write(real, REAL_NODES[0], agent) == (200, "")
    controller = real.service_account_token(RELEASE_NAMESPACE, controller_account)
    assert real.request("GET", "/api/v1/nodes", token=controller)[0] == 200
    lease_path = f"/apis/coordination.k8s.io/v1/namespaces/{RELEASE_NAMESPACE}/leases"
    assert real.request("GET", f"{lease_path}?limit=1", token=controller)[0] == 403  # get by name only
    for token in (agent, controller):
        assert real.request("GET", f"/api/v1/namespaces/{RELEASE_NAMESPACE}/secrets", token=token)[0] == 403


@pytest.mark.timeout(900)  # the session's control plane may start here; each wait has its own limit
def test_install_then_upgrade_on_the_real_control_plane(helm: list[str], real_cluster: Any) -> None:
    """`helm install` then `helm upgrade` with other ServiceAccount names and controller flags: the real
    DaemonSet and Deployment controllers, scheduler and kwok run every pod, and the RBAC and admission
    policies follow the accounts; `helm uninstall` leaves nothing of the release."""
    from spotd.sim import builders
    from tests.realcluster import KWOK_ANNOTATION

    real = real_cluster
    for name in REAL_NODES:
        if real.request("GET", f"/api/v1/nodes/{name}")[0] == 404:
            node = builders.node(name, builders.SPOT)
            node["metadata"].setdefault("annotations", {})[KWOK_ANNOTATION] = "fake"
            node["metadata"].setdefault("labels", {})[HELM_NODE_LABEL] = "true"
            assert real.request("POST", "/api/v1/nodes", node)[0] == 201
    kubeconfig = str(real.work / "admin.kubeconfig")
    # The release's agents on this test's nodes only: the session's cluster holds other files' nodes, some too
    # small for one more pod, and a DaemonSet pod that never runs there would keep the rollout from settling
    selector = json.dumps({"kubernetes.io/os": "linux", HELM_NODE_LABEL: "true"})
    common = [
        *("--namespace", RELEASE_NAMESPACE, "--kubeconfig", kubeconfig, "--set", "agent.port=9111"),
        *("--set-json", f"agent.nodeSelector={selector}"),
    ]
    run_helm(helm, "install", RELEASE, str(CHART), "--create-namespace", *common)
    try:
        ds, dep = workloads_settled(real, {})
        # Another release's placeholder class: the controller is told its name.
        assert container(dep)["args"][-1] == f"--placeholder-priority-class={RELEASE}-placeholder"
        assert real.request("GET", f"/apis/scheduling.k8s.io/v1/priorityclasses/{RELEASE}-placeholder")[0] == 200
        pods_running(real, "controller", 2)
        check_identities(real, ds["status"]["desiredNumberScheduled"], f"{RELEASE}-agent", f"{RELEASE}-controller")
        status, ns = real.request("GET", f"/api/v1/namespaces/{RELEASE_NAMESPACE}")
        assert status == 200, ns
        assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged", ns

        run_helm(
            helm,
            "upgrade",
            RELEASE,
            str(CHART),
            *common,
            "--set",
            "agent.serviceAccount.name=node-lifecycle-agent",
            "--set",
            "controller.serviceAccount.name=node-lifecycle-controller",
            "--set-json",
            'controller.extraArgs=["--max-drains-per-hour=3"]',
        )
        generations = {"ds": ds["metadata"]["generation"], "dep": dep["metadata"]["generation"]}
        ds, dep = workloads_settled(real, generations)
        assert container(dep)["args"][-1] == "--max-drains-per-hour=3"
        for pod in pods_running(real, "controller", 2):
            assert pod["spec"]["serviceAccountName"] == "node-lifecycle-controller"
        agents = ds["status"]["desiredNumberScheduled"]
        check_identities(real, agents, "node-lifecycle-agent", "node-lifecycle-controller")
        accounts = f"/api/v1/namespaces/{RELEASE_NAMESPACE}/serviceaccounts"
        assert real.request("GET", f"{accounts}/{RELEASE}-agent")[0] == 404  # the old ones are gone
    finally:
        run_helm(helm, "uninstall", RELEASE, "--namespace", RELEASE_NAMESPACE, "--kubeconfig", kubeconfig, "--wait")
        # Kept by the uninstall (helm.sh/resource-policy), as a namespace from --create-namespace would be.
        status, ns = real.request("GET", f"/api/v1/namespaces/{RELEASE_NAMESPACE}")
        real.request("DELETE", f"/api/v1/namespaces/{RELEASE_NAMESPACE}")
    assert status == 200 and not ns["metadata"].get("deletionTimestamp"), ns
    for path in (
        f"/apis/rbac.authorization.k8s.io/v1/clusterroles/{RELEASE}-agent",
        f"/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicies/{RELEASE}-agent-own-node",
        f"/apis/scheduling.k8s.io/v1/priorityclasses/{RELEASE}-placeholder",
    ):
        assert real.request("GET", path)[0] == 404, path


# ---- the copies ------------------------------------------------------------------------------------------


def write_copies() -> None:
    for source, copy_ in COPIES.items():
        copy_.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, copy_)
        print(f"wrote {copy_.relative_to(ROOT)}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(f"usage: {sys.argv[0]} --write   (copies {', '.join(str(s.relative_to(ROOT)) for s in COPIES)})")
    write_copies()
