"""The guarded Twilio serializer: bad input is skipped (never raised), call events are reported."""

from __future__ import annotations

import base64
import json

import pytest
from pipecat.clocks.system_clock import SystemClock
from pipecat.frames.frames import EndFrame, InputAudioRawFrame, InputDTMFFrame, SpeechOutputAudioRawFrame
from pipecat.processors.frame_processor import FrameProcessorSetup

from app.gateway.serializer import GuardedTwilioSerializer

pytestmark = pytest.mark.asyncio


async def make() -> tuple[GuardedTwilioSerializer, list[tuple[str, dict]], list[str]]:
    events: list[tuple[str, dict]] = []
    bad: list[str] = []
    serializer = GuardedTwilioSerializer(
        "MZ1", call_sid="CA1", on_event=lambda e, m: events.append((e, m)), on_bad_message=bad.append
    )
    await serializer.setup(
        FrameProcessorSetup(clock=SystemClock(), task_manager=None, pipeline_worker=None, audio_in_sample_rate=8000)
    )
    return serializer, events, bad


async def test_media_and_dtmf_become_frames_and_events_are_reported() -> None:
    serializer, events, bad = await make()
    payload = base64.b64encode(bytes([0xFF] * 160)).decode()
    frame = await serializer.deserialize(
        json.dumps({"event": "media", "media": {"payload": payload}, "streamSid": "MZ1"})
    )
    assert isinstance(frame, InputAudioRawFrame) and frame.sample_rate == 8000 and frame.num_frames == 160
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
