"""Executing the controller's drains: cordon, drain, record the outcome, read a probe's result; restart recovery."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from spotd.alerts.model import ON_DEMAND_DRAIN_BLOCKED, AlertNode, on_demand_drain_blocked_alert
from spotd.capacity.signals import ANY, Pool
from spotd.common.metrics import LOOP_ERRORS
from spotd.common.parsing import parse_iso_time
from spotd.controller.metrics import CONTROLLER_DRAINS
from spotd.drain.executor import DrainOptions, drain_node
from spotd.drain.plan import PodPolicy as PodPolicy
from spotd.inventory.records import NodeInfo
from spotd.kube.client import http_of
from spotd.kube.keys import DRAIN_ANNOTATION, DRAINED_ANNOTATION, DRAINING_ANNOTATION, SPOT
from spotd.kube.lease import micro_time

if TYPE_CHECKING:
    from spotd.controller.main import Controller


@dataclass
class DrainJob:
    """One drain in flight: its node and pool, and what the probe needs to see where the pods land."""

    node: str
    pool: Pool
    started: datetime
    probe: bool
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    abort: str = ""  # why it was stopped: "aborted_ice"
    cordoned: bool = False  # by us, for this drain: only then is uncordoning ours to do
    owners: frozenset[tuple[str, str, str]] = frozenset()
    pods_before: frozenset[tuple[str, str]] = frozenset()


def pool_of(node: NodeInfo) -> Pool:
    """The node's pool (instance type and zone, "*" where unknown)."""
    return Pool(node.instance_type or ANY, node.zone or ANY)


async def _patch_node(ctl: Controller, name: str, patch: dict[str, Any]) -> int:
    resp = await http_of(ctl.client).patch(
        f"/api/v1/nodes/{name}", json=patch, headers={"Content-Type": "application/merge-patch+json"}
    )
    return resp.status_code


async def _cordon(ctl: Controller, name: str) -> str | None:
    """Cordon with our marker, conditional on the version read; None when done, else why not."""
    resp = await http_of(ctl.client).get(f"/api/v1/nodes/{name}")
    if resp.status_code != 200:
        return f"node read failed ({resp.status_code})"
    body = resp.json()
    meta, spec = body.get("metadata") or {}, body.get("spec") or {}
    if spec.get("unschedulable"):
        return "cordoned by someone else meanwhile"
    if str((meta.get("annotations") or {}).get(DRAIN_ANNOTATION, "")).lower() == "false":
        return f"annotated {DRAIN_ANNOTATION}=false meanwhile"
    patch = {
        "metadata": {
            "resourceVersion": meta.get("resourceVersion"),
            "annotations": {DRAINING_ANNOTATION: micro_time(ctl.clock())},
        },
        "spec": {"unschedulable": True},
    }
    status = await _patch_node(ctl, name, patch)
    return None if status < 300 else f"cordon failed ({status})"


async def _patch_node_retrying(ctl: Controller, name: str, patch: dict[str, Any], tries: int = 6) -> int:
    """A patch that must not be lost (putting a node back): retried on errors for about 6 s."""
    status = 0
    for attempt in range(tries):
        try:
            status = await _patch_node(ctl, name, patch)
        except Exception as exc:  # the API server went away for a moment
            status = 0
            ctl.log.warning("node_patch_retry", node=name, error=repr(exc), attempt=attempt)
        if (status < 300 and status != 0) or status == 404:
            return status
        await asyncio.sleep(0.2 * 2**attempt)
    return status


async def _uncordon(ctl: Controller, name: str) -> None:
    patch = {"metadata": {"annotations": {DRAINING_ANNOTATION: None}}, "spec": {"unschedulable": None}}
    status = await _patch_node_retrying(ctl, name, patch)
    if status < 300 and status != 0:
        ctl.log.info("node_uncordoned", node=name, status=status)
    else:  # still marked as draining: recover() puts it back on a later pass
        LOOP_ERRORS.labels("uncordon").inc()
        ctl.log.error("node_uncordon_failed", node=name, status=status)


async def drain(ctl: Controller, job: DrainJob, reason: str) -> None:
    """Cordon, drain, then record the outcome; on cancellation put the node back if we still lead.

    The job stays in flight until its outcome is recorded (a probe's until its pods have landed)."""
    log = ctl.log.bind(node=job.node)
    try:
        try:
            outcome, detail = await _drain(ctl, job, reason, log)
        except asyncio.CancelledError:
            # Shutdown while leading: put the node back. Lease lost: another leader owns the cluster now
            # and finds our marker annotation; do nothing more here.
            leading = ctl.elector.is_leader.is_set()
            log.warning("drain_interrupted", leading=leading)
            if leading and job.cordoned:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(3):
                        await _uncordon(ctl, job.node)
                ctl.events.record(job.node, "SpotdDrainStopped", "spotd controller shutting down; uncordoned")
            raise
        except Exception as exc:
            outcome, detail = "failed", repr(exc)
            LOOP_ERRORS.labels("controller_drain").inc()
        try:
            await _finish(ctl, job, outcome, detail, log)
        except Exception as exc:  # a failed patch after the drain must not stop the leader's other work
            LOOP_ERRORS.labels("controller_drain").inc()
            log.error("drain_finish_failed", outcome=outcome, error=repr(exc))
    finally:
        ctl.in_flight.pop(job.node, None)


