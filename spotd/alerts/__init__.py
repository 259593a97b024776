"""Alerts pushed to Alertmanager: pure builders (model), flags (flags) and the delivery task (sender)."""
