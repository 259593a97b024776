"""The rehearsal's AWS calls: EC2 TerminateInstances (--terminate) and the FIS experiment (--via fis)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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
