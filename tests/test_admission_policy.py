"""deploy/admission-policy.yaml and the pod DELETE policy of deploy/optional/agent-deadline-delete.yaml,
evaluated by a real CEL runtime over the requests the API server would see.

The agent's own requests are built by the agent's code (notice_patch, release_patch) from realistic Nodes and
applied as the API server applies a merge patch, so a later change that writes a new field is refused here
before it is refused by a cluster. `check_agent_pod_delete` runs the pod DELETE scenario over HTTP against
any API server (the fake here; a real kube-apiserver given its URL and tokens).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from lightkube.resources.core_v1 import Node

from spotd.agent.node_patch import AgentState, NodeView, notice_patch, release_patch
from spotd.agent.policy import default_policies, plan_response
from spotd.notices.record import Notice, NoticeKind
from spotd.sim.kubeapi.admission import Denial, ValidatingAdmissionPolicies
from spotd.sim.kubeapi.auth import AdmissionAttributes, UserInfo
from spotd.sim.kubeapi.patch import merge_patch

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
AGENT = "system:serviceaccount:spotd:spotd-agent"
NODE_NAME_CLAIM = "authentication.kubernetes.io/node-name"
A, B = "ip-10-0-1-23.eu-west-1.compute.internal", "ip-10-0-2-45.eu-west-1.compute.internal"
NOW = datetime(2026, 11, 30, 10, 0, tzinfo=UTC)
Doc = dict[str, Any]


OPTIONAL_DELETE = DEPLOY / "optional" / "agent-deadline-delete.yaml"
DELETE_POLICY = "spotd-agent-pod-delete-own-node"


def policy_docs(path: Path = DEPLOY / "admission-policy.yaml") -> list[Doc]:
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d]


def delete_policy_docs() -> list[Doc]:
    """The policy and binding of the optional delete role (not its ClusterRole and binding)."""
    return [d for d in policy_docs(OPTIONAL_DELETE) if d["apiVersion"].startswith("admissionregistration.")]


@pytest.fixture(scope="module")
def policies() -> ValidatingAdmissionPolicies:
    return ValidatingAdmissionPolicies(policy_docs())


def agent_of(node: str | None) -> UserInfo:
    """The agent's pod-bound token: pod name and uid always, the node claim on 1.30+ (1.32+: always)."""
    extra = {
        "authentication.kubernetes.io/pod-name": ["spotd-agent-x7k2q"],
        "authentication.kubernetes.io/pod-uid": ["0b6f8c1e-2f1a-4d3b-9c4e-5a6b7c8d9e0f"],
        "authentication.kubernetes.io/credential-id": ["JTI=5c1f3a2e-8d4b-4c6a-9e7f-1a2b3c4d5e6f"],
    }
    if node is not None:
        extra[NODE_NAME_CLAIM] = [node]
        extra["authentication.kubernetes.io/node-uid"] = ["7d9e2c4a-1b3f-4e5d-8a6c-9f0e1d2c3b4a"]
    groups = ("system:serviceaccounts", "system:serviceaccounts:spotd", "system:authenticated")
    return UserInfo(AGENT, "5e8f1a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b", groups, extra)


KUBELET_A = UserInfo(f"system:node:{A}", "", ("system:nodes", "system:authenticated"))
ADMIN = UserInfo("kubernetes-admin", "", ("system:masters", "system:authenticated"))
NODE_CONTROLLER = UserInfo("system:serviceaccount:kube-system:node-controller", "", ("system:serviceaccounts",))
SPOTD_CONTROLLER = UserInfo("system:serviceaccount:spotd:spotd-controller", "", ("system:serviceaccounts",))


def eks_node(name: str = A, *, taints: list[Doc] | None = None, unschedulable: bool = False) -> Doc:
    """A Node as an EKS managed node group registers it, with what the kubelet and controllers write."""
    spec: Doc = {"podCIDR": "10.0.1.0/24", "podCIDRs": ["10.0.1.0/24"], "providerID": "aws:///eu-west-1a/i-0a1b2c3d"}
    if taints:
        spec["taints"] = taints
    if unschedulable:
        spec["unschedulable"] = True
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "uid": "3f2a1b4c-5d6e-4f70-8192-a3b4c5d6e7f8",
            "resourceVersion": "48213",
            "creationTimestamp": "2026-11-30T08:12:40Z",
            "labels": {
                "beta.kubernetes.io/arch": "amd64",
                "eks.amazonaws.com/capacityType": "SPOT",
                "eks.amazonaws.com/nodegroup": "spot-general",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "node.kubernetes.io/instance-type": "m6i.large",
                "topology.kubernetes.io/zone": "eu-west-1a",
            },
            "annotations": {
                "alpha.kubernetes.io/provided-node-ip": "10.0.1.23",
                "node.alpha.kubernetes.io/ttl": "0",
                "volumes.kubernetes.io/controller-managed-attach-detach": "true",
            },
            "managedFields": [
                {
                    "manager": "kubelet",
                    "operation": "Update",
                    "apiVersion": "v1",
                    "time": "2026-11-30T08:12:40Z",
                    "fieldsType": "FieldsV1",
                    "fieldsV1": {"f:metadata": {"f:labels": {"f:kubernetes.io/hostname": {}}}},
                }
            ],
        },
        "spec": spec,
        "status": {
            "nodeInfo": {
                "architecture": "amd64",
                "bootID": "b0a1c2d3-e4f5-4a6b-8c7d-9e0f1a2b3c4d",
                "containerRuntimeVersion": "containerd://1.7.27",
                "kernelVersion": "6.1.141-165.249.amzn2023.x86_64",
                "kubeProxyVersion": "v1.32.9-eks-1a2b3c4",
                "kubeletVersion": "v1.32.9-eks-1a2b3c4",
                "machineID": "ec2a1b2c3d4e5f6a7b8c9d0e1f2a3b4c",
                "operatingSystem": "linux",
                "osImage": "Amazon Linux 2023.8.20250818",
                "systemUUID": "ec2a1b2c-3d4e-5f6a-7b8c-9d0e1f2a3b4c",
            },
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
        },
    }