async def _drain(ctl: Controller, job: DrainJob, reason: str, log: Any) -> tuple[str, str]:
    refused = await _cordon(ctl, job.node)
    if refused is not None:
        return "blocked", refused
    job.cordoned = True
    log.info("drain_starting", reason=reason, probe=job.probe)
    ctl.events.record(job.node, "SpotdDrainStarted", f"Draining on-demand node back to Spot: {reason}")
    options = DrainOptions(
        policy=PodPolicy(
            voluntary=True,
            evict_unreplicated=ctl.config.evict_unreplicated,
            evict_local_storage=ctl.config.evict_local_storage,
        ),
        deadline_action="leave",
    )
    deadline = ctl.clock() + timedelta(seconds=ctl.config.drain_timeout)
    result = await drain_node(ctl.client, job.node, options, deadline, log=log, limiter=ctl.limiter, stop=job.stop)
    if result.outcome == "complete":
        return "complete", ""
    if result.outcome == "blocked":
        return "blocked", result.reason or ""
    if job.abort:
        return job.abort, "a new ICE arrived during the drain"
    return "timeout", f"not empty after --drain-timeout: {result.reason or ''}"


async def _finish(ctl: Controller, job: DrainJob, outcome: str, detail: str, log: Any) -> None:
    """Alert, Event, the node's annotations; the outcome is counted once the node is in its final state."""
    node = ctl.inventory.nodes.get(job.node)
    if outcome in ("timeout", "blocked", "failed"):
        who = AlertNode(job.node, node.instance_id if node else "", job.pool.zone, job.pool.instance_type)
        ctl.alerter.fire(on_demand_drain_blocked_alert(who, f"{outcome}: {detail}", str(job.pool)))
        ctl.blocked_alerts.add(job.node)
    else:
        ctl.alerter.resolve(ON_DEMAND_DRAIN_BLOCKED, {"node": job.node})
        ctl.blocked_alerts.discard(job.node)
    try:
        if outcome == "complete":
            log.info("drain_complete", probe=job.probe)
            ctl.events.record(job.node, "SpotdDrainComplete", "Drained; node left to cluster-autoscaler")
            drained = {DRAINING_ANNOTATION: None, DRAINED_ANNOTATION: micro_time(ctl.clock())}
            await _patch_node(ctl, job.node, {"metadata": {"annotations": drained}})
            if ctl.config.terminate_drained:
                await _terminate(ctl, job, log)
        else:
            log.warning("drain_stopped", outcome=outcome, detail=detail)
            ctl.events.record(job.node, "SpotdDrainStopped", f"{outcome}: {detail}"[:1000], type="Warning")
            if job.cordoned:
                await _uncordon(ctl, job.node)
    finally:
        CONTROLLER_DRAINS.labels(outcome).inc()
    if job.probe and outcome not in ("blocked", "failed"):  # those say nothing about capacity
        await _probe_result(ctl, job, outcome == "complete", log)
    ctl.wake.set()


async def _terminate(ctl: Controller, job: DrainJob, log: Any) -> None:
    node = ctl.inventory.nodes.get(job.node)
    iid = node.instance_id if node else ""
    if not iid or ctl.asgs is None:
        log.warning("terminate_skipped", reason="no instance id or no ASG reader")
        return
    try:
        activity = await ctl.asgs.terminate_instance(iid, decrement_desired=True)
        log.info("node_terminated", instance_id=iid, activity=activity)
        ctl.events.record(job.node, "SpotdNodeTerminated", f"Terminated {iid} through its ASG")
    except Exception as exc:
        LOOP_ERRORS.labels("controller_terminate").inc()
        log.warning("terminate_failed", instance_id=iid, error=repr(exc))


async def _probe_result(ctl: Controller, job: DrainJob, drained: bool, log: Any) -> None:
    """Where did the probed node's pods land? On Spot: the pool is back; else back off."""
    landed_on_spot = False
    if drained and job.owners:
        end = time.monotonic() + ctl.config.probe_settle
        while True:
            placed = _replacements(ctl, job)
            if placed and (len(placed) >= len(job.pods_before) or time.monotonic() >= end):
                landed_on_spot = any(ctype == SPOT for ctype in placed)
                break
            if time.monotonic() >= end:
                break
            await asyncio.sleep(min(5.0, max(0.5, ctl.config.probe_settle / 20)))
    now = ctl.clock()
    pools = [p for p in ctl.book.pools() if p.contains(job.pool)] or [job.pool]
    for pool in pools:
        ctl.book = ctl.book.record_probe_result(pool, now, landed_on_spot)
    log.info("probe_result", pool=str(job.pool), landed_on_spot=landed_on_spot)


def _replacements(ctl: Controller, job: DrainJob) -> list[str]:
    """Capacity types of the nodes where new pods of the drained pods' owners run."""
    types = {n.name: n.capacity_type or "unknown" for n in ctl.resolved_nodes()}
    out = []
    for key, pod in ctl.inventory.pods.items():
        if key in job.pods_before or not pod.node or pod.node == job.node:
            continue
        if (pod.namespace, pod.owner_kind, pod.owner_name) in job.owners:
            out.append(types.get(pod.node, "unknown"))
    return out


async def recover(ctl: Controller, stale_after: float | None = None) -> None:
    """Nodes marked as draining with no drain of ours in flight (a previous leader stopped, or putting one
    back failed): uncordon them; the policy decides anew. When leading starts every such node; on each pass
    (stale_after set) only marks older than that, so a drain that just ended is not raced."""
    now = ctl.clock()
    for name, extra in list(ctl.inventory.node_extra.items()):
        if not extra.draining_since or name in ctl.in_flight:
            continue
        if stale_after is not None:
            try:
                age = (now - parse_iso_time(extra.draining_since)).total_seconds()
            except ValueError:
                age = float("inf")  # a mark we cannot read is no drain of ours
            if age < stale_after:
                continue
        ctl.log.warning("drain_abandoned", node=name, since=extra.draining_since, dry_run=ctl.config.dry_run)
        if not ctl.config.dry_run:
            await _uncordon(ctl, name)
            ctl.events.record(name, "SpotdDrainStopped", "a drain of ours was interrupted; node put back")
