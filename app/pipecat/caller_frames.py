"""CallerFrames: the caller's audio as the worker takes it, exact 80 ms frames of PCM16 at 24 kHz.

Pipecat hands the service `InputAudioRawFrame`s of any length, sample rate and channel count
(20 ms at 8 kHz from Twilio, 10-20 ms at 24 kHz from WebRTC). They are mixed down to mono,
converted to 24 kHz with `FrameResampler` (app/pipecat/audio.py: no look-ahead, so nothing is held
back but whole-frame remainders) and cut into 1920-sample frames, queued for the sender with the
time the audio that completed each frame arrived. The queue is bounded: when the worker falls
behind, the oldest frame is dropped, so the caller's audio reaches the worker late by at most
`capacity` frames.

`shift` moves where frames are cut (app/pipecat/tick_align.py says why): silence inserted at once
(frames complete earlier), or caller audio dropped (frames complete later). A drop waits for a
quiet message (at most `QUIET_WAIT_S` of audio), so it takes a pause, not a syllable, when it can.

`StandingBacklog` watches the queue from the sender's side. After a stall the worker catches up
and the queue empties within a second; a worker that only just keeps real time never catches up,
and frames that waited on every send for a whole window would wait for the rest of the call (up
to `capacity` frames, 640 ms with 8). Then that many frames are not sent, quiet ones first (each
waits at most `quiet_wait` frames for a pause): the caller's audio reaches the worker that much sooner, and the
bot answers that many frames fewer, so the playout takes the same time out on its side.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from app import protocol
from app.pipecat.audio import FrameResampler, float_to_pcm16, is_quiet, pcm16_mono

QUIET_WAIT_S = 1.0  # a drop waits this much audio for a quiet message, then takes the next one


class CallerFrames:
    """A bounded queue of 80 ms, 24 kHz PCM16 caller frames, filled from audio of any format."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._resampler: FrameResampler | None = None
        self._buffer = np.zeros(0)  # [n] 24 kHz samples waiting to fill a frame
        self._queue: deque[tuple[bytes, float]] = deque()  # (PCM16 frame, when its last audio arrived)
        self.chunk_s = 0.0  # duration of the last audio handed in (a transport message)
        self._drop = 0  # 24 kHz samples still to drop
        self._drop_waited = 0  # samples seen since the drop was asked for
        self.samples_dropped = 0  # by shifts, in all
        self.samples_inserted = 0

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, audio: bytes, sample_rate: int, num_channels: int, arrived_at: float) -> tuple[int, int]:
        """Take PCM16 audio (interleaved when num_channels > 1) that arrived at `arrived_at`;
        returns (frames queued, frames dropped)."""
        if self._resampler is None or self._resampler.in_rate != sample_rate:
            self._resampler = FrameResampler(sample_rate, protocol.SAMPLE_RATE)
        mono = pcm16_mono(audio, num_channels)  # [n] at sample_rate
        self.chunk_s = len(mono) / sample_rate
        chunk = self._resampler.process(mono)  # [m] at 24 kHz
        if self._drop:
            chunk = self._take_drop(chunk)
        self._buffer = np.concatenate([self._buffer, chunk]) if len(self._buffer) else chunk
        queued = dropped = 0
        while len(self._buffer) >= protocol.FRAME_SAMPLES:
            frame = float_to_pcm16(self._buffer[: protocol.FRAME_SAMPLES])  # 1920 samples
            self._buffer = self._buffer[protocol.FRAME_SAMPLES :]
            if len(self._queue) >= self.capacity:
                self._queue.popleft()  # drop the oldest: latency stays bounded
                dropped += 1
            self._queue.append((frame, arrived_at))
            queued += 1
        return queued, dropped

    def shift(self, seconds: float) -> None:
        """Cut later frames `seconds` later (> 0: drop that much caller audio, at the next quiet
        message) or earlier (< 0: insert that much silence now)."""
        samples = round(abs(seconds) * protocol.SAMPLE_RATE)
        if seconds > 0:
            self._drop += samples
        elif samples:
            self._buffer = np.concatenate([np.zeros(samples), self._buffer])
            self.samples_inserted += samples

    def pop(self) -> tuple[bytes, float]:
        """The oldest queued frame and when its last audio arrived (the queue must not be empty)."""
        return self._queue.popleft()

    def trim(self, keep: int) -> int:
        """Drop the oldest frames until at most `keep` are left; returns how many were dropped."""
        dropped = 0
        while len(self._queue) > keep:
            self._queue.popleft()
            dropped += 1
        return dropped

    def _take_drop(self, chunk: np.ndarray) -> np.ndarray:
        """Drop pending samples from this chunk if it is quiet, or if the drop has waited long enough."""
        self._drop_waited += len(chunk)
        if not is_quiet(chunk) and self._drop_waited < QUIET_WAIT_S * protocol.SAMPLE_RATE:
            return chunk
        take = min(self._drop, len(chunk))
        self._drop -= take
        self.samples_dropped += take
        if not self._drop:
            self._drop_waited = 0
        return chunk[take:]


class StandingBacklog:
    """Which popped caller frames to leave unsent, so a backlog that stands goes (module docstring)."""

    def __init__(self, *, window: int = 12, quiet_wait: int = 12) -> None:
        if window < 1 or quiet_wait < 0:
            raise ValueError(f"window >= 1 and quiet_wait >= 0, got {window}, {quiet_wait}")
        self.window = window
        self.quiet_wait = quiet_wait
        self.pending = 0  # frames still to leave unsent
        self.dropped = 0  # left unsent so far
        self._seen = 0  # pops in the current window
        self._least = 0  # the fewest frames left waiting after one of them
        self._waited = 0  # pops since the pending drop was decided

    def take(self, pcm: bytes, waiting: int) -> bool:
        """A frame was popped with `waiting` frames still queued behind it: True to leave it unsent."""
        if self.pending and waiting == 0:
            self.reset()  # nothing waits behind this frame any more: the backlog went by itself
        if self.pending:
            self._waited += 1
            if self._waited > self.quiet_wait or is_quiet(np.frombuffer(pcm, dtype="<i2")):
                self.pending -= 1
                self.dropped += 1
                self._waited = 0  # the next one waits for a pause of its own
                if not self.pending:
                    self._restart()
                return True
            return False
        self._least = waiting if self._seen == 0 else min(self._least, waiting)
        self._seen += 1
        if self._seen >= self.window:
            if self._least > 0:
                self.pending, self._waited = self._least, 0
            else:
                self._restart()
        return False

    def reset(self) -> None:
        """Forget the window and any pending drop (the call moved: a new worker, a new queue)."""
        self.pending = 0
        self._restart()

    def _restart(self) -> None:
        self._seen = 0
        self._least = 0