DEDICATED = {"key": "dedicated", "value": "batch", "effect": "NoSchedule"}
UNREACHABLE = {"key": "node.kubernetes.io/unreachable", "effect": "NoExecute", "timeAdded": "2026-11-30T09:58:00Z"}


def combine(first: Doc, second: Doc) -> Doc:
    """One merge patch doing what `first` then `second` do (nulls kept: they remove)."""
    result = dict(first)
    for key, value in second.items():
        both = isinstance(value, dict) and isinstance(result.get(key), dict)
        result[key] = combine(result[key], value) if both else value
    return result


def patched(old: Doc, patch: Doc, manager: str = "spotd") -> Doc:
    """The object admission sees: the patch applied, and managedFields rewritten by the API server."""
    new = copy.deepcopy(merge_patch(copy.deepcopy(old), patch))
    new["metadata"]["managedFields"] = [
        *old["metadata"]["managedFields"],
        {"manager": manager, "operation": "Update", "apiVersion": "v1", "time": "2026-11-30T10:00:01Z"},
    ]
    return new


def update(old: Doc, new: Doc, user: UserInfo, subresource: str = "") -> AdmissionAttributes:
    name = old["metadata"]["name"]
    return AdmissionAttributes("UPDATE", "", "v1", "nodes", subresource, "Node", name, "", new, old, user)


def view(node: Doc) -> NodeView:
    return NodeView.from_node(Node.from_dict(copy.deepcopy(node)))


def notice(kind: NoticeKind, source: str = "imds") -> Notice:
    deadline = {NoticeKind.SPOT_ITN: NOW + timedelta(minutes=2), NoticeKind.SCHEDULED_MAINTENANCE: NOW}.get(kind)
    return Notice(kind, source, NOW, deadline, action="terminate", event_id="instance-event-0a1b")


# ---- what the agent really sends, step by step ----


def act(node: Doc, kind: NoticeKind, state: AgentState | None = None, source: str = "imds") -> tuple[Doc, Doc]:
    """(patch, node after it) for the agent acting on a notice, as the responder computes them."""
    n = notice(kind, source)
    response = plan_response(n, default_policies())
    current = view(node)
    if state is None:
        state = AgentState(n.key, tuple(str(s) for s in response.steps), current.unschedulable, current.boot_id)
    patch = notice_patch(current, response, state)
    assert patch is not None, "the agent would send nothing"
    return patch, patched(node, patch)


def release(node: Doc) -> tuple[Doc, Doc]:
    current = view(node)
    patch = release_patch(current, AgentState.from_json(current.annotations.get("spotd.io/state")))
    assert patch is not None, "the agent would send nothing"
    return patch, patched(node, patch)


def itn_then_nothing(node: Doc) -> list[tuple[Doc, Doc]]:
    _, after = act(node, NoticeKind.SPOT_ITN)
    return [(node, after)]


def rebalance_then_itn(node: Doc) -> list[tuple[Doc, Doc]]:
    _, tainted = act(node, NoticeKind.REBALANCE)
    _, escalated = act(tainted, NoticeKind.SPOT_ITN)
    return [(node, tainted), (tainted, escalated)]


def maintenance_then_release(node: Doc) -> list[tuple[Doc, Doc]]:
    _, cordoned = act(node, NoticeKind.SCHEDULED_MAINTENANCE)
    _, released = release(cordoned)
    return [(node, cordoned), (cordoned, released)]


def simulation_then_release(node: Doc) -> list[tuple[Doc, Doc]]:
    _, acted = act(node, NoticeKind.SPOT_ITN, source="simulation")
    _, released = release(acted)
    return [(node, acted), (acted, released)]


def uncordoned_by_operator_then_recordoned(node: Doc) -> list[tuple[Doc, Doc]]:
    _, acted = act(node, NoticeKind.SCHEDULED_MAINTENANCE)
    operator = merge_patch(copy.deepcopy(acted), {"spec": {"unschedulable": None}})
    state = AgentState.from_json(view(acted).annotations["spotd.io/state"])
    _, again = act(operator, NoticeKind.SCHEDULED_MAINTENANCE, state)
    return [(node, acted), (operator, again)]


