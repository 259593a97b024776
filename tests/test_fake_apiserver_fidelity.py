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


# ---- the disruption controller (pkg/controller/disruption/disruption.go) ----------------------------------


def owned_by(api: FakeApiServer, kind: str, name: str, api_version: str = "apps/v1", **spec: Any) -> dict[str, Any]:
    """A stored controller object; kinds the fake does not serve (Job, custom resources) get a made-up uid."""
    try:
        return api.create({"apiVersion": api_version, "kind": kind, "metadata": {"name": name}, "spec": spec})
    except KeyError:
        return {"apiVersion": api_version, "kind": kind, "metadata": {"name": name, "uid": f"uid-{kind}-{name}"}}


def owned_pod(name: str, owner: dict[str, Any] | None, labels: dict[str, str] | None = None) -> dict[str, Any]:
    obj = pod(name, labels=labels or {"app": "web"}, owner=owner)
    if owner is not None:
        obj["metadata"]["ownerReferences"][0]["apiVersion"] = owner["apiVersion"]
    return obj


def budget(api: FakeApiServer, name: str) -> dict[str, Any]:
    found = api.get("PodDisruptionBudget", name)
    assert found is not None
    return found["status"]


EVICT = "/api/v1/namespaces/default/pods/{}/eviction"


async def evict(api: FakeApiServer, name: str) -> tuple[int, Any]:
    body = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": name}}
    status, answer, _ = await http(api, "POST", EVICT.format(name), body)
    return status, answer


async def test_bare_pods_under_max_unavailable_allow_no_disruption(api: FakeApiServer) -> None:
    """getExpectedScale leaves pods without a controller out: expectedPods 0, so disruptionsAllowed 0."""
    for i in range(3):
        api.create(owned_pod(f"w{i}", None))
    api.create({**pdb_obj("a", maxUnavailable=1)})
    status = budget(api, "a")
    assert (status["expectedPods"], status["currentHealthy"], status["disruptionsAllowed"]) == (0, 3, 0)
    assert status["conditions"][0]["reason"] == "InsufficientPods"
    code, body = await evict(api, "w0")
    assert code == 429 and body["details"]["causes"][0]["reason"] == "DisruptionBudget"
    # a percentage minAvailable is computed the same way
    api.delete("PodDisruptionBudget", "a")
    api.create(pdb_obj("b", minAvailable="50%"))
    assert budget(api, "b")["disruptionsAllowed"] == 0
    assert (await evict(api, "w0"))[0] == 429


async def test_an_integer_min_available_counts_bare_pods(api: FakeApiServer) -> None:
    """minAvailable as an integer needs no controller: expectedPods is the number of pods."""
    for i in range(3):
        api.create(owned_pod(f"w{i}", None))
    api.create(pdb_obj("a", minAvailable=2))
    status = budget(api, "a")
    assert (status["expectedPods"], status["desiredHealthy"], status["disruptionsAllowed"]) == (3, 2, 1)
    assert (await evict(api, "w0"))[0] == 201
    assert (await evict(api, "w1"))[0] == 429


@pytest.mark.parametrize(
    ("kind", "api_version", "error"),
    [
        ("Job", "batch/v1", "jobs.batch does not implement the scale subresource"),
        ("DaemonSet", "apps/v1", "daemonsets.apps does not implement the scale subresource"),
        ("Rollout", "argoproj.io/v1alpha1", "rollouts.argoproj.io does not implement the scale subresource"),
    ],
)
async def test_pods_of_a_controller_without_scale_fail_the_budget_safe(
    api: FakeApiServer, kind: str, api_version: str, error: str
) -> None:
    """The controller's failSafe: disruptionsAllowed 0, DisruptionAllowed False with reason SyncFailed; a budget
    never computed keeps observedGeneration 0, so an eviction is told it is still being processed."""
    owner = owned_by(api, kind, "batch-1", api_version)
    for i in range(2):
        api.create(owned_pod(f"j{i}", owner))
    api.create(pdb_obj("a", maxUnavailable="50%"))
    status = budget(api, "a")
    assert status["disruptionsAllowed"] == 0 and status.get("observedGeneration", 0) == 0
    (condition,) = status["conditions"]
    assert (condition["status"], condition["reason"], condition["message"]) == ("False", "SyncFailed", error)
    code, body = await evict(api, "j0")
    assert code == 429
    assert "is still being processed by the server" in body["details"]["causes"][0]["message"]
    # an integer minAvailable needs no scale: the same pods are budgeted
    api.delete("PodDisruptionBudget", "a")
    api.create(pdb_obj("b", minAvailable=1))
    assert budget(api, "b")["disruptionsAllowed"] == 1


