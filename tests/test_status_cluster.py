"""`spotd status` against a cluster's answers that the fallback cycle does not give (issue 20): a controller
gone without releasing its Lease (SIGKILL), and a cluster of more Nodes and Events than one page of a list.

`python -m spotd status` runs as a subprocess, as a member of the group deploy/status-rbac.yaml binds,
against the fake API server with deploy/'s RBAC; the controller is the real `spotd controller` process.
"""

from __future__ import annotations

import json
import signal
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from spotd.common.parsing import format_time, parse_iso_time
from spotd.sim.kubeapi.server import FakeApiServer
from spotd.status.explain import UNAVAILABLE
from tests.agent_harness import eventually
from tests.moto_server import aws, moto_endpoint  # noqa: F401  (pytest fixtures: the controller's AWS)
from tests.permissions import group_member
from tests.test_controller import ControllerProcess
from tests.test_make_before_break import add_old_node, node
from tests.test_status_fallback import DEPLOY, STATUS_GROUP, spotd_status

LEASE = "spotd-controller"
PAGE = 500  # what `spotd status` asks per page (spotd.status.command)


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[FakeApiServer]:
    """deploy/'s namespace and RBAC, the controller's kubeconfig and the status reader's; no simulated
    controllers (a thousand nodes would keep them busy for nothing)."""
    server = FakeApiServer()
    await server.start()
    server.load_manifests([DEPLOY / "namespace.yaml", DEPLOY / "rbac.yaml", DEPLOY / "status-rbac.yaml"])
    server.write_kubeconfig(tmp_path / "kubeconfig", token=server.service_account_token("spotd", "spotd-controller"))
    token = server.add_token(
        "status-reader-token", group_member(STATUS_GROUP), groups=(STATUS_GROUP, "system:authenticated")
    )
    server.write_kubeconfig(tmp_path / "status-kubeconfig", token=token)
    yield server
    await server.stop()


def lease_of(api: FakeApiServer) -> dict[str, Any]:
    found = api.get("Lease", LEASE, "spotd")
    assert found is not None, "no Lease"
    return found


@pytest.mark.usefixtures("aws")
async def test_a_lease_not_renewed_says_no_controller_leads_and_since_when(api: FakeApiServer, tmp_path: Path) -> None:
    add_old_node(api, node("od-a", "on-demand", cpu="8", pool="fallback"))
    controller = ControllerProcess(tmp_path, str(tmp_path / "kubeconfig"), "ctl-gone").start()
    try:
        await eventually(controller.leading, timeout=60, interval=0.1)
        url = f"http://127.0.0.1:{controller.port}"
        code, table, err = await spotd_status(tmp_path, "--controller-url", url, "--lease-namespace", "spotd")
        assert code == 0, err
        assert table.splitlines()[0].startswith("controller ctl-gone (leader)"), table
        assert table.splitlines()[1].startswith("lease: held by ctl-gone, renewed "), table
    finally:
        controller.stop(signal.SIGKILL)  # gone without releasing its Lease, as a node's loss or an OOM kill leaves it

    spec = lease_of(api)["spec"]
    assert spec["holderIdentity"] == "ctl-gone"
    renewed = parse_iso_time(spec["renewTime"])
    lapsed_at = renewed + timedelta(seconds=float(spec["leaseDurationSeconds"]))
    # the Lease lapses on its own clock: nothing renews it any more, so wait for that moment, not a guess
    await eventually(lambda: datetime.now(UTC) > lapsed_at, timeout=60, interval=0.1)
    assert lease_of(api)["spec"]["renewTime"] == spec["renewTime"]  # nobody renewed it meanwhile

    code, table, err = await spotd_status(tmp_path, "--controller-url", url, "--lease-namespace", "spotd")
    assert code == 0, err
    lines = table.splitlines()
    assert lines[0].startswith(f"{UNAVAILABLE}: GET {url}/status: "), table
    since = f"lease: not renewed since {format_time(renewed)} ("
    assert lines[1].startswith(since), table
    tail = f" ago), {float(spec['leaseDurationSeconds']):g}s lease: no controller is leading (last holder ctl-gone)"
    assert lines[1].endswith(tail), table
    (row,) = [line for line in lines if line.startswith("od-a ")]
    assert row.endswith(UNAVAILABLE), row

    code, out, err = await spotd_status(tmp_path, "--controller-url", url, "--lease-namespace", "spotd", "-o", "json")
    assert code == 0, err
    document = json.loads(out)
    assert document["controller"]["available"] is False
    lease = document["lease"]
    assert lease["holder"] == "ctl-gone" and lease["expired"] is True
    assert lease["renewed"] == format_time(renewed) and lease["note"].startswith(since)


async def test_every_node_and_event_is_read_across_pages(api: FakeApiServer, tmp_path: Path) -> None:
    count = 2 * PAGE + 37  # three pages of Nodes, three of Events
    names = [f"page-od-{i:04d}" for i in range(count)]
    stamp = format_time(datetime.now(UTC) - timedelta(minutes=1))
    for i, name in enumerate(names):
        api.create(node(name, "on-demand", cpu="1", pool="fallback"))
        api.create(
            {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {"name": f"{name}.drain", "namespace": "default"},
                "involvedObject": {"kind": "Node", "name": name},
                "reason": "SpotdDrainStopped",
                "message": f"blocked: shop/job-{i}",
                "lastTimestamp": stamp,
                "source": {"component": "spotd-controller"},
            }
        )
    before = len(api.requests)
    code, out, err = await spotd_status(tmp_path, "--lease-namespace", "spotd", "-o", "json")
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(out)["nodes"]}
    assert sorted(rows) == names  # not one missing, none twice
    for i, name in enumerate(names):  # each node's own Event, wherever its page was
        assert rows[name]["why"].startswith(f"last Event SpotdDrainStopped at {stamp}: blocked: shop/job-{i};")

    def pages(path: str) -> list[dict[str, str]]:
        return [r.query for r in api.requests[before:] if r.method == "GET" and r.path == path]

    for path in ("/api/v1/nodes", "/api/v1/namespaces/default/events"):
        asked = pages(path)
        assert [q.get("limit") for q in asked] == [str(PAGE)] * 3, asked
        assert [bool(q.get("continue")) for q in asked] == [False, True, True], asked
        assert len({q.get("continue") for q in asked}) == 3  # each page asked after the one before
