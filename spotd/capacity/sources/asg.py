"""AsgSource: discovers the ASGs by tag and reads their scaling activities into capacity signals."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from spotd.capacity import metrics
from spotd.capacity.pools import UnreadGroup
from spotd.capacity.signals import AsgInfo, CapacitySignal, parse_scaling_activity
from spotd.capacity.sources.aws import (
    AwsApi,
    AwsStartupError,
    InstanceLookup,
    SignalHandler,
    access_denied,
    enrich_signals,
    log_signals,
    one_line,
)
from spotd.common import log as logging
from spotd.common.metrics import LOOP_ERRORS
from spotd.common.parsing import parse_iso_time

DEFAULT_TAG_FILTERS: tuple[tuple[str, str | None], ...] = (("k8s.io/cluster-autoscaler/enabled", "true"),)


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


def tag_filters(tags: Iterable[tuple[str, str | None]]) -> list[dict[str, Any]]:
    """DescribeAutoScalingGroups filters for KEY (any value) or KEY=VALUE tags."""
    return [
        {"Name": "tag-key", "Values": [key]} if value is None else {"Name": f"tag:{key}", "Values": [value]}
        for key, value in tags
    ]


class DiscoveryDenied(Exception):
    """A group's launch template or configuration read was refused (AccessDenied). At start (a strict
    discovery) the whole discovery fails, a start error; in the loop the group is handled as another failed
    read (previous AsgInfo kept, or unread). The message names the action and the group."""


class EmptyAnswer(Exception):
    """A launch template or configuration read answered with none: the group's market is unknown, like a
    failed read (never taken as on-demand)."""


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
        fallback_tag: tuple[str, str | None] | None = None,
    ) -> None:
        self.tag_filters = tuple(tag_filters)
        self.fallback_tag = fallback_tag
        self.fallback_instances: frozenset[str] = frozenset()  # instances of the ASGs tagged fallback_tag
        self.healthy = False
        self.last_success = 0.0
        self.history = history
        self.lookup = lookup
        self.asgs: dict[str, AsgInfo] = {}
        self.undescribed: dict[str, str] = {}  # the groups whose description failed in the last discovery: error
        self.unread: dict[str, UnreadGroup] = {}  # those of them never described (left out of asgs)
        self.initial_read_done = False
        self.last_read_complete = False
        self._autoscaling = AwsApi("autoscaling", autoscaling_client, session)
        self._ec2 = AwsApi("ec2", ec2_client, session)
        self._cursors: dict[str, ActivityCursor] = {}
        self._log = log or logging.get("spotd.capacity")

    async def discover_fallback(self) -> frozenset[str]:
        """The instance ids of every ASG carrying the fallback tag (--fallback-asg-tag)."""
        if self.fallback_tag is None:
            return frozenset()
        found: set[str] = set()
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Filters": tag_filters([self.fallback_tag])}
            if token:
                kwargs["NextToken"] = token
            response = await self._autoscaling.call("describe_auto_scaling_groups", **kwargs)
            for group in response.get("AutoScalingGroups", []):
                found.update(str(i["InstanceId"]) for i in group.get("Instances", []) if i.get("InstanceId"))
            token = response.get("NextToken")
            if not token:
                break
        self.fallback_instances = frozenset(found)
        return self.fallback_instances

    def reset(self) -> None:
        """A new term: discover and read the activities' history window again before the first decision."""
        self.initial_read_done = False
        self._cursors = {}

    async def discover(self, strict: bool = False) -> dict[str, AsgInfo]:
        """Every ASG carrying the tags (value None: any value), with its types, zones and markets.

        A group whose description fails keeps the AsgInfo of the previous discovery, or, never described, is
        left out (unknown: neither Spot nor on-demand) and listed in `unread` with the zones and types it may
        cover (the pools there are unknown, see pools.spot_where_known); each is logged (asg_describe_failed,
        or asg_discovery_denied at error level for AccessDenied), counted (spotd_loop_errors_total{loop="asg"})
        and listed in `undescribed`. The other groups are discovered as usual. strict (at start): AccessDenied
        on a group's read raises DiscoveryDenied instead. A failed DescribeAutoScalingGroups raises."""
        filters = tag_filters(self.tag_filters)
        found: dict[str, AsgInfo] = {}
        undescribed: dict[str, str] = {}
        unread: dict[str, UnreadGroup] = {}
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Filters": filters}
            if token:
                kwargs["NextToken"] = token
            response = await self._autoscaling.call("describe_auto_scaling_groups", **kwargs)
            for group in response.get("AutoScalingGroups", []):
                name = str(group["AutoScalingGroupName"])
                try:
                    found[name] = await self._describe_group(group)
                except (ClientError, BotoCoreError, EmptyAnswer, DiscoveryDenied) as exc:
                    # Throttled, 5xx (after the retries), cut off, a template deleted, refused since the start:
                    # which market the group launches in is unknown; one such group must not stop the reads
                    # of the others.
                    if strict and isinstance(exc, DiscoveryDenied):
                        raise
                    undescribed[name] = one_line(str(exc))
                    previous = self.asgs.get(name)
                    if previous is not None:
                        found[name] = previous
                    else:
                        unread[name] = _unread_group(group)
                    LOOP_ERRORS.labels("asg").inc()
                    event = "asg_discovery_denied" if isinstance(exc, DiscoveryDenied) else "asg_describe_failed"
                    report = self._log.error if isinstance(exc, DiscoveryDenied) else self._log.warning
                    report(event, asg=name, error=undescribed[name], kept_previous=previous is not None)
            token = response.get("NextToken")
            if not token:
                break
        self.asgs = found
        self.undescribed = undescribed
        self.unread = unread
        return found

    async def _describe_group(self, group: Mapping[str, Any]) -> AsgInfo:
        """The group's AsgInfo. AccessDenied raises DiscoveryDenied; any other failed read raises as it came,
        and an empty answer raises EmptyAnswer."""
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
                if not configs:
                    raise EmptyAnswer(f"no launch configuration {group['LaunchConfigurationName']} in the answer")
                lc = configs[0]
                spot = bool(lc.get("SpotPrice"))
                types = (lc["InstanceType"],) if lc.get("InstanceType") else ()
                return AsgInfo(name, types, zones, spot=spot, on_demand=not spot)
        except (ClientError, BotoCoreError) as exc:
            if access_denied(exc):
                raise DiscoveryDenied(one_line(f"ASG {name}: {_denied_action(group)} refused: {exc}")) from exc
            raise
        return AsgInfo(name, (), zones, spot=False, on_demand=True)  # no template nor configuration named

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
        if not versions:
            template = kwargs.get("LaunchTemplateId") or kwargs.get("LaunchTemplateName")
            raise EmptyAnswer(f"no version {kwargs['Versions'][0]} of launch template {template} in the answer")
        return dict(versions[0].get("LaunchTemplateData", {}))

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
        signals = await enrich_signals(signals, self.lookup, self._log)
        metrics.count_signals(signals)
        log_signals(self._log, signals)
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

    async def check_discovery(self) -> None:
        """At start: the discovery as the leader will make it (the groups, and the launch templates or
        configurations saying which are Spot), then one read of a Spot group's scaling activities, which the
        loop reads for every Spot group. AccessDenied on any of them raises AwsStartupError (one line);
        other errors are left to the loop, which tries again (a group whose description failed is left out
        of the discovery meanwhile, see discover)."""
        try:
            await self.discover(strict=True)
            await self.discover_fallback()
        except DiscoveryDenied as exc:
            raise AwsStartupError(f"ASG discovery failed: {exc}") from None
        except ClientError as exc:
            if access_denied(exc):
                action = "autoscaling:DescribeAutoScalingGroups"
                raise AwsStartupError(one_line(f"ASG discovery failed: {action} refused: {exc}")) from None
            self._log.warning("asg_discovery_failed", error=str(exc))
            return
        except BotoCoreError as exc:
            self._log.warning("asg_discovery_failed", error=str(exc))
            return
        await self._check_activities()

    async def _check_activities(self) -> None:
        """One DescribeScalingActivities (one record) of the first Spot group discovered, if any."""
        spot = sorted(name for name, info in self.asgs.items() if info.spot)
        if not spot:
            return
        try:
            await self._autoscaling.call("describe_scaling_activities", AutoScalingGroupName=spot[0], MaxRecords=1)
        except (ClientError, BotoCoreError) as exc:
            if access_denied(exc):
                action = "autoscaling:DescribeScalingActivities"
                raise AwsStartupError(
                    one_line(f"ASG activities read failed: ASG {spot[0]}: {action} refused: {exc}")
                ) from None
            self._log.warning("asg_activities_failed", asg=spot[0], error=str(exc))

    async def poll_once(self, now: datetime | None = None) -> list[CapacitySignal]:
        """discover (and the fallback ASGs), then read_activities of every group known. healthy only when
        every group was described and read; initial_read_done once every known group has been read (a group
        whose description keeps failing is left out, logged and counted each pass, and holds nothing up)."""
        try:
            await self.discover()
            await self.discover_fallback()
            signals = await self.read_activities(now)
        except Exception:
            self.healthy = False
            raise
        self.healthy = self.last_read_complete and not self.undescribed
        if self.healthy:
            self.last_success = time.time()
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


def _unread_group(group: Mapping[str, Any]) -> UnreadGroup:
    """What a group never described may cover: its zones, and the instance types its MixedInstancesPolicy
    overrides name (None when it names none: a template's type, instance requirements, unknown)."""
    overrides = (group.get("MixedInstancesPolicy") or {}).get("LaunchTemplate", {}).get("Overrides", [])
    types = tuple(str(o["InstanceType"]) for o in overrides if o.get("InstanceType"))
    only_types = types if types and not any(o.get("InstanceRequirements") for o in overrides) else None
    what = "launch template" if _denied_action(group).startswith("ec2:") else "launch configuration"
    return UnreadGroup(
        name=str(group["AutoScalingGroupName"]),
        zones=tuple(sorted(group.get("AvailabilityZones", []))),
        instance_types=only_types,
        why=f"its {what} could not be read",
    )


def _denied_action(group: Mapping[str, Any]) -> str:
    """The read _describe_group made for the group: its launch template's, or its launch configuration's."""
    if group.get("MixedInstancesPolicy") or group.get("LaunchTemplate"):
        return "ec2:DescribeLaunchTemplateVersions"
    return "autoscaling:DescribeLaunchConfigurations"
