"""The Twilio Media Streams serializer: every message bounded, parsed once, checked; bad ones skipped.

Twilio's side is untrusted. Pipecat's TwilioFrameSerializer raises on JSON that is not an object
(`[1]`), on `"media": null`, on a payload that is not base64, and on nesting deep enough for a
RecursionError, and an exception ends the transport's receive loop, that is, the call. It also
decodes a payload of any size. Here each message costs work bounded by what Twilio really sends:

    WebSocket message    <= MAX_WS_MESSAGE_BYTES (64 KiB), enforced by uvicorn (`ws_max_size`, set in
                         app/gateway/app.py): a bigger one closes that stream alone with 1009
    message text         <= MAX_MESSAGE_CHARS (8 KiB), checked before json.loads
    media payload        <= MAX_PAYLOAD_CHARS base64 chars = MAX_MEDIA_BYTES (640 bytes, 80 ms) of
                         μ-law, checked before base64 decoding; Twilio sends 160 bytes (20 ms, 216
                         chars), so 4x is slack, not a use

A message over a bound, not JSON (RecursionError included), not an object with a known `event`,
or malformed for its event is skipped and counted (`on_bad_message(why)`), and the call goes on.
Warnings are rate-limited per stream: the first is logged at once, then at most one per
BAD_LOG_INTERVAL_S, saying how many were suppressed in between (the metric counts every one).

The message is parsed once: `media` becomes an InputAudioRawFrame (PCM16, 8 kHz, mono, from the
repo's μ-law table, app/audio_codec.py) and `dtmf` an InputDTMFFrame, built here exactly as
pipecat's deserialize builds them with the pipeline at 8 kHz, which the Twilio pipeline always is
(app/gateway/pipeline.py; the service converts from the frame's own rate in any case). Pipecat's
own deserialize is never called, so nothing is parsed or decoded twice. Outgoing audio (serialize)
is pipecat's: PCM16 -> μ-law -> one JSON media message, no parsing involved.

`stop`, `dtmf` and `mark` are also handed to `on_event(event, message)`, so the gateway can record
them. `connected` and `start` are read by the gateway before the pipeline exists; here they are
unexpected.

auto_hang_up is off on purpose: the TwiML's `<Connect>` is the last verb, so closing the media
stream ends the call; no Twilio REST credentials and no outbound request are needed for that.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from pipecat.audio.dtmf.types import KeypadEntry
from pipecat.frames.frames import Frame, InputAudioRawFrame, InputDTMFFrame
from pipecat.processors.frame_processor import FrameProcessorSetup
from pipecat.serializers.twilio import TwilioFrameSerializer

from app.audio_codec import mulaw_decode
from app.pipecat.latency import RECEIVED_AT

logger = logging.getLogger(__name__)

TWILIO_SAMPLE_RATE = 8000
TWILIO_MEDIA_BYTES = 160  # one Twilio media message: 20 ms of 8 kHz μ-law
MAX_MEDIA_BYTES = 4 * TWILIO_MEDIA_BYTES  # 640 bytes = 80 ms: accepted; a bigger payload is skipped
MAX_PAYLOAD_CHARS = 4 * math.ceil(MAX_MEDIA_BYTES / 3)  # 856: MAX_MEDIA_BYTES in base64
MAX_MESSAGE_CHARS = 8 * 1024  # a message's text; a 4x media message is ~1.1 KB, `stop` ~0.2 KB
# The largest WebSocket message the gateway reads at all (uvicorn's ws_max_size; its default is
# 16 MiB). Twilio's largest message, `start` with its custom parameters, is a few KB.
MAX_WS_MESSAGE_BYTES = 64 * 1024
BAD_LOG_INTERVAL_S = 10.0  # per stream: at most one warning about bad messages this often

KNOWN_EVENTS = frozenset({"connected", "start", "media", "dtmf", "mark", "stop"})
KEYPAD = frozenset(entry.value for entry in KeypadEntry)

EventCallback = Callable[[str, dict[str, Any]], None]


def parse_message(data: str | bytes) -> tuple[dict[str, Any] | None, str]:
    """One Twilio stream message as an object with a known `event`, bounded (MAX_MESSAGE_CHARS
    before parsing); else (None, why). Used before the stream's start and after it."""
    if len(data) > MAX_MESSAGE_CHARS:
        return None, f"{len(data)} characters, more than {MAX_MESSAGE_CHARS}"
    try:
        message = json.loads(data)
    except Exception as exc:  # ValueError, TypeError, RecursionError (deep nesting), ...
        return None, f"not JSON ({type(exc).__name__})"
    if not isinstance(message, dict) or not isinstance(message.get("event"), str):
        return None, "not an object with an 'event'"
    if message["event"] not in KNOWN_EVENTS:
        return None, f"unknown event {message['event'][:40]!r}"
    return message, ""


