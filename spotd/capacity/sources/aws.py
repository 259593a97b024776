"""The AWS call wrapper (boto3 in threads, retries, metrics) and InstanceLookup; shared by the SQS and ASG readers.

Credentials and region come from the standard boto3 chain; AWS_ENDPOINT_URL is honoured by boto3 itself.
Every call is counted (spotd_aws_requests_total) and retried with tenacity on throttling, 5xx and
connection errors; botocore's own retries are switched off so that each attempt is counted once.
The readers themselves: spotd.capacity.sqs (SqsSource) and spotd.capacity.asg (AsgSource).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ConnectionError, HTTPClientError
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from spotd.capacity import metrics
from spotd.capacity.signals import CapacitySignal, CapacityType, with_instance_facts
from spotd.common import log as logging

THROTTLING_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "SlowDown",
        "PriorRequestNotComplete",
    }
)
RETRY_ATTEMPTS = 5
RETRY_WAIT_MAX = 10.0


def _outcome(exc: BaseException | None) -> str:
    if exc is None:
        return "ok"
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in THROTTLING_CODES or status == 429:
            return "throttled"
        return "server_error" if status >= 500 else "client_error"
    if isinstance(exc, ConnectionError | HTTPClientError):
        return "connection_error"
    return "error"


# What AWS answers a call the credentials' policy does not allow (EC2 says UnauthorizedOperation).
ACCESS_DENIED_CODES = frozenset({"AccessDenied", "AccessDeniedException", "UnauthorizedOperation"})


def access_denied(exc: BaseException) -> bool:
    """Whether AWS refused the call for want of permission."""
    return isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code", "") in ACCESS_DENIED_CODES


def _retryable(exc: BaseException) -> bool:
    return _outcome(exc) in ("throttled", "server_error", "connection_error")


def make_client(service: str, session: boto3.Session | None = None, read_timeout: float = 30.0) -> Any:
    """A boto3 client with botocore retries off (tenacity retries, so every attempt is counted)."""
    config = Config(retries={"mode": "standard", "total_max_attempts": 1}, connect_timeout=5, read_timeout=read_timeout)
    return (session or boto3.Session()).client(service, config=config)  # type: ignore[call-overload]


class AwsApi:
    """One service's client, made in a thread on first use; `call` counts, retries and never blocks."""

    def __init__(
        self, service: str, client: Any = None, session: boto3.Session | None = None, read_timeout: float = 30.0
    ) -> None:
        self.service = service
        self._client = client
        self._session = session
        self._read_timeout = read_timeout
        self._lock = asyncio.Lock()

    async def client(self) -> Any:
        async with self._lock:
            if self._client is None:
                self._client = await asyncio.to_thread(make_client, self.service, self._session, self._read_timeout)
        return self._client

    async def call(self, method: str, **kwargs: Any) -> dict[str, Any]:
        client = await self.client()
        operation = client.meta.method_to_api_mapping.get(method, method)
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(_retryable),
            stop=stop_after_attempt(RETRY_ATTEMPTS),
            wait=wait_exponential_jitter(multiplier=0.2, max=RETRY_WAIT_MAX, jitter=0.2),
            reraise=True,
        ):
            with attempt:
                try:
                    response: dict[str, Any] = await asyncio.to_thread(getattr(client, method), **kwargs)
                except (ClientError, BotoCoreError) as exc:
                    metrics.AWS_REQUESTS.labels(self.service, operation, _outcome(exc)).inc()
                    raise
                metrics.AWS_REQUESTS.labels(self.service, operation, "ok").inc()
                return response
        raise AssertionError("unreachable")  # pragma: no cover


# --- EC2 instances ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class InstanceFacts:
    instance_id: str
    lifecycle: str  # "spot" | "on-demand" (InstanceLifecycle absent means on-demand; "scheduled" kept)
    instance_type: str
    zone: str


