"""LatencyTrace: a caller frame's way through the gateway and the worker, by segment."""

from __future__ import annotations

import pytest

from app.pipecat.latency import LatencyTrace


def test_a_played_frame_is_split_into_gateway_in_worker_and_gateway_out() -> None:
    trace = LatencyTrace()
    trace.sent(0, arrived_at=1.000, sent_at=1.002)
    trace.answered(0, at=1.030)
    latency = trace.played(0, at=1.045)
    assert latency is not None
    assert (latency.gateway_in, latency.worker, latency.gateway_out) == pytest.approx((0.002, 0.028, 0.015))
    assert latency.total == pytest.approx(0.045)
    assert len(trace) == 0


def test_frames_dropped_on_the_way_are_forgotten_and_a_resend_keeps_the_first_sending() -> None:
    trace = LatencyTrace()
    for i in range(3):
        trace.sent(i, arrived_at=float(i), sent_at=i + 0.001)
    trace.sent(1, arrived_at=9.0, sent_at=9.0)  # sent again to a new worker after a move
    for i in range(3):
        trace.answered(i, at=i + 0.05)
    latency = trace.played(1, at=1.06)  # frame 0 was dropped by the pacer: never played
    assert latency is not None and latency.worker == pytest.approx(0.049)
    assert len(trace) == 1 and trace.played(0, at=2.0) is None  # 0 is gone for good
    assert trace.played(5, at=3.0) is None and len(trace) == 0  # never sent: nothing to say


def test_an_unanswered_frame_has_no_latency_and_the_trace_is_bounded() -> None:
    trace = LatencyTrace(capacity=4)
    trace.sent(0, arrived_at=0.0, sent_at=0.0)
    assert trace.played(0, at=1.0) is None
    for i in range(10):
        trace.sent(i, arrived_at=0.0, sent_at=0.0)
    assert len(trace) == 4
