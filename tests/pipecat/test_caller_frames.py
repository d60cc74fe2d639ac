"""CallerFrames: caller audio in whatever the transport delivers -> the worker's exact 80 ms frames."""

from __future__ import annotations

import numpy as np
import pytest

from app import protocol
from app.pipecat.caller_frames import QUIET_WAIT_S, CallerFrames, StandingBacklog

CHUNK_8K = 160  # 20 ms at 8 kHz, a Twilio media message
CHUNK_24K = 480  # the same 20 ms at 24 kHz


def test_20ms_telephone_chunks_become_whole_24khz_frames_with_nothing_held_back() -> None:
    frames = CallerFrames(capacity=8)
    chunk = np.full(CHUNK_8K, 1000, dtype="<i2").tobytes()
    counts = [frames.add(chunk, 8000, 1, arrived_at=float(i)) for i in range(8)]
    assert [queued for queued, _ in counts] == [0, 0, 0, 1, 0, 0, 0, 1]  # one frame per 80 ms, when complete
    assert len(frames) == 2 and frames.chunk_s == 0.02
    frame, arrived = frames.pop()
    assert len(frame) == protocol.FRAME_BYTES and arrived == 3.0  # when the frame's last audio came
    second, arrived = frames.pop()
    assert arrived == 7.0
    assert abs(int(np.median(np.frombuffer(second, dtype="<i2"))) - 1000) <= 2  # the level survives 8 -> 24 kHz


def test_stereo_is_mixed_down_and_a_full_queue_drops_the_oldest() -> None:
    frames = CallerFrames(capacity=2)
    left = np.arange(protocol.FRAME_SAMPLES * 3) % 100
    stereo = np.stack([left, left + 100], axis=1).astype("<i2").tobytes()  # 3 frames, interleaved
    queued, dropped = frames.add(stereo, protocol.SAMPLE_RATE, 2, arrived_at=0.0)
    assert (queued, dropped, len(frames)) == (3, 1, 2)
    kept = np.frombuffer(frames.pop()[0], dtype="<i2")
    assert (kept == left[protocol.FRAME_SAMPLES : 2 * protocol.FRAME_SAMPLES] + 50).all()  # frame 1: 0 was dropped
    assert frames.trim(0) == 1 and len(frames) == 0


def ramp_chunks(n: int, level: int = 3000) -> list[bytes]:
    """n 20 ms chunks at 24 kHz whose samples count up (level + sample index), to see what was cut."""
    samples = (level + np.arange(n * CHUNK_24K) % 20000).astype("<i2")
    return [samples[i * CHUNK_24K : (i + 1) * CHUNK_24K].tobytes() for i in range(n)]


def test_a_drop_makes_frames_complete_one_message_later_and_waits_for_a_quiet_one() -> None:
    """Shifting by +20 ms drops 20 ms of caller audio: from then on each frame is complete one
    message later. Loud messages are kept while the drop waits for a quiet one (a pause)."""
    frames = CallerFrames(capacity=16)
    loud = ramp_chunks(6)
    for i in range(4):
        frames.add(loud[i], protocol.SAMPLE_RATE, 1, arrived_at=i)
    assert len(frames) == 1
    frames.shift(0.020)
    frames.add(loud[4], protocol.SAMPLE_RATE, 1, arrived_at=4)  # loud: kept, the drop waits
    quiet = np.zeros(CHUNK_24K, dtype="<i2").tobytes()
    frames.add(quiet, protocol.SAMPLE_RATE, 1, arrived_at=5)  # quiet: this one is dropped
    assert frames.samples_dropped == CHUNK_24K
    counts = [frames.add(loud[5], protocol.SAMPLE_RATE, 1, arrived_at=t)[0] for t in (6, 7, 8)]
    assert counts == [0, 0, 1]  # loud[4] + 3 more messages: the frame completes one message later
    frames.pop()
    second = np.frombuffer(frames.pop()[0], dtype="<i2")
    assert (second[:CHUNK_24K] == np.frombuffer(loud[4], dtype="<i2")).all()  # nothing loud was lost