def state_rewritten(node: Doc) -> list[tuple[Doc, Doc]]:
    """Only the spotd.io/state annotation changes (the steps of the notice in hand)."""
    _, acted = act(node, NoticeKind.SPOT_ITN)
    state = AgentState.from_json(view(acted).annotations["spotd.io/state"])
    assert state is not None
    _, rewritten = act(acted, NoticeKind.SPOT_ITN, AgentState(state.notice_key, ("taint",), False, state.boot_id))
    return [(acted, rewritten)]


SEQUENCES: dict[str, Callable[[Doc], list[tuple[Doc, Doc]]]] = {
    "itn": itn_then_nothing,
    "rebalance-then-itn": rebalance_then_itn,
    "maintenance-then-release": maintenance_then_release,
    "simulation-then-release": simulation_then_release,
    "operator-uncordon-then-recordon": uncordoned_by_operator_then_recordoned,
    "state-annotation-rewritten": state_rewritten,
}
NODES = {
    "bare": lambda: eks_node(),
    "other-taints": lambda: eks_node(taints=[DEDICATED, UNREACHABLE]),
    "cordoned-before": lambda: eks_node(unschedulable=True),
    "lb-excluded-before": lambda: merge_patch(
        eks_node(), {"metadata": {"labels": {"node.kubernetes.io/exclude-from-external-load-balancers": "true"}}}
    ),
}


@pytest.mark.parametrize("node_kind", sorted(NODES))
@pytest.mark.parametrize("sequence", sorted(SEQUENCES))
def test_every_patch_the_agent_sends_to_its_own_node_is_admitted(
    policies: ValidatingAdmissionPolicies, sequence: str, node_kind: str
) -> None:
    steps = SEQUENCES[sequence](NODES[node_kind]())
    for old, new in steps:
        assert new != old
        assert policies.check(update(old, new, agent_of(A))) is None, (old, new)


def test_the_sequences_cover_every_field_the_agent_writes() -> None:
    """Taint added, replaced and removed; cordon and uncordon; LB label on and off; annotations on, changed, off."""
    seen: set[str] = set()
    for sequence in SEQUENCES.values():
        for old, new in sequence(NODES["other-taints"]()):
            ours = [[t for t in n["spec"].get("taints", []) if t["key"].startswith("spotd.io/")] for n in (old, new)]
            if ours[0] != ours[1]:
                seen.add("taint " + ("added" if not ours[0] else "removed" if not ours[1] else "changed"))
            if bool(old["spec"].get("unschedulable")) != bool(new["spec"].get("unschedulable")):
                seen.add("uncordon" if old["spec"].get("unschedulable") else "cordon")
            for part in ("labels", "annotations"):
                before, after = old["metadata"].get(part, {}), new["metadata"].get(part, {})
                for key in before.keys() | after.keys():
                    if before.get(key) != after.get(key):
                        seen.add(
                            f"{part} "
                            + ("added" if key not in before else "removed" if key not in after else "changed")
                        )
    assert seen >= {
        "taint added",
        "taint changed",
        "taint removed",
        "cordon",
        "uncordon",
        "labels added",
        "labels removed",
        "annotations added",
        "annotations changed",
        "annotations removed",
    }, seen


# ---- other writers: untouched by the policy ----

OTHERS = {
    "kubelet relabels and reports status": (
        KUBELET_A,
        {"metadata": {"labels": {"node.kubernetes.io/instance-type": "m6i.xlarge"}}, "status": {"phase": "Running"}},
    ),
    "admin labels control-plane": (ADMIN, {"metadata": {"labels": {"node-role.kubernetes.io/control-plane": ""}}}),
    "admin sets providerID and podCIDR": (ADMIN, {"spec": {"providerID": "aws:///x/i-9", "podCIDR": "10.9.0.0/24"}}),
    "node controller taints": (NODE_CONTROLLER, {"spec": {"taints": [UNREACHABLE]}}),
    "spotd controller cordons": (SPOTD_CONTROLLER, {"spec": {"unschedulable": True}}),
}


@pytest.mark.parametrize("case", sorted(OTHERS))
def test_other_users_are_not_matched(policies: ValidatingAdmissionPolicies, case: str) -> None:
    user, patch = OTHERS[case]
    old = eks_node(B)
    assert policies.check(update(old, patched(old, patch), user)) is None


# ---- what the agent must not do ----

