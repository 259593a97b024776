"""spotd.common.transport: the agent's HTTP under httpx, against real servers on 127.0.0.1.

Each promise the module makes (httpx's limits, timeouts and exception types; reuse; a stale kept connection
sent again once; a body streamed as it arrives; TLS verified) has a test that fails without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import structlog
from aiohttp import web
from lightkube.resources.core_v1 import Node

from spotd.common.transport import H11Transport
from spotd.drain.executor import DrainOptions, drain_node
from spotd.kube.client import make_client
from spotd.sim.kubeapi import FakeApiServer
from spotd.sim.kubeapi.auth import _with_openssl, self_signed_certificate
from tests.agent_harness import DEPLOY, agent_kubeconfig, node_obj, pod_obj

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    """One request's head and its Content-Length body (enough for these tests' clients)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head + (await reader.readexactly(length) if length else b"")


@contextlib.asynccontextmanager
async def _client_of(
    handler: Handler, transport: H11Transport | None = None, scheme: str = "http"
) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client on `transport` (a fresh H11Transport by default) to a raw server running `handler`."""
    server, url = await _raw_server(handler)
    try:
        base_url = url.replace("http:", f"{scheme}:")
        async with httpx.AsyncClient(transport=transport or H11Transport(), base_url=base_url) as client:
            yield client
    finally:
        server.close()


async def _raw_server(handler: Handler) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


def _ok(body: bytes = b"ok", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


@pytest.fixture
async def app_url() -> AsyncIterator[str]:
    seen: list[str] = []

    async def echo(request: web.Request) -> web.Response:
        seen.append(request.method)
        body = await request.read()
        return web.json_response({"method": request.method, "path": request.path_qs, "body": body.decode()})

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b'{"type":"ADDED"}\n')
        await asyncio.sleep(3600)  # a watch that stays open: the first line must arrive anyway
        return response

    app = web.Application()
    app.router.add_route("*", "/echo", echo)
    app.router.add_get("/stream", stream)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_requests_with_and_without_bodies_share_one_connection(app_url: str) -> None:
    transport = H11Transport()
    async with httpx.AsyncClient(transport=transport, base_url=app_url) as client:
        got = (await client.get("/echo?a=1")).json()
        assert got == {"method": "GET", "path": "/echo?a=1", "body": ""}
        sent = json.dumps({"kind": "Eviction"})
        got = (await client.post("/echo", content=sent, headers={"Content-Type": "application/json"})).json()
        assert got == {"method": "POST", "path": "/echo", "body": sent}
        response = await client.patch("/echo", json={"a": 1})
        assert response.status_code == 200
        assert response.http_version == "HTTP/1.1"
        assert response.headers["content-type"].startswith("application/json")
    assert transport.connections_opened == 1


async def test_a_streamed_body_arrives_before_the_response_ends(app_url: str) -> None:
    async with httpx.AsyncClient(transport=H11Transport(), base_url=app_url) as client:
        async with client.stream("GET", "/stream", timeout=httpx.Timeout(5, read=None)) as response:
            lines = response.aiter_lines()
            first = await asyncio.wait_for(anext(lines), timeout=10)
    assert json.loads(first) == {"type": "ADDED"}


async def test_a_stale_kept_connection_is_sent_again_once_on_a_fresh_one() -> None:
    requests: list[bytes] = []

    async def answer_once_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests.append(await _read_request(reader))
        writer.write(_ok())  # keep-alive as far as the client knows, then closed while idle
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()

    transport = H11Transport()
    async with _client_of(answer_once_then_close, transport) as client:
        assert (await client.get("/a")).text == "ok"
        await asyncio.sleep(0.3)  # the server's close is seen, or not yet: either way no error
        assert (await client.post("/b", content=b"{}")).text == "ok"
    assert [r.split(b" ", 2)[:2] for r in requests] == [[b"GET", b"/a"], [b"POST", b"/b"]]
    assert transport.connections_opened == 2


async def test_a_kept_connection_closed_unseen_is_retried_once() -> None:
    """The close arrives only when the request is already written (the loop never saw the FIN): the request
    goes again on a fresh connection, once; the server answers the second one."""
    connections = 0

    async def first_conn_closes_on_second_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        first = connections == 1
        await _read_request(reader)
        writer.write(_ok(b"one" if first else b"two"))
        await writer.drain()
        if first:
            await _read_request(reader)  # the reused connection's request: close without a byte
            writer.close()
            return
        await asyncio.sleep(1)

    transport = H11Transport()
    async with _client_of(first_conn_closes_on_second_request, transport) as client:
        assert (await client.get("/1")).text == "one"
        assert (await client.get("/2")).text == "two"
    assert transport.connections_opened == 2


async def test_a_post_on_a_kept_connection_closed_unseen_is_not_sent_again() -> None:
    """The server read the POST (an eviction) and closed without a word: it may have acted on it."""
    posts = 0

    async def act_then_hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal posts
        await _read_request(reader)
        writer.write(_ok())
        await writer.drain()
        request = await _read_request(reader)  # the reused connection's request, acted on: no answer
        posts += request.startswith(b"POST")
        writer.close()

    transport = H11Transport()
    async with _client_of(act_then_hang_up, transport) as client:
        await client.get("/")
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post("/api/v1/namespaces/a/pods/b/eviction", content=b"{}")
    assert posts == 1 and transport.connections_opened == 1


@pytest.mark.parametrize("together", [True, False], ids=["with-the-response", "while-idle"])
async def test_an_idle_connection_that_received_anything_is_not_reused(together: bool) -> None:
    """A proxy's unsolicited 408 on an idle connection is no answer to the next request."""
    unsolicited = b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n"
    answers = iter([_ok(b"first"), _ok(b"second")])

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        first = next(answers)
        writer.write(first + unsolicited if together and first.endswith(b"first") else first)
        await writer.drain()
        if not together and first.endswith(b"first"):
            await asyncio.sleep(0.1)
            writer.write(unsolicited)
            await writer.drain()
        await asyncio.sleep(5)

    transport = H11Transport()
    async with _client_of(answer, transport) as client:
        assert (await client.get("/")).text == "first"
        await asyncio.sleep(0.3)  # the 408 arrives while the connection is idle
        second = await client.get("/")
        assert (second.status_code, second.text) == (200, "second")
    assert transport.connections_opened == 2


