"""SqsSource: reads the EventBridge Auto Scaling events from one SQS queue into capacity signals."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from spotd.capacity import metrics
from spotd.capacity.signals import AsgInfo, MalformedEvent, launch_signal, read_event
from spotd.capacity.sources.aws import AwsApi, InstanceLookup, SignalHandler, enrich_signals, log_signals
from spotd.common import log as logging
from spotd.common.metrics import LOOP_ERRORS
from spotd.notices.queue_events import InstanceEvent, read_instance_event
from spotd.notices.record import MalformedNotice


def _sent_at(message: Mapping[str, Any]) -> datetime | None:
    try:
        return datetime.fromtimestamp(int(message["Attributes"]["SentTimestamp"]) / 1000, UTC)
    except (KeyError, TypeError, ValueError):
        return None


@dataclass(frozen=True)
class SqsMessage:
    receipt_handle: str
    body: str
    message_id: str
    sent_at: datetime | None = None  # SentTimestamp


KEPT = frozenset({"failed", "deferred"})  # outcomes whose message is not deleted
AsgView = Callable[[], Mapping[str, AsgInfo]]
# An instance event (Spot warning, state change, Health, lifecycle action) -> the message's outcome:
# "handled" (a node of this cluster), "foreign" (no node of this cluster: another cluster's instance),
# "deferred" (not yet: a launch action whose node is not Ready; kept, SQS gives it back later).
InstanceHandler = Callable[[InstanceEvent], str | Awaitable[str]]


class SqsSource:
    """Reads EventBridge events from one SQS queue. A message is deleted only once handled.

    initial_read_done turns True once the backlog is read: at the first receive that returns nothing
    (reset() starts over, at the start of every leadership term). healthy / last_success: whether the last
    receive worked, and when one last did (wall time, 0: never).
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
        self.healthy = False
        self.last_success = 0.0
        self._releasing: set[asyncio.Task[None]] = set()
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

    async def poll_once(
        self, on_signals: SignalHandler, asgs: AsgView | None = None, on_instances: InstanceHandler | None = None
    ) -> int:
        """One receive: parse each message, hand its signals over, then delete what was handled.

        Instance events go to on_instances (without it they are ignored); its answer is the outcome
        (handled, foreign). Malformed: logged, counted, deleted. Unknown event type: counted as ignored,
        deleted. A message
        whose handling raised stays in the queue (visible again after the visibility timeout; a
        redrive policy on the queue ends a poison message). Returns the number of messages received.
        """
        receiving = asyncio.ensure_future(self.receive())
        try:
            # The receive runs in a thread and completes even if we are cancelled (leadership lost):
            # what it got must not stay hidden from the next leader for the visibility timeout.
            msgs = await asyncio.shield(receiving)
        except asyncio.CancelledError:
            receiving.add_done_callback(self._release_orphans)
            raise
        except Exception:
            self.healthy = False
            raise
        self.healthy, self.last_success = True, time.time()
        if not msgs:
            if not self.initial_read_done:
                self._log.info("sqs_backlog_read")
            self.initial_read_done = True
            return 0
        view = asgs() if asgs else {}
        done: list[SqsMessage] = []
        for msg in msgs:
            outcome = await self._handle(msg, on_signals, view, on_instances)
            metrics.SQS_MESSAGES.labels(outcome).inc()
            if outcome not in KEPT:
                done.append(msg)
        if done:
            await self.delete(done)
        return len(msgs)

    def _release_orphans(self, receiving: asyncio.Future[list[SqsMessage]]) -> None:
        if receiving.cancelled() or receiving.exception() is not None or not receiving.result():
            return
        task = asyncio.get_running_loop().create_task(self.release(receiving.result()))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def release(self, msgs: Sequence[SqsMessage]) -> None:
        """ChangeMessageVisibilityBatch to 0: messages received but not handled are visible again at once."""
        for start in range(0, len(msgs), 10):
            batch = msgs[start : start + 10]
            try:
                await self._sqs.call(
                    "change_message_visibility_batch",
                    QueueUrl=self.queue_url,
                    Entries=[
                        {"Id": str(i), "ReceiptHandle": m.receipt_handle, "VisibilityTimeout": 0}
                        for i, m in enumerate(batch)
                    ],
                )
            except (ClientError, BotoCoreError) as exc:  # they come back after the visibility timeout
                self._log.warning("sqs_release_failed", messages=len(batch), error=str(exc))
        self._log.info("sqs_messages_released", messages=len(msgs))

    def reset(self) -> None:
        """A new term: the backlog is to be read again, to empty, before the first decision."""
        self.initial_read_done = False
        self.started_at = datetime.now(UTC)

    async def _handle(
        self,
        msg: SqsMessage,
        on_signals: SignalHandler,
        view: Mapping[str, AsgInfo],
        on_instances: InstanceHandler | None = None,
    ) -> str:
        try:
            event = read_instance_event(msg.body)
        except MalformedNotice as exc:
            self._log.warning("sqs_message_malformed", message_id=msg.message_id, error=str(exc), body=msg.body[:200])
            return "malformed"
        if event is not None:
            return await self._hand_instance_event(msg, event, on_instances)
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
        signals = await enrich_signals([signal], self.lookup, self._log)
        try:
            outcome = on_signals(signals)
            if inspect.isawaitable(outcome):
                await outcome
        except Exception as exc:
            self._log.warning("sqs_message_failed", message_id=msg.message_id, error=repr(exc))
            return "failed"
        metrics.count_signals(signals)
        log_signals(self._log, signals)
        return "handled"

    async def _hand_instance_event(
        self, msg: SqsMessage, event: InstanceEvent, on_instances: InstanceHandler | None
    ) -> str:
        if on_instances is None:
            self._log.debug("sqs_message_ignored", message_id=msg.message_id, kind=event.kind)
            return "ignored"
        try:
            outcome = on_instances(event)
            if inspect.isawaitable(outcome):
                outcome = await outcome
        except Exception as exc:
            self._log.warning("sqs_message_failed", message_id=msg.message_id, kind=event.kind, error=repr(exc))
            return "failed"
        return str(outcome)

    async def run(
        self,
        on_signals: SignalHandler,
        asgs: AsgView | None = None,
        retry_after: float = 5.0,
        on_instances: InstanceHandler | None = None,
    ) -> None:
        """poll_once forever; an AWS error is logged and counted, and the loop carries on."""
        while True:
            try:
                await self.poll_once(on_signals, asgs, on_instances)
            except (ClientError, BotoCoreError) as exc:
                LOOP_ERRORS.labels("sqs").inc()
                self._log.warning("sqs_receive_failed", error=str(exc))
                await asyncio.sleep(retry_after)
