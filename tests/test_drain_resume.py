"""Issue 18 (1): after a broken pod watch the drain lists the node's pods again and resumes the watch from that
list's resourceVersion, so a pod deleted between the re-list and the new watch still ends the drain.

The drain engine runs with the agent's own client and identity against the fake API server over a socket.
The pod is evicted with a grace far beyond the test's patience (termination_scale 1), so only its deletion
by hand, in the window between the re-list and the new watch, can end the drain before the cutoff (ten
minutes ahead); the test waits a small part of that.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog

from spotd.drain.executor import DrainOptions, DrainResult, drain_node
from spotd.kube.client import make_client
from spotd.kube.ratelimit import RateLimiter
from spotd.sim.kubeapi import FakeApiServer, RecordedRequest
from tests.agent_harness import agent_kubeconfig, eventually, node_obj, pod_obj

NODE = "ip-10-0-1-10.ec2.internal"
PODS = "/api/v1/pods"
log = structlog.get_logger()


class BetweenListAndWatch(list[RecordedRequest]):
    """The fake's request log, calling `action` once, synchronously, when a pod watch arrives after a pod list
    that came after `arm()`: the window between the drain's re-list and its new watch. The fake records a
    request before it serves it, so whatever `action` changes happens after the list and before the watch
    starts."""

    def __init__(self, api: FakeApiServer, action: Callable[[], None]) -> None:
        super().__init__(api.requests)
        self.api, self.action = api, action
        self.armed = False
        self.listed_at: str | None = None  # the store's version when the re-list came: what it answers
        self.watched_from: str | None = None  # the resourceVersion the next watch asked for
        api.requests = self

    def arm(self) -> None:
        self.armed = True

    def append(self, request: RecordedRequest) -> None:
        super().append(request)
        if not self.armed or request.method != "GET" or request.path != PODS:
            return
        if "watch" not in request.query:
            self.listed_at = str(self.api.store.rv)
        elif self.listed_at is not None and self.watched_from is None:
            self.watched_from = request.query.get("resourceVersion", "")
            self.action()


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    server = FakeApiServer(termination_scale=1.0, history_size=200)
    await server.start()
    yield server
    await server.stop()


async def start_drain(api: FakeApiServer, tmp: Path) -> asyncio.Task[DrainResult]:
    """A Spot drain of NODE as the agent runs it, ten minutes before its deadline."""
    client = make_client(agent_kubeconfig(api, tmp / "kubeconfig", NODE), lean=True)
    deadline = datetime.now(UTC) + timedelta(minutes=10)
    work = drain_node(client, NODE, DrainOptions(), deadline, log=log, limiter=RateLimiter(0, 1))
    return asyncio.get_running_loop().create_task(work)


def terminating(api: FakeApiServer, name: str) -> bool:
    pod = api.get("Pod", name, "default")
    return pod is not None and bool(pod["metadata"].get("deletionTimestamp"))


async def drain_with_a_deletion_after_the_relist(api: FakeApiServer, tmp: Path, also: Callable[[], Any]) -> None:
    api.create(node_obj(NODE))
    api.create(pod_obj("slow", NODE, grace=3600))  # evicted, it stays Terminating for the whole test
    task = await start_drain(api, tmp)
    await eventually(lambda: terminating(api, "slow"), timeout=15)

    def delete_the_pod() -> None:
        api.delete("Pod", "slow", "default")
        also()

    window = BetweenListAndWatch(api, delete_the_pod)
    # The watch's stream ends (an API server restart) and its resume is refused: the drain must list again.
    api.inject_fault("GET", f"^{PODS}$", 500, query_regex="watch")
    window.arm()
    assert api.break_watches("Pod") == 1
    try:
        result = await asyncio.wait_for(asyncio.shield(task), 30)  # the cutoff is 590 s away
    except TimeoutError:
        pytest.fail(
            f"the drain still waits for a pod deleted after its re-list (re-listed at version {window.listed_at}, "
            f"watched again from {window.watched_from!r})"
        )
    finally:
        task.cancel()
    assert window.watched_from is not None, "the pod was never deleted between a re-list and a watch"
    assert result.outcome == "complete", result
    assert result.evicted == ("default/slow",) and not result.left


async def test_a_pod_deleted_between_the_relist_and_the_new_watch_ends_the_drain(api, tmp_path) -> None:
    await drain_with_a_deletion_after_the_relist(api, tmp_path, lambda: None)


async def test_a_relist_version_expired_before_the_watch_is_listed_again(api, tmp_path) -> None:
    # More changes than the fake's history holds come between the re-list and the watch: the watch from the
    # re-list's version is answered 410 Expired, and only another list shows that the pod is gone.
    def churn() -> None:
        for i in range(250):
            api.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"churn-{i}"}, "data": {}})

    await drain_with_a_deletion_after_the_relist(api, tmp_path, churn)
    lists = [r for r in api.requests if r.method == "GET" and r.path == PODS and "watch" not in r.query]
    assert len(lists) >= 3, "the first list, the re-list after the error, and one more after 410 Expired"