async def test_a_response_cut_short_is_an_error_and_not_sent_again() -> None:
    requests = 0

    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal requests
        await _read_request(reader)
        requests += 1
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await writer.drain()
        writer.close()

    async with _client_of(cut) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post("/api/v1/namespaces/a/pods/b/eviction", content=b"{}")
    assert requests == 1


async def test_a_reply_that_is_not_http_is_a_protocol_error() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        await writer.drain()

    async with _client_of(garbage) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get("/")


async def test_each_timeout_raises_httpx_own_exception() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(3600)

    server, url = await _raw_server(silent)
    try:
        async with httpx.AsyncClient(transport=H11Transport(), base_url=url) as client:
            with pytest.raises(httpx.ReadTimeout):
                await client.get("/", timeout=httpx.Timeout(5, read=0.2))
        # A TLS handshake the server never answers counts against the connect timeout.
        https = url.replace("http://", "https://")
        async with httpx.AsyncClient(transport=H11Transport(), base_url=https) as client:
            with pytest.raises(httpx.ConnectTimeout):
                await client.get("/", timeout=httpx.Timeout(5, connect=0.2))
    finally:
        server.close()


async def test_a_server_that_closes_during_the_tls_handshake_is_a_connect_error() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)  # the ClientHello's first byte
        writer.close()

    async with _client_of(hang_up, scheme="https") as client:
        with pytest.raises(httpx.ConnectError):
            await client.get("/", timeout=5)


async def test_refused_connection_is_a_connect_error() -> None:
    server, url = await _raw_server(lambda r, w: asyncio.sleep(0))
    server.close()
    await server.wait_closed()
    async with httpx.AsyncClient(transport=H11Transport(), base_url=url) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get("/")


