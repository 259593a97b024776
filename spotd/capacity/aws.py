"""The AWS readers of capacity signals: SQS, Auto Scaling, EC2. boto3 runs in threads, never on the loop.

Credentials and region come from the standard boto3 chain; AWS_ENDPOINT_URL is honoured by boto3 itself.
Every call is counted (spotd_aws_requests_total) and retried with tenacity on throttling, 5xx and
connection errors; botocore's own retries are switched off so that each attempt is counted once.
"""

from __future__ import annotations

import asyncio
import inspect
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ConnectionError, HTTPClientError
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from spotd import log as logging
from spotd.capacity import metrics
from spotd.capacity.signals import (
    AsgInfo,
    CapacitySignal,
    CapacityType,
    MalformedEvent,
    launch_signal,
    parse_scaling_activity,
    read_event,
    with_instance_facts,
)
from spotd.metrics import LOOP_ERRORS
from spotd.parsing import parse_iso_time

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
DEFAULT_TAG_FILTERS: tuple[tuple[str, str | None], ...] = (("k8s.io/cluster-autoscaler/enabled", "true"),)


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


async def _enrich(signals: list[CapacitySignal], lookup: InstanceLookup | None, log: Any) -> list[CapacitySignal]:
    """Signals completed from their instances; on an EC2 error, as they were (a launch of unknown
    capacity type then counts for nothing, which errs on the side of not draining)."""
    if lookup is None or not signals:
        return signals
    try:
        return await lookup.enrich(signals)
    except (ClientError, BotoCoreError) as exc:
        log.warning("instance_lookup_failed", error=str(exc))
        return signals


def _log_signals(log: Any, signals: Iterable[CapacitySignal]) -> None:
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


def _sent_at(message: Mapping[str, Any]) -> datetime | None:
    try:
        return datetime.fromtimestamp(int(message["Attributes"]["SentTimestamp"]) / 1000, UTC)
    except (KeyError, TypeError, ValueError):
        return None


def _incomplete(signal: CapacitySignal) -> bool:
    return signal.pool.wildcard or signal.capacity_type == CapacityType.UNKNOWN


# --- SQS --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SqsMessage:
    receipt_handle: str
    body: str
    message_id: str
    sent_at: datetime | None = None  # SentTimestamp


SignalHandler = Callable[[list[CapacitySignal]], Awaitable[None] | None]
AsgView = Callable[[], Mapping[str, AsgInfo]]


