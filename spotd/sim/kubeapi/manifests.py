"""Manifests as `kubectl apply -f FILE` or `kubectl apply -k DIR` would send them: YAML documents, and the
kustomizations the project uses (resources, namespace, labels, images; no patches, generators or bases)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from .store import Obj

_KUSTOMIZATION = "kustomization.yaml"
_WORKLOADS = ("Deployment", "DaemonSet", "StatefulSet", "ReplicaSet", "Job")
_CLUSTER_SCOPED = frozenset(
    {"Namespace", "Node", "ClusterRole", "ClusterRoleBinding", "PriorityClass", "CustomResourceDefinition"}
)


def documents(paths: Iterable[str | Path] | str | Path) -> list[Obj]:
    """Every object of the files given, in order; a directory holding a kustomization.yaml is rendered
    as kustomize would, another directory contributes its *.yaml files in name order."""
    if isinstance(paths, str | Path):
        paths = [paths]
    found: list[Obj] = []
    for path in map(Path, paths):
        if path.is_dir() and (path / _KUSTOMIZATION).is_file():
            found.extend(kustomize(path))
        elif path.is_dir():
            for file in sorted(path.glob("*.yaml")):
                found.extend(_load(file))
        else:
            found.extend(_load(path))
    return found


def _load(path: Path) -> list[Obj]:
    return [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict) and d.get("kind")]


def kustomize(directory: Path) -> list[Obj]:
    """The documents of a kustomization: its `resources` with `namespace` set on namespaced objects and
    ServiceAccount subjects, `labels` (and `commonLabels`) added to metadata, `images` rewritten."""
    spec: dict[str, Any] = yaml.safe_load((directory / _KUSTOMIZATION).read_text()) or {}
    objects = documents([directory / r for r in spec.get("resources") or []])
    namespace = spec.get("namespace")
    labels: dict[str, str] = dict(spec.get("commonLabels") or {})
    for entry in spec.get("labels") or []:
        labels.update(entry.get("pairs") or {})
    for obj in objects:
        meta = obj.setdefault("metadata", {})
        if namespace:
            if obj["kind"] == "Namespace" and len([o for o in objects if o["kind"] == "Namespace"]) == 1:
                meta["name"] = namespace
            elif obj["kind"] not in _CLUSTER_SCOPED:
                meta["namespace"] = namespace
            for subject in obj.get("subjects") or []:
                if subject.get("kind") == "ServiceAccount":
                    subject["namespace"] = namespace
        if labels:
            meta["labels"] = {**(meta.get("labels") or {}), **labels}
        if obj["kind"] in _WORKLOADS:
            _set_images(obj, spec.get("images") or [])
    return objects


def _set_images(obj: Obj, images: list[dict[str, Any]]) -> None:
    pod_spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    for container in [*(pod_spec.get("initContainers") or []), *(pod_spec.get("containers") or [])]:
        name = container.get("image", "").split("@")[0].rsplit(":", 1)[0]
        for image in images:
            if image.get("name") != name:
                continue
            new_name = image.get("newName", name)
            if image.get("digest"):
                container["image"] = f"{new_name}@{image['digest']}"
            elif image.get("newTag"):
                container["image"] = f"{new_name}:{image['newTag']}"
            else:
                container["image"] = new_name
