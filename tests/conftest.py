"""Session-wide: what spotd's identities used of every fake API server, written to JSON at the end and,
with SPOTD_CHECK_PERMISSIONS=1, compared with deploy/rbac.yaml (tests/permissions.py); likewise the AWS
actions the code called, against deploy/iam*.json (tests/aws_actions.py)."""

from __future__ import annotations

import os
from pathlib import Path

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