OWN_NODE_REFUSALS: dict[str, tuple[Doc, str]] = {
    "instance-type label": (
        {"metadata": {"labels": {"node.kubernetes.io/instance-type": "p5.48xlarge"}}},
        "not node.kubernetes.io/instance-type",
    ),
    "control-plane label added": (
        {"metadata": {"labels": {"node-role.kubernetes.io/control-plane": ""}}},
        "not node-role.kubernetes.io/control-plane",
    ),
    "zone label removed": (
        {"metadata": {"labels": {"topology.kubernetes.io/zone": None}}},
        "topology.kubernetes.io/zone",
    ),
    "another taint added": (
        {"spec": {"taints": [DEDICATED, UNREACHABLE, {"key": "gpu", "effect": "NoSchedule"}]}},
        "only spotd.io/ taints",
    ),
    "another taint removed": ({"spec": {"taints": [DEDICATED]}}, "only spotd.io/ taints"),
    "another taint's effect changed": (
        {"spec": {"taints": [{**DEDICATED, "effect": "PreferNoSchedule"}, UNREACHABLE]}},
        "only spotd.io/ taints",
    ),
    "another annotation changed": (
        {"metadata": {"annotations": {"node.alpha.kubernetes.io/ttl": "30"}}},
        "not node.alpha.kubernetes.io/ttl",
    ),
    "another annotation added": (
        {"metadata": {"annotations": {"cluster-autoscaler.kubernetes.io/scale-down-disabled": "true"}}},
        "not cluster-autoscaler.kubernetes.io/scale-down-disabled",
    ),
    "providerID": ({"spec": {"providerID": "aws:///eu-west-1b/i-0fffffff"}}, "not spec.providerID"),
    "podCIDR": ({"spec": {"podCIDR": "10.0.9.0/24", "podCIDRs": ["10.0.9.0/24"]}}, "spec.podCIDR"),
    "ownerReferences": (
        {"metadata": {"ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": "x", "uid": "u"}]}},
        "metadata.ownerReferences",
    ),
    "finalizers": ({"metadata": {"finalizers": ["spotd.io/keep"]}}, "metadata.finalizers"),
}


@pytest.mark.parametrize("case", sorted(OWN_NODE_REFUSALS))
def test_own_node_but_not_spotd_fields_is_refused(policies: ValidatingAdmissionPolicies, case: str) -> None:
    patch, says = OWN_NODE_REFUSALS[case]
    old = eks_node(taints=[DEDICATED, UNREACHABLE])
    # With what the agent legitimately does in the same request: the refusal is for the extra field alone.
    legit, _ = act(old, NoticeKind.SPOT_ITN)
    combined = combine(legit, patch)
    if "taints" in patch.get("spec", {}):
        combined["spec"]["taints"] = [*patch["spec"]["taints"], *legit["spec"]["taints"][-1:]]
    denial = policies.check(update(old, patched(old, combined), agent_of(A)))
    assert isinstance(denial, Denial), case
    assert (denial.code, denial.reason) == (403, "Forbidden")  # the validations' reason: Forbidden
    assert denial.message.startswith(f"nodes \"{A}\" is forbidden: ValidatingAdmissionPolicy 'spotd-agent-node-fields'")
    assert says in denial.message and f"of node {A}" in denial.message, denial.message


def test_agent_of_one_node_may_not_patch_another(policies: ValidatingAdmissionPolicies) -> None:
    other = eks_node(B)
    _, after = act(other, NoticeKind.SPOT_ITN)  # exactly what it would do to its own node
    denial = policies.check(update(other, after, agent_of(A)))
    assert denial == Denial(
        403,
        "Forbidden",
        f"nodes \"{B}\" is forbidden: ValidatingAdmissionPolicy 'spotd-agent-own-node' with binding "
        f"'spotd-agent-own-node' denied request: spotd-agent of node {A} may not change node {B}",
        f"ValidatingAdmissionPolicy 'spotd-agent-own-node' with binding 'spotd-agent-own-node' denied request: "
        f"spotd-agent of node {A} may not change node {B}",
    )


@pytest.mark.parametrize(
    "user",
    [
        agent_of(None),
        UserInfo(AGENT, "", ("system:serviceaccounts",), {}),  # a legacy Secret token: no extra at all
        UserInfo(AGENT, "", (), {NODE_NAME_CLAIM: []}),
        UserInfo(AGENT, "", (), {NODE_NAME_CLAIM: [A, B]}),
    ],
    ids=["pod-token-without-claim", "no-extra", "empty-claim", "two-nodes"],
)
def test_a_token_without_one_node_name_is_refused_everywhere(
    policies: ValidatingAdmissionPolicies, user: UserInfo
) -> None:
    node = eks_node(A)
    _, after = act(node, NoticeKind.SPOT_ITN)
    denial = policies.check(update(node, after, user))
    assert denial is not None and denial.code == 403
    assert "its token names none" in denial.message and "spotd-agent-own-node" in denial.message


def test_status_subresource_is_refused(policies: ValidatingAdmissionPolicies) -> None:
    node = eks_node(A)
    new = patched(node, {"status": {"conditions": [{"type": "Ready", "status": "False"}]}})
    denial = policies.check(update(node, new, agent_of(A), subresource="status"))
    assert denial is not None and f"may not write nodes/status of node {A}" in denial.message


