"""The little protobuf kubectl sends: client-go's typed clients (kubectl >= 1.31) encode request bodies as
application/vnd.kubernetes.protobuf. `kubectl drain --disable-eviction` DELETEs with a protobuf
DeleteOptions, `kubectl create namespace` POSTs a protobuf Namespace and `kubectl auth can-i` a protobuf
SelfSubjectAccessReview; these are decoded here. Any other
protobuf body gets 415, since decoding it would need the full schema."""

from __future__ import annotations

from typing import Any

from .errors import ApiError, bad_request

PROTOBUF = "application/vnd.kubernetes.protobuf"
_MAGIC = b"k8s\x00"

Fields = dict[int, list[Any]]  # field number -> values (int for varints, bytes for length-delimited)


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise bad_request("truncated protobuf varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(data: bytes) -> Fields:
    """One message's fields; fixed-width fields are skipped (none of the decoded types use them)."""
    fields: Fields = {}
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        value: Any
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos : pos + length], pos + length
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            continue
        else:
            raise bad_request(f"unsupported protobuf wire type {wire}")
        fields.setdefault(number, []).append(value)
    return fields


def _str(fields: Fields, number: int) -> str | None:
    values = fields.get(number)
    return values[-1].decode() if values else None


def _string_map(entries: list[bytes]) -> dict[str, str]:
    result = {}
    for entry in entries:
        kv = _fields(entry)
        result[_str(kv, 1) or ""] = _str(kv, 2) or ""
    return result


def _object_meta(data: bytes) -> dict[str, Any]:
    f = _fields(data)
    meta: dict[str, Any] = {}
    for number, name in ((1, "name"), (2, "generateName"), (3, "namespace"), (6, "resourceVersion")):
        value = _str(f, number)
        if value:
            meta[name] = value
    if 11 in f:
        meta["labels"] = _string_map(f[11])
    if 12 in f:
        meta["annotations"] = _string_map(f[12])
    return meta


def _delete_options(data: bytes) -> dict[str, Any]:
    f = _fields(data)
    options: dict[str, Any] = {"apiVersion": "v1", "kind": "DeleteOptions"}
    if 1 in f:
        grace = f[1][-1]
        options["gracePeriodSeconds"] = grace - (1 << 64) if grace >= 1 << 63 else grace  # int64
    if 2 in f:
        pre = _fields(f[2][-1])
        options["preconditions"] = {k: v for k, v in (("uid", _str(pre, 1)), ("resourceVersion", _str(pre, 2))) if v}
    if 4 in f:
        options["propagationPolicy"] = _str(f, 4)
    if 5 in f:
        options["dryRun"] = [v.decode() for v in f[5]]
    return options


_RESOURCE_ATTRIBUTES = ("namespace", "verb", "group", "version", "resource", "subresource", "name")


def _self_subject_access_review(api_version: str, data: bytes) -> dict[str, Any]:
    f = _fields(data)
    spec_fields = _fields(f.get(2, [b""])[-1])
    spec: dict[str, Any] = {}
    if 1 in spec_fields:
        attrs = _fields(spec_fields[1][-1])
        spec["resourceAttributes"] = {
            n: _str(attrs, i + 1) for i, n in enumerate(_RESOURCE_ATTRIBUTES) if i + 1 in attrs
        }
    if 2 in spec_fields:
        attrs = _fields(spec_fields[2][-1])
        spec["nonResourceAttributes"] = {"path": _str(attrs, 1) or "", "verb": _str(attrs, 2) or ""}
    return {"apiVersion": api_version, "kind": "SelfSubjectAccessReview", "metadata": {}, "spec": spec}


def decode(raw: bytes) -> dict[str, Any]:
    """A protobuf request body as JSON-shaped dict; 415 for kinds this fake cannot decode."""
    if not raw.startswith(_MAGIC):
        raise bad_request("protobuf body without the k8s envelope")
    unknown = _fields(raw[len(_MAGIC) :])
    type_meta = _fields(unknown.get(1, [b""])[-1])
    api_version, kind = _str(type_meta, 1) or "", _str(type_meta, 2) or ""
    body = unknown.get(2, [b""])[-1]
    if kind == "DeleteOptions":
        return _delete_options(body)
    if kind == "Namespace":
        fields = _fields(body)
        return {"apiVersion": api_version, "kind": kind, "metadata": _object_meta(fields.get(1, [b""])[-1])}
    if kind == "SelfSubjectAccessReview":
        return _self_subject_access_review(api_version, body)
    raise ApiError(
        415,
        f"the fake API server cannot decode a protobuf {kind}; send application/json",
    )
