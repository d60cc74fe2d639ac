"""The caller's playout model: when bot audio counts as late, and what the bot wav holds."""

from __future__ import annotations

import numpy as np
import pytest

from app.sim.playout import Playout

FRAME = np.full(160, 1000, dtype=np.int16)  # 20 ms


def test_steady_real_time_audio_is_never_late() -> None:
    playout = Playout(jitter_ms=80)
    for k in range(100):
        playout.add(FRAME, arrival_s=0.1 + 0.02 * k + (0.01 if k % 2 else 0.0))  # 10 ms jitter
    assert playout.late_frames == 0 and playout.underrun_samples == 0
    assert playout.frames_received == 100
    assert playout.intervals() == [(1440, 1440 + 16_000)]  # starts at 0.1 s + 80 ms, no gaps


def test_a_stall_longer_than_the_buffer_is_one_late_frame_and_a_gap() -> None:
    playout = Playout(jitter_ms=80)
    for k in range(10):
        playout.add(FRAME, arrival_s=0.02 * k)  # plays 0.08 .. 0.28
    for k in range(10):
        playout.add(FRAME, arrival_s=0.5 + 0.02 * k)  # stalled: buffer dry at 0.28
    assert playout.late_frames == 1
    assert playout.underrun_samples / 8000 == pytest.approx(0.58 - 0.28)
    assert [(s / 8000, e / 8000) for s, e in playout.intervals()] == [(0.08, 0.28), (0.58, 0.78)]
    pcm = playout.render()
    assert len(pcm) == int(0.78 * 8000) and not pcm[int(0.3 * 8000) : int(0.57 * 8000)].any()


def test_bursts_queue_up_instead_of_overlapping() -> None:
    playout = Playout(jitter_ms=0)
    for _ in range(5):
        playout.add(FRAME, arrival_s=1.0)
    assert playout.intervals() == [(8000, 8000 + 800)]
    assert max(playout.playout_delays_ms()) == pytest.approx(80)
    assert playout.queued_until_s(1.0) == pytest.approx(1.1)


def test_clear_drops_unplayed_audio_and_restarts_fresh() -> None:
    playout = Playout(jitter_ms=0)
    for _ in range(10):
        playout.add(FRAME, arrival_s=0.0)  # queued 0 .. 0.2
    playout.clear(0.05)
    assert playout.cleared_samples == 1600 - 400
    playout.add(FRAME, arrival_s=0.5)
    assert playout.late_frames == 0
    assert playout.intervals() == [(0, 400), (4000, 4160)]


def test_coverage_counts_speech_windows_with_bot_audio() -> None:
    playout = Playout(jitter_ms=0)
    for k in range(50):
        playout.add(FRAME, arrival_s=0.02 * k)  # bot audio 0 .. 1.0 s
    windows = [0.02 * i for i in range(100)]  # caller speaks 0 .. 2.0 s
    assert playout.coverage(windows) == pytest.approx(0.5)
    assert playout.coverage([]) is None
