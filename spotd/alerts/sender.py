"""The Alerter: keeps the alerts spotd has raised and pushes them to every Alertmanager, off the critical path.

fire() and resolve() only touch memory: they update the set of active alerts and put the alert in one
bounded queue per Alertmanager, then return. run() is the delivery task: one worker per Alertmanager
(so a dead or slow member never delays the others) POSTs batches to /api/v2/alerts, retries with back-off,
and every resend interval the active alerts (and, for a while, the resolved ones) are queued again, as
Prometheus does. A firing alert is sent with endsAt = now + 4 resend intervals, so alerts of a spotd that
died resolve by themselves whatever Alertmanager's resolve_timeout.
"""

from __future__ import annotations

import asyncio
import base64
import os
import random
import ssl
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import httpx

from spotd.alerts.flags import AlertConfig
from spotd.alerts.metrics import ALERT_QUEUE_DEPTH, ALERTS_DROPPED, ALERTS_SENT
from spotd.alerts.model import Alert, Identity
from spotd.common import log as spotd_log
from spotd.common.transport import H11Transport

_API_PATH = "/api/v2/alerts"
_VALIDITY_INTERVALS = 4


def _basic_auth(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


class _Member:
    """One Alertmanager: where to POST, its credentials, its own queue and its own health."""

    def __init__(self, raw_url: str) -> None:
        url = urlsplit(raw_url)
        # The header is built once here; the URL that is used and logged carries no user info.
        user, password = unquote(url.username or ""), unquote(url.password or "")
        self.authorization = _basic_auth(user, password) if user else None
        netloc = url.netloc.rpartition("@")[2]
        path = url.path.rstrip("/")
        self.endpoint = urlunsplit((url.scheme, netloc, path if path.endswith(_API_PATH) else path + _API_PATH, "", ""))
        self.name = urlunsplit((url.scheme, netloc, url.path, "", ""))  # the only form ever logged: no user info
        self.pending: OrderedDict[Identity, Alert] = OrderedDict()
        self.wakeup = asyncio.Event()
        self.failing = False
        self.dropping = False


class _TokenFile:
    """A bearer token file, re-read whenever it changes (projected service-account tokens rotate)."""

    def __init__(self, path: str, log: Any) -> None:
        self._path, self._log = path, log
        self._stamp: tuple[int, int, int] | None = None
        self._token = ""

    def read(self) -> str:
        try:
            st = os.stat(self._path)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            if stamp != self._stamp:
                with open(self._path, encoding="utf-8") as f:
                    self._token = f.read().strip()
                self._stamp = stamp
        except OSError as exc:
            # Keep the last token: a rotation in progress should not stop delivery.
            self._log.warning("alert_token_unreadable", path=self._path, error=str(exc))
        return self._token


class Alerter:
    """Pushes alerts to Alertmanager. Call fire()/resolve() from the event loop's thread; run() delivers.

    With no URLs configured it keeps track of alerts and sends nothing.
    """

    def __init__(
        self,
        config: AlertConfig,
        log: Any = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self._config = config
        self._log = log if log is not None else spotd_log.get("spotd.alerts")
        self._clock = clock or (lambda: datetime.now(UTC))
        self._extra_labels = config.labels()
        self._members = [_Member(url) for url in config.urls]
        self._token = _TokenFile(config.bearer_token_file, self._log) if config.bearer_token_file else None
        self._ca_file = config.ca_file
        self._timeout = config.timeout
        self._active: dict[Identity, Alert] = {}
        self._resolved: dict[Identity, Alert] = {}
        self.dropped = 0

    # -- the calls the rest of spotd makes: memory only, never raise ------------------------------------

    def fire(self, alert: Alert) -> None:
        """Raise (or refresh) an alert. Returns at once; never raises, never waits for the network."""
        try:
            self._fire(alert)
        except Exception as exc:  # alerting must never break a drain
            self._log.error("alert_fire_failed", error=repr(exc))

    def resolve(self, alertname: str, labels: Mapping[str, str]) -> None:
        """Resolve every active alert named alertname whose labels include all of labels ("" = absent).

        Unknown alerts are ignored. Returns at once; never raises.
        """
        try:
            self._resolve(alertname, labels)
        except Exception as exc:
            self._log.error("alert_resolve_failed", alertname=alertname, error=repr(exc))

    def active(self) -> list[Alert]:
        return list(self._active.values())

    @property
    def pending(self) -> int:
        """Alerts waiting to be sent, summed over every Alertmanager."""
        return sum(len(m.pending) for m in self._members)

    def _fire(self, alert: Alert) -> None:
        now = self._clock()
        key = alert.identity
        if alert.ended(now):
            self._active.pop(key, None)
            self._resolved[key] = alert
            self._enqueue([alert])
            return
        previous = self._active.get(key)
        if previous is not None:
            # Same alert again: keep its first start; queue it only when something changed.
            alert = replace(alert, starts_at=min(previous.starts_at, alert.starts_at))
            if alert == previous:
                return
        else:
            self._log.info("alert_fired", alertname=alert.alertname, labels=dict(alert.labels))
        self._resolved.pop(key, None)
        self._active[key] = alert
        self._enqueue([alert])

    def _resolve(self, alertname: str, labels: Mapping[str, str]) -> None:
        now = self._clock()
        wanted = {k: str(v) for k, v in labels.items() if k != "alertname"}
        for key, alert in list(self._active.items()):
            if alert.alertname != alertname:
                continue
            if any(alert.labels.get(k, "") != v for k, v in wanted.items()):
                continue
            del self._active[key]
            ended = alert if alert.ended(now) else replace(alert, ends_at=now)
            self._resolved[key] = ended
            self._log.info("alert_resolved", alertname=alertname, labels=dict(alert.labels))
            self._enqueue([ended])

    def _enqueue(self, alerts: Iterable[Alert]) -> None:
        for alert in alerts:
            key = alert.identity
            for member in self._members:
                member.pending[key] = alert
                member.pending.move_to_end(key)
                self._trim(member)
                member.wakeup.set()
        ALERT_QUEUE_DEPTH.set(self.pending)

    def _trim(self, member: _Member) -> None:
        dropped = 0
        while len(member.pending) > self._config.queue_size:
            member.pending.popitem(last=False)
            dropped += 1
        if dropped:
            self.dropped += dropped
            ALERTS_DROPPED.inc(dropped)
            ALERTS_SENT.labels("dropped").inc(dropped)
            if not member.dropping:
                member.dropping = True
                self._log.warning("alert_queue_full", alertmanager=member.name, queue_size=self._config.queue_size)

    def _requeue(self, member: _Member, batch: list[tuple[Identity, Alert]]) -> None:
        """Put an unsent batch back in front, unless a newer version of an alert is already waiting."""
        for key, alert in reversed(batch):
            if key not in member.pending:
                member.pending[key] = alert
                member.pending.move_to_end(key, last=False)
        self._trim(member)
        ALERT_QUEUE_DEPTH.set(self.pending)

    def _tick(self) -> None:
        """Every resend interval: end what has ended, forget old resolutions, queue everything again."""
        now = self._clock()
        for key, alert in list(self._active.items()):
            if alert.ended(now):
                del self._active[key]
                self._resolved[key] = alert
        retention = timedelta(seconds=self._config.resolved_retention)
        for key, alert in list(self._resolved.items()):
            if alert.ends_at is None or alert.ends_at + retention < now:
                del self._resolved[key]
        self._enqueue([*self._active.values(), *self._resolved.values()])

    # -- delivery -----------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Deliver until cancelled; on cancel, try once (shutdown_timeout) to send what is still queued."""
        if not self._members:
            while True:  # nothing to send to; still forget what has ended
                await asyncio.sleep(self._config.resend_interval)
                self._tick()
        # The system's CA certificates (or --alertmanager-ca-file), no proxy from the environment; the lean
        # transport, as the agent's Kubernetes client (httpx's own would load httpcore and anyio on every node).
        tls = ssl.create_default_context(cafile=self._ca_file) if self._ca_file else ssl.create_default_context()
        transport = H11Transport(tls)
        async with httpx.AsyncClient(transport=transport, trust_env=False, timeout=self._timeout) as session:
            workers = [asyncio.create_task(self._deliver(m, session), name=f"alerts:{m.name}") for m in self._members]
            try:
                while True:
                    await asyncio.sleep(self._config.resend_interval)
                    self._tick()
            except asyncio.CancelledError:
                for worker in workers:
                    worker.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
                await self._flush(session)
                raise

    async def _deliver(self, member: _Member, session: httpx.AsyncClient) -> None:
        cfg = self._config
        backoff = cfg.backoff_initial
        while True:
            await member.wakeup.wait()
            member.wakeup.clear()
            while member.pending:
                batch = [member.pending.popitem(last=False) for _ in range(min(cfg.batch_size, len(member.pending)))]
                try:
                    outcome = await self._post(member, session, [alert for _, alert in batch])
                except asyncio.CancelledError:
                    self._requeue(member, batch)
                    raise
                except Exception as exc:  # a bug here must not end delivery for good
                    self._log.error("alert_delivery_failed", alertmanager=member.name, error=repr(exc))
                    outcome = "rejected"
                ALERT_QUEUE_DEPTH.set(self.pending)
                if outcome != "error":
                    backoff = cfg.backoff_initial
                    continue
                self._requeue(member, batch)
                delay = min(backoff, cfg.backoff_max, cfg.resend_interval) * random.uniform(0.8, 1.2)
                await asyncio.sleep(delay)
                backoff *= 2

    async def _post(
        self,
        member: _Member,
        session: httpx.AsyncClient,
        alerts: list[Alert],
        timeout: float | None = None,
    ) -> str:
        """One POST of a batch; returns and counts the outcome: ok, error (retry) or rejected (don't)."""
        valid_until = self._clock() + timedelta(seconds=_VALIDITY_INTERVALS * self._config.resend_interval)
        body = [alert.to_api(self._extra_labels, valid_until) for alert in alerts]
        headers: dict[str, str] = {}
        if member.authorization:
            headers["Authorization"] = member.authorization
        elif self._token is not None and (token := self._token.read()):
            headers["Authorization"] = f"Bearer {token}"
        status, detail = 0, ""
        try:
            async with asyncio.timeout(timeout or self._timeout):  # connect to last byte, as the flag says
                resp = await session.post(member.endpoint, json=body, headers=headers)
            status = resp.status_code
            if status >= 300:
                detail = resp.text[:200]
        except (httpx.HTTPError, TimeoutError, OSError) as exc:
            detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if 200 <= status < 300:
            outcome = "ok"
        elif 400 <= status < 500 and status not in (408, 429):
            outcome = "rejected"
        else:
            outcome = "error"
        ALERTS_SENT.labels(outcome).inc(len(alerts))
        self._note(member, outcome, status, detail, len(alerts))
        return outcome

    def _note(self, member: _Member, outcome: str, status: int, detail: str, count: int) -> None:
        """Log state changes, not every retry: one line when a member starts failing, one when it is back."""
        fields = {"alertmanager": member.name, "alerts": count, "status": status or None, "error": detail}
        if outcome == "ok":
            if member.failing:
                self._log.info("alertmanager_recovered", alertmanager=member.name)
            member.failing = member.dropping = False
        elif outcome == "rejected":
            self._log.error("alertmanager_rejected_alerts", **fields)
        elif not member.failing:
            member.failing = True
            self._log.warning("alertmanager_unreachable", **fields)
        else:
            self._log.debug("alertmanager_retry", **fields)

    async def _flush(self, session: httpx.AsyncClient) -> None:
        """Once, briefly, send every member what it still has waiting: one POST each, all at once."""
        timeout = self._config.shutdown_timeout

        async def flush_one(member: _Member) -> None:
            alerts = list(member.pending.values())
            member.pending.clear()
            await self._post(member, session, alerts, timeout=timeout)

        await asyncio.gather(*(flush_one(m) for m in self._members if m.pending), return_exceptions=True)
        ALERT_QUEUE_DEPTH.set(self.pending)
