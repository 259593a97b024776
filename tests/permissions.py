"""What spotd's identities used of the Kubernetes API across a whole test session, against what
deploy/rbac.yaml grants them.

Every FakeApiServer records each authorization decision (`AccessRecord`); tests/conftest.py collects them
from every server of the session (`collect`), writes them to JSON (`write_records`) and, with
SPOTD_CHECK_PERMISSIONS=1, fails the run on `compare`'s findings:

- missing: a request of a spotd identity was refused (403): the code needs a permission it lacks;
- unused: a granted verb x resource no test used: the grant is not needed, or no test covers its use.

Only meaningful on a full run in which the programs run as their real identities
(`api.service_account_token("spotd", "spotd-agent", node_name=...)`, `("spotd", "spotd-controller")`).
A binding to a Group (deploy/status-rbac.yaml's spotd-status) stands for the user `group_member(group)`:
a test runs as a member with `api.add_token(token, group_member(g), groups=(g, "system:authenticated"))`.
Run as a script to compare a JSON file written earlier: `python -m tests.permissions FILE`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from spotd.sim.kubeapi import AccessRecord, FakeApiServer
from spotd.sim.kubeapi.manifests import documents

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
ENABLE_ENV = "SPOTD_CHECK_PERMISSIONS"
FILE_ENV = "SPOTD_PERMISSIONS_FILE"


class Grant(NamedTuple):
    """One verb on one resource (or non-resource URL) granted to one identity, and where it comes from."""

    username: str
    verb: str
    api_group: str
    resource: str  # "pods/eviction" for a subresource; the URL for nonResourceURLs
    namespace: str  # "" when granted in every namespace (a ClusterRoleBinding)
    source: str  # e.g. 'ClusterRole "spotd-controller"'

    def describe(self) -> str:
        where = f' in namespace "{self.namespace}"' if self.namespace else ""
        return (
            f'{self.source} grants {self.username} {self.verb} "{self.resource}" (API group "{self.api_group}"){where}'
        )


def group_member(group: str) -> str:
    """The username the tests give a member of this group: what a binding to the group grants is checked
    against that user's requests (a record names the user, not its groups)."""
    return f"spotd-test:member-of:{group}"


def _subject_usernames(binding: dict[str, Any]) -> list[str]:
    names = []
    for subject in binding.get("subjects") or []:
        if subject.get("kind") == "ServiceAccount":
            namespace = subject.get("namespace") or binding["metadata"].get("namespace", "")
            names.append(f"system:serviceaccount:{namespace}:{subject['name']}")
        elif subject.get("kind") == "User":
            names.append(subject["name"])
        elif subject.get("kind") == "Group":
            names.append(group_member(subject["name"]))
    return names


def granted(paths: Iterable[str | Path] = (DEPLOY,)) -> list[Grant]:
    """Every (identity, verb, group, resource) the roles and bindings among the manifests grant, one Grant
    per verb x group x resource of each rule (a kustomization directory is rendered first, so subjects
    carry its namespace)."""
    objects = documents(list(paths))
    roles = {(o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]): o for o in objects}
    grants: list[Grant] = []
    for binding in objects:
        if binding["kind"] not in ("ClusterRoleBinding", "RoleBinding"):
            continue
        namespace = binding["metadata"].get("namespace", "") if binding["kind"] == "RoleBinding" else ""
        ref = binding.get("roleRef") or {}
        role = roles.get((ref.get("kind", ""), namespace if ref.get("kind") == "Role" else "", ref.get("name", "")))
        if role is None:
            continue
        source = f'{role["kind"]} "{role["metadata"]["name"]}"'
        for username in _subject_usernames(binding):
            for rule in role.get("rules") or []:
                for verb in rule.get("verbs") or []:
                    for url in rule.get("nonResourceURLs") or []:
                        grants.append(Grant(username, verb, "", url, "", source))
                    for group in rule.get("apiGroups") or []:
                        for resource in rule.get("resources") or []:
                            grants.append(Grant(username, verb, group, resource, namespace, source))
    return grants


def _matches(grant: Grant, record: AccessRecord) -> bool:
    resource = f"{record.resource}/{record.subresource}" if record.subresource else record.resource
    return (
        record.username == grant.username
        and grant.verb in ("*", record.verb)
        and grant.api_group in ("*", record.api_group)
        and grant.resource in ("*", resource)
        and grant.namespace in ("", record.namespace)
    )


@dataclass
class PermissionReport:
    missing: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unused)

    def lines(self) -> list[str]:
        out = []
        if self.missing:
            out.append("Refused to spotd (403): deploy/rbac.yaml lacks what the code does:")
            out.extend(f"  {line}" for line in self.missing)
        if self.unused:
            out.append("Granted in deploy/rbac.yaml but never used by any test:")
            out.extend(f"  {line}" for line in self.unused)
        return out


def compare(records: Iterable[AccessRecord], grants: list[Grant]) -> PermissionReport:
    """Refusals of the granted identities (missing permissions), and grants no allowed request used."""
    records = set(records)
    identities = {g.username for g in grants}
    report = PermissionReport()
    for r in sorted(records):
        if r.username in identities and not r.allowed:
            resource = f"{r.resource}/{r.subresource}" if r.subresource else r.resource
            where = f' in namespace "{r.namespace}"' if r.namespace else " at the cluster scope"
            report.missing.append(f'{r.username} cannot {r.verb} "{resource}" (API group "{r.api_group}"){where}')
    used = [r for r in records if r.allowed and r.username in identities]
    for grant in grants:
        if not any(_matches(grant, r) for r in used):
            report.unused.append(grant.describe())
    return report


# ---- the session's records -----------------------------------------------------------------------------


def collect() -> set[AccessRecord]:
    """A set every FakeApiServer of this process adds its decisions to from now on."""
    sink: set[AccessRecord] = set()
    FakeApiServer.access_sinks.append(sink)
    return sink


def stop_collecting(sink: set[AccessRecord]) -> None:
    # By identity: two sets with the same records are equal, and list.remove would take the first.
    FakeApiServer.access_sinks[:] = [s for s in FakeApiServer.access_sinks if s is not sink]


def write_records(records: Iterable[AccessRecord], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([r._asdict() for r in sorted(records)], indent=1) + "\n")
    return path


def read_records(path: Path) -> set[AccessRecord]:
    return {AccessRecord(**r) for r in json.loads(path.read_text())}


if __name__ == "__main__":
    found = compare(read_records(Path(sys.argv[1])), granted())
    print("\n".join(found.lines()) or "deploy/rbac.yaml grants exactly what the recorded requests used")
    sys.exit(1 if found else 0)
