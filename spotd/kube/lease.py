"""Leader election on a coordination.k8s.io/v1 Lease, the way client-go does it.

Acquire when the lease is free (no holder) or expired; renew every renew_period with an update
conditional on the resourceVersion read (409 Conflict means another candidate won). A leader that cannot
renew before renew_deadline, or that finds another holder, steps down at once: `is_leader` is cleared
before anything else happens. On shutdown the leader clears holderIdentity so a standby takes over at once.

The raw JSON API is used (through the lightkube client's connection): one small object, no model needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
from lightkube import AsyncClient

from spotd.common import log as spotd_log
from spotd.kube.client import http_of

_log = spotd_log.get("spotd.lease")


def micro_time(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class LeaseConfig:
    name: str
    namespace: str
    identity: str
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    renew_period: float = 5.0
    retry_period: float = 2.0

    def __post_init__(self) -> None:
        if not self.identity:
            raise ValueError("lease identity is empty (set POD_NAME or --lease-identity)")
        if not self.renew_period < self.renew_deadline <= self.lease_duration:
            raise ValueError("lease timings must satisfy renew period < renew deadline <= lease duration")


class LeaderElector:
    """Run `run()` as a task; read `is_leader` / await `wait_leading()` and `wait_not_leading()`."""

    def __init__(
        self,
        client: AsyncClient,
        config: LeaseConfig,
        *,
        on_change: Callable[[bool], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._http = http_of(client)
        self.config = config
        self._on_change = on_change
        self._clock, self._wall = clock, wall
        self.is_leader = asyncio.Event()
        self._not_leader = asyncio.Event()
        self._not_leader.set()
        self._last_renew = 0.0
        # What we saw of another holder's record, and when (our clock): expiry is measured from there,
        # as client-go does, so a skewed clock on the holder cannot make us take over early.
        self._observed: tuple[str, str] | None = None
        self._observed_at = 0.0
        self._announced_holder = ""  # the other holder last logged: a standby says once whom it waits for
        self.healthy = True

    @property
    def _path(self) -> str:
        c = self.config
        return f"/apis/coordination.k8s.io/v1/namespaces/{c.namespace}/leases/{c.name}"

    async def wait_leading(self) -> None:
        await self.is_leader.wait()

    async def wait_not_leading(self) -> None:
        await self._not_leader.wait()

    def _set_leader(self, leading: bool, reason: str) -> None:
        if leading == self.is_leader.is_set():
            return
        if leading:
            self._not_leader.clear()
            self.is_leader.set()
            _log.info("lease_acquired", lease=self.config.name, identity=self.config.identity, reason=reason)
        else:
            self.is_leader.clear()
            self._not_leader.set()
            _log.warning("lease_lost", lease=self.config.name, identity=self.config.identity, reason=reason)
        if self._on_change is not None:
            self._on_change(leading)

    async def run(self) -> None:
        """Try to acquire, then renew, until cancelled; on cancellation release the lease if held."""
        try:
            while True:
                try:
                    async with asyncio.timeout(self._round_timeout()):
                        await self.try_acquire_or_renew()
                    self.healthy = True
                except (httpx.HTTPError, TimeoutError, ValueError, KeyError, TypeError) as exc:
                    self.healthy = False
                    _log.warning("lease_error", lease=self.config.name, error=repr(exc))
                if self.is_leader.is_set() and self._clock() - self._last_renew > self.config.renew_deadline:
                    self._set_leader(False, "renew deadline passed")
                delay = self.config.renew_period if self.is_leader.is_set() else self.config.retry_period
                if self.is_leader.is_set():
                    # Never sleep past the renew deadline: a failing renew must be noticed in time.
                    left = self.config.renew_deadline - (self._clock() - self._last_renew)
                    delay = max(0.05, min(delay, left))
                await asyncio.sleep(delay)
        finally:
            was_leader = self.is_leader.is_set()
            self._set_leader(False, "shutting down")
            if was_leader:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(2.0):
                        await self.release()

    def _round_timeout(self) -> float:
        """A hung request must not keep a leader acting past its renew deadline."""
        if self.is_leader.is_set():
            return max(0.1, self.config.renew_deadline - (self._clock() - self._last_renew))
        return max(1.0, 2 * self.config.retry_period)

    def _spec(self, previous: dict[str, Any] | None, now: datetime) -> dict[str, Any]:
        c = self.config
        spec = dict(previous or {})
        held_by_us = spec.get("holderIdentity") == c.identity
        spec["holderIdentity"] = c.identity
        spec["leaseDurationSeconds"] = max(1, round(c.lease_duration))
        spec["renewTime"] = micro_time(now)
        if not held_by_us:
            spec["acquireTime"] = micro_time(now)
            spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + (1 if previous else 0)
        return spec

    async def try_acquire_or_renew(self) -> bool:
        """One round: True when we hold the lease afterwards."""
        c = self.config
        now = self._wall()
        resp = await self._http.get(self._path)
        if resp.status_code == 404:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": c.name, "namespace": c.namespace},
                "spec": self._spec(None, now),
            }
            created = await self._http.post(self._path.rsplit("/", 1)[0], json=body)
            if created.status_code in (200, 201):
                self._renewed("created the lease")
                return True
            if created.status_code != 409:
                created.raise_for_status()
            return False
        resp.raise_for_status()
        lease = resp.json()
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        if holder and holder != c.identity and not self._expired(spec):
            self._set_leader(False, f"held by {holder}")
            self._announce_holder(holder, spec)
            return False
        lease["spec"] = self._spec(spec, now)
        updated = await self._http.put(self._path, json=lease)
        if updated.status_code == 409:
            # Someone else wrote in between: if it was a takeover, we are no longer the leader.
            self._set_leader(False, "conflict on update")
            return False
        updated.raise_for_status()
        self._renewed("renewed" if holder == c.identity else f"took over from {holder or 'nobody'}")
        return True

    def _announce_holder(self, holder: str, spec: dict[str, Any]) -> None:
        """A standby is quiet by design; one line per new holder tells waiting for expiry from a stuck loop."""
        if holder == self._announced_holder:
            return
        self._announced_holder = holder
        _log.info(
            "lease_held",
            lease=self.config.name,
            holder=holder,
            takeover_after_unrenewed_s=float(spec.get("leaseDurationSeconds") or self.config.lease_duration),
        )

    def _renewed(self, reason: str) -> None:
        self._last_renew = self._clock()
        self._observed = None
        self._announced_holder = ""
        self._set_leader(True, reason)

    def _expired(self, spec: dict[str, Any]) -> bool:
        """Another holder's lease is expired when its record has not changed for its duration, on our own
        monotonic clock (as client-go does): comparing its renewTime with our wall clock would let a standby
        whose clock runs ahead take over from a healthy leader. A released lease has no holder at all."""
        record = (str(spec.get("holderIdentity")), str(spec.get("renewTime")))
        duration = float(spec.get("leaseDurationSeconds") or self.config.lease_duration)
        now = self._clock()
        if record != self._observed:
            self._observed, self._observed_at = record, now
        return now - self._observed_at >= duration

    async def release(self) -> None:
        """Clear holderIdentity so a standby does not wait for expiry."""
        resp = await self._http.get(self._path)
        resp.raise_for_status()
        lease = resp.json()
        spec = lease.get("spec") or {}
        if spec.get("holderIdentity") != self.config.identity:
            return
        spec["holderIdentity"] = None
        spec["leaseDurationSeconds"] = 1
        spec["renewTime"] = micro_time(self._wall())
        lease["spec"] = spec
        resp = await self._http.put(self._path, json=lease)
        if resp.status_code < 300:
            _log.info("lease_released", lease=self.config.name, identity=self.config.identity)
