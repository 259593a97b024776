"""Promises of docs/agent.md that mutation testing (scripts/mutation agent/policy) found unchecked."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from spotd.agent.policy import default_policies, governing_notice, parse_steps, plan_response
from spotd.notices.record import Notice, NoticeKind

NOW = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)


def notice(kind: NoticeKind, deadline_in: float | None, **kw: str) -> Notice:
    deadline = NOW + timedelta(seconds=deadline_in) if deadline_in is not None else None
    return Notice(kind, "imds", NOW, deadline, **kw)


def test_the_earliest_deadline_governs_among_equally_severe_notices_whatever_their_order() -> None:
    # "the most severe governs ... the earliest deadline among equals" (docs/agent.md)
    later = notice(NoticeKind.ASG_TERMINATION, 120, action="terminate")
    sooner = notice(NoticeKind.SPOT_ITN, 60, action="terminate")
    assert governing_notice([later, sooner]) is sooner
    assert governing_notice([sooner, later]) is sooner
    # a notice without a deadline counts as the latest
    no_deadline = notice(NoticeKind.SPOT_ITN, None, action="terminate")
    assert governing_notice([no_deadline, later]) is later
    assert governing_notice([later, no_deadline]) is later


def test_the_response_carries_its_notice_and_deadline() -> None:
    # the node annotation holds the notice and the drain runs to its deadline (docs/agent.md)
    itn = notice(NoticeKind.SPOT_ITN, 120, action="terminate")
    response = plan_response(itn, default_policies())
    assert response.notice is itn
    assert response.deadline == itn.deadline


def test_a_wrong_step_is_a_one_line_error_naming_the_steps() -> None:
    with pytest.raises(ValueError, match=r"^'evict' is not a step \(use taint, cordon, exclude-lb, drain or none\)$"):
        parse_steps("taint,evict")
