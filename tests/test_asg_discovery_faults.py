# ruff: noqa: F811
"""Issue 19, review findings 6 and 7: a failed read of an ASG's launch template never makes a Spot group
on-demand, and a refused DescribeScalingActivities is an error at start.

F6: a throttled, 5xx or cut-off DescribeLaunchTemplateVersions, a template deleted while a group names it
(InvalidLaunchTemplateId.NotFound), or an answer with no version (or no launch configuration) leaves that
group's market unknown. The group keeps the AsgInfo of the previous discovery (its activities are still read)
or, never described, is left out of the discovery (neither Spot nor on-demand); either way the pass is
unhealthy, the group is logged (asg_describe_failed) and counted (spotd_loop_errors_total{loop="asg"}) each
pass, and the other groups are discovered and read as usual, so one broken group neither hides the ICE of the
others nor holds up the controller's first decision (initial_read_done). Review finding 6 (MED, the second
review): the whole pass failed before, so a deleted template stopped every group's reads for ever. The faults
come from a plain HTTP proxy in front of moto's EC2 endpoint (AWS_ENDPOINT_URL_EC2), so the code under test
makes its own clients through boto3's standard chain and every request it makes is a real one.

Third review, finding 1 (HIGH): a Spot group never described was simply left out, so a pool it alone covers
read as Spot available ("no ICE seen", a Spot node Ready there) while nobody read its ICE; now every pool it may
cover (its zones; its override types when it lists them, else any type) is unknown until it is described.
Finding 2 (MED): an AccessDenied on one group's template or configuration read in an established term raised
out of the discovery, so no group's activities were read; now that group is handled as another failed read
(logged at error level as asg_discovery_denied, counted), and only at start is it an error.

F7: the loop reads the scaling activities of every Spot group; at start, the controller reads one Spot
group's, and AccessDenied is one line and exit status 2, like the discovery's own reads (the refusal is a row
of tests/test_capacity_source_gate.py; here: no Spot group, no read).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from spotd.capacity.pools import UNAVAILABLE, UNKNOWN, PoolBook, spot_where_known
from spotd.capacity.signals import AsgInfo, CapacitySignal, CapacityType, Pool, SignalKind
from spotd.capacity.sources import aws as capacity_aws
from spotd.capacity.sources.asg import AsgSource
from spotd.common.metrics import REGISTRY
from tests.agent_harness import eventually
from tests.moto_server import MotoAws, aws, moto_endpoint  # noqa: F401  (pytest fixtures)
from tests.test_capacity_source_gate import (
    ASG_TAGS,
    ZONE,
    limited_user,
    spot_configuration_asg,
    spot_template_asg,
    template_asg,
)

SPOT = AsgInfo("gate-spot", ("m5.large",), (ZONE,), spot=True, on_demand=False)

# Not passed on: hop-by-hop headers and those the proxy sets itself. Host is kept: the request is signed with it.
_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "date", "server"})

# EC2's answers (query protocol): a throttled call, and a server error.
_ERRORS = {
    "throttled": ("RequestLimitExceeded", 503),
    "unavailable": ("InternalError", 500),
    "denied": ("UnauthorizedOperation", 403),  # EC2's AccessDenied
}
_ERROR_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>{code}</Code>'
    "<Message>injected by the test's proxy</Message></Error></Errors><RequestID>fault</RequestID></Response>"
)
# A DescribeLaunchTemplateVersions answer with no version in it.
_EMPTY_VERSIONS = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<DescribeLaunchTemplateVersionsResponse '
    'xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"><requestId>fault</requestId>'
    "<launchTemplateVersionSet/></DescribeLaunchTemplateVersionsResponse>"
)


@dataclass
class Fault:
    action: str  # the EC2 action (the form body's Action)
    # "throttled", "unavailable" (500), "denied" (403), "dropped" (the connection closed), "empty" (no version)
    kind: str
    applied: int = 0


class Ec2FaultProxy:
    """Plain HTTP on 127.0.0.1 in front of moto: every request is forwarded as it came (Host and signature
    included), except those of the armed fault's action, which get the fault instead."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.fault: Fault | None = None
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        self._session = aiohttp.ClientSession(auto_decompress=False)

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        action = parse_qs(body.decode()).get("Action", [""])[0]
        fault = self.fault
        if fault is not None and fault.action == action:
            fault.applied += 1
            if fault.kind == "dropped":
                assert request.transport is not None
                request.transport.abort()
                return web.Response()  # never sent
            if fault.kind == "empty":
                return web.Response(text=_EMPTY_VERSIONS, content_type="text/xml")
            code, status = _ERRORS[fault.kind]
            return web.Response(status=status, text=_ERROR_BODY.format(code=code), content_type="text/xml")
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        async with self._session.request(
            request.method, self.upstream + request.path_qs, headers=headers, data=body
        ) as upstream:
            answer = await upstream.read()
            out = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP}
            return web.Response(status=upstream.status, body=answer, headers=out)


