"""AWS for the embedded cluster's autoscaler: moto (SQS) in this process, and the Auto Scaling events a
launch produces, as EventBridge delivers them to a queue (what the controller's SQS source reads)."""

from __future__ import annotations

import contextlib
import json
import os
from datetime import datetime
from typing import Any

from spotd.common.parsing import format_time
from spotd.sim.ca_model import SimulatedGroup

QUEUE = "spotd-capacity-events"
REGION = "us-east-1"


class MotoMissing(RuntimeError):
    """moto is not installed (it comes with the `test` extra)."""


class AwsEvents:
    """moto in this process (SQS), and the Auto Scaling events the autoscaler's launches produce."""

    def __init__(self) -> None:
        try:
            from moto.server import ThreadedMotoServer
        except ImportError:
            raise MotoMissing(
                "--scenario fallback runs the real controller, which reads ICE from SQS: it needs moto "
                "(pip install 'spotd[test]', or scripts/setup --test)"
            ) from None
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.endpoint = ""
        self.queue_url = ""
        self.sqs: Any = None
        self.sent = 0

    def start(self) -> None:
        import boto3

        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.sqs = boto3.client(
            "sqs",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        self.queue_url = self.sqs.create_queue(QueueName=QUEUE)["QueueUrl"]

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.server.stop()

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SPOTD_"))}
        env.update(
            {
                "AWS_ENDPOINT_URL": self.endpoint,
                "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": REGION,
                "AWS_REGION": REGION,
                "AWS_EC2_METADATA_DISABLED": "true",
                "AWS_CONFIG_FILE": os.devnull,
                "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            }
        )
        return env

    def launch_event(self, group: SimulatedGroup, at: datetime, message: str, instance_id: str = "") -> str:
        ok = not message
        when = format_time(at)
        self.sent += 1
        detail: dict[str, Any] = {
            "StatusCode": "InProgress" if ok else "Failed",
            "AutoScalingGroupName": group.name,
            "ActivityId": f"sim-{self.sent:06d}",
            "Details": {"Availability Zone": group.zone, "Subnet ID": "subnet-sim"},
            "StatusMessage": message,
            "StartTime": when,
            "EndTime": when,
            "EC2InstanceId": instance_id,
        }
        return json.dumps(
            {
                "version": "0",
                "id": f"sim-{self.sent:06d}",
                "detail-type": "EC2 Instance Launch Successful" if ok else "EC2 Instance Launch Unsuccessful",
                "source": "aws.autoscaling",
                "time": when,
                "region": REGION,
                "detail": detail,
            }
        )

    def send(self, body: str) -> None:
        self.sqs.send_message(QueueUrl=self.queue_url, MessageBody=body)
