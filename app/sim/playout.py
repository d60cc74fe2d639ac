"""What the caller hears: the bot's audio played out in real time, the way a phone leg does.

Model (all times relative to the moment `start` was sent):

* The bot's `media` payloads go into a FIFO played at 8 kHz. Playback starts `jitter_ms` after
  the first payload arrives (a jitter buffer); while the FIFO holds audio it plays without gaps.
* A payload that arrives after the FIFO ran dry is **late**: the caller heard a gap (an underrun)
  and playback restarts `jitter_ms` after that arrival. The gap, from the end of the previous
  audio to the restart, adds to `underrun_ms`. One late payload counts as one late 20 ms frame:
  `late_frames` is the number of audible gaps, independent of how long each one was.
* A `clear` drops what has not been played yet; the next payload starts afresh (not late).
* A `mark` is reached when everything queued before it has been played.

Positions are kept in samples so back-to-back payloads join exactly; the wav written from this
timeline therefore has real silences where the bot's audio was missing or late.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass, field

import numpy as np

from app.sim.audio import FRAME_SAMPLES, PHONE_RATE


@dataclass
class _Chunk:
    arrival_s: float
    position: int  # first sample on the timeline
    pcm: np.ndarray  # (n,) int16


@dataclass
class Playout:
    """The bot's audio on the caller's timeline; feed it payloads in arrival order."""

    jitter_ms: float = 80.0
    chunks: list[_Chunk] = field(default_factory=list)
    late_frames: int = 0
    underrun_samples: int = 0
    largest_gap_samples: int = 0  # the longest single underrun
    cleared_samples: int = 0
    first_arrival_s: float | None = None
    _end: int | None = None  # end of the queued audio, None when (re)starting fresh

    @property
    def samples_received(self) -> int:
        return sum(len(c.pcm) for c in self.chunks) + self.cleared_samples

    @property
    def frames_received(self) -> float:
        """Bot audio received, in 20 ms frames (fractional if payloads were not whole frames)."""
        return self.samples_received / FRAME_SAMPLES

    def add(self, pcm: np.ndarray, arrival_s: float) -> None:
        """Queue one payload of (n,) int16 samples that arrived at `arrival_s`."""
        if len(pcm) == 0:
            return
        if self.first_arrival_s is None:
            self.first_arrival_s = arrival_s
        arrival = arrival_s * PHONE_RATE  # in samples
        restart = math.ceil((arrival_s + self.jitter_ms / 1000.0) * PHONE_RATE)
        if self._end is None:
            position = restart
        elif arrival > self._end:
            self.late_frames += 1
            self.underrun_samples += restart - self._end
            self.largest_gap_samples = max(self.largest_gap_samples, restart - self._end)
            position = restart
        else:
            position = self._end
        self.chunks.append(_Chunk(arrival_s, position, pcm))
        self._end = position + len(pcm)

    def clear(self, at_s: float) -> None:
        """Drop everything not yet played at `at_s`."""
        cut = math.ceil(at_s * PHONE_RATE)
        kept: list[_Chunk] = []
        for chunk in self.chunks:
            if chunk.position >= cut:
                self.cleared_samples += len(chunk.pcm)
                continue
            keep = min(len(chunk.pcm), cut - chunk.position)
            self.cleared_samples += len(chunk.pcm) - keep
            kept.append(_Chunk(chunk.arrival_s, chunk.position, chunk.pcm[:keep]))
        self.chunks = kept
        self._end = None

    def queued_until_s(self, now_s: float) -> float:
        """When the audio queued so far will have been played (a mark sent now is reached then)."""
        if self._end is None:
            return now_s
        return max(now_s, self._end / PHONE_RATE)

    def intervals(self) -> list[tuple[int, int]]:
        """Merged [start, end) sample intervals during which bot audio plays."""
        merged: list[tuple[int, int]] = []
        for chunk in sorted(self.chunks, key=lambda c: c.position):
            start, end = chunk.position, chunk.position + len(chunk.pcm)
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], end))
            else:
                merged.append((start, end))
        return merged

    def coverage(self, windows_s: list[float], window_ms: float = 20.0) -> float | None:
        """Fraction of windows (start times, `window_ms` long) whose midpoint hears bot audio."""
        if not windows_s:
            return None
        intervals = self.intervals()
        starts = [s for s, _ in intervals]
        covered = 0
        for start_s in windows_s:
            mid = (start_s + window_ms / 2000.0) * PHONE_RATE
            i = bisect_right(starts, mid) - 1
            if i >= 0 and intervals[i][0] <= mid < intervals[i][1]:
                covered += 1
        return covered / len(windows_s)

    def playout_delays_ms(self) -> list[float]:
        """Per payload: time from arrival to the start of its playback (buffering latency)."""
        return [(c.position / PHONE_RATE - c.arrival_s) * 1000.0 for c in self.chunks]

    def render(self) -> np.ndarray:
        """(n,) int16: the timeline from `start` to the end of the last audio, silence in gaps."""
        if not self.chunks:
            return np.zeros(0, dtype=np.int16)
        length = max(c.position + len(c.pcm) for c in self.chunks)
        out = np.zeros(length, dtype=np.int16)
        for chunk in self.chunks:
            out[chunk.position : chunk.position + len(chunk.pcm)] = chunk.pcm
        return out
