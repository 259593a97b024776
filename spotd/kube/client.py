"""The lightkube client (kubeconfig file, else in-cluster credentials) and the httpx client behind it."""

from __future__ import annotations

import time
import weakref
from collections.abc import Generator
from pathlib import Path

import httpx
import yaml
from lightkube import AsyncClient, KubeConfig
from lightkube.config.client_adapter import verify_cluster
from lightkube.core.exceptions import ConfigError

from spotd.common.transport import TCP_KEEPALIVE, H11Transport

FIELD_MANAGER = "spotd"
SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
AGENT_CONNECTIONS = 100  # at most, to the API server from one agent (make_client(lean=True)): httpx's own limit
WATCH_TIMEOUT = 300.0  # seconds: a watch's timeoutSeconds (client-go's reflectors ask for 5 to 10 minutes)

_watch_timeouts: weakref.WeakKeyDictionary[AsyncClient, int] = weakref.WeakKeyDictionary()


class KubeConfigError(ValueError):
    """No usable credentials; a start-up error naming the file."""


class TokenFileAuth(httpx.Auth):
    """The ServiceAccount token from its file, read again every minute and after a 401, as client-go does.

    The kubelet rotates a projected token (an hour's validity by default, refreshed at 80 %); lightkube reads
    it once at start, and an agent or controller that lives past the token's (extended) expiry would be
    refused everything from then on. A request refused with 401 is sent once more with the file's token:
    authentication failed before the request did anything. An unreadable file keeps the last token.
    """

    def __init__(self, path: Path, reread_after: float = 60.0) -> None:
        self._path = path
        self._reread_after = reread_after
        self._token = ""
        self._read_at = float("-inf")

    def _current(self, fresh: bool = False) -> str:
        if fresh or time.monotonic() - self._read_at >= self._reread_after:
            try:
                self._token = self._path.read_text().strip() or self._token
            except OSError:
                pass  # the last token, until the file is back
            self._read_at = time.monotonic()
        return self._token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self._current()}"
        response = yield request
        if response.status_code == 401:
            request.headers["Authorization"] = f"Bearer {self._current(fresh=True)}"
            yield request


def load_config(kubeconfig: str | None, service_account: str = SERVICE_ACCOUNT) -> KubeConfig:
    try:
        if kubeconfig:
            return KubeConfig.from_file(kubeconfig)
        return KubeConfig.from_service_account(service_account)
    except (ConfigError, OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as exc:
        where = kubeconfig or "in-cluster service account"
        reason = " ".join(str(exc).split())  # one line, whatever the YAML parser said
        raise KubeConfigError(f"cannot load Kubernetes credentials from {where}: {reason}") from None


def make_client(
    kubeconfig: str | None,
    timeout: float = 10.0,
    *,
    lean: bool = False,
    connections: int = AGENT_CONNECTIONS,
    service_account: str = SERVICE_ACCOUNT,
    watch_timeout: float | None = None,
) -> AsyncClient:
    """One AsyncClient per process; lightkube keeps a connection pool behind it (watches lift the read timeout).

    ``lean`` (the agent, on every node): HTTP over spotd.common.transport instead of httpx's own transport,
    which would load httpcore and anyio (about 3 MB resident), with at most ``connections`` at once. The
    controller, one pod, keeps httpx's. Without a kubeconfig: the in-cluster ServiceAccount in
    ``service_account``, its token read again as the kubelet rotates it (TokenFileAuth).

    ``watch_timeout``: the server ends each watch after that many seconds (spotd's watches ask for it,
    see watch_timeout_of), and a watch that sends nothing for a little longer is dead on the client side.
    None: lightkube's default, watches without a read timeout.
    """
    config = load_config(kubeconfig, service_account)
    for cluster in config.clusters.values():
        if cluster.server.startswith("http://"):
            # Plain HTTP (kubectl proxy, the fake API server): no TLS, so lightkube need not load a CA
            # bundle into memory (certifi's, 2.5 MB resident) for a context it never uses.
            cluster.insecure = True
    try:
        single = config.get()
    except ConfigError as exc:
        raise KubeConfigError(f"cannot load Kubernetes credentials from {kubeconfig}: {exc}") from None
    assert single is not None  # get() raises rather than return None when no default is given
    # The same TLS set-up lightkube gives httpx: the cluster's CA, client certificates if any.
    plain = single.cluster.server.startswith("http://")
    tls = None if plain else verify_cluster(single.cluster, single.user, single.abs_file, trust_env=False)
    transport: httpx.AsyncBaseTransport
    if lean:
        # The connection cap is the drain's throughput against a slow API server: at 16, a 110-pod drain with
        # 4 s evictions took 35 s and missed its deadline (PoolTimeouts), and watches could not reconnect.
        # TLS here goes through memory buffers (no asyncio 256 KiB buffer per connection): 100 cost ~4 MB of
        # peak RSS during such a drain, nothing when idle (idle connections expire after 5 s).
        transport = H11Transport(tls, max_connections=connections, max_idle=4)
    else:
        # httpx's own transport, with TCP keepalive on its sockets (quiet watches; see TCP_KEEPALIVE).
        transport = httpx.AsyncHTTPTransport(verify=tls or False, trust_env=False, socket_options=TCP_KEEPALIVE)
    client = AsyncClient(
        config=config,
        field_manager=FIELD_MANAGER,
        timeout=httpx.Timeout(timeout),
        trust_env=False,
        transport=transport,
    )
    if not kubeconfig:
        http_of(client).auth = TokenFileAuth(Path(service_account, "token"))
    if watch_timeout is not None:
        # lightkube lifts the read timeout on watches: a silent connection (a half-open one behind a proxy
        # or a load balancer, which TCP keepalive does not see) would hold a watch for ever. The server
        # closes a watch at its timeoutSeconds, so nothing for longer than that means the connection is dead:
        # the read times out, and the watch fails and starts again (spotd.kube.watch).
        seconds = max(1, round(watch_timeout))
        client._client._watch_timeout = httpx.Timeout(timeout, read=seconds + max(1.0, seconds / 10))
        _watch_timeouts[client] = seconds
    return client


def watch_timeout_of(client: AsyncClient) -> int | None:
    """The timeoutSeconds a watch on `client` asks for: the client's read timeout on watches is a little
    longer (make_client's watch_timeout); None when the client has none."""
    return _watch_timeouts.get(client)


def http_of(client: AsyncClient) -> httpx.AsyncClient:
    """The httpx client (base URL, TLS and auth from the kubeconfig) behind a lightkube AsyncClient."""
    # The raw JSON API, on the same connection: the inventory decodes slim records (lightkube models for
    # 150,000 pods would cost hundreds of MB) and the lease and node patches need no model. lightkube keeps
    # no public handle on it, hence the private attribute.
    http = client._client._client
    assert isinstance(http, httpx.AsyncClient)
    return http
