"""The IMDSv2 client and the notice poller: the only code that talks to the instance metadata service.

ImdsClient
  IMDSv2 only, unless ``v1_fallback`` is set *and* the token PUT is refused (403/404/405); the fallback is
  logged, never silent, and lasts until a GET is refused with 401 (then v2 is tried again). One token is
  shared by concurrent requests and re-used until ``min(60 s, 10 % of its TTL)`` before it expires (the
  TTL the service granted, if it says so, else the one asked for). A 401 drops the token and the request
  is made once more with a fresh one. The token value is never logged.
  Timeouts, connection errors, 5xx and 429 are retried with a short jittered back-off (``retry_attempts``
  tries in all, each bounded by ``timeout``); every HTTP attempt is counted in
  ``spotd_imds_requests{path,outcome}`` (token PUTs under path ``api/token``). When the tries are spent, or
  the answer is one no retry will change (401 twice, 400, 403), ``ImdsUnavailable`` is raised.

NoticePoller
  Reads the notice paths it is asked for (all four by default; the agent reads ``URGENT_PATHS`` often and
  the rest less often), one after another on one kept-alive connection, and returns every notice present
  at each path's latest reading. A path that could not be read is in ``failed_paths``; a path whose body
  could not be parsed is in ``malformed_paths`` (logged and counted once per distinct body). Either makes
  the result incomplete (``complete`` False): a malformed maintenance list says nothing about which events
  are still due, so it must not cancel one. Use ``PollResult.covers(kind)`` to know whether the absence of
  a kind means it is gone. Once IMDS itself does not answer (timeouts, refused connections, no token), the
  rest of that call's paths are marked failed untried: an outage costs one path's tries, not four.
  ``spotd_imds_last_success_timestamp_seconds`` is set when every path's latest reading *answered*
  (malformed included: IMDS is reachable, the payload is the problem, and it is counted separately).
  Bodies are cached per path: an unchanged body is not parsed (nor logged) again, so a notice keeps the
  ``seen_at`` of its first sighting, and an ASG termination keeps the deadline computed then (the ASG
  gives no time of its own). When a body changes, notices that keep their key keep their first ``seen_at``.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import h11

from spotd.common import log as spotd_log
from spotd.common.keepalive import KeepAliveClient
from spotd.notices.metrics import IMDS_LAST_SUCCESS, IMDS_REQUESTS, NOTICES_MALFORMED
from spotd.notices.record import (
    MalformedNotice,
    Notice,
    NoticeKind,
    parse_instance_action,
    parse_rebalance,
    parse_scheduled_events,
    parse_target_lifecycle_state,
)

TOKEN_PATH = "/latest/api/token"
META_PREFIX = "/latest/meta-data/"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
_V1_STATUSES = frozenset({403, 404, 405})  # the token PUT is refused: IMDSv1-only endpoint

_log = spotd_log.get("spotd.imds")


class ImdsUnavailable(Exception):
    """IMDS did not answer a request usefully after the allowed tries; ``path`` and ``reason`` say why.

    ``unreachable``: the service itself did not answer (timeouts, refused connections, no token), so
    other paths will not fare better this cycle.
    """

    def __init__(self, path: str, reason: str, *, unreachable: bool = False) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason
        self.unreachable = unreachable


class _Transient(Exception):
    """An attempt failed in a way another attempt may fix (timeout, connection, 5xx, 429)."""

    def __init__(self, reason: str, *, unreachable: bool = False) -> None:
        super().__init__(reason)
        self.unreachable = unreachable


_OUTCOMES = {200: "ok", 404: "not_found", 401: "unauthorized", 403: "unauthorized", 429: "throttled"}


@dataclass(frozen=True)
class InstanceInfo:
    """Who this instance is, for alert labels; every field is "" when IMDS did not say."""

    instance_id: str = ""
    instance_type: str = ""
    zone: str = ""
    region: str = ""
    lifecycle: str = ""  # instance-life-cycle: "spot" or "on-demand"


class ImdsClient:
    """Reads ``/latest/meta-data/`` paths over IMDSv2 (see the module docstring for the rules).

    Requests go one after another over one kept-alive connection (spotd.common.keepalive), never through
    a proxy: IMDS is link-local and refuses token requests that carry ``X-Forwarded-For``. ``aclose()``
    closes the connection.
    """

    def __init__(
        self,
        endpoint: str = "http://169.254.169.254",
        *,
        token_ttl: int = 21600,
        v1_fallback: bool = False,
        timeout: float = 1.0,
        retry_attempts: int = 3,
        retry_backoff: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 1 <= token_ttl <= 21600:
            raise ValueError(f"token_ttl {token_ttl} is not within 1..21600 seconds")
        self._http = KeepAliveClient(endpoint)
        self._token_ttl = token_ttl
        self._v1_fallback = v1_fallback
        self._timeout = timeout
        self._attempts = max(1, retry_attempts)
        self._backoff = retry_backoff
        self._clock = clock
        self._token: str | None = None
        self._token_refresh_at = 0.0
        self._v1 = False
        self._token_fetch: asyncio.Future[str | None] | None = None

    async def aclose(self) -> None:
        await self._http.aclose()

    @property
    def connections_opened(self) -> int:
        """TCP connections opened so far: one for the agent's whole life while IMDS keeps it alive."""
        return self._http.connections_opened

    @property
    def using_v1(self) -> bool:
        """True while requests go without a token (only after a refused PUT with ``v1_fallback``)."""
        return self._v1

    async def get(self, path: str) -> str | None:
        """The body of ``/latest/meta-data/<path>`` on 200, None on 404; raises ImdsUnavailable."""
        path = path.strip("/")
        attempt = 1
        while True:
            try:
                return await self._get_once(path)
            except _Transient as exc:
                if attempt >= self._attempts:
                    raise ImdsUnavailable(path, str(exc), unreachable=exc.unreachable) from None
            # Exponential back-off with jitter, capped at 8 x the base.
            delay = min(self._backoff * 2 ** (attempt - 1), self._backoff * 8) + random.uniform(0, self._backoff)
            await asyncio.sleep(delay)
            attempt += 1

    async def instance_info(self) -> InstanceInfo:
        """Instance id, type, zone, region and lifecycle; never raises (unknown fields are "")."""
        keys = (
            "instance-id",
            "instance-type",
            "placement/availability-zone",
            "placement/region",
            "instance-life-cycle",
        )
        values = [await self._get_or_empty(k) for k in keys]  # in turn: one connection, once per process
        instance_id, instance_type, zone, region, lifecycle = values
        if not region and zone[-1:].isalpha():
            region = zone[:-1]  # us-east-1a -> us-east-1 (placement/region is absent on old instances)
        return InstanceInfo(instance_id, instance_type, zone, region, lifecycle)

    async def _get_or_empty(self, path: str) -> str:
        try:
            return (await self.get(path) or "").strip()
        except ImdsUnavailable as exc:
            _log.warning("imds_instance_info_unavailable", path=path, error=exc.reason)
            return ""

    async def _get_once(self, path: str) -> str | None:
        """One attempt: a token if needed, the GET, and once more with a fresh token after a 401."""
        for fresh_token in (False, True):
            token = await self._ensure_token()
            headers = {TOKEN_HEADER: token} if token is not None else {}
            status, body, _ = await self._request("GET", META_PREFIX + path, path, headers)
            if status == 200:
                return body
            if status == 404:
                return None
            if status == 401:
                self._drop_token(token)
                if fresh_token:
                    raise ImdsUnavailable(path, "unauthorized")
                continue
            if status == 429 or status >= 500:
                raise _Transient(f"status {status}")
            raise ImdsUnavailable(path, f"status {status}")
        raise AssertionError("unreachable")  # pragma: no cover

    async def _ensure_token(self) -> str | None:
        """The current token, fetched if missing or about to expire; None in IMDSv1 mode.

        Concurrent callers share one PUT, so an outage costs one timeout per attempt, not one per path.
        """
        if self._v1:
            return None
        if self._token is not None and self._clock() < self._token_refresh_at:
            return self._token
        if self._token_fetch is None or self._token_fetch.done():
            self._token_fetch = asyncio.ensure_future(self._fetch_token())
            # Retrieved here so that a fetch whose callers were all cancelled is not reported as lost.
            self._token_fetch.add_done_callback(lambda t: t.cancelled() or t.exception())
        return await asyncio.shield(self._token_fetch)

    async def _fetch_token(self) -> str | None:
        asked_at = self._clock()
        status, body, ttl_header = await self._request(
            "PUT", TOKEN_PATH, "api/token", {TTL_HEADER: str(self._token_ttl)}
        )
        if status == 200 and body.strip():
            ttl = self._granted_ttl(ttl_header)
            self._token = body.strip()
            self._token_refresh_at = asked_at + ttl - min(60.0, ttl / 10)
            return self._token
        if status in _V1_STATUSES and self._v1_fallback:
            _log.warning("imds_v1_fallback", status=status)
            self._v1 = True
            return None
        if status == 429 or status >= 500:
            raise _Transient(f"token status {status}", unreachable=True)
        raise ImdsUnavailable("api/token", f"token refused with status {status}", unreachable=True)

    def _granted_ttl(self, ttl_header: str | None) -> float:
        """The TTL IMDS says it granted (never more than asked), else the one asked for."""
        try:
            granted = int(ttl_header) if ttl_header else self._token_ttl
        except ValueError:
            granted = self._token_ttl
        return float(max(1, min(granted, self._token_ttl)))

    def _drop_token(self, token: str | None) -> None:
        """Forget ``token`` after a 401, unless a concurrent request already replaced it."""
        if token is None:
            self._v1 = False  # IMDSv1 refused now: try v2 again
        elif token == self._token:
            self._token = None

    async def _request(
        self, method: str, url_path: str, label: str, headers: dict[str, str]
    ) -> tuple[int, str, str | None]:
        """One HTTP exchange, counted: (status, body, TTL header); transport failures become _Transient."""
        try:
            resp = await self._http.request(method, url_path, headers, timeout=self._timeout)
        except TimeoutError:
            _count(label, "timeout")
            raise _Transient("timeout", unreachable=True) from None
        except (h11.ProtocolError, OSError) as exc:
            _count(label, "error")
            raise _Transient(type(exc).__name__, unreachable=True) from None
        _count(label, _OUTCOMES.get(resp.status, "error"))
        return resp.status, resp.text(), resp.headers.get(TTL_HEADER.lower())


