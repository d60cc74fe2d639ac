"""PlayoutTrim: how much of each bot frame is cut to take a standing delay out, and when."""

from __future__ import annotations

import numpy as np
import pytest

from app.pipecat.playout_trim import PlayoutTrim

RATE = 8000
FRAME_SAMPLES = 640  # 80 ms at 8 kHz
STEP_SAMPLES = 160  # 20 ms


def frame(level: float) -> bytes:
    """80 ms of a 500 Hz tone at `level` of full scale (0: silence), PCM16."""
    t = np.arange(FRAME_SAMPLES) / RATE
    return (level * 32767 * np.sin(2 * np.pi * 500 * t)).astype("<i2").tobytes()


QUIET = frame(0.0)
LOUD = frame(0.3)


def test_a_lead_within_the_margin_and_half_a_step_cuts_nothing() -> None:
    trim = PlayoutTrim(margin_s=0.01)
    trim.offer(0.0199, now=0.0)
    assert trim.pending_s == 0
    assert trim.cut(QUIET, RATE, now=0.0) == (QUIET, 0.0)


@pytest.mark.parametrize(
    ("lead_s", "cut_s"),
    [
        (0.0002, 0.0),  # frames that go as they come: how a call starts
        (0.009, 0.0),
        (0.011, 0.02),  # 9 ms too much: that frame goes 9 ms late, once
        (0.036, 0.04),  # what a 300 ms stall left standing on this box (36-39 ms)
        (0.098, 0.1),  # a standing frame and a phase
    ],
)
def test_by_default_the_lead_is_cut_to_the_nearest_whole_step(lead_s: float, cut_s: float) -> None:
    """No margin by default: a call after a stall is back where it started, within half a step."""
    trim = PlayoutTrim()
    trim.offer(lead_s, now=0.0)
    assert trim.pending_s == pytest.approx(cut_s)


def test_a_lead_is_cut_in_whole_steps_keeping_the_margin_from_the_start_of_a_quiet_frame() -> None:
    trim = PlayoutTrim(margin_s=0.01)
    trim.offer(0.075, now=0.0)  # (75 - 10) ms -> three 20 ms steps
    assert trim.pending_s == pytest.approx(0.06)
    audio = (np.arange(FRAME_SAMPLES) % 50).astype("<i2").tobytes()  # quiet; a ramp, so which part was kept shows
    kept, cut_s = trim.cut(audio, RATE, now=0.1)
    assert cut_s == pytest.approx(0.06)
    assert kept == audio[3 * STEP_SAMPLES * 2 :]  # the start went, the rest untouched
    assert trim.pending_s == 0 and trim.trimmed_s == pytest.approx(0.06) and trim.trims == 1
    assert trim.cut(QUIET, RATE, now=0.2) == (QUIET, 0.0)  # done: later frames play whole


def test_a_cut_waits_for_a_pause_then_takes_speech_after_the_quiet_wait() -> None:
    trim = PlayoutTrim(margin_s=0.01, quiet_wait_s=1.0)
    trim.offer(0.05, now=10.0)
    assert trim.cut(LOUD, RATE, now=10.5) == (LOUD, 0.0)  # the bot is talking: wait
    kept, cut_s = trim.cut(QUIET, RATE, now=10.6)  # a pause comes
    assert cut_s == pytest.approx(0.04) and len(kept) == (FRAME_SAMPLES - 2 * STEP_SAMPLES) * 2

    trim.offer(0.05, now=20.0)
    assert trim.cut(LOUD, RATE, now=20.9) == (LOUD, 0.0)
    kept, cut_s = trim.cut(LOUD, RATE, now=21.0)  # no pause within a second: cut anyway
    assert cut_s == pytest.approx(0.04) and kept == LOUD[2 * STEP_SAMPLES * 2 :]


def test_a_standing_frame_goes_whole_and_a_longer_lead_is_cut_over_several_frames() -> None:
    trim = PlayoutTrim(margin_s=0.01)
    trim.offer(0.19, now=0.0)  # (190 - 10) ms -> 180 ms: two whole frames and one step
    cuts = [trim.cut(QUIET, RATE, now=0.0) for _ in range(4)]
    assert [len(kept) for kept, _ in cuts] == [0, 0, (FRAME_SAMPLES - STEP_SAMPLES) * 2, FRAME_SAMPLES * 2]
    assert [cut for _, cut in cuts] == pytest.approx([0.08, 0.08, 0.02, 0.0])
    assert trim.trimmed_s == pytest.approx(0.18)


def test_a_report_during_a_cut_replaces_it_keeping_its_deadline_and_a_restart_cancels_it() -> None:
    trim = PlayoutTrim(margin_s=0.01, quiet_wait_s=0.3)
    trim.offer(0.05, now=0.0)  # 40 ms, by 0.3 s at the latest
    trim.offer(0.09, now=0.2)  # the delay grew meanwhile (a worker catching up): 80 ms
    assert trim.pending_s == pytest.approx(0.08)
    assert trim.cut(LOUD, RATE, now=0.25) == (LOUD, 0.0)  # still the first report's quiet wait
    kept, cut_s = trim.cut(LOUD, RATE, now=0.3)  # its deadline, not 0.5
    assert cut_s == pytest.approx(0.08) and kept == b""
    trim.offer(0.05, now=1.0)
    trim.offer(0.012, now=1.1)  # nothing stands any more: no cut
    assert trim.pending_s == 0 and trim.cut(LOUD, RATE, now=5.0) == (LOUD, 0.0)
    trim.offer(0.05, now=6.0)
    trim.cancel()  # the pacer restarted: a new phase
    assert trim.pending_s == 0
    assert trim.cut(QUIET, RATE, now=7.0) == (QUIET, 0.0)
    assert trim.trims == 4


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        PlayoutTrim(step_s=0)
    with pytest.raises(ValueError):
        PlayoutTrim(margin_s=-0.01)
