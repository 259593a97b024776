"""Alerts: pure builders, flags, and delivery to real Alertmanagers (prometheus-alertmanager on 127.0.0.1)."""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import re
import socket
import subprocess
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from spotd.alerts.flags import AlertConfig, add_alert_arguments, alert_config_from_args
from spotd.alerts.metrics import ALERTS_DROPPED, ALERTS_SENT
from spotd.alerts.model import (
    AlertNode,
    node_drain_incomplete_alert,
    on_demand_drain_blocked_alert,
    on_demand_fallback_alert,
    spot_capacity_unavailable_alert,
    spot_interruption_alert,
)
from spotd.alerts.sender import Alerter
from spotd.common.parsing import format_time
from spotd.notices.record import Notice, NoticeKind

try:
    from tests.alertmanager import AlertmanagerSet, eventually, free_port, require_tool
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from alertmanager import AlertmanagerSet, eventually, free_port, require_tool  # type: ignore[no-redef]

NODE = AlertNode("ip-10-0-1-2.ec2.internal", "i-0abc", "us-east-1a", "m5.large")
NOW = datetime(2026, 11, 25, 7, 0, tzinfo=UTC)


def itn(deadline: datetime, seen: datetime | None = None) -> Notice:
    return Notice(NoticeKind.SPOT_ITN, "imds", seen or deadline - timedelta(minutes=2), deadline, action="terminate")


def config(urls: list[str], **kw: Any) -> AlertConfig:
    base: dict[str, Any] = {
        "resend_interval": 0.3,
        "timeout": 2.0,
        "backoff_initial": 0.05,
        "backoff_max": 0.3,
    }
    return AlertConfig(urls=tuple(urls), **{**base, **kw})


class RecordingLog:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda event, **kw: self.events.append((level, event, kw))


