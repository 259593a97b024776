"""ImdsClient and NoticePoller against FakeImds over real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from spotd.common.metrics import REGISTRY
from spotd.common.parsing import format_time
from spotd.notices.imds import NOTICE_PATHS, ImdsClient, ImdsUnavailable, InstanceInfo, NoticePoller
from spotd.notices.record import NoticeKind
from spotd.sim.imds import FakeImds

NOW = datetime(2026, 11, 25, 8, 0, 0, tzinfo=UTC)
ITN = "spot/instance-action"
REBALANCE = "events/recommendations/rebalance"
MAINTENANCE = "events/maintenance/scheduled"
LIFECYCLE = "autoscaling/target-lifecycle-state"


class RecordingLog:
    """Stands in for a structlog logger: keeps (level, event, fields)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def _record(self, level: str) -> Any:
        return lambda event, **fields: self.events.append((level, event, fields))

    def __getattr__(self, level: str) -> Any:
        return self._record(level)

    def named(self, event: str) -> list[dict[str, Any]]:
        return [fields for _, name, fields in self.events if name == event]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def requests_count(path: str, outcome: str) -> float:
    value = REGISTRY.get_sample_value("spotd_imds_requests_total", {"path": path, "outcome": outcome})
    return value or 0.0


def malformed_count() -> float:
    return REGISTRY.get_sample_value("spotd_notices_malformed_total", {"source": "imds"}) or 0.0


@pytest.fixture
async def imds() -> AsyncIterator[FakeImds]:
    async with FakeImds() as fake:
        yield fake


@pytest.fixture
async def session() -> AsyncIterator[list[ImdsClient]]:
    """The clients a test made, closed at its end (each keeps one connection open)."""
    clients: list[ImdsClient] = []
    yield clients
    for client in clients:
        await client.aclose()


def client_for(session: list[ImdsClient], imds: FakeImds, **kwargs: Any) -> ImdsClient:
    kwargs.setdefault("timeout", 0.3)
    kwargs.setdefault("retry_backoff", 0.005)
    client = ImdsClient(imds.url, **kwargs)
    session.append(client)
    return client


def event(event_id: str, state: str, code: str = "system-reboot") -> dict[str, str]:
    return {
        "NotBefore": "21 Jan 2019 09:00:43 GMT",
        "Code": code,
        "Description": "scheduled reboot",
        "EventId": event_id,
        "NotAfter": "21 Jan 2019 09:17:23 GMT",
        "State": state,
    }


# -- each notice kind end to end -------------------------------------------------------------------------


async def test_quiet_instance_has_no_notices_and_a_complete_poll(imds: FakeImds, session: Any) -> None:
    result = await NoticePoller(client_for(session, imds)).poll_once(NOW)
    assert result.notices == ()
    assert result.complete and result.failed_paths == () and result.malformed_paths == ()
    assert all(result.covers(kind) for kind in NoticeKind)


async def test_spot_itn_end_to_end(imds: FakeImds, session: Any) -> None:
    poller = NoticePoller(client_for(session, imds))
    deadline = NOW + timedelta(minutes=2)
    imds.set_instance_action(action="terminate", time=deadline)
    (notice,) = (await poller.poll_once(NOW)).notices
    assert (notice.kind, notice.action, notice.deadline, notice.seen_at) == (
        NoticeKind.SPOT_ITN,
        "terminate",
        deadline,
        NOW,
    )
    assert notice.source == "imds"
    imds.clear_instance_action()
    assert (await poller.poll_once(NOW)).notices == ()


async def test_a_spot_itn_remembers_when_it_was_last_absent(imds: FakeImds, session: Any) -> None:
    # Present at the first poll (an agent that starts with it there): its age is unknown.
    imds.set_instance_action(action="terminate", time=NOW)
    started_with = NoticePoller(client_for(session, imds))
    (notice,) = (await started_with.poll_once(NOW)).notices
    assert notice.absent_before is None
    imds.clear_instance_action()
    # Read as absent, then present: it was issued between the two readings; later readings keep that.
    poller = NoticePoller(client_for(session, imds))
    await poller.poll_once(NOW)
    imds.set_instance_action(action="terminate", time=NOW - timedelta(minutes=3))
    (notice,) = (await poller.poll_once(NOW + timedelta(seconds=0.25))).notices
    assert (notice.absent_before, notice.seen_at) == (NOW, NOW + timedelta(seconds=0.25))
    (again,) = (await poller.poll_once(NOW + timedelta(seconds=0.5))).notices
    assert again.absent_before == NOW and again.seen_at == NOW + timedelta(seconds=0.25)
    # A failed reading in between says nothing about when it appeared.
    imds.clear_instance_action()
    await poller.poll_once(NOW + timedelta(seconds=1))
    imds.fail_next("spot/instance-action", status=500, times=100)
    await poller.poll_once(NOW + timedelta(seconds=2))
    imds.clear_faults()
    imds.set_instance_action(action="terminate", time=NOW)
    (late,) = (await poller.poll_once(NOW + timedelta(seconds=3))).notices
    assert late.absent_before is None


