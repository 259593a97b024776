"""Which AWS actions spotd's code calls, recorded at the moto server, and how they compare with the IAM policies.

Recording happens on the server side: tests/moto_server.py runs moto in a thread of the pytest process, and
every request any client makes (in-process sources, the `spotd controller` subprocess, the rehearsal's
calls) passes through moto's one authorisation check, `_authenticate_and_authorize_action`. Wrapping that
sees each request's access key, service and operation, and whether moto allowed it, whatever process
sent it: no hook inside the subprocesses, and the identity is the key that signed the request, so the
tests' own set-up calls (made with the admin key) are told apart from the code's.

With SPOTD_CHECK_PERMISSIONS=1, tests/conftest.py compares, at the end of the session, what each identity
called with its policy (`compare`): an action called but not granted, or granted and never called, fails
the run. That needs the whole suite: on a partial run, what it did not run shows up as unused.
"""

from __future__ import annotations

import fnmatch
import json
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"

# IAM user name in moto -> the policy file it is given (and checked against).
POLICIES = {
    "spotd-controller": DEPLOY / "iam-policy.json",
    "spotd-operator": DEPLOY / "iam-rehearsal-policy.json",
}

# Operations AWS authorises under another action (SQS: "the same permissions as the non-batch action").
AUTHORISED_AS = {
    "sqs:DeleteMessageBatch": "sqs:DeleteMessage",
    "sqs:SendMessageBatch": "sqs:SendMessage",
    "sqs:ChangeMessageVisibilityBatch": "sqs:ChangeMessageVisibility",
}
# Operations that need no permission at all (AWS allows them even under an explicit Deny).
NEEDS_NO_PERMISSION = frozenset({"sts:GetCallerIdentity"})
# Actions AWS also checks when an operation is called, which never reach the wire as a request of their own
# (the Service Authorization Reference's "dependent actions"; moto checks none of them).
DEPENDENT_ACTIONS = {
    "fis:CreateExperimentTemplate": frozenset({"iam:PassRole"}),  # the experiment's roleArn
}


@dataclass(frozen=True)
class Call:
    identity: str  # the IAM user whose key signed the request
    action: str  # as moto saw it: "<signing name>:<operation>"
    outcome: str  # "allowed", or the exception moto raised (AccessDeniedError, SignatureDoesNotMatchError...)


@dataclass
class Recorder:
    """Every request moto authorised or refused, by identity; keys are registered as the tests make them."""

    calls: list[Call] = field(default_factory=list)
    identities: dict[str, str] = field(default_factory=dict)  # access key id -> IAM user name
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def register(self, access_key_id: str, identity: str) -> None:
        with self._lock:
            self.identities[access_key_id] = identity

    def record(self, access_key_id: str, action: str, outcome: str) -> None:
        with self._lock:
            identity = self.identities.get(access_key_id, f"unknown:{access_key_id}")
            self.calls.append(Call(identity, action, outcome))

    def since(self, mark: int) -> list[Call]:
        with self._lock:
            return self.calls[mark:]

    def mark(self) -> int:
        with self._lock:
            return len(self.calls)


RECORDER = Recorder()


def _credential(headers: Mapping[str, str]) -> tuple[str, str]:
    """(access key id, signing name) from a SigV4 Authorization header; ("", "") if unsigned."""
    auth = headers.get("Authorization", "") or ""
    scope = auth.partition("Credential=")[2].partition(",")[0].split("/")
    return (scope[0], scope[3]) if len(scope) >= 4 else ("", "")


def recording(original: Callable[..., None]) -> Callable[..., None]:
    """moto's authorisation check, wrapped to record each request into RECORDER."""

    def check(self: Any, iam_request_cls: type, resource: str = "*") -> None:
        key, service = _credential(self.headers)
        action = f"{service}:{self._get_action()}"
        try:
            original(self, iam_request_cls, resource)
        except Exception as exc:
            RECORDER.record(key, action, type(exc).__name__)
            raise
        RECORDER.record(key, action, "allowed")

    return check


