"""The alerting flags (shared by agent and controller) and their validation into an AlertConfig."""

from __future__ import annotations

import argparse
import os
import re
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from spotd.common.log import redact
from spotd.common.parsing import parse_duration, parse_key_value

# Alertmanager rejects a whole batch over one label name outside this syntax.
_PROM_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


@dataclass(frozen=True)
class AlertConfig:
    """Validated alerting settings. No urls: alerting is off and the Alerter accepts calls and does nothing.

    resend_interval: active alerts are re-sent this often, each valid (endsAt) for 4 intervals.
    queue_size: pending alerts per Alertmanager; when full the oldest is dropped.
    timeout: one POST, connect to last byte. resolved_retention: how long a resolution is re-sent.
    """

    urls: tuple[str, ...] = ()
    bearer_token_file: str | None = None
    ca_file: str | None = None
    cluster_name: str = ""
    extra_labels: Mapping[str, str] = field(default_factory=dict)
    resend_interval: float = 60.0
    queue_size: int = 1000
    timeout: float = 10.0
    resolved_retention: float = 900.0
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    batch_size: int = 64
    shutdown_timeout: float = 2.0

    @property
    def enabled(self) -> bool:
        return bool(self.urls)

    def labels(self) -> dict[str, str]:
        """Labels added to every alert: --alert-label, then cluster from --cluster-name."""
        out = dict(self.extra_labels)
        if self.cluster_name:
            out["cluster"] = self.cluster_name
        return out


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


class _AppendOverEnv(argparse._AppendAction):
    """action="append" whose first use replaces the environment default instead of adding to it."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        if getattr(namespace, self.dest, None) is self.default:
            setattr(namespace, self.dest, [])
        super().__call__(parser, namespace, values, option_string)


def add_alert_arguments(parser: argparse.ArgumentParser, env: Mapping[str, str] | None = None) -> None:
    """Add the Alertmanager flags; each defaults to its SPOTD_* environment variable, and flags win."""
    env = os.environ if env is None else env
    group = parser.add_argument_group("alerts (Alertmanager API v2)")
    group.add_argument(
        "--alertmanager-url",
        action=_AppendOverEnv,
        default=_split(env.get("SPOTD_ALERTMANAGER_URL", "")),
        metavar="URL",
        help="Alertmanager to push alerts to; repeat for every member of an HA set, each gets every alert. "
        "Basic auth as http://user:password@host:9093. Env SPOTD_ALERTMANAGER_URL (comma-separated). "
        "None: alerting is off.",
    )
    group.add_argument(
        "--alertmanager-bearer-token-file",
        default=env.get("SPOTD_ALERTMANAGER_BEARER_TOKEN_FILE", ""),
        metavar="PATH",
        help="send 'Authorization: Bearer <file contents>', re-read when the file changes. "
        "Env SPOTD_ALERTMANAGER_BEARER_TOKEN_FILE.",
    )
    group.add_argument(
        "--alertmanager-ca-file",
        default=env.get("SPOTD_ALERTMANAGER_CA_FILE", ""),
        metavar="PATH",
        help="PEM CA bundle to verify https Alertmanagers with. Env SPOTD_ALERTMANAGER_CA_FILE.",
    )
    group.add_argument(
        "--cluster-name",
        default=env.get("SPOTD_CLUSTER_NAME", ""),
        help="added to every alert as label cluster. Env SPOTD_CLUSTER_NAME.",
    )
    group.add_argument(
        "--alert-label",
        action=_AppendOverEnv,
        default=_split(env.get("SPOTD_ALERT_LABEL", "")),
        metavar="KEY=VALUE",
        help="label added to every alert; repeatable. Env SPOTD_ALERT_LABEL (comma-separated).",
    )
    group.add_argument(
        "--alert-resend-interval",
        default=env.get("SPOTD_ALERT_RESEND_INTERVAL", "1m"),
        metavar="DURATION",
        help="re-send active alerts this often; keep it under Alertmanager's resolve_timeout (default 5m). "
        "Env SPOTD_ALERT_RESEND_INTERVAL. Default 1m.",
    )
    group.add_argument(
        "--alert-queue-size",
        default=env.get("SPOTD_ALERT_QUEUE_SIZE", "1000"),
        metavar="N",
        help="alerts waiting per Alertmanager; when full the oldest is dropped and counted. "
        "Env SPOTD_ALERT_QUEUE_SIZE. Default 1000.",
    )
    group.add_argument(
        "--alertmanager-timeout",
        default=env.get("SPOTD_ALERTMANAGER_TIMEOUT", "10s"),
        metavar="DURATION",
        help="limit for one POST to one Alertmanager. Env SPOTD_ALERTMANAGER_TIMEOUT. Default 10s.",
    )


def _check_url(text: str) -> str:
    shown = redact(text)
    try:
        url = urlsplit(text)
        url.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError:
        raise ValueError(f"--alertmanager-url: {shown!r} is not an http(s) URL") from None
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError(f"--alertmanager-url: {shown!r} is not an http(s) URL")
    if url.query or url.fragment:
        raise ValueError(f"--alertmanager-url: {shown!r} must not have a query or fragment")
    return text


def _check_readable(flag: str, path: str) -> str:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise ValueError(f"{flag}: cannot read {path!r}: {exc.strerror or exc}") from None
    return path


def _check_label(text: str) -> tuple[str, str]:
    try:
        key, value = parse_key_value(text)
    except ValueError as exc:
        raise ValueError(f"--alert-label: {exc}") from None
    if not _PROM_LABEL_NAME.match(key):
        raise ValueError(f"--alert-label: {key!r} is not an Alertmanager label name ([a-zA-Z_][a-zA-Z0-9_]*)")
    return key, value


def _positive_duration(flag: str, text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise ValueError(f"{flag}: {exc}") from None
    if seconds <= 0:
        raise ValueError(f"{flag}: must be more than 0")
    return seconds


def alert_config_from_args(args: argparse.Namespace) -> AlertConfig:
    """Validate the alerting flags once at start. Raises ValueError with one line naming the flag."""
    urls: Sequence[str] = args.alertmanager_url or ()
    token_file = args.alertmanager_bearer_token_file or None
    ca_file = args.alertmanager_ca_file or None
    if token_file:
        _check_readable("--alertmanager-bearer-token-file", token_file)
    if ca_file:
        _check_readable("--alertmanager-ca-file", ca_file)
        try:
            ssl.create_default_context(cafile=ca_file)
        except ssl.SSLError as exc:
            raise ValueError(f"--alertmanager-ca-file: {ca_file!r} is not a PEM CA bundle: {exc}") from None
    try:
        queue_size = int(str(args.alert_queue_size).strip())
    except ValueError:
        raise ValueError(f"--alert-queue-size: {args.alert_queue_size!r} is not a number") from None
    if queue_size < 1:
        raise ValueError("--alert-queue-size: must be at least 1")
    cluster_name = args.cluster_name.strip()
    if any(ch in cluster_name for ch in "\n\r"):
        raise ValueError("--cluster-name: must be one line")
    return AlertConfig(
        urls=tuple(dict.fromkeys(_check_url(u.strip()) for u in urls)),
        bearer_token_file=token_file,
        ca_file=ca_file,
        cluster_name=cluster_name,
        extra_labels=dict(_check_label(text) for text in (args.alert_label or ())),
        resend_interval=_positive_duration("--alert-resend-interval", args.alert_resend_interval),
        queue_size=queue_size,
        timeout=_positive_duration("--alertmanager-timeout", args.alertmanager_timeout),
    )
