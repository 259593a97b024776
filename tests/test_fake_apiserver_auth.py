"""The fake API server's security half: bearer tokens to identities, RBAC from the roles in its store
(deploy/ applied as the README says), the access log, the admission hook point and the PDB status lag;
over real sockets with lightkube, kubectl and plain HTTP."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from lightkube import AsyncClient, KubeConfig
from lightkube.core.exceptions import ApiError as ClientApiError
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.coordination_v1 import Lease
from lightkube.resources.core_v1 import Node, Pod
from lightkube.types import PatchType

from spotd.sim.kubeapi import auth
from spotd.sim.kubeapi.auth import AdmissionAttributes
from spotd.sim.kubeapi.errors import ApiError
from spotd.sim.kubeapi.rbac import AccessRecord, RequestAttributes, request_attributes
from spotd.sim.kubeapi.server import ADMIN_TOKEN, FakeApiServer
from tests.permissions import Grant, compare, granted, read_records, write_records

RA = RequestAttributes
DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl not installed")
CONTROLLER = "system:serviceaccount:spotd:spotd-controller"
AGENT = "system:serviceaccount:spotd:spotd-agent"


def node(name: str) -> dict[str, Any]:
    """Ready: its kubelet ends the graceful deletions of its pods."""
    status = {"conditions": [{"type": "Ready", "status": "True"}]}
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}, "status": status}


def pod(name: str, node_name: str = "node-a", labels: dict[str, str] | None = None, ready: bool = True) -> Any:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": labels or {}},
        "spec": {"nodeName": node_name, "containers": [{"name": "app", "image": "busybox"}]},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


async def until(condition: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    # report_access=False: these tests provoke denials for spotd's identities on purpose, which the
    # session-wide permission check would count as permissions the code lacks
    server = FakeApiServer(termination_scale=0.01, report_access=False)
    await server.start()
    server.load_manifests([DEPLOY])
    server.create(node("node-a"))
    server.create(node("node-b"))
    try:
        yield server
    finally:
        await server.stop()


def client_for(api: FakeApiServer, tmp_path: Path, token: str | None, name: str = "kubeconfig") -> AsyncClient:
    path = api.write_kubeconfig(tmp_path / name, token=token)
    return AsyncClient(config=KubeConfig.from_file(str(path)), trust_env=False)


async def http(api: FakeApiServer, method: str, path: str, token: str | None = ADMIN_TOKEN, body: Any = None) -> Any:
    import aiohttp

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=False)) as session:
        async with session.request(method, api.url + path, headers=headers, json=body) as resp:
            text = await resp.text()
            return resp.status, (json.loads(text) if text.startswith("{") else text)


# ---- authentication ------------------------------------------------------------------------------------


async def test_missing_or_unknown_token_is_401_except_health(api: FakeApiServer) -> None:
    for token in (None, "nope"):
        status, body = await http(api, "GET", "/api/v1/pods", token=token)
        assert status == 401 and body["reason"] == "Unauthorized" and body["kind"] == "Status"
    assert (await http(api, "GET", "/readyz", token=None))[0] == 200
    assert (await http(api, "GET", "/version", token=None))[0] == 200
    assert (await http(api, "GET", "/version", token="nope"))[0] == 401  # a bad credential is refused anyway


async def test_service_account_token_identity(api: FakeApiServer) -> None:
    agent = api.user_for(api.service_account_token("spotd", "spotd-agent", node_name="node-a", pod_name="agent-x"))
    assert agent is not None and agent.username == AGENT
    assert agent.groups == ("system:serviceaccounts", "system:serviceaccounts:spotd", "system:authenticated")
    assert agent.extra["authentication.kubernetes.io/node-name"] == ("node-a",)
    node_a = api.get("Node", "node-a")
    assert node_a is not None and agent.extra["authentication.kubernetes.io/node-uid"] == (node_a["metadata"]["uid"],)
    assert agent.extra["authentication.kubernetes.io/pod-name"] == ("agent-x",)
    assert agent.extra["authentication.kubernetes.io/credential-id"][0].startswith("JTI=")
    account = api.get("ServiceAccount", "spotd-agent", "spotd")  # deploy/rbac.yaml created it
    assert account is not None and agent.uid == account["metadata"]["uid"]
    unbound = api.user_for(api.service_account_token("spotd", "spotd-controller"))
    assert unbound is not None and unbound.username == CONTROLLER and not any("node" in k for k in unbound.extra)
    api.add_token("t-alice", "alice", groups=("devs", "system:authenticated"), extra={"team": ["a"]})
    alice = api.user_for("t-alice")
    assert alice is not None and alice.groups == ("devs", "system:authenticated") and alice.extra["team"] == ("a",)


# ---- authorization -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "query", "expected"),
    [
        ("GET", "/api/v1/pods", {}, RA("list", True, "", "v1", "pods")),
        ("GET", "/api/v1/pods", {"watch": "true"}, RA("watch", True, "", "v1", "pods")),
        ("GET", "/api/v1/watch/namespaces/d/pods", {}, RA("watch", True, "", "v1", "pods", namespace="d")),
        ("GET", "/api/v1/namespaces/d/pods/x", {}, RA("get", True, "", "v1", "pods", "", "x", "d")),
        ("PUT", "/api/v1/nodes/n/status", {}, RA("update", True, "", "v1", "nodes", "status", "n")),
        ("PATCH", "/api/v1/nodes/n", {}, RA("patch", True, "", "v1", "nodes", "", "n")),
        ("DELETE", "/api/v1/namespaces/d/pods", {}, RA("deletecollection", True, "", "v1", "pods", namespace="d")),
        ("DELETE", "/api/v1/namespaces/d/pods/x", {}, RA("delete", True, "", "v1", "pods", "", "x", "d")),
        ("POST", "/api/v1/namespaces/d/pods/x/eviction", {},
         RA("create", True, "", "v1", "pods", "eviction", "x", "d")),
        ("POST", "/apis/coordination.k8s.io/v1/namespaces/s/leases", {},
         RA("create", True, "coordination.k8s.io", "v1", "leases", namespace="s")),
        # list/watch with an exact metadata.name field selector are authorized against that name
        ("GET", "/apis/coordination.k8s.io/v1/namespaces/s/leases", {"fieldSelector": "metadata.name=l", "watch": "1"},
         RA("watch", True, "coordination.k8s.io", "v1", "leases", "", "l", "s")),
        ("GET", "/api/v1/namespaces/s", {}, RA("get", True, "", "v1", "namespaces", "", "s", "s")),
        ("GET", "/apis", {}, RA("get", False, path="/apis")),
        ("GET", "/api/v1", {}, RA("get", False, path="/api/v1")),
    ],
)  # fmt: skip
def test_request_attributes(method: str, path: str, query: dict[str, str], expected: RequestAttributes) -> None:
    assert request_attributes(method, path, query) == expected


async def test_controller_cannot_delete_pods_but_may_evict(api: FakeApiServer, tmp_path: Path) -> None:
    api.create(pod("x"))
    client = client_for(api, tmp_path, api.service_account_token("spotd", "spotd-controller"))
    try:
        assert [p.metadata.name async for p in client.list(Pod, namespace="*")] == ["x"]  # type: ignore[union-attr]
        with pytest.raises(ClientApiError) as denied:
            await client.delete(Pod, "x", namespace="default")
        status = denied.value.status
        assert status.code == 403 and status.reason == "Forbidden"
        assert status.message == (
            'pods "x" is forbidden: User "system:serviceaccount:spotd:spotd-controller" cannot delete resource '
            '"pods" in API group "" in the namespace "default"'
        )
        assert status.details is not None and (status.details.name, status.details.kind) == ("x", "pods")
        eviction = Pod.Eviction(metadata=ObjectMeta(name="x", namespace="default"))
        await client.create(eviction, name="x", namespace="default")
        with pytest.raises(ClientApiError) as cluster_scope:
            await client.create(Node(metadata=ObjectMeta(name="n9")))
        assert cluster_scope.value.status.message == (
            f'nodes is forbidden: User "{CONTROLLER}" cannot create resource "nodes" in API group "" '
            "at the cluster scope"
        )
    finally:
        await client.close()
    assert AccessRecord(CONTROLLER, "delete", "", "pods", "", "default", False) in api.access_log
    assert AccessRecord(CONTROLLER, "create", "", "pods", "eviction", "default", True) in api.access_log
    assert AccessRecord(CONTROLLER, "list", "", "pods", "", "", True) in api.access_log


async def test_agent_subresources_and_the_lease_role(api: FakeApiServer, tmp_path: Path) -> None:
    agent = client_for(api, tmp_path, api.service_account_token("spotd", "spotd-agent", node_name="node-a"), "a")
    controller = client_for(api, tmp_path, api.service_account_token("spotd", "spotd-controller"), "c")
    try:
        await agent.patch(Node, "node-a", {"spec": {"unschedulable": True}}, patch_type=PatchType.MERGE)
        with pytest.raises(ClientApiError) as status_patch:  # nodes does not grant nodes/status
            await agent.patch(Node.Status, "node-a", {"status": {}}, patch_type=PatchType.MERGE)
        assert 'cannot patch resource "nodes/status"' in str(status_patch.value.status.message)
        with pytest.raises(ClientApiError):  # the agent has no lease rights at all
            await agent.get(Lease, "spotd-controller", namespace="spotd")

        lease = Lease(metadata=ObjectMeta(name="spotd-controller", namespace="spotd"))
        await controller.create(lease)  # create: not restricted by resourceNames, in spotd only
        await controller.get(Lease, "spotd-controller", namespace="spotd")
        api.create(
            {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": "other", "namespace": "spotd"},
            }
        )
        for denied in (
            controller.get(Lease, "other", namespace="spotd"),  # resourceNames
            controller.create(Lease(metadata=ObjectMeta(name="spotd-controller", namespace="default"))),  # Role scope
        ):
            with pytest.raises(ClientApiError) as refused:
                await denied
            assert refused.value.status.code == 403
        with pytest.raises(ClientApiError):  # a list cannot be allowed by resourceNames without the name selector
            [lease async for lease in controller.list(Lease, namespace="spotd")]
    finally:
        await agent.close()
        await controller.close()


async def test_resource_names_allow_list_and_watch_of_one_name(api: FakeApiServer) -> None:
    api.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "mine", "namespace": "default"}})
    api.create({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "one", "namespace": "default"},
        "rules": [{"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["mine"],
                   "verbs": ["get", "list", "watch"]}],
    })  # fmt: skip
    api.create({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "one", "namespace": "default"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "one"},
        "subjects": [{"kind": "User", "name": "bob"}],
    })  # fmt: skip
    api.add_token("t-bob", "bob", groups=("system:authenticated",))
    base = "/api/v1/namespaces/default/configmaps"
    assert (await http(api, "GET", base + "/mine", "t-bob"))[0] == 200
    assert (await http(api, "GET", base + "?fieldSelector=metadata.name%3Dmine", "t-bob"))[0] == 200
    assert (await http(api, "GET", base, "t-bob"))[0] == 403
    assert (await http(api, "GET", base + "/theirs", "t-bob"))[0] == 403
    assert (await http(api, "GET", "/api/v1/namespaces/kube-system/configmaps/mine", "t-bob"))[0] == 403


async def test_discovery_for_everyone_authenticated_and_other_paths_forbidden(api: FakeApiServer) -> None:
    token = api.service_account_token("spotd", "spotd-agent")
    for path in ("/api", "/api/v1", "/apis", "/apis/policy/v1", "/version"):
        assert (await http(api, "GET", path, token))[0] == 200, path
    status, body = await http(api, "GET", "/metrics", token)
    assert status == 403 and body["message"] == f'forbidden: User "{AGENT}" cannot get path "/metrics"'
    assert AccessRecord(AGENT, "get", "", "/apis", "", "", True) in api.access_log


async def test_access_sinks_collect_across_servers() -> None:
    sink: set[AccessRecord] = set()
    FakeApiServer.access_sinks.append(sink)
    reporting, quiet = FakeApiServer(), FakeApiServer(report_access=False)
    try:
        for server in (reporting, quiet):
            await server.start()
            await http(server, "GET", "/api/v1/nodes")
        assert sink == {AccessRecord("kubernetes-admin", "list", "", "nodes", "", "", True)}
        assert quiet.access_log == sink
    finally:
        # By identity: list.remove compares sets by value, and the session's own sink holds exactly this
        # record when this test runs first (random order), so remove() took the session's sink instead.
        FakeApiServer.access_sinks[:] = [s for s in FakeApiServer.access_sinks if s is not sink]
        await reporting.stop()
        await quiet.stop()


async def test_lightkube_sends_its_token_over_plain_http(tmp_path: Path) -> None:
    server = FakeApiServer(tls=False, report_access=False)  # a denial on purpose: not the suite's record
    await server.start()
    client = client_for(server, tmp_path, server.service_account_token("spotd", "spotd-agent"))
    try:
        with pytest.raises(ClientApiError) as denied:  # no roles loaded: authenticated, but forbidden
            await client.get(Node, "node-a")
        assert denied.value.status.code == 403
    finally:
        await client.close()
        await server.stop()


async def test_self_subject_access_review(api: FakeApiServer) -> None:
    token = api.service_account_token("spotd", "spotd-controller")
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectAccessReview",
        "spec": {"resourceAttributes": {"verb": "delete", "resource": "pods", "namespace": "default"}},
    }
    path = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"
    status, body = await http(api, "POST", path, token, review)
    assert status == 201 and body["status"]["allowed"] is False
    review["spec"] = {"resourceAttributes": {"verb": "create", "resource": "pods", "subresource": "eviction"}}
    assert (await http(api, "POST", path, token, review))[1]["status"]["allowed"] is True


@needs_kubectl
async def test_kubectl_as_a_service_account(api: FakeApiServer, tmp_path: Path) -> None:
    api.create(pod("x"))
    kubeconfig = api.write_kubeconfig(
        tmp_path / "kubeconfig", token=api.service_account_token("spotd", "spotd-controller")
    )

    async def kubectl(*args: str) -> tuple[int, str]:
        assert KUBECTL is not None
        proc = await asyncio.create_subprocess_exec(
            KUBECTL, "--kubeconfig", str(kubeconfig), "--cache-dir", str(tmp_path / "cache"), *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await proc.communicate()
        return proc.returncode or 0, (out + err).decode()

    assert (await kubectl("auth", "can-i", "delete", "pods"))[1].strip() == "no"
    assert (await kubectl("auth", "can-i", "create", "pods", "--subresource=eviction", "-n", "default"))[
        1
    ].strip() == "yes"
    assert (await kubectl("auth", "can-i", "update", "leases/spotd-controller", "-n", "spotd"))[1].strip() == "yes"
    code, out = await kubectl("delete", "pod", "x", "--wait=false")
    assert (
        code != 0
        and (
            'Error from server (Forbidden): pods "x" is forbidden: User "system:serviceaccount:spotd:spotd-controller" '
            'cannot delete resource "pods" in API group "" in the namespace "default"'
        )
        in out
    )
    code, out = await kubectl("get", "pods")
    assert code == 0 and "x" in out


async def test_load_manifests_applies_the_kustomization(api: FakeApiServer) -> None:
    roles = {r["metadata"]["name"] for r in api.list("ClusterRole")}
    assert roles == {"spotd-agent", "spotd-controller", "spotd-controller-surge", "spotd-status"}
    lease_role = api.get("Role", "spotd-controller-lease", "spotd")
    assert lease_role is not None and lease_role["metadata"]["labels"]["app.kubernetes.io/part-of"] == "spotd"
    binding = api.get("ClusterRoleBinding", "spotd-agent")
    assert binding is not None and binding["subjects"][0]["namespace"] == "spotd"
    daemonset = api.get("DaemonSet", "spotd-agent", "spotd")
    assert daemonset is not None
    assert daemonset["spec"]["template"]["spec"]["containers"][0]["image"] == "ghcr.io/spotd/spotd-agent:0.1.0"
    assert api.get("PodDisruptionBudget", "spotd-controller", "spotd") is not None
    again = api.load_manifests([DEPLOY])  # apply twice: replaces, no 409
    from spotd.sim.kubeapi import manifests, resources

    served = [d for d in manifests.documents([DEPLOY]) if d["kind"] in resources.BY_KIND]
    assert len(again) == len(served) and "PrometheusRule" not in {d["kind"] for d in again}  # not served


# ---- admission -----------------------------------------------------------------------------------------


async def test_admission_hook_sees_each_write_and_can_refuse(api: FakeApiServer) -> None:
    seen: list[AdmissionAttributes] = []

    def hook(attrs: AdmissionAttributes) -> None:
        seen.append(attrs)
        if attrs.obj and (attrs.obj.get("metadata", {}).get("labels") or {}).get("deny") == "yes":
            raise ApiError(422, f'pods "{attrs.name}" is invalid: denied by the test hook', reason="Invalid")

    api.admission_hooks.append(hook)
    token = api.service_account_token("spotd", "spotd-agent", node_name="node-a")
    api.create(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "agent-admin"},
            "subjects": [{"kind": "User", "name": AGENT}],
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "all"},
        }
    )
    api.create(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "all"},
            "rules": [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}],
        }
    )
    pods = "/api/v1/namespaces/default/pods"
    status, body = await http(
        api, "POST", pods, token, {**pod("bad"), "metadata": {"name": "bad", "labels": {"deny": "yes"}}}
    )
    assert status == 422 and "denied by the test hook" in body["message"] and api.get("Pod", "bad") is None
    assert (await http(api, "POST", pods, token, pod("good")))[0] == 201
    assert (await http(api, "PATCH", pods + "/good", token, {"metadata": {"labels": {"deny": "yes"}}}))[0] == 415
    status, _ = await http(
        api, "PUT", pods + "/good", token, {**pod("good"), "metadata": {"name": "good", "labels": {"deny": "yes"}}}
    )
    assert status == 422
    assert (
        await http(api, "POST", pods + "/good/eviction", token, {"kind": "Eviction", "metadata": {"name": "good"}})
    )[0] == 201
    await until(lambda: api.get("Pod", "good") is None)
    api.create(pod("old"))
    assert (await http(api, "DELETE", pods + "/old", token))[0] == 200
    ops = [(a.operation, a.resource, a.subresource, a.kind, a.name) for a in seen]
    assert ops == [
        ("CREATE", "pods", "", "Pod", "bad"),
        ("CREATE", "pods", "", "Pod", "good"),
        ("UPDATE", "pods", "", "Pod", "good"),
        ("CREATE", "pods", "eviction", "Eviction", "good"),
        ("DELETE", "pods", "", "Pod", "old"),
    ]
    update, delete = seen[2], seen[4]
    assert update.old_obj is not None and update.obj is not None and update.obj["metadata"]["labels"] == {"deny": "yes"}
    assert delete.obj is None and delete.old_obj is not None and delete.old_obj["metadata"]["name"] == "old"
    assert delete.user.username == AGENT
    assert delete.user.extra["authentication.kubernetes.io/node-name"] == ("node-a",)


# ---- PodDisruptionBudget status lag --------------------------------------------------------------------


async def test_eviction_checks_a_lagging_budget_status(api: FakeApiServer) -> None:
    api.pdb_lag = 0.3
    for name in ("w0", "w1"):
        api.create(pod(name, labels={"app": "web"}))
    api.create(
        {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "web"}}},
        }
    )
    evict = "/api/v1/namespaces/default/pods/{}/eviction"

    def body(name: str) -> dict[str, Any]:
        return {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": name}}

    status, refused = await http(api, "POST", evict.format("w0"), body=body("w0"))  # no status yet
    assert status == 429  # as eviction.go words it, with a suggested Retry-After of 10 s
    cause = refused["details"]["causes"][0]["message"]
    assert cause == "The disruption budget web is still being processed by the server."
    assert refused["details"]["retryAfterSeconds"] == 10
    await until(lambda: (api.get("PodDisruptionBudget", "web") or {}).get("status", {}).get("disruptionsAllowed") == 1)
    assert (await http(api, "POST", evict.format("w0"), body=body("w0")))[0] == 201
    budget = api.get("PodDisruptionBudget", "web")
    assert budget is not None and budget["status"]["disruptionsAllowed"] == 0  # decremented by the eviction
    assert "w0" in budget["status"]["disruptedPods"]
    assert (await http(api, "POST", evict.format("w1"), body=body("w1")))[0] == 429

    await until(lambda: api.get("Pod", "w0") is None)  # gone; its replacement becomes ready
    api.pdb_lag = 2.0  # long enough that no machine is slow enough to ask after the status caught up
    api.create(pod("w2", labels={"app": "web"}))
    status, _ = await http(api, "POST", evict.format("w1"), body=body("w1"))
    assert status == 429  # the status has not caught up yet
    await until(lambda: (api.get("PodDisruptionBudget", "web") or {}).get("status", {}).get("currentHealthy") == 2)
    budget = api.get("PodDisruptionBudget", "web")
    assert (
        budget is not None and budget["status"]["disruptionsAllowed"] == 1 and "disruptedPods" not in budget["status"]
    )
    assert (await http(api, "POST", evict.format("w1"), body=body("w1")))[0] == 201


# ---- the permission check (tests/permissions.py) -------------------------------------------------------


def uses(grants: list[Grant]) -> set[AccessRecord]:
    """One allowed request per grant, as the fake would record it."""
    found = set()
    for g in grants:
        resource, _, sub = g.resource.partition("/")
        found.add(AccessRecord(g.username, g.verb, g.api_group, resource, sub, g.namespace or "default", True))
    return found


def test_deploy_rbac_grants_what_the_check_expects() -> None:
    grants = granted()
    assert Grant(CONTROLLER, "create", "", "pods/eviction", "", 'ClusterRole "spotd-controller"') in grants
    assert (
        Grant(CONTROLLER, "update", "coordination.k8s.io", "leases", "spotd", 'Role "spotd-controller-lease"') in grants
    )
    # the controller deletes only its own placeholder pods, in its own namespace (a Role)
    deletes = [g for g in grants if g.username == CONTROLLER and g.verb == "delete"]
    assert [(g.resource, g.namespace) for g in deletes] == [("pods", "spotd")]
    assert not compare(uses(grants), grants)  # every grant used, nothing refused


def test_permission_check_names_a_missing_and_an_unused_grant() -> None:
    grants = granted()
    records = uses(grants)
    records.discard(AccessRecord(AGENT, "create", "", "pods", "eviction", "default", True))
    records.add(AccessRecord(CONTROLLER, "delete", "", "pods", "", "default", False))
    records.add(AccessRecord("kubernetes-admin", "delete", "", "nodes", "", "", False))  # not spotd's: ignored
    report = compare(records, grants)
    assert report.missing == [f'{CONTROLLER} cannot delete "pods" (API group "") in namespace "default"']
    assert report.unused == [f'ClusterRole "spotd-agent" grants {AGENT} create "pods/eviction" (API group "")']
    assert "Granted in deploy/rbac.yaml but never used by any test:" in report.lines()


async def test_records_of_a_real_server_mark_grants_used(api: FakeApiServer, tmp_path: Path) -> None:
    api.create(pod("x"))
    client = client_for(api, tmp_path, api.service_account_token("spotd", "spotd-controller"))
    try:
        await client.create(
            Pod.Eviction(metadata=ObjectMeta(name="x", namespace="default")), name="x", namespace="default"
        )
        with pytest.raises(ClientApiError):
            await client.delete(Pod, "x", namespace="default")
    finally:
        await client.close()
    path = write_records(api.access_log, tmp_path / "access.json")
    report = compare(read_records(path), granted())
    assert (
        f'ClusterRole "spotd-controller" grants {CONTROLLER} create "pods/eviction" (API group "")' not in report.unused
    )
    assert f'{CONTROLLER} cannot delete "pods" (API group "") in namespace "default"' in report.missing


async def test_certificate_made_with_openssl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the cryptography package the serving certificate comes from the openssl command."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    monkeypatch.setattr(auth, "_CERT", auth._with_openssl())
    server = FakeApiServer()
    await server.start()
    client = client_for(server, tmp_path, ADMIN_TOKEN)
    try:
        assert [n async for n in client.list(Node)] == []
        assert server.ca_certificate == auth._CERT[0]  # type: ignore[index]
    finally:
        await client.close()
        await server.stop()