@pytest.fixture
async def ec2_faults(aws: MotoAws) -> AsyncIterator[Ec2FaultProxy]:
    """The code under test reaches EC2 through the proxy (AWS_ENDPOINT_URL_EC2); the rest goes to moto."""
    proxy = Ec2FaultProxy(aws.url)
    await proxy.start()
    aws.monkeypatch.setenv("AWS_ENDPOINT_URL_EC2", proxy.url)
    aws.monkeypatch.setattr(capacity_aws, "RETRY_WAIT_MAX", 0.01)  # spotd's own retries, in a blink
    try:
        yield proxy
    finally:
        await proxy.stop()


def asg_loop_errors() -> float:
    return REGISTRY.get_sample_value("spotd_loop_errors_total", {"loop": "asg"}) or 0.0


def activity_reads() -> float:
    """DescribeScalingActivities calls answered (every group's, every page)."""
    labels = {"service": "autoscaling", "operation": "DescribeScalingActivities", "outcome": "ok"}
    return REGISTRY.get_sample_value("spotd_aws_requests_total", labels) or 0.0


def broken_asg(aws: MotoAws, name: str = "gate-broken") -> None:
    """A tagged group (scaled to 0, forgotten) whose launch template was deleted: AWS lets you delete a
    template an ASG names, and every read of it is then InvalidLaunchTemplateId.NotFound."""
    template = template_asg(aws, name, "m5.large", spot=False)
    aws.client("ec2").delete_launch_template(LaunchTemplateId=template)


def described_failed(logs: list[dict[str, object]]) -> list[object]:
    return [entry["asg"] for entry in logs if entry["event"] == "asg_describe_failed"]


@pytest.mark.parametrize("kind", ["throttled", "unavailable", "dropped"])
async def test_a_failed_template_read_keeps_the_groups_last_discovery_and_its_activities_are_read(
    aws: MotoAws, ec2_faults: Ec2FaultProxy, kind: str
) -> None:
    """A group Spot by its launch template only: its template read failing (after spotd's retries) keeps the
    group as the previous discovery had it (never on-demand), and its activities are still read; the pass is
    unhealthy and counted, each time, until the read works again."""
    spot_template_asg(aws)
    source = AsgSource()
    await source.poll_once()
    assert source.asgs == {"gate-spot": SPOT} and source.healthy and source.initial_read_done

    ec2_faults.fault = Fault("DescribeLaunchTemplateVersions", kind)
    errors, reads = asg_loop_errors(), activity_reads()
    await source.poll_once()
    assert ec2_faults.fault.applied == capacity_aws.RETRY_ATTEMPTS
    assert source.asgs == {"gate-spot": SPOT}  # never read as on-demand
    assert list(source.undescribed) == ["gate-spot"]
    assert activity_reads() == reads + 1  # its ICE is still read
    assert not source.healthy and source.initial_read_done
    assert asg_loop_errors() == errors + 1

    task = asyncio.create_task(source.run(lambda signals: None, interval=0.05))
    try:
        await eventually(lambda: asg_loop_errors() >= errors + 3, timeout=20)
        assert source.asgs == {"gate-spot": SPOT} and not source.healthy
        ec2_faults.fault = None
        await eventually(lambda: source.healthy, timeout=20)
        assert source.asgs == {"gate-spot": SPOT} and source.undescribed == {}
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_at_start_a_failed_template_read_is_left_to_the_loop(aws: MotoAws, ec2_faults: Ec2FaultProxy) -> None:
    """Not a start-up error (the loop tries again), and the group is not taken as discovered meanwhile."""
    spot_template_asg(aws)
    ec2_faults.fault = Fault("DescribeLaunchTemplateVersions", "unavailable")
    source = AsgSource()
    await source.check_discovery()
    assert ec2_faults.fault.applied == capacity_aws.RETRY_ATTEMPTS
    assert source.asgs == {} and list(source.undescribed) == ["gate-spot"]