class InstanceLookup:
    """Facts of EC2 instances, cached (they never change for an instance id), asked for in batches."""

    BATCH = 200  # EC2 takes at most 200 values in one filter

    def __init__(
        self, *, client: Any = None, session: boto3.Session | None = None, cache_size: int = 10000, log: Any = None
    ) -> None:
        self._ec2 = AwsApi("ec2", client, session)
        self._cache: OrderedDict[str, InstanceFacts] = OrderedDict()
        self._cache_size = cache_size
        self._log = log or logging.get("spotd.capacity")

    async def describe(self, instance_ids: Sequence[str]) -> dict[str, InstanceFacts]:
        """Facts of every instance EC2 still knows; ids it does not know are left out, not an error."""
        out: dict[str, InstanceFacts] = {}
        missing: list[str] = []
        for iid in dict.fromkeys(instance_ids):
            if iid in self._cache:
                self._cache.move_to_end(iid)
                out[iid] = self._cache[iid]
                metrics.INSTANCE_LOOKUPS.labels("hit").inc()
            else:
                missing.append(iid)
        for start in range(0, len(missing), self.BATCH):
            batch = missing[start : start + self.BATCH]
            token: str | None = None
            while True:
                kwargs: dict[str, Any] = {"Filters": [{"Name": "instance-id", "Values": batch}]}
                if token:
                    kwargs["NextToken"] = token
                response = await self._ec2.call("describe_instances", **kwargs)
                for reservation in response.get("Reservations", []):
                    for inst in reservation.get("Instances", []):
                        facts = InstanceFacts(
                            inst["InstanceId"],
                            "on-demand" if not inst.get("InstanceLifecycle") else str(inst["InstanceLifecycle"]),
                            str(inst.get("InstanceType", "")),
                            str(inst.get("Placement", {}).get("AvailabilityZone", "")),
                        )
                        out[facts.instance_id] = facts
                        self._remember(facts)
                token = response.get("NextToken")
                if not token:
                    break
        for iid in missing:
            metrics.INSTANCE_LOOKUPS.labels("miss" if iid in out else "not_found").inc()
        return out

    async def lifecycle(self, instance_ids: Sequence[str]) -> dict[str, str]:
        """instance id -> "spot" | "on-demand", for the instances EC2 knows."""
        return {iid: facts.lifecycle for iid, facts in (await self.describe(instance_ids)).items()}

    async def enrich(self, signals: Sequence[CapacitySignal]) -> list[CapacitySignal]:
        """Fill "*" types or zones and "unknown" capacity types from the instance a signal names."""
        wanted = [s.instance_id for s in signals if s.instance_id and _incomplete(s)]
        if not wanted:
            return list(signals)
        facts = await self.describe(wanted)
        out = []
        for s in signals:
            f = facts.get(s.instance_id) if s.instance_id else None
            out.append(with_instance_facts(s, f.instance_type, f.zone, f.lifecycle) if f else s)
        return out

    def _remember(self, facts: InstanceFacts) -> None:
        self._cache[facts.instance_id] = facts
        self._cache.move_to_end(facts.instance_id)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)


# What a reader hands its signals to (the controller's on_signals); may be a coroutine function.
SignalHandler = Callable[[list[CapacitySignal]], Awaitable[None] | None]


async def enrich_signals(
    signals: list[CapacitySignal], lookup: InstanceLookup | None, log: Any
) -> list[CapacitySignal]:
    """Signals completed from their instances; on an EC2 error, as they were (a launch of unknown
    capacity type then counts for nothing, which errs on the side of not draining)."""
    if lookup is None or not signals:
        return signals
    try:
        return await lookup.enrich(signals)
    except (ClientError, BotoCoreError) as exc:
        log.warning("instance_lookup_failed", error=str(exc))
        return signals


def log_signals(log: Any, signals: Iterable[CapacitySignal]) -> None:
    """One capacity_signal event per signal: ICE at info, launches at debug."""
    for s in signals:
        # ICE matters to whoever reads the logs; launches are many and routine.
        emit = log.info if s.kind == "ice" else log.debug
        emit(
            "capacity_signal",
            pool=str(s.pool),
            kind=str(s.kind),
            source=s.source,
            reason=s.reason,
            asg=s.asg,
            capacity_type=s.capacity_type,
            at=s.at.isoformat(),
        )


def _incomplete(signal: CapacitySignal) -> bool:
    return signal.pool.wildcard or signal.capacity_type == CapacityType.UNKNOWN


class AwsStartupError(Exception):
    """AWS is not usable as configured: the message is one line naming the problem."""


def one_line(text: str, limit: int = 400) -> str:
    """A start-up error is one line: an unparsed error body (XML where JSON was expected) keeps its words."""
    words = " ".join(text.split())
    return words if len(words) <= limit else words[: limit - 1] + "…"


def check_aws_access(queue_url: str, asg_filters: list[dict[str, Any]], session: boto3.Session | None = None) -> str:
    """At start, before anything runs: the region, the credentials (sts:GetCallerIdentity), the queue
    (sqs:GetQueueAttributes) and the ASG read (autoscaling:DescribeAutoScalingGroups). Blocking (boto3).
    Returns the caller's ARN; raises AwsStartupError with one line naming what is wrong."""
    session = session or boto3.Session()
    if not session.region_name:
        raise AwsStartupError("no AWS region: set AWS_REGION (or AWS_DEFAULT_REGION, or a profile's region)")
    try:
        credentials = session.get_credentials()
    except BotoCoreError as exc:
        raise AwsStartupError(f"AWS credentials unusable: {exc}") from None
    if credentials is None:
        raise AwsStartupError(
            "no AWS credentials found (IRSA / EKS Pod Identity, AWS_ACCESS_KEY_ID, a profile or instance role)"
        )

    def call(service: str, what: str, method: str, **kwargs: Any) -> Any:
        try:
            return getattr(make_client(service, session, read_timeout=10), method)(**kwargs)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            raise AwsStartupError(
                one_line(f"{what} failed: {error.get('Code', '?')}: {error.get('Message', '')}")
            ) from None
        except BotoCoreError as exc:
            raise AwsStartupError(one_line(f"{what} failed: {exc}")) from None

    identity = call("sts", "AWS credentials check (sts:GetCallerIdentity)", "get_caller_identity")
    if queue_url:
        call(
            "sqs",
            f"SQS queue {queue_url} (sqs:GetQueueAttributes)",
            "get_queue_attributes",
            QueueUrl=queue_url,
            AttributeNames=["QueueArn"],
        )
    call(
        "autoscaling",
        "ASG read (autoscaling:DescribeAutoScalingGroups)",
        "describe_auto_scaling_groups",
        Filters=asg_filters,
        MaxRecords=1,
    )
    return str(identity.get("Arn", ""))
