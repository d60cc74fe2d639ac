"""G.711 μ-law at 8 kHz, as Twilio Media Streams carry it: PCM16 <-> one byte per sample.

The codec itself is the standard library's `audioop` (on Python 3.13+ the `audioop-lts` package
pipecat already depends on), the same one pipecat's Twilio serializer uses on the gateway side.
"""

from __future__ import annotations

import audioop  # deprecated in 3.11; provided by audioop-lts from 3.13

import numpy as np


def encode(pcm: np.ndarray) -> bytes:
    """PCM16 samples -> μ-law bytes. pcm: (n,) int16 -> n bytes."""
    return audioop.lin2ulaw(np.ascontiguousarray(pcm, dtype=np.int16).tobytes(), 2)


def decode(data: bytes) -> np.ndarray:
    """μ-law bytes -> PCM16 samples. n bytes -> (n,) int16."""
    return np.frombuffer(audioop.ulaw2lin(data, 2), dtype=np.int16)