async def test_rebalance_end_to_end(imds: FakeImds, session: Any) -> None:
    imds.set_rebalance(notice_time=NOW - timedelta(seconds=30))
    (notice,) = (await NoticePoller(client_for(session, imds)).poll_once(NOW)).notices
    assert notice.kind is NoticeKind.REBALANCE
    assert notice.deadline is None
    assert notice.event_id == format_time(NOW - timedelta(seconds=30))


async def test_scheduled_maintenance_in_every_state(imds: FakeImds, session: Any) -> None:
    imds.set_scheduled_events(
        [event("instance-event-1", "active"), event("instance-event-2", "Completed"), event("e-3", "canceled")]
    )
    result = await NoticePoller(client_for(session, imds)).poll_once(NOW)
    assert result.complete
    by_id = {n.event_id: n for n in result.notices}
    assert {k: n.state for k, n in by_id.items()} == {
        "instance-event-1": "active",
        "instance-event-2": "completed",
        "e-3": "canceled",
    }
    first = by_id["instance-event-1"]
    assert first.kind is NoticeKind.SCHEDULED_MAINTENANCE and first.action == "system-reboot"
    assert first.deadline == datetime(2019, 1, 21, 9, 0, 43, tzinfo=UTC)
    assert first.not_after == datetime(2019, 1, 21, 9, 17, 23, tzinfo=UTC)


async def test_asg_termination_keeps_its_first_deadline(imds: FakeImds, session: Any) -> None:
    poller = NoticePoller(client_for(session, imds), asg_termination_window=timedelta(seconds=90))
    assert (await poller.poll_once(NOW)).notices == ()  # InService
    imds.set_lifecycle_state("Terminated")
    (first,) = (await poller.poll_once(NOW)).notices
    assert first.kind is NoticeKind.ASG_TERMINATION and first.deadline == NOW + timedelta(seconds=90)
    (again,) = (await poller.poll_once(NOW + timedelta(seconds=5))).notices
    assert again.key == first.key and again.deadline == first.deadline


async def test_not_in_an_asg_is_404_and_complete(imds: FakeImds, session: Any) -> None:
    imds.set_lifecycle_state(None)
    result = await NoticePoller(client_for(session, imds)).poll_once(NOW)
    assert result.complete and result.notices == ()


async def test_every_kind_at_once_with_a_single_token(imds: FakeImds, session: Any) -> None:
    imds.set_instance_action(time=NOW + timedelta(minutes=2))
    imds.set_rebalance(notice_time=NOW)
    imds.set_scheduled_events([event("instance-event-1", "active")])
    imds.set_lifecycle_state("Terminated")
    result = await NoticePoller(client_for(session, imds)).poll_once(NOW)
    assert result.complete
    assert sorted(n.kind for n in result.notices) == sorted(NoticeKind)
    assert imds.count("PUT", "api/token") == 1  # four concurrent GETs shared one token PUT
    assert all(had_token for method, _, had_token in imds.requests if method == "GET")


# -- tokens ----------------------------------------------------------------------------------------------


async def test_token_is_reused_for_many_gets(imds: FakeImds, session: Any) -> None:
    client = client_for(session, imds)
    for _ in range(10):
        assert await client.get("instance-id") == "i-0123456789abcdef0"
    assert imds.count("PUT", "api/token") == 1
    assert imds.count("GET") == 10


async def test_token_is_fetched_again_shortly_before_it_expires(imds: FakeImds, session: Any) -> None:
    clock = Clock()
    client = client_for(session, imds, token_ttl=100, clock=clock)
    refused_before = requests_count("instance-id", "unauthorized")  # the registry is the process's
    await client.get("instance-id")
    clock.now += 89  # margin is 10 % of the TTL: still good
    await client.get("instance-id")
    assert imds.count("PUT", "api/token") == 1
    clock.now += 2
    await client.get("instance-id")
    assert imds.count("PUT", "api/token") == 2
    assert requests_count("instance-id", "unauthorized") == refused_before


