"""Auto Scaling lifecycle actions: the hook's HeartbeatTimeout, heartbeats and completion (issue 19).

The calls only: when to make them is the controller's business (spotd.controller.lifecycle). Every call
goes through AwsApi (counted, retried on throttling and 5xx). DescribeLifecycleHooks is cached per
(ASG, hook): a hook's timeout changes only when an operator edits the hook, and the cache is per process.
"""

from __future__ import annotations

from typing import Any

import boto3
from botocore.exceptions import ClientError

from spotd.capacity.sources.aws import AwsApi

CONTINUE, ABANDON = "CONTINUE", "ABANDON"


class LifecycleActionGone(Exception):
    """AWS knows no active lifecycle action for this token: completed already (by us, a previous leader,
    an operator), or timed out with the hook's DefaultResult. Nothing more to do for it."""


def _gone(exc: ClientError) -> bool:
    error = exc.response.get("Error", {})
    # AWS: ValidationError "No active Lifecycle Action found with token ..." (or with instance ID)
    return (
        error.get("Code") == "ValidationError" and "no active lifecycle action" in str(error.get("Message", "")).lower()
    )


class LifecycleActions:
    """DescribeLifecycleHooks (cached), RecordLifecycleActionHeartbeat, CompleteLifecycleAction."""

    def __init__(self, *, client: Any = None, session: boto3.Session | None = None) -> None:
        self._autoscaling = AwsApi("autoscaling", client, session)
        self._timeouts: dict[tuple[str, str], float | None] = {}

    async def heartbeat_timeout(self, asg: str, hook: str) -> float | None:
        """The hook's HeartbeatTimeout in seconds, None when the hook is not found (deleted since)."""
        key = (asg, hook)
        if key not in self._timeouts:
            response = await self._autoscaling.call(
                "describe_lifecycle_hooks", AutoScalingGroupName=asg, LifecycleHookNames=[hook]
            )
            found = [h for h in response.get("LifecycleHooks", []) if h.get("LifecycleHookName") == hook]
            timeout = found[0].get("HeartbeatTimeout") if found else None
            if timeout is None:
                return None  # not cached: the hook may be created a moment later
            self._timeouts[key] = float(timeout)
        return self._timeouts[key]

    async def heartbeat(self, asg: str, hook: str, token: str, instance_id: str) -> None:
        """Restart the hook's timeout; LifecycleActionGone when there is no such action any more."""
        await self._call(
            "record_lifecycle_action_heartbeat",
            AutoScalingGroupName=asg,
            LifecycleHookName=hook,
            LifecycleActionToken=token,
            InstanceId=instance_id,
        )

    async def complete(self, asg: str, hook: str, token: str, instance_id: str, result: str = CONTINUE) -> None:
        """End the action with result (CONTINUE: the instance goes on to terminate, or into service for a
        launch); LifecycleActionGone when there is no such action any more."""
        await self._call(
            "complete_lifecycle_action",
            AutoScalingGroupName=asg,
            LifecycleHookName=hook,
            LifecycleActionToken=token,
            InstanceId=instance_id,
            LifecycleActionResult=result,
        )

    async def _call(self, method: str, **kwargs: Any) -> None:
        try:
            await self._autoscaling.call(method, **kwargs)
        except ClientError as exc:
            if _gone(exc):
                raise LifecycleActionGone(str(exc)) from None
            raise
