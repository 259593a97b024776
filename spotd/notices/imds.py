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
  Reads the four notice paths concurrently and returns every notice present now. A path that could not be
  read is in ``failed_paths``; a path whose body could not be parsed is in ``malformed_paths`` (logged and
  counted once per distinct body). Either makes the cycle incomplete (``complete`` False): a malformed
  maintenance list says nothing about which events are still due, so it must not cancel one. Use
  ``PollResult.covers(kind)`` to know whether the absence of a kind in this cycle means it is gone.
  ``spotd_imds_last_success_timestamp_seconds`` is set when every path *answered* (malformed included:
  IMDS is reachable, the payload is the problem, and it is counted separately).
  Bodies are cached per path: an unchanged body is not parsed (nor logged) again, so a notice keeps the
  ``seen_at`` of its first sighting, and an ASG termination keeps the deadline computed then (the ASG
  gives no time of its own). When a body changes, notices that keep their key keep their first ``seen_at``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import aiohttp
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential, wait_random

from spotd.common import log as spotd_log
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
    """IMDS did not answer a request usefully after the allowed tries; ``path`` and ``reason`` say why."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class _Transient(Exception):
    """An attempt failed in a way another attempt may fix (timeout, connection, 5xx, 429)."""


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

    The session must not route through a proxy (``trust_env`` off, the aiohttp default): IMDS is link-local
    and refuses token requests that carry ``X-Forwarded-For``.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
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
        self._session = session
        self._endpoint = endpoint.rstrip("/")
        self._token_ttl = token_ttl
        self._v1_fallback = v1_fallback
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._attempts = max(1, retry_attempts)
        self._backoff = retry_backoff
        self._clock = clock
        self._token: str | None = None
        self._token_refresh_at = 0.0
        self._v1 = False
        self._token_fetch: asyncio.Future[str | None] | None = None

    @property
    def using_v1(self) -> bool:
        """True while requests go without a token (only after a refused PUT with ``v1_fallback``)."""
        return self._v1

    async def get(self, path: str) -> str | None:
        """The body of ``/latest/meta-data/<path>`` on 200, None on 404; raises ImdsUnavailable."""
        path = path.strip("/")
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._attempts),
            wait=wait_exponential(multiplier=self._backoff, max=self._backoff * 8) + wait_random(0, self._backoff),
            retry=retry_if_exception_type(_Transient),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._get_once(path)
        except _Transient as exc:
            raise ImdsUnavailable(path, str(exc)) from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def instance_info(self) -> InstanceInfo:
        """Instance id, type, zone, region and lifecycle; never raises (unknown fields are "")."""
        keys = (
            "instance-id",
            "instance-type",
            "placement/availability-zone",
            "placement/region",
            "instance-life-cycle",
        )
        values = await asyncio.gather(*(self._get_or_empty(k) for k in keys))
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
            raise _Transient(f"token status {status}")
        raise ImdsUnavailable("api/token", f"token refused with status {status}")

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
            async with self._session.request(
                method, self._endpoint + url_path, headers=headers, timeout=self._timeout, raise_for_status=False
            ) as resp:
                text = await resp.text(errors="replace")
                status, ttl_header = resp.status, resp.headers.get(TTL_HEADER)
        except TimeoutError:
            IMDS_REQUESTS.labels(path=label, outcome="timeout").inc()
            raise _Transient("timeout") from None
        except (aiohttp.ClientError, OSError) as exc:
            IMDS_REQUESTS.labels(path=label, outcome="error").inc()
            raise _Transient(type(exc).__name__) from None
        IMDS_REQUESTS.labels(path=label, outcome=_OUTCOMES.get(status, "error")).inc()
        return status, text, ttl_header


# The notice paths and the kind each carries. Adding a source here is adding a line and a parser.
NOTICE_PATHS: dict[str, NoticeKind] = {
    "spot/instance-action": NoticeKind.SPOT_ITN,
    "events/recommendations/rebalance": NoticeKind.REBALANCE,
    "events/maintenance/scheduled": NoticeKind.SCHEDULED_MAINTENANCE,
    "autoscaling/target-lifecycle-state": NoticeKind.ASG_TERMINATION,
}


@dataclass(frozen=True)
class PollResult:
    """Every notice present in IMDS this cycle.

    complete: every path was read and parsed. When False, a notice missing from ``notices`` may still be
    present: check ``covers(kind)`` before concluding that one has gone.
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
        self._failing: set[str] = set()  # paths whose failure was already logged

    async def poll_once(self, now: datetime) -> PollResult:
        """Read every notice path concurrently; ``now`` stamps newly seen notices."""
        paths = tuple(NOTICE_PATHS)
        answers = await asyncio.gather(*(self._client.get(p) for p in paths), return_exceptions=True)
        notices: list[Notice] = []
        failed: list[str] = []
        malformed: list[str] = []
        for path, answer in zip(paths, answers, strict=True):
            if isinstance(answer, BaseException):
                if not isinstance(answer, Exception):
                    raise answer  # cancellation is how we stop
                failed.append(path)
                self._note_failure(path, answer)
                continue
            if path in self._failing:
                self._failing.discard(path)
                self._log.info("imds_path_recovered", path=path)
            parsed = self._parse(path, answer, now)
            if parsed.malformed:
                malformed.append(path)
            notices.extend(parsed.notices)
        if not failed:
            IMDS_LAST_SUCCESS.set(time.time())
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
    """Notices already seen keep their first seen_at; an ASG termination keeps its first deadline too."""
    by_key = {_identity(n): n for n in previous}
    out = []
    for notice in fresh:
        old = by_key.get(_identity(notice))
        if old is None:
            out.append(notice)
        elif notice.kind is NoticeKind.ASG_TERMINATION:
            out.append(old)
        else:
            out.append(replace(notice, seen_at=old.seen_at))
    return tuple(out)


def _identity(notice: Notice) -> str:
    # An ASG termination's key holds a deadline computed at parse time; there is only ever one.
    return str(notice.kind) if notice.kind is NoticeKind.ASG_TERMINATION else notice.key
