"""spotd against the real control plane (tests/realcluster.py: kube-apiserver, etcd, controller-manager,
scheduler, kwok; deploy/ applied with kubectl): the identities, the admission policies, the placeholders and the
agent's drain as a real server and real controllers answer them (issue 18)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from spotd.sim import builders
from tests.realcluster import DEPLOY, KWOK_ANNOTATION, RealCluster
from tests.test_admission_policy import check_agent_pod_delete

TAINT = "spotd.io/interruption"


def add_node(real: RealCluster, name: str, capacity: str = builders.SPOT, **kw: Any) -> dict[str, Any]:
    node = builders.node(name, capacity, **kw)
    node["metadata"].setdefault("annotations", {})[KWOK_ANNOTATION] = "fake"
    status, body = real.request("POST", "/api/v1/nodes", node)
    assert status == 201, body
    real.wait_for(lambda: _ready(real, name))
    return dict(body)


def _ready(real: RealCluster, name: str) -> bool:
    status, node = real.request("GET", f"/api/v1/nodes/{name}")
    conditions = (node.get("status") or {}).get("conditions") or [] if status == 200 else []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def get(real: RealCluster, path: str) -> dict[str, Any]:
    status, body = real.request("GET", path)
    assert status == 200, body
    return dict(body)


def agent_pod(real: RealCluster, node: str) -> dict[str, Any]:
    """The DaemonSet's pod on `node`, as the real DaemonSet controller made it and kwok runs it."""
    found: list[dict[str, Any]] = []

    def running() -> bool:
        pods = get(
            real,
            f"/api/v1/namespaces/spotd/pods?labelSelector=app.kubernetes.io/component%3Dagent&fieldSelector=spec.nodeName%3D{node}",
        )
        found[:] = [p for p in pods["items"] if (p.get("status") or {}).get("phase") == "Running"]
        return bool(found)

    real.wait_for(running)
    return found[0]


def agent_token(real: RealCluster, node: str) -> str:
    return real.service_account_token("spotd", "spotd-agent", bound_pod=agent_pod(real, node))


def whoami(real: RealCluster, token: str) -> dict[str, Any]:
    status, body = real.request(
        "POST",
        "/apis/authentication.k8s.io/v1/selfsubjectreviews",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"},
        token=token,
    )
    assert status == 201, body
    return dict(body["status"]["userInfo"])


@pytest.fixture(scope="module")
def real(real_cluster: RealCluster) -> Iterator[RealCluster]:
    for name, capacity in (
        ("real-spot-1", builders.SPOT),
        ("real-spot-2", builders.SPOT),
        ("real-od-1", builders.ON_DEMAND),
    ):
        if real_cluster.request("GET", f"/api/v1/nodes/{name}")[0] == 404:
            add_node(real_cluster, name, capacity)
    # deploy/'s admission policies hold once the API server has loaded them (a moment after kubectl apply)
    token = agent_token(real_cluster, "real-spot-1")
    real_cluster.wait_for(lambda: refused_by_policy(*cordon(real_cluster, "real-spot-2", token, dry_run=True)))
    yield real_cluster


def test_the_agents_pod_bound_token_names_its_node(real: RealCluster) -> None:
    """The node-name claim the admission policies read is the server's own, from the pod the token is bound to."""
    user = whoami(real, agent_token(real, "real-spot-1"))
    assert user["username"] == "system:serviceaccount:spotd:spotd-agent"
    assert user["extra"]["authentication.kubernetes.io/node-name"] == ["real-spot-1"]


def refused_by_policy(status: int, body: Any) -> bool:
    """A 403 from an admission policy (its message names it), not from RBAC."""
    return status == 403 and "ValidatingAdmissionPolicy" in str(body)


def cordon(real: RealCluster, node: str, token: str, dry_run: bool = False) -> tuple[int, Any]:
    query = "?dryRun=All" if dry_run else ""
    return real.request(
        "PATCH",
        f"/api/v1/nodes/{node}{query}",
        {"spec": {"unschedulable": True}},
        token=token,
        content_type="application/merge-patch+json",
    )


