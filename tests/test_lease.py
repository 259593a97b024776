"""Leader election against the fake API server: one leader, fast hand-over, stepping down at once."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from spotd.kube.client import make_client
from spotd.kube.lease import LeaderElector, LeaseConfig, micro_time
from spotd.sim import kubeapi
from tests.agent_harness import DEPLOY

NS = "spotd"  # the controller's namespace, where its Role lets it hold the Lease
LEASE = "spotd-controller"  # the one name its Role grants get and update on
FAST = {"lease_duration": 2.0, "renew_deadline": 1.0, "renew_period": 0.3, "retry_period": 0.2}
# A lease duration far longer than any wait below: what a test sees then is the mechanism, not the clock.
LONG = {**FAST, "lease_duration": 60.0, "renew_deadline": 30.0}


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Any]:
    server = kubeapi.FakeApiServer(host="127.0.0.1", port=0)
    await server.start()
    server.load_manifests([DEPLOY])  # the controller's RBAC: the lease tests run as the controller
    token = server.service_account_token("spotd", "spotd-controller")
    server.write_kubeconfig(str(tmp_path / "kubeconfig"), token=token)
    server.kubeconfig_path = str(tmp_path / "kubeconfig")
    yield server
    await server.stop()


class Candidate:
    def __init__(self, api: Any, identity: str, **timings: float) -> None:
        self.client = make_client(api.kubeconfig_path)
        self.elector = LeaderElector(self.client, LeaseConfig(LEASE, NS, identity, **(timings or FAST)))
        self.task: asyncio.Task[None] | None = None

    def start(self) -> Candidate:
        self.task = asyncio.create_task(self.elector.run())
        return self

    async def stop(self, release: bool = True) -> None:
        if not release:

            async def no_release() -> None:
                return None

            self.elector.release = no_release  # type: ignore[method-assign]  # a crash releases nothing
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        await self.client.close()

    @property
    def leading(self) -> bool:
        return self.elector.is_leader.is_set()


async def wait_for(predicate: Any, timeout: float) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


def holder(api: Any) -> str | None:
    lease = api.get("Lease", LEASE, NS)
    return (lease or {}).get("spec", {}).get("holderIdentity")


async def test_single_candidate_creates_and_renews(api: Any) -> None:
    a = Candidate(api, "a").start()
    try:
        await wait_for(lambda: a.leading, 2)
        assert holder(api) == "a"
        first = api.get("Lease", LEASE, NS)["spec"]["renewTime"]
        await asyncio.sleep(0.5)
        assert api.get("Lease", LEASE, NS)["spec"]["renewTime"] != first
    finally:
        await a.stop()
    assert holder(api) is None  # released on shutdown


async def test_two_candidates_one_leader_and_graceful_handover(api: Any) -> None:
    a = Candidate(api, "a", **LONG).start()
    await wait_for(lambda: a.leading, 2)
    b = Candidate(api, "b", **LONG).start()
    try:
        await asyncio.sleep(1.0)
        assert a.leading and not b.leading
        await a.stop()
        # A released lease is taken at the next retry; waiting out its 60 s duration would miss this.
        await wait_for(lambda: b.leading, 10)
        assert holder(api) == "b"
        lease = api.get("Lease", LEASE, NS)
        assert lease["spec"]["leaseTransitions"] >= 1
    finally:
        await b.stop()


async def test_standby_takes_over_within_the_lease_duration_when_the_leader_dies(api: Any) -> None:
    a = Candidate(api, "a").start()
    await wait_for(lambda: a.leading, 2)
    b = Candidate(api, "b").start()
    try:
        await asyncio.sleep(0.6)
        assert not b.leading
        await a.stop(release=False)
        stopped = time.monotonic()
        await wait_for(lambda: b.leading, 10)
        # Not before the lease has gone unrenewed for its whole duration (by b's own clock).
        assert time.monotonic() - stopped >= FAST["lease_duration"] - FAST["renew_period"]
    finally:
        await b.stop()


async def test_leader_that_cannot_renew_steps_down_by_its_deadline(api: Any) -> None:
    a = Candidate(api, "a", **{**LONG, "renew_deadline": 1.0}).start()
    try:
        await wait_for(lambda: a.leading, 2)
        api.inject_fault("PUT", r"/leases/spotd-controller$", 500, times=1000)
        api.inject_fault("GET", r"/leases/spotd-controller$", 500, times=1000)
        # It steps down on its renew deadline (1 s), long before anyone may take its 60 s lease.
        await wait_for(lambda: not a.leading, 10)
    finally:
        await a.stop()


async def test_leader_that_finds_another_holder_stops_at_once(api: Any) -> None:
    changes: list[bool] = []
    a = Candidate(api, "a")
    a.elector._on_change = changes.append
    a.start()
    try:
        await wait_for(lambda: a.leading, 2)
        lease = api.get("Lease", LEASE, NS)
        lease["spec"]["holderIdentity"] = "intruder"
        lease["spec"]["renewTime"] = micro_time(datetime.now(UTC))
        api.update(lease)
        await wait_for(lambda: not a.leading, 1.0)
        assert changes == [True, False]
    finally:
        await a.stop()
    assert holder(api) == "intruder"  # not ours to release


async def test_conflicting_writers_never_both_lead(api: Any) -> None:
    candidates = [Candidate(api, f"c{i}").start() for i in range(4)]
    try:
        for _ in range(30):
            await asyncio.sleep(0.05)
            assert sum(c.leading for c in candidates) <= 1
        await wait_for(lambda: sum(c.leading for c in candidates) == 1, 2)
    finally:
        for c in candidates:
            await c.stop()


def test_lease_config_validation() -> None:
    with pytest.raises(ValueError, match="identity"):
        LeaseConfig("x", "ns", "")
    with pytest.raises(ValueError, match="renew period"):
        LeaseConfig("x", "ns", "a", lease_duration=5, renew_deadline=6, renew_period=1)


async def test_a_standby_whose_clock_runs_ahead_does_not_take_over_a_healthy_leader(api: Any) -> None:
    from datetime import UTC, datetime, timedelta

    a = Candidate(api, "a").start()
    await wait_for(lambda: a.leading, 2)
    b = Candidate(api, "b")
    b.elector._wall = lambda: datetime.now(UTC) + timedelta(minutes=5)  # a skewed node clock
    b.start()
    try:
        await asyncio.sleep(3.0)  # beyond the lease duration of the FAST timings
        assert a.leading and not b.leading
        assert holder(api) == "a"
    finally:
        await b.stop()
        await a.stop()


async def test_a_standby_says_once_whom_it_waits_for(api: Any) -> None:
    """A standby's rounds are silent while the holder's lease is live: one `lease_held` line per holder lets a
    reader of its log tell a standby waiting out a dead leader's lease from a stuck election loop."""
    from structlog.testing import capture_logs

    a = Candidate(api, "a").start()
    await wait_for(lambda: a.leading, 2)
    with capture_logs() as logs:
        b = Candidate(api, "b").start()
        try:
            await wait_for(lambda: sum(r["event"] == "lease_held" for r in logs) >= 1, 5)
            await asyncio.sleep(1.0)  # several standby rounds (retry period 0.2 s)
            held = [r for r in logs if r["event"] == "lease_held"]
            assert [(r["holder"], r["takeover_after_unrenewed_s"]) for r in held] == [("a", 2.0)]
        finally:
            await b.stop()
            await a.stop()
