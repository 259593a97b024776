"""Promises of docs/capacity.md that mutation testing (scripts/mutation pools) found unchecked.

Each test names the promise; the mutants it kills are listed in docs/testing.md.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

from spotd.capacity.pools import (
    AVAILABLE,
    RECOVERING,
    UNAVAILABLE,
    UNKNOWN,
    PoolBook,
    spot_group_for,
    spot_where_known,
)
from spotd.capacity.signals import AsgInfo, CapacitySignal, CapacityType, Pool, SignalKind

T0 = datetime(2024, 3, 5, 10, 0, tzinfo=UTC)
COOLDOWN = timedelta(minutes=30)
QUIET = timedelta(hours=2)
M5A = Pool("m5.large", "us-east-1a")
C5A = Pool("c5.large", "us-east-1a")
ANY_A = Pool("*", "us-east-1a")


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def ice(pool: Pool, minutes: float, reason: str = "InsufficientInstanceCapacity") -> CapacitySignal:
    return CapacitySignal(pool, SignalKind.ICE, "sqs", at(minutes), reason=reason, capacity_type=CapacityType.SPOT)


def launched(pool: Pool, minutes: float, source: str = "node") -> CapacitySignal:
    return CapacitySignal(pool, SignalKind.LAUNCHED, source, at(minutes), capacity_type=CapacityType.SPOT)


def test_any_order_gives_the_same_verdicts_reasons_included() -> None:
    # "Signals are applied by their own time, not by when they arrive": the reason an Event prints too.
    # Distinct times: at equal times which source or ICE reason is named depends on arrival, by design.
    history = [
        ice(M5A, 0, "InsufficientInstanceCapacity"),
        launched(M5A, 10, "activities"),
        ice(M5A, 20, "MaxSpotInstanceCountExceeded"),
        launched(C5A, 5, "node"),
        ice(ANY_A, 3, "SpotMaxPriceTooLow"),
    ]
    # c5's reason is left out: c5 and */us-east-1a are both available then, and which of two equally good
    # verdicts names the reason follows the order the pools were first recorded (docs/testing.md).
    seen = set()
    for perm in itertools.permutations(history):
        book = PoolBook().record_all(perm)
        seen.add(
            tuple(
                (
                    book.spot_available(p, now, COOLDOWN) if p != C5A else book.state(p, now, COOLDOWN),
                    book.probe_due(p, now, QUIET),
                )
                for p in (M5A, C5A, ANY_A)
                for now in (at(21), at(40), at(200))
            )
        )
    assert len(seen) == 1
    (verdicts,) = seen
    by_pool = dict(zip([(p, n) for p in ("m5", "c5", "any") for n in (21, 40, 200)], verdicts, strict=True))
    # the later ICE on m5 governs: its launch at 10 is before it, so no return yet
    assert by_pool["m5", 40][0].state == UNAVAILABLE
    assert "MaxSpotInstanceCountExceeded" in by_pool["m5", 40][0].reason
    # the zone-wide ICE at 3 is followed by launches at 5 (c5) and 10 (m5, named: the latest)
    assert by_pool["c5", 21][0] == RECOVERING
    assert by_pool["any", 40][0].state == AVAILABLE
    assert by_pool["any", 40][0].reason.startswith("Spot launched (activities) at 2024-03-05T10:10:00.000Z after ICE")


def test_last_ice_never_moves_back() -> None:
    book = PoolBook().record_all([ice(M5A, 20), ice(M5A, 0, "SpotMaxPriceTooLow"), launched(M5A, 10)])
    verdict = book.spot_available(M5A, at(60), COOLDOWN)
    assert verdict.state == UNAVAILABLE
    assert verdict.reason.startswith("ICE InsufficientInstanceCapacity in m5.large/us-east-1a at 2024-03-05T10:20")


def test_a_launch_counts_only_for_pools_that_contain_it_whatever_the_order() -> None:
    # A launch of c5 recorded before an (older) ICE on m5 arrives says nothing about m5.
    book = PoolBook().record_all([launched(C5A, 5), ice(M5A, 0)])
    assert book.state(M5A, at(60), COOLDOWN) == UNAVAILABLE


def test_the_recovering_reason_names_the_launch_and_the_end_of_the_cooldown() -> None:
    book = PoolBook().record_all([ice(M5A, 0), launched(M5A, 5, "activities")])
    assert book.spot_available(M5A, at(10), COOLDOWN).reason == (
        "ICE InsufficientInstanceCapacity in m5.large/us-east-1a at 2024-03-05T10:00:00.000Z; "
        "Spot launched (activities) at 2024-03-05T10:05:00.000Z; cooldown until 2024-03-05T10:30:00.000Z"
    )


def test_a_pool_with_launches_and_no_ice_is_available_because_no_ice_was_seen() -> None:
    book = PoolBook().record(launched(M5A, 5))
    assert book.spot_available(M5A, at(10), COOLDOWN).reason == "no ICE seen"


def test_a_successful_probe_is_a_launch_with_source_probe() -> None:
    book = PoolBook().record(ice(M5A, 0)).record_probe_result(M5A, at(120), landed_on_spot=True)
    assert book.spot_available(M5A, at(121), COOLDOWN).reason.startswith("Spot launched (probe) at ")


def test_only_a_launch_after_the_last_ice_resets_the_probe_back_off() -> None:
    failed = PoolBook().record(ice(M5A, 0)).record_probe_result(M5A, at(120), landed_on_spot=False)
    # the wait after one failed probe is 2 x QUIET from the probe
    assert not failed.probe_due(M5A, at(120 + 239), QUIET)
    assert failed.probe_due(M5A, at(120 + 240), QUIET)
    # a launch at the same instant as the ICE (arriving late) or before it is no return: still doubled
    for late in (launched(M5A, 0), launched(M5A, -10)):
        book = failed.record(late)
        assert book.state(M5A, at(400), COOLDOWN) == UNAVAILABLE
        assert not book.probe_due(M5A, at(120 + 239), QUIET)


def test_same_history_gives_an_equal_book() -> None:
    history = [ice(M5A, 0), launched(M5A, 10), ice(ANY_A, 3)]
    books = [PoolBook().record_all(perm) for perm in itertools.permutations(history)]
    assert all(book == books[0] for book in books)
    assert books[0] != PoolBook().record_all(history[:2])
    assert books[0] != PoolBook()
    assert books[0] != "a book"


def test_a_short_pool_is_not_spot_available() -> None:
    # "short ... until a surge succeeds": the controller reads `available`, the metric reads the state
    verdict = PoolBook().record_short(M5A, at(0), "replacements on on-demand").spot_available(M5A, at(1), COOLDOWN)
    assert verdict.available is False and verdict.state == UNAVAILABLE


def test_a_ready_surge_keeps_the_probe_back_off() -> None:
    # docs/controller.md: a failed probe doubles the wait; a ready surge is a Spot launch, but only replacements
    # that land on Spot show the pool is back: short again after it, the wait doubles once more (4 x QUIET).
    failed = PoolBook().record(ice(M5A, 0)).record_probe_result(M5A, at(120), landed_on_spot=False)
    book = failed.record_surge(M5A, at(200), ready=True).record_short(M5A, at(210), "replacements on on-demand")
    assert not book.probe_due(M5A, at(210 + 479), QUIET)
    assert book.probe_due(M5A, at(210 + 480), QUIET)


SPOT_M5A = AsgInfo("spot-m5", ("m5.large",), ("us-east-1a",), spot=True, on_demand=False)


def test_a_spot_group_after_a_non_spot_group_still_covers_the_pool() -> None:
    on_demand_first = AsgInfo("a-on-demand", ("m5.large",), ("us-east-1a",), spot=False)
    assert spot_group_for(M5A, [on_demand_first, SPOT_M5A]) == SPOT_M5A


def test_which_spot_group_covers_a_pool_zones_and_types() -> None:
    # docs/capacity.md: its zones hold the pool's zone, its types the pool's type, or it names none
    any_zone = AsgInfo("spot-any-zone", ("m5.large",), (), spot=True)
    assert spot_group_for(M5A, [any_zone]) == any_zone
    assert spot_group_for(Pool("m5.large", "*"), [AsgInfo("b", ("m5.large",), ("us-east-1b",), spot=True)]) is not None
    assert spot_group_for(M5A, [AsgInfo("spot-c5", ("c5.large",), ("us-east-1a",), spot=True)]) is None


def test_spot_where_known_keeps_the_cooldown_and_the_states() -> None:
    recovering = PoolBook().record_all([ice(M5A, 0), launched(M5A, 10)])
    during = spot_where_known(recovering, M5A, at(20), COOLDOWN, [SPOT_M5A])
    assert not during.available and during.state == RECOVERING
    assert spot_where_known(recovering, M5A, at(31), COOLDOWN, [SPOT_M5A]).available
    # "Elsewhere the verdict is `unknown`, not available"; covered by a Spot ASG: available
    assert spot_where_known(PoolBook(), M5A, at(0), COOLDOWN, []).state == UNKNOWN
    assert spot_where_known(PoolBook(), M5A, at(0), COOLDOWN, [SPOT_M5A]).state == AVAILABLE
