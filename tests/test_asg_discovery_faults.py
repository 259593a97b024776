# ruff: noqa: F811
"""Issue 19, review findings 6 and 7: a failed read of an ASG's launch template never makes a Spot group
on-demand, and a refused DescribeScalingActivities is an error at start.

F6: a throttled, 5xx or cut-off DescribeLaunchTemplateVersions fails the whole discovery pass (the previous
discovery stands, the loop counts the error and tries again). Before, the group was read as on-demand for that
pass: a group that is Spot only by its template's market type then had its ICE left unread. The faults come
from a plain HTTP proxy in front of moto's EC2 endpoint (AWS_ENDPOINT_URL_EC2), so the code under test makes
its own clients through boto3's standard chain and every request it makes is a real one.

F7: the loop reads the scaling activities of every Spot group; at start, the controller reads one Spot
group's, and AccessDenied is one line and exit status 2, like the discovery's own reads (the refusal is a row
of tests/test_capacity_source_gate.py; here: no Spot group, no read).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import parse_qs

import aiohttp
import pytest
from aiohttp import web
from botocore.exceptions import BotoCoreError, ClientError

from spotd.capacity.signals import AsgInfo
from spotd.capacity.sources import aws as capacity_aws
from spotd.capacity.sources.asg import AsgSource
from spotd.common.metrics import REGISTRY
from tests.agent_harness import eventually
from tests.moto_server import MotoAws, aws, moto_endpoint  # noqa: F401  (pytest fixtures)
from tests.test_capacity_source_gate import ASG_TAGS, ZONE, limited_user, spot_template_asg

SPOT = AsgInfo("gate-spot", ("m5.large",), (ZONE,), spot=True, on_demand=False)

# Not passed on: hop-by-hop headers and those the proxy sets itself. Host is kept: the request is signed with it.
_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "date", "server"})

# EC2's answers (query protocol): a throttled call, and a server error.
_ERRORS = {"throttled": ("RequestLimitExceeded", 503), "unavailable": ("InternalError", 500)}
_ERROR_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>{code}</Code>'
    "<Message>injected by the test's proxy</Message></Error></Errors><RequestID>fault</RequestID></Response>"
)


@dataclass
class Fault:
    action: str  # the EC2 action (the form body's Action)
    kind: str  # "throttled", "unavailable" (500), or "dropped" (the connection closed, no answer)
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


@pytest.mark.parametrize("kind", ["throttled", "unavailable", "dropped"])
async def test_a_failed_template_read_fails_the_discovery_and_the_last_one_stands(
    aws: MotoAws, ec2_faults: Ec2FaultProxy, kind: str
) -> None:
    """A group Spot by its launch template only: its template read failing (after spotd's retries) fails
    the pass, which leaves the previous discovery as it was; the loop counts it and recovers."""
    spot_template_asg(aws)
    source = AsgSource()
    await source.poll_once()
    assert source.asgs == {"gate-spot": SPOT} and source.healthy

    ec2_faults.fault = Fault("DescribeLaunchTemplateVersions", kind)
    with pytest.raises((ClientError, BotoCoreError)):
        await source.poll_once()
    assert ec2_faults.fault.applied == capacity_aws.RETRY_ATTEMPTS
    assert source.asgs == {"gate-spot": SPOT}  # never read as on-demand
    assert not source.healthy

    errors = asg_loop_errors()
    task = asyncio.create_task(source.run(lambda signals: None, interval=0.05))
    try:
        await eventually(lambda: asg_loop_errors() >= errors + 2, timeout=20)
        assert source.asgs == {"gate-spot": SPOT} and not source.healthy
        ec2_faults.fault = None
        await eventually(lambda: source.healthy, timeout=20)
        assert source.asgs == {"gate-spot": SPOT}
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_at_start_a_failed_template_read_is_left_to_the_loop(aws: MotoAws, ec2_faults: Ec2FaultProxy) -> None:
    """Not a start-up error (the loop tries again), and no group is taken as discovered meanwhile."""
    spot_template_asg(aws)
    ec2_faults.fault = Fault("DescribeLaunchTemplateVersions", "unavailable")
    source = AsgSource()
    await source.check_discovery()
    assert ec2_faults.fault.applied == capacity_aws.RETRY_ATTEMPTS
    assert source.asgs == {}


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