async def test_client_honours_the_ttl_the_service_granted(imds: FakeImds, session: Any) -> None:
    imds.token_max_ttl = 20
    clock = Clock()
    client = client_for(session, imds, clock=clock)
    await client.get("instance-id")
    clock.now += 19  # 20 s granted, 2 s margin
    await client.get("instance-id")
    assert imds.count("PUT", "api/token") == 2


@pytest.mark.parametrize("kill", ["advance", "expire_tokens"])
async def test_dead_token_gets_401_then_a_fresh_token(imds: FakeImds, session: Any, kill: str) -> None:
    client = client_for(session, imds)
    await client.get("instance-type")
    before = requests_count("instance-type", "unauthorized")
    if kill == "advance":
        imds.advance(21601)
    else:
        imds.expire_tokens()
    assert await client.get("instance-type") == "m5.large"
    assert requests_count("instance-type", "unauthorized") == before + 1
    assert imds.count("PUT", "api/token") == 2


async def test_concurrent_401s_share_one_fresh_token(imds: FakeImds, session: Any) -> None:
    poller = NoticePoller(client_for(session, imds))
    await poller.poll_once(NOW)
    imds.expire_tokens()
    assert (await poller.poll_once(NOW)).complete
    assert imds.count("PUT", "api/token") == 2


async def test_persistent_401_gives_up(imds: FakeImds, session: Any) -> None:
    imds.set_raw("instance-id", "", status=401)
    with pytest.raises(ImdsUnavailable, match="unauthorized"):
        await client_for(session, imds).get("instance-id")
    assert imds.count("GET", "instance-id") == 2  # the request, and once more with a fresh token


async def test_token_value_is_never_logged(imds: FakeImds, session: Any) -> None:
    imds.set_raw("instance-id", "", status=401)
    with capture_logs() as logs:
        with pytest.raises(ImdsUnavailable):
            await client_for(session, imds).get("instance-id")
        await NoticePoller(client_for(session, imds)).poll_once(NOW)
    tokens = {t for t in imds._tokens}
    assert tokens
    assert not any(token in repr(entry) for entry in logs for token in tokens)


# -- IMDSv1 ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [403, 404, 405])
async def test_v1_is_never_used_without_v1_fallback(imds: FakeImds, session: Any, status: int) -> None:
    imds.require_v2 = False
    imds.fail_next("api/token", status=status, times=100)
    with pytest.raises(ImdsUnavailable, match="token refused"):
        await client_for(session, imds).get("instance-id")
    assert imds.count("GET") == 0


async def test_v1_fallback_when_the_token_put_is_refused(imds: FakeImds, session: Any) -> None:
    imds.require_v2 = False
    imds.fail_next("api/token", status=405, times=100)
    client = client_for(session, imds, v1_fallback=True)
    with capture_logs() as logs:
        assert await client.get("instance-id") == "i-0123456789abcdef0"
    assert client.using_v1
    assert [e["event"] for e in logs] == ["imds_v1_fallback"]
    assert imds.requests[-1] == ("GET", "/latest/meta-data/instance-id", False)


async def test_v1_fallback_still_refused_when_v2_is_required(imds: FakeImds, session: Any) -> None:
    imds.fail_next("api/token", status=403, times=100)
    with pytest.raises(ImdsUnavailable, match="unauthorized"):
        await client_for(session, imds, v1_fallback=True).get("instance-id")


async def test_v1_fallback_is_not_used_while_v2_works(imds: FakeImds, session: Any) -> None:
    imds.require_v2 = False
    client = client_for(session, imds, v1_fallback=True)
    await client.get("instance-id")
    assert not client.using_v1
    assert imds.requests[-1][2] is True