# --- the comparison (pure) ------------------------------------------------------------------------------


def iam_action(action: str) -> str:
    return AUTHORISED_AS.get(action, action)


def granted_actions(policy: Mapping[str, Any]) -> set[str]:
    """The actions the policy's Allow statements name (as written, wildcards included)."""
    out: set[str] = set()
    for st in policy["Statement"]:
        if st.get("Effect") == "Allow":
            actions = st.get("Action", [])
            out.update([actions] if isinstance(actions, str) else actions)
    return out


def needed_actions(called: Iterable[str]) -> set[str]:
    """The IAM actions the called operations need: batch operations under their action, the dependent
    actions added, those needing no permission left out."""
    needed: set[str] = set()
    for op in called:
        action = iam_action(op)
        if action not in NEEDS_NO_PERMISSION:
            needed.add(action)
        needed |= DEPENDENT_ACTIONS.get(action, frozenset())
    return needed


@dataclass(frozen=True)
class Comparison:
    missing: frozenset[str]  # called, not granted
    unused: frozenset[str]  # granted, never called

    @property
    def ok(self) -> bool:
        return not self.missing and not self.unused


def compare(called: Iterable[str], policy: Mapping[str, Any]) -> Comparison:
    """What the code called against what the policy grants (IAM action names match case-insensitively)."""
    needed = needed_actions(called)
    granted = granted_actions(policy)

    def covered(action: str) -> bool:
        return any(fnmatch.fnmatchcase(action.lower(), g.lower()) for g in granted)

    missing = {a for a in needed if not covered(a)}
    unused = {g for g in granted if not any(fnmatch.fnmatchcase(a.lower(), g.lower()) for a in needed)}
    return Comparison(frozenset(missing), frozenset(unused))


def describe(identity: str, policy_file: str, result: Comparison) -> list[str]:
    lines = []
    for action in sorted(result.missing):
        lines.append(f"{identity}: the code calls {action}, which {policy_file} does not grant")
    for action in sorted(result.unused):
        lines.append(f"{identity}: {policy_file} grants {action}, which no test saw the code call")
    return lines


# --- at the end of the session --------------------------------------------------------------------------


def enabled() -> bool:
    return os.environ.get("SPOTD_CHECK_PERMISSIONS", "").strip().lower() in ("1", "true", "yes", "on")


def called_by(calls: Iterable[Call]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for c in calls:
        out.setdefault(c.identity, set()).add(c.action)
    return out


def check_policies(calls: Iterable[Call], policies: Mapping[str, Path] = POLICIES) -> list[str]:
    """Problems (one line each) between the recorded calls and every identity's policy file."""
    by_identity = called_by(calls)
    problems: list[str] = []
    for identity, path in policies.items():
        if identity not in by_identity:
            problems.append(f"{identity}: no AWS call recorded (did the AWS tests run?)")
            continue
        result = compare(by_identity[identity], json.loads(path.read_text()))
        problems += describe(identity, f"deploy/{path.name}", result)
    return problems


def summary(calls: Iterable[Call], policies: Mapping[str, Path] = POLICIES) -> Iterator[str]:
    by_identity = called_by(calls)
    for identity in policies:
        actions = sorted(needed_actions(by_identity.get(identity, set())))
        yield f"{identity} needs: {', '.join(actions) or 'nothing'}"


def check_at_session_end(session: Any) -> None:
    """With SPOTD_CHECK_PERMISSIONS=1: print what each identity called; fail the run on any gap."""
    if not enabled():
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    write = reporter.write_line if reporter else print
    write("")
    write("AWS actions called, by identity (SPOTD_CHECK_PERMISSIONS):")
    for line in summary(RECORDER.calls):
        write(f"  {line}")
    problems = check_policies(RECORDER.calls)
    for line in problems:
        write(f"  PERMISSIONS: {line}")
    if problems:
        session.exitstatus = 1
