"""OutageLog: a failing loop logs once per interval and once when it is back."""

from __future__ import annotations

import logging

import pytest

from app.outage import OutageLog


def test_a_failure_is_said_at_once_then_once_per_interval_and_the_recovery_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    outage = OutageLog(logging.getLogger("test.outage"), "thing", every_s=30.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="test.outage"):
        for _ in range(50):  # 50 failures over 49 s
            outage.failed(ConnectionError("refused"))
            now[0] += 1.0
        assert outage.failing
        outage.recovered()
        outage.recovered()  # said once
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert "thing: redis unreachable for 0 s" in lines[0] and "for 30 s" in lines[1]
    assert lines[2] == "thing: back after 50 s" and not outage.failing
