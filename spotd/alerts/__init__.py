"""Alerts pushed to Alertmanager: pure builders (model), flags (cli) and the delivery task (sender)."""

from spotd.alerts.cli import AlertConfig, add_alert_arguments, alert_config_from_args
from spotd.alerts.model import (
    Alert,
    NodeInfo,
    node_drain_incomplete_alert,
    on_demand_drain_blocked_alert,
    on_demand_fallback_alert,
    spot_capacity_unavailable_alert,
    spot_interruption_alert,
)
from spotd.alerts.sender import Alerter

__all__ = [
    "Alert",
    "AlertConfig",
    "Alerter",
    "NodeInfo",
    "add_alert_arguments",
    "alert_config_from_args",
    "node_drain_incomplete_alert",
    "on_demand_drain_blocked_alert",
    "on_demand_fallback_alert",
    "spot_capacity_unavailable_alert",
    "spot_interruption_alert",
]
