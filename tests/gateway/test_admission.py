"""Admission and LoopLag on their own: the call count against the cap, and the event loop's lateness."""

from __future__ import annotations

import asyncio
import time

import pytest

from app.gateway.admission import Admission, LoopLag


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_live_and_admitted_calls_count_against_the_cap_until_their_stream_starts_or_times_out() -> None:
    clock, live = Clock(), []
    admission = Admission(max_calls=2, pending_s=15.0, live_calls=lambda: len(live), clock=clock)
    assert admission.refusal() is None
    admission.admitted("a")
    admission.admitted("b")  # a burst of webhooks before any stream: both count
    assert admission.calls() == 2 and "GATEWAY_MAX_CALLS" in (admission.refusal("c") or "")
    assert admission.refusal("b") is None  # Twilio repeating b's webhook: b is not one more call
    live.append("a")
    admission.started("a")  # live now: counted once, not twice
    assert admission.calls() == 2
    clock.now += 15.0  # b's stream never came
    assert admission.calls() == 1 and admission.refusal() is None
    admission.started("never-admitted")  # harmless
    live.clear()
    assert admission.calls() == 0


def test_no_cap_takes_every_call() -> None:
    admission = Admission(max_calls=0, pending_s=1.0, live_calls=lambda: 10_000)
    assert admission.refusal() is None
    with pytest.raises(ValueError):
        Admission(max_calls=-1, pending_s=1.0, live_calls=lambda: 0)


def test_loop_lag_is_the_worst_of_the_window() -> None:
    clock = Clock()
    lag = LoopLag(period_s=0.1, window_s=5.0, clock=clock)
    assert lag.worst_s() == 0.0
    lag.note(0.002, clock.now)
    lag.note(0.250, clock.now + 1)
    lag.note(-0.001, clock.now + 2)  # woke a hair early: no lag
    assert lag.worst_s(clock.now + 2) == 0.250
    assert lag.worst_s(clock.now + 6.5) == 0.0  # the 250 ms (at +1 s) is older than the window now
    with pytest.raises(ValueError):
        LoopLag(period_s=0.0)


@pytest.mark.asyncio
async def test_loop_lag_sees_a_blocked_event_loop() -> None:
    lag = LoopLag(period_s=0.02, window_s=5.0)
    lag.start()
    try:
        await asyncio.sleep(0.1)
        time.sleep(0.3)  # blocking work on the loop, as an overloaded gateway does all the time
        await asyncio.sleep(0.1)
        assert lag.worst_s() >= 0.2
    finally:
        await lag.stop()
    await lag.stop()  # twice is fine


def test_a_late_event_loop_refuses_new_calls_while_it_lasts() -> None:
    lag = [0.004]
    admission = Admission(
        max_calls=0, pending_s=1.0, live_calls=lambda: 3, max_loop_lag_s=0.025, loop_lag_s=lambda: lag[0]
    )
    assert admission.refusal() is None
    lag[0] = 0.071
    refusal = admission.refusal() or ""
    assert "71 ms late" in refusal and "GATEWAY_MAX_LOOP_LAG_MS" in refusal
    lag[0] = 0.010
    assert admission.refusal() is None
    off = Admission(max_calls=0, pending_s=1.0, live_calls=lambda: 3, loop_lag_s=lambda: 9.0)
    assert off.refusal() is None  # not watched unless asked for
