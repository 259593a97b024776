"""The lightkube client (kubeconfig file, else in-cluster credentials) and the httpx client behind it."""

from __future__ import annotations

import httpx
import yaml
from lightkube import AsyncClient, KubeConfig
from lightkube.config.client_adapter import verify_cluster
from lightkube.core.exceptions import ConfigError

from spotd.common.transport import TCP_KEEPALIVE, H11Transport

FIELD_MANAGER = "spotd"
AGENT_CONNECTIONS = 100  # at most, to the API server from one agent (make_client(lean=True)): httpx's own limit


class KubeConfigError(ValueError):
    """No usable credentials; a start-up error naming the file."""


def load_config(kubeconfig: str | None) -> KubeConfig:
    try:
        if kubeconfig:
            return KubeConfig.from_file(kubeconfig)
        return KubeConfig.from_service_account()
    except (ConfigError, OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as exc:
        where = kubeconfig or "in-cluster service account"
        reason = " ".join(str(exc).split())  # one line, whatever the YAML parser said
        raise KubeConfigError(f"cannot load Kubernetes credentials from {where}: {reason}") from None


def make_client(
    kubeconfig: str | None, timeout: float = 10.0, *, lean: bool = False, connections: int = AGENT_CONNECTIONS
) -> AsyncClient:
    """One AsyncClient per process; lightkube keeps a connection pool behind it (watches lift the read timeout).

    ``lean`` (the agent, on every node): HTTP over spotd.common.transport instead of httpx's own transport,
    which would load httpcore and anyio (about 3 MB resident), with at most ``connections`` at once. The
    controller, one pod, keeps httpx's.
    """
    config = load_config(kubeconfig)
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
    return AsyncClient(
        config=config,
        field_manager=FIELD_MANAGER,
        timeout=httpx.Timeout(timeout),
        trust_env=False,
        transport=transport,
    )


def http_of(client: AsyncClient) -> httpx.AsyncClient:
    """The httpx client (base URL, TLS and auth from the kubeconfig) behind a lightkube AsyncClient."""
    # The raw JSON API, on the same connection: the inventory decodes slim records (lightkube models for
    # 150,000 pods would cost hundreds of MB) and the lease and node patches need no model. lightkube keeps
    # no public handle on it, hence the private attribute.
    http = client._client._client
    assert isinstance(http, httpx.AsyncClient)
    return http