def test_requests_the_policy_does_not_constrain(policies: ValidatingAdmissionPolicies) -> None:
    node = eks_node(B)
    delete = AdmissionAttributes("DELETE", "", "v1", "nodes", "", "Node", B, "", None, node, agent_of(A))
    assert policies.check(delete) is None  # RBAC gives the agent no delete; the policy is about UPDATE
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "default"}}
    evict = AdmissionAttributes("UPDATE", "", "v1", "pods", "", "Pod", "p", "default", pod, pod, agent_of(A))
    assert policies.check(evict) is None


# ---- the optional pod DELETE: only pods on the agent's own node ----


@pytest.fixture(scope="module")
def delete_policy() -> ValidatingAdmissionPolicies:
    return ValidatingAdmissionPolicies(delete_policy_docs())


def pod_on(node: str | None, name: str = "web-7d4b9c-x2k8p", namespace: str = "shop") -> Doc:
    """A Pod as stored: what the API server hands admission as oldObject on its DELETE."""
    spec: Doc = {"containers": [{"name": "web", "image": "nginx:1.27"}], "terminationGracePeriodSeconds": 30}
    if node is not None:
        spec["nodeName"] = node
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "uid": "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"},
        "spec": spec,
        "status": {"phase": "Running" if node else "Pending"},
    }


def pod_delete(pod: Doc, user: UserInfo, *, collection: bool = False) -> AdmissionAttributes:
    """A pod DELETE as admission sees it: object null, oldObject the stored pod. For each pod of a
    deletecollection the API server keeps the request's empty name (rest.AdmissionToValidateObjectDeleteFunc
    with the collection's static attributes) and passes the pod as oldObject."""
    meta = pod["metadata"]
    name = "" if collection else meta["name"]
    return AdmissionAttributes("DELETE", "", "v1", "pods", "", "Pod", name, meta["namespace"], None, pod, user)


@pytest.mark.parametrize("collection", [False, True], ids=["delete", "deletecollection-item"])
def test_the_agent_may_delete_a_pod_on_its_own_node(delete_policy: ValidatingAdmissionPolicies, collection) -> None:
    assert delete_policy.check(pod_delete(pod_on(A), agent_of(A), collection=collection)) is None


@pytest.mark.parametrize("collection", [False, True], ids=["delete", "deletecollection-item"])
def test_the_agent_may_not_delete_a_pod_on_another_node(delete_policy: ValidatingAdmissionPolicies, collection) -> None:
    denial = delete_policy.check(pod_delete(pod_on(B), agent_of(A), collection=collection))
    assert denial is not None and (denial.code, denial.reason) == (403, "Forbidden")
    assert denial.cause.endswith(
        f"spotd-agent of node {A} may not delete pod shop/web-7d4b9c-x2k8p, which is on node {B}"
    )
    assert f"ValidatingAdmissionPolicy '{DELETE_POLICY}' with binding '{DELETE_POLICY}'" in denial.message


def test_the_agent_may_not_delete_a_pod_on_no_node(delete_policy: ValidatingAdmissionPolicies) -> None:
    denial = delete_policy.check(pod_delete(pod_on(None), agent_of(A)))
    assert denial is not None and denial.code == 403 and denial.cause.endswith("which is on no node")


def test_a_token_without_a_node_name_may_delete_no_pod(delete_policy: ValidatingAdmissionPolicies) -> None:
    denial = delete_policy.check(pod_delete(pod_on(A), agent_of(None)))
    assert denial is not None and denial.code == 403
    assert "its token names none (no authentication.kubernetes.io/node-name claim)" in denial.cause


@pytest.mark.parametrize("user", [KUBELET_A, ADMIN, NODE_CONTROLLER, SPOTD_CONTROLLER], ids=lambda u: u.username)
def test_the_delete_policy_matches_only_the_agent(delete_policy: ValidatingAdmissionPolicies, user: UserInfo) -> None:
    assert delete_policy.check(pod_delete(pod_on(B), user)) is None


def test_what_the_delete_policy_does_not_hold(delete_policy: ValidatingAdmissionPolicies) -> None:
    # An eviction is a CREATE of pods/eviction whose object is the Eviction: it names the pod, not its node,
    # and oldObject is null, so no policy can tie it to the agent's node (docs/agent.md). Evictions stay
    # bounded by PodDisruptionBudgets alone.
    eviction = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": "web", "namespace": "shop"}}
    evict = AdmissionAttributes(
        "CREATE", "", "v1", "pods", "eviction", "Eviction", "web", "shop", eviction, None, agent_of(A)
    )
    assert delete_policy.check(evict) is None


def test_the_delete_role_comes_with_its_policy_and_grants_only_delete() -> None:
    docs = policy_docs(OPTIONAL_DELETE)
    kinds = [d["kind"] for d in docs]
    # `kubectl apply -f` creates in order: the policy is there before the role is bound.
    assert kinds == [
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
        "ClusterRole",
        "ClusterRoleBinding",
    ]
    (role,) = [d for d in docs if d["kind"] == "ClusterRole"]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["delete"]}]  # no deletecollection
    policy = docs[0]
    assert policy["spec"]["matchConstraints"]["resourceRules"] == [
        {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["DELETE"], "resources": ["pods"]}
    ]
    assert all(v.get("reason") == "Forbidden" for v in policy["spec"]["validations"])