async def test_a_full_pool_waits_then_times_out_and_a_cancelled_stream_frees_its_slot(app_url: str) -> None:
    transport = H11Transport(max_connections=1)
    async with httpx.AsyncClient(transport=transport, base_url=app_url) as client:

        async def hold_stream() -> None:
            async with client.stream("GET", "/stream", timeout=httpx.Timeout(5, read=None)) as response:
                async for _ in response.aiter_lines():
                    pass

        holder = asyncio.create_task(hold_stream())
        await asyncio.sleep(0.3)
        with pytest.raises(httpx.PoolTimeout):
            await client.get("/echo", timeout=httpx.Timeout(5, pool=0.2))
        holder.cancel()
        with pytest.raises(asyncio.CancelledError):
            await holder
        assert (await client.get("/echo", timeout=httpx.Timeout(5, pool=1))).status_code == 200
    # The cancelled stream's connection was closed (its state unknown), not reused.
    assert transport.connections_opened == 2


async def test_an_idle_connection_is_closed_when_it_expires_without_another_request() -> None:
    closed = asyncio.Event()

    async def one_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(_ok())
        await writer.drain()
        if await reader.read() == b"":  # the client closed its kept connection
            closed.set()

    transport = H11Transport(idle_expiry=0.05)
    async with _client_of(one_answer, transport) as client:
        await client.get("/")
        await asyncio.wait_for(closed.wait(), timeout=10)  # no further request needed
        await client.get("/")
    assert transport.connections_opened == 2


def _tls_contexts(tmp: Path) -> tuple[ssl.SSLContext, ssl.SSLContext, ssl.SSLContext]:
    """(the server's, a client's trusting it, a client's trusting another authority)."""
    cert, key = self_signed_certificate()
    (tmp / "tls.crt").write_bytes(cert)
    (tmp / "tls.key").write_bytes(key)
    serving = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    serving.load_cert_chain(tmp / "tls.crt", tmp / "tls.key")
    trusted = ssl.create_default_context(cadata=cert.decode())
    other = ssl.create_default_context(cadata=_with_openssl()[0].decode())
    return serving, trusted, other


async def test_tls_is_verified_against_the_given_authority(tmp_path: Path) -> None:
    serving, trusted, other = _tls_contexts(tmp_path)

    async def ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(_ok())
        await writer.drain()

    server = await asyncio.start_server(ok, "127.0.0.1", 0, ssl=serving)
    url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with httpx.AsyncClient(transport=H11Transport(trusted), base_url=url) as client:
            assert (await client.get("/")).text == "ok"
        async with httpx.AsyncClient(transport=H11Transport(other), base_url=url) as client:
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await client.get("/")
    finally:
        server.close()


async def test_an_eviction_never_sent_is_not_a_refusal_the_deadline_action_deletes(tmp_path: Path) -> None:
    """A full connection queue (PoolTimeout) or no connection means the API server was never asked: at the
    deadline, --deadline-action delete deletes only pods whose eviction it refused, never the unasked."""
    api = FakeApiServer(termination_scale=0.02)
    await api.start()
    try:
        api.create(node_obj("n1"))
        for i in range(4):
            api.create(pod_obj(f"web-{i}", "n1"))
        kubeconfig = agent_kubeconfig(api, tmp_path / "kc", "n1")
        api.load_manifests([DEPLOY / "optional" / "agent-deadline-delete.yaml"])
        # One connection for the drain's pod watch, one for everything else; each eviction held 1.5 s
        # against a 1 s pool timeout: most evictions wait in the client's queue and are never sent.
        api.inject_fault("POST", r"/eviction$", 0, times=100, delay=1.5)
        client = make_client(kubeconfig, timeout=1.0, lean=True, connections=2)
        options = DrainOptions(deadline_action="delete", safety_margin=2.0)
        deadline = datetime.now(UTC) + timedelta(seconds=5)
        result = await drain_node(client, "n1", options, deadline, log=structlog.get_logger())
    finally:
        await api.stop()
    asked = {r.path.split("/")[-2] for r in api.requests if r.method == "POST" and r.path.endswith("/eviction")}
    deleted = {r.path.split("/")[-1] for r in api.requests if r.method == "DELETE" and "/pods/" in r.path}
    assert asked != {f"web-{i}" for i in range(4)}, "every eviction was sent: the test proves nothing"
    assert deleted <= asked, f"deleted {sorted(deleted - asked)} without ever asking to evict them"
    assert result.outcome in ("complete", "incomplete")


