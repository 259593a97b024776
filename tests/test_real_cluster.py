"""spotd against the real control plane (tests/realcluster.py: kube-apiserver, etcd, controller-manager,
scheduler, kwok; deploy/ applied with kubectl): the identities, the admission policies, the placeholders and the
agent's drain as a real server and real controllers answer them (issue 18)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from spotd.sim import builders
from tests.realcluster import KWOK_ANNOTATION, RealCluster

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
    real_cluster.wait_for(lambda: cordon(real_cluster, "real-spot-2", token, dry_run=True)[0] == 422)
    yield real_cluster


def test_the_agents_pod_bound_token_names_its_node(real: RealCluster) -> None:
    """The node-name claim the admission policies read is the server's own, from the pod the token is bound to."""
    user = whoami(real, agent_token(real, "real-spot-1"))
    assert user["username"] == "system:serviceaccount:spotd:spotd-agent"
    assert user["extra"]["authentication.kubernetes.io/node-name"] == ["real-spot-1"]


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
    # deploy/admission-policy.yaml's validations give no reason: the real server answers Invalid, 422
    assert (status, other["reason"]) == (422, "Invalid"), other
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