async def test_a_controller_gone_or_replaced_fails_the_budget_safe(api: FakeApiServer) -> None:
    rs = owned_by(api, "ReplicaSet", "web", replicas=2)
    for i in range(2):
        api.create(owned_pod(f"w{i}", rs))
    api.create(pdb_obj("a", maxUnavailable=1))
    assert budget(api, "a")["disruptionsAllowed"] == 1
    api.delete("ReplicaSet", "web")
    api.create({"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {"name": "web"}, "spec": {"replicas": 2}})
    status = budget(api, "a")  # same name, another uid: not these pods' controller
    assert status["disruptionsAllowed"] == 0
    assert status["conditions"][0]["message"] == 'found no controllers for pod "w0"'
    assert status["observedGeneration"] == 1  # the last computed status is kept


async def test_a_deployments_pods_count_its_replicas_and_bare_ones_are_left_out(api: FakeApiServer) -> None:
    deployment = owned_by(api, "Deployment", "web", replicas=4)
    rs = api.create({"apiVersion": "apps/v1", "kind": "ReplicaSet",
                     "metadata": {"name": "web-1", "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment",
                     "name": "web", "uid": deployment["metadata"]["uid"], "controller": True}]},
                     "spec": {"replicas": 2}})  # fmt: skip
    for i in range(3):
        api.create(owned_pod(f"w{i}", rs))
    api.create(owned_pod("stray", None))
    api.create(pdb_obj("a", maxUnavailable="25%"))  # of the Deployment's 4: 1
    status = budget(api, "a")
    assert (status["expectedPods"], status["desiredHealthy"], status["currentHealthy"]) == (4, 3, 4)
    assert status["disruptionsAllowed"] == 1


def test_a_budget_with_neither_field_allows_nothing() -> None:
    from spotd.sim.kubeapi.policy import DisruptionController
    from spotd.sim.kubeapi.store import Store

    store = Store()
    store.create(owned_pod("w0", None))
    controller = DisruptionController(store)
    store.create(pdb_obj("a"))
    status = controller.compute_status(store.get("PodDisruptionBudget", "default", "a") or {})
    assert (status["expectedPods"], status["currentHealthy"], status["disruptionsAllowed"]) == (0, 1, 0)


def pdb_obj(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"selector": {"matchLabels": {"app": "web"}}, **spec},
    }


# ---- built-in admission: NamespaceLifecycle and Priority (plugin/pkg/admission/priority) -------------------


def priority_class(name: str, value: int, **extra: Any) -> dict[str, Any]:
    return {"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": name},
            "value": value, **extra}  # fmt: skip


async def test_a_pod_gets_its_priority_from_its_class_and_an_unknown_class_is_forbidden(api: FakeApiServer) -> None:
    api.create(priority_class("spotd-placeholder", -5, preemptionPolicy="Never"))
    placeholder = {**pod("p1"), "metadata": {"generateName": "spotd-placeholder-"}}
    placeholder["spec"]["priorityClassName"] = "spotd-placeholder"
    status, body, _ = await http(api, "POST", PODS, placeholder)
    assert status == 201, body
    assert (body["spec"]["priority"], body["spec"]["preemptionPolicy"]) == (-5, "Never")

    placeholder["spec"]["priorityClassName"] = "nope"
    status, body, _ = await http(api, "POST", PODS, placeholder)
    assert (status, body["reason"]) == (403, "Forbidden")
    # admission runs before the name is generated: the generateName stands in for it
    assert body["message"] == 'pods "spotd-placeholder-" is forbidden: no PriorityClass with name nope was found'
    assert body["details"] == {"name": "spotd-placeholder-", "kind": "pods"}

    wrong = pod("p2")
    wrong["spec"].update(priorityClassName="spotd-placeholder", priority=0)
    status, body, _ = await http(api, "POST", PODS, wrong)
    assert status == 403 and "the integer value of priority (0) must not be provided in pod spec" in body["message"]
    wrong["spec"].update(priority=-5, preemptionPolicy="PreemptLowerPriority")
    status, body, _ = await http(api, "POST", PODS, wrong)
    assert status == 403 and "priority admission controller computed Never" in body["message"]


