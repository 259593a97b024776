"""`spotd status`: per node, what spotd is doing to it and, for every on-demand node, why it is still here.

Reads only what the cluster holds, read-only (deploy/status-rbac.yaml): the Nodes, spotd's Events on them,
the controller's Lease, and the leader's GET /status at --controller-url (reach it with `kubectl
port-forward -n spotd pod/<the Lease's holder> 9102`; docs/controller.md says why not the API server's
service proxy). Without that URL, or when the answer is not the leader's, it answers from the Nodes and
Events and says the controller's view is unavailable. The words are chosen in spotd.status.explain (pure).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from spotd.status.explain import build_report, render

OUTPUTS = ("table", "json", "yaml")


@dataclass(frozen=True)
class StatusConfig:
    kubeconfig: str | None
    controller_url: str
    output: str = "table"
    lease_namespace: str = "spotd"
    lease_name: str = "spotd-controller"
    capacity_type_label: str | None = None
    timeout: float = 10.0
    log_level: str = "info"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from spotd.cli.flags import positive_duration

    p.add_argument("--kubeconfig", help="default: $KUBECONFIG, else ~/.kube/config, else in-cluster credentials")
    p.add_argument(
        "--controller-url",
        default="",
        help="the controller's --listen address, e.g. http://127.0.0.1:9102 after `kubectl port-forward -n spotd "
        "pod/<lease holder> 9102`; without it the controller's view is unavailable",
    )
    p.add_argument("-o", "--output", choices=OUTPUTS, default="table", help="table (default), json or yaml")
    p.add_argument("--lease-namespace", default="spotd", help="namespace of the controller's Lease (spotd)")
    p.add_argument("--lease-name", default="spotd-controller", help="name of the controller's Lease")
    p.add_argument("--capacity-type-label", help="as given to the controller (a cluster-specific label)")
    p.add_argument("--timeout", type=positive_duration, default=10.0, help="per request (10s)")


def _default_kubeconfig() -> str | None:
    env = os.environ.get("KUBECONFIG", "")
    first = next((p for p in env.split(os.pathsep) if p), "")
    if first:
        return first
    home = Path.home() / ".kube" / "config"
    return str(home) if home.is_file() else None


def config_from_args(args: argparse.Namespace) -> StatusConfig:
    url = str(args.controller_url or "").rstrip("/")
    if url and not url.startswith(("http://", "https://")):
        raise ValueError(f"--controller-url: {url!r} is not an http:// or https:// URL")
    return StatusConfig(
        kubeconfig=args.kubeconfig or _default_kubeconfig(),
        controller_url=url,
        output=str(args.output),
        lease_namespace=str(args.lease_namespace),
        lease_name=str(args.lease_name),
        capacity_type_label=args.capacity_type_label or None,
        timeout=float(args.timeout),
        log_level=str(args.log_level),
    )


async def _list(http: httpx.AsyncClient, path: str, params: dict[str, str]) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cont = ""
    while True:
        resp = await http.get(path, params={**params, "limit": "500", **({"continue": cont} if cont else {})})
        resp.raise_for_status()
        body = resp.json()
        items.extend(body.get("items") or ())
        cont = (body.get("metadata") or {}).get("continue") or ""
        if not cont:
            return items


def _refusal(exc: Exception) -> str:
    if isinstance(exc, httpx.HTTPStatusError):
        return f"{exc.response.status_code} {exc.response.reason_phrase}"
    return " ".join(str(exc).split()) or type(exc).__name__


async def read_controller(url: str, timeout: float) -> tuple[Any, str]:
    """(the document, "") or (None, why not). Fail closed: any error is a reason, never an exception."""
    if not url:
        return None, "no --controller-url given"
    try:
        async with httpx.AsyncClient(timeout=timeout, trust_env=False) as http:
            resp = await http.get(f"{url}/status")
            resp.raise_for_status()
            return resp.json(), ""
    except (httpx.HTTPError, ValueError) as exc:
        return None, f"GET {url}/status: {_refusal(exc)}"


async def run(config: StatusConfig) -> int:
    """Exit 0 with the answer; 1 when the Nodes cannot be read (nothing to answer from)."""
    from spotd.kube.client import KubeConfigError, http_of, make_client

    try:
        client = make_client(config.kubeconfig, timeout=config.timeout)
    except KubeConfigError as exc:
        print(f"spotd status: error: {exc}", file=sys.stderr)
        return 2
    http = http_of(client)
    notes: list[str] = []
    try:
        try:
            nodes = await _list(http, "/api/v1/nodes", {})
        except httpx.HTTPError as exc:
            print(f"spotd status: error: cannot list nodes: {_refusal(exc)}", file=sys.stderr)
            return 1
        try:  # spotd records its Events on Nodes in namespace default (spotd.kube.events)
            node_events = {"fieldSelector": "involvedObject.kind=Node"}
            events = await _list(http, "/api/v1/namespaces/default/events", node_events)
        except httpx.HTTPError as exc:
            events = []
            notes.append(f"events unread ({_refusal(exc)}): back-offs are explained without the last drain's Event")
        # /status first, the Lease after: a renewal after the answer's pass can only confirm its leadership
        document, error = await read_controller(config.controller_url, config.timeout)
        lease: dict[str, Any] | None = None
        try:
            path = f"/apis/coordination.k8s.io/v1/namespaces/{config.lease_namespace}/leases/{config.lease_name}"
            resp = await http.get(path)
            if resp.status_code != 404:
                resp.raise_for_status()
                lease = resp.json()
        except httpx.HTTPError as exc:
            notes.append(f"lease unread ({_refusal(exc)}): the controller's answer cannot be checked against it")
        if lease is None and not error and not notes:
            notes.append("no Lease found: the controller's answer is taken as it is")
    finally:
        await client.close()
    report = build_report(
        nodes, events, lease, document, error, datetime.now(UTC), config.capacity_type_label, notes=notes
    )
    sys.stdout.write(render(report, config.output))
    return 0
