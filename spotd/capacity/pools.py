"""Spot capacity per pool: a pure state machine fed by capacity signals (no I/O, no clock).

States of a pool (what `PoolBook.state` returns, and the verdict's reason says why):
  available    no ICE ever seen; or a Spot launch after the last ICE and no ICE for the cooldown since.
  recovering   a Spot launch after the last ICE, but the last ICE is younger than the cooldown.
  unavailable  an ICE and no Spot launch (or successful probe) since; or short: a drain's replacements landed
               on on-demand, or a surge found no Spot room, and no surge (or probe) succeeded since.

Signals are applied by their own time, not by arrival: `last_ice` and `last_launch` only move forward, so
the order in which SQS, the activities and the nodes deliver the same history does not change the state.
An ICE names one pool, which may hold a "*" (unknown type or zone): it then covers every pool it
contains. A Spot launch counts for its own pool and for every recorded pool that contains it.

"Short" (make-before-break) is not undone by a Spot launch: Spot nodes appearing did not hold the pods
last time. Only a successful surge (`record_surge`) or probe (`record_probe_result`) ends it.

PoolBook is immutable: `record`, `record_all`, `record_short`, `record_surge` and `record_probe_result`
return a new book.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from types import MappingProxyType

from spotd.capacity.signals import ANY, AsgInfo, CapacitySignal, CapacityType, Pool, SignalKind
from spotd.common.parsing import format_time, parse_iso_time

AVAILABLE = "available"
RECOVERING = "recovering"
UNAVAILABLE = "unavailable"
UNKNOWN = "unknown"  # no ICE seen, but no Spot group known that could replace a node there either

# The probe back-off doubles after every probe whose pods landed on on-demand again, up to this.
PROBE_BACKOFF_CAP = timedelta(hours=24)


@dataclass(frozen=True)
class PoolVerdict:
    available: bool
    reason: str
    state: str = AVAILABLE


@dataclass(frozen=True)
class PoolRecord:
    """What the book remembers of one pool."""

    last_ice: datetime | None = None
    ice_reason: str = ""
    ice_count: int = 0
    last_launch: datetime | None = None  # latest Spot launch (or successful probe), any time
    launch_source: str = ""
    asgs: frozenset[str] = frozenset()
    last_probe: datetime | None = None
    probe_failures: int = 0
    short_since: datetime | None = None  # replacements landed on on-demand / a surge failed; a surge ends it
    short_reason: str = ""

    @property
    def launched_since_ice(self) -> bool:
        return self.last_ice is None or (self.last_launch is not None and self.last_launch > self.last_ice)

    def verdict(self, pool: Pool, now: datetime, cooldown: timedelta) -> PoolVerdict:
        if self.short_since is not None:
            why = f"{pool} short since {format_time(self.short_since)} ({self.short_reason})"
            return PoolVerdict(False, f"{why}; waits for a successful surge", UNAVAILABLE)
        if self.last_ice is None:
            return PoolVerdict(True, "no ICE seen", AVAILABLE)
        ice = f"ICE {self.ice_reason} in {pool} at {format_time(self.last_ice)}"
        if not self.launched_since_ice:
            return PoolVerdict(False, f"{ice}, no Spot launch since", UNAVAILABLE)
        assert self.last_launch is not None
        launched = f"Spot launched ({self.launch_source}) at {format_time(self.last_launch)}"
        quiet_until = self.last_ice + cooldown
        if now < quiet_until:
            return PoolVerdict(False, f"{ice}; {launched}; cooldown until {format_time(quiet_until)}", RECOVERING)
        return PoolVerdict(True, f"{launched} after {ice}, no ICE since", AVAILABLE)

    def last_signal(self) -> datetime | None:
        times = [t for t in (self.last_ice, self.last_launch, self.last_probe, self.short_since) if t is not None]
        return max(times) if times else None


_SEVERITY = {UNAVAILABLE: 0, UNKNOWN: 0, RECOVERING: 1, AVAILABLE: 2}


class PoolBook:
    """Spot capacity per pool. Immutable: every change returns a new book; share it freely."""

    __slots__ = ("_records",)

    def __init__(self, records: dict[Pool, PoolRecord] | None = None) -> None:
        self._records = MappingProxyType(dict(records or {}))

    def __repr__(self) -> str:
        return f"PoolBook({len(self._records)} pools)"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PoolBook) and dict(self._records) == dict(other._records)

    __hash__ = None  # type: ignore[assignment]

    def record(self, signal: CapacitySignal) -> PoolBook:
        """The book with one more signal applied. ICE of any capacity type counts; only Spot launches
        count as return (a launch of unknown or on-demand capacity changes nothing)."""
        records = dict(self._records)
        if signal.kind == SignalKind.ICE:
            rec = records.get(signal.pool, PoolRecord())
            # Launches recorded before this (wider) pool was first named still count for it.
            for pool, other in self._records.items():
                if other.last_launch is not None and pool != signal.pool and signal.pool.contains(pool):
                    rec = _launched(rec, other.last_launch, other.launch_source, "")
            newer = rec.last_ice is None or signal.at >= rec.last_ice
            records[signal.pool] = replace(
                rec,
                last_ice=signal.at if newer else rec.last_ice,
                ice_reason=signal.reason if newer else rec.ice_reason,
                ice_count=rec.ice_count + 1,
                asgs=rec.asgs | {signal.asg} if signal.asg else rec.asgs,
            )
        elif signal.kind == SignalKind.LAUNCHED and signal.capacity_type == CapacityType.SPOT:
            records.setdefault(signal.pool, PoolRecord())
            for pool, rec in records.items():
                if pool.contains(signal.pool):
                    records[pool] = _launched(rec, signal.at, signal.source, signal.asg)
        else:
            return self
        return PoolBook(records)

    def record_all(self, signals: Iterable[CapacitySignal]) -> PoolBook:
        book = self
        for signal in signals:
            book = book.record(signal)
        return book

    def pools(self) -> list[Pool]:
        """Every pool a signal has named, sorted."""
        return sorted(self._records)

    def get(self, pool: Pool) -> PoolRecord | None:
        return self._records.get(pool)

    def spot_available(self, pool: Pool, now: datetime, cooldown: timedelta) -> PoolVerdict:
        """Is Spot back in this pool? The worst verdict of the pool and every recorded pool containing it
        (an ICE on '*/us-east-1a' holds m5.large/us-east-1a back too)."""
        worst: PoolVerdict | None = None
        for recorded, rec in self._records.items():
            if recorded.contains(pool):
                verdict = rec.verdict(recorded, now, cooldown)
                if worst is None or _SEVERITY[verdict.state] < _SEVERITY[worst.state]:
                    worst = verdict
        return worst or PoolVerdict(True, "no ICE seen", AVAILABLE)

    def spot_launch_seen(self, pool: Pool) -> bool:
        """Whether a Spot launch was recorded for this pool or a recorded pool containing it."""
        return any(rec.last_launch is not None for p, rec in self._records.items() if p.contains(pool))

    def state(self, pool: Pool, now: datetime, cooldown: timedelta) -> str:
        """'available' | 'recovering' | 'unavailable', as spot_available decides."""
        return self.spot_available(pool, now, cooldown).state

    # --- the active probe ------------------------------------------------------------------------

    def probe_due(self, pool: Pool, now: datetime, quiet_period: timedelta, cap: timedelta = PROBE_BACKOFF_CAP) -> bool:
        """True when this recorded pool is unavailable and has been quiet (no ICE, launch or probe) for
        quiet_period, doubled for every probe that failed since the last ICE, at most cap. A short pool is
        probed the same way (with a surge, the probe disrupts nothing)."""
        rec = self._records.get(pool)
        if rec is None or (rec.launched_since_ice and rec.short_since is None):
            return False
        last = rec.last_signal()
        assert last is not None
        wait = min(quiet_period * (2 ** min(rec.probe_failures, 32)), max(cap, quiet_period))
        return now - last >= wait

    def pools_to_probe(self, now: datetime, quiet_period: timedelta) -> list[Pool]:
        return [pool for pool in self.pools() if self.probe_due(pool, now, quiet_period)]

    def record_probe_result(self, pool: Pool, now: datetime, landed_on_spot: bool) -> PoolBook:
        """A probe ended: pods on Spot counts as a Spot launch in the pool at now (source "probe");
        pods on on-demand again doubles the wait before the next probe."""
        records = dict(self._records)
        rec = records.get(pool, PoolRecord())
        if landed_on_spot:
            rec = replace(_launched(rec, now, "probe", ""), short_since=None, short_reason="")
        else:
            rec = replace(rec, probe_failures=rec.probe_failures + 1)
        records[pool] = replace(rec, last_probe=now)
        return PoolBook(records)

    def record_short(self, pool: Pool, now: datetime, reason: str) -> PoolBook:
        """A drain's replacements landed on on-demand: the pool is short (unavailable) until a surge succeeds.
        An earlier short mark keeps its time (the probe back-off counts from it)."""
        records = dict(self._records)
        rec = records.get(pool, PoolRecord())
        # Short again after a ready surge (the surge warmed Spot, yet the pods went to on-demand): as a failed
        # probe, the next try waits twice as long, so such a pool is not drained every quiet period for ever.
        failures = rec.probe_failures + 1 if rec.launch_source == "surge" else rec.probe_failures
        records[pool] = replace(
            rec, short_since=rec.short_since or now, short_reason=reason, probe_failures=failures, last_probe=now
        )
        return PoolBook(records)

    def record_surge(self, pool: Pool, now: datetime, ready: bool, reason: str = "") -> PoolBook:
        """A surge ended. Ready: Spot ran the placeholders, a Spot launch in the pool at now (source "surge")
        that ends a short mark. Failed: the pool is short, and the next try waits as after a failed probe."""
        records = dict(self._records)
        rec = records.get(pool, PoolRecord())
        if ready:  # the back-off stays: only replacements that land on Spot show the pool is back
            rec = replace(
                _launched(rec, now, "surge", ""), short_since=None, short_reason="", probe_failures=rec.probe_failures
            )
        else:
            rec = replace(
                rec,
                short_since=rec.short_since or now,
                short_reason=f"surge failed: {reason}" if reason else "surge failed",
                probe_failures=rec.probe_failures + 1,
            )
        records[pool] = replace(rec, last_probe=now)
        return PoolBook(records)


def _launched(rec: PoolRecord, at: datetime, source: str, asg: str) -> PoolRecord:
    if rec.last_launch is not None and at <= rec.last_launch:
        return rec
    # A launch after the last ICE ends the probing: the next ICE starts the back-off afresh. Not while the
    # pool is short: the launch may be our own surge's, which says nothing about where pods will land.
    fresh = (rec.last_ice is None or at > rec.last_ice) and rec.short_since is None
    failures = 0 if fresh else rec.probe_failures
    return replace(
        rec,
        last_launch=at,
        launch_source=source,
        probe_failures=failures,
        asgs=rec.asgs | {asg} if asg else rec.asgs,
    )


def spot_group_for(pool: Pool, groups: Iterable[AsgInfo]) -> AsgInfo | None:
    """A discovered Spot ASG that could launch a replacement in this pool: its zones hold the pool's zone
    and its instance types the pool's type (a group that names no types, or a "*" in the pool, counts)."""
    for group in sorted(groups, key=lambda g: g.name):
        if not group.spot:
            continue
        zone_ok = pool.zone == ANY or not group.zones or pool.zone in group.zones
        type_ok = pool.instance_type == ANY or not group.instance_types or pool.instance_type in group.instance_types
        if zone_ok and type_ok:
            return group
    return None