async def test_a_pod_without_a_class_gets_the_global_default_or_zero(api: FakeApiServer) -> None:
    status, body, _ = await http(api, "POST", PODS, pod("p0"))
    assert status == 201 and body["spec"]["priority"] == 0 and "priorityClassName" not in body["spec"]
    assert body["spec"]["preemptionPolicy"] == "PreemptLowerPriority"
    api.create(priority_class("default", 100, globalDefault=True))
    status, body, _ = await http(api, "POST", PODS, pod("p1"))
    assert (body["spec"]["priority"], body["spec"]["priorityClassName"]) == (100, "default")
    # a second default is refused
    path = "/apis/scheduling.k8s.io/v1/priorityclasses"
    status, body, _ = await http(api, "POST", path, priority_class("other", 5, globalDefault=True))
    assert status == 403 and "PriorityClass default is already marked as default" in body["message"]
    # the system classes exist as on a real cluster
    _, body, _ = await http(api, "GET", path + "/system-node-critical")
    assert body["value"] == 2000001000
    # an update that omits the priority keeps it (and a status write never touches it)
    status, body, _ = await http(api, "PUT", PODS + "/p1", {**api.get("Pod", "p1"), "spec": {**pod("p1")["spec"]}})
    assert status == 200 and body["spec"]["priority"] == 100


async def test_writes_into_a_missing_namespace_are_not_found(api: FakeApiServer) -> None:
    status, body, _ = await http(api, "POST", "/api/v1/namespaces/shop/pods", pod("p", namespace="shop"))
    assert (status, body["reason"], body["message"]) == (404, "NotFound", 'namespaces "shop" not found')
    assert body["details"] == {"name": "shop", "kind": "namespaces"}
    cm = {"metadata": {"name": "c"}, "data": {}}
    assert (await http(api, "POST", "/api/v1/namespaces/shop/configmaps", cm))[0] == 404
    api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})
    assert (await http(api, "POST", "/api/v1/namespaces/shop/configmaps", cm))[0] == 201
    # cluster-scoped objects need no namespace; the immortal namespaces cannot be deleted
    status, body, _ = await http(api, "DELETE", "/api/v1/namespaces/default")
    assert status == 403 and body["message"] == 'namespaces "default" is forbidden: this namespace may not be deleted'
    assert (await http(api, "DELETE", "/api/v1/namespaces/shop"))[0] == 200


async def test_nothing_new_in_a_terminating_namespace_not_even_an_eviction(api: FakeApiServer) -> None:
    api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})
    api.create(pod("web-0", namespace="shop"))
    terminating = api.get("Namespace", "shop")
    assert terminating is not None
    terminating["status"] = {"phase": "Terminating"}
    api.update(terminating)

    status, body, _ = await http(api, "POST", "/api/v1/namespaces/shop/pods", pod("p", namespace="shop"))
    assert (status, body["reason"]) == (403, "Forbidden")
    assert body["message"] == (
        'pods "p" is forbidden: unable to create new content in namespace shop because it is being terminated'
    )
    (cause,) = body["details"]["causes"]
    assert cause == {
        "reason": "NamespaceTerminating",
        "message": "namespace shop is being terminated",
        "field": "metadata.namespace",
    }
    eviction = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": "web-0"}}
    status, body, _ = await http(api, "POST", "/api/v1/namespaces/shop/pods/web-0/eviction", eviction)
    assert status == 403 and 'pods "web-0" is forbidden: unable to create new content' in body["message"]
    # updates and deletes go on: the namespace controller is deleting what is in it
    labelled = api.get("Pod", "web-0", "shop")
    assert labelled is not None
    labelled["metadata"]["labels"] = {"a": "b"}
    assert (await http(api, "PUT", "/api/v1/namespaces/shop/pods/web-0", labelled))[0] == 200
    assert (await http(api, "DELETE", "/api/v1/namespaces/shop/pods/web-0"))[0] == 200