class SqsSource:
    """Reads EventBridge events from one SQS queue. A message is deleted only once handled.

    initial_read_done turns True once the backlog present at start is read: at the first receive that
    returns nothing, or whose messages were all sent after this source was made (a busy queue may never
    be empty).
    """

    def __init__(
        self,
        queue_url: str,
        *,
        client: Any = None,
        session: boto3.Session | None = None,
        wait_seconds: int = 20,
        max_messages: int = 10,
        lookup: InstanceLookup | None = None,
        log: Any = None,
    ) -> None:
        self.queue_url = queue_url
        self.wait_seconds = wait_seconds
        self.max_messages = max_messages
        self.lookup = lookup
        self.initial_read_done = False
        self.started_at = datetime.now(UTC)
        self._sqs = AwsApi("sqs", client, session, read_timeout=wait_seconds + 10)
        self._log = log or logging.get("spotd.capacity")

    async def receive(self) -> list[SqsMessage]:
        response = await self._sqs.call(
            "receive_message",
            QueueUrl=self.queue_url,
            MaxNumberOfMessages=self.max_messages,
            WaitTimeSeconds=self.wait_seconds,
            MessageSystemAttributeNames=["SentTimestamp"],
        )
        return [
            SqsMessage(m["ReceiptHandle"], m.get("Body", ""), m.get("MessageId", ""), _sent_at(m))
            for m in response.get("Messages", [])
        ]

    async def delete(self, msgs: Sequence[SqsMessage]) -> None:
        """DeleteMessageBatch, ten at a time; entries SQS refuses are logged (they come back, and
        handling a message twice changes nothing)."""
        for start in range(0, len(msgs), 10):
            batch = msgs[start : start + 10]
            response = await self._sqs.call(
                "delete_message_batch",
                QueueUrl=self.queue_url,
                Entries=[{"Id": str(i), "ReceiptHandle": m.receipt_handle} for i, m in enumerate(batch)],
            )
            for failed in response.get("Failed", []):
                self._log.warning(
                    "sqs_delete_failed",
                    message_id=batch[int(failed["Id"])].message_id,
                    code=failed.get("Code"),
                    error=failed.get("Message"),
                )

    async def poll_once(self, on_signals: SignalHandler, asgs: AsgView | None = None) -> int:
        """One receive: parse each message, hand its signals over, then delete what was handled.

        Malformed: logged, counted, deleted. Unknown event type: counted as ignored, deleted. A message
        whose handling raised stays in the queue (visible again after the visibility timeout; a
        redrive policy on the queue ends a poison message). Returns the number of messages received.
        """
        msgs = await self.receive()
        if not msgs:
            self.initial_read_done = True
            return 0
        backlog_read = all(m.sent_at is not None and m.sent_at >= self.started_at for m in msgs)
        view = asgs() if asgs else {}
        done: list[SqsMessage] = []
        for msg in msgs:
            outcome = await self._handle(msg, on_signals, view)
            metrics.SQS_MESSAGES.labels(outcome).inc()
            if outcome != "failed":
                done.append(msg)
        if done:
            await self.delete(done)
        self.initial_read_done = self.initial_read_done or backlog_read
        return len(msgs)

    async def _handle(self, msg: SqsMessage, on_signals: SignalHandler, view: Mapping[str, AsgInfo]) -> str:
        try:
            result = read_event(msg.body)
        except MalformedEvent as exc:
            self._log.warning("sqs_message_malformed", message_id=msg.message_id, error=str(exc), body=msg.body[:200])
            return "malformed"
        if result is None:
            self._log.debug("sqs_message_ignored", message_id=msg.message_id)
            return "ignored"
        signal = launch_signal(result, "sqs", view)
        if signal is None:
            return "handled"
        signals = await _enrich([signal], self.lookup, self._log)
        try:
            outcome = on_signals(signals)
            if inspect.isawaitable(outcome):
                await outcome
        except Exception as exc:
            self._log.warning("sqs_message_failed", message_id=msg.message_id, error=repr(exc))
            return "failed"
        metrics.count_signals(signals)
        _log_signals(self._log, signals)
        return "handled"

    async def run(self, on_signals: SignalHandler, asgs: AsgView | None = None, retry_after: float = 5.0) -> None:
        """poll_once forever; an AWS error is logged and counted, and the loop carries on."""
        while True:
            try:
                await self.poll_once(on_signals, asgs)
            except (ClientError, BotoCoreError) as exc:
                LOOP_ERRORS.labels("sqs").inc()
                self._log.warning("sqs_receive_failed", error=str(exc))
                await asyncio.sleep(retry_after)


# --- Auto Scaling -----------------------------------------------------------------------------------


class ActivityCursor:
    """Which scaling activities of one ASG are new (pure). Activities come newest first, in-progress
    ones on top; a finished activity is taken once. Reading stops at `stop_at`: the history window on
    the first read, then an hour before the newest activity already taken (in-progress launches that
    finish later still show up)."""

    SLACK = timedelta(hours=1)

    def __init__(self, history: timedelta) -> None:
        self.history = history
        self._seen: dict[str, datetime] = {}
        self._taken: dict[str, datetime] = {}  # this read's, until commit (or rollback on an error)
        self.high_water: datetime | None = None

    def stop_at(self, now: datetime) -> datetime:
        horizon = now - self.history
        return max(horizon, self.high_water - self.SLACK) if self.high_water else horizon

    def take(self, activities: Iterable[Mapping[str, Any]], now: datetime) -> tuple[list[Mapping[str, Any]], bool]:
        """(new finished activities of this page, whether the next page may still hold new ones)."""
        stop = self.stop_at(now)
        new: list[Mapping[str, Any]] = []
        more = True
        for activity in activities:
            start = _start_time(activity)
            if start is None:
                continue
            if start < stop:
                more = False
                continue
            aid = str(activity.get("ActivityId", ""))
            done = activity.get("StatusCode") in ("Successful", "Failed", "Cancelled")
            if not done or aid in self._seen or aid in self._taken:
                continue
            self._taken[aid] = start
            new.append(activity)
        return new, more

    def rollback(self) -> None:
        """The read failed part way: what it took will be taken again by the next read."""
        self._taken = {}

    def commit(self, now: datetime) -> None:
        """After a full read: remember what was taken, move the high-water mark, forget what fell out of
        the window."""
        self._seen.update(self._taken)
        self._taken = {}
        if self._seen:
            self.high_water = max(self._seen.values())
        horizon = now - self.history - self.SLACK
        self._seen = {aid: t for aid, t in self._seen.items() if t >= horizon}


