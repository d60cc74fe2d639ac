"""Low-latency sample-rate conversion on whole frames (8 kHz telephone audio <-> 24 kHz model audio).

`FrameResampler` is a stateful rational polyphase FIR resampler (windowed-sinc, Kaiser window,
linear phase). Every call converts one whole frame and returns exactly `len(frame) * out / in`
samples when that is an integer (160 samples at 8 kHz -> 480 at 24 kHz, 1920 at 24 kHz -> 640 at
8 kHz); it keeps only the FIR history between calls and never holds audio back. Its only delay is
the filter's group delay, `delay_s`:

    8 kHz -> 24 kHz   147 taps at 24 kHz (49 per phase)   73 samples at 24 kHz = 3.04 ms
    24 kHz -> 8 kHz   146 taps at 24 kHz                   72.5 samples         = 3.02 ms
    round trip                                                                  ~6.1 ms
    (measured by cross-correlation in tests/pipecat/test_audio.py)

Design: cutoff 0.925 x the lower Nyquist (3.7 kHz for 8 kHz), transition 3.4-4.0 kHz, stopband
>= 60 dB; a 3.4 kHz tone loses < 0.1 dB, a 6 kHz tone folding onto 2 kHz is down > 70 dB.

Evaluation (streaming, O(taps) work per output sample, no [outputs, taps] matrix per frame):
output c of a call sits at upsampled time t_c = t_0 + M*c and uses phase t_c mod L of the filter
bank. Outputs c0, c0+L, c0+2L, ... share a phase and their newest inputs step M samples apart, so
each such class is one decimating FIR over the input. With L*M small (every rate pair in use:
8k<->24k is L*M = 3, 16k->24k 6, 48k->24k 2), that FIR is split once more into its M branches
(taps r, r+M, r+2M, ...), each one `np.convolve` over every M-th input sample: L*M C-level calls
per frame, each doing exactly the multiply-adds it needs. Unusual ratios (44.1k -> 24k is
L*M = 11 760) gather windows for blocks of at most 64 outputs instead, so memory stays bounded
whatever the frame size. Both give the original implementation's output to within 1e-9
(tests/pipecat/reference_resampler.py keeps it as the reference). bench/resampler.py, on a loaded
2-core box: 8k -> 24k ~19 us per 20 ms message (was ~340 us), 24k -> 8k ~40 us per 80 ms frame
(was ~1 400 us); details in bench/README.md.

Why not soxr's streaming resampler (what pipecat uses by default)? It is fast (7-13 us per chunk
here) but its latency comes from holding output back: measured with 20 ms / 80 ms chunks, HQ holds
66 ms (8k->24k) and 19 ms (24k->8k), VHQ 112 ms and 38 ms, LQ 12.5 ms each way and already cuts a
3.4 kHz tone by 7.8 dB; QQ holds nothing but does not filter (a 6 kHz tone folds onto 2 kHz at
0 dB). It also returns a varying number of samples per chunk, while the service relies on whole
frames out for whole frames in. A full-duplex call cannot spend 25-150 ms of round trip on
resampling; this filter costs ~6 ms and tens of microseconds per frame.
"""

from __future__ import annotations

import math

import numpy as np

_ROLLOFF = 0.925  # cutoff as a fraction of the lower Nyquist frequency
_TRANSITION = 0.15  # transition band as a fraction of the lower Nyquist frequency
_ATTENUATION_DB = 60.0
_MAX_BRANCHES = 64  # up to this many (phase, branch) sub-filters (L*M): convolve them; beyond: gather
_BLOCK = 64  # outputs per gathered window matrix for unusual ratios (bounds it to [64, K])


def _kaiser_beta(attenuation_db: float) -> float:
    if attenuation_db > 50:
        return 0.1102 * (attenuation_db - 8.7)
    if attenuation_db >= 21:
        return 0.5842 * (attenuation_db - 21) ** 0.4 + 0.07886 * (attenuation_db - 21)
    return 0.0


