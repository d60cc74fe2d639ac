"""The gateway <-> worker messages: one definition, strict parsing, clear errors."""

from __future__ import annotations

import pytest

from app import protocol


def test_round_trip_of_every_message() -> None:
    messages = [
        protocol.Start(call_id="c1", persona="p", sampling=protocol.Sampling(seed=3, text_temperature=0.5)),
        protocol.End(reason="caller_hangup"),
    ]
    for message in messages:
        assert protocol.decode_client(protocol.encode(message)) == message
    server = [
        protocol.Ready(call_id="c1", worker_id="w", slot=2, prefill_ms=3.5),
        protocol.Text(text=" hello", frame=12),
        protocol.Error(code="busy", message="no free slot"),
        protocol.Ended(reason="shutting_down", frames_in=3, frames_out=3),
    ]
    for message in server:
        assert protocol.decode_server(protocol.encode(message)) == message


@pytest.mark.parametrize(
    "raw",
    [
        "not json",
        '{"type": "start"}',
        '{"type": "launch", "call_id": "c"}',
        '{"type": "start", "call_id": "c", "persona": "p", "extra": 1}',
        '{"type": "start", "call_id": "c", "persona": "p", "sampling": {"text_top_k": -1}}',
    ],
)
def test_bad_client_messages_are_protocol_errors(raw: str) -> None:
    with pytest.raises(protocol.ProtocolError, match="bad client message"):
        protocol.decode_client(raw)


def test_audio_frames_are_exactly_80_ms() -> None:
    assert protocol.FRAME_SAMPLES == 1920 and protocol.FRAME_BYTES == 3840
    assert protocol.FRAME_SECONDS == pytest.approx(0.08)
    frame = bytes(protocol.FRAME_BYTES)
    assert protocol.check_frame(frame) is frame
    with pytest.raises(protocol.ProtocolError, match="3839 bytes"):
        protocol.check_frame(bytes(3839))
