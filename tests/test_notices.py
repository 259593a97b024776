"""Table tests for the pure parsers: IMDS notice payloads (notices.py) and small formats (parsing.py)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from spotd.common.parsing import (
    format_duration,
    format_time,
    parse_duration,
    parse_host_port,
    parse_iso_time,
    parse_key_value,
    parse_maintenance_time,
)
from spotd.notices.record import (
    MalformedNotice,
    Notice,
    NoticeKind,
    parse_instance_action,
    parse_rebalance,
    parse_scheduled_events,
    parse_target_lifecycle_state,
)

NOW = datetime(2026, 11, 25, 8, 0, 0, tzinfo=UTC)
WINDOW = timedelta(seconds=120)


def at(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


# -- spot/instance-action --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "action", "deadline"),
    [
        ('{"action": "terminate", "time": "2017-09-18T08:22:00Z"}', "terminate", at(2017, 9, 18, 8, 22)),
        ('{"action": "stop", "time": "2017-09-18T08:22:00Z"}', "stop", at(2017, 9, 18, 8, 22)),
        ('{"action": "hibernate", "time": "2017-09-18T08:22:00.5Z"}', "hibernate", at(2017, 9, 18, 8, 22, 0, 500000)),
        ('{"action": "terminate", "time": "2017-09-18T10:22:00+02:00"}', "terminate", at(2017, 9, 18, 8, 22)),
        ('{"action": "terminate", "time": "2017-09-18T08:22:00"}', "terminate", at(2017, 9, 18, 8, 22)),
        (' {"time": "2017-09-18T08:22:00Z", "action": "terminate", "extra": 1}\n', "terminate", at(2017, 9, 18, 8, 22)),
    ],
)
def test_instance_action(body: str, action: str, deadline: datetime) -> None:
    notice = parse_instance_action(body, NOW)
    assert (notice.kind, notice.action, notice.deadline, notice.seen_at) == (
        NoticeKind.SPOT_ITN,
        action,
        deadline,
        NOW,
    )
    assert notice.source == "imds" and notice.key == f"spot-itn/{format_time(deadline)}"
    assert notice.seconds_left(deadline - timedelta(seconds=90)) == 90


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ("", "not JSON"),
        ("{not json", "not JSON"),
        ("<html>404</html>", "not JSON"),
        ("null", "not a JSON object"),
        ('["terminate"]', "not a JSON object"),
        ('"terminate"', "not a JSON object"),
        ('{"time": "2017-09-18T08:22:00Z"}', "unknown action None"),
        ('{"action": "reboot", "time": "2017-09-18T08:22:00Z"}', "unknown action 'reboot'"),
        ('{"action": "Terminate", "time": "2017-09-18T08:22:00Z"}', "unknown action"),
        ('{"action": ["terminate"], "time": "2017-09-18T08:22:00Z"}', "unknown action"),
        ('{"action": {"a": 1}, "time": "2017-09-18T08:22:00Z"}', "unknown action"),
        ('{"action": 1, "time": "2017-09-18T08:22:00Z"}', "unknown action"),
        ('{"action": "terminate"}', "time"),
        ('{"action": "terminate", "time": ""}', "time"),
        ('{"action": "terminate", "time": 1505722920}', "time"),
        ('{"action": "terminate", "time": null}', "time"),
        ('{"action": "terminate", "time": "18 Sep 2017 08:22:00 GMT"}', "time"),
        ('{"action": "terminate", "time": "2017-13-18T08:22:00Z"}', "time"),
    ],
)
def test_instance_action_malformed(body: str, error: str) -> None:
    with pytest.raises(MalformedNotice, match=error):
        parse_instance_action(body, NOW)


# -- events/recommendations/rebalance --------------------------------------------------------------------


def test_rebalance() -> None:
    notice = parse_rebalance('{"noticeTime": "2020-10-27T08:22:00Z"}', NOW, source="test")
    assert (notice.kind, notice.deadline, notice.source) == (NoticeKind.REBALANCE, None, "test")
    assert notice.event_id == "2020-10-27T08:22:00.000Z"
    assert notice.key == "rebalance/2020-10-27T08:22:00.000Z"
    assert notice.seconds_left(NOW) is None


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ("", "not JSON"),
        ("[]", "not a JSON object"),
        ("{}", "noticeTime"),
        ('{"noticeTime": 12}', "noticeTime"),
        ('{"noticeTime": "yesterday"}', "noticeTime"),
        ('{"NoticeTime": "2020-10-27T08:22:00Z"}', "noticeTime"),
    ],
)
def test_rebalance_malformed(body: str, error: str) -> None:
    with pytest.raises(MalformedNotice, match=error):
        parse_rebalance(body, NOW)


# -- events/maintenance/scheduled ------------------------------------------------------------------------


def event(**overrides: Any) -> dict[str, Any]:
    base = {
        "NotBefore": "21 Jan 2019 09:00:43 GMT",
        "Code": "system-reboot",
        "Description": "scheduled reboot",
        "EventId": "instance-event-0d59937288b749b32",
        "NotAfter": "21 Jan 2019 09:17:23 GMT",
        "State": "active",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def test_scheduled_events_empty() -> None:
    assert parse_scheduled_events("[]", NOW) == []


def test_scheduled_event_fields() -> None:
    (notice,) = parse_scheduled_events(json.dumps([event()]), NOW)
    assert notice.kind is NoticeKind.SCHEDULED_MAINTENANCE
    assert notice.deadline == at(2019, 1, 21, 9, 0, 43)
    assert notice.not_after == at(2019, 1, 21, 9, 17, 23)
    assert (notice.action, notice.state, notice.description) == ("system-reboot", "active", "scheduled reboot")
    assert notice.key == "scheduled-maintenance/instance-event-0d59937288b749b32"


@pytest.mark.parametrize(
    ("overrides", "state", "not_after"),
    [
        ({"State": "active"}, "active", at(2019, 1, 21, 9, 17, 23)),
        ({"State": "Active"}, "active", at(2019, 1, 21, 9, 17, 23)),
        ({"State": "completed"}, "completed", at(2019, 1, 21, 9, 17, 23)),
        ({"State": "canceled"}, "canceled", at(2019, 1, 21, 9, 17, 23)),
        ({"NotAfter": None}, "active", None),
        ({"NotAfter": ""}, "active", None),
        ({"NotBefore": "2019-01-21T09:00:43Z"}, "active", at(2019, 1, 21, 9, 17, 23)),
        ({"NotBefore": "21 Jan 2019 09:00:43 UTC"}, "active", at(2019, 1, 21, 9, 17, 23)),
    ],
)
def test_scheduled_event_states_and_dates(overrides: dict[str, Any], state: str, not_after: Any) -> None:
    (notice,) = parse_scheduled_events(json.dumps([event(**overrides)]), NOW)
    assert (notice.state, notice.not_after, notice.deadline) == (state, not_after, at(2019, 1, 21, 9, 0, 43))


def test_scheduled_events_every_state_and_long_description() -> None:
    events = [
        event(EventId="a", State="active", Code="instance-stop"),
        event(EventId="b", State="completed", Code="instance-retirement"),
        event(EventId="c", State="canceled", Description="x" * 500),
    ]
    notices = parse_scheduled_events(json.dumps(events), NOW)
    assert [(n.event_id, n.state, n.action) for n in notices] == [
        ("a", "active", "instance-stop"),
        ("b", "completed", "instance-retirement"),
        ("c", "canceled", "system-reboot"),
    ]
    assert len(notices[2].description) == 200


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ("", "not JSON"),
        ("[{", "not JSON"),
        ("{}", "not a JSON list"),
        ('"[]"', "not a JSON list"),
        ("[1]", "event 0 is not a JSON object"),
        (json.dumps([event(), "x"]), "event 1 is not a JSON object"),
        (json.dumps([event(State="pending")]), "unknown State 'pending'"),
        (json.dumps([event(State=None)]), "unknown State None"),
        (json.dumps([event(State=["active"])]), "unknown State"),
        (json.dumps([event(EventId=None)]), "no EventId"),
        (json.dumps([event(EventId="")]), "no EventId"),
        (json.dumps([event(EventId=7)]), "no EventId"),
        (json.dumps([event(NotBefore=None)]), "instance-event-0d59937288b749b32"),
        (json.dumps([event(NotBefore="tomorrow")]), "not a date"),
        (json.dumps([event(NotBefore=1548061243)]), "not a maintenance date"),
        (json.dumps([event(NotAfter="21 Jan 2019")]), "not a date"),
        (json.dumps([event(NotBefore="32 Jan 2019 09:00:43 GMT")]), "not a date"),
    ],
)
def test_scheduled_events_malformed(body: str, error: str) -> None:
    with pytest.raises(MalformedNotice, match=error):
        parse_scheduled_events(body, NOW)


def test_one_bad_event_fails_the_whole_list() -> None:
    # Skipping the bad one could uncordon a node whose maintenance is still due.
    with pytest.raises(MalformedNotice):
        parse_scheduled_events(json.dumps([event(EventId="good"), event(EventId="bad", State="?")]), NOW)


# -- autoscaling/target-lifecycle-state ------------------------------------------------------------------


def test_lifecycle_terminated_is_a_notice_with_the_window() -> None:
    notice = parse_target_lifecycle_state("Terminated\n", NOW, WINDOW)
    assert notice is not None
    assert (notice.kind, notice.action, notice.deadline) == (NoticeKind.ASG_TERMINATION, "terminate", NOW + WINDOW)


@pytest.mark.parametrize("body", ["InService", "Standby", "Detached", "Warmed:Stopped", "Warmed:Hibernated"])
def test_lifecycle_other_states_are_no_notice(body: str) -> None:
    assert parse_target_lifecycle_state(body, NOW, WINDOW) is None


@pytest.mark.parametrize("body", ["", "  \n", "<html>", "Terminated please", "x" * 65, '{"state": "x"}', "In-Service"])
def test_lifecycle_malformed(body: str) -> None:
    with pytest.raises(MalformedNotice, match="not a lifecycle state"):
        parse_target_lifecycle_state(body, NOW, WINDOW)


# -- the Notice record -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "notice",
    [
        parse_instance_action('{"action": "stop", "time": "2017-09-18T08:22:00Z"}', NOW),
        parse_rebalance('{"noticeTime": "2020-10-27T08:22:00Z"}', NOW),
        parse_scheduled_events(json.dumps([event(State="canceled")]), NOW)[0],
        parse_target_lifecycle_state("Terminated", NOW, WINDOW),
    ],
)
def test_notice_json_round_trip(notice: Notice) -> None:
    again = Notice.from_json(notice.to_json())
    assert again == notice and again.key == notice.key
    assert notice.with_source("annotation").source == "annotation"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("not json", "not JSON"),
        ("[]", "not a JSON object"),
        ("{}", "unknown notice kind None"),
        ('{"kind": "meteor"}', "unknown notice kind 'meteor'"),
        ('{"kind": ["spot-itn"]}', "unknown notice kind"),
        ('{"kind": "spot-itn"}', "lacks 'seen_at'"),
        ('{"kind": "spot-itn", "seen_at": "soon"}', "not an RFC 3339"),
        ('{"kind": "spot-itn", "seen_at": 5}', "not a timestamp"),
        ('{"kind": "spot-itn", "seen_at": "2026-11-25T08:00:00Z", "deadline": "x"}', "not an RFC 3339"),
    ],
)
def test_notice_from_json_malformed(text: str, error: str) -> None:
    with pytest.raises(MalformedNotice, match=error):
        Notice.from_json(text)


# -- parsing.py: durations -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("2m", 120),
        ("2h", 7200),
        ("1d", 86400),
        ("1.5", 1.5),
        ("0", 0),
        ("250ms", 0.25),
        ("1h30m", 5400),
        ("1m30s", 90),
        ("2h0m5s", 7205),
        ("1.5m", 90),
        (" 45 s ", 45),
    ],
)
def test_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["", "  ", "s", "-5s", "5x", "1h 30m", "1h30", "h1", "5 minutes", "1e3", "1,5s", "nan"]
)
def test_duration_bad(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize(("seconds", "text"), [(7200, "2h"), (120, "2m"), (90, "90s"), (1.5, "1.5s"), (0, "0s")])
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


# -- parsing.py: dates -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "when"),
    [
        ("21 Jan 2019 09:00:43 GMT", at(2019, 1, 21, 9, 0, 43)),
        ("1 Feb 2019 00:00:00 GMT", at(2019, 2, 1)),
        (" 21 Jan 2019 09:00:43 GMT ", at(2019, 1, 21, 9, 0, 43)),
        ("21 Jan 2019 09:00:43 UTC", at(2019, 1, 21, 9, 0, 43)),
        ("2019-01-21T09:00:43Z", at(2019, 1, 21, 9, 0, 43)),
    ],
)
def test_maintenance_time(text: str, when: datetime) -> None:
    parsed = parse_maintenance_time(text)
    assert parsed == when and parsed.tzinfo is not None


@pytest.mark.parametrize("text", ["", "21 Jan 2019", "21 Foo 2019 09:00:43 GMT", "Jan 21 2019 09:00:43 GMT", None, 7])
def test_maintenance_time_bad(text: Any) -> None:
    with pytest.raises(ValueError):
        parse_maintenance_time(text)


@pytest.mark.parametrize(
    ("text", "when"),
    [
        ("2017-09-18T08:22:00Z", at(2017, 9, 18, 8, 22)),
        ("2017-09-18T08:22:00.123Z", at(2017, 9, 18, 8, 22, 0, 123000)),
        ("2017-09-18T10:22:00+02:00", at(2017, 9, 18, 8, 22)),
        ("2017-09-18T08:22:00", at(2017, 9, 18, 8, 22)),
    ],
)
def test_iso_time(text: str, when: datetime) -> None:
    parsed = parse_iso_time(text)
    assert parsed == when and parsed.utcoffset() == timedelta(0)


@pytest.mark.parametrize("text", ["", " ", "soon", "2017-09-18T25:00:00Z", None, 1505722920])
def test_iso_time_bad(text: Any) -> None:
    with pytest.raises(ValueError):
        parse_iso_time(text)


def test_format_time_is_utc_with_milliseconds() -> None:
    east = datetime(2017, 9, 18, 10, 22, 0, 123456, tzinfo=timezone(timedelta(hours=2)))
    assert format_time(east) == "2017-09-18T08:22:00.123Z"
    assert parse_iso_time(format_time(east)) == at(2017, 9, 18, 8, 22, 0, 123000)


# -- parsing.py: key=value, host:port --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "pair"),
    [
        ("team=platform", ("team", "platform")),
        (" team = platform ", ("team", "platform")),
        ("example.com/team=platform", ("example.com/team", "platform")),
        ("app.kubernetes.io/name=spotd", ("app.kubernetes.io/name", "spotd")),
        ("empty=", ("empty", "")),
        ("a=b_c.d-e", ("a", "b_c.d-e")),
        ("A_b.c-D=1", ("A_b.c-D", "1")),
    ],
)
def test_key_value(text: str, pair: tuple[str, str]) -> None:
    assert parse_key_value(text) == pair


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("team", "not key=value"),
        ("", "not key=value"),
        ("=platform", "label name"),
        ("-team=x", "label name"),
        ("team-=x", "label name"),
        ("Example.com/team=x", "label name"),
        ("a/b/c=x", "label name"),
        ("k" * 64 + "=x", "label name"),
        ("team=two words", "label value"),
        ("team=-x", "label value"),
        ("team=a=b", "label value"),
        ("team=" + "v" * 64, "label value"),
    ],
)
def test_key_value_bad(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        parse_key_value(text)


@pytest.mark.parametrize(
    ("text", "pair"),
    [
        ("0.0.0.0:9100", ("0.0.0.0", 9100)),
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        (":9100", ("0.0.0.0", 9100)),
        ("localhost:0", ("localhost", 0)),
        ("[::1]:9100", ("::1", 9100)),
        ("[::]:65535", ("::", 65535)),
    ],
)
def test_host_port(text: str, pair: tuple[str, int]) -> None:
    assert parse_host_port(text) == pair


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("9100", "not HOST:PORT"),
        ("localhost", "not HOST:PORT"),
        ("localhost:", "not a port number"),
        ("localhost:http", "not a port number"),
        ("localhost:65536", "out of range"),
        ("localhost:-1", "out of range"),
    ],
)
def test_host_port_bad(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        parse_host_port(text)


@pytest.mark.parametrize("text", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
def test_an_out_of_range_time_is_a_parse_error_not_an_overflow(text: str) -> None:
    """Review finding: year 1 with an offset overflowed in astimezone() and crash-looped the agent."""
    with pytest.raises(ValueError, match="out of range"):
        parse_iso_time(text)


def test_an_out_of_range_maintenance_date_is_a_parse_error() -> None:
    with pytest.raises(ValueError, match="out of range"):
        parse_maintenance_time("1 Jan 0001 00:05:00 GMT")