async def test_fake_refuses_v1_and_bad_token_requests(imds: FakeImds) -> None:
    async def status(method: str, path: str, headers: dict[str, str]) -> int:
        async with aiohttp.ClientSession() as http, http.request(method, imds.url + path, headers=headers) as resp:
            return resp.status

    ttl = "X-aws-ec2-metadata-token-ttl-seconds"
    assert await status("GET", "/latest/meta-data/instance-id", {}) == 401
    assert await status("GET", "/latest/meta-data/instance-id", {"X-aws-ec2-metadata-token": "x"}) == 401
    assert await status("PUT", "/latest/api/token", {}) == 400
    assert await status("PUT", "/latest/api/token", {ttl: "0"}) == 400
    assert await status("PUT", "/latest/api/token", {ttl: "21601"}) == 400
    assert await status("PUT", "/latest/api/token", {ttl: "60", "X-Forwarded-For": "10.0.0.1"}) == 403
    assert await status("GET", "/latest/api/token", {}) == 405
    assert await status("PUT", "/latest/api/token", {ttl: "21600"}) == 200


# -- errors, retries, outages ----------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "outcome"), [(503, "error"), (500, "error"), (429, "throttled")])
async def test_transient_statuses_are_retried_and_counted(
    imds: FakeImds, session: Any, status: int, outcome: str
) -> None:
    before_failed = requests_count("instance-id", outcome)
    before_ok = requests_count("instance-id", "ok")
    imds.fail_next("instance-id", status=status, times=2)
    assert await client_for(session, imds).get("instance-id") == "i-0123456789abcdef0"
    assert requests_count("instance-id", outcome) == before_failed + 2
    assert requests_count("instance-id", "ok") == before_ok + 1


async def test_transient_token_failure_is_retried(imds: FakeImds, session: Any) -> None:
    imds.fail_next("api/token", status=503, times=1)
    assert await client_for(session, imds).get("instance-id") == "i-0123456789abcdef0"
    assert imds.count("PUT", "api/token") == 2


async def test_timeout_is_retried_and_counted(imds: FakeImds, session: Any) -> None:
    client = client_for(session, imds, timeout=0.2)
    await client.get("instance-id")  # the token first, so only the GET is delayed
    before = requests_count("instance-type", "timeout")
    imds.delay_next("instance-type", 1.0)
    assert await client.get("instance-type") == "m5.large"
    assert requests_count("instance-type", "timeout") == before + 1


async def test_last_try_raises_imds_unavailable(imds: FakeImds, session: Any) -> None:
    imds.fail_next("instance-id", status=503, times=100)
    with pytest.raises(ImdsUnavailable, match="status 503") as caught:
        await client_for(session, imds, retry_attempts=4).get("instance-id")
    assert caught.value.path == "instance-id"
    assert imds.count("GET", "instance-id") == 4


async def test_unreachable_endpoint(session: Any) -> None:
    async with FakeImds() as gone:
        url = gone.url
    before = requests_count("api/token", "error")
    client = ImdsClient(url, timeout=0.3, retry_backoff=0.005)
    session.append(client)
    with pytest.raises(ImdsUnavailable):
        await client.get("instance-id")
    assert requests_count("api/token", "error") == before + 3


async def test_total_outage_is_an_incomplete_poll_not_an_exception(imds: FakeImds, session: Any) -> None:
    from spotd.notices.metrics import IMDS_LAST_SUCCESS

    imds.set_instance_action(time=NOW)
    log = RecordingLog()
    poller = NoticePoller(client_for(session, imds), log=log)
    IMDS_LAST_SUCCESS.set(0)
    imds.fail_next(None, status=503, times=10_000)
    for _ in range(2):
        result = await poller.poll_once(NOW)
        assert not result.complete and result.notices == ()
        assert set(result.failed_paths) == set(NOTICE_PATHS)
        assert not any(result.covers(kind) for kind in NoticeKind)
    assert len(log.named("imds_path_unavailable")) == 4  # once per path, not once per cycle
    assert REGISTRY.get_sample_value("spotd_imds_last_success_timestamp_seconds") == 0
    imds.clear_faults()
    result = await poller.poll_once(NOW)
    assert result.complete and [n.kind for n in result.notices] == [NoticeKind.SPOT_ITN]
    assert (REGISTRY.get_sample_value("spotd_imds_last_success_timestamp_seconds") or 0) > 0
    assert len(log.named("imds_path_recovered")) == 4


async def test_outage_costs_one_timeout_per_try_not_one_per_path(imds: FakeImds, session: Any) -> None:
    imds.delay_next(None, 2.0, times=10_000)
    poller = NoticePoller(client_for(session, imds, timeout=0.2, retry_attempts=2), log=RecordingLog())
    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await poller.poll_once(NOW)
    # The four paths share each token PUT: about 2 x 0.2 s; one PUT per path in turn would be 1.6 s.
    assert loop.time() - started < 1.2
    assert set(result.failed_paths) == set(NOTICE_PATHS)
    assert imds.count("GET") == 0


