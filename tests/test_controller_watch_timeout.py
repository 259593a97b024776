"""A controller drain whose pod watch goes silent (a half-open connection: the request is held, nothing
comes) notices within --watch-timeout and a tenth, lists again and ends when the node is empty, instead of
waiting for --drain-timeout (issue 18, found with the fault proxy on the agent: 7faa66f gave the agent its
read timeout; the controller's client had none)."""

from __future__ import annotations

from pathlib import Path

from spotd.sim.kubeapi.server import FakeApiServer
from tests.agent_harness import eventually
from tests.moto_server import aws, moto_endpoint  # noqa: F401  (pytest fixtures)
from tests.test_controller import (  # noqa: F401  (fixtures)
    OLD,
    ControllerProcess,
    add_node,
    add_pods,
    api,
    pods_on,
    procs,
    replicaset,
    running,
    source,
    start,
)

# the drain's own pod watch (field selector on its node), not the inventory's
DRAIN_WATCH = r"^(?=.*watch=(true|1))(?=.*nodeName(%3D|=)od-old)"


async def test_a_silent_pod_watch_in_a_controller_drain_is_restarted(
    api: FakeApiServer,  # noqa: F811
    tmp_path: Path,
    procs: list[ControllerProcess],  # noqa: F811
    source: str,  # noqa: F811
) -> None:
    add_node(api, "spot-1", "spot")
    add_node(api, "od-old", "on-demand", OLD)
    add_pods(api, "od-old", 2)
    # held far past --drain-timeout (40 s in the harness), then answered: a connection that stays open, silent
    api.inject_fault("GET", r"/api/v1/pods$", 0, delay=120.0, query_regex=DRAIN_WATCH)
    async with running(replicaset(api, "spot-1")):
        c = start(procs, tmp_path, "ctl", "--watch-timeout", "2s", queue_url=source)
        await eventually(lambda: c.events("drain_starting"), timeout=60)
        await eventually(lambda: [e for e in c.events("watch_failed") if e.get("watch") == "pods"], timeout=30)
        await eventually(lambda: c.drains("complete") == 1, timeout=30)
    assert c.drains("timeout") == 0
    assert pods_on(api, "od-old") == []
