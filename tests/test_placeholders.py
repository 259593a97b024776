"""Table tests for make-before-break's pure parts: quantities, effective requests, the placeholder manifests,
the surge verdict and the landing verdict."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import structlog

from spotd.common.quantity import format_quantity, parse_quantity
from spotd.controller.landing import PodSeen, landing_verdict, pod_seen, replacements, what_to_follow
from spotd.controller.placeholders import (
    PAUSE_IMAGE,
    PlaceholderState,
    SurgeState,
    effective_requests,
    node_label_value,
    placeholder_pods,
    placeholder_state,
    pods_to_surge,
    surge_verdict,
    volume_zones,
)
from spotd.drain.plan import PodPolicy
from spotd.sim import builders
from spotd.sim.kubeapi.server import FakeApiServer

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
GPU = {"nvidia.com/gpu": "1"}
EFA = {"vpc.amazonaws.com/efa": "1"}
HUGE = str(4 * 2**20)
NODE = "ip-10-0-1-10.ec2.internal"
CT = "eks.amazonaws.com/capacityType"


def pod(name: str = "web-1", namespace: str = "shop", owner: str | None = "ReplicaSet", **spec: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": {"app": "web"}}
    if owner:
        meta["ownerReferences"] = [{"kind": owner, "name": "web-rs", "controller": True, "uid": "u1"}]
    containers = spec.pop("containers", [{"name": "app", "resources": {"requests": {"cpu": "250m", "memory": "1Gi"}}}])
    phase = spec.pop("phase", "Running")
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {"nodeName": NODE, "containers": containers, **spec},
        "status": {"phase": phase},
    }


def build(pods: list[dict[str, Any]], **kw: Any) -> list[dict[str, Any]]:
    return placeholder_pods(NODE, pods, namespace="spotd", capacity_label=CT, spot_values=["SPOT"], **kw)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("250m", Decimal("0.25")),
        ("2", Decimal(2)),
        ("1.5", Decimal("1.5")),
        ("1Gi", Decimal(2**30)),
        ("512Mi", Decimal(512 * 2**20)),
        ("1G", Decimal(10**9)),
        ("1e3", Decimal(1000)),
        ("1E", Decimal(10**18)),
        ("100k", Decimal(100_000)),
        (3, Decimal(3)),
        ("500u", Decimal("0.0005")),
    ],
)
def test_parse_quantity(text: str | int, value: Decimal) -> None:
    assert parse_quantity(text) == value


@pytest.mark.parametrize("text", ["", "1x", "Gi", "1 Gi", "--1"])
def test_parse_quantity_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_quantity(text)


@pytest.mark.parametrize(
    ("value", "resource", "text"),
    [(Decimal("0.25"), "cpu", "250m"), (Decimal("0.0005"), "cpu", "1m"), (Decimal("1.5"), "memory", "2")],
)
def test_format_quantity_rounds_up(value: Decimal, resource: str, text: str) -> None:
    assert format_quantity(value, resource) == text


def c(name: str, cpu: str | None = None, memory: str | None = None, **kw: Any) -> dict[str, Any]:
    requests = {k: v for k, v in (("cpu", cpu), ("memory", memory)) if v}
    return {"name": name, "resources": {"requests": requests}, **kw}


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"containers": [c("a", "250m", "1Gi")]}, {"cpu": "250m", "memory": str(2**30)}),
        ({"containers": [c("a", "250m"), c("b", "1")]}, {"cpu": "1250m"}),
        # an init container larger than the sum wins, per resource
        ({"containers": [c("a", "250m", "1Gi")], "initContainers": [c("i", "2", "10Mi")]},
         {"cpu": "2000m", "memory": str(2**30)}),
        # a sidecar (restartPolicy Always) adds to the regular containers and to the init containers after it
        ({"containers": [c("a", "1")], "initContainers": [c("s", "500m", restartPolicy="Always"), c("i", "2")]},
         {"cpu": "2500m"}),
        ({"containers": [c("a", "1")], "overhead": {"cpu": "100m"}}, {"cpu": "1100m"}),
        ({"containers": [c("a")]}, {}),
        # an extended resource: the API server admits it only with a limit equal to the request
        ({"containers": [{"name": "a", "resources": {"requests": GPU, "limits": GPU}}]}, GPU),
        # limits alone: the API server defaulted the requests from them, the scheduler reserves those
        ({"containers": [{"name": "a", "resources": {"limits": {"cpu": "1", **GPU}}}]}, {"cpu": "1000m", **GPU}),
        ({"containers": [{"name": "a", "resources": {"requests": {"cpu": "250m"}, "limits": {"cpu": "1"}}}],
          "initContainers": [{"name": "i", "resources": {"limits": {"cpu": "2"}}}]}, {"cpu": "2000m"}),
    ],
)  # fmt: skip
def test_effective_requests(spec: dict[str, Any], expected: dict[str, str]) -> None:
    assert effective_requests({"spec": spec}) == expected


@pytest.mark.parametrize(
    ("the_pod", "surged"),
    [
        (pod(), True),
        (pod(owner="DaemonSet"), False),
        (pod(phase="Succeeded"), False),
        (pod(phase="Failed"), False),
        ({**pod(), "metadata": {**pod()["metadata"], "deletionTimestamp": "2026-11-30T12:00:00Z"}}, False),
        ({**pod(), "metadata": {**pod()["metadata"], "annotations": {"kubernetes.io/config.mirror": "x"}}}, False),
        (pod(owner=None), True),  # the default policy evicts unreplicated pods; the controller passes its own
    ],
)
def test_which_pods_get_a_placeholder(the_pod: dict[str, Any], surged: bool) -> None:
    assert bool(pods_to_surge([the_pod])) is surged


def test_policy_blocks_what_the_drain_would_block() -> None:
    strict = PodPolicy(voluntary=True, evict_unreplicated=False)
    assert pods_to_surge([pod(owner=None)], strict) == []


def test_placeholder_manifest() -> None:
    tolerations = [{"key": "dedicated", "operator": "Equal", "value": "shop", "effect": "NoSchedule"}]
    (ph,) = build([pod(nodeSelector={"team": "shop"}, tolerations=tolerations, priorityClassName="high")])
    meta, spec = ph["metadata"], ph["spec"]
    assert meta["namespace"] == "spotd" and meta["generateName"] == "spotd-placeholder-"
    assert meta["labels"]["spotd.io/placeholder-for"] == NODE
    assert meta["annotations"] == {"spotd.io/placeholder-for": NODE, "spotd.io/placeholder-of": "shop/web-1"}
    assert "ownerReferences" not in meta and "app" not in meta["labels"]
    assert spec["priorityClassName"] == "spotd-placeholder" and "priority" not in spec
    assert spec["terminationGracePeriodSeconds"] == 1
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    (container,) = spec["containers"]
    assert container["image"] == PAUSE_IMAGE
    assert container["resources"] == {"requests": {"cpu": "250m", "memory": str(2**30)}}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert spec["nodeSelector"] == {"team": "shop"} and spec["tolerations"] == tolerations
    assert "nodeName" not in spec
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms == [{"matchExpressions": [{"key": CT, "operator": "In", "values": ["SPOT"]}]}]


@pytest.mark.parametrize(
    ("resources", "expected"),
    [
        # the API server refuses a request for a resource that cannot be overcommitted without an equal limit
        ({"requests": {"cpu": "1", **GPU}, "limits": GPU},
         {"requests": {"cpu": "1000m", **GPU}, "limits": GPU}),
        ({"limits": {**EFA, "memory": "2Gi"}},
         {"requests": {"memory": str(2 * 2**30), **EFA}, "limits": EFA}),
        ({"requests": {"memory": "1Gi", "hugepages-2Mi": "4Mi"}, "limits": {"memory": "1Gi", "hugepages-2Mi": "4Mi"}},
         {"requests": {"hugepages-2Mi": HUGE, "memory": str(2**30)}, "limits": {"hugepages-2Mi": HUGE}}),
        # cpu and memory may be overcommitted: a placeholder asks for the requests only (it never uses them)
        ({"requests": {"cpu": "250m"}, "limits": {"cpu": "2", "memory": "1Gi"}},
         {"requests": {"cpu": "250m", "memory": str(2**30)}}),
    ],
)  # fmt: skip
def test_placeholder_limits_for_resources_that_cannot_be_overcommitted(
    resources: dict[str, Any], expected: dict[str, Any]
) -> None:
    (ph,) = build([pod(containers=[{"name": "app", "resources": resources}])])
    assert ph["spec"]["containers"][0]["resources"] == expected


def test_spot_requirement_is_anded_into_every_ored_term() -> None:
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "arch", "operator": "In", "values": ["arm64"]}]},
                    {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}]},
                ]
            },
            "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 1, "preference": {}}],
        }
    }
    the_pod = pod(affinity=affinity)
    (ph,) = build([the_pod])
    node_affinity = ph["spec"]["affinity"]["nodeAffinity"]
    spot = {"key": CT, "operator": "In", "values": ["SPOT"]}
    assert node_affinity["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"] == [
        {"matchExpressions": [{"key": "arch", "operator": "In", "values": ["arm64"]}, spot]},
        {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}], "matchExpressions": [spot]},
    ]
    assert "preferredDuringSchedulingIgnoredDuringExecution" not in node_affinity
    # the pod itself is not changed
    assert the_pod["spec"]["affinity"] == affinity


def test_pod_affinity_terms_keep_their_namespace_and_spread_is_not_copied() -> None:
    anti = {"labelSelector": {"matchLabels": {"app": "web"}}, "topologyKey": "kubernetes.io/hostname"}
    other = {**anti, "namespaces": ["cache"]}
    chosen = {**anti, "namespaceSelector": {}}
    spread = [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "DoNotSchedule",
               "labelSelector": {"matchLabels": {"app": "web"}}}]  # fmt: skip
    affinity = {
        "podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [anti]},
        "podAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [other, chosen],
            "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 1, "podAffinityTerm": anti}],
        },
    }
    (ph,) = build([pod(affinity=affinity, topologySpreadConstraints=spread)])
    got = ph["spec"]["affinity"]
    pinned = {**anti, "namespaces": ["shop"]}
    assert got["podAntiAffinity"] == {"requiredDuringSchedulingIgnoredDuringExecution": [pinned]}
    assert got["podAffinity"] == {"requiredDuringSchedulingIgnoredDuringExecution": [other, chosen]}
    assert "topologySpreadConstraints" not in ph["spec"]


def test_zonal_volume_adds_its_zone() -> None:
    volumes = [{"name": "data", "persistentVolumeClaim": {"claimName": "data-web-1"}}, {"name": "tmp", "emptyDir": {}}]
    the_pod = pod(volumes=volumes)
    zones = {("shop", "data-web-1"): ["us-east-1b"]}
    (ph,) = build([the_pod], zone_of_claim=zones)
    (term,) = ph["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    assert {"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["us-east-1b"]} in term[
        "matchExpressions"
    ]
    assert volume_zones(the_pod, {}) is None
    # two claims in different zones: no zone fits, the placeholder stays Pending and the surge fails
    two = pod(volumes=[*volumes, {"name": "b", "persistentVolumeClaim": {"claimName": "b"}}])
    assert volume_zones(two, {**zones, ("shop", "b"): ["us-east-1a"]}) == []


def test_long_node_names_are_hashed_in_the_label() -> None:
    long = "n" * 80
    assert node_label_value(long).startswith("sha1-") and len(node_label_value(long)) <= 63
    assert node_label_value(NODE) == NODE
    (ph,) = placeholder_pods(long, [pod()], namespace="spotd", capacity_label=CT, spot_values="SPOT")
    assert ph["metadata"]["annotations"]["spotd.io/placeholder-for"] == long
    assert ph["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ][0]["matchExpressions"][0]["values"] == ["SPOT"]


def test_one_placeholder_per_evictable_pod() -> None:
    pods = [pod("a"), pod("b", owner="DaemonSet"), pod("c"), pod("d", phase="Succeeded")]
    assert [p["metadata"]["annotations"]["spotd.io/placeholder-of"] for p in build(pods)] == ["shop/a", "shop/c"]


# ---- the surge verdict -----------------------------------------------------------------------------------


def ph(name: str = "p1", phase: str = "Running", node: str = "spot-1", cap: str | None = "spot", **kw: Any) -> Any:
    return PlaceholderState(name, phase, node if phase != "Pending" else "", cap, **kw)


@pytest.mark.parametrize(
    ("states", "elapsed", "state", "reason"),
    [
        ([ph(), ph("p2", node="spot-2")], 10, SurgeState.READY, "2 placeholder(s) running on Spot node(s)"),
        ([ph(), ph("p2", "Pending", cap=None)], 10, SurgeState.WAITING, "1 of 2"),
        ([ph("p1", "Pending", cap=None, unschedulable="0/3 nodes are available")], 10, SurgeState.WAITING, "0 of 1"),
        ([ph("p1", "Pending", cap=None, unschedulable="0/3 nodes are available")], 900, SurgeState.FAILED,
         "1 of 1 placeholder(s) not running on Spot after 900s (0/3 nodes are available)"),
        ([ph(), ph("p2", node="", phase="Pending", cap=None)], 901, SurgeState.FAILED, "1 of 2"),
        # all ready at the deadline: ready wins
        ([ph()], 5000, SurgeState.READY, "running on Spot"),
        ([ph(), ph("p2", gone=True)], 10, SurgeState.FAILED, "p2 was deleted or preempted"),
        ([ph(terminating=True)], 10, SurgeState.FAILED, "deleted or preempted"),
        ([ph(phase="Failed")], 10, SurgeState.FAILED, "ended (Failed)"),
        ([ph("p1", "Pending", stuck="ImagePullBackOff: no route")], 10, SurgeState.FAILED, "cannot start"),
        ([ph(node="od-1", cap="on-demand")], 10, SurgeState.FAILED, "runs on od-1, capacity type on-demand"),
        # running, capacity type not known yet: wait (the next poll reads the node)
        ([ph(cap=None)], 10, SurgeState.WAITING, "0 of 1"),
        ([], 10, SurgeState.FAILED, "no placeholder"),
    ],
)  # fmt: skip
def test_surge_verdict(states: list[PlaceholderState], elapsed: float, state: SurgeState, reason: str) -> None:
    verdict = surge_verdict(states, NOW + timedelta(seconds=elapsed), NOW, 900)
    assert verdict.state == state
    assert reason in verdict.reason


def test_placeholder_state_from_json() -> None:
    pending = {
        "metadata": {"name": "p1"},
        "spec": {},
        "status": {
            "phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/2"}],
        },
    }
    assert placeholder_state(pending, {}) == PlaceholderState("p1", "Pending", unschedulable="0/2")
    pulling = {
        "metadata": {"name": "p2"},
        "spec": {"nodeName": "spot-1"},
        "status": {
            "phase": "Pending",
            "containerStatuses": [{"state": {"waiting": {"reason": "ErrImagePull", "message": "denied"}}}],
        },
    }
    assert placeholder_state(pulling, {"spot-1": "spot"}).stuck == "ErrImagePull: denied"
    running = {"metadata": {"name": "p3"}, "spec": {"nodeName": "spot-1"}, "status": {"phase": "Running"}}
    assert placeholder_state(running, {"spot-1": "spot"}) == PlaceholderState("p3", "Running", "spot-1", "spot")


# ---- the landing verdict -------------------------------------------------------------------------------------


def seen(name: str, node: str = "", running: bool = True, owner: str = "web-rs") -> PodSeen:
    return PodSeen("shop", name, "ReplicaSet", owner, node, running)


CAP = {"spot-1": "spot", "spot-2": "spot", "od-1": "on-demand", "odd": None}


@pytest.mark.parametrize(
    ("found", "expected", "timed_out", "outcome"),
    [
        ([seen("r1", "spot-1"), seen("r2", "spot-2")], 2, False, (True, False, "running on Spot node(s)")),
        ([seen("r1", "spot-1")], 2, False, None),
        ([seen("r1", "spot-1"), seen("r2", running=False)], 2, False, None),
        ([seen("r1", "od-1")], 2, False, (False, True, "landed on on-demand node(s) ['od-1']")),
        ([seen("r1", "spot-1"), seen("r2", "od-1")], 2, True, (False, True, "on-demand")),
        ([seen("r1", "spot-1")], 2, True, (False, False, "1 of 2 replacement(s) not running")),
        ([seen("r1", "odd")], 1, False, (False, False, "capacity type unknown")),
        ([], 0, False, (True, False, "0 replacement(s)")),
    ],
)
def test_landing_verdict(
    found: list[PodSeen], expected: int, timed_out: bool, outcome: tuple[bool, bool, str] | None
) -> None:
    verdict = landing_verdict(found, CAP, expected, timed_out)
    if outcome is None:
        assert verdict is None
        return
    assert verdict is not None
    assert (verdict.returned, verdict.short) == outcome[:2]
    assert outcome[2] in verdict.reason


def test_what_to_follow_and_replacements() -> None:
    evicted = [pod("web-1"), pod("lonely", owner=None)]
    sibling = seen("web-2", "spot-1")  # already running elsewhere before the drain: not a replacement
    follow = what_to_follow(NODE, evicted, [sibling, seen("other", "spot-1", owner="api-rs")])
    assert follow.owners == {("shop", "ReplicaSet", "web-rs")}
    assert follow.before == {"shop/web-1", "shop/web-2"}  # no uid in these records: their refs
    assert follow.expected == 1
    now = [sibling, seen("web-1", NODE), seen("web-3", "spot-2"), seen("x", "spot-2", owner="api-rs")]
    assert [p.name for p in replacements(now, follow.owners, follow.before, NODE)] == ["web-3"]
    assert pod_seen(pod(owner=None)) is None


def test_every_capacity_label_has_its_spot_spelling() -> None:
    from spotd.controller.placeholders import SPOT_LABEL_VALUES
    from spotd.kube.keys import CAPACITY_TYPE_LABELS, normalize_capacity_type

    assert set(SPOT_LABEL_VALUES) == set(CAPACITY_TYPE_LABELS)
    assert all(normalize_capacity_type(v) == "spot" for values in SPOT_LABEL_VALUES.values() for v in values)


def test_a_statefulset_replacement_keeps_the_name_but_not_the_uid() -> None:
    evicted = pod("db-0", owner="StatefulSet")
    evicted["metadata"]["uid"] = "old"
    follow = what_to_follow(NODE, [evicted], [])
    again = PodSeen("shop", "db-0", "StatefulSet", "web-rs", "spot-1", running=True, uid="new")
    old = PodSeen("shop", "db-0", "StatefulSet", "web-rs", "spot-1", running=True, uid="old")
    assert replacements([again, old], follow.owners, follow.before, NODE) == [again]


def test_placeholder_validates_against_the_kubernetes_schema() -> None:
    import kubernetes_validate

    anti = {"labelSelector": {"matchLabels": {"app": "web"}}, "topologyKey": "kubernetes.io/hostname"}
    the_pod = pod(
        nodeSelector={"team": "shop"},
        tolerations=[{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}],
        affinity={"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [anti]}},
        volumes=[{"name": "data", "persistentVolumeClaim": {"claimName": "d"}}],
    )
    (ph,) = build([the_pod], zone_of_claim={("shop", "d"): ["us-east-1a"]})
    for version in ("1.30", kubernetes_validate.latest_version()):
        kubernetes_validate.validate(ph, version, strict=True)


# ---- against the API server (the fake, which validates pods as kube-apiserver does) ---------------------------


DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    from spotd.sim.controllers import Controllers

    server = FakeApiServer(termination_scale=0.01)
    await server.start()
    server.load_manifests([DEPLOY / "namespace.yaml", DEPLOY / "rbac.yaml", DEPLOY / "placeholder-priorityclass.yaml"])
    server.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})
    controllers = Controllers(server, random.Random(7), time_scale=0.01)
    task = asyncio.get_running_loop().create_task(controllers.run())
    yield server
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await server.stop()


async def test_a_surge_for_a_gpu_node_is_accepted_and_runs_on_spot(api: FakeApiServer, tmp_path: Path) -> None:
    """A GPU pod on an on-demand node: its placeholder must pass the API server's validation (a request for
    nvidia.com/gpu without an equal limit is a 422), or every surge for a GPU node fails at its first create."""
    from spotd.controller.surge import surge
    from spotd.kube.client import make_client

    label = builders.KARPENTER_CAPACITY_LABEL
    gpu_node = {"cpu": "8", "memory": "32Gi", "pods": "110", "nvidia.com/gpu": "1"}
    api.create(builders.node("od-gpu", builders.ON_DEMAND, capacity_label=label, allocatable=gpu_node))
    api.create(builders.node("spot-gpu", builders.SPOT, capacity_label=label, allocatable=gpu_node))
    trainer = builders.pod("trainer", "od-gpu", namespace="shop", requests={"cpu": "2"})
    trainer["spec"]["containers"][0]["resources"]["limits"] = {"nvidia.com/gpu": "1"}
    api.create(trainer)  # requests defaulted from the limit by the API server: nvidia.com/gpu 1
    token = api.service_account_token("spotd", "spotd-controller")
    client = make_client(str(api.write_kubeconfig(tmp_path / "kubeconfig", token=token)))
    try:
        outcome = await surge(
            client,
            "od-gpu",
            [p for p in api.list("Pod") if p["spec"].get("nodeName") == "od-gpu"],
            namespace="spotd",
            capacity_label=label,
            spot_values=["spot"],
            timeout=20,
            log=structlog.get_logger(),
            poll=0.05,
        )
    finally:
        await client.close()
    assert outcome.ready, outcome.reason
    assert list(outcome.nodes) == ["spot-gpu"]


def test_the_embedded_cluster_installs_the_placeholder_class_as_deploy_does() -> None:
    """The embedded cluster stands in for `kubectl apply -k deploy/`: its copy of the class must not drift."""
    import yaml

    from spotd.sim.cluster import PLACEHOLDER_CLASS

    deployed = yaml.safe_load((DEPLOY / "placeholder-priorityclass.yaml").read_text())
    for key in ("value", "globalDefault", "preemptionPolicy"):
        assert PLACEHOLDER_CLASS[key] == deployed[key], key
    assert PLACEHOLDER_CLASS["metadata"]["name"] == deployed["metadata"]["name"]
