"""The pool book survives a leadership change (issue 19): a new leader reads the short marks, ICE and probe
back-off its predecessor recorded, from the Lease spotd-pool-book (deploy/rbac.yaml's grant), before any
source. Two controllers in process, one after the other, against the fake API server as the controller's
ServiceAccount under deploy/'s RBAC.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from spotd.capacity.pools import PoolBook, book_from_json, book_to_json
from spotd.capacity.signals import CapacitySignal, Pool, SignalKind
from spotd.controller.book_store import BOOK_ANNOTATION, BOOK_LEASE
from spotd.controller.drains import DrainJob, PoolNews
from spotd.sim.kubeapi.server import FakeApiServer
from tests.agent_harness import eventually
from tests.moto_server import aws, moto_endpoint  # noqa: F401  (pytest fixtures)
from tests.test_controller import OLD, add_node, api, queue_source, run_in_process, source, stop_in_process  # noqa: F401

POOL = Pool("m5.large", "us-east-1a")
T0 = datetime(2026, 12, 5, 10, 0, tzinfo=UTC)


def test_the_book_round_trips_through_json() -> None:
    ice = CapacitySignal(Pool("*", "us-east-1b"), SignalKind.ICE, "sqs", T0, "InsufficientInstanceCapacity", asg="g")
    book = PoolBook().record(ice).record_short(POOL, T0, "replacements of od-1 landed on on-demand")
    book = book.record_probe_result(POOL, T0 + timedelta(minutes=5), landed_on_spot=False)
    again = book_from_json(book_to_json(book))
    assert again == book
    assert again.get(POOL).short_since == T0 and again.get(POOL).probe_failures == 1  # type: ignore[union-attr]
    assert book_from_json(book_to_json(PoolBook())) == PoolBook()
    for bad in ('{"format": 2, "pools": {}}', '{"format": 1, "pools": {"m5.large": {}}}', "[]"):
        with pytest.raises(ValueError):
            book_from_json(bad)


def saved_pools(api: FakeApiServer) -> dict[str, dict[str, object]]:  # noqa: F811
    lease = api.get("Lease", BOOK_LEASE, "spotd")
    text = ((lease or {}).get("metadata", {}).get("annotations") or {}).get(BOOK_ANNOTATION)
    return dict(json.loads(text)["pools"]) if text else {}


async def test_a_new_leader_reads_a_pool_short_that_the_previous_leader_marked(
    api: FakeApiServer,  # noqa: F811
    tmp_path: Path,
    source: str,  # noqa: F811
) -> None:
    add_node(api, "od-1", "on-demand", OLD)
    add_node(api, "spot-1", "spot")  # a Spot launch in the pool: available, but for the short mark
    a, a_task = await run_in_process(api, tmp_path, queue_source(source), identity="ctl-a")
    try:
        await eventually(lambda: a.ready, timeout=20)
        node = a.inventory.nodes["od-1"]
        assert a.spot_answer(datetime.now(UTC))(node).available
        a.pool_news(DrainJob("od-1", POOL, datetime.now(UTC), False), PoolNews(short=True))
        await eventually(lambda: saved_pools(api).get(str(POOL), {}).get("short_since"), timeout=10)  # created
        ice = CapacitySignal(Pool("r5.large", "us-east-1c"), SignalKind.ICE, "sqs", datetime.now(UTC), "capacity")
        a.on_signals([ice])
        await eventually(lambda: "r5.large/us-east-1c" in saved_pools(api), timeout=10)  # updated
    finally:
        await stop_in_process(a, a_task)
    b, b_task = await run_in_process(api, tmp_path, queue_source(source), identity="ctl-b")
    try:
        await eventually(lambda: b.ready, timeout=20)
        record = b.book.get(POOL)
        assert record is not None and record.short_since is not None
        answer = b.spot_answer(datetime.now(UTC))(b.inventory.nodes["od-1"])
        assert not answer.available and "short since" in answer.reason
        assert b.book.get(Pool("r5.large", "us-east-1c")) is not None
    finally:
        await stop_in_process(b, b_task)