@pytest.mark.parametrize("version", ["1.30", "latest"])
def test_the_optional_manifest_validates_against_kubernetes_schema(version: str) -> None:
    import kubernetes_validate

    for doc in policy_docs(OPTIONAL_DELETE):
        kubernetes_validate.validate(
            doc, kubernetes_validate.latest_version() if version == "latest" else version, strict=True
        )


# ---- the manifest agrees with the rest of deploy/ ----


def test_match_condition_names_the_agents_service_account() -> None:
    with (DEPLOY / "kustomization.yaml").open() as f:
        namespace = yaml.safe_load(f)["namespace"]
    with (DEPLOY / "daemonset.yaml").open() as f:
        account = yaml.safe_load(f)["spec"]["template"]["spec"]["serviceAccountName"]
    username = f"system:serviceaccount:{namespace}:{account}"
    assert username == AGENT
    docs = [*policy_docs(), *delete_policy_docs()]
    policies = [d for d in docs if d["kind"] == "ValidatingAdmissionPolicy"]
    assert DELETE_POLICY in {p["metadata"]["name"] for p in policies}
    for policy in policies:
        (condition,) = policy["spec"]["matchConditions"]
        assert f"request.userInfo.username == '{username}'" in condition["expression"]
        assert policy["spec"]["failurePolicy"] == "Fail"
    bindings = [d for d in docs if d["kind"] == "ValidatingAdmissionPolicyBinding"]
    assert sorted((b["spec"]["policyName"], tuple(b["spec"]["validationActions"])) for b in bindings) == sorted(
        (p["metadata"]["name"], ("Deny",)) for p in policies
    )
    assert all("paramRef" not in b["spec"] and "namespace" not in b["metadata"] for b in bindings)


# ---- the evaluator itself: what the API server does with a policy ----


def small_policy(validation: Doc, failure: str = "Fail", resources: tuple[str, ...] = ("nodes",)) -> Doc:
    rule = {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["UPDATE"], "resources": list(resources)}
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": "p"},
        "spec": {"failurePolicy": failure, "matchConstraints": {"resourceRules": [rule]}, "validations": [validation]},
    }


def binding(actions: tuple[str, ...] = ("Deny",)) -> Doc:
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": "b"},
        "spec": {"policyName": "p", "validationActions": list(actions)},
    }


def node_update(subresource: str = "") -> AdmissionAttributes:
    node = eks_node(A)
    return update(node, node, ADMIN, subresource)


@pytest.mark.parametrize(
    ("validation", "code", "message"),
    [
        ({"expression": "false"}, 422, "failed expression: false"),
        ({"expression": "false", "message": "no"}, 422, "no"),
        ({"expression": "false", "message": "no", "messageExpression": "'node ' + request.name"}, 422, f"node {A}"),
        ({"expression": "false", "message": "no", "messageExpression": "'two\\nlines'"}, 422, "no"),
        ({"expression": "false", "reason": "Forbidden", "message": "no"}, 403, "no"),
        ({"expression": "object.spec.nosuch == 1"}, 422, "expression 'object.spec.nosuch == 1' resulted in error"),
    ],
)
def test_denial_as_the_api_server_words_it(validation: Doc, code: int, message: str) -> None:
    denial = ValidatingAdmissionPolicies([small_policy(validation), binding()]).check(node_update())
    assert denial is not None and denial.code == code
    assert denial.message.startswith(f"nodes \"{A}\" is forbidden: ValidatingAdmissionPolicy 'p' with binding 'b' ")
    assert denial.cause.startswith("ValidatingAdmissionPolicy 'p' with binding 'b' denied request: " + message)


def test_ignore_warn_unbound_and_unmatched_admit() -> None:
    error = {"expression": "object.spec.nosuch == 1"}
    assert ValidatingAdmissionPolicies([small_policy(error, "Ignore"), binding()]).check(node_update()) is None
    refuse = {"expression": "false"}
    assert ValidatingAdmissionPolicies([small_policy(refuse), binding(("Warn", "Audit"))]).check(node_update()) is None
    assert ValidatingAdmissionPolicies([small_policy(refuse)]).check(node_update()) is None
    assert ValidatingAdmissionPolicies([small_policy(refuse), binding()]).check(node_update("status")) is None


@pytest.mark.parametrize(
    ("resources", "subresource", "matched"),
    [
        (("nodes",), "", True),
        (("nodes",), "status", False),
        (("nodes/*",), "status", True),
        (("nodes/*",), "", False),
        (("*",), "", True),
        (("*",), "status", False),
        (("*/status",), "status", True),
        (("*/*",), "status", True),
        (("pods",), "", False),
    ],
)
def test_resource_rules(resources: tuple[str, ...], subresource: str, matched: bool) -> None:
    policies = ValidatingAdmissionPolicies([small_policy({"expression": "false"}, resources=resources), binding()])
    assert (policies.check(node_update(subresource)) is not None) == matched


