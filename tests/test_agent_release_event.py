"""The agent's NoticeReleased Event says the node was put back only when it was: when the release patch fails
the agent hands it to its background node writer, and the Event says the release is still being written
(issue 21 adversarial review, finding 5: state before announcement)."""

# ruff: noqa: F811  (pytest fixtures imported from test_agent, used as arguments)
from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from spotd.sim.imds import FakeImds
from spotd.sim.kubeapi.server import FakeApiServer
from tests.agent_harness import eventually
from tests.test_agent import (  # noqa: F401  (fixtures)
    NODE,
    agents,
    api,
    imds,
    kubeconfig,
    maintenance_event,
    node,
    populate,
    run_agent,
)


def released(api: FakeApiServer) -> list[dict[str, Any]]:
    return [
        e
        for e in api.list("Event")
        if e.get("reason") == "NoticeReleased" and e.get("involvedObject", {}).get("name") == NODE
    ]


async def release_after_maintenance(
    api: FakeApiServer, imds: FakeImds, kubeconfig: str, agents: Any, tmp: Path, failing_patches: int
) -> dict[str, Any]:
    populate(api, web=2)
    agent = run_agent(agents, tmp, kubeconfig, imds, "--maintenance-lead-time", "15m")
    await agent.ready()
    imds.set_scheduled_events([maintenance_event("active", datetime.now(UTC) + timedelta(minutes=10))])
    await eventually(lambda: node(api)["spec"].get("unschedulable"), timeout=15)
    await eventually(lambda: agent.events("drain_finished") or agent.events("drain_complete"), timeout=30)
    if failing_patches:
        api.inject_fault("PATCH", rf"/api/v1/nodes/{NODE}$", 500, times=failing_patches)
    imds.set_scheduled_events([maintenance_event("completed", datetime.now(UTC) - timedelta(minutes=1))])
    await eventually(lambda: released(api), timeout=20)
    (event,) = released(api)
    await eventually(lambda: not node(api)["spec"].get("unschedulable"), timeout=30)  # put back in the end
    return event


async def test_a_release_written_at_once_says_the_node_is_put_back(
    api,
    imds,
    kubeconfig,
    agents,
    tmp_path,
) -> None:
    event = await release_after_maintenance(api, imds, kubeconfig, agents, tmp_path, failing_patches=0)
    assert "taint and cordon removed" in event["message"], event["message"]
    assert event["type"] == "Normal"


async def test_a_release_the_api_refuses_is_not_announced_as_done(
    api,
    imds,
    kubeconfig,
    agents,
    tmp_path,
) -> None:
    event = await release_after_maintenance(api, imds, kubeconfig, agents, tmp_path, failing_patches=3)
    assert "removed" not in event["message"] and "uncordoned" not in event["message"], event["message"]
    assert "retrying" in event["message"]
    assert event["type"] == "Warning"
