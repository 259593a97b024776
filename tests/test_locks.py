"""The lock files (requirements/*.lock, written by requirements/compile) against pyproject.toml, and their use.

Each lock pins every package with `==` and at least one sha256 hash; every dependency pyproject.toml
declares for it is pinned at a version it allows; and, for this platform, the lock holds exactly the
packages its dependencies resolve to, no more and no fewer: the resolution is walked through the metadata
of the packages installed in this venv (which scripts/setup --test installs from test.lock, so their
versions are the locked ones; the test says so when they are not). Lines for other platforms (colorama on
Windows) are left to requirements/compile. Then: one version per package across the files, the agent's
without aiohttp and the AWS SDK, and the Dockerfile, scripts/setup and the image's base using them.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LOCKS = ROOT / "requirements"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# What the agent image leaves out of [project] dependencies (requirements/compile has the same): aiohttp
# serves only spotd/sim, which `spotd agent` never imports (tests/test_agent.py holds the agent to that).
AGENT_LEAVES_OUT = {"aiohttp"}


@dataclass(frozen=True)
class Pin:
    name: str
    version: str
    marker: Marker | None
    hashes: tuple[str, ...]

    def applies_here(self) -> bool:
        return self.marker is None or self.marker.evaluate({"extra": ""})


def read_lock(name: str) -> list[Pin]:
    """The lock's entries; fails on anything but `name==version [; marker]` followed by its hashes."""
    text = (LOCKS / name).read_text()
    pins = []
    for entry in re.split(r"\n(?=[^\s#])", "\n".join(line for line in text.splitlines() if not line.startswith("#"))):
        entry = entry.strip()
        if not entry:
            continue
        head, *rest = [part.strip() for part in entry.split("\\\n")]
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s;]+)(?:\s*;\s*(.+))?", head)
        assert match, f"{name}: not a pinned requirement: {head!r}"
        hashes = tuple(
            h.split("=", 1)[1] for part in rest for h in part.split() if h.startswith("--hash=") and "#" not in h
        )
        assert hashes and all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in hashes), f"{name}: {head} hashes"
        marker = Marker(match[3]) if match[3] else None
        pins.append(Pin(canonicalize_name(match[1]), match[2], marker, hashes))
    return pins


def here(pins: Iterable[Pin]) -> dict[str, str]:
    """name -> version of the entries that apply to this platform (one each)."""
    out: dict[str, str] = {}
    for pin in pins:
        if pin.applies_here():
            assert pin.name not in out, f"two versions of {pin.name} apply here"
            out[pin.name] = pin.version
    return out


def declared(*extras: str, leave_out: set[str] = frozenset()) -> list[Requirement]:  # type: ignore[assignment]
    """spotd's dependencies with these extras, its own extras (spotd[aws] in test) expanded."""
    out: list[Requirement] = []
    groups = [PROJECT["project"]["dependencies"]] + [PROJECT["project"]["optional-dependencies"][e] for e in extras]
    for line in (line for group in groups for line in group):
        req = Requirement(line)
        if canonicalize_name(req.name) == "spotd":
            out += declared(*sorted(req.extras), leave_out=leave_out)
        elif canonicalize_name(req.name) not in leave_out:
            out.append(req)
    return out


ROOTS = {
    "test.lock": lambda: declared("test"),
    "controller.lock": lambda: declared("aws"),
    "agent.lock": lambda: declared(leave_out=AGENT_LEAVES_OUT),
    "build.lock": lambda: [Requirement(r) for r in PROJECT["build-system"]["requires"]],
}


def applies(req: Requirement, extras: Iterable[str]) -> bool:
    return req.marker is None or any(req.marker.evaluate({"extra": e}) for e in {"", *extras})


