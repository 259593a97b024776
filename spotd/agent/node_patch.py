"""What the agent reads of its Node and writes on it (pure): the view, the merge patch for a response, the
one that releases it, and the state annotation that lets a restarted agent finish or undo its work.

Every change is one merge patch carrying the resourceVersion it was computed from, so a concurrent
writer (kubectl, another controller) makes it fail with 409 instead of being overwritten.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from spotd.agent.policy import Response, Step
from spotd.common.parsing import instance_id_from_provider_id
from spotd.kube.keys import (
    EXCLUDE_LB_LABEL,
    INSTANCE_TYPE_LABELS,
    INTERRUPTION_TAINT_KEY,
    NOTICE_ANNOTATION,
    STATE_ANNOTATION,
    ZONE_LABELS,
    first_label,
)

if TYPE_CHECKING:
    from lightkube.resources.core_v1 import Node


@dataclass(frozen=True)
class NodeView:
    """The parts of a Node the agent reads."""

    name: str
    uid: str = ""
    resource_version: str = ""
    unschedulable: bool = False
    taints: tuple[Mapping[str, Any], ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    boot_id: str = ""
    provider_id: str = ""

    @classmethod
    def from_node(cls, node: Node) -> NodeView:  # a lightkube Node; only read
        meta, spec, status = node.metadata, node.spec, node.status
        taints = tuple(t.to_dict() for t in (spec.taints or [])) if spec else ()
        boot_id = status.nodeInfo.bootID if status and status.nodeInfo else ""
        return cls(
            name=meta.name if meta and meta.name else "",
            uid=(meta.uid or "") if meta else "",
            resource_version=(meta.resourceVersion or "") if meta else "",
            unschedulable=bool(spec.unschedulable) if spec else False,
            taints=taints,
            labels=dict(meta.labels or {}) if meta else {},
            annotations=dict(meta.annotations or {}) if meta else {},
            boot_id=boot_id or "",
            provider_id=(spec.providerID or "") if spec else "",
        )

    @property
    def zone(self) -> str:
        return first_label(self.labels, ZONE_LABELS)

    @property
    def instance_type(self) -> str:
        return first_label(self.labels, INSTANCE_TYPE_LABELS)

    @property
    def instance_id(self) -> str:
        return instance_id_from_provider_id(self.provider_id) or ""


@dataclass(frozen=True)
class AgentState:
    """What the agent did to the node, kept beside the notice so a restart can finish or undo it."""

    notice_key: str = ""
    steps: tuple[str, ...] = ()
    prior_unschedulable: bool = False
    boot_id: str = ""

    def to_json(self) -> str:
        return json.dumps(
            {
                "notice_key": self.notice_key,
                "steps": list(self.steps),
                "prior_unschedulable": self.prior_unschedulable,
                "boot_id": self.boot_id,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str | None) -> AgentState | None:
        if not text:
            return None
        try:
            data = json.loads(text)
            return cls(
                notice_key=str(data.get("notice_key", "")),
                steps=tuple(str(s) for s in data.get("steps", [])),
                prior_unschedulable=bool(data.get("prior_unschedulable", False)),
                boot_id=str(data.get("boot_id", "")),
            )
        except (ValueError, AttributeError, TypeError):
            return None


def _without_our_taint(taints: tuple[Mapping[str, Any], ...]) -> list[dict[str, Any]]:
    return [dict(t) for t in taints if t.get("key") != INTERRUPTION_TAINT_KEY]


def notice_patch(view: NodeView, response: Response, state: AgentState) -> dict[str, Any] | None:
    """The merge patch that makes the node reflect `response`; None when it already does."""
    spec: dict[str, Any] = {}
    labels: dict[str, str] = {}
    if Step.TAINT in response.steps:
        wanted = {"key": INTERRUPTION_TAINT_KEY, "value": response.taint_value, "effect": response.taint_effect}
        current = [t for t in view.taints if t.get("key") == INTERRUPTION_TAINT_KEY]
        if [{k: t.get(k) for k in ("key", "value", "effect")} for t in current] != [wanted]:
            spec["taints"] = [*_without_our_taint(view.taints), wanted]
    if Step.CORDON in response.steps and not view.unschedulable:
        spec["unschedulable"] = True
    if Step.EXCLUDE_LB in response.steps and view.labels.get(EXCLUDE_LB_LABEL) != "true":
        labels[EXCLUDE_LB_LABEL] = "true"
    annotations: dict[str, str] = {}
    notice_json = response.notice.to_json()
    if view.annotations.get(NOTICE_ANNOTATION) != notice_json:
        annotations[NOTICE_ANNOTATION] = notice_json
    state_json = state.to_json()
    if view.annotations.get(STATE_ANNOTATION) != state_json:
        annotations[STATE_ANNOTATION] = state_json
    if not (spec or labels or annotations):
        return None
    meta: dict[str, Any] = {"resourceVersion": view.resource_version}
    if labels:
        meta["labels"] = labels
    if annotations:
        meta["annotations"] = annotations
    patch: dict[str, Any] = {"metadata": meta}
    if spec:
        patch["spec"] = spec
    return patch


def release_patch(view: NodeView, state: AgentState | None) -> dict[str, Any] | None:
    """Undo what the agent did: our taint, our cordon (not one that was there before), our label."""
    spec: dict[str, Any] = {}
    if any(t.get("key") == INTERRUPTION_TAINT_KEY for t in view.taints):
        spec["taints"] = _without_our_taint(view.taints) or None
    prior = state.prior_unschedulable if state else False
    did_cordon = state is None or Step.CORDON.value in state.steps
    if view.unschedulable and did_cordon and not prior:
        spec["unschedulable"] = None
    meta: dict[str, Any] = {"resourceVersion": view.resource_version}
    annotations = {k: None for k in (NOTICE_ANNOTATION, STATE_ANNOTATION) if k in view.annotations}
    if annotations:
        meta["annotations"] = annotations
    if view.labels.get(EXCLUDE_LB_LABEL) == "true" and (state is None or Step.EXCLUDE_LB.value in state.steps):
        meta["labels"] = {EXCLUDE_LB_LABEL: None}
    if not spec and len(meta) == 1:
        return None
    patch: dict[str, Any] = {"metadata": meta}
    if spec:
        patch["spec"] = spec
    return patch
