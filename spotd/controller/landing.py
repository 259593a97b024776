"""Where the replacements of a drained node's pods landed, pure: returned to Spot, or not.

surge.replacements_landed follows the pods; this module says what their placement means for the pool.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from spotd.kube.keys import ON_DEMAND, SPOT

Owner = tuple[str, str, str]  # namespace, controller kind, controller name


@dataclass(frozen=True)
class PodSeen:
    """One pod as the landing check sees it (from the API or from the controller's inventory)."""

    namespace: str
    name: str
    owner_kind: str
    owner_name: str
    node: str
    running: bool
    terminating: bool = False
    uid: str = ""

    @property
    def key(self) -> str:
        """The pod's identity across re-creation: its uid (a StatefulSet's replacement keeps the name)."""
        return self.uid or self.ref

    @property
    def owner(self) -> Owner:
        return (self.namespace, self.owner_kind, self.owner_name)

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


def replacements(
    pods: Iterable[PodSeen], owners: Collection[Owner], before: Collection[str], drained_node: str
) -> list[PodSeen]:
    """The pods of the drained pods' owners that were not there before the drain (by uid) and are not on its
    node."""
    return [
        p for p in pods if p.owner in owners and p.key not in before and p.node != drained_node and not p.terminating
    ]


@dataclass(frozen=True)
class Landing:
    """returned: every replacement expected runs on Spot. short: at least one runs on on-demand capacity
    (the pool is marked short). Neither: some have not run by the timeout (unknown, not counted short)."""

    returned: bool
    short: bool
    reason: str
    placed: Mapping[str, str] = field(default_factory=dict)  # pod ref -> "node (capacity type)"


def landing_verdict(
    found: Iterable[PodSeen], capacity_of: Mapping[str, str | None], expected: int, timed_out: bool
) -> Landing | None:
    """None while waiting (fewer than `expected` replacements running and time left); else the verdict."""
    running = [p for p in found if p.running and p.node]
    placed = {p.ref: f"{p.node} ({capacity_of.get(p.node) or 'unknown'})" for p in running}
    off_spot = sorted(p.ref for p in running if capacity_of.get(p.node) == ON_DEMAND)
    if off_spot:
        nodes = sorted({p.node for p in running if capacity_of.get(p.node) == ON_DEMAND})
        return Landing(
            False, True, f"{len(off_spot)} replacement(s) landed on on-demand node(s) {nodes}: {off_spot}", placed
        )
    if len(running) < expected and not timed_out:
        return None
    spot_nodes = sorted({p.node for p in running if capacity_of.get(p.node) == SPOT})
    unknown = sorted(p.ref for p in running if capacity_of.get(p.node) != SPOT)
    if len(running) < expected:
        return Landing(False, False, f"{expected - len(running)} of {expected} replacement(s) not running", placed)
    if unknown:
        return Landing(False, False, f"capacity type unknown for the nodes of {unknown}", placed)
    return Landing(True, False, f"{len(running)} replacement(s) running on Spot node(s) {spot_nodes}", placed)


def owner_of(pod: Mapping[str, object]) -> tuple[str, str] | None:
    """The pod's controller (kind, name), or None."""
    meta = pod.get("metadata")
    refs = meta.get("ownerReferences") if isinstance(meta, dict) else None
    for ref in refs or []:
        if isinstance(ref, dict) and ref.get("controller"):
            return str(ref.get("kind", "")), str(ref.get("name", ""))
    return None


def pod_seen(pod: Mapping[str, object]) -> PodSeen | None:
    """A pod's raw JSON as the landing check sees it; None for a pod without controller (no replacement)."""
    meta = pod.get("metadata")
    spec = pod.get("spec")
    status = pod.get("status")
    if not isinstance(meta, dict):
        return None
    owner = owner_of(pod)
    if owner is None:
        return None
    phase = status.get("phase") if isinstance(status, dict) else None
    return PodSeen(
        namespace=str(meta.get("namespace", "")),
        name=str(meta.get("name", "")),
        owner_kind=owner[0],
        owner_name=owner[1],
        node=str(spec.get("nodeName") or "") if isinstance(spec, dict) else "",
        running=phase == "Running",
        terminating=bool(meta.get("deletionTimestamp")),
        uid=str(meta.get("uid") or ""),
    )


@dataclass(frozen=True)
class Follow:
    """What the landing check follows after a drain: the evicted pods' owners, every pod of those owners that
    existed before (by uid: none of them is a replacement), how many replacements to expect, and the drained node."""

    node: str
    owners: frozenset[Owner]
    before: frozenset[str]
    expected: int


def what_to_follow(node: str, evicted: Iterable[Mapping[str, object]], present: Iterable[PodSeen]) -> Follow:
    """From the pods a drain is about to evict and the pods present now (of their namespaces)."""
    seen = [p for p in (pod_seen(pod) for pod in evicted) if p is not None]
    owners = frozenset(p.owner for p in seen)
    before = frozenset(p.key for p in seen) | frozenset(p.key for p in present if p.owner in owners)
    return Follow(node, owners, before, len(seen))
