"""Who is asking: bearer tokens mapped to identities (as the real server's token authenticators do), and
what admission sees of a write (the request's attributes, the object before and after, the user)."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from . import errors

AUTHENTICATED = "system:authenticated"
MASTERS = "system:masters"
ANONYMOUS = "system:anonymous"
UNAUTHENTICATED = "system:unauthenticated"
SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"
# The keys a pod-bound projected service-account token adds to the identity (KEP-4193).
NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
NODE_UID_EXTRA = "authentication.kubernetes.io/node-uid"
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"
CREDENTIAL_ID_EXTRA = "authentication.kubernetes.io/credential-id"
# Paths an unauthenticated request may still reach: the structured AuthenticationConfiguration that
# kube-apiserver 1.32 recommends (anonymous enabled only for the health and version endpoints).
ANONYMOUS_PATHS = frozenset({"/healthz", "/livez", "/readyz", "/version"})


def freeze_extra(extra: Mapping[str, Iterable[str]] | None) -> Mapping[str, tuple[str, ...]]:
    """Extra values as a read-only mapping of tuples (a lone string is one value)."""
    return MappingProxyType({k: tuple([v] if isinstance(v, str) else v) for k, v in (extra or {}).items()})


@dataclass(frozen=True)
class UserInfo:
    """user.Info: the name RBAC subjects of kind User match, the groups subjects of kind Group match, and
    extra values (each a tuple of strings, as the real API lists them)."""

    username: str
    uid: str = ""
    groups: tuple[str, ...] = ()
    extra: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({}), hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "groups", tuple(self.groups))
        object.__setattr__(self, "extra", freeze_extra(self.extra))

    @property
    def service_account(self) -> tuple[str, str] | None:
        """(namespace, name) for a service account's identity, else None."""
        if not self.username.startswith(SERVICE_ACCOUNT_PREFIX):
            return None
        namespace, _, name = self.username[len(SERVICE_ACCOUNT_PREFIX) :].partition(":")
        return (namespace, name) if namespace and name else None


ADMIN = UserInfo("kubernetes-admin", groups=(MASTERS, AUTHENTICATED))
ANONYMOUS_USER = UserInfo(ANONYMOUS, groups=(UNAUTHENTICATED,))


def service_account_username(namespace: str, name: str) -> str:
    return f"{SERVICE_ACCOUNT_PREFIX}{namespace}:{name}"


def unauthorized() -> errors.ApiError:
    return errors.ApiError(401, "Unauthorized")


class Authenticator:
    """Bearer token -> UserInfo. Tokens never expire; unknown or missing ones are 401 (except on
    ANONYMOUS_PATHS)."""

    def __init__(self) -> None:
        self._tokens: dict[str, UserInfo] = {}

    def add(self, token: str, user: UserInfo) -> str:
        self._tokens[token] = user
        return token

    def remove(self, token: str) -> None:
        self._tokens.pop(token, None)

    def user_for(self, token: str) -> UserInfo | None:
        return self._tokens.get(token)

    def authenticate(self, authorization: str | None, path: str) -> UserInfo:
        """The identity behind an `Authorization` header; 401 ApiError when there is none."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            user = self._tokens.get(token.strip())
            if user is not None:
                return user
            raise unauthorized()  # a bad credential is refused even on anonymous paths
        if path in ANONYMOUS_PATHS:
            return ANONYMOUS_USER
        raise unauthorized()


def service_account_user(
    namespace: str,
    name: str,
    *,
    uid: str = "",
    node_name: str | None = None,
    node_uid: str | None = None,
    pod_name: str | None = None,
    pod_uid: str | None = None,
) -> UserInfo:
    """The identity of a service-account token; bound to a pod (and its node) when those are given."""
    extra: dict[str, tuple[str, ...]] = {}
    if pod_name:
        extra[POD_NAME_EXTRA] = (pod_name,)
        extra[POD_UID_EXTRA] = (pod_uid or str(uuid.uuid4()),)
    if node_name:
        extra[NODE_NAME_EXTRA] = (node_name,)
        if node_uid:
            extra[NODE_UID_EXTRA] = (node_uid,)
    extra[CREDENTIAL_ID_EXTRA] = (f"JTI={uuid.uuid4()}",)
    groups = ("system:serviceaccounts", f"system:serviceaccounts:{namespace}", AUTHENTICATED)
    return UserInfo(service_account_username(namespace, name), uid or str(uuid.uuid4()), groups, extra)


def new_token() -> str:
    return secrets.token_urlsafe(24)


@dataclass(frozen=True)
class AdmissionAttributes:
    """What an admission hook sees of one write, after authorization and with the object as it would be
    stored: operation CREATE, UPDATE (PUT and PATCH) or DELETE; `obj` is None for DELETE, `old_obj` None for
    CREATE; for pods/eviction and pods/binding the operation is CREATE and `obj` is the Eviction or Binding."""

    operation: str
    group: str
    version: str
    resource: str
    subresource: str
    kind: str
    name: str
    namespace: str
    obj: dict[str, Any] | None = field(hash=False)
    old_obj: dict[str, Any] | None = field(hash=False)
    user: UserInfo
    dry_run: bool = False


# ---- serving certificate ------------------------------------------------------------------------------

_CERT: tuple[bytes, bytes] | None = None
_CN = "spotd-fake-kube-apiserver"


def self_signed_certificate() -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) for 127.0.0.1 and localhost, made once per process: kubectl sends
    credentials to TLS servers only. Made with the `cryptography` package when installed, else with the
    `openssl` command."""
    global _CERT
    if _CERT is None:
        try:
            _CERT = _with_cryptography()
        except ImportError:
            _CERT = _with_openssl()
    return _CERT


def _with_cryptography() -> tuple[bytes, bytes]:
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _CN)])
    now = dt.datetime.now(dt.UTC)
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _with_openssl() -> tuple[bytes, bytes]:
    import subprocess
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        cert, key = Path(tmp, "tls.crt"), Path(tmp, "tls.key")
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(cert), "-days", "365", "-subj", f"/CN={_CN}",
             "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
             "-addext", "basicConstraints=critical,CA:TRUE"],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        return cert.read_bytes(), key.read_bytes()
