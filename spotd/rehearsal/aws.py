"""The rehearsal's AWS calls: EC2 TerminateInstances (--terminate), the FIS experiment (--via fis) and the
Spot warnings sent to the controller's queue (--via-queue)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any
from urllib.parse import urlparse

from spotd.notices.queue_events import rehearsal_spot_warning
from spotd.rehearsal.targets import RehearsalRefused, Target

# boto3 is imported only in this module, and only inside the calls


def region_of(zone: str) -> str:
    return zone[:-1] if zone[-1:].isalpha() else zone


def iso_duration(seconds: float) -> str:
    """120 -> PT2M, 150 -> PT150S (FIS durations)."""
    whole = int(seconds)
    return f"PT{whole // 60}M" if whole % 60 == 0 else f"PT{whole}S"


def fis_template(instance_arns: Sequence[str], role_arn: str, notice: float, token: str) -> dict[str, Any]:
    """CreateExperimentTemplate arguments: one Spot interruption action on exactly these instances."""
    return {
        "clientToken": token,
        "description": "spotd simulate-reclaim",
        "roleArn": role_arn,
        "stopConditions": [{"source": "none"}],
        "targets": {
            "SpotInstances": {
                "resourceType": "aws:ec2:spot-instance",
                "resourceArns": list(instance_arns),
                "selectionMode": "ALL",
            }
        },
        "actions": {
            "interrupt": {
                "actionId": "aws:ec2:send-spot-instance-interruptions",
                "description": "Spot interruption notice, then the interruption",
                "parameters": {"durationBeforeInterruption": iso_duration(notice)},
                "targets": {"SpotInstances": "SpotInstances"},
            }
        },
        "tags": {"spotd.io/simulate-reclaim": "true"},
    }


def _one_region(targets: Sequence[Target]) -> str:
    regions = {region_of(t.zone or t.provider_id.split("/")[-2]) for t in targets}
    if len(regions) != 1:
        raise RehearsalRefused(f"nodes span regions {sorted(regions)}; rehearse one region at a time")
    return regions.pop()


def start_fis_experiment(targets: Sequence[Target], role_arn: str, notice: float) -> str:
    """Create the template and start the experiment; the experiment ID."""
    import uuid

    import boto3

    region = _one_region(targets)
    account = boto3.client("sts", region_name=region).get_caller_identity()["Account"]
    arns = [f"arn:aws:ec2:{region}:{account}:instance/{t.instance_id}" for t in targets]
    fis = boto3.client("fis", region_name=region)
    template = fis.create_experiment_template(**fis_template(arns, role_arn, notice, str(uuid.uuid4())))
    started = fis.start_experiment(
        clientToken=str(uuid.uuid4()), experimentTemplateId=template["experimentTemplate"]["id"]
    )
    return str(started["experiment"]["id"])


def terminate_instances(targets: Sequence[Target]) -> None:
    import boto3

    by_region: dict[str, list[str]] = {}
    for t in targets:
        by_region.setdefault(region_of(t.zone or t.provider_id.split("/")[-2]), []).append(t.instance_id)
    for region, ids in by_region.items():
        boto3.client("ec2", region_name=region).terminate_instances(InstanceIds=ids)


def queue_region_account(queue_url: str) -> tuple[str, str]:
    """(region, account) of an SQS queue URL https://sqs.<region>.amazonaws.com/<account>/<name>; "" where
    the URL does not say (a local endpoint)."""
    parsed = urlparse(queue_url)
    host = (parsed.hostname or "").split(".")
    region = host[1] if len(host) > 3 and host[0] == "sqs" else ""
    parts = [p for p in parsed.path.split("/") if p]
    account = parts[0] if len(parts) == 2 and parts[0].isdigit() else ""
    return region, account


def send_queue_notices(
    queue_url: str, targets: Sequence[Target], at: datetime, deadline: datetime, rehearsal: str
) -> list[str]:
    """One rehearsal Spot warning per target to the controller's queue (sqs:SendMessage); the message ids."""
    import boto3

    region, account = queue_region_account(queue_url)
    sqs = boto3.client("sqs", region_name=region or None)
    sent = []
    for t in targets:
        zone_region = region_of(t.zone) if t.zone else region
        body = rehearsal_spot_warning(t.instance_id, at, deadline, rehearsal, zone_region, account)
        sent.append(str(sqs.send_message(QueueUrl=queue_url, MessageBody=body)["MessageId"]))
    return sent