async def test_a_deleted_template_at_start_leaves_its_group_out_and_the_others_are_read(aws: MotoAws) -> None:
    """Review finding 6 (probe A1): a forgotten group whose template was deleted is left out of every pass
    (logged and counted each time), while the other groups are discovered, their activities read, and the
    first read completes (the controller's decisions wait for it)."""
    spot_template_asg(aws)
    broken_asg(aws)
    source = AsgSource()
    errors = asg_loop_errors()
    with capture_logs() as logs:
        await source.check_discovery()  # not a start error: only AccessDenied is
        assert source.asgs == {"gate-spot": SPOT}
        for n in (1, 2):
            reads = activity_reads()
            await source.poll_once()
            assert source.asgs == {"gate-spot": SPOT}  # gate-broken: neither Spot nor on-demand
            assert "InvalidLaunchTemplateId.NotFound" in source.undescribed["gate-broken"]
            assert activity_reads() == reads + 1
            assert source.initial_read_done and not source.healthy
            assert asg_loop_errors() == errors + 1 + n  # the start's discovery, then each pass
    assert described_failed(logs) == ["gate-broken"] * 3


async def test_a_broken_group_tagged_later_does_not_stop_the_others_reads(aws: MotoAws) -> None:
    """Review finding 6 (probe A3): discovery worked, then a group with a deleted template is tagged; the
    Spot group's activities are still read in every pass, the broken group stays out."""
    spot_template_asg(aws)
    source = AsgSource()
    await source.poll_once()
    assert source.asgs == {"gate-spot": SPOT} and source.healthy
    broken_asg(aws)
    for _ in range(2):
        reads = activity_reads()
        await source.poll_once()
        assert source.asgs == {"gate-spot": SPOT} and list(source.undescribed) == ["gate-broken"]
        assert activity_reads() == reads + 1
        assert not source.healthy


async def test_a_spot_groups_template_deleted_later_keeps_its_discovery(aws: MotoAws) -> None:
    """The Spot group's own template is deleted after it was discovered: it stays Spot (the previous AsgInfo)
    and its activities are still read; the pass is unhealthy."""
    spot_template_asg(aws)
    source = AsgSource()
    await source.poll_once()
    ec2 = aws.client("ec2")
    ec2.delete_launch_template(LaunchTemplateName="gate-spot-lt")
    reads = activity_reads()
    with capture_logs() as logs:
        await source.poll_once()
    assert source.asgs == {"gate-spot": SPOT} and not source.healthy and source.initial_read_done
    assert activity_reads() == reads + 1
    assert [(e["asg"], e["kept_previous"]) for e in logs if e["event"] == "asg_describe_failed"] == [
        ("gate-spot", True)
    ]


async def test_an_empty_template_versions_answer_is_unknown_not_on_demand(
    aws: MotoAws, ec2_faults: Ec2FaultProxy
) -> None:
    """DescribeLaunchTemplateVersions answering no version: like a failed read, the group keeps its previous
    discovery, and at start it is left out; never read as on-demand."""
    spot_template_asg(aws)
    source = AsgSource()
    await source.poll_once()
    ec2_faults.fault = Fault("DescribeLaunchTemplateVersions", "empty")
    await source.poll_once()
    assert ec2_faults.fault.applied == 1
    assert source.asgs == {"gate-spot": SPOT} and not source.healthy

    starting = AsgSource()
    await starting.check_discovery()
    assert starting.asgs == {} and list(starting.undescribed) == ["gate-spot"]


async def test_an_empty_launch_configurations_answer_is_unknown_not_on_demand(aws: MotoAws) -> None:
    """DescribeLaunchConfigurations answering none (here: moto lets the configuration be deleted): the group
    keeps its previous discovery, and at start it is left out; never read as on-demand."""
    legacy = AsgInfo("gate-legacy", ("m5.large",), (ZONE,), spot=True, on_demand=False)
    spot_configuration_asg(aws)
    source = AsgSource()
    await source.poll_once()
    assert source.asgs == {"gate-legacy": legacy}
    aws.client("autoscaling").delete_launch_configuration(LaunchConfigurationName="gate-legacy-lc")
    await source.poll_once()
    assert source.asgs == {"gate-legacy": legacy} and not source.healthy

    starting = AsgSource()
    await starting.check_discovery()
    assert starting.asgs == {} and list(starting.undescribed) == ["gate-legacy"]