def test_the_admission_policy_refuses_the_agents_write_to_another_node(real: RealCluster) -> None:
    token = agent_token(real, "real-spot-1")
    status, own = cordon(real, "real-spot-1", token)
    assert status == 200, own.get("message") if isinstance(own, dict) else own
    status, other = cordon(real, "real-spot-2", token)
    # deploy/admission-policy.yaml's validations say reason Forbidden (without it the real server answers
    # 422 Invalid, which is not what a refused write is)
    assert (status, other["reason"]) == (403, "Forbidden"), other
    assert other["message"] == (
        "nodes \"real-spot-2\" is forbidden: ValidatingAdmissionPolicy 'spotd-agent-own-node' with binding "
        "'spotd-agent-own-node' denied request: spotd-agent of node real-spot-1 may not change node real-spot-2"
    )
    assert not get(real, "/api/v1/nodes/real-spot-2")["spec"].get("unschedulable")
    real.request(
        "PATCH",
        "/api/v1/nodes/real-spot-1",
        {"spec": {"unschedulable": None}},
        content_type="application/merge-patch+json",
    )


def test_a_gpu_request_without_its_limit_is_refused_by_the_real_server(real: RealCluster) -> None:
    """Why placeholders carry limits (c3fdeb8): the real server's answer to the old placeholder's resources."""
    pod = builders.pod("gpu-requests-only", None, owner=None, requests={"cpu": "100m", "nvidia.com/gpu": "1"})
    status, body = real.request("POST", "/api/v1/namespaces/default/pods", pod)
    assert status == 422, body
    assert "Limit must be set for non overcommitable resources" in str(body)


def dry_run_delete(real: RealCluster, namespace: str, pod: str, token: str) -> tuple[int, Any]:
    """A dry-run DELETE of a pod as `token`. dryRun goes in the DeleteOptions body: a DELETE with a body is
    decoded from the body alone, so `?dryRun=All` beside it is ignored and the pod really goes."""
    options = {"kind": "DeleteOptions", "apiVersion": "v1", "dryRun": ["All"]}
    return real.request("DELETE", f"/api/v1/namespaces/{namespace}/pods/{pod}", options, token=token)


async def test_the_optional_delete_role_is_held_to_the_agents_own_node(real: RealCluster) -> None:
    """deploy/optional/agent-deadline-delete.yaml on the real server: its DELETE policy reads the stored pod's
    spec.nodeName (oldObject) against the token's node-name claim. Another node's pod, a pod on no node, any
    pod with a token naming no node: 403 Forbidden; a collection: RBAC's 403; the agent's own node's pod: 200.
    The role is removed at the end (the default deploy/ gives the agent no pod delete)."""
    namespace = "real-cluster-delete"
    real.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    probe = builders.pod("real-delete-probe", "real-spot-2", namespace=namespace, owner=None)
    status, body = real.request("POST", f"/api/v1/namespaces/{namespace}/pods", probe)
    assert status == 201, body
    optional = str(DEPLOY / "optional" / "agent-deadline-delete.yaml")
    real.kubectl("apply", "--server-side", "-f", optional)
    try:
        token = agent_token(real, "real-spot-1")
        # A new policy holds a few seconds after the write (the API server's informer): wait until it does.
        real.wait_for(lambda: refused_by_policy(*dry_run_delete(real, namespace, "real-delete-probe", token)))
        await check_agent_pod_delete(
            real.url,
            real.tokens["admin"],
            token,
            "real-spot-1",
            "real-spot-2",
            agent_token_without_node=real.service_account_token("spotd", "spotd-agent"),
            namespace=namespace,
            verify=str(real.ca_file),
        )
        assert (
            get(real, f"/api/v1/namespaces/{namespace}/pods/real-delete-probe")["metadata"].get("deletionTimestamp")
            is None
        )  # the dry runs deleted nothing
    finally:
        real.kubectl("delete", "--ignore-not-found", "-f", optional)
        real.request("DELETE", f"/api/v1/namespaces/{namespace}")


def test_a_node_added_by_the_harness_runs_its_agent_pod(real: RealCluster) -> None:
    """RealCluster.add_node gives the node a kubelet's own labels: without kubernetes.io/os, deploy/'s
    DaemonSet never placed its agent pod there (kwok sets no labels), as a session found the hard way."""
    real.add_node("real-harness-1")
    real.wait_for(lambda: _ready(real, "real-harness-1"))
    assert agent_pod(real, "real-harness-1")["spec"]["nodeName"] == "real-harness-1"