@dataclass(frozen=True)
class UnreadGroup:
    """A tagged ASG never described (its launch template or configuration could not be read): it may be
    Spot, and its ICE (its scaling activities) is not read. zones: its AvailabilityZones (empty: any);
    instance_types: those its MixedInstancesPolicy overrides name, None when unknown (any); why: what failed,
    as the verdict says it ("its launch template could not be read")."""

    name: str
    zones: tuple[str, ...]
    instance_types: tuple[str, ...] | None
    why: str

    def may_cover(self, pool: Pool) -> bool:
        zone_ok = pool.zone == ANY or not self.zones or pool.zone in self.zones
        types = self.instance_types
        type_ok = pool.instance_type == ANY or types is None or not types or pool.instance_type in types
        return zone_ok and type_ok


def spot_where_known(
    book: PoolBook,
    pool: Pool,
    now: datetime,
    cooldown: timedelta,
    groups: Iterable[AsgInfo],
    unread: Iterable[UnreadGroup] = (),
) -> PoolVerdict:
    """`book.spot_available`, except that "no ICE seen" counts as Spot available only where Spot could
    replace the node: a Spot launch was seen in (a pool containing) the pool, or a discovered Spot ASG
    covers it. Elsewhere nobody would look for Spot, so nothing says it is there: not available.

    unread: the groups never described; in a pool one of them may cover, its ICE would go unseen, so the
    verdict is unknown (not available) until it is described, whatever else the book or the groups say."""
    verdict = book.spot_available(pool, now, cooldown)
    if not verdict.available:
        return verdict
    for gap in sorted(unread, key=lambda g: g.name):
        if gap.may_cover(pool):
            return PoolVerdict(False, f"ASG {gap.name} unread ({gap.why}): Spot capacity unknown in {pool}", UNKNOWN)
    if book.spot_launch_seen(pool):
        return verdict
    group = spot_group_for(pool, groups)
    if group is not None:
        return PoolVerdict(True, f"{verdict.reason}; Spot ASG {group.name} covers {pool}", verdict.state)
    return PoolVerdict(False, f"no Spot group known for {pool} (no Spot ASG covers it, no Spot launch seen)", UNKNOWN)


