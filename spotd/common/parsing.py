"""Pure parsing of the small external formats spotd reads: durations, dates, labels.

Every function raises ValueError with a short message that a caller can put after a flag name.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from decimal import ROUND_CEILING, Decimal

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


# Kubernetes resource quantities (resource.Quantity): a decimal number, then a binary suffix (Ki .. Ei), a
# decimal suffix (n u m k M G T P E) or a decimal exponent (e3, E-2).
_QUANTITY = re.compile(r"^([+-]?(?:\d+(?:\.\d*)?|\.\d+))(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?\d+)?$")
_QUANTITY_SUFFIX = {
    None: Decimal(1),
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "k": Decimal("1e3"),
    "M": Decimal("1e6"),
    "G": Decimal("1e9"),
    "T": Decimal("1e12"),
    "P": Decimal("1e15"),
    "E": Decimal("1e18"),
    "Ki": Decimal(2**10),
    "Mi": Decimal(2**20),
    "Gi": Decimal(2**30),
    "Ti": Decimal(2**40),
    "Pi": Decimal(2**50),
    "Ei": Decimal(2**60),
}


def parse_quantity(text: str | int | float) -> Decimal:
    """'250m' -> 0.25, '1Gi' -> 1073741824, '1e3' -> 1000, 2 -> 2: a Kubernetes quantity as a Decimal."""
    raw = str(text).strip()
    m = _QUANTITY.match(raw)
    if not m:
        raise ValueError(f"{text!r} is not a Kubernetes quantity")
    number, suffix = Decimal(m.group(1)), m.group(2)
    if suffix and suffix[0] in "eE" and suffix not in _QUANTITY_SUFFIX:
        return number * Decimal(10) ** int(suffix[1:])
    return number * _QUANTITY_SUFFIX[suffix]


def format_quantity(value: Decimal, resource: str) -> str:
    """A quantity the way a request is written: CPU in whole millicores ('1500m'), everything else as a whole
    number (bytes, devices), rounded up so that a sum never asks for less than its parts."""
    if resource == "cpu":
        return f"{int((value * 1000).to_integral_value(rounding=ROUND_CEILING))}m"
    return str(int(value.to_integral_value(rounding=ROUND_CEILING)))