def test_unsupported_or_broken_policies_are_refused_on_load() -> None:
    with pytest.raises(ValueError, match="compilation failed"):
        ValidatingAdmissionPolicies([small_policy({"expression": "object.spec +"})])
    with pytest.raises(ValueError, match="paramKind"):
        policy = small_policy({"expression": "true"})
        policy["spec"]["paramKind"] = {"apiVersion": "v1", "kind": "ConfigMap"}
        ValidatingAdmissionPolicies([policy])


@pytest.mark.parametrize(
    ("condition", "failure", "refused"),
    [
        ("request.userInfo.username == 'kubernetes-admin'", "Fail", True),
        ("request.userInfo.username == 'someone-else'", "Fail", False),
        ("request.userInfo.extra['x'][0] == 'y'", "Fail", True),  # ADMIN has no extra: an error
        ("request.userInfo.extra['x'][0] == 'y'", "Ignore", False),
    ],
)
def test_match_conditions(condition: str, failure: str, refused: bool) -> None:
    policy = small_policy({"expression": "false", "message": "refused"}, failure)
    policy["spec"]["matchConditions"] = [{"name": "c", "expression": condition}]
    denial = ValidatingAdmissionPolicies([policy, binding()]).check(node_update())
    assert (denial is not None) == refused
    if denial is not None and "error" in denial.message:
        assert "matchCondition 'c' resulted in error" in denial.cause


def test_object_selector_and_binding_match_resources() -> None:
    policy = small_policy({"expression": "false"})
    selected = {"matchLabels": {"eks.amazonaws.com/capacityType": "SPOT"}}
    policy["spec"]["matchConstraints"]["objectSelector"] = selected
    assert ValidatingAdmissionPolicies([policy, binding()]).check(node_update()) is not None
    selected["matchLabels"] = {"eks.amazonaws.com/capacityType": "ON_DEMAND"}
    assert ValidatingAdmissionPolicies([policy, binding()]).check(node_update()) is None
    narrowed = binding()
    narrowed["spec"]["matchResources"] = {"resourceRules": [{**policy["spec"]["matchConstraints"]["resourceRules"][0]}]}
    narrowed["spec"]["matchResources"]["resourceRules"][0]["resourceNames"] = [B]
    del policy["spec"]["matchConstraints"]["objectSelector"]
    assert ValidatingAdmissionPolicies([policy, narrowed]).check(node_update()) is None  # node A, binding names B


def test_check_never_raises() -> None:
    policies = ValidatingAdmissionPolicies(policy_docs())
    odd = AdmissionAttributes("UPDATE", "", "v1", "nodes", "", "Node", A, "", None, None, agent_of(A))
    denial = policies.check(odd)  # object null on an UPDATE: an evaluation error, refused as failurePolicy says
    assert denial is not None and denial.code == 422 and "resulted in error" in denial.message


def test_a_failed_variable_fails_only_the_expressions_that_use_it() -> None:
    policy = small_policy({"expression": "true"})
    policy["spec"]["variables"] = [
        {"name": "broken", "expression": "object.spec.nosuch"},
        {"name": "derived", "expression": "variables.broken + 1"},
    ]
    assert ValidatingAdmissionPolicies([policy, binding()]).check(node_update()) is None
    policy["spec"]["validations"].append({"expression": "variables.derived > 0"})
    denial = ValidatingAdmissionPolicies([policy, binding()]).check(node_update())
    assert denial is not None
    assert "expression 'variables.derived > 0' resulted in error: variable 'broken' resulted in error" in denial.cause


# ---- the fake API server applies the shipped policy, over a real socket ----


async def test_the_fake_api_server_applies_the_shipped_policy(tmp_path: Path) -> None:
    import httpx

    from spotd.sim.kubeapi import FakeApiServer

    api = FakeApiServer()
    await api.start()
    try:
        api.load_manifests([DEPLOY])
        for name in (A, "node-b"):
            api.create(eks_node(name))
        token = api.service_account_token("spotd", "spotd-agent", node_name=A)

        async def patch(name: str, body: Doc) -> httpx.Response:
            async with httpx.AsyncClient(base_url=api.url, verify=False) as http:
                return await http.patch(
                    f"/api/v1/nodes/{name}",
                    json=body,
                    headers={"Authorization": f"Bearer {token}", "Content-Type": "application/merge-patch+json"},
                )

        own = await patch(A, {"spec": {"unschedulable": True}})
        assert own.status_code == 200, own.text
        other = await patch("node-b", {"spec": {"unschedulable": True}})
        assert other.status_code == 403 and other.json()["reason"] == "Forbidden"
        assert "ValidatingAdmissionPolicy 'spotd-agent-own-node'" in other.json()["message"]
        beyond = await patch(A, {"metadata": {"labels": {"node-role.kubernetes.io/control-plane": ""}}})
        assert beyond.status_code == 403 and beyond.json()["reason"] == "Forbidden"
        assert api.get("Node", "node-b")["spec"].get("unschedulable") is not True
    finally:
        await api.stop()


