"""Session-wide: what spotd's identities used of every fake API server, written to JSON at the end and,
with SPOTD_CHECK_PERMISSIONS=1, compared with deploy/rbac.yaml (tests/permissions.py); likewise the AWS
actions the code called, against deploy/iam*.json (tests/aws_actions.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spotd.sim.kubeapi.rbac import AccessRecord
from tests import aws_actions, permissions

_RECORDS = pytest.StashKey[set[AccessRecord]]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_RECORDS] = permissions.collect()


def _records_path(config: pytest.Config) -> Path:
    """$SPOTD_PERMISSIONS_FILE, else .pytest_cache/spotd-permissions.json (git ignores .pytest_cache; the
    session's temporary directory would be pruned by concurrent pytest runs of the same user)."""
    if os.environ.get(permissions.FILE_ENV):
        return Path(os.environ[permissions.FILE_ENV])
    return config.rootpath / ".pytest_cache" / "spotd-permissions.json"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    aws_actions.check_at_session_end(session)
    records = session.config.stash.get(_RECORDS, set())
    permissions.stop_collecting(records)
    if hasattr(session.config, "workerinput"):
        return  # a pytest-xdist worker: its records are not the session's
    path = permissions.write_records(records, _records_path(session.config))
    if os.environ.get(permissions.ENABLE_ENV) != "1":
        return
    report = permissions.compare(records, permissions.granted())
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = report.lines() or ["deploy/rbac.yaml grants exactly what the suite used"]
    for line in [f"spotd permission check ({len(records)} decisions recorded in {path}):", *lines]:
        if reporter is not None:
            reporter.write_line(line, red=bool(report))
        else:
            print(line)
    if report:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def access_records(pytestconfig: pytest.Config) -> set[AccessRecord]:
    """Every authorization decision of every FakeApiServer so far in this session (grows as tests run)."""
    return pytestconfig.stash[_RECORDS]


@pytest.fixture(scope="session")
def real_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The real control plane (tests/realcluster.py), once per session, deploy/ applied. Under CI=true a
    missing binary fails the tests; elsewhere, without Go, they skip."""
    import shutil

    from tests.realcluster import RealCluster, controlplane_binaries

    if os.environ.get("CI") != "true" and not os.environ.get("SPOTD_CONTROLPLANE") and shutil.which("go") is None:
        pytest.skip("no Go to build the control plane (scripts/controlplane); CI=true makes this a failure")
    cluster = RealCluster(controlplane_binaries(), tmp_path_factory.mktemp("real-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
