"""JSON encoding and copying of stored objects, and Kubernetes timestamps."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

try:  # msgspec comes with lightkube; it is several times faster than json for big lists
    import msgspec

    _encode = msgspec.json.encode
    _decode = msgspec.json.decode

    def dumps(obj: Any) -> bytes:
        """Compact JSON bytes."""
        return _encode(obj)

    def loads(data: bytes | str) -> Any:
        """Parse JSON; raises ValueError on bad input."""
        try:
            return _decode(data)
        except msgspec.DecodeError as exc:
            raise ValueError(str(exc)) from None

except ImportError:  # pragma: no cover - exercised only without lightkube

    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()

    def loads(data: bytes | str) -> Any:
        return json.loads(data)


def clone(obj: Any) -> Any:
    """A deep copy of a JSON-like value (faster than copy.deepcopy)."""
    return loads(dumps(obj))


def now_rfc3339(offset_seconds: float = 0.0) -> str:
    """UTC time as Kubernetes writes metav1.Time: second precision, trailing Z."""
    return format_rfc3339(dt.datetime.now(dt.UTC) + dt.timedelta(seconds=offset_seconds))


def format_rfc3339(when: dt.datetime) -> str:
    """An aware datetime as metav1.Time."""
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    """UTC time as metav1.MicroTime (leases, events.k8s.io eventTime)."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(value: str) -> dt.datetime | None:
    """metav1.Time or MicroTime to an aware datetime; None when unparsable."""
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        return None
