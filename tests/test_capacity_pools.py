"""The pool state machine: never seen, ICE, recovery, cooldown, wildcards, order independence, the probe."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest

from spotd.capacity.metrics import export_pool_states
from spotd.capacity.pools import AVAILABLE, PROBE_BACKOFF_CAP, RECOVERING, UNAVAILABLE, PoolBook
from spotd.capacity.signals import CapacitySignal, CapacityType, Pool, SignalKind
from spotd.common.metrics import REGISTRY

T0 = datetime(2024, 3, 5, 10, 0, tzinfo=UTC)
COOLDOWN = timedelta(minutes=30)
QUIET = timedelta(hours=2)
M5A = Pool("m5.large", "us-east-1a")
M5B = Pool("m5.large", "us-east-1b")
C5A = Pool("c5.large", "us-east-1a")
ANY_A = Pool("*", "us-east-1a")


def ice(pool: Pool, minutes: float, source: str = "sqs", capacity_type: str = CapacityType.SPOT) -> CapacitySignal:
    return CapacitySignal(
        pool,
        SignalKind.ICE,
        source,
        T0 + timedelta(minutes=minutes),
        reason="InsufficientInstanceCapacity",
        asg="asg-a",
        capacity_type=capacity_type,
    )


def launched(
    pool: Pool, minutes: float, capacity_type: str = CapacityType.SPOT, source: str = "node"
) -> CapacitySignal:
    return CapacitySignal(
        pool, SignalKind.LAUNCHED, source, T0 + timedelta(minutes=minutes), capacity_type=capacity_type
    )


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


@pytest.mark.parametrize(
    ("signals", "now", "state"),
    [
        ([], 0, AVAILABLE),
        ([ice(M5A, 0)], 1, UNAVAILABLE),
        ([ice(M5A, 0)], 24 * 60, UNAVAILABLE),  # time alone never brings Spot back
        ([ice(M5A, 0), launched(M5A, 5)], 10, RECOVERING),
        ([ice(M5A, 0), launched(M5A, 5)], 30, AVAILABLE),
        ([ice(M5A, 0), launched(M5A, 5), ice(M5A, 20)], 21, UNAVAILABLE),  # new ICE during recovery
        ([ice(M5A, 0), launched(M5A, 5), ice(M5A, 20)], 120, UNAVAILABLE),
        ([ice(M5A, 0), launched(M5A, 5), ice(M5A, 20), launched(M5A, 25)], 49, RECOVERING),
        ([ice(M5A, 0), launched(M5A, 5), ice(M5A, 20), launched(M5A, 25)], 50, AVAILABLE),
        ([ice(M5A, 0), launched(M5A, 90)], 91, AVAILABLE),  # cooldown counts from the last ICE
        ([ice(M5A, 0), launched(M5A, 0)], 60, UNAVAILABLE),  # a launch at the same instant is not "after"
        ([ice(M5A, 0), launched(M5A, 5, CapacityType.ON_DEMAND)], 60, UNAVAILABLE),
        ([ice(M5A, 0), launched(M5A, 5, CapacityType.UNKNOWN)], 60, UNAVAILABLE),
        ([ice(M5A, 0, capacity_type=CapacityType.ON_DEMAND)], 1, UNAVAILABLE),  # on-demand short: Spot too
        ([ice(M5A, 0), launched(M5B, 5)], 60, UNAVAILABLE),  # another zone says nothing
        ([ice(M5B, 0)], 1, AVAILABLE),
        ([launched(M5A, 5)], 6, AVAILABLE),
    ],
)
def test_state_table(signals: list[CapacitySignal], now: float, state: str) -> None:
    book = PoolBook().record_all(signals)
    verdict = book.spot_available(M5A, at(now), COOLDOWN)
    assert verdict.state == state == book.state(M5A, at(now), COOLDOWN)
    assert verdict.available == (state == AVAILABLE)
    assert verdict.reason


def test_reasons_say_why() -> None:
    assert PoolBook().spot_available(M5A, T0, COOLDOWN).reason == "no ICE seen"
    book = PoolBook().record(ice(M5A, 0))
    assert book.spot_available(M5A, at(1), COOLDOWN).reason == (
        "ICE InsufficientInstanceCapacity in m5.large/us-east-1a at 2024-03-05T10:00:00.000Z, no Spot launch since"
    )
    book = book.record(launched(M5A, 5))
    assert "cooldown until 2024-03-05T10:30:00.000Z" in book.spot_available(M5A, at(10), COOLDOWN).reason


def test_order_of_arrival_does_not_matter() -> None:
    history = [ice(M5A, 0), launched(M5A, 5), ice(ANY_A, 7), launched(C5A, 20), ice(M5A, 1, source="activities")]
    states = set()
    for perm in itertools.permutations(history):
        book = PoolBook().record_all(perm)
        states.add(tuple(book.state(p, at(60), COOLDOWN) for p in (M5A, C5A, M5B, ANY_A)))
    assert states == {(AVAILABLE, AVAILABLE, AVAILABLE, AVAILABLE)}


def test_duplicate_signal_is_harmless() -> None:
    once = PoolBook().record_all([ice(M5A, 0), launched(M5A, 5)])
    twice = once.record_all([ice(M5A, 0, source="activities"), launched(M5A, 5)])
    assert once.state(M5A, at(40), COOLDOWN) == twice.state(M5A, at(40), COOLDOWN) == AVAILABLE


def test_wildcard_ice_covers_the_zone_and_any_launch_there_recovers_it() -> None:
    book = PoolBook().record(ice(ANY_A, 0))
    assert book.state(M5A, at(1), COOLDOWN) == UNAVAILABLE
    assert book.state(C5A, at(1), COOLDOWN) == UNAVAILABLE
    assert book.state(M5B, at(1), COOLDOWN) == AVAILABLE
    book = book.record(launched(C5A, 5))
    assert book.state(ANY_A, at(60), COOLDOWN) == AVAILABLE
    assert book.state(M5A, at(60), COOLDOWN) == AVAILABLE


def test_concrete_ice_is_not_lifted_by_a_wildcard_launch() -> None:
    book = PoolBook().record_all([ice(M5A, 0), launched(ANY_A, 5)])
    assert book.state(M5A, at(60), COOLDOWN) == UNAVAILABLE
    assert book.state(ANY_A, at(60), COOLDOWN) == AVAILABLE


def test_worst_verdict_wins() -> None:
    book = PoolBook().record_all([ice(M5A, 0), launched(M5A, 5), ice(ANY_A, 50)])
    assert book.state(M5A, at(60), COOLDOWN) == UNAVAILABLE


def test_book_is_immutable() -> None:
    empty = PoolBook()
    book = empty.record(ice(M5A, 0))
    assert empty.pools() == [] and book.pools() == [M5A]
    assert book.record(launched(M5A, 5, CapacityType.ON_DEMAND)) is book
    assert book.get(M5A) is not None and book.get(M5B) is None


def test_pools_sorted() -> None:
    book = PoolBook().record_all([ice(M5B, 0), ice(C5A, 0), launched(M5A, 1)])
    assert book.pools() == [C5A, M5A, M5B]


# --- the probe --------------------------------------------------------------------------------------


def test_probe_due_only_for_unavailable_quiet_pools() -> None:
    book = PoolBook().record(ice(M5A, 0))
    assert not book.probe_due(M5A, at(60), QUIET)
    assert book.probe_due(M5A, at(120), QUIET)
    assert not book.probe_due(M5B, at(999), QUIET)  # never seen
    assert book.pools_to_probe(at(120), QUIET) == [M5A]
    recovered = book.record(launched(M5A, 100))
    assert not recovered.probe_due(M5A, at(999), QUIET)
    again = book.record(ice(M5A, 100))  # a fresh ICE restarts the quiet period
    assert not again.probe_due(M5A, at(200), QUIET)
    assert again.probe_due(M5A, at(220), QUIET)


def test_probe_failure_doubles_the_wait_up_to_the_cap() -> None:
    book = PoolBook().record(ice(M5A, 0))
    now = at(120)
    waits = []
    for _ in range(8):
        assert book.probe_due(M5A, now, QUIET)
        book = book.record_probe_result(M5A, now, landed_on_spot=False)
        assert book.state(M5A, now, COOLDOWN) == UNAVAILABLE
        wait = timedelta(0)
        while not book.probe_due(M5A, now + wait, QUIET):
            wait += timedelta(minutes=30)
        waits.append(wait)
        now += wait
    assert waits[:4] == [timedelta(hours=4), timedelta(hours=8), timedelta(hours=16), PROBE_BACKOFF_CAP]
    assert set(waits[3:]) == {PROBE_BACKOFF_CAP}


def test_probe_success_counts_as_a_launch() -> None:
    book = PoolBook().record(ice(M5A, 0))
    book = book.record_probe_result(M5A, at(120), landed_on_spot=False)
    book = book.record_probe_result(M5A, at(360), landed_on_spot=True)
    assert book.state(M5A, at(361), COOLDOWN) == AVAILABLE
    assert "probe" in book.spot_available(M5A, at(361), COOLDOWN).reason
    assert not book.probe_due(M5A, at(9999), QUIET)
    # the next shortage starts the back-off afresh
    book = book.record(ice(M5A, 400))
    assert book.probe_due(M5A, at(520), QUIET)


def test_export_pool_states() -> None:
    book = PoolBook().record_all([ice(M5A, 0), ice(C5A, 0), launched(C5A, 5)])
    export_pool_states(book, at(60), COOLDOWN)
    sample = REGISTRY.get_sample_value
    assert sample("spotd_pool_spot_available", {"pool": "m5.large/us-east-1a"}) == 0
    assert sample("spotd_pool_spot_available", {"pool": "c5.large/us-east-1a"}) == 1


# --- where Spot is known: "no ICE seen" is availability only where Spot could replace the node -------------


def _spot_where_known_cases() -> list[tuple[str, PoolBook, list[object], bool, str]]:
    from spotd.capacity.signals import AsgInfo

    spot_a = AsgInfo("spot-a", ("m5.large",), ("us-east-1a",), spot=True, on_demand=False)
    any_type = AsgInfo("spot-any", (), ("us-east-1a",), spot=True, on_demand=False)
    od_only = AsgInfo("od", ("m5.large",), ("us-east-1a",), spot=False, on_demand=True)
    return [
        ("nothing known", PoolBook(), [], False, "no Spot group known for m5.large/us-east-1a"),
        ("on-demand group only", PoolBook(), [od_only], False, "no Spot group known"),
        ("Spot group of the pool", PoolBook(), [spot_a], True, "Spot ASG spot-a covers"),
        ("Spot group of any type", PoolBook(), [any_type], True, "Spot ASG spot-any covers"),
        ("Spot group elsewhere", PoolBook(), [AsgInfo("b", (), ("us-east-1b",), spot=True)], False, "no Spot"),
        ("a Spot launch seen", PoolBook().record(launched(M5A, 0)), [], True, "no ICE seen"),
        ("a launch in a wider pool", PoolBook().record(launched(ANY_A, 0)), [], True, "no ICE seen"),
        ("an ICE still counts", PoolBook().record(ice(M5A, 0)), [spot_a], False, "ICE"),
    ]


@pytest.mark.parametrize(("name", "book", "groups", "available", "reason"), _spot_where_known_cases())
def test_spot_where_known(name: str, book: PoolBook, groups: list[object], available: bool, reason: str) -> None:
    from spotd.capacity.pools import spot_where_known

    verdict = spot_where_known(book, M5A, T0 + timedelta(minutes=5), COOLDOWN, groups)  # type: ignore[arg-type]
    assert verdict.available is available, name
    assert reason in verdict.reason


# --- short until a surge succeeds (make-before-break) -----------------------------------------------

SHORT = "short"
SURGE_OK = "surge_ok"
SURGE_FAILED = "surge_failed"
PROBE_OK = "probe_ok"


def apply(book: PoolBook, step: tuple[str, Pool, float]) -> PoolBook:
    kind, pool, minutes = step
    if kind == SHORT:
        return book.record_short(pool, at(minutes), "replacements on on-demand")
    if kind == SURGE_OK:
        return book.record_surge(pool, at(minutes), ready=True)
    if kind == SURGE_FAILED:
        return book.record_surge(pool, at(minutes), ready=False, reason="not all running")
    if kind == PROBE_OK:
        return book.record_probe_result(pool, at(minutes), landed_on_spot=True)
    raise AssertionError(kind)


@pytest.mark.parametrize(
    ("signals", "steps", "now", "state"),
    [
        ([], [(SHORT, M5A, 0)], 1, UNAVAILABLE),  # replacements on on-demand: short, even without an ICE
        ([], [(SHORT, M5A, 0)], 24 * 60, UNAVAILABLE),  # time alone never ends it
        ([launched(M5A, 10)], [(SHORT, M5A, 0)], 60, UNAVAILABLE),  # nor a Spot launch: it did not hold them
        ([], [(SHORT, M5A, 0), (SURGE_OK, M5A, 30)], 31, AVAILABLE),  # only a successful surge
        ([], [(SHORT, M5A, 0), (PROBE_OK, M5A, 30)], 31, AVAILABLE),  # or probe (--surge-timeout 0)
        ([], [(SHORT, M5A, 0), (SURGE_FAILED, M5A, 30)], 31, UNAVAILABLE),
        ([], [(SURGE_FAILED, M5A, 0)], 1, UNAVAILABLE),  # a failed surge: the pool is still short
        ([], [(SHORT, M5A, 0)], 1, UNAVAILABLE),
        ([], [(SHORT, M5B, 0)], 1, AVAILABLE),  # M5A: another pool's short says nothing
        ([], [(SHORT, ANY_A, 0)], 1, UNAVAILABLE),  # a short zone holds its pools back
        ([ice(M5A, 0)], [(SURGE_OK, M5A, 5)], 10, RECOVERING),  # a surge is a launch: the cooldown still counts
        ([ice(M5A, 0)], [(SURGE_OK, M5A, 5)], 31, AVAILABLE),
        ([], [(SURGE_OK, M5A, 0), (SHORT, M5A, 5)], 6, UNAVAILABLE),
    ],
)
def test_short_state_table(
    signals: list[CapacitySignal], steps: list[tuple[str, Pool, float]], now: float, state: str
) -> None:
    book = PoolBook().record_all(signals)
    for step in steps:
        book = apply(book, step)
    assert book.state(M5A, at(now), COOLDOWN) == state


def test_short_says_why_and_is_probed_with_the_probe_back_off() -> None:
    book = PoolBook().record_short(M5A, at(0), "web-1 on od-2")
    verdict = book.spot_available(M5A, at(1), COOLDOWN)
    assert "short since" in verdict.reason and "web-1 on od-2" in verdict.reason
    assert "waits for a successful surge" in verdict.reason
    assert not book.probe_due(M5A, at(60), QUIET) and book.probe_due(M5A, at(120), QUIET)
    failed = book.record_surge(M5A, at(120), ready=False)
    assert not failed.probe_due(M5A, at(120 + 239), QUIET) and failed.probe_due(M5A, at(120 + 240), QUIET)
    ready = failed.record_surge(M5A, at(400), ready=True)
    assert not ready.probe_due(M5A, at(9999), QUIET)
    assert ready.spot_available(M5A, at(401), COOLDOWN).available
    record = ready.get(M5A)
    assert record is not None and record.launch_source == "surge" and ready.spot_launch_seen(M5A)


def test_a_pool_whose_replacements_keep_landing_on_on_demand_waits_longer_each_time() -> None:
    """Review finding: a ready surge, a drain whose pods went back to on-demand, again every quiet period."""
    pool = Pool("m5.large", "us-east-1a")
    book, at = PoolBook(), T0
    waits = []
    for _ in range(3):
        book = book.record_surge(pool, at, ready=True)
        book = book.record_all([CapacitySignal(pool, SignalKind.LAUNCHED, "node", at, "surge node", key=str(at))])
        book = book.record_short(pool, at, "replacements landed on on-demand")
        waits.append(book.get(pool).probe_failures)
        at += timedelta(hours=5)
    assert waits == [1, 2, 3]
