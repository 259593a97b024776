"""The three PATCH flavours the API server accepts: JSON patch (RFC 6902), merge patch (RFC 7386) and a
strategic merge patch that knows the list merge keys of the built-in types we serve."""

from __future__ import annotations

from typing import Any

from .codec import clone
from .errors import ApiError, bad_request

JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"
PATCH_TYPES = (JSON_PATCH, MERGE_PATCH, STRATEGIC_MERGE_PATCH, APPLY_PATCH)


# ---- RFC 6902 -------------------------------------------------------------------------------------


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise bad_request(f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _index(container: list[Any], token: str, *, for_add: bool) -> int:
    if token == "-" and for_add:
        return len(container)
    if not token.isdigit():
        raise ApiError(422, f"invalid array index {token!r}")
    idx = int(token)
    if idx > len(container) or (idx == len(container) and not for_add):
        raise ApiError(422, f"array index {idx} out of bounds")
    return idx


def _parent(doc: Any, tokens: list[str]) -> Any:
    current = doc
    for token in tokens[:-1]:
        if isinstance(current, dict):
            if token not in current:
                raise ApiError(422, f"doc is missing path: /{'/'.join(tokens)}")
            current = current[token]
        elif isinstance(current, list):
            current = current[_index(current, token, for_add=False)]
        else:
            raise ApiError(422, f"doc is missing path: /{'/'.join(tokens)}")
    return current


def _get(doc: Any, tokens: list[str]) -> Any:
    if not tokens:
        return doc
    parent = _parent(doc, tokens)
    last = tokens[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise ApiError(422, f"doc is missing key: /{'/'.join(tokens)}")
        return parent[last]
    if isinstance(parent, list):
        return parent[_index(parent, last, for_add=False)]
    raise ApiError(422, f"doc is missing path: /{'/'.join(tokens)}")


def _remove(doc: Any, tokens: list[str]) -> Any:
    parent = _parent(doc, tokens)
    last = tokens[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise ApiError(422, f"unable to remove nonexistent key: {last}: missing value")
        return parent.pop(last)
    if isinstance(parent, list):
        return parent.pop(_index(parent, last, for_add=False))
    raise ApiError(422, f"doc is missing path: /{'/'.join(tokens)}")


def _add(doc: Any, tokens: list[str], value: Any) -> Any:
    if not tokens:
        return value
    parent = _parent(doc, tokens)
    last = tokens[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        parent.insert(_index(parent, last, for_add=True), value)
    else:
        raise ApiError(422, f"doc is missing path: /{'/'.join(tokens)}")
    return doc


def json_patch(doc: Any, operations: Any) -> Any:
    """Apply RFC 6902 operations to a copy of `doc`; 422 when an operation cannot apply, as the real server."""
    if not isinstance(operations, list):
        raise bad_request("json patch must be a list of operations")
    doc = clone(doc)
    for op in operations:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise bad_request(f"invalid json patch operation {op!r}")
        kind, tokens = op["op"], _pointer(op["path"])
        if kind == "add":
            doc = _add(doc, tokens, clone(op.get("value")))
        elif kind == "remove":
            _remove(doc, tokens)
        elif kind == "replace":
            if tokens:
                _get(doc, tokens)  # must exist
                _remove(doc, tokens)
            doc = _add(doc, tokens, clone(op.get("value")))
        elif kind in ("move", "copy"):
            source = _pointer(op.get("from", ""))
            value = _remove(doc, source) if kind == "move" else clone(_get(doc, source))
            doc = _add(doc, tokens, value)
        elif kind == "test":
            if _get(doc, tokens) != op.get("value"):
                raise ApiError(422, f"testing value {op['path']} failed: test failed")
        else:
            raise bad_request(f"Unexpected kind: {kind}")
    return doc


# ---- RFC 7386 -------------------------------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge recursively, null deletes, everything else (lists too) replaces."""
    if not isinstance(patch, dict):
        return clone(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# ---- strategic merge patch --------------------------------------------------------------------------

# field name -> patchMergeKey, for the lists the built-in types declare with patchStrategy "merge"
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "conditions": "type",
    "addresses": "type",
    "imagePullSecrets": "name",
    "ownerReferences": "uid",
    "hostAliases": "ip",
    "resourceClaims": "name",
}
# lists of scalars merged as sets (patchStrategy "merge" on []string)
PRIMITIVE_MERGE = {"finalizers"}


def _merge_key(field: str, items: list[Any]) -> str | None:
    if field == "ports":  # containers[].ports by containerPort, services' spec.ports by port
        sample = next((i for i in items if isinstance(i, dict)), {})
        return "port" if "port" in sample and "containerPort" not in sample else "containerPort"
    return MERGE_KEYS.get(field)


def _strip_directives(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_directives(v) for k, v in value.items() if not k.startswith("$")}
    if isinstance(value, list):
        return [_strip_directives(v) for v in value]
    return value


def _merge_list(field: str, original: Any, patch: list[Any], order: list[Any] | None) -> list[Any]:
    current = list(original) if isinstance(original, list) else []
    if field in PRIMITIVE_MERGE:
        return current + [v for v in patch if v not in current]
    key = _merge_key(field, patch + current)
    if key is None:  # atomic list, e.g. node taints or pod tolerations: replaced as a whole
        return [_strip_directives(v) for v in patch]
    if any(isinstance(i, dict) and i.get("$patch") == "replace" for i in patch):
        return [_strip_directives(i) for i in patch if not (isinstance(i, dict) and "$patch" in i)]
    for item in patch:
        if not isinstance(item, dict):
            raise bad_request(f"strategic merge patch: list {field} expects objects")
        where = next(
            (n for n, old in enumerate(current) if isinstance(old, dict) and old.get(key) == item.get(key)), None
        )
        if item.get("$patch") == "delete":
            if where is not None:
                current.pop(where)
        elif where is None:
            current.append(_strip_directives(item))
        else:
            current[where] = strategic_merge(current[where], item)
    if order:
        rank = {o.get(key): n for n, o in enumerate(order) if isinstance(o, dict)}
        current.sort(key=lambda i: rank.get(i.get(key), len(rank)) if isinstance(i, dict) else len(rank))
    return current


def strategic_merge(original: Any, patch: Any) -> Any:
    """Kubernetes strategic merge patch for the types served here: maps merge, null deletes, lists with a
    known merge key merge item by item, other lists replace; honours $patch, $retainKeys,
    $setElementOrder and $deleteFromPrimitiveList."""
    if not isinstance(patch, dict):
        return clone(patch)
    directive = patch.get("$patch")
    if directive == "replace":
        return _strip_directives(patch)
    if directive == "delete":
        return None
    result = dict(original) if isinstance(original, dict) else {}
    for key, value in patch.items():
        if key.startswith("$deleteFromPrimitiveList/"):
            name = key.split("/", 1)[1]
            result[name] = [v for v in result.get(name) or [] if v not in (value or [])]
    for key, value in patch.items():
        if key.startswith("$"):
            continue
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict):
            merged = strategic_merge(result.get(key), value)
            if merged is None:
                result.pop(key, None)
            else:
                result[key] = merged
        elif isinstance(value, list):
            result[key] = _merge_list(key, result.get(key), value, patch.get(f"$setElementOrder/{key}"))
        else:
            result[key] = value
    retain = patch.get("$retainKeys")
    if isinstance(retain, list):
        result = {k: v for k, v in result.items() if k in retain}
    return result


def apply_patch(content_type: str, original: dict[str, Any], body: Any) -> dict[str, Any]:
    """Dispatch on the request's Content-Type; 415 for anything else, as the real server."""
    base = content_type.split(";")[0].strip()
    if base == JSON_PATCH:
        result = json_patch(original, body)
    elif base == MERGE_PATCH:
        result = merge_patch(original, body)
    elif base in (STRATEGIC_MERGE_PATCH, APPLY_PATCH):
        # server-side apply is approximated by a strategic merge: no field ownership, nothing removed
        result = strategic_merge(original, body)
    else:
        raise ApiError(
            415,
            f"the body of the request was in an unknown format - accepted media types include: "
            f"{', '.join(PATCH_TYPES)}",
        )
    if not isinstance(result, dict):
        raise bad_request("patch did not produce an object")
    return result
