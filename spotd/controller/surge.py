"""Make-before-break, the I/O: create a fallback node's placeholders, follow them until they all run on Spot
(or the surge fails), delete them in every outcome; after the drain, follow where the replacements landed;
at the start of a term, delete the placeholders a previous leader left.

The decisions are pure (placeholders.py, landing.py); this module talks to the API server through the raw
JSON API on the lightkube client's connection (kube.client.http_of), polling by label selector: a surge
has a handful of pods and lasts minutes, a poll every few seconds is cheaper than a watch to keep alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import httpx
from lightkube import AsyncClient

from spotd.common.metrics import LOOP_ERRORS
from spotd.controller.autoscaler_view import (
    AUTOSCALER_NAMESPACE,
    PRIORITY_EXPANDER_CONFIGMAP,
    STATUS_CONFIGMAP,
    AutoscalerVerdict,
    PrioritiesFormatError,
    StatusFormatError,
    groups_in_backoff,
    parse_priorities,
    parse_status,
    spot_ranks_above_fallback,
    surge_allowed,
)
from spotd.controller.landing import Follow, Landing, PodSeen, landing_verdict, pod_seen, replacements, what_to_follow
from spotd.controller.metrics import AUTOSCALER_SPOT_FIRST, DRAIN_LANDINGS, SURGES
from spotd.controller.placeholders import (
    PAUSE_IMAGE,
    PLACEHOLDER_PRIORITY_CLASS,
    PlaceholderState,
    SurgeState,
    node_label_value,
    nodes_of,
    placeholder_pods,
    placeholder_state,
    pods_to_surge,
    pv_zones,
    surge_verdict,
)
from spotd.drain.plan import PodPolicy
from spotd.kube.client import http_of
from spotd.kube.keys import PLACEHOLDER_FOR_LABEL, PLACEHOLDER_NODE_ANNOTATION, capacity_type_from_labels

Obj = dict[str, Any]
CapacityOf = Callable[[str], str | None]


class EventSink(Protocol):
    def record(self, node: str, reason: str, message: str, type: str = "Normal", node_uid: str = "") -> None: ...


@dataclass(frozen=True)
class SurgeOutcome:
    """ready: every placeholder ran on Spot (the drain may go ahead); else reason says why not.
    nodes: Spot node -> the placeholders it ran (where the evicted pods should find room)."""

    ready: bool
    reason: str
    nodes: Mapping[str, Sequence[str]] = field(default_factory=dict)
    placeholders: int = 0
    seconds: float = 0.0


class _Capacities:
    """Capacity type by node name: from `given` (the controller's inventory) when it knows, else the Node's
    labels read once (an answer is cached for the call: a node's capacity type never changes)."""

    def __init__(self, http: httpx.AsyncClient, capacity_label: str, given: CapacityOf | None) -> None:
        self.http, self.label, self.given = http, capacity_label, given
        self.known: dict[str, str | None] = {}

    async def of(self, nodes: Iterable[str]) -> dict[str, str | None]:
        for node in set(nodes) - {""}:
            if self.known.get(node) is not None:
                continue
            found = self.given(node) if self.given else None
            if found is None:
                resp = await self.http.get(f"/api/v1/nodes/{node}")
                if resp.status_code == 200:
                    labels = (resp.json().get("metadata") or {}).get("labels") or {}
                    found = capacity_type_from_labels(labels, self.label)
            self.known[node] = found
        return dict(self.known)


async def _list(http: httpx.AsyncClient, namespace: str, selector: str) -> list[Obj]:
    resp = await http.get(f"/api/v1/namespaces/{namespace}/pods", params={"labelSelector": selector})
    resp.raise_for_status()
    return list(resp.json().get("items") or [])


async def _delete(http: httpx.AsyncClient, namespace: str, names: Iterable[str], log: Any) -> list[str]:
    """Delete each pod (their own grace, 1 s); 404 is done. Returns the names whose deletion failed."""
    failed = []
    for name in names:
        for attempt in range(4):
            try:
                resp = await http.delete(f"/api/v1/namespaces/{namespace}/pods/{name}")
                if resp.status_code < 300 or resp.status_code == 404:
                    break
                log.warning("placeholder_delete_retry", placeholder=name, status=resp.status_code, attempt=attempt)
            except httpx.HTTPError as exc:
                log.warning("placeholder_delete_retry", placeholder=name, error=repr(exc), attempt=attempt)
            await asyncio.sleep(0.2 * 2**attempt)
        else:
            failed.append(name)
    return failed


async def _remove(http: httpx.AsyncClient, namespace: str, node: str, created: Iterable[str], log: Any) -> None:
    """Every placeholder of this node's surge: those we know we created, and any whose create answer we
    lost (found by label). Failures are left to cleanup_stale_placeholders at the next term or surge."""
    names = set(created)
    with contextlib.suppress(httpx.HTTPError):
        names |= {
            p["metadata"]["name"]
            for p in await _list(http, namespace, f"{PLACEHOLDER_FOR_LABEL}={node_label_value(node)}")
            if (p["metadata"].get("annotations") or {}).get(PLACEHOLDER_NODE_ANNOTATION, node) == node
        }
    failed = await _delete(http, namespace, sorted(names), log)
    if failed:
        LOOP_ERRORS.labels("placeholder_delete").inc()
        log.error("placeholder_delete_failed", placeholders=failed)
    else:
        log.info("placeholders_deleted", count=len(names))


async def zones_of_claims(
    client: AsyncClient, pods: Sequence[Obj], policy: PodPolicy | None = None
) -> dict[tuple[str, str], list[str]]:
    """(namespace, claimName) -> the zones of its bound PV, for the claims of the pods a drain would evict
    (the zone_of_claim argument of surge). A claim not bound, or not readable, is left out: no constraint."""
    http = http_of(client)
    out: dict[tuple[str, str], list[str]] = {}
    for pod in pods_to_surge(pods, policy):
        namespace = (pod.get("metadata") or {}).get("namespace", "")
        for volume in (pod.get("spec") or {}).get("volumes") or []:
            claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
            if not claim or (namespace, claim) in out:
                continue
            resp = await http.get(f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{claim}")
            volume_name = (resp.json().get("spec") or {}).get("volumeName") if resp.status_code == 200 else None
            if not volume_name:
                continue
            resp = await http.get(f"/api/v1/persistentvolumes/{volume_name}")
            if resp.status_code == 200 and (zones := pv_zones(resp.json())):
                out[(namespace, claim)] = zones
    return out


async def surge(
    client: AsyncClient,
    node_name: str,
    pods: Sequence[Obj],
    *,
    namespace: str,
    capacity_label: str,
    spot_values: Sequence[str],
    timeout: float,
    log: Any,
    events: EventSink | None = None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    priority_class: str = PLACEHOLDER_PRIORITY_CLASS,
    zone_of_claim: Mapping[tuple[str, str], Collection[str]] | None = None,
    policy: PodPolicy | None = None,
    capacity_of: CapacityOf | None = None,
    image: str = PAUSE_IMAGE,
    poll: float = 5.0,
    decided: Callable[[SurgeOutcome], None] | None = None,
) -> SurgeOutcome:
    """Warm Spot capacity for the evictable pods of `node_name` (`pods`: the node's pods, raw JSON).

    Creates one placeholder per pod a drain would evict (placeholders.placeholder_pods), polls them every
    `poll` seconds until surge_verdict says ready or failed (`timeout` seconds at most), and deletes them
    in every outcome, cancellation included. The node itself is never touched. An Event on the node says
    how the surge ended; `decided(outcome)` is called first, so that whoever reads that Event, or sees the
    placeholders gone, finds the outcome already booked."""
    http = http_of(client)
    log = log.bind(node=node_name)
    manifests = placeholder_pods(
        node_name,
        pods,
        namespace=namespace,
        capacity_label=capacity_label,
        spot_values=spot_values,
        priority_class=priority_class,
        zone_of_claim=zone_of_claim,
        image=image,
        policy=policy,
    )
    if not manifests:
        outcome = SurgeOutcome(True, "no pod to make room for")
        if decided is not None:
            decided(outcome)
        return outcome
    started, t0 = clock(), time.monotonic()
    created: list[str] = []
    capacities = _Capacities(http, capacity_label, capacity_of)
    states: list[PlaceholderState] = []
    try:
        for manifest in manifests:
            resp = await http.post(f"/api/v1/namespaces/{namespace}/pods", json=manifest)
            if resp.status_code >= 300:
                reason = f"placeholder create refused ({resp.status_code}): {_message(resp)}"
                outcome = SurgeOutcome(False, reason, placeholders=len(manifests))
                return _ended(outcome, node_name, log, events, t0, decided)
            created.append(resp.json()["metadata"]["name"])
        log.info("surge_started", placeholders=len(created), timeout=timeout)
        selector = f"{PLACEHOLDER_FOR_LABEL}={node_label_value(node_name)}"
        while True:
            try:
                listed = {p["metadata"]["name"]: p for p in await _list(http, namespace, selector)}
                nodes = [(p.get("spec") or {}).get("nodeName") or "" for p in listed.values()]
                capacity = await capacities.of(nodes)
                states = [
                    placeholder_state(listed[name], capacity) if name in listed else PlaceholderState(name, gone=True)
                    for name in created
                ]
            except httpx.HTTPError as exc:  # a failed poll is no verdict: the timeout still bounds the wait
                log.warning("surge_poll_failed", error=repr(exc))
            # elapsed time from the monotonic clock: a wall clock that jumps neither ends nor prolongs a surge
            now = started + timedelta(seconds=time.monotonic() - t0)
            verdict = surge_verdict(states or [PlaceholderState(n) for n in created], now, started, timeout)
            if verdict.state != SurgeState.WAITING:
                break
            await asyncio.sleep(poll)
        outcome = SurgeOutcome(
            verdict.state == SurgeState.READY, verdict.reason, nodes_of(states), len(created), time.monotonic() - t0
        )
        return _ended(outcome, node_name, log, events, t0, decided)
    finally:
        if created:
            cleanup = asyncio.ensure_future(_remove(http, namespace, node_name, created, log))
            # shielded: a cancellation (leadership lost, SIGTERM) must not stop the deletion half-way
            with contextlib.suppress(Exception):
                async with asyncio.timeout(15):
                    await asyncio.shield(cleanup)


def _message(resp: httpx.Response) -> str:
    try:
        return str(resp.json().get("message", ""))[:300]
    except ValueError:
        return resp.text[:300]


def _ended(
    outcome: SurgeOutcome,
    node: str,
    log: Any,
    events: EventSink | None,
    t0: float,
    decided: Callable[[SurgeOutcome], None] | None,
) -> SurgeOutcome:
    if decided is not None:  # booked before anything announces it (the Event, the placeholders' deletion)
        decided(outcome)
    seconds = time.monotonic() - t0
    SURGES.labels("ready" if outcome.ready else "failed").inc()
    if outcome.ready:
        log.info("surge_ready", reason=outcome.reason, nodes=dict(outcome.nodes), seconds=round(seconds, 1))
        if events is not None:
            events.record(node, "SpotdSurgeReady", f"Spot capacity warmed: {outcome.reason}"[:1000])
    else:
        log.warning("surge_failed", reason=outcome.reason, seconds=round(seconds, 1))
        if events is not None:
            message = f"Spot capacity not found, node left as it is: {outcome.reason}"
            events.record(node, "SpotdSurgeFailed", message[:1000], type="Warning")
    return outcome


# ---- cluster-autoscaler's ConfigMaps ----------------------------------------------------------------------------


@dataclass(frozen=True)
class AutoscalerConfigMaps:
    """The text of cluster-autoscaler's two ConfigMaps (autoscaler_view parses them); None: not there."""

    priorities: str | None
    status: str | None


async def read_autoscaler_configmaps(
    client: AsyncClient, namespace: str = AUTOSCALER_NAMESPACE
) -> AutoscalerConfigMaps:
    """GET both ConfigMaps by name (404: None). Any other error raises httpx.HTTPStatusError: the caller
    fails closed (no surge into a group whose back-off it could not read)."""
    http = http_of(client)
    found: list[str | None] = []
    for name, key in ((PRIORITY_EXPANDER_CONFIGMAP, "priorities"), (STATUS_CONFIGMAP, "status")):
        resp = await http.get(f"/api/v1/namespaces/{namespace}/configmaps/{name}")
        if resp.status_code == 404:
            found.append(None)
            continue
        resp.raise_for_status()
        found.append(str((resp.json().get("data") or {}).get(key, "")))
    return AutoscalerConfigMaps(found[0], found[1])


async def backoff_gate(
    client: AsyncClient, spot_groups: Iterable[str], now: datetime, log: Any, stale_after: float = 600.0
) -> AutoscalerVerdict:
    """May a surge go ahead, as far as cluster-autoscaler's back-offs tell? No status ConfigMap (not
    cluster-autoscaler, or it writes none): yes. Unreadable, unknown format, no time, stale: no (fail
    closed). Every Spot group that fits in back-off: no."""
    try:
        status_text = (await read_autoscaler_configmaps(client)).status
    except httpx.HTTPError as exc:
        return AutoscalerVerdict(False, f"{STATUS_CONFIGMAP} unreadable: {exc!r}")
    if status_text is None:
        return AutoscalerVerdict(True, f"no {STATUS_CONFIGMAP}: back-offs not checked")
    try:
        backoffs = groups_in_backoff(parse_status(status_text), now, stale_after)
    except StatusFormatError as exc:
        log.warning("autoscaler_status_unreadable", reason=str(exc))
        return AutoscalerVerdict(False, f"{STATUS_CONFIGMAP}: {exc}")
    return surge_allowed(backoffs, spot_groups)


async def check_priorities(
    client: AsyncClient, spot_groups: Iterable[str], fallback_groups: Iterable[str], log: Any
) -> AutoscalerVerdict | None:
    """Does cluster-autoscaler's priority expander rank a Spot group above the fallback groups? Sets
    spotd_autoscaler_spot_ranked_first and logs a warning when not; None when there is no such ConfigMap
    (another expander: nothing to check). Call at start-up and when the groups change."""
    try:
        text = (await read_autoscaler_configmaps(client)).priorities
    except httpx.HTTPError as exc:
        AUTOSCALER_SPOT_FIRST.set(-1)
        log.warning("autoscaler_priorities", ok=False, reason=f"unreadable: {exc!r}")
        return None
    if text is None:
        AUTOSCALER_SPOT_FIRST.set(-1)
        return None
    try:
        verdict = spot_ranks_above_fallback(parse_priorities(text), spot_groups, fallback_groups)
    except PrioritiesFormatError as exc:
        AUTOSCALER_SPOT_FIRST.set(-1)
        log.warning("autoscaler_priorities", ok=False, reason=str(exc))
        return AutoscalerVerdict(False, str(exc))
    AUTOSCALER_SPOT_FIRST.set(1 if verdict.ok else 0)
    (log.info if verdict.ok else log.warning)("autoscaler_priorities", ok=verdict.ok, reason=verdict.reason)
    return verdict


# ---- restarts --------------------------------------------------------------------------------------------------


async def cleanup_stale_placeholders(
    client: AsyncClient, namespace: str, log: Any, surging: Collection[str] = ()
) -> list[str]:
    """Delete every placeholder in `namespace` whose node is not in `surging` (a previous leader's, or one a
    failed deletion left); returns their names. The controller calls it when a term starts (surging empty)."""
    http = http_of(client)
    stale = [
        p["metadata"]["name"]
        for p in await _list(http, namespace, PLACEHOLDER_FOR_LABEL)
        if (p["metadata"].get("annotations") or {}).get(PLACEHOLDER_NODE_ANNOTATION) not in surging
    ]
    if stale:
        log.warning("stale_placeholders", placeholders=stale)
        failed = await _delete(http, namespace, stale, log)
        if failed:
            LOOP_ERRORS.labels("placeholder_delete").inc()
            log.error("placeholder_delete_failed", placeholders=failed)
    return stale


# ---- where the replacements landed -----------------------------------------------------------------------------

PodsNow = Callable[[Collection[str]], Awaitable[Iterable[PodSeen]]]


def api_pods(client: AsyncClient) -> PodsNow:
    """The pods of some namespaces, from the API (one list per namespace); the controller may pass its
    inventory's view instead."""
    http = http_of(client)

    async def pods_now(namespaces: Collection[str]) -> list[PodSeen]:
        out: list[PodSeen] = []
        for namespace in sorted(namespaces):
            resp = await http.get(f"/api/v1/namespaces/{namespace}/pods")
            resp.raise_for_status()
            out.extend(p for p in (pod_seen(pod) for pod in resp.json().get("items") or []) if p is not None)
        return out

    return pods_now


async def follow_before_drain(pods_now: PodsNow, node: str, evicted: Sequence[Obj]) -> Follow:
    """Call before the drain: what to follow afterwards (the owners, the pods already there)."""
    namespaces = {str((p.get("metadata") or {}).get("namespace", "")) for p in evicted}
    return what_to_follow(node, evicted, await pods_now(namespaces))


async def replacements_landed(
    client: AsyncClient,
    follow: Follow,
    *,
    capacity_label: str,
    timeout: float,
    log: Any,
    pods_now: PodsNow | None = None,
    capacity_of: CapacityOf | None = None,
    poll: float = 5.0,
) -> Landing:
    """After a drain: follow the new pods of the evicted pods' owners until `follow.expected` of them run
    (or one runs on on-demand capacity, or `timeout` seconds pass). The Landing says whether they returned
    to Spot, whether the pool is short, and where each runs."""
    pods_now = pods_now or api_pods(client)
    capacities = _Capacities(http_of(client), capacity_label, capacity_of)
    namespaces = {owner[0] for owner in follow.owners}
    end = time.monotonic() + timeout
    found: list[PodSeen] = []
    while True:
        timed_out = time.monotonic() >= end
        try:
            found = replacements(await pods_now(namespaces), follow.owners, follow.before, follow.node)
            capacity = await capacities.of(p.node for p in found if p.running)
        except httpx.HTTPError as exc:
            log.warning("landing_poll_failed", error=repr(exc))
            capacity = dict(capacities.known)
        verdict = landing_verdict(found, capacity, follow.expected, timed_out)
        if verdict is not None:
            DRAIN_LANDINGS.labels("returned" if verdict.returned else "short" if verdict.short else "unknown").inc()
            log.info(
                "replacements_landed",
                node=follow.node,
                returned=verdict.returned,
                short=verdict.short,
                reason=verdict.reason,
            )
            return verdict
        await asyncio.sleep(min(poll, max(0.0, end - time.monotonic())) or poll / 10)
