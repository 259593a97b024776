"""The agent's polling by urgency and its footprint rules, with the real agent as a subprocess."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from spotd.sim.imds import FakeImds
from spotd.sim.kubeapi.server import FakeApiServer
from tests.agent_harness import AgentProcess, agent_kubeconfig, eventually, node_obj

NODE = "ip-10-0-1-20.ec2.internal"
ITN = "spot/instance-action"
SLOW = ("events/recommendations/rebalance", "events/maintenance/scheduled", "autoscaling/target-lifecycle-state")


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    server = FakeApiServer(termination_scale=0.02)
    await server.start()
    server.create(node_obj(NODE))
    yield server
    await server.stop()


@pytest.fixture
async def imds() -> AsyncIterator[FakeImds]:
    async with FakeImds() as fake:
        yield fake


@pytest.fixture
def agent_for(api: FakeApiServer, imds: FakeImds, tmp_path: Path) -> Iterator[list[AgentProcess]]:
    started: list[AgentProcess] = []
    yield started
    for agent in started:
        agent.stop(signal.SIGKILL)


def start(started: list[AgentProcess], api: FakeApiServer, imds: FakeImds, tmp: Path, *extra: str) -> AgentProcess:
    kubeconfig = agent_kubeconfig(api, tmp / "kubeconfig", NODE)
    agent = AgentProcess(tmp, kubeconfig, imds.url, NODE, *extra).start()
    started.append(agent)
    return agent


async def test_interruption_path_is_polled_often_the_others_slowly(api, imds, agent_for, tmp_path) -> None:
    agent = start(agent_for, api, imds, tmp_path, "--poll-interval", "0.1s", "--slow-poll-interval", "1s")
    await agent.ready()
    fast0, slow0 = imds.count("GET", ITN), [imds.count("GET", p) for p in SLOW]
    await asyncio.sleep(2.2)
    fast = imds.count("GET", ITN) - fast0
    slow = [imds.count("GET", p) - s for p, s in zip(SLOW, slow0, strict=True)]
    assert fast >= 12, fast  # about 22 at 0.1 s (a loaded machine polls less often, never more)
    assert all(1 <= n <= 3 for n in slow), slow  # about 2 at 1 s
    assert imds.count("PUT", "api/token") == 1
    # A rebalance recommendation is still seen, within the slow interval.
    imds.set_rebalance(datetime.now(UTC))
    await eventually(lambda: agent.events("notice_received"), timeout=5)


async def test_quiet_polls_make_no_kubernetes_calls(api, imds, agent_for, tmp_path) -> None:
    agent = start(agent_for, api, imds, tmp_path, "--poll-interval", "0.05s", "--slow-poll-interval", "0.2s")
    await agent.ready()
    await asyncio.sleep(1.0)  # past start-up: the node read, the watch, the instance's labels
    before = len(api.requests)
    await asyncio.sleep(1.5)  # some 30 polls
    assert api.requests[before:] == []
    assert imds.count("GET", ITN) > 20
    # ...and a notice is acted on at once.
    imds.set_instance_action("terminate", datetime.now(UTC) + timedelta(minutes=2))
    await eventually(lambda: (api.get("Node", NODE) or {}).get("spec", {}).get("unschedulable"), timeout=5)


def test_agent_never_imports_aiohttp() -> None:
    # What `spotd agent` imports: the CLI with the agent's flags and the agent's program (spotd.agent.main).
    # Each named module costs resident memory on every node and the agent has no use for it: aiohttp and
    # boto3 (the controller's), httpcore and anyio (httpx's own transport; the agent's is
    # spotd.common.transport), decimal (the controller's resource quantities; rich, which only the test
    # tools install, loads it too).
    code = (
        "import sys\n"
        "from spotd.cli.main import build_parser, _program\n"
        "build_parser(only='agent'); _program('agent')\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('aiohttp', 'yarl', 'boto3', 'botocore', 'httpcore', 'anyio') or m == 'spotd.common.quantity')\n"
        "if bad: raise SystemExit(f'the agent imports {bad}')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
