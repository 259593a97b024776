"""The inventory: slim records from raw JSON, malformed and unknown events, and the watch against the fake API."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from spotd.inventory.cache import Gone, Inventory, Malformed
from spotd.inventory.records import (
    POD_DAEMONSET,
    POD_LOCAL_STORAGE,
    POD_NOT_SAFE_TO_EVICT,
    POD_UNREPLICATED,
    POD_UNSCHEDULABLE,
    NodePods,
)
from spotd.kube.client import make_client
from spotd.kube.keys import ON_DEMAND, SPOT


def pod(
    name: str,
    node: str | None = "n1",
    *,
    ns: str = "default",
    owner: str | None = "ReplicaSet",
    annotations: dict[str, str] | None = None,
    empty_dir: bool = False,
    phase: str = "Running",
    unschedulable: bool = False,
    message: str | None = None,
    terminating: bool = False,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": ns, "resourceVersion": "7"}
    if owner:
        meta["ownerReferences"] = [{"kind": owner, "name": f"{name}-owner", "controller": True}]
    if annotations:
        meta["annotations"] = annotations
    if terminating:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    spec: dict[str, Any] = {"containers": [{"name": "c", "image": "x"}]}
    if node:
        spec["nodeName"] = node
    if empty_dir:
        spec["volumes"] = [{"name": "cache", "emptyDir": {}}]
    status: dict[str, Any] = {"phase": phase}
    if unschedulable:
        status["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}]
        if message:
            status["conditions"][0]["message"] = message
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec, "status": status}


def node(name: str, labels: dict[str, str] | None = None, **kw: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "resourceVersion": "3",
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "labels": labels or {},
            "annotations": kw.get("annotations", {}),
        },
        "spec": {"providerID": "aws:///eu-west-1a/i-0123456789abcdef0", "unschedulable": kw.get("cordoned", False)},
        "status": {"conditions": [{"type": "Ready", "status": "True" if kw.get("ready", True) else "False"}]},
    }


def raw(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def make() -> Inventory:
    return Inventory(None)  # type: ignore[arg-type]  # no I/O in these tests


def test_pod_flags() -> None:
    inv = make()
    inv.apply_pod("ADDED", raw(pod("web")))
    inv.apply_pod("ADDED", raw(pod("ds", owner="DaemonSet")))
    inv.apply_pod("ADDED", raw(pod("bare", owner=None)))
    inv.apply_pod("ADDED", raw(pod("cache", empty_dir=True)))
    inv.apply_pod("ADDED", raw(pod("db", annotations={"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"})))
    inv.apply_pod("ADDED", raw(pod("wait", node=None, phase="Pending", unschedulable=True)))
    flags = {k[1]: r.flags for k, r in inv.pods.items()}
    assert flags == {
        "web": 0,
        "ds": POD_DAEMONSET,
        "bare": POD_UNREPLICATED,
        "cache": POD_LOCAL_STORAGE,
        "db": POD_NOT_SAFE_TO_EVICT,
        "wait": POD_UNSCHEDULABLE,
    }
    assert inv.pending_unschedulable == 1
    assert inv.node_pods("n1") == NodePods(
        evictable=4,
        not_safe_to_evict=("default/db",),
        unreplicated=("default/bare",),
        local_storage=("default/cache",),
    )


def test_pending_for_lack_of_capacity_only_and_terminating_pods_ignored() -> None:
    inv = make()
    full = "0/5 nodes are available: 3 Insufficient cpu, 2 node(s) didn't match Pod's node affinity/selector."
    inv.apply_pod("ADDED", raw(pod("cpu", node=None, phase="Pending", unschedulable=True, message=full)))
    inv.apply_pod(
        "ADDED",
        raw(
            pod(
                "pods",
                node=None,
                phase="Pending",
                unschedulable=True,
                message="0/3 nodes are available: 3 Too many pods.",
            )
        ),
    )
    selector = "0/5 nodes are available: 5 node(s) didn't match Pod's node affinity/selector."
    inv.apply_pod("ADDED", raw(pod("sel", node=None, phase="Pending", unschedulable=True, message=selector)))
    assert inv.pending_unschedulable == 2
    inv.apply_pod(
        "ADDED",
        raw(pod("going", terminating=True, annotations={"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"})),
    )
    assert inv.node_pods("n1") == NodePods()


def test_safe_to_evict_true_vouches_for_local_storage_only() -> None:
    inv = make()
    inv.apply_pod(
        "ADDED",
        raw(
            pod("p", owner=None, empty_dir=True, annotations={"cluster-autoscaler.kubernetes.io/safe-to-evict": "true"})
        ),
    )
    assert inv.node_pods("n1") == NodePods(evictable=1, unreplicated=("default/p",))


def test_summary_cache_follows_moves_and_deletes() -> None:
    inv = make()
    inv.apply_pod("ADDED", raw(pod("a", owner=None)))
    assert inv.node_pods("n1").unreplicated == ("default/a",)
    inv.apply_pod("MODIFIED", raw(pod("a", node="n2", owner=None)))
    assert inv.node_pods("n1") == NodePods()
    assert inv.node_pods("n2").unreplicated == ("default/a",)
    inv.apply_pod("DELETED", raw(pod("a", node="n2", owner=None)))
    assert inv.node_pods("n2") == NodePods()
    assert not inv.pods
    inv.apply_pod("ADDED", raw(pod("w", node=None, phase="Pending", unschedulable=True)))
    inv.apply_pod("MODIFIED", raw(pod("w", node="n1")))
    assert inv.pending_unschedulable == 0


def test_nodes_and_capacity_type() -> None:
    inv = make()
    inv.apply_node(
        "ADDED",
        raw(
            node(
                "od",
                {
                    "eks.amazonaws.com/capacityType": "ON_DEMAND",
                    "node.kubernetes.io/instance-type": "m5.large",
                    "topology.kubernetes.io/zone": "eu-west-1a",
                },
            )
        ),
    )
    inv.apply_node("ADDED", raw(node("sp", {"karpenter.sh/capacity-type": "spot"}, cordoned=True)))
    inv.apply_node("ADDED", raw(node("nolabel", ready=False, annotations={"spotd.io/drain": "false"})))
    od, sp, nolabel = inv.nodes["od"], inv.nodes["sp"], inv.nodes["nolabel"]
    assert (od.capacity_type, od.instance_type, od.zone, od.ready) == (ON_DEMAND, "m5.large", "eu-west-1a", True)
    assert (sp.capacity_type, sp.unschedulable) == (SPOT, True)
    assert (nolabel.capacity_type, nolabel.ready, nolabel.drain_annotation) == (None, False, "false")
    assert inv.node_extra["od"].provider_id == "aws:///eu-west-1a/i-0123456789abcdef0"
    inv.apply_node("DELETED", raw(node("od")))
    assert "od" not in inv.nodes


def test_node_hook_after_sync_only() -> None:
    seen: list[tuple[str | None, str | None]] = []
    inv = make()
    inv.on_node = lambda old, new: seen.append((old and old.name, new and new.name))
    inv.apply_node("ADDED", raw(node("before")))
    inv.nodes_synced.set()
    inv.apply_node("ADDED", raw(node("after")))
    inv.apply_node("MODIFIED", raw(node("after")))  # no change: no call
    inv.apply_node("DELETED", raw(node("after")))
    assert seen == [(None, "after"), ("after", None)]


@pytest.mark.parametrize(
    "line",
    [
        "not json",
        '{"type": "ADDED"}',
        '{"type": "ADDED", "object": {"metadata": {"name": 5}}}',
        '{"type": "ADDED", "object": {"metadata": {"namespace": "x"}}}',
        '{"type": "ADDED", "object": {"metadata": {"name": "p", "namespace": "x", "labels": {"a": 1}}}}',
        '{"type": "ERROR", "object": {"code": 500, "message": "boom"}}',
    ],
)
def test_malformed_events_are_skipped(line: str) -> None:
    inv = make()
    assert inv._apply_line("pod", inv.apply_pod, line, "41") == "41"
    assert not inv.pods


def test_unknown_event_types_are_skipped_and_bookmarks_move_the_version() -> None:
    inv = make()
    assert inv._apply_line("pod", inv.apply_pod, '{"type": "SOMETHING", "object": {}}', "41") == "41"
    bookmark = '{"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "99"}}}'
    assert inv._apply_line("pod", inv.apply_pod, bookmark, "41") == "99"
    added = json.dumps({"type": "ADDED", "object": pod("p")})
    assert inv._apply_line("pod", inv.apply_pod, added, "41") == "7"


def test_410_in_the_stream_means_relist() -> None:
    inv = make()
    with pytest.raises(Gone):
        inv._apply_line("pod", inv.apply_pod, '{"type": "ERROR", "object": {"code": 410, "reason": "Expired"}}', "1")


def test_malformed_raw_object() -> None:
    inv = make()
    with pytest.raises(Malformed):
        inv.apply_node("ADDED", b'{"metadata": {"name": ""}}')


# --- against the fake API server ----------------------------------------------------------------------

from spotd.sim import kubeapi  # noqa: E402
from tests.agent_harness import DEPLOY  # noqa: E402


async def eventually(check: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


@pytest.fixture
async def fake(tmp_path: Any) -> AsyncIterator[tuple[Any, Any]]:
    api = kubeapi.FakeApiServer(host="127.0.0.1", port=0, history_size=50)
    await api.start()
    path = tmp_path / "kubeconfig"
    api.load_manifests([DEPLOY])  # the inventory is the controller's: its RBAC, its token
    api.write_kubeconfig(str(path), token=api.service_account_token("spotd", "spotd-controller"))
    client = make_client(str(path))
    yield api, client
    await client.close()
    await api.stop()


async def run_inventory(inv: Inventory) -> asyncio.Task[None]:
    task = asyncio.create_task(inv.run())
    await asyncio.wait_for(inv.wait_synced(), 10)
    return task


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_list_in_pages_then_watch(fake: tuple[Any, Any]) -> None:
    api, client = fake
    for i in range(7):
        api.create(node(f"n{i}", {"karpenter.sh/capacity-type": "on-demand"}))
        for j in range(3):
            api.create(pod(f"p{i}-{j}", node=f"n{i}"))
    seen: list[tuple[str | None, str | None]] = []
    inv = Inventory.from_client(client, page_size=4, on_node=lambda o, n: seen.append((o and o.name, n and n.name)))
    task = await run_inventory(inv)
    try:
        assert len(inv.nodes) == 7 and len(inv.pods) == 21
        assert inv.node_pods("n0").evictable == 3
        api.create(pod("late", node="n0"))
        api.delete("Pod", "p0-0", "default")
        api.create(node("n-new", {"karpenter.sh/capacity-type": "spot"}))
        await eventually(lambda: ("default", "late") in inv.pods and ("default", "p0-0") not in inv.pods)
        await eventually(lambda: "n-new" in inv.nodes)
        assert inv.node_pods("n0").evictable == 3
        assert (None, "n-new") in seen
        stored = api.get("Node", "n1")
        stored["spec"]["unschedulable"] = True
        api.update(stored)
        await eventually(lambda: inv.nodes["n1"].unschedulable)
    finally:
        await stop(task)


async def test_http_410_on_the_watch_relists(fake: tuple[Any, Any]) -> None:
    api, client = fake
    api.create(node("n0"))
    api.create(pod("a", node="n0"))
    inv = Inventory.from_client(client, watch_timeout=1, retry_delay=0.1)
    task = await run_inventory(inv)
    try:
        lists = inv.relists
        api.inject_fault("GET", r"^/api/v1/pods$", 410, times=1)
        api.create(pod("b", node="n0"))
        await eventually(lambda: inv.relists > lists and ("default", "b") in inv.pods, timeout=8)
        assert inv.synced
    finally:
        await stop(task)


async def test_expired_resource_version_relists(fake: tuple[Any, Any]) -> None:
    api, client = fake
    api.create(node("n0"))
    inv = Inventory.from_client(client, watch_timeout=1, retry_delay=0.5)
    task = await run_inventory(inv)
    try:
        lists = inv.relists
        # Break the pod watch for a while, and meanwhile push its resourceVersion out of the history.
        api.inject_fault("GET", r"^/api/v1/pods$", 500, times=3)
        await asyncio.sleep(1.2)
        for i in range(80):
            api.create(pod(f"x{i}", node="n0"))
        await eventually(lambda: len(inv.pods) == 80, timeout=10)
        assert inv.relists > lists
    finally:
        await stop(task)


async def test_server_errors_keep_the_old_view(fake: tuple[Any, Any]) -> None:
    api, client = fake
    api.create(node("n0"))
    api.inject_fault("GET", r"^/api/v1/pods$", 503, times=2)
    inv = Inventory.from_client(client, retry_delay=0.1)
    task = await run_inventory(inv)
    try:
        assert "n0" in inv.nodes and inv.synced
    finally:
        await stop(task)


@pytest.mark.parametrize(
    ("notice", "ends"),
    [
        ({"kind": "spot-itn", "action": "terminate", "deadline": "2026-01-01T00:02:00Z"}, True),
        ({"kind": "asg-termination", "action": "terminate", "deadline": "2026-01-01T00:02:00Z"}, True),
        ({"kind": "spot-itn", "action": "stop", "deadline": "2026-01-01T00:02:00Z"}, False),  # comes back
        ({"kind": "spot-itn", "action": "hibernate", "deadline": "2026-01-01T00:02:00Z"}, False),
        ({"kind": "scheduled-maintenance", "action": "system-reboot", "deadline": "2026-01-01T00:02:00Z"}, False),
        ({"kind": "rebalance", "seen_at": "2026-01-01T00:00:00Z"}, False),
        ({"kind": "spot-itn", "action": "terminate", "deadline": "soon"}, False),
        ("not json", False),
    ],
)
def test_notice_deadline_only_for_notices_that_end_the_instance(notice: object, ends: bool) -> None:
    from spotd.inventory.records import notice_deadline

    text = notice if isinstance(notice, str) else json.dumps(notice)
    assert (notice_deadline(text) is not None) is ends


def test_instance_index_follows_provider_ids() -> None:
    inv = make()

    def with_instance(name: str, iid: str) -> dict[str, Any]:
        obj = node(name)
        obj["spec"]["providerID"] = f"aws:///eu-west-1a/{iid}"
        return obj

    inv.apply_node("ADDED", raw(with_instance("a", "i-0000000000000000a")))
    inv.apply_node("ADDED", raw(with_instance("b", "i-0000000000000000b")))
    found = inv.node_of_instance("i-0000000000000000a")
    assert found is not None and found.name == "a"
    assert inv.node_of_instance("i-0000000000000000c") is None  # another cluster's instance
    # a node whose providerID changes (re-registered) moves in the index; the old id no longer resolves
    inv.apply_node("MODIFIED", raw(with_instance("a", "i-0000000000000000c")))
    assert inv.node_of_instance("i-0000000000000000a") is None
    assert inv.node_of_instance("i-0000000000000000c").name == "a"  # type: ignore[union-attr]
    # a deleted node leaves the index; a node of the same instance under another name keeps it
    inv.apply_node("ADDED", raw(with_instance("b2", "i-0000000000000000b")))
    inv.apply_node("DELETED", raw(with_instance("b", "i-0000000000000000b")))
    assert inv.node_of_instance("i-0000000000000000b").name == "b2"  # type: ignore[union-attr]
    inv.apply_node("DELETED", raw(with_instance("b2", "i-0000000000000000b")))
    assert inv.node_of_instance("i-0000000000000000b") is None
    assert inv.by_instance == {"i-0000000000000000c": "a"}
