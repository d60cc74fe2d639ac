"""The worker's call record: the queue-wait reports it keeps for `protocol.Timing`."""

from __future__ import annotations

import pytest

from app.protocol import TIMING_EVERY_FRAMES, TIMING_FIRST_FRAMES
from app.worker.call import QueueWaits


def test_queue_waits_report_the_least_wait_first_early_then_once_a_second() -> None:
    waits = QueueWaits()
    reports = []
    values = [0.050, 0.020, 0.070, 0.030] + [0.060 - 0.001 * i for i in range(TIMING_EVERY_FRAMES)] + [0.01]
    for value in values:
        report = waits.add(value)
        if report is not None:
            reports.append(report)
    assert TIMING_FIRST_FRAMES == 4 and TIMING_EVERY_FRAMES == 12
    assert reports[0] == (pytest.approx(0.020), 4)  # the first after 4 frames: the gateway aligns early
    assert reports[1] == (pytest.approx(0.060 - 0.011), 12)  # then the least of the next 12 (~1 s)
    assert len(reports) == 2  # the last frame starts a new run