# ---- the optional pod DELETE over HTTP: the same scenario for the fake and a real kube-apiserver ----


async def check_agent_pod_delete(
    url: str,
    admin_token: str,
    agent_token: str,
    own_node: str,
    other_node: str,
    *,
    agent_token_without_node: str | None = None,
    namespace: str = "default",
    verify: bool | str = False,
) -> None:
    """With deploy/ and deploy/optional/agent-deadline-delete.yaml applied, the agent (`agent_token`: its
    ServiceAccount's token bound to a pod on `own_node`) may delete a pod on its own node and is refused (403,
    the policy's message) for a pod on `other_node`, for a pod on no node and, with a token that names no node,
    for any pod; its DELETE of a collection is refused (RBAC: the role grants no deletecollection). Both nodes
    must exist; no kubelet is needed (a graceful delete only marks the pod). `verify`: the server's CA file.
    Creates pods named spotd-delete-* in `namespace` as the admin and removes them at the end."""
    import httpx

    def pod(name: str, node: str | None) -> Doc:
        spec: Doc = {"containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10"}]}
        if node is not None:
            spec["nodeName"] = node
        else:
            spec["schedulerName"] = "spotd-test-none"  # no such scheduler: on a real cluster it stays on no node
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace}, "spec": spec}

    pods_url = f"/api/v1/namespaces/{namespace}/pods"
    admin = httpx.AsyncClient(base_url=url, verify=verify, headers={"Authorization": f"Bearer {admin_token}"})
    agent = httpx.AsyncClient(base_url=url, verify=verify, headers={"Authorization": f"Bearer {agent_token}"})
    names = {"own": own_node, "other": other_node, "pending": None}
    try:
        for suffix, node in names.items():
            created = await admin.post(pods_url, json=pod(f"spotd-delete-{suffix}", node))
            assert created.status_code == 201, created.text

        async def agent_delete(client: httpx.AsyncClient, suffix: str) -> httpx.Response:
            # As the agent's deadline action sends it: graceful, never below 1 s.
            return await client.request("DELETE", f"{pods_url}/spotd-delete-{suffix}", json={"gracePeriodSeconds": 1})

        async def untouched(suffix: str) -> bool:
            found = await admin.get(f"{pods_url}/spotd-delete-{suffix}")
            return found.status_code == 200 and not found.json()["metadata"].get("deletionTimestamp")

        refusal = f"ValidatingAdmissionPolicy '{DELETE_POLICY}' with binding '{DELETE_POLICY}' denied request: "
        other = await agent_delete(agent, "other")
        assert other.status_code == 403, other.text
        assert other.json()["reason"] == "Forbidden"
        assert other.json()["message"] == (
            f'pods "spotd-delete-other" is forbidden: {refusal}spotd-agent of node {own_node} may not delete pod '
            f"{namespace}/spotd-delete-other, which is on node {other_node}"
        )
        assert await untouched("other")
        pending = await agent_delete(agent, "pending")
        assert pending.status_code == 403 and pending.json()["message"].endswith("which is on no node"), pending.text
        assert await untouched("pending")

        collection = await agent.request("DELETE", pods_url, params={"fieldSelector": f"spec.nodeName={other_node}"})
        assert collection.status_code == 403, collection.text
        assert "cannot deletecollection resource" in collection.json()["message"]
        assert await untouched("other")

        if agent_token_without_node is not None:
            headers = {"Authorization": f"Bearer {agent_token_without_node}"}
            async with httpx.AsyncClient(base_url=url, verify=verify, headers=headers) as unbound:
                refused = await agent_delete(unbound, "own")
            assert refused.status_code == 403, refused.text
            assert "its token names none (no authentication.kubernetes.io/node-name claim)" in refused.text
            assert await untouched("own")

        own = await agent_delete(agent, "own")
        assert own.status_code == 200, own.text
        assert not await untouched("own")  # marked for deletion (or already gone)
    finally:
        for suffix in names:
            await admin.request("DELETE", f"{pods_url}/spotd-delete-{suffix}", json={"gracePeriodSeconds": 0})
        await admin.aclose()
        await agent.aclose()


async def test_the_fake_api_server_holds_the_agents_pod_delete_to_its_node() -> None:
    from spotd.sim.kubeapi import ADMIN_TOKEN, FakeApiServer

    api = FakeApiServer(report_access=False)  # the refusals are the point: keep them out of the permission check
    await api.start()
    try:
        api.load_manifests([DEPLOY, OPTIONAL_DELETE])
        for name in (A, B):
            api.create(eks_node(name))
        await check_agent_pod_delete(
            api.url,
            ADMIN_TOKEN,
            api.service_account_token("spotd", "spotd-agent", node_name=A),
            A,
            B,
            agent_token_without_node=api.service_account_token("spotd", "spotd-agent"),
        )
    finally:
        await api.stop()