async def test_without_a_spot_group_no_scaling_activities_are_read_at_start(aws: MotoAws) -> None:
    """An on-demand group only: nothing to read activities for, so nothing is refused and the start goes on
    (the loop reads those of a Spot group tagged later, and says so if refused)."""
    ec2 = aws.client("ec2")
    image = ec2.describe_images()["Images"][0]["ImageId"]
    ec2.create_launch_template(
        LaunchTemplateName="od-lt", LaunchTemplateData={"ImageId": image, "InstanceType": "m5.large"}
    )
    aws.client("autoscaling").create_auto_scaling_group(
        AutoScalingGroupName="gate-od",
        MinSize=0,
        MaxSize=3,
        DesiredCapacity=0,
        AvailabilityZones=[ZONE],
        LaunchTemplate={"LaunchTemplateName": "od-lt"},
        Tags=ASG_TAGS,
    )
    limited_user(aws, "spotd-no-activities", "autoscaling:DescribeScalingActivities")
    source = AsgSource()
    await source.check_discovery()
    assert source.asgs == {"gate-od": AsgInfo("gate-od", ("m5.large",), (ZONE,), spot=False, on_demand=True)}


# --- third review, finding 1: a group never described makes the pools it may cover unknown ------------------

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
COOLDOWN = timedelta(minutes=10)
C5A = Pool("c5.large", ZONE)


def spot_seen(pool: Pool) -> PoolBook:
    """A book where a Spot node was Ready in the pool two hours ago (the controller's node signals)."""
    launched = CapacitySignal(
        pool, SignalKind.LAUNCHED, "node", NOW - timedelta(hours=2), "Spot node x Ready", CapacityType.SPOT, key="x"
    )
    return PoolBook().record(launched)


def _unread_cases() -> list[tuple[str, PoolBook, Pool, tuple[str, ...], tuple[str, ...] | None, str | None]]:
    """(name, book, pool, the unread group's zones, its types, the verdict's state or None: the unread group
    changes nothing)."""
    ice = CapacitySignal(C5A, SignalKind.ICE, "asg", NOW - timedelta(minutes=1), "InsufficientInstanceCapacity")
    return [
        ("its zone, type unknown", spot_seen(C5A), C5A, (ZONE,), None, UNKNOWN),
        ("its zone, no launch seen", PoolBook(), C5A, (ZONE,), None, UNKNOWN),
        ("its zone, a listed type", spot_seen(C5A), C5A, (ZONE, "us-east-1b"), ("c5.large", "m5.large"), UNKNOWN),
        ("no zones named: any zone", spot_seen(C5A), C5A, (), None, UNKNOWN),
        ("a '*' pool in its zone", spot_seen(Pool("*", ZONE)), Pool("*", ZONE), (ZONE,), ("m5.large",), UNKNOWN),
        (
            "another zone",
            spot_seen(Pool("c5.large", "us-east-1b")),
            Pool("c5.large", "us-east-1b"),
            (ZONE,),
            None,
            None,
        ),
        ("a type it does not list", spot_seen(C5A), C5A, (ZONE,), ("m5.large",), None),
        ("an ICE stays the verdict", PoolBook().record(ice), C5A, (ZONE,), None, UNAVAILABLE),
    ]


@pytest.mark.parametrize(("name", "book", "pool", "zones", "types", "state"), _unread_cases())
def test_an_unread_group_makes_the_pools_it_may_cover_unknown(
    name: str, book: PoolBook, pool: Pool, zones: tuple[str, ...], types: tuple[str, ...] | None, state: str | None
) -> None:
    from spotd.capacity.pools import UnreadGroup  # here: the other tests still run on the commits before it

    groups = [AsgInfo("gate-legacy", ("m5.large",), (ZONE, "us-east-1b"), spot=True, on_demand=False)]
    unread = UnreadGroup("ice-c5", zones, types, "its launch template could not be read")
    without = spot_where_known(book, pool, NOW, COOLDOWN, groups)
    verdict = spot_where_known(book, pool, NOW, COOLDOWN, groups, [unread])
    if state is None:
        assert verdict == without and verdict.available, name
    elif state == UNKNOWN:
        assert not verdict.available and verdict.state == UNKNOWN, name
        assert verdict.reason.startswith("ASG ice-c5 unread (its launch template could not be read)"), verdict
        assert "Spot capacity unknown" in verdict.reason
    else:
        assert verdict == without and verdict.state == state, name


def spot_c5_template_asg(aws: MotoAws, name: str = "ice-c5") -> None:
    """A Spot ASG of c5.large in ZONE by its launch template (read through EC2: the proxy can fail it)."""
    template_asg(aws, name, "c5.large", spot=True)


