"""CallerFrames: caller audio in whatever the transport delivers -> the worker's exact 80 ms frames."""

from __future__ import annotations

import numpy as np

from app import protocol
from app.pipecat.caller_frames import CallerFrames


def test_20ms_telephone_chunks_become_whole_24khz_frames_with_nothing_held_back() -> None:
    frames = CallerFrames(capacity=8)
    chunk = np.full(160, 1000, dtype="<i2").tobytes()  # 20 ms at 8 kHz
    counts = [frames.add(chunk, 8000, 1) for _ in range(8)]
    assert [queued for queued, _ in counts] == [0, 0, 0, 1, 0, 0, 0, 1]  # one frame per 80 ms, when complete
    assert len(frames) == 2
    frame = frames.pop()
    assert len(frame) == protocol.FRAME_BYTES
    second = np.frombuffer(frames.pop(), dtype="<i2")
    assert abs(int(np.median(second)) - 1000) <= 2  # the level survives 8 -> 24 kHz


def test_stereo_is_mixed_down_and_a_full_queue_drops_the_oldest() -> None:
    frames = CallerFrames(capacity=2)
    left = np.arange(protocol.FRAME_SAMPLES * 3) % 100
    stereo = np.stack([left, left + 100], axis=1).astype("<i2").tobytes()  # 3 frames, interleaved
    queued, dropped = frames.add(stereo, protocol.SAMPLE_RATE, 2)
    assert (queued, dropped, len(frames)) == (3, 1, 2)
    kept = np.frombuffer(frames.pop(), dtype="<i2")
    assert (kept == left[protocol.FRAME_SAMPLES : 2 * protocol.FRAME_SAMPLES] + 50).all()  # frame 1: 0 was dropped
    assert frames.trim(0) == 1 and len(frames) == 0
