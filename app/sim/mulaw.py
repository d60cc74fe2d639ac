"""G.711 μ-law at 8 kHz, as Twilio Media Streams carry it: PCM16 <-> one byte per sample.

The simulator's name for the repo's one codec, `app.audio_codec` (shared with the gateway, which
must not import the simulator): `encode` and `decode` are that module's functions.
"""

from __future__ import annotations

from app.audio_codec import mulaw_decode as decode
from app.audio_codec import mulaw_encode as encode

__all__ = ["decode", "encode"]
