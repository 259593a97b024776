"""A moto server for tests: threaded, on 127.0.0.1 and a free port, reset between tests, IAM enforced.

Use it from a test module:

    from tests.moto_server import aws, moto_endpoint  # noqa: F401  (pytest fixtures)

`aws` gives each test a clean moto in which three IAM users exist:

- `admin` (Allow * on *): the test's own set-up and checks, through `aws.client(service)`;
- `spotd-controller`, whose only policy is deploy/iam-policy.json: the environment (AWS_ACCESS_KEY_ID,
  AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, region) carries its key, so the code under test, in process or
  in a `spotd controller` subprocess, finds it through boto3's standard chain as it does in production;
- `spotd-operator`, whose only policy is deploy/iam-rehearsal-policy.json: `spotd simulate-reclaim`'s AWS
  calls (`aws.act_as(aws.operator)`).

Enforcement is moto's own: settings.INITIAL_NO_AUTH_ACTION_COUNT (the env var of that name, read once at
import) is set at run time through POST /moto-api/reset-auth, which also zeroes the request count. The
users are made with it at infinity (nothing checked), then it is set to 0: every later request must be
signed (SigV4) with a key of an IAM user, and that user's policies must allow the action. moto runs as the
placeholder account the policies name (MOTO_ACCOUNT_ID=111122223333), so ARNs in them match moto's.

Any refused request (AccessDenied, a bad key) fails the test, even when the code only logs it, unless the
test says it expects it (`with aws.expect_denied("sqs:ReceiveMessage"):`). Every request is recorded by
identity (tests/aws_actions.py) for the end-of-session comparison with the policies.

What moto does not evaluate (the static checks in tests/test_deploy.py hold it instead):
- Resource ARNs: moto authorises every service but SQS (which passes the queue's ARN) against "*", so a
  statement naming ARNs would never match; `moto_policy` makes its Resource "*".
- Conditions: moto has values for condition keys only in role trust policies; in an identity policy a
  condition passes whatever it says. Left as written, and unchecked (e.g. the terminate statement's tags).
- SQS batch operations: AWS authorises DeleteMessageBatch as sqs:DeleteMessage, moto as
  sqs:DeleteMessageBatch; `moto_policy` adds the batch name next to its action.
- Dependent actions (iam:PassRole for the FIS template's role): moto checks none.
"""

from __future__ import annotations

import contextlib
import json
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import boto3
import pytest
from moto.core.authorization import ActionAuthenticatorMixin
from moto.server import ThreadedMotoServer

from tests import aws_actions

REGION = "us-east-1"
ACCOUNT = "111122223333"  # the placeholder account of deploy/iam*.json
EVENTS_QUEUE = "spotd-events"  # the queue deploy/iam-policy.json grants
RESOURCE_CHECKED = frozenset({"sqs"})  # services moto authorises against the resource's ARN, not "*"

ADMIN_POLICY: dict[str, Any] = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
}


def moto_policy(policy: dict[str, Any]) -> dict[str, Any]:
    """The policy as moto can evaluate it (see the module docstring); statements of resource-checked
    services stay as written."""
    statements = []
    for st in policy["Statement"]:
        st = dict(st)
        actions = [st["Action"]] if isinstance(st["Action"], str) else list(st["Action"])
        if not all(a.split(":")[0] in RESOURCE_CHECKED for a in actions):
            st["Resource"] = "*"
        st["Action"] = actions + [op for op, a in aws_actions.AUTHORISED_AS.items() if a in actions]
        statements.append(st)
    return {**policy, "Statement": statements}


@dataclass(frozen=True)
class Credentials:
    user: str
    access_key_id: str
    secret_access_key: str


def _post(url: str, body: str = "") -> None:
    request = urllib.request.Request(url, data=body.encode(), method="POST", headers={"Content-Type": "text/plain"})
    with urllib.request.urlopen(request, timeout=10):
        pass