async def test_a_spot_group_never_described_leaves_its_pools_unknown_not_available(
    aws: MotoAws, ec2_faults: Ec2FaultProxy
) -> None:
    """Review finding 1 (HIGH, probe P7): the c5.large Spot group's template read is throttled from the start;
    a Spot node was Ready in c5.large/ZONE and no ICE was seen, yet nobody reads that group's ICE: the pool is
    unknown (the other group's reads complete, so the controller decides) until the group is described."""
    spot_configuration_asg(aws)  # m5.large Spot by its launch configuration (autoscaling: not faulted)
    spot_c5_template_asg(aws)
    ec2_faults.fault = Fault("DescribeLaunchTemplateVersions", "throttled")
    source = AsgSource()
    await source.check_discovery()
    await source.poll_once()
    assert sorted(source.asgs) == ["gate-legacy"] and list(source.undescribed) == ["ice-c5"]
    assert source.initial_read_done and not source.healthy
    book = spot_seen(C5A)
    verdict = spot_where_known(book, C5A, NOW, COOLDOWN, source.asgs.values(), source.unread.values())
    assert not verdict.available and verdict.state == UNKNOWN
    assert verdict.reason.startswith("ASG ice-c5 unread (its launch template could not be read)"), verdict
    other = Pool("c5.large", "us-east-1b")  # outside its zones: as before
    assert spot_where_known(spot_seen(other), other, NOW, COOLDOWN, source.asgs.values(), source.unread.values())

    ec2_faults.fault = None
    await source.poll_once()
    assert sorted(source.asgs) == ["gate-legacy", "ice-c5"] and source.unread == {} and source.healthy
    assert spot_where_known(book, C5A, NOW, COOLDOWN, source.asgs.values(), source.unread.values()).available


# --- third review, finding 2: a group's read refused in the loop is that group's failure, not the pass's ------


async def test_a_template_read_refused_mid_term_fails_that_group_only(aws: MotoAws, ec2_faults: Ec2FaultProxy) -> None:
    """Review finding 2 (MED, probe P8): granted at start, DescribeLaunchTemplateVersions refused later: the
    group keeps its discovery, every Spot group's activities are still read each pass, and the refusal is
    logged at error level naming the action and the group, and counted, each pass."""
    spot_template_asg(aws)
    spot_configuration_asg(aws)
    source = AsgSource()
    await source.poll_once()
    legacy = AsgInfo("gate-legacy", ("m5.large",), (ZONE,), spot=True, on_demand=False)
    assert source.asgs == {"gate-spot": SPOT, "gate-legacy": legacy} and source.healthy

    ec2_faults.fault = Fault("DescribeLaunchTemplateVersions", "denied")
    errors = asg_loop_errors()
    with capture_logs() as logs:
        for n in (1, 2, 3):
            reads = activity_reads()
            await source.poll_once()
            assert activity_reads() == reads + 2  # both groups' ICE is read
            assert source.asgs == {"gate-spot": SPOT, "gate-legacy": legacy} and source.unread == {}
            assert list(source.undescribed) == ["gate-spot"] and not source.healthy
            assert asg_loop_errors() == errors + n
    denied = [e for e in logs if e["event"] == "asg_discovery_denied"]
    assert [(e["asg"], e["log_level"], e["kept_previous"]) for e in denied] == [("gate-spot", "error", True)] * 3
    assert all("ec2:DescribeLaunchTemplateVersions" in str(e["error"]) for e in denied)


async def test_a_configuration_read_refused_in_the_loop_leaves_the_group_unread(aws: MotoAws) -> None:
    """DescribeLaunchConfigurations refused, the group never described: the loop does not raise, the group is
    unread (its pools unknown, naming its launch configuration) and the other group is discovered and read.
    (At start the same refusal is one line and exit status 2: tests/test_capacity_source_gate.py.)"""
    spot_template_asg(aws)
    spot_configuration_asg(aws)
    limited_user(aws, "spotd-no-configurations", "autoscaling:DescribeLaunchConfigurations")
    source = AsgSource()
    reads = activity_reads()
    with capture_logs() as logs, aws.expect_denied("autoscaling:DescribeLaunchConfigurations"):
        await source.poll_once()
    assert source.asgs == {"gate-spot": SPOT} and list(source.unread) == ["gate-legacy"]
    assert activity_reads() == reads + 1 and source.initial_read_done and not source.healthy
    assert [(e["asg"], e["log_level"]) for e in logs if e["event"] == "asg_discovery_denied"] == [
        ("gate-legacy", "error")
    ]
    pool = Pool("m5.large", ZONE)
    verdict = spot_where_known(spot_seen(pool), pool, NOW, COOLDOWN, source.asgs.values(), source.unread.values())
    assert verdict.state == UNKNOWN
    assert verdict.reason.startswith("ASG gate-legacy unread (its launch configuration could not be read)")
