"""CallerFrames: the caller's audio as the worker takes it, exact 80 ms frames of PCM16 at 24 kHz.

Pipecat hands the service `InputAudioRawFrame`s of any length, sample rate and channel count
(20 ms at 8 kHz from Twilio, 10-20 ms at 24 kHz from WebRTC). They are mixed down to mono,
converted to 24 kHz with `FrameResampler` (app/pipecat/audio.py: no look-ahead, so nothing is held
back but whole-frame remainders) and cut into 1920-sample frames, queued for the sender. The
queue is bounded: when the worker falls behind, the oldest frame is dropped, so the caller's
audio reaches the worker late by at most `capacity` frames.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from app import protocol
from app.pipecat.audio import FrameResampler, float_to_pcm16, pcm16_mono


class CallerFrames:
    """A bounded queue of 80 ms, 24 kHz PCM16 caller frames, filled from audio of any format."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._resampler: FrameResampler | None = None
        self._buffer = np.zeros(0)  # [n] 24 kHz samples waiting to fill a frame
        self._queue: deque[bytes] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, audio: bytes, sample_rate: int, num_channels: int) -> tuple[int, int]:
        """Take PCM16 audio (interleaved when num_channels > 1); returns (frames queued, frames dropped)."""
        if self._resampler is None or self._resampler.in_rate != sample_rate:
            self._resampler = FrameResampler(sample_rate, protocol.SAMPLE_RATE)
        mono = pcm16_mono(audio, num_channels)  # [n] at sample_rate
        self._buffer = np.concatenate([self._buffer, self._resampler.process(mono)])
        queued = dropped = 0
        while len(self._buffer) >= protocol.FRAME_SAMPLES:
            frame = float_to_pcm16(self._buffer[: protocol.FRAME_SAMPLES])  # 1920 samples
            self._buffer = self._buffer[protocol.FRAME_SAMPLES :]
            if len(self._queue) >= self.capacity:
                self._queue.popleft()  # drop the oldest: latency stays bounded
                dropped += 1
            self._queue.append(frame)
            queued += 1
        return queued, dropped

    def pop(self) -> bytes:
        """The oldest queued frame (the queue must not be empty)."""
        return self._queue.popleft()

    def trim(self, keep: int) -> int:
        """Drop the oldest frames until at most `keep` are left; returns how many were dropped."""
        dropped = 0
        while len(self._queue) > keep:
            self._queue.popleft()
            dropped += 1
        return dropped