@dataclass
class MotoAws:
    """The moto server of one test: its URL and the three identities' credentials."""

    url: str
    admin: Credentials
    controller: Credentials
    operator: Credentials
    monkeypatch: pytest.MonkeyPatch
    _expected: set[int] = field(default_factory=set)  # indexes of refusals a test asked for

    def client(self, service: str, who: Credentials | None = None) -> Any:
        """A boto3 client signed by `who` (admin: the test's set-up and checks)."""
        who = who or self.admin
        return boto3.client(  # type: ignore[call-overload]
            service,
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id=who.access_key_id,
            aws_secret_access_key=who.secret_access_key,
        )

    def act_as(self, who: Credentials) -> None:
        """The code under test (boto3's default chain, subprocesses started from now) signs as `who`."""
        self.monkeypatch.setenv("AWS_ACCESS_KEY_ID", who.access_key_id)
        self.monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", who.secret_access_key)
        # boto3.client() reuses one default session, which keeps the credentials it first resolved
        self.monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)

    @contextlib.contextmanager
    def unenforced(self) -> Iterator[None]:
        """IAM off for the block: only for checks moto cannot authenticate (FIS GETs, see its use)."""
        _post(f"{self.url}/moto-api/reset-auth", "inf")
        try:
            yield
        finally:
            _post(f"{self.url}/moto-api/reset-auth", "0")

    @contextlib.contextmanager
    def expect_denied(self, action: str) -> Iterator[None]:
        """The block must see `action` refused with AccessDenied; that refusal does not fail the test."""
        start = aws_actions.RECORDER.mark()
        yield
        refused = [
            start + i
            for i, c in enumerate(aws_actions.RECORDER.since(start))
            if c.action == action and c.outcome == "AccessDeniedError"
        ]
        assert refused, f"expected {action} to be refused"
        self._expected.update(refused)

    def refusals_since(self, mark: int) -> list[aws_actions.Call]:
        return [
            c
            for i, c in enumerate(aws_actions.RECORDER.since(mark))
            if c.outcome != "allowed" and mark + i not in self._expected
        ]


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    with pytest.MonkeyPatch.context() as mp:
        # read per request by the server thread (this process), not by the clients
        mp.setenv("MOTO_ACCOUNT_ID", ACCOUNT)
        mp.setattr(
            ActionAuthenticatorMixin,
            "_authenticate_and_authorize_action",
            aws_actions.recording(ActionAuthenticatorMixin._authenticate_and_authorize_action),
        )
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            _post(f"http://{host}:{port}/moto-api/reset-auth", "inf")
            server.stop()


def _make_user(iam: Any, name: str, policy: dict[str, Any]) -> Credentials:
    iam.create_user(UserName=name)
    arn = iam.create_policy(PolicyName=name, PolicyDocument=json.dumps(policy))["Policy"]["Arn"]
    iam.attach_user_policy(UserName=name, PolicyArn=arn)
    key = iam.create_access_key(UserName=name)["AccessKey"]
    aws_actions.RECORDER.register(key["AccessKeyId"], name)
    return Credentials(name, key["AccessKeyId"], key["SecretAccessKey"])


@pytest.fixture
def aws(
    moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MotoAws]:
    """A clean moto for one test, IAM enforced, and the environment signing as the controller."""
    _post(f"{moto_endpoint}/moto-api/reset-auth", "inf")
    _post(f"{moto_endpoint}/moto-api/reset")
    iam = boto3.client(
        "iam", endpoint_url=moto_endpoint, region_name=REGION, aws_access_key_id="setup", aws_secret_access_key="x"
    )
    admin = _make_user(iam, "admin", ADMIN_POLICY)
    policies = {user: json.loads(path.read_text()) for user, path in aws_actions.POLICIES.items()}
    controller = _make_user(iam, "spotd-controller", moto_policy(policies["spotd-controller"]))
    operator = _make_user(iam, "spotd-operator", moto_policy(policies["spotd-operator"]))
    empty = tmp_path_factory.mktemp("aws") / "none"
    for name in (
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "AWS_ROLE_ARN",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    moto = MotoAws(moto_endpoint, admin, controller, operator, monkeypatch)
    moto.act_as(controller)
    _post(f"{moto_endpoint}/moto-api/reset-auth", "0")
    mark = aws_actions.RECORDER.mark()
    yield moto
    refused = moto.refusals_since(mark)
    if refused:
        pytest.fail("AWS refused: " + "; ".join(f"{c.identity} {c.action} ({c.outcome})" for c in refused))
