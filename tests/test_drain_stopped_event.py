"""The controller's SpotdDrainStopped Event promises a back-off ("not tried again before ...") only when the
Node holds it: the next pass reads the back-off from the Node, so an Event that claims one the patch never wrote
tells the operator something the controller will not do (issue 21 adversarial review, finding 7)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from spotd.capacity.signals import Pool
from spotd.controller.drains import DRAIN_RETRY_ANNOTATION, DrainDeps, DrainJob, DrainOutcome, DrainSettings, drain
from spotd.kube.client import make_client
from spotd.kube.events import EventRecorder
from spotd.kube.ratelimit import RateLimiter
from spotd.sim.kubeapi.server import FakeApiServer
from tests.agent_harness import DEPLOY, eventually, pod_obj
from tests.test_review_breakages import NODE, _NoAlerts, apis, cluster, log, node  # noqa: F401  (fixture)


def stopped_events(api: FakeApiServer) -> list[str]:
    return [e.get("message", "") for e in api.list("Event") if e.get("reason") == "SpotdDrainStopped"]


async def blocked_drain(api: FakeApiServer, tmp: Path, break_backoff: bool) -> list[DrainOutcome]:
    """A drain an operator's opt-out stops ("blocked", a back-off follows); with break_backoff every later
    node PATCH fails, so the back-off is never written."""
    api.create(pod_obj("web-0", NODE))
    api.load_manifests([DEPLOY])
    token = api.service_account_token("spotd", "spotd-controller")
    client = make_client(str(api.write_kubeconfig(tmp / "controller-kubeconfig", token=token)))
    finished: list[DrainOutcome] = []
    deps = DrainDeps(
        client=client,
        events=EventRecorder(client, "spotd-controller", "test", log),
        alerter=_NoAlerts(),
        limiter=RateLimiter(0, 1),
        clock=lambda: datetime.now(UTC),
        log=log,
        settings=DrainSettings(drain_timeout=10.0, evict_unreplicated=True),
        leading=lambda: True,
        placements=lambda _job: [],
        finished=lambda _job, outcome: finished.append(outcome),
    )
    api.inject_fault("PATCH", rf"/api/v1/nodes/{NODE}$", 0, delay=1.0)  # the cordon is held a second
    job = DrainJob(NODE, Pool("m5.large", "us-east-1a"), datetime.now(UTC), probe=False)
    task = asyncio.get_running_loop().create_task(drain(deps, job, "test"))
    await eventually(lambda: [r for r in api.requests if r.method == "PATCH" and r.path.endswith(NODE)], timeout=10)
    changed = node(api)
    changed["metadata"].setdefault("annotations", {})["spotd.io/drain"] = "false"
    api.update(changed)
    if break_backoff:
        api.inject_fault("PATCH", rf"/api/v1/nodes/{NODE}$", 500, times=100)
    await asyncio.wait_for(task, 30)
    await eventually(lambda: stopped_events(api), timeout=10)
    await client.close()
    return finished


async def test_the_stopped_event_names_the_backoff_the_node_holds(apis: Any, tmp_path: Path) -> None:  # noqa: F811
    api = await cluster(apis)
    finished = await blocked_drain(api, tmp_path, break_backoff=False)
    assert [o.outcome for o in finished] == ["blocked"]
    assert DRAIN_RETRY_ANNOTATION in node(api)["metadata"]["annotations"]
    (message,) = stopped_events(api)
    assert "not tried again before" in message


async def test_the_stopped_event_claims_no_backoff_the_node_does_not_hold(apis: Any, tmp_path: Path) -> None:  # noqa: F811
    api = await cluster(apis)
    finished = await blocked_drain(api, tmp_path, break_backoff=True)
    assert [o.outcome for o in finished] == ["blocked"]
    assert DRAIN_RETRY_ANNOTATION not in (node(api)["metadata"].get("annotations") or {})
    (message,) = stopped_events(api)
    assert "not tried again before" not in message
    assert "could not be written" in message
