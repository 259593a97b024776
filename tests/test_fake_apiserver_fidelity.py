"""Issue 18: where the fake API server was found to differ from kube-apiserver and the controllers it stands in
for, each behaviour checked over HTTP as the real one answers it (the Kubernetes source named per test)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from spotd.sim.kubeapi import ApiError, FakeApiServer
from tests.test_fake_apiserver import http, pod

PODS = "/api/v1/namespaces/default/pods"


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    server = FakeApiServer(termination_scale=0.02, pdb_lag=0)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def with_resources(name: str, **resources: dict[str, str]) -> dict[str, Any]:
    obj = pod(name)
    obj["spec"]["containers"][0]["resources"] = resources
    return obj


# ---- pod defaulting and validation (pkg/apis/core/v1/defaults.go, pkg/apis/core/validation) ---------------


async def test_a_gpu_request_without_its_limit_is_refused_with_422(api: FakeApiServer) -> None:
    status, body, _ = await http(api, "POST", PODS, with_resources("p", requests={"nvidia.com/gpu": "1", "cpu": "1"}))
    assert (status, body["reason"]) == (422, "Invalid")
    assert body["message"] == (
        'Pod "p" is invalid: spec.containers[0].resources.limits: '
        "Required value: Limit must be set for non overcommitable resources"
    )
    assert body["details"]["causes"] == [
        {
            "reason": "FieldValueRequired",
            "message": "Required value: Limit must be set for non overcommitable resources",
            "field": "spec.containers[0].resources.limits",
        }
    ]
    assert api.get("Pod", "p") is None
    # the test's own hand is refused too: no test can build a pod a real cluster would not take
    with pytest.raises(ApiError) as refused:
        api.create(with_resources("q", requests={"vpc.amazonaws.com/efa": "1"}))
    assert refused.value.code == 422


@pytest.mark.parametrize(
    ("resources", "message"),
    [
        ({"requests": {"nvidia.com/gpu": "1"}, "limits": {"nvidia.com/gpu": "2"}},
         'spec.containers[0].resources.requests: Invalid value: "1": must be equal to nvidia.com/gpu limit of 2'),
        ({"requests": {"hugepages-2Mi": "2Mi", "memory": "1Gi"}},
         "spec.containers[0].resources.limits: Required value: Limit must be set for non overcommitable resources"),
        ({"requests": {"cpu": "2"}, "limits": {"cpu": "1"}},
         'spec.containers[0].resources.requests: Invalid value: "2": must be less than or equal to cpu limit of 1'),
        ({"limits": {"nvidia.com/gpu": "500m"}},
         'spec.containers[0].resources.limits[nvidia.com/gpu]: Invalid value: "500m": must be an integer'),
        ({"limits": {"hugepages-2Mi": "2Mi"}},
         "spec.containers[0].resources: Forbidden: HugePages require cpu or memory"),
    ],
)  # fmt: skip
async def test_resource_rules(api: FakeApiServer, resources: dict[str, Any], message: str) -> None:
    status, body, _ = await http(api, "POST", PODS, with_resources("p", **resources))
    assert status == 422
    assert message in body["message"]


async def test_requests_are_defaulted_from_limits_and_a_gpu_limit_alone_is_accepted(api: FakeApiServer) -> None:
    limits = {"nvidia.com/gpu": "1", "cpu": "2"}
    status, body, _ = await http(api, "POST", PODS, with_resources("p", limits=limits, requests={"cpu": "500m"}))
    assert status == 201, body
    resources = body["spec"]["containers"][0]["resources"]
    assert resources["requests"] == {"cpu": "500m", "nvidia.com/gpu": "1"}  # cpu's own request is kept
    both = {"nvidia.com/gpu": "2"}
    assert (await http(api, "POST", PODS, with_resources("q", limits=both, requests=both)))[0] == 201