@contextlib.asynccontextmanager
async def running(alerter: Alerter) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(alerter.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def bound_port(runner: web.AppRunner) -> int:
    return int(runner.addresses[0][1])


class FakeAlertmanager:
    """A tiny aiohttp server in the test's loop that records every POST and answers with self.status."""

    def __init__(self, require_auth: str | None = None) -> None:
        self.requests: list[tuple[dict[str, str], list[dict[str, Any]]]] = []
        self.status = 200
        self.require_auth = require_auth
        self.port = 0  # bound in __aenter__: a port picked before binding can be taken by another process
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> FakeAlertmanager:
        async def handle(request: web.Request) -> web.Response:
            self.requests.append((dict(request.headers), await request.json()))
            if self.require_auth and request.headers.get("Authorization") != self.require_auth:
                return web.Response(status=401)
            return web.Response(status=self.status)

        app = web.Application()
        app.router.add_post("/api/v2/alerts", handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = bound_port(self._runner)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    def url(self, userinfo: str = "") -> str:
        return f"http://{userinfo}127.0.0.1:{self.port}"

    def alerts(self) -> list[dict[str, Any]]:
        return [alert for _, batch in self.requests for alert in batch]


@contextlib.contextmanager
def black_hole() -> Any:
    """Accepts TCP connections (the kernel does) and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


# -- pure builders -------------------------------------------------------------------------------------


def test_spot_interruption_alert_labels_and_lifecycle() -> None:
    deadline = NOW + timedelta(minutes=2)
    alert = spot_interruption_alert(itn(deadline, NOW), NODE)
    assert dict(alert.labels) == {
        "alertname": "SpotInterruptionNotice",
        "severity": "warning",
        "kind": "spot-itn",
        "node": "ip-10-0-1-2.ec2.internal",
        "instance_id": "i-0abc",
        "zone": "us-east-1a",
        "instance_type": "m5.large",
    }
    assert set(alert.annotations) == {"summary", "description"}
    assert "i-0abc" in alert.annotations["summary"] and format_time(deadline) in alert.annotations["description"]
    assert alert.starts_at == NOW and alert.ends_at == deadline + timedelta(minutes=5)


def test_notice_kinds_have_their_own_alerts() -> None:
    rebalance = Notice(NoticeKind.REBALANCE, "imds", NOW, None, event_id="2026-11-25T06:59:00.000Z")
    alert = spot_interruption_alert(rebalance, NODE)
    assert alert.labels["kind"] == "rebalance" and alert.labels["severity"] == "info"
    assert alert.ends_at is None  # no deadline: active until resolved
    maintenance = Notice(
        NoticeKind.SCHEDULED_MAINTENANCE,
        "imds",
        NOW,
        NOW + timedelta(days=2),
        action="system-reboot",
        event_id="instance-event-0d59937288b749b32",
        not_after=NOW + timedelta(days=2, hours=2),
    )
    alert = spot_interruption_alert(maintenance, NODE, linger=timedelta(0))
    assert alert.labels["event_id"] == "instance-event-0d59937288b749b32"
    assert alert.ends_at == NOW + timedelta(days=2, hours=2)
    asg = Notice(NoticeKind.ASG_TERMINATION, "imds", NOW, NOW + timedelta(minutes=2), action="terminate")
    assert spot_interruption_alert(asg, NODE).labels["kind"] == "asg-termination"


def test_unknown_node_fields_are_left_out() -> None:
    alert = spot_interruption_alert(itn(NOW), AlertNode(node="n1"))
    assert set(alert.labels) == {"alertname", "severity", "kind", "node"}
    assert alert.annotations["summary"] == "Spot interruption notice for n1"


def test_drain_incomplete_is_critical_and_lists_pods() -> None:
    pods = [f"shop/web-{i}" for i in range(25)]
    alert = node_drain_incomplete_alert(NODE, pods, NOW)
    assert alert.labels["alertname"] == "NodeDrainIncomplete" and alert.labels["severity"] == "critical"
    assert alert.annotations["summary"].startswith("25 pods left on ip-10-0-1-2")
    assert "shop/web-19 and 5 more" in alert.annotations["description"]
    assert alert.starts_at == NOW and alert.ends_at == NOW + timedelta(minutes=15)
    no_deadline = node_drain_incomplete_alert(NODE, pods, None, now=NOW + timedelta(minutes=1))
    assert no_deadline.starts_at == NOW + timedelta(minutes=1)


def test_capacity_alerts() -> None:
    ice = spot_capacity_unavailable_alert("general", "us-east-1a", "m5.large", "InsufficientInstanceCapacity", NOW)
    assert dict(ice.labels) == {
        "alertname": "SpotCapacityUnavailable",
        "severity": "warning",
        "pool": "general",
        "zone": "us-east-1a",
        "instance_type": "m5.large",
    }
    assert ice.starts_at == NOW and ice.ends_at is None
    fallback = on_demand_fallback_alert("general", ["n1", "n2"], timedelta(hours=2, minutes=5), now=NOW)
    assert dict(fallback.labels) == {"alertname": "OnDemandFallbackActive", "severity": "warning", "pool": "general"}
    assert "oldest 2h05m" in fallback.annotations["description"]
    blocked = on_demand_drain_blocked_alert(NODE, "PDB shop/web allows no disruption", pool="general", now=NOW)
    assert blocked.labels["alertname"] == "OnDemandDrainBlocked" and blocked.labels["pool"] == "general"
    assert blocked.labels["node"] == NODE.node
    assert blocked.annotations["description"].endswith("PDB shop/web allows no disruption")


def test_api_body_extra_labels_yield_to_the_alerts_own() -> None:
    alert = spot_capacity_unavailable_alert("p", "z", "t", "r", NOW)
    body = alert.to_api({"cluster": "prod", "severity": "page", "team": ""}, NOW + timedelta(minutes=4))
    assert body["labels"]["cluster"] == "prod" and body["labels"]["severity"] == "warning"
    assert "team" not in body["labels"]
    assert body["startsAt"] == "2026-11-25T07:00:00.000Z" and body["endsAt"] == "2026-11-25T07:04:00.000Z"


# -- flags ----------------------------------------------------------------------------------------------


def parse(argv: list[str], env: dict[str, str] | None = None) -> AlertConfig:
    parser = argparse.ArgumentParser()
    add_alert_arguments(parser, env=env or {})
    return alert_config_from_args(parser.parse_args(argv))


def test_flags_defaults_and_env(tmp_path: Path) -> None:
    cfg = parse([])
    assert not cfg.enabled and cfg.resend_interval == 60 and cfg.queue_size == 1000
    token = tmp_path / "token"
    token.write_text("t")
    env = {
        "SPOTD_ALERTMANAGER_URL": "http://am-0:9093, http://am-1:9093",
        "SPOTD_ALERTMANAGER_BEARER_TOKEN_FILE": str(token),
        "SPOTD_CLUSTER_NAME": "prod-1",
        "SPOTD_ALERT_LABEL": "team=platform,env=prod",
        "SPOTD_ALERT_RESEND_INTERVAL": "30s",
    }
    cfg = parse([], env)
    assert cfg.urls == ("http://am-0:9093", "http://am-1:9093")
    assert cfg.labels() == {"team": "platform", "env": "prod", "cluster": "prod-1"}
    assert cfg.bearer_token_file == str(token) and cfg.resend_interval == 30
    # Flags win over the environment: they replace the list, they do not add to it.
    cfg = parse(["--alertmanager-url", "https://am:9093", "--alert-label", "team=spot", "--cluster-name", "x"], env)
    assert cfg.urls == ("https://am:9093",)
    assert cfg.labels() == {"team": "spot", "cluster": "x"}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--alertmanager-url", "ftp://x"], "--alertmanager-url: 'ftp://x' is not an http(s) URL"),
        (["--alertmanager-url", "http://u:secret@/x"], "--alertmanager-url: 'http://***@/x' is not an http(s) URL"),
        (["--alertmanager-url", "am:9093"], "--alertmanager-url: 'am:9093' is not an http(s) URL"),
        (["--alertmanager-bearer-token-file", "/nonexistent/t"], "--alertmanager-bearer-token-file: cannot read"),
        (["--alertmanager-ca-file", "/nonexistent/ca"], "--alertmanager-ca-file: cannot read"),
        (["--alert-label", "team"], "--alert-label: 'team' is not key=value"),
        (["--alert-label", "app.kubernetes.io/name=x"], "--alert-label: 'app.kubernetes.io/name' is not an"),
        (["--alert-resend-interval", "soon"], "--alert-resend-interval: 'soon' is not a duration"),
        (["--alert-resend-interval", "0s"], "--alert-resend-interval: must be more than 0"),
        (["--alert-queue-size", "0"], "--alert-queue-size: must be at least 1"),
        (["--alert-queue-size", "many"], "--alert-queue-size: 'many' is not a number"),
    ],
)
def test_bad_flags_are_one_line_naming_the_flag(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError) as err:
        parse(argv)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert "secret" not in str(err.value)


def test_ca_file_must_be_pem(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    with pytest.raises(ValueError, match=r"^--alertmanager-ca-file: .* is not a PEM CA bundle"):
        parse(["--alertmanager-ca-file", str(bad)])


# -- the Alerter without a network ------------------------------------------------------------------------


async def test_without_urls_it_accepts_calls_and_runs_until_cancelled() -> None:
    alerter = Alerter(AlertConfig(), log=RecordingLog())
    async with running(alerter) as task:
        alerter.fire(spot_interruption_alert(itn(NOW + timedelta(hours=1)), NODE))
        alerter.resolve("SpotInterruptionNotice", {"node": NODE.node})
        await asyncio.sleep(0.05)
        assert not task.done() and alerter.pending == 0 and alerter.active() == []


def test_refire_keeps_start_and_resolve_matches_subsets() -> None:
    alerter = Alerter(AlertConfig(), log=RecordingLog())
    first = spot_capacity_unavailable_alert("p", "us-east-1a", "m5.large", "ICE", NOW)
    alerter.fire(first)
    alerter.fire(spot_capacity_unavailable_alert("p", "us-east-1a", "m5.large", "ICE again", NOW + timedelta(1)))
    alerter.fire(spot_capacity_unavailable_alert("p", "us-east-1b", "m5.large", "ICE", NOW))
    alerter.fire(spot_capacity_unavailable_alert("q", "us-east-1a", "m5.large", "ICE", NOW))
    assert len(alerter.active()) == 3
    kept = next(a for a in alerter.active() if a.labels["zone"] == "us-east-1a" and a.labels["pool"] == "p")
    assert kept.starts_at == NOW and kept.annotations["description"].endswith("ICE again")
    alerter.resolve("SpotCapacityUnavailable", {"pool": "p"})
    assert [a.labels["pool"] for a in alerter.active()] == ["q"]
    alerter.resolve("OnDemandFallbackActive", {"pool": "q"})  # another name: untouched
    assert len(alerter.active()) == 1


def test_fire_never_raises() -> None:
    log = RecordingLog()
    alerter = Alerter(AlertConfig(), log=log)
    alerter.fire("not an alert")  # type: ignore[arg-type]
    assert log.events[0][:2] == ("error", "alert_fire_failed")


# -- delivery against a fake Alertmanager (auth, retries, lifecycle details) -------------------------------


async def test_basic_auth_from_url_is_sent_and_never_logged() -> None:
    expected = "Basic " + base64.b64encode(b"spotd:p@ss:word").decode()
    async with FakeAlertmanager(require_auth=expected) as am:
        log = RecordingLog()
        alerter = Alerter(config([am.url("spotd:p%40ss%3Aword@")]), log=log)
        am.status = 503  # first attempt fails, so the failure is logged
        async with running(alerter):
            alerter.fire(spot_interruption_alert(itn(datetime.now(UTC) + timedelta(minutes=2)), NODE))
            await eventually(lambda: am.requests, timeout=5)
            am.status = 200
            await eventually(lambda: any(e[1] == "alertmanager_recovered" for e in log.events), timeout=5)
        assert all(headers.get("Authorization") == expected for headers, _ in am.requests)
        events = repr(log.events)
        assert "alertmanager_unreachable" in events
        assert "p%40ss" not in events and "p@ss" not in events and "spotd:" not in events


async def test_bearer_token_file_is_reread_when_it_changes(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("first\n")
    async with FakeAlertmanager() as am:
        alerter = Alerter(config([am.url()], bearer_token_file=str(token), resend_interval=10), log=RecordingLog())
        async with running(alerter):
            alerter.fire(spot_capacity_unavailable_alert("a", "z", "t", "ICE", NOW))
            await eventually(lambda: len(am.requests) == 1, timeout=5)
            rotated = tmp_path / "token.new"
            rotated.write_text("second")
            os.replace(rotated, token)  # as the kubelet rotates a projected token: a new file
            alerter.fire(spot_capacity_unavailable_alert("b", "z", "t", "ICE", NOW))
            await eventually(lambda: len(am.requests) == 2, timeout=5)
        assert [h["Authorization"] for h, _ in am.requests] == ["Bearer first", "Bearer second"]


async def test_rejected_batches_are_not_retried() -> None:
    async with FakeAlertmanager() as am:
        am.status = 400
        before = ALERTS_SENT.labels("rejected")._value.get()
        alerter = Alerter(config([am.url()], resend_interval=10), log=RecordingLog())
        async with running(alerter):
            alerter.fire(spot_capacity_unavailable_alert("a", "z", "t", "ICE", NOW))
            # counted once the sender has read the answer, a moment after the request reached the server
            await eventually(lambda: ALERTS_SENT.labels("rejected")._value.get() - before == 1, timeout=5)
            await asyncio.sleep(0.3)
        assert len(am.requests) == 1
        assert ALERTS_SENT.labels("rejected")._value.get() - before == 1


async def test_active_alerts_are_resent_and_resolutions_repeated_for_a_while() -> None:
    async with FakeAlertmanager() as am:
        alerter = Alerter(config([am.url()], resend_interval=0.1, resolved_retention=0.5), log=RecordingLog())
        async with running(alerter):
            before = datetime.now(UTC)
            alerter.fire(spot_capacity_unavailable_alert("a", "z", "t", "ICE", NOW))
            await eventually(lambda: len(am.alerts()) >= 3, timeout=5)
            firing = am.alerts()[-1]
            # Valid for 4 resend intervals (0.4 s) from each send: a dead spotd's alerts resolve by themselves.
            ends = datetime.fromisoformat(firing["endsAt"].replace("Z", "+00:00"))
            assert before + timedelta(seconds=0.39) < ends <= datetime.now(UTC) + timedelta(seconds=0.41)
            alerter.resolve("SpotCapacityUnavailable", {"pool": "a"})
            await eventually(lambda: sum(a["endsAt"] <= format_time(datetime.now(UTC)) for a in am.alerts()) >= 2)
            await asyncio.sleep(0.8)  # past the retention: the resolution is no longer re-sent
            count = len(am.requests)
            await asyncio.sleep(0.3)
            assert len(am.requests) == count


async def test_an_alert_with_an_end_ends_by_itself() -> None:
    async with FakeAlertmanager() as am:
        alerter = Alerter(config([am.url()], resend_interval=0.1), log=RecordingLog())
        deadline = datetime.now(UTC) + timedelta(seconds=0.2)
        async with running(alerter):
            alerter.fire(spot_interruption_alert(itn(deadline), NODE, linger=timedelta(0)))
            assert len(alerter.active()) == 1
            await eventually(lambda: alerter.active() == [], timeout=5)
        assert am.alerts()[-1]["endsAt"] == format_time(deadline)


async def test_cancel_sends_pending_resolutions_once() -> None:
    async with FakeAlertmanager() as am:
        am.status = 503
        # A long back-off: only the shutdown flush can deliver the resolution.
        alerter = Alerter(
            config([am.url()], backoff_initial=30, backoff_max=30, resend_interval=30), log=RecordingLog()
        )
        async with running(alerter):
            alerter.fire(spot_capacity_unavailable_alert("a", "z", "t", "ICE", NOW))
            await eventually(lambda: am.requests, timeout=5)
            alerter.resolve("SpotCapacityUnavailable", {"pool": "a"})
            am.status = 200
            await asyncio.sleep(0.1)
            assert len(am.requests) == 1
        assert len(am.requests) == 2
        (last,) = am.requests[-1][1]
        assert last["endsAt"] <= format_time(datetime.now(UTC))


# -- off the critical path -------------------------------------------------------------------------------


async def test_alertmanager_down_fire_returns_at_once_queue_bounded_drops_counted() -> None:
    dropped_before = ALERTS_DROPPED._value.get()
    alerter = Alerter(config([closed_port_url()], queue_size=100), log=RecordingLog())
    async with running(alerter):
        for i in range(5000):
            alerter.fire(spot_interruption_alert(itn(datetime.now(UTC) + timedelta(minutes=2)), AlertNode(f"n{i}")))
        assert alerter.pending == 100 and alerter.dropped == 4900
        assert ALERTS_DROPPED._value.get() - dropped_before == 4900
        # fire() is plain and synchronous: 5000 calls ran without the loop turning once, so none waited
        # for the network. How long one takes is measured in bench/bench_alerts.py, not asserted here.
        assert not asyncio.iscoroutinefunction(alerter.fire)
        await asyncio.sleep(0.5)  # the worker keeps failing and retrying; the queue stays bounded
        assert alerter.pending <= 100


async def test_black_holed_member_does_not_delay_the_other() -> None:
    binary = require_tool("alertmanager")
    with black_hole() as hole, AlertmanagerSet(binary) as ams:
        (am,) = ams.members
        alerter = Alerter(config([hole, am.url], timeout=30), log=RecordingLog())
        async with running(alerter):
            alerter.fire(spot_capacity_unavailable_alert("a", "z", "t", "ICE", NOW))
            # Delivered while the black hole still holds its request (its timeout is 30 s).
            await eventually(lambda: am.alerts(alertname="SpotCapacityUnavailable"), timeout=10)


# -- a real Alertmanager -----------------------------------------------------------------------------------


class Webhook:
    """Alertmanager's notifications (webhook receiver, send_resolved) as they arrive."""

    def __init__(self) -> None:
        self.notifications: list[dict[str, Any]] = []
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.notifications.append(await request.json())
        return web.Response()

    def alerts(self, status: str) -> list[dict[str, Any]]:
        return [a for n in self.notifications for a in n["alerts"] if a["status"] == status]


@pytest.fixture
async def webhook() -> AsyncIterator[Webhook]:
    hook = Webhook()
    app = web.Application()
    app.router.add_post("/hook", hook.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    hook.port = bound_port(runner)
    yield hook
    await runner.cleanup()


async def test_real_alertmanager_fire_resolve_and_restart(webhook: Webhook) -> None:
    binary = require_tool("alertmanager")
    with AlertmanagerSet(binary, webhook_url=f"http://127.0.0.1:{webhook.port}/hook") as ams:
        (am,) = ams.members
        cfg = config([am.url], cluster_name="prod-1", extra_labels={"team": "platform"})
        alerter = Alerter(cfg, log=RecordingLog())
        deadline = datetime.now(UTC).replace(microsecond=0) + timedelta(minutes=2)
        alert = spot_interruption_alert(itn(deadline), NODE)
        async with running(alerter):
            alerter.fire(alert)
            (got,) = await eventually(lambda: am.alerts(alertname="SpotInterruptionNotice"))
            assert got["labels"] == {
                "alertname": "SpotInterruptionNotice",
                "severity": "warning",
                "kind": "spot-itn",
                "node": "ip-10-0-1-2.ec2.internal",
                "instance_id": "i-0abc",
                "zone": "us-east-1a",
                "instance_type": "m5.large",
                "cluster": "prod-1",
                "team": "platform",
            }
            assert got["annotations"] == dict(alert.annotations)
            assert got["startsAt"] == format_time(deadline - timedelta(minutes=2))
            assert got["endsAt"] == format_time(deadline + timedelta(minutes=5))
            assert got["status"]["state"] == "active"
            await eventually(lambda: webhook.alerts("firing"))

            # Restarted with no storage, Alertmanager forgets; the re-send brings the alert back.
            await asyncio.to_thread(am.stop)
            restarted = format_time(datetime.now(UTC))
            await asyncio.to_thread(am.start)
            (back,) = await eventually(lambda: am.alerts(alertname="SpotInterruptionNotice"), timeout=5)
            assert back["startsAt"] == got["startsAt"] and back["updatedAt"] >= restarted

            alerter.resolve("SpotInterruptionNotice", {"node": NODE.node, "kind": "spot-itn"})
            await eventually(lambda: am.alerts(alertname="SpotInterruptionNotice") == [])
            (resolved, *_) = await eventually(lambda: webhook.alerts("resolved"))
            assert resolved["labels"]["node"] == NODE.node
            assert resolved["endsAt"] < format_time(deadline)  # explicitly ended, not expired


async def test_two_member_cluster_gets_every_alert_even_with_one_dead() -> None:
    binary = require_tool("alertmanager")
    with AlertmanagerSet(binary, n=2, cluster=True) as ams:
        first, second = ams.members
        await eventually(lambda: len(first.status()["cluster"]["peers"]) == 2, timeout=10)
        alerter = Alerter(config(ams.urls), log=RecordingLog())
        async with running(alerter):
            for pool in ("a", "b", "c"):
                alerter.fire(spot_capacity_unavailable_alert(pool, "us-east-1a", "m5.large", "ICE", NOW))
            for member in ams.members:
                # Gossip never copies alerts, so each member shows exactly what it was sent.
                await eventually(lambda m=member: len(m.alerts(alertname="SpotCapacityUnavailable")) == 3)

            await asyncio.to_thread(first.stop)
            alerter.fire(node_drain_incomplete_alert(NODE, ["shop/web-0"], datetime.now(UTC)))
            (got,) = await eventually(lambda: second.alerts(alertname="NodeDrainIncomplete"), timeout=10)
            assert got["labels"]["severity"] == "critical"


# -- the documented Alertmanager route ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("document", "heading"), [("docs/alerts.md", "## Alertmanager route"), ("README.md", "### Alerts")]
)
def test_documented_route_is_valid_and_pages_only_critical(tmp_path: Path, document: str, heading: str) -> None:
    amtool = require_tool("amtool")
    docs = (Path(__file__).resolve().parent.parent / document).read_text()
    section = docs[docs.index(heading) :]
    match = re.search(r"```yaml\n(.*?)```", section, re.DOTALL)
    assert match, f"{document} lost its Alertmanager route example"
    cfg = tmp_path / "alertmanager.yml"
    cfg.write_text(match.group(1))
    check = subprocess.run([amtool, "check-config", str(cfg)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    expected = {
        ("alertname=NodeDrainIncomplete", "severity=critical"): "pagerduty-oncall,slack-spot",
        ("alertname=SpotCapacityUnavailable", "severity=warning"): "slack-spot",
        ("alertname=SpotInterruptionNotice", "severity=info"): "slack-spot-info",
        ("alertname=SpotdControllerNoLeader", "severity=warning"): "slack-spot",
    }
    for labels, receivers in expected.items():
        route = subprocess.run(
            [amtool, "config", "routes", "test", f"--config.file={cfg}", *labels],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert route.stdout.strip() == receivers, (labels, route.stdout, route.stderr)