_counters: dict[tuple[str, str], Any] = {}


def _count(path: str, outcome: str) -> None:
    """spotd_imds_requests_total{path,outcome} += 1; the labelled child is looked up once (polled 4x a second)."""
    child = _counters.get((path, outcome))
    if child is None:
        child = _counters[path, outcome] = IMDS_REQUESTS.labels(path=path, outcome=outcome)
    child.inc()


# The notice paths and the kind each carries. Adding a source here is adding a line and a parser.
NOTICE_PATHS: dict[str, NoticeKind] = {
    "spot/instance-action": NoticeKind.SPOT_ITN,
    "events/recommendations/rebalance": NoticeKind.REBALANCE,
    "events/maintenance/scheduled": NoticeKind.SCHEDULED_MAINTENANCE,
    "autoscaling/target-lifecycle-state": NoticeKind.ASG_TERMINATION,
}
# Read on the short poll interval: a Spot interruption gives two minutes. The others are announced days
# ahead (maintenance), advisory (rebalance) or held by a lifecycle hook (ASG): the slow interval will do.
URGENT_PATHS: tuple[str, ...] = ("spot/instance-action",)


@dataclass(frozen=True)
class PollResult:
    """Every notice present in IMDS this cycle.

    complete: every path was read and parsed (at its latest reading). When False, a notice missing from
    ``notices`` may still be present: check ``covers(kind)`` before concluding that one has gone.
    """

    notices: tuple[Notice, ...]
    complete: bool
    failed_paths: tuple[str, ...] = ()
    malformed_paths: tuple[str, ...] = ()

    def covers(self, kind: NoticeKind) -> bool:
        """True when the path carrying ``kind`` was read and parsed, so its notices here are all there are."""
        unread = (*self.failed_paths, *self.malformed_paths)
        return not any(NOTICE_PATHS.get(path) is kind for path in unread)


