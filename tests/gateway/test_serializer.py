"""The guarded Twilio serializer: bad input is skipped (never raised), call events are reported,
every message costs work bounded by what Twilio sends, and the frames are pipecat's own."""

from __future__ import annotations

import base64
import json
import logging
import time
import warnings

import numpy as np
import pytest
from pipecat.clocks.system_clock import SystemClock
from pipecat.frames.frames import EndFrame, InputAudioRawFrame, InputDTMFFrame, SpeechOutputAudioRawFrame
from pipecat.processors.frame_processor import FrameProcessorSetup
from pipecat.serializers.twilio import TwilioFrameSerializer

from app.audio_codec import mulaw_decode, mulaw_encode
from app.gateway import serializer as serializer_module
from app.pipecat.latency import RECEIVED_AT
from app.gateway.serializer import (
    BAD_LOG_INTERVAL_S,
    MAX_MEDIA_BYTES,
    MAX_MESSAGE_CHARS,
    MAX_PAYLOAD_CHARS,
    GuardedTwilioSerializer,
)

class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _setup() -> FrameProcessorSetup:
    return FrameProcessorSetup(
        clock=SystemClock(), task_manager=None, pipeline_worker=None, audio_in_sample_rate=8000
    )


async def make(clock: FakeClock | None = None) -> tuple[GuardedTwilioSerializer, list[tuple[str, dict]], list[str]]:
    events: list[tuple[str, dict]] = []
    bad: list[str] = []
    serializer = GuardedTwilioSerializer(
        "MZ1",
        call_sid="CA1",
        on_event=lambda e, m: events.append((e, m)),
        on_bad_message=bad.append,
        clock=clock or FakeClock(),
    )
    await serializer.setup(_setup())
    return serializer, events, bad


def media(ulaw: bytes) -> str:
    """A media message as Twilio sends it."""
    return json.dumps(
        {
            "event": "media",
            "sequenceNumber": "3",
            "media": {"track": "inbound", "chunk": "2", "timestamp": "20", "payload": base64.b64encode(ulaw).decode()},
            "streamSid": "MZ1",
        }
    )


async def test_media_and_dtmf_become_frames_and_events_are_reported() -> None:
    serializer, events, bad = await make()
    payload = base64.b64encode(bytes([0xFF] * 160)).decode()
    before = time.monotonic()
    frame = await serializer.deserialize(
        json.dumps({"event": "media", "media": {"payload": payload}, "streamSid": "MZ1"})
    )
    assert isinstance(frame, InputAudioRawFrame) and frame.sample_rate == 8000 and frame.num_frames == 160
    # stamped on arrival, so the gateway's latency counts pipecat's input queue too
    assert before <= frame.metadata[RECEIVED_AT] <= time.monotonic()
    dtmf = await serializer.deserialize(json.dumps({"event": "dtmf", "dtmf": {"digit": "7"}}))
    assert isinstance(dtmf, InputDTMFFrame) and dtmf.button.value == "7"
    assert await serializer.deserialize(json.dumps({"event": "mark", "mark": {"name": "m1"}})) is None
    assert await serializer.deserialize(json.dumps({"event": "stop", "stop": {}})) is None
    assert [e for e, _ in events] == ["dtmf", "mark", "stop"] and bad == []


@pytest.mark.parametrize(
    "message",
    [
        "not json",
        b"\xff\xfe",
        "[1, 2]",
        '"media"',
        "{}",
        '{"event": 5}',
        '{"event": "surprise"}',
        '{"event": "media"}',
        '{"event": "media", "media": null}',
        '{"event": "media", "media": {"payload": 12}}',
        '{"event": "media", "media": {"payload": "%% nope %%"}}',
        '{"event": "dtmf", "dtmf": "1"}',
        '{"event": "dtmf", "dtmf": {"digit": "X"}}',
        '{"event": "mark"}',
        '{"event": "start", "start": "again?"}',
        '{"event": "connected", "protocol": "Call"}',
    ],
)
async def test_bad_messages_are_skipped_not_raised(message: str | bytes) -> None:
    serializer, events, bad = await make()
    assert await serializer.deserialize(message) is None
    assert len(bad) == 1 and events == []


async def test_outgoing_audio_is_twilio_media_and_no_hang_up_request() -> None:
    serializer, _, _ = await make()
    out = await serializer.serialize(SpeechOutputAudioRawFrame(audio=bytes(320), sample_rate=8000, num_channels=1))
    message = json.loads(out)
    assert message["event"] == "media" and message["streamSid"] == "MZ1"
    assert len(base64.b64decode(message["media"]["payload"])) == 160
    assert await serializer.serialize(EndFrame()) is None  # auto_hang_up is off: no REST call