async def test_one_failed_path_is_seen_next_cycle(imds: FakeImds, session: Any) -> None:
    imds.set_instance_action(time=NOW + timedelta(minutes=2))
    imds.set_rebalance(notice_time=NOW)
    imds.fail_next(ITN, status=503, times=3)  # every try of this cycle
    poller = NoticePoller(client_for(session, imds))
    result = await poller.poll_once(NOW)
    assert not result.complete and result.failed_paths == (ITN,)
    assert not result.covers(NoticeKind.SPOT_ITN) and result.covers(NoticeKind.REBALANCE)
    assert [n.kind for n in result.notices] == [NoticeKind.REBALANCE]
    result = await poller.poll_once(NOW)
    assert result.complete and {n.kind for n in result.notices} == {NoticeKind.SPOT_ITN, NoticeKind.REBALANCE}


# -- malformed payloads and caching ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (ITN, "{not json"),
        (ITN, '{"action": "explode", "time": "2026-11-25T08:02:00Z"}'),
        (ITN, '{"action": ["terminate"], "time": "2026-11-25T08:02:00Z"}'),
        (REBALANCE, '{"noticeTime": 12}'),
        (MAINTENANCE, '{"EventId": "x"}'),
        (MAINTENANCE, '[{"EventId": "e", "State": "active", "NotBefore": "tomorrow"}]'),
        (LIFECYCLE, "<html>oops</html>"),
    ],
)
async def test_malformed_payload_is_logged_counted_and_skipped(
    imds: FakeImds, session: Any, path: str, body: str
) -> None:
    imds.set_rebalance(notice_time=NOW) if path != REBALANCE else imds.set_instance_action(time=NOW)
    imds.set_raw(path, body)
    log = RecordingLog()
    poller = NoticePoller(client_for(session, imds), log=log)
    before = malformed_count()
    for _ in range(3):
        result = await poller.poll_once(NOW)
        assert result.malformed_paths == (path,) and result.failed_paths == ()
        assert not result.complete and not result.covers(NOTICE_PATHS[path])
        assert len(result.notices) == 1 and result.notices[0].kind is not NOTICE_PATHS[path]
    assert malformed_count() == before + 1  # an unchanged body is parsed, logged and counted once
    (logged,) = log.named("notice_malformed")
    assert logged["path"] == path and logged["error"]


async def test_malformed_maintenance_list_does_not_report_events_gone(imds: FakeImds, session: Any) -> None:
    imds.set_scheduled_events([event("instance-event-1", "active")])
    poller = NoticePoller(client_for(session, imds), log=RecordingLog())
    assert (await poller.poll_once(NOW)).covers(NoticeKind.SCHEDULED_MAINTENANCE)
    imds.set_raw(MAINTENANCE, "[{")
    result = await poller.poll_once(NOW)
    assert not result.covers(NoticeKind.SCHEDULED_MAINTENANCE) and not result.complete
    imds.set_raw(MAINTENANCE, None)
    (notice,) = (await poller.poll_once(NOW + timedelta(seconds=2))).notices
    assert notice.seen_at == NOW  # the same event, first seen before the bad payload


async def test_unchanged_body_is_parsed_once(imds: FakeImds, session: Any) -> None:
    imds.set_instance_action(time=NOW + timedelta(minutes=2))
    poller = NoticePoller(client_for(session, imds))
    (first,) = (await poller.poll_once(NOW)).notices
    (second,) = (await poller.poll_once(NOW + timedelta(seconds=1))).notices
    assert second is first and second.seen_at == NOW


async def test_changed_body_keeps_first_sighting_of_known_events(imds: FakeImds, session: Any) -> None:
    imds.set_scheduled_events([event("instance-event-1", "active")])
    poller = NoticePoller(client_for(session, imds))
    await poller.poll_once(NOW)
    later = NOW + timedelta(hours=1)
    imds.set_scheduled_events([event("instance-event-1", "completed"), event("instance-event-2", "active")])
    by_id = {n.event_id: n for n in (await poller.poll_once(later)).notices}
    assert by_id["instance-event-1"].state == "completed" and by_id["instance-event-1"].seen_at == NOW
    assert by_id["instance-event-2"].seen_at == later


