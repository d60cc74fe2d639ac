"""G.711 μ-law, the one codec of the repo: PCM16 <-> one byte per sample, as Twilio Media Streams
carry it at 8 kHz. Used by the gateway (caller audio in) and the simulator (`app.sim.mulaw`).

Plain numpy, bit-exact with `audioop.ulaw2lin` / `lin2ulaw` (what pipecat uses; deprecated since
Python 3.11, gone from the standard library in 3.13): decoding is a lookup in a 256-entry table,
encoding the G.711 segment formula (sign, 3-bit segment, 4-bit mantissa, all bits inverted) on
whole arrays. tests/gateway/test_serializer.py checks both against audioop for every code and every
sample value.
"""

from __future__ import annotations

import numpy as np

_BIAS = 0x84  # 132: added to the magnitude so every segment starts at a power of two
_CLIP = 32635  # largest magnitude that still encodes (plus the bias it is 32767)


def _decode_table() -> np.ndarray:
    code = ~np.arange(256, dtype=np.int32) & 0xFF  # μ-law stores every bit inverted
    magnitude = (((code & 0x0F) << 3) + _BIAS) << ((code & 0x70) >> 4)
    return np.where(code & 0x80, _BIAS - magnitude, magnitude - _BIAS).astype("<i2")


MULAW_TO_PCM16 = _decode_table()  # [256] little-endian int16: the linear value of each μ-law byte
MULAW_TO_PCM16.flags.writeable = False


def mulaw_decode(data: bytes) -> np.ndarray:
    """μ-law bytes -> PCM16 samples. n bytes -> (n,) int16."""
    return MULAW_TO_PCM16[np.frombuffer(data, dtype=np.uint8)]


def mulaw_encode(pcm: np.ndarray) -> bytes:
    """PCM16 samples -> μ-law bytes. pcm: (n,) int16 (or int16-valued) -> n bytes."""
    x = (np.asarray(pcm, dtype=np.int16).astype(np.int32) >> 2) << 2  # audioop keeps 14 bits
    sign = np.where(x < 0, 0x00, 0x80)
    magnitude = np.minimum(np.abs(x), _CLIP) + _BIAS  # [n] in [132, 32767]
    segment = np.floor(np.log2(magnitude)).astype(np.int32) - 7  # [n] in 0..7
    mantissa = (magnitude >> (segment + 3)) & 0x0F
    return ((sign | (segment << 4) | mantissa) ^ 0x7F).astype(np.uint8).tobytes()