async def test_frames_are_exactly_what_pipecats_own_deserializer_makes() -> None:
    ours, _, bad = await make()
    theirs = TwilioFrameSerializer(
        "MZ1", params=TwilioFrameSerializer.InputParams(auto_hang_up=False, resampler_clear_after_secs=None)
    )
    await theirs.setup(_setup())
    rng = np.random.default_rng(0)
    for ulaw in (bytes(range(256))[:160], rng.integers(0, 256, 160, dtype=np.uint8).tobytes(), b"\x7f" * 640, b"\x00"):
        mine, reference = await ours.deserialize(media(ulaw)), await theirs.deserialize(media(ulaw))
        assert type(mine) is type(reference) is InputAudioRawFrame
        assert (mine.sample_rate, mine.num_channels, mine.num_frames) == (8000, 1, len(ulaw))
        assert (reference.sample_rate, reference.num_channels) == (8000, 1)
        assert mine.audio == reference.audio
    for digit in ("0", "9", "*", "#"):
        message = json.dumps({"event": "dtmf", "streamSid": "MZ1", "dtmf": {"track": "inbound_track", "digit": digit}})
        mine, reference = await ours.deserialize(message), await theirs.deserialize(message)
        assert type(mine) is type(reference) is InputDTMFFrame and mine.button == reference.button
    assert bad == []


def test_mulaw_codec_is_bit_exact_with_audioop() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import audioop
    codes = bytes(range(256))
    assert mulaw_decode(codes).tobytes() == audioop.ulaw2lin(codes, 2)  # every code
    every = np.arange(-32768, 32768, dtype=np.int16)
    assert mulaw_encode(every) == audioop.lin2ulaw(every.tobytes(), 2)  # every sample value


async def test_media_up_to_four_twilio_frames_is_accepted_and_bigger_is_skipped() -> None:
    serializer, _, bad = await make()
    frame = await serializer.deserialize(media(b"\x55" * MAX_MEDIA_BYTES))  # 80 ms: accepted
    assert isinstance(frame, InputAudioRawFrame) and frame.num_frames == MAX_MEDIA_BYTES and bad == []
    assert await serializer.deserialize(media(b"\x55" * (MAX_MEDIA_BYTES + 3))) is None  # 4 base64 chars more
    assert len(bad) == 1 and str(MAX_PAYLOAD_CHARS) in bad[0]
    frame = await serializer.deserialize(media(b"\xff" * 160))  # the call goes on
    assert isinstance(frame, InputAudioRawFrame) and frame.num_frames == 160


async def test_an_oversized_message_is_refused_before_it_is_parsed_or_decoded(monkeypatch) -> None:
    serializer, _, bad = await make()
    parsed: list[int] = []
    real_loads = json.loads
    monkeypatch.setattr(serializer_module.json, "loads", lambda data: parsed.append(len(data)) or real_loads(data))
    decoded: list[int] = []
    real_b64 = serializer_module.base64.b64decode
    monkeypatch.setattr(
        serializer_module.base64, "b64decode", lambda s, **kw: decoded.append(len(s)) or real_b64(s, **kw)
    )
    huge = media(bytes(1_000_000))  # 1 MB of μ-law: 1.3 MB of valid JSON
    assert await serializer.deserialize(huge) is None
    assert await serializer.deserialize(huge.encode()) is None  # the same as a binary message
    assert parsed == [] and decoded == [] and len(bad) == 2
    # Under the text bound but with a payload over its bound: parsed, but not decoded.
    assert await serializer.deserialize(media(bytes(3000))) is None
    assert len(parsed) == 1 and decoded == [] and len(bad) == 3
    assert len(media(bytes(3000))) < MAX_MESSAGE_CHARS


@pytest.mark.parametrize("nested", ["[" * 5000, '{"a":' * 1500, '{"event": "media", "media": ' + "[" * 5000])
async def test_deep_nesting_is_skipped_and_the_call_goes_on(nested: str) -> None:
    serializer, _, bad = await make()
    assert len(nested) < MAX_MESSAGE_CHARS  # it reaches json.loads, which raises RecursionError
    assert await serializer.deserialize(nested) is None
    assert len(bad) == 1 and "RecursionError" in bad[0]
    assert isinstance(await serializer.deserialize(media(b"\xff" * 160)), InputAudioRawFrame)


async def test_warnings_about_bad_messages_are_rate_limited_per_stream(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    serializer, _, bad = await make(clock)
    caplog.set_level(logging.WARNING, logger="app.gateway.serializer")
    for _ in range(100):  # a flood within one interval: one line
        assert await serializer.deserialize("junk") is None
        clock.now += 0.02
    assert len(bad) == 100  # every one is counted
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "MZ1" in lines[0]
    clock.now += BAD_LOG_INTERVAL_S
    assert await serializer.deserialize("[1]") is None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "MZ1" in lines[1] and "99 more since the last warning" in lines[1]
    assert len(bad) == 101