def _keepalive_timers(server_port: int) -> list[str]:
    """The kernel's timer ('02' = keepalive) on each established client connection to server_port."""
    timers = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, remote, state, timer = fields[1], fields[2], fields[3], fields[5]
            if state == "01" and int(remote.rsplit(":", 1)[1], 16) == server_port and local != remote:
                timers.append(timer.split(":")[0])
    return timers


@pytest.mark.parametrize("lean", [True, False], ids=["agent", "controller"])
async def test_connections_to_the_api_server_probe_with_tcp_keepalive(tmp_path: Path, lean: bool) -> None:
    """A quiet watch sends nothing for hours: without keepalive probes, a peer gone without a reset (or a
    load balancer dropping idle flows) would leave it waiting for ever."""
    api = FakeApiServer(termination_scale=0.02)
    await api.start()
    try:
        api.create(node_obj("n1"))
        client = make_client(agent_kubeconfig(api, tmp_path / "kc", "n1"), lean=lean)
        await client.get(Node, "n1")  # the connection stays open, idle, in the pool
        timers = _keepalive_timers(api.port)
        await client.close()
    finally:
        await api.stop()
    assert timers and set(timers) == {"02"}, timers


@pytest.mark.parametrize("lean", [True, False], ids=["agent", "controller"])
async def test_an_in_cluster_client_follows_its_rotated_service_account_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lean: bool
) -> None:
    """The kubelet rewrites a projected token before it expires; the old one then stops working."""
    api = FakeApiServer(termination_scale=0.02)
    await api.start()
    try:
        api.create(node_obj("n1"))
        agent_kubeconfig(api, tmp_path / "kc", "n1")  # deploy/'s RBAC
        account = tmp_path / "serviceaccount"
        account.mkdir()
        first = api.service_account_token("spotd", "spotd-agent", node_name="n1")
        (account / "token").write_text(first)
        (account / "namespace").write_text("spotd")
        (account / "ca.crt").write_bytes(self_signed_certificate()[0])
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(api.port))
        client = make_client(None, lean=lean, service_account=str(account))
        assert (await client.get(Node, "n1")).metadata.name == "n1"
        (account / "token").write_text(api.service_account_token("spotd", "spotd-agent", node_name="n1"))
        api.authenticator.remove(first)  # the rotated-out token expires
        assert (await client.get(Node, "n1")).metadata.name == "n1"
        await client.close()
    finally:
        await api.stop()


_PROBE = """
import asyncio, sys
from lightkube.resources.core_v1 import Node
from spotd.kube.client import make_client

async def main():
    client = make_client(sys.argv[1], lean=True)
    node = await client.get(Node, sys.argv[2])
    async for event, obj in client.watch(Node, fields={"metadata.name": sys.argv[2]}):
        break
    print(node.metadata.name, event, sorted(m for m in ("httpcore", "anyio") if m in sys.modules))

asyncio.run(main())
"""


async def test_the_agents_client_never_loads_httpcore_or_anyio(tmp_path: Path) -> None:
    """The point of the transport: the agent's lightkube client (make_client(lean=True)) reads, watches and
    is answered over TLS as the agent's ServiceAccount, and httpx's own transport is never loaded."""
    api = FakeApiServer(termination_scale=0.02)
    await api.start()
    try:
        api.create(node_obj("n1"))
        kubeconfig = agent_kubeconfig(api, tmp_path / "kc", "n1")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _PROBE, kubeconfig, "n1", stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    finally:
        await api.stop()
    assert proc.returncode == 0, err.decode()
    assert out.decode().split() == ["n1", "ADDED", "[]"]