class FrameResampler:
    """Convert mono PCM between two sample rates, one whole frame at a time, with state."""

    def __init__(self, in_rate: int, out_rate: int) -> None:
        if in_rate <= 0 or out_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {in_rate} -> {out_rate}")
        self.in_rate = in_rate
        self.out_rate = out_rate
        g = math.gcd(in_rate, out_rate)
        self._up = out_rate // g  # L
        self._down = in_rate // g  # M
        if in_rate == out_rate:
            bank, self._taps, self.delay_s = np.ones((1, 1)), 1, 0.0
        else:
            bank, self._taps, self.delay_s = self._design()
        # bank[p, j] = h[p + j*L]: phase p's tap on the input j samples back from the newest
        self._reversed = np.ascontiguousarray(bank[:, ::-1])  # [L, K]: for oldest-first windows
        # branches[p][r] = bank[p, r::M]: phase p's taps on the inputs r, r+M, r+2M, ... samples back
        self._branches: tuple[tuple[np.ndarray, ...], ...] | None = None
        if self._up * self._down <= _MAX_BRANCHES:
            self._branches = tuple(
                tuple(np.ascontiguousarray(bank[p, r :: self._down]) for r in range(self._down))
                for p in range(self._up)
            )
        self._window = np.arange(self._taps)  # [K]
        self._history = np.zeros(self._taps - 1)  # last K-1 input samples
        self._t = 0  # upsampled-time index of the next output, relative to the next input chunk

    def _design(self) -> tuple[np.ndarray, int, float]:
        fs_up = self.in_rate * self._up
        nyquist = min(self.in_rate, self.out_rate) / 2
        cutoff = _ROLLOFF * nyquist / fs_up  # cycles per upsampled sample
        width = _TRANSITION * nyquist / fs_up
        length = math.ceil((_ATTENUATION_DB - 8) / (2.285 * 2 * math.pi * width)) + 1
        taps = math.ceil(length / self._up)  # taps per polyphase branch (K)
        n = taps * self._up
        k = np.arange(n) - (n - 1) / 2
        prototype = 2 * cutoff * np.sinc(2 * cutoff * k) * np.kaiser(n, _kaiser_beta(_ATTENUATION_DB))
        prototype *= self._up / prototype.sum()  # branch gains sum to 1: unity gain after zero-stuffing
        bank = prototype.reshape(taps, self._up).T  # [L, K]: bank[p, j] = h[p + j*L]
        delay_s = (n - 1) / 2 / fs_up
        return bank, taps, delay_s

    def output_length(self, n: int) -> int:
        """Samples the next call with `n` input samples will return."""
        total = n * self._up
        if total <= self._t:
            return 0
        return (total - self._t + self._down - 1) // self._down

    def process(self, samples: np.ndarray) -> np.ndarray:
        """Resample one frame (float or int16, mono) -> float64 samples at the output rate."""
        x = np.asarray(samples, dtype=np.float64)  # [n]
        if self.in_rate == self.out_rate:
            return x.copy()
        n = len(x)
        count = self.output_length(n)
        extended = np.concatenate([self._history, x])  # [K-1+n]; extended[K-1+i] = x[i]
        y = np.empty(count)  # [count]
        if self._branches is not None:
            for c0 in range(min(self._up, count)):
                y[c0 :: self._up] = self._convolve_class(extended, self._branches, c0, count)
        else:
            for start in range(0, count, _BLOCK):
                self._gather_block(extended, y, start, min(start + _BLOCK, count))
        self._t += self._down * count - n * self._up  # stays in [0, M)
        self._history = extended[n:].copy()  # [K-1]
        return y

    def _convolve_class(
        self, extended: np.ndarray, branches: tuple[tuple[np.ndarray, ...], ...], c0: int, count: int
    ) -> np.ndarray:
        """Outputs c0, c0+L, c0+2L, ...: one phase p, newest inputs s, s+M, s+2M, ... -> [m]."""
        L, M, K = self._up, self._down, self._taps
        t = self._t + M * c0
        newest = t // L + K - 1  # index in `extended` of output c0's newest input
        m = (count - c0 + L - 1) // L
        parts = []
        for r, taps in enumerate(branches[t % L]):  # branch r weighs inputs newest - r - M*j, j < q
            q = len(taps)
            start = newest - r - M * (q - 1)
            parts.append(np.convolve(extended[start : start + M * (m + q - 1) : M], taps, "valid"))  # [m]
        return parts[0] if M == 1 else np.add.reduce(parts)

    def _gather_block(self, extended: np.ndarray, y: np.ndarray, start: int, stop: int) -> None:
        """Outputs start..stop-1 of an unusual ratio: a gathered [<= _BLOCK, K] window matrix."""
        t = self._t + self._down * np.arange(start, stop)  # [b] upsampled time of each output
        windows = extended[(t // self._up)[:, None] + self._window]  # [b, K], oldest sample first
        y[start:stop] = np.einsum("bk,bk->b", windows, self._reversed[t % self._up])

    def process_pcm16(self, pcm: bytes) -> bytes:
        """Resample PCM16 little-endian mono bytes -> PCM16 bytes (clipped)."""
        y = self.process(np.frombuffer(pcm, dtype="<i2"))
        return float_to_pcm16(y)


def float_to_pcm16(samples: np.ndarray) -> bytes:
    """Samples in int16 scale (float) -> PCM16 little-endian bytes, rounded and clipped."""
    return np.clip(np.rint(samples), -32768, 32767).astype("<i2").tobytes()


def pcm16_mono(pcm: bytes, channels: int) -> np.ndarray:
    """PCM16 bytes with `channels` interleaved channels -> mono int16 samples (channel mean)."""
    data = np.frombuffer(pcm[: len(pcm) - len(pcm) % (2 * channels)], dtype="<i2")
    if channels == 1:
        return data
    return data.reshape(-1, channels).mean(axis=1)  # [n]


QUIET_RMS = 328.0  # -40 dBFS in int16 scale: audio this quiet is a pause


def is_quiet(samples: np.ndarray) -> bool:
    """Whether int16-scale samples (any dtype) are a pause: RMS at most QUIET_RMS (not when empty)."""
    if len(samples) == 0:
        return False
    x = samples.astype(np.float64)
    return float(np.sqrt(np.mean(x * x))) <= QUIET_RMS
