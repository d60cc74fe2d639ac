"""TickAligner: the worker's least queue wait -> how far to move the caller's framing."""

from __future__ import annotations

import pytest

from app.pipecat.tick_align import TickAligner

STEP = 0.020  # a Twilio media message


@pytest.mark.parametrize(
    ("wait_s", "shift"),
    [
        (0.079, 0.060),  # complete just after a tick: three messages later, then ~19 ms before the next
        (0.050, 0.040),
        (0.028, 0.020),
        (0.027, 0.0),  # within margin + step: as good as it gets with 20 ms messages
        (0.010, 0.0),
        (0.004, 0.0),  # at half the margin: still fine
        (0.003, -STEP),  # too close to the tick: jitter would make frames miss it; 20 ms earlier
        (0.0, -STEP),
    ],
)
def test_the_least_wait_becomes_whole_messages_to_drop_or_one_to_insert(wait_s: float, shift: float) -> None:
    aligner = TickAligner(margin_s=0.008)
    assert aligner.shift(wait_s=wait_s, step_s=STEP, now=0.0) == pytest.approx(shift)


def test_after_a_shift_reports_are_ignored_until_they_describe_the_new_framing() -> None:
    aligner = TickAligner(margin_s=0.008, settle_s=2.0)
    assert aligner.shift(wait_s=0.070, step_s=STEP, now=10.0) == pytest.approx(0.060)
    assert aligner.shift(wait_s=0.070, step_s=STEP, now=11.0) == 0.0  # cut before the shift took effect
    assert aligner.shift(wait_s=0.030, step_s=STEP, now=12.5) == pytest.approx(0.020)
    assert aligner.shifts == 2
    aligner.restart()  # a new worker: its grid is another one
    assert aligner.shift(wait_s=0.050, step_s=STEP, now=12.6) == pytest.approx(0.040)


def test_no_step_known_yet_means_no_shift() -> None:
    assert TickAligner().shift(wait_s=0.07, step_s=0.0, now=0.0) == 0.0