async def test_notice_returns_after_404_as_a_new_sighting(imds: FakeImds, session: Any) -> None:
    poller = NoticePoller(client_for(session, imds))
    imds.set_lifecycle_state("Terminated")
    await poller.poll_once(NOW)
    imds.set_lifecycle_state(None)
    assert (await poller.poll_once(NOW)).notices == ()
    imds.set_lifecycle_state("Terminated")
    (notice,) = (await poller.poll_once(NOW + timedelta(minutes=5))).notices
    assert notice.seen_at == NOW + timedelta(minutes=5)


async def test_poll_once_is_cancellable(imds: FakeImds, session: Any) -> None:
    imds.delay_next(None, 5.0, times=100)
    task = asyncio.create_task(NoticePoller(client_for(session, imds, timeout=10)).poll_once(NOW))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# -- instance info ---------------------------------------------------------------------------------------


async def test_instance_info(session: Any) -> None:
    async with FakeImds(instance_type="c6i.xlarge", zone="eu-west-1b", lifecycle="on-demand") as fake:
        info = await client_for(session, fake).instance_info()
    assert info == InstanceInfo("i-0123456789abcdef0", "c6i.xlarge", "eu-west-1b", "eu-west-1", "on-demand")


async def test_instance_info_derives_region_from_zone(imds: FakeImds, session: Any) -> None:
    imds.set_metadata("placement/region", None)
    info = await client_for(session, imds).instance_info()
    assert (info.zone, info.region, info.lifecycle) == ("us-east-1a", "us-east-1", "spot")


async def test_instance_info_is_never_fatal(imds: FakeImds, session: Any) -> None:
    imds.fail_next("instance-type", status=500, times=100)
    imds.set_metadata("instance-life-cycle", None)
    info = await client_for(session, imds).instance_info()
    assert info.instance_id == "i-0123456789abcdef0"
    assert (info.instance_type, info.lifecycle) == ("", "")
    imds.fail_next(None, status=503, times=1000)
    assert await client_for(session, imds).instance_info() == InstanceInfo()


# -- one kept-alive connection, and polling by urgency ---------------------------------------------------


async def test_requests_share_one_kept_alive_connection(imds: FakeImds, session: Any) -> None:
    client = client_for(session, imds)
    poller = NoticePoller(client)
    for _ in range(5):
        await poller.poll_once(NOW)
    await client.instance_info()
    assert imds.count("GET") == 5 * 4 + 5 and imds.count("PUT", "api/token") == 1
    assert client.connections_opened == 1


async def test_a_connection_imds_closed_is_replaced_without_a_failure(session: Any) -> None:
    first = FakeImds()
    await first.start()
    client = client_for(session, first)
    assert await client.get("instance-id") == "i-0123456789abcdef0"
    await first.stop()  # closes the kept connection
    async with FakeImds(port=first.port) as second:
        before = requests_count("instance-id", "error")
        assert await client.get("instance-id") == "i-0123456789abcdef0"  # a fresh token on a fresh connection
        assert requests_count("instance-id", "error") == before
        assert client.connections_opened == 2
        assert second.count("PUT", "api/token") == 1  # the new IMDS knows no old token: 401, then a fresh one


async def test_poll_of_some_paths_keeps_the_latest_reading_of_the_others(imds: FakeImds, session: Any) -> None:
    poller = NoticePoller(client_for(session, imds))
    imds.set_rebalance(notice_time=NOW)
    await poller.poll_once(NOW)  # every path
    imds.clear_rebalance()
    imds.set_instance_action(time=NOW + timedelta(minutes=2))
    result = await poller.poll_once(NOW, [ITN])
    assert imds.count("GET", REBALANCE) == 1  # not read again
    assert result.complete and {n.kind for n in result.notices} == {NoticeKind.SPOT_ITN, NoticeKind.REBALANCE}
    result = await poller.poll_once(NOW)
    assert [n.kind for n in result.notices] == [NoticeKind.SPOT_ITN]


async def test_a_path_never_read_is_not_covered(imds: FakeImds, session: Any) -> None:
    result = await NoticePoller(client_for(session, imds)).poll_once(NOW, [ITN])
    assert result.covers(NoticeKind.SPOT_ITN) and not result.covers(NoticeKind.REBALANCE)
    assert not result.complete and imds.count("GET") == 1