def resolution(roots: list[Requirement]) -> dict[str, str]:
    """name -> version of everything the roots need on this platform, read from the installed packages."""
    found: dict[str, str] = {}
    seen: set[tuple[str, str]] = set()
    todo = [(canonicalize_name(r.name), extra) for r in roots if applies(r, ()) for extra in {"", *r.extras}]
    while todo:
        name, extra = todo.pop()
        if (name, extra) in seen:
            continue
        seen.add((name, extra))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            pytest.fail(f"{name} is not installed: install the venv from the locks (scripts/setup --test)")
        found[name] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": extra}):
                todo += [(canonicalize_name(req.name), e) for e in {"", *req.extras}]
    return found


@pytest.mark.parametrize("lock", sorted(ROOTS))
def test_every_declared_dependency_is_pinned_with_a_hash_at_an_allowed_version(lock: str) -> None:
    pins = here(read_lock(lock))
    for req in ROOTS[lock]():
        if not applies(req, ()):
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{lock}: {req} is declared in pyproject.toml but not locked"
        assert req.specifier.contains(pins[name], prereleases=True), f"{lock}: {name}=={pins[name]} vs {req}"


@pytest.mark.parametrize("lock", sorted(ROOTS))
def test_the_lock_holds_exactly_the_resolution_of_its_dependencies(lock: str) -> None:
    pins = here(read_lock(lock))
    resolved = resolution(ROOTS[lock]())
    stale = {n: (v, pins[n]) for n, v in resolved.items() if n in pins and pins[n] != v}
    assert not stale, f"installed != {lock} (installed, locked): {stale}; run scripts/setup --test"
    assert sorted(set(pins) - set(resolved)) == [], f"{lock} pins packages nothing declared needs"
    assert sorted(set(resolved) - set(pins)) == [], f"{lock} lacks packages its dependencies need"


def test_one_version_of_each_package_across_the_locks() -> None:
    versions: dict[tuple[str, str], set[str]] = {}
    for lock in ROOTS:
        for pin in read_lock(lock):
            versions.setdefault((pin.name, str(pin.marker)), set()).add(pin.version)
    assert {k: v for k, v in versions.items() if len(v) > 1} == {}


def test_the_agent_lock_has_no_aiohttp_and_no_aws_sdk() -> None:
    names = {pin.name for pin in read_lock("agent.lock")}
    assert names.isdisjoint({"aiohttp", "yarl", "multidict", "boto3", "botocore", "s3transfer", "urllib3"})
    assert {"lightkube", "httpx", "h11", "structlog", "prometheus-client"} <= names


def test_the_dockerfile_installs_each_image_from_its_lock_with_hashes() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = dict(re.findall(r"^FROM \S+ AS (\S+)\n(.*?)(?=^FROM |\Z)", text, re.M | re.S))
    assert list(stages) == ["builder", "runtime", "agent", "controller"], "the default image is the last stage"
    assert "pip install --require-hashes --only-binary :all: -r requirements/build.lock" in stages["builder"]
    assert "--no-build-isolation" in stages["builder"]
    for target in ("agent", "controller"):
        body = stages[target]
        assert f"pip install --require-hashes --only-binary :all: -r /requirements/{target}.lock" in body
        assert 'pip install --no-deps --no-index "/wheels/spotd-' in body, "spotd's own wheel, without deps"
    assert "!requirements/*.lock" in (ROOT / ".dockerignore").read_text().splitlines()


def test_the_base_image_is_pinned_by_digest_with_its_tag_beside_it() -> None:
    text = (ROOT / "Dockerfile").read_text()
    (base,) = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert re.fullmatch(r"[a-z0-9./-]+:[\w.-]+@sha256:[0-9a-f]{64}", base), base
    assert re.findall(r"^FROM (\S+) AS", text, re.M) == ["${PYTHON_IMAGE}", "${PYTHON_IMAGE}", "runtime", "runtime"]


def test_scripts_setup_installs_from_the_locks_with_hashes() -> None:
    text = (ROOT / "scripts" / "setup").read_text()
    assert "lock=requirements/controller.lock" in text and "lock=requirements/test.lock" in text
    assert '--require-hashes -r requirements/build.lock -r "$lock"' in text
    assert "--no-deps --no-build-isolation -e ." in text
