"""Pure parsing of the small external formats spotd reads: durations, dates, labels.

Every function raises ValueError with a short message that a caller can put after a flag name.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

INSTANCE_ID_RE = re.compile(r"\b(i-[0-9a-f]{8,17})\b")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(text: str) -> float:
    """'90s', '2m', '2h', '1.5', '250ms' -> seconds. Compound forms like '1h30m' are accepted too."""
    raw = text.strip()
    if not raw:
        raise ValueError("empty duration")
    m = _DURATION.match(raw)
    if m:
        return float(m.group(1)) * _UNITS[m.group(2)]
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", raw)
    if parts and "".join(n + u for n, u in parts) == raw:
        return sum(float(n) * _UNITS[u] for n, u in parts)
    raise ValueError(f"{text!r} is not a duration (use 90s, 2m, 2h or plain seconds)")


def format_duration(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    return f"{seconds:g}s"


_IMDS_MAINTENANCE_FORMATS = ("%d %b %Y %H:%M:%S GMT", "%d %b %Y %H:%M:%S %Z")


def parse_iso_time(text: str) -> datetime:
    """RFC 3339 as IMDS and Kubernetes write it ('2017-09-18T08:22:00Z') -> aware UTC datetime."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{text!r} is not a timestamp")
    value = text.strip()
    if value.endswith("Z"):
        value = value[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise ValueError(f"{text!r} is not an RFC 3339 timestamp") from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    # Years far from now overflow arithmetic later (a deadline minus a lead time): refuse them here.
    if not 1970 <= parsed.year <= 9000:
        raise ValueError(f"{text!r} is out of range")
    return parsed.astimezone(UTC)


def parse_maintenance_time(text: str) -> datetime:
    """IMDS scheduled-event dates ('21 Jan 2019 09:00:43 GMT') -> aware UTC datetime."""
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not a maintenance date")
    for fmt in _IMDS_MAINTENANCE_FORMATS:
        try:
            parsed = datetime.strptime(text.strip(), fmt).replace(tzinfo=UTC)
        except ValueError:
            continue
        if not 1970 <= parsed.year <= 9000:  # as parse_iso_time: far years overflow the lead-time arithmetic
            raise ValueError(f"{text!r} is out of range")
        return parsed
    # Some tools (and the AWS docs' own examples) carry ISO dates; accept them too.
    try:
        return parse_iso_time(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a date like '21 Jan 2019 09:00:43 GMT'") from None


def format_time(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


_DNS_PREFIX = r"([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
_LABEL_KEY = re.compile("^" + _DNS_PREFIX + r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


def parse_key_value(text: str) -> tuple[str, str]:
    """'team=platform' -> ('team', 'platform'); the key and value must be valid label syntax."""
    key, sep, value = text.partition("=")
    if not sep:
        raise ValueError(f"{text!r} is not key=value")
    key, value = key.strip(), value.strip()
    if not _LABEL_KEY.match(key):
        raise ValueError(f"{key!r} is not a valid label name")
    if not _LABEL_VALUE.match(value):
        raise ValueError(f"{value!r} is not a valid label value")
    return key, value


def parse_host_port(text: str) -> tuple[str, int]:
    """'0.0.0.0:9100', ':9100', '[::1]:9100' -> (host, port)."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep:
        raise ValueError(f"{text!r} is not HOST:PORT")
    host = host.strip("[]") or "0.0.0.0"
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"{port_text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range")
    return host, port


def instance_id_from_provider_id(provider_id: str) -> str | None:
    """A Node's spec.providerID ('aws:///us-east-1a/i-0abc...') -> 'i-0abc...', or None."""
    if not isinstance(provider_id, str) or not provider_id.startswith("aws://"):
        return None
    last = provider_id.rstrip("/").rsplit("/", 1)[-1]
    return last if INSTANCE_ID_RE.fullmatch(last) else None
