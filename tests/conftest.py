"""Session-wide hooks; the logic lives in the modules named here."""

from __future__ import annotations

import pytest

from tests import aws_actions


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # SPOTD_CHECK_PERMISSIONS=1: the AWS actions the code called against deploy/iam*.json (tests/aws_actions.py)
    aws_actions.check_at_session_end(session)
