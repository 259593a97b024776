"""Spot capacity per pool: signal parsing (signals) and the pool state machine (pools), both pure; the AWS
readers live in sources/, so the agent never loads boto3."""
