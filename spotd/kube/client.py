"""The lightkube client (kubeconfig file, else in-cluster credentials) and the httpx client behind it."""

from __future__ import annotations

import httpx
import yaml
from lightkube import AsyncClient, KubeConfig
from lightkube.core.exceptions import ConfigError

FIELD_MANAGER = "spotd"


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


def make_client(kubeconfig: str | None, timeout: float = 10.0) -> AsyncClient:
    """One AsyncClient per process; lightkube keeps a connection pool behind it (watches lift the read timeout)."""
    config = load_config(kubeconfig)
    for cluster in config.clusters.values():
        if cluster.server.startswith("http://"):
            # Plain HTTP (kubectl proxy, the fake API server): no TLS, so lightkube need not load a CA
            # bundle into memory (certifi's, 2.5 MB resident) for a context it never uses.
            cluster.insecure = True
    return AsyncClient(
        config=config,
        field_manager=FIELD_MANAGER,
        timeout=httpx.Timeout(timeout),
        trust_env=False,
    )


def http_of(client: AsyncClient) -> httpx.AsyncClient:
    """The httpx client (base URL, TLS and auth from the kubeconfig) behind a lightkube AsyncClient."""
    # The raw JSON API, on the same connection: the inventory decodes slim records (lightkube models for
    # 150,000 pods would cost hundreds of MB) and the lease and node patches need no model. lightkube keeps
    # no public handle on it, hence the private attribute.
    http = client._client._client
    assert isinstance(http, httpx.AsyncClient)
    return http