def _start_time(activity: Mapping[str, Any]) -> datetime | None:
    value = activity.get("StartTime")
    try:
        if isinstance(value, datetime):
            return value if value.tzinfo else value.replace(tzinfo=UTC)
        return parse_iso_time(value) if isinstance(value, str) else None
    except ValueError:
        return None


class AsgSource:
    """Discovers the ASGs by tag and reads their scaling activities (the Spot ones only)."""

    MAX_PAGES = 10

    def __init__(
        self,
        *,
        tag_filters: Sequence[tuple[str, str | None]] = DEFAULT_TAG_FILTERS,
        autoscaling_client: Any = None,
        ec2_client: Any = None,
        session: boto3.Session | None = None,
        history: timedelta = timedelta(hours=24),
        lookup: InstanceLookup | None = None,
        log: Any = None,
    ) -> None:
        self.tag_filters = tuple(tag_filters)
        self.history = history
        self.lookup = lookup
        self.asgs: dict[str, AsgInfo] = {}
        self.initial_read_done = False
        self.last_read_complete = False
        self._autoscaling = AwsApi("autoscaling", autoscaling_client, session)
        self._ec2 = AwsApi("ec2", ec2_client, session)
        self._cursors: dict[str, ActivityCursor] = {}
        self._log = log or logging.get("spotd.capacity")

    async def discover(self) -> dict[str, AsgInfo]:
        """Every ASG carrying the tags (value None: any value), with its types, zones and markets."""
        filters = [
            {"Name": "tag-key", "Values": [key]} if value is None else {"Name": f"tag:{key}", "Values": [value]}
            for key, value in self.tag_filters
        ]
        found: dict[str, AsgInfo] = {}
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Filters": filters}
            if token:
                kwargs["NextToken"] = token
            response = await self._autoscaling.call("describe_auto_scaling_groups", **kwargs)
            for group in response.get("AutoScalingGroups", []):
                info = await self._describe_group(group)
                found[info.name] = info
            token = response.get("NextToken")
            if not token:
                break
        self.asgs = found
        return found

    async def _describe_group(self, group: Mapping[str, Any]) -> AsgInfo:
        name = str(group["AutoScalingGroupName"])
        zones = tuple(sorted(group.get("AvailabilityZones", [])))
        mip = group.get("MixedInstancesPolicy")
        try:
            if mip:
                dist = mip.get("InstancesDistribution", {})
                pct = int(dist.get("OnDemandPercentageAboveBaseCapacity", 100))
                base = int(dist.get("OnDemandBaseCapacity", 0))
                lt = mip.get("LaunchTemplate", {})
                types = tuple(o["InstanceType"] for o in lt.get("Overrides", []) if o.get("InstanceType"))
                if not types and not any(o.get("InstanceRequirements") for o in lt.get("Overrides", [])):
                    data = await self._template_data(lt.get("LaunchTemplateSpecification", {}))
                    types = (data["InstanceType"],) if data.get("InstanceType") else ()
                return AsgInfo(name, types, zones, spot=pct < 100, on_demand=pct > 0 or base > 0)
            if group.get("LaunchTemplate"):
                data = await self._template_data(group["LaunchTemplate"])
                spot = data.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
                types = (data["InstanceType"],) if data.get("InstanceType") else ()
                return AsgInfo(name, types, zones, spot=spot, on_demand=not spot)
            if group.get("LaunchConfigurationName"):
                response = await self._autoscaling.call(
                    "describe_launch_configurations", LaunchConfigurationNames=[group["LaunchConfigurationName"]]
                )
                configs = response.get("LaunchConfigurations", [])
                lc = configs[0] if configs else {}
                spot = bool(lc.get("SpotPrice"))
                types = (lc["InstanceType"],) if lc.get("InstanceType") else ()
                return AsgInfo(name, types, zones, spot=spot, on_demand=not spot)
        except (ClientError, BotoCoreError) as exc:
            self._log.warning("asg_describe_failed", asg=name, error=str(exc))
        return AsgInfo(name, (), zones, spot=bool(mip), on_demand=True)

    async def _template_data(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"Versions": [str(spec.get("Version") or "$Default")]}
        if spec.get("LaunchTemplateId"):
            kwargs["LaunchTemplateId"] = spec["LaunchTemplateId"]
        elif spec.get("LaunchTemplateName"):
            kwargs["LaunchTemplateName"] = spec["LaunchTemplateName"]
        else:
            return {}
        response = await self._ec2.call("describe_launch_template_versions", **kwargs)
        versions = response.get("LaunchTemplateVersions", [])
        return dict(versions[0].get("LaunchTemplateData", {})) if versions else {}

    async def read_activities(self, now: datetime | None = None) -> list[CapacitySignal]:
        """Signals from the activities finished since the last read, of every Spot ASG discovered. The
        first read returns the history window, so a restart learns the current state."""
        now = now or datetime.now(UTC)
        signals: list[CapacitySignal] = []
        self.last_read_complete = True
        for name, info in sorted(self.asgs.items()):
            if not info.spot:
                continue
            cursor = self._cursors.setdefault(name, ActivityCursor(self.history))
            try:
                signals.extend(await self._read_group(name, cursor, now))
            except (ClientError, BotoCoreError) as exc:
                # The other groups' signals still count; this group's activities are read again next time.
                cursor.rollback()
                self.last_read_complete = False
                self._log.warning("asg_activities_failed", asg=name, error=str(exc))
                continue
            cursor.commit(now)
        for gone in set(self._cursors) - set(self.asgs):
            del self._cursors[gone]
        signals = await _enrich(signals, self.lookup, self._log)
        metrics.count_signals(signals)
        _log_signals(self._log, signals)
        return signals

    async def _read_group(self, name: str, cursor: ActivityCursor, now: datetime) -> list[CapacitySignal]:
        signals: list[CapacitySignal] = []
        token: str | None = None
        for _ in range(self.MAX_PAGES):
            kwargs: dict[str, Any] = {"AutoScalingGroupName": name, "MaxRecords": 100}
            if token:
                kwargs["NextToken"] = token
            response = await self._autoscaling.call("describe_scaling_activities", **kwargs)
            new, more = cursor.take(response.get("Activities", []), now)
            signals.extend(s for s in (parse_scaling_activity(a, self.asgs) for a in new) if s)
            token = response.get("NextToken")
            if not token or not more:
                break
        return signals

    async def poll_once(self, now: datetime | None = None) -> list[CapacitySignal]:
        """discover, then read_activities; initial_read_done once both have completed for every group."""
        await self.discover()
        signals = await self.read_activities(now)
        self.initial_read_done = self.initial_read_done or self.last_read_complete
        return signals

    async def run(self, on_signals: SignalHandler, interval: float = 60.0) -> None:
        while True:
            try:
                signals = await self.poll_once()
                if signals:
                    outcome = on_signals(signals)
                    if inspect.isawaitable(outcome):
                        await outcome
            except (ClientError, BotoCoreError) as exc:
                LOOP_ERRORS.labels("asg").inc()
                self._log.warning("asg_read_failed", error=str(exc))
            await asyncio.sleep(interval)

    async def terminate_instance(self, instance_id: str, decrement_desired: bool = True) -> str:
        """TerminateInstanceInAutoScalingGroup; returns the activity id. With decrement_desired the
        group does not launch a replacement (fails if that would take desired below min size)."""
        response = await self._autoscaling.call(
            "terminate_instance_in_auto_scaling_group",
            InstanceId=instance_id,
            ShouldDecrementDesiredCapacity=decrement_desired,
        )
        return str(response.get("Activity", {}).get("ActivityId", ""))
