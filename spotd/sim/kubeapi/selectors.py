"""Label and field selectors: the query-string grammar, metav1.LabelSelector objects, and matching."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import bad_request

Labels = Mapping[str, str]


@dataclass(frozen=True)
class SelectorRequirement:
    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!exists", "gt", "lt"
    values: tuple[str, ...] = ()

    def matches(self, labels: Labels) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        if self.op in ("=", "in"):
            return present and value in self.values
        if self.op in ("!=", "notin"):  # Kubernetes: also true when the label is absent
            return not present or value not in self.values
        if self.op == "exists":
            return present
        if self.op == "!exists":
            return not present
        if not present:
            return False
        try:
            number = int(value or "")
        except ValueError:
            return False
        limit = int(self.values[0])
        return number > limit if self.op == "gt" else number < limit


Selector = tuple[SelectorRequirement, ...]

_KEY = r"[A-Za-z0-9./_-]+"
_SET_RE = re.compile(rf"^\s*({_KEY})\s+(in|notin)\s*\(([^)]*)\)\s*$")
_CMP_RE = re.compile(rf"^\s*({_KEY})\s*(==|=|!=|>|<)\s*([A-Za-z0-9._-]*)\s*$")
_EXISTS_RE = re.compile(rf"^\s*(!?)\s*({_KEY})\s*$")


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside parentheses."""
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def parse_label_selector(text: str | None) -> Selector:
    """The `labelSelector` query grammar (=, ==, !=, in, notin, exists, !exists, >, <); 400 on errors."""
    if not text or not text.strip():
        return ()
    requirements: list[SelectorRequirement] = []
    for part in _split_top_level(text):
        if not part.strip():
            raise bad_request(f"unable to parse requirement: found '', expected: identifier in {text!r}")
        if m := _SET_RE.match(part):
            values = tuple(v.strip() for v in m.group(3).split(",") if v.strip())
            requirements.append(SelectorRequirement(m.group(1), m.group(2), values))
        elif m := _CMP_RE.match(part):
            op = {"==": "=", ">": "gt", "<": "lt"}.get(m.group(2), m.group(2))
            if op in ("gt", "lt") and not m.group(3).lstrip("-").isdigit():
                raise bad_request(
                    f"unable to parse requirement: for 'gt', 'lt' operators, value must be an integer: {part!r}"
                )
            requirements.append(SelectorRequirement(m.group(1), op, (m.group(3),)))
        elif m := _EXISTS_RE.match(part):
            requirements.append(SelectorRequirement(m.group(2), "!exists" if m.group(1) else "exists"))
        else:
            raise bad_request(f"unable to parse requirement: {part.strip()!r} in label selector {text!r}")
    return tuple(requirements)


def labels_match(selector: Selector, labels: Labels | None) -> bool:
    labels = labels or {}
    return all(r.matches(labels) for r in selector)


_LS_OPS = {"In": "in", "NotIn": "notin", "Exists": "exists", "DoesNotExist": "!exists"}


def from_label_selector_object(obj: Mapping[str, Any] | None) -> Selector | None:
    """A metav1.LabelSelector as a Selector; None (matches nothing) for a null selector, () for {}."""
    if obj is None:
        return None
    reqs = [SelectorRequirement(k, "=", (str(v),)) for k, v in (obj.get("matchLabels") or {}).items()]
    for expr in obj.get("matchExpressions") or []:
        op = _LS_OPS.get(expr.get("operator", ""))
        if op is None:
            raise bad_request(f"{expr.get('operator')!r} is not a valid label selector operator")
        reqs.append(SelectorRequirement(expr["key"], op, tuple(expr.get("values") or ())))
    return tuple(reqs)


# ---- field selectors ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldRequirement:
    field: str
    equal: bool
    value: str


FieldSelector = tuple[FieldRequirement, ...]


def _split_unescaped(text: str, sep: str) -> list[str]:
    parts = re.split(rf"(?<!\\){re.escape(sep)}", text)
    return parts


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", r"\1", value)


def parse_field_selector(
    text: str | None, allowed: set[str], aliases: Mapping[str, str] | None = None
) -> FieldSelector:
    """The `fieldSelector` grammar (=, ==, !=); 400 for a field the resource does not support, as the real server."""
    if not text or not text.strip():
        return ()
    reqs: list[FieldRequirement] = []
    for part in _split_unescaped(text, ","):
        m = re.match(r"^\s*([A-Za-z0-9._-]+)\s*(==|!=|=)(.*)$", part)
        if not m:
            raise bad_request(f"invalid selector: {text!r}; can't understand {part!r}")
        field, op, value = m.group(1), m.group(2), _unescape(m.group(3).strip())
        if field not in allowed:
            raise bad_request(f"field label not supported: {field}")
        field = (aliases or {}).get(field, field)
        reqs.append(FieldRequirement(field, op != "!=", value))
    return tuple(reqs)


def field_value(obj: Mapping[str, Any], path: str) -> str:
    """The string a field selector compares against: missing is "", booleans are "true"/"false"."""
    if path == "metadata.namespace":
        return str(obj.get("metadata", {}).get("namespace") or "")
    if path == "source":  # core Event: source.component
        return str((obj.get("source") or {}).get("component") or "")
    current: Any = obj
    for part in path.split("."):
        if not isinstance(current, Mapping):
            return ""
        current = current.get(part)
        if current is None:
            return ""
    if isinstance(current, bool):
        return "true" if current else "false"
    return str(current)


def fields_match(selector: FieldSelector, obj: Mapping[str, Any]) -> bool:
    return all((field_value(obj, r.field) == r.value) == r.equal for r in selector)


def required_value(selector: FieldSelector, field: str) -> str | None:
    """The value an equality requirement pins `field` to, for index look-ups (e.g. spec.nodeName)."""
    for r in selector:
        if r.field == field and r.equal:
            return r.value
    return None


def make_matcher(labels: Selector, fields: FieldSelector) -> Callable[[Mapping[str, Any]], bool] | None:
    """One predicate for both selectors, or None when nothing is selected on (match everything)."""
    if not labels and not fields:
        return None

    def match(obj: Mapping[str, Any]) -> bool:
        return labels_match(labels, obj.get("metadata", {}).get("labels")) and fields_match(fields, obj)

    return match
