"""The AWS readers of capacity signals: EventBridge over SQS, ASG scaling activities, EC2 instance facts.

The only capacity modules that import boto3."""