def capacity_source_gap(queue_read: bool | None, spot_asgs: Iterable[str]) -> str | None:
    """Why no pool can be read as Spot available, or None when a capacity source feeds the book.

    queue_read: None without a queue (--sqs-queue-url), else whether its backlog was read; spot_asgs: the
    Spot ASGs discovered by the tag filter, whose scaling activities are read. Without either, nothing can
    tell an ICE: "no ICE seen" would mean nobody looked, so no pool is available and nothing is drained."""
    if queue_read or any(True for _ in spot_asgs):
        return None
    if queue_read is None:
        return "no capacity source: no queue (--sqs-queue-url) and no Spot ASG matches --asg-tag"
    return "no capacity source yet: the queue's backlog is not read and no Spot ASG matches --asg-tag"


# --- the book's persistence (a new leader reads what the previous one learnt) -----------------------------

BOOK_FORMAT = 1
_TIMES = ("last_ice", "last_launch", "last_probe", "short_since")


def book_to_json(book: PoolBook) -> str:
    """The book as compact JSON: {"format": 1, "pools": {"m5.large/us-east-1a": {...}}} (times RFC 3339)."""
    pools: dict[str, dict[str, object]] = {}
    for pool in book.pools():
        rec = book.get(pool)
        assert rec is not None
        entry: dict[str, object] = {}
        for name in _TIMES:
            value = getattr(rec, name)
            if value is not None:
                entry[name] = format_time(value)
        for name, value in (
            ("ice_reason", rec.ice_reason),
            ("ice_count", rec.ice_count),
            ("launch_source", rec.launch_source),
            ("probe_failures", rec.probe_failures),
            ("short_reason", rec.short_reason),
        ):
            if value:
                entry[name] = value
        if rec.asgs:
            entry["asgs"] = sorted(rec.asgs)
        pools[str(pool)] = entry
    return json.dumps({"format": BOOK_FORMAT, "pools": pools}, sort_keys=True, separators=(",", ":"))


def book_from_json(text: str) -> PoolBook:
    """The book book_to_json wrote; ValueError when the text is not one (the caller decides what then)."""
    data = json.loads(text)
    if not isinstance(data, dict) or data.get("format") != BOOK_FORMAT or not isinstance(data.get("pools"), dict):
        raise ValueError("not a pool book of format 1")
    records: dict[Pool, PoolRecord] = {}
    for key, entry in data["pools"].items():
        if not isinstance(entry, dict):
            raise ValueError(f"pool {key!r}: not an object")
        try:
            times = {name: parse_iso_time(str(entry[name])) if entry.get(name) else None for name in _TIMES}
            records[Pool.parse(key)] = PoolRecord(
                ice_reason=str(entry.get("ice_reason", "")),
                ice_count=int(entry.get("ice_count", 0)),
                launch_source=str(entry.get("launch_source", "")),
                asgs=frozenset(str(a) for a in entry.get("asgs", [])),
                probe_failures=int(entry.get("probe_failures", 0)),
                short_reason=str(entry.get("short_reason", "")),
                **times,
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"pool {key!r}: {exc}") from None
    return PoolBook(records)
