"""Kubernetes resource quantities (resource.Quantity), exact as Decimals: the controller's placeholders.

Apart from spotd.common.parsing so that the agent, which reads no quantity, never loads decimal.
"""

from __future__ import annotations

import re
from decimal import ROUND_CEILING, Decimal

# A decimal number, then a binary suffix (Ki .. Ei), a
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
