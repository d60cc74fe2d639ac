"""Pipecat's TwilioFrameSerializer, guarded against bad input and reporting call events.

Pipecat's deserializer logs and skips text that is not JSON, but raises on JSON that is not an
object (`[1]`), on `"media": null`, or on a payload that is not base64, and an exception ends the
transport's receive loop, that is, the call. Here every message is parsed once and checked;
anything malformed or unknown is logged, counted and skipped, and the call goes on.

`stop`, `dtmf` and `mark` are also handed to `on_event(event, message)`, so the gateway can record
them (pipecat turns `dtmf` into an `InputDTMFFrame` as usual, and ignores the others). `connected`
and `start` are read by the gateway before the pipeline exists; here they are unexpected.

auto_hang_up is off on purpose: the TwiML's `<Connect>` is the last verb, so closing the media
stream ends the call; no Twilio REST credentials and no outbound request are needed for that.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Callable
from typing import Any

from pipecat.audio.dtmf.types import KeypadEntry
from pipecat.frames.frames import Frame
from pipecat.serializers.twilio import TwilioFrameSerializer

logger = logging.getLogger(__name__)

TWILIO_SAMPLE_RATE = 8000
KNOWN_EVENTS = frozenset({"connected", "start", "media", "dtmf", "mark", "stop"})
KEYPAD = frozenset(entry.value for entry in KeypadEntry)

EventCallback = Callable[[str, dict[str, Any]], None]


class GuardedTwilioSerializer(TwilioFrameSerializer):
    """Twilio Media Streams serializer that never lets one bad message end the call."""

    def __init__(
        self,
        stream_sid: str,
        *,
        call_sid: str | None = None,
        on_event: EventCallback | None = None,
        on_bad_message: Callable[[str], None] | None = None,
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

    async def deserialize(self, data: str | bytes) -> Frame | None:
        message = self._parse(data)
        if message is None:
            return None
        event = message["event"]
        if event in ("stop", "dtmf", "mark") and self._on_event is not None:
            try:
                self._on_event(event, message)
            except Exception:  # recording an event must not end the call
                logger.exception("twilio stream %s: handling %r failed", self._stream_sid, event)
        if event not in ("media", "dtmf"):
            return None
        try:
            return await super().deserialize(data)
        except Exception as exc:  # a message pipecat cannot convert: skip it, keep the call
            self._bad(f"{event} message pipecat could not convert ({exc!r})", data)
            return None

    def _parse(self, data: str | bytes) -> dict[str, Any] | None:
        try:
            message = json.loads(data)
        except (ValueError, TypeError):
            self._bad("not JSON", data)
            return None
        if not isinstance(message, dict) or not isinstance(message.get("event"), str):
            self._bad("not an object with an 'event'", data)
            return None
        event = message["event"]
        if event not in KNOWN_EVENTS:
            self._bad(f"unknown event {event!r}", data)
            return None
        if event == "media" and not _media_ok(message):
            self._bad("media without a base64 payload", data)
            return None
        if event == "dtmf" and not _dtmf_ok(message):
            self._bad("dtmf without a keypad digit", data)
            return None
        if event == "mark" and not _mark_ok(message):
            self._bad("mark without a name", data)
            return None
        if event in ("connected", "start"):
            self._bad(f"{event!r} after the stream started", data)
            return None
        return message

    def _bad(self, why: str, data: str | bytes) -> None:
        preview = data[:120] if isinstance(data, str) else repr(data[:120])
        logger.warning("twilio stream %s: ignoring a message (%s): %s", self._stream_sid, why, preview)
        if self._on_bad_message is not None:
            self._on_bad_message(why)


def _dtmf_ok(message: dict[str, Any]) -> bool:
    dtmf = message.get("dtmf")
    return isinstance(dtmf, dict) and dtmf.get("digit") in KEYPAD


def _mark_ok(message: dict[str, Any]) -> bool:
    mark = message.get("mark")
    return isinstance(mark, dict) and isinstance(mark.get("name"), str)


def _media_ok(message: dict[str, Any]) -> bool:
    media = message.get("media")
    if not isinstance(media, dict) or not isinstance(media.get("payload"), str):
        return False
    try:
        base64.b64decode(media["payload"], validate=True)
    except (binascii.Error, ValueError):
        return False
    return True