def test_a_drop_that_finds_no_pause_takes_audio_after_a_second() -> None:
    frames = CallerFrames(capacity=64)
    frames.shift(0.040)
    loud = ramp_chunks(1)[0]
    messages = int(QUIET_WAIT_S / 0.02)
    for i in range(messages + 4):
        frames.add(loud, protocol.SAMPLE_RATE, 1, arrived_at=i)
    assert frames.samples_dropped == 2 * CHUNK_24K  # 40 ms, from the messages after the wait
    assert len(frames) == (messages + 4 - 2) // 4


def test_an_insert_makes_the_next_frame_complete_one_message_earlier() -> None:
    frames = CallerFrames(capacity=8)
    chunks = ramp_chunks(8)
    for i in range(4):
        frames.add(chunks[i], protocol.SAMPLE_RATE, 1, arrived_at=i)
    frames.shift(-0.020)  # 20 ms of silence now
    counts = [frames.add(chunks[i], protocol.SAMPLE_RATE, 1, arrived_at=i)[0] for i in range(4, 7)]
    assert counts == [0, 0, 1]  # three messages complete the frame
    frames.pop()
    frame = np.frombuffer(frames.pop()[0], dtype="<i2")
    assert not frame[:CHUNK_24K].any() and frames.samples_inserted == CHUNK_24K
    assert (frame[CHUNK_24K : 2 * CHUNK_24K] == np.frombuffer(chunks[4], dtype="<i2")).all()


def _frame(level: float) -> bytes:
    t = np.arange(protocol.FRAME_SAMPLES) / protocol.SAMPLE_RATE
    return (level * 32767 * np.sin(2 * np.pi * 440 * t)).astype("<i2").tobytes()


LOUD, QUIET = _frame(0.3), _frame(0.0)


def test_a_backlog_that_drains_now_and_then_is_left_alone() -> None:
    backlog = StandingBacklog(window=4)
    for waiting in [2, 3, 0, 1, 2, 3, 1, 0, 2]:  # the queue empties within every window
        assert not backlog.take(LOUD, waiting)
    assert backlog.pending == 0 and backlog.dropped == 0


def test_a_standing_backlog_goes_in_the_next_pauses_or_after_the_quiet_wait() -> None:
    backlog = StandingBacklog(window=4, quiet_wait=3)
    decisions = [backlog.take(LOUD, waiting) for waiting in [3, 2, 2, 3]]  # never fewer than 2 waiting
    assert decisions == [False] * 4 and backlog.pending == 2
    assert not backlog.take(LOUD, 2)  # the caller is talking: wait for a pause
    assert backlog.take(QUIET, 2)  # a pause: leave it unsent
    assert [backlog.take(LOUD, 1) for _ in range(3)] == [False] * 3  # quiet_wait frames waited for a pause
    assert backlog.take(LOUD, 1)  # none came: the next one goes anyway
    assert backlog.pending == 0 and backlog.dropped == 2
    assert not backlog.take(LOUD, 0)  # a new window


def test_a_backlog_that_drains_by_itself_meanwhile_is_not_cut() -> None:
    backlog = StandingBacklog(window=2)
    backlog.take(LOUD, 2)
    backlog.take(LOUD, 2)
    assert backlog.pending == 2
    assert not backlog.take(QUIET, 0)  # the worker caught up before a pause came
    assert backlog.pending == 0 and backlog.dropped == 0


def test_a_move_forgets_the_window_and_the_pending_drop() -> None:
    backlog = StandingBacklog(window=2)
    backlog.take(LOUD, 1)
    backlog.take(LOUD, 1)
    assert backlog.pending == 1
    backlog.reset()
    assert backlog.pending == 0 and not backlog.take(QUIET, 1)
    with pytest.raises(ValueError):
        StandingBacklog(window=0)