class GuardedTwilioSerializer(TwilioFrameSerializer):
    """Twilio Media Streams serializer that never lets one bad message end the call."""

    def __init__(
        self,
        stream_sid: str,
        *,
        call_sid: str | None = None,
        on_event: EventCallback | None = None,
        on_bad_message: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(
            stream_sid,
            call_sid=call_sid,
            params=TwilioFrameSerializer.InputParams(
                twilio_sample_rate=TWILIO_SAMPLE_RATE,
                auto_hang_up=False,
                resampler_clear_after_secs=None,
            ),
        )
        self._on_event = on_event
        self._on_bad_message = on_bad_message
        self._clock = clock
        self._last_warning_at: float | None = None
        self._suppressed = 0  # bad messages not logged since the last warning

    async def setup(self, setup: FrameProcessorSetup) -> None:
        await super().setup(setup)
        if setup.audio_in_sample_rate != TWILIO_SAMPLE_RATE:
            logger.warning(
                "twilio stream %s: pipeline input at %d Hz; caller audio stays at %d Hz (its frames say so)",
                self._stream_sid,
                setup.audio_in_sample_rate,
                TWILIO_SAMPLE_RATE,
            )

    async def deserialize(self, data: str | bytes) -> Frame | None:
        try:
            return self._deserialize(data)
        except Exception as exc:  # a message we cannot convert costs that message, never the call
            self._bad(f"conversion failed: {exc!r}", data)
            return None

    def _deserialize(self, data: str | bytes) -> Frame | None:
        message = self._parse(data)
        if message is None:
            return None
        event = message["event"]
        if event == "media":
            return self._audio(message, data)
        if event == "dtmf":
            dtmf = message.get("dtmf")
            digit = dtmf.get("digit") if isinstance(dtmf, dict) else None
            if not isinstance(digit, str) or digit not in KEYPAD:
                self._bad("dtmf without a keypad digit", data)
                return None
            self._report(event, message)
            return InputDTMFFrame(KeypadEntry(digit))
        if event == "mark":
            mark = message.get("mark")
            if not isinstance(mark, dict) or not isinstance(mark.get("name"), str):
                self._bad("mark without a name", data)
                return None
            self._report(event, message)
            return None
        if event == "stop":
            self._report(event, message)
            return None
        self._bad(f"{event!r} after the stream started", data)  # connected, start
        return None

    def _parse(self, data: str | bytes) -> dict[str, Any] | None:
        """The message as an object with a known `event`, or None (counted) if it is not one."""
        message, why = parse_message(data)
        if message is None:
            self._bad(why, data)
        return message

    def _audio(self, message: dict[str, Any], data: str | bytes) -> InputAudioRawFrame | None:
        media = message.get("media")
        payload = media.get("payload") if isinstance(media, dict) else None
        if not isinstance(payload, str):
            self._bad("media without a base64 payload", data)
            return None
        if len(payload) > MAX_PAYLOAD_CHARS:
            self._bad(f"media payload of {len(payload)} base64 characters, more than {MAX_PAYLOAD_CHARS}", data)
            return None
        try:
            ulaw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            self._bad("media without a base64 payload", data)
            return None
        if not ulaw:
            return None  # no audio (pipecat skips it too)
        pcm = mulaw_decode(ulaw).tobytes()  # PCM16 little-endian, 2 bytes per μ-law byte
        frame = InputAudioRawFrame(audio=pcm, sample_rate=TWILIO_SAMPLE_RATE, num_channels=1)
        # when the message arrived, before pipecat's input queue: the service measures its latency from here
        frame.metadata[RECEIVED_AT] = time.monotonic()
        return frame

    def _report(self, event: str, message: dict[str, Any]) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(event, message)
        except Exception:  # recording an event must not end the call
            logger.exception("twilio stream %s: handling %r failed", self._stream_sid, event)

    def _bad(self, why: str, data: str | bytes) -> None:
        if self._on_bad_message is not None:
            self._on_bad_message(why)
        now = self._clock()
        if self._last_warning_at is not None and now - self._last_warning_at < BAD_LOG_INTERVAL_S:
            self._suppressed += 1
            return
        suppressed, self._suppressed, self._last_warning_at = self._suppressed, 0, now
        since = f" ({suppressed} more since the last warning)" if suppressed else ""
        preview = data[:120] if isinstance(data, str) else repr(data[:120])
        logger.warning(
            "twilio stream %s: ignoring a message (%s)%s: %.160s", self._stream_sid, why, since, preview
        )
