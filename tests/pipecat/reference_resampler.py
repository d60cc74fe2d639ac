"""The original FrameResampler (index matrices + einsum), kept verbatim as the reference.

`app.pipecat.audio.FrameResampler` must give the same output as this to within 1e-9
(tests/pipecat/test_audio.py), and bench/resampler.py times the two against each other. This is the
one copy of the old algorithm in the repo, design included, so a change to the filter design shows up
as a mismatch too. Never use it in app code: per call it builds `[outputs, taps]` int64 index arrays,
which is what froze the gateway for 9.6 s on one 1 MB μ-law payload.
"""

from __future__ import annotations

import math

import numpy as np

_ROLLOFF = 0.925  # cutoff as a fraction of the lower Nyquist frequency
_TRANSITION = 0.15  # transition band as a fraction of the lower Nyquist frequency
_ATTENUATION_DB = 60.0


def _kaiser_beta(attenuation_db: float) -> float:
    if attenuation_db > 50:
        return 0.1102 * (attenuation_db - 8.7)
    if attenuation_db >= 21:
        return 0.5842 * (attenuation_db - 21) ** 0.4 + 0.07886 * (attenuation_db - 21)
    return 0.0


class ReferenceResampler:
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
            self._bank = np.ones((1, 1))
            self._taps = 1
            self.delay_s = 0.0
        else:
            self._bank, self._taps, self.delay_s = self._design()
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
        extended = np.concatenate([self._history, x])  # [K-1+n]
        if count:
            t = self._t + self._down * np.arange(count)  # [count] upsampled time of each output
            phase = t % self._up
            newest = t // self._up + self._taps - 1  # index in `extended` of the newest input used
            index = newest[:, None] - np.arange(self._taps)[None, :]  # [count, K]
            y = np.einsum("ck,ck->c", extended[index], self._bank[phase])  # [count]
            self._t = int(t[-1]) + self._down - n * self._up
        else:
            y = np.zeros(0)
            self._t -= n * self._up
        self._history = extended[n:]  # [K-1]
        return y
