"""G.711 μ-law codec in numpy (bit-exact with the reference g711.c that audioop used).

Twilio Media Streams carry μ-law at 8 kHz, one byte per sample; this module turns PCM16 into
those bytes and back without audioop (removed from the standard library in Python 3.13).
"""

from __future__ import annotations

import numpy as np

_BIAS = 0x84
_CLIP = 8159  # 14-bit magnitude limit
_SEG_END = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF], dtype=np.int32)


def encode(pcm: np.ndarray) -> bytes:
    """PCM16 samples -> μ-law bytes. pcm: (n,) int16 -> n bytes."""
    x = np.asarray(pcm, dtype=np.int16).astype(np.int32) >> 2  # (n,) 14-bit range
    mask = np.where(x < 0, 0x7F, 0xFF)
    magnitude = np.minimum(np.abs(x), _CLIP) + (_BIAS >> 2)
    seg = np.searchsorted(_SEG_END, magnitude, side="left")  # first segment whose end >= value
    mantissa = (magnitude >> np.minimum(seg + 1, 31)) & 0x0F
    ulaw = np.where(seg >= 8, 0x7F, (np.minimum(seg, 7) << 4) | mantissa)
    return (ulaw ^ mask).astype(np.uint8).tobytes()


def _decode_table() -> np.ndarray:
    """(256,) int16: the PCM value of every μ-law byte."""
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    t = (((u & 0x0F) << 3) + _BIAS) << ((u & 0x70) >> 4)
    return np.where(u & 0x80, _BIAS - t, t - _BIAS).astype(np.int16)


def decode(data: bytes) -> np.ndarray:
    """μ-law bytes -> PCM16 samples. n bytes -> (n,) int16."""
    codes = np.frombuffer(data, dtype=np.uint8)  # (n,)
    return _decode_table()[codes]