@dataclass(frozen=True)
class _Parsed:
    body: str
    notices: tuple[Notice, ...]
    malformed: bool = False


_ABSENT = _Parsed("", ())


class NoticePoller:
    """Polls the notice paths through an ImdsClient; ``poll_once`` never raises on IMDS trouble."""

    def __init__(
        self,
        client: ImdsClient,
        *,
        asg_termination_window: timedelta = timedelta(seconds=120),
        log: Any = None,
    ) -> None:
        self._client = client
        self._window = asg_termination_window
        self._log = log if log is not None else _log
        self._cache: dict[str, _Parsed] = {}  # last body per path, and what it parsed to
        self._last_good: dict[str, tuple[Notice, ...]] = {}  # for seen_at across a changed body
        self._absent_at: dict[str, datetime] = {}  # the `now` of each path's latest empty reading
        self._failing: set[str] = set()  # paths whose failure was already logged
        self._latest: dict[str, _Parsed | None] = {}  # each path's latest reading; None: it failed
        self._last_result: PollResult | None = None  # returned again while no reading changed

    async def poll_once(self, now: datetime, paths: Sequence[str] | None = None) -> PollResult:
        """Read ``paths`` (default: every notice path) one after another on one connection; ``now`` stamps
        newly seen notices. The result holds every path at its latest reading: a path not read this time
        counts as it was last read, and one never read yet as failed. While no reading changes, the same
        PollResult object is returned (callers may compare with ``is``).

        Once IMDS itself does not answer (timeouts, refused connections, no token) the remaining paths of
        this call are marked failed without a try: an outage costs one path's tries, not one per path.
        """
        outage: ImdsUnavailable | None = None
        answered = True
        for path in NOTICE_PATHS if paths is None else paths:
            if outage is not None:
                self._latest[path] = self._last_result = None
                self._note_failure(path, outage)
                continue
            try:
                answer = await self._client.get(path)
            except Exception as exc:  # cancellation (BaseException) is how we stop: not caught
                self._latest[path] = self._last_result = None
                self._note_failure(path, exc)
                answered = False
                if isinstance(exc, ImdsUnavailable) and exc.unreachable:
                    outage = exc
                continue
            if path in self._failing:
                self._failing.discard(path)
                self._log.info("imds_path_recovered", path=path)
            parsed = self._parse(path, answer, now)
            if self._latest.get(path) is not parsed:
                self._latest[path] = parsed
                self._last_result = None
        if answered and all(self._latest.get(p) is not None for p in NOTICE_PATHS):
            IMDS_LAST_SUCCESS.set(time.time())
        if self._last_result is None:
            self._last_result = self._result()
        return self._last_result

    def _result(self) -> PollResult:
        notices: list[Notice] = []
        failed: list[str] = []
        malformed: list[str] = []
        for path in NOTICE_PATHS:
            parsed = self._latest.get(path)
            if parsed is None:
                failed.append(path)
                continue
            if parsed.malformed:
                malformed.append(path)
            notices.extend(parsed.notices)
        return PollResult(
            notices=tuple(notices),
            complete=not failed and not malformed,
            failed_paths=tuple(failed),
            malformed_paths=tuple(malformed),
        )

    def _note_failure(self, path: str, exc: Exception) -> None:
        """Log a path's failure once, not every cycle of an outage."""
        if path in self._failing:
            return
        self._failing.add(path)
        if isinstance(exc, ImdsUnavailable):
            self._log.warning("imds_path_unavailable", path=path, error=exc.reason)
        else:
            self._log.error("imds_poll_error", path=path, error=f"{type(exc).__name__}: {exc}")

    def _parse(self, path: str, body: str | None, now: datetime) -> _Parsed:
        if body is None:  # 404: nothing there
            self._cache.pop(path, None)
            self._last_good.pop(path, None)
            self._absent_at[path] = now
            return _ABSENT
        cached = self._cache.get(path)
        if cached is not None and cached.body == body:
            return cached
        try:
            fresh = self._parse_body(path, body, now)
        except Exception as exc:
            error = str(exc) if isinstance(exc, MalformedNotice) else f"{type(exc).__name__}: {exc}"
            self._log.warning("notice_malformed", path=path, error=error)
            NOTICES_MALFORMED.labels(source="imds").inc()
            parsed = _Parsed(body, (), malformed=True)
        else:
            if self._latest.get(path) is _ABSENT:  # absent at the reading just before: issued since then
                fresh = tuple(replace(n, absent_before=self._absent_at[path]) for n in fresh)
            parsed = _Parsed(body, _keep_first_sighting(fresh, self._last_good.get(path, ())))
            self._last_good[path] = parsed.notices
        self._cache[path] = parsed
        return parsed

    def _parse_body(self, path: str, body: str, now: datetime) -> tuple[Notice, ...]:
        kind = NOTICE_PATHS[path]
        if kind is NoticeKind.SPOT_ITN:
            return (parse_instance_action(body, now),)
        if kind is NoticeKind.REBALANCE:
            return (parse_rebalance(body, now),)
        if kind is NoticeKind.SCHEDULED_MAINTENANCE:
            return tuple(parse_scheduled_events(body, now))
        notice = parse_target_lifecycle_state(body, now, self._window)
        return (notice,) if notice is not None else ()


def _keep_first_sighting(fresh: Sequence[Notice], previous: Sequence[Notice]) -> tuple[Notice, ...]:
    """Notices already seen keep their first seen_at (and absent_before); an ASG termination keeps its first
    deadline too."""
    by_key = {n.key: n for n in previous}
    out = []
    for notice in fresh:
        old = by_key.get(notice.key)
        if old is None:
            out.append(notice)
        elif notice.kind is NoticeKind.ASG_TERMINATION:
            out.append(old)
        else:
            out.append(replace(notice, seen_at=old.seen_at, absent_before=old.absent_before))
    return tuple(out)
