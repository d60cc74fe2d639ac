"""The simulated Twilio caller: message formats, μ-law, signatures, TwiML, and a whole call
against a small fake gateway that checks everything the way our gateway must."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl

import numpy as np
import pytest
import soundfile as sf
import uvicorn
from fastapi import FastAPI, Request, Response, WebSocket, WebSocketDisconnect
from twilio.request_validator import RequestValidator
from twilio.twiml.voice_response import Connect, Stream, VoiceResponse

from app.sim import CallOptions, DtmfPlan, RawMessage, mulaw, run_call
from app.sim.audio import read_caller_audio, split_frames
from app.sim.twilio import StreamMessages, parse_twiml, rebase_url, sign, voice_webhook_params

TOKEN = "test-auth-token-0123456789"


# ------------------------------------------------------------------------ message formats
def _messages() -> StreamMessages:
    return StreamMessages(stream_sid="MZ" + "0" * 32, call_sid="CA" + "1" * 32, account_sid="AC" + "2" * 32)


def test_connected_and_start_follow_twilio_schema() -> None:
    m = _messages()
    connected = json.loads(m.connected())
    assert connected == {"event": "connected", "protocol": "Call", "version": "1.0.0"}
    start = json.loads(m.start({"call_id": "c1", "persona": "p"}))
    assert start["event"] == "start" and start["sequenceNumber"] == "1"
    assert start["streamSid"] == m.stream_sid
    body = start["start"]
    assert body["streamSid"] == m.stream_sid and body["callSid"] == m.call_sid
    assert body["accountSid"] == m.account_sid
    assert body["tracks"] == ["inbound"]
    assert body["mediaFormat"] == {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
    assert body["customParameters"] == {"call_id": "c1", "persona": "p"}


def test_media_dtmf_mark_stop_follow_twilio_schema() -> None:
    m = _messages()
    m.start({})
    ulaw = bytes(range(160))
    media = json.loads(m.media(ulaw, chunk=1, timestamp_ms=0))
    assert media["event"] == "media" and media["streamSid"] == m.stream_sid
    assert media["sequenceNumber"] == "2"
    assert media["media"]["track"] == "inbound"
    assert media["media"]["chunk"] == "1" and media["media"]["timestamp"] == "0"
    assert base64.b64decode(media["media"]["payload"]) == ulaw
    dtmf = json.loads(m.dtmf("#"))
    assert dtmf["sequenceNumber"] == "3"
    assert dtmf["dtmf"] == {"track": "inbound_track", "digit": "#"}
    mark = json.loads(m.mark("greeting"))
    assert mark["sequenceNumber"] == "4" and mark["mark"] == {"name": "greeting"}
    stop = json.loads(m.stop())
    assert stop["event"] == "stop" and stop["sequenceNumber"] == "5"
    assert stop["stop"] == {"accountSid": m.account_sid, "callSid": m.call_sid}
    # Twilio sends every number as a string outside mediaFormat.
    for message in (media, dtmf, mark, stop):
        assert isinstance(message["sequenceNumber"], str)


def test_dtmf_plan_parsing() -> None:
    assert DtmfPlan.parse("12#@1.5") == DtmfPlan(digits="12#", at_s=1.5)
    assert DtmfPlan.parse("9").at_s == 1.0
    for bad in ("", "12a", "1@x", "1@-2"):
        with pytest.raises(ValueError):
            DtmfPlan.parse(bad)


# ------------------------------------------------------------------------------- μ-law
def test_mulaw_round_trip_error_is_within_g711_quantisation() -> None:
    pcm = np.linspace(-32768, 32767, 20_000).astype(np.int16)  # (20000,)
    back = mulaw.decode(mulaw.encode(pcm)).astype(np.int32)
    err = np.abs(back - pcm.astype(np.int32))
    # μ-law steps double per segment: error at most half a step, ~3.2 % of the magnitude + 4 near 0
    assert np.all(err <= np.abs(pcm.astype(np.int32)) * 0.032 + 8)
    # decode(encode(decode(x))) == decode(x): every code is a fixed point
    codes = bytes(range(256))
    again = mulaw.encode(mulaw.decode(codes))
    assert np.array_equal(mulaw.decode(again), mulaw.decode(codes))


def test_webhook_signature_validates_with_request_validator() -> None:
    url = "https://example.ngrok.io/twilio/voice"
    params = voice_webhook_params(
        call_sid="CA" + "a" * 32, account_sid="AC" + "b" * 32, from_number="+15550001111", to_number="+15550100001"
    )
    signature = sign(TOKEN, url, params)
    validator = RequestValidator(TOKEN)
    assert validator.validate(url, params, signature)
    assert not RequestValidator("another-token").validate(url, params, signature)
    assert not validator.validate(url, {**params, "To": "+15550100002"}, signature)


def test_stream_upgrade_signature_covers_the_wss_url_without_params() -> None:
    url = "wss://example.ngrok.io/twilio/stream"
    signature = sign(TOKEN, url)
    assert RequestValidator(TOKEN).validate(url, {}, signature)
    assert not RequestValidator(TOKEN).validate("wss://example.ngrok.io/other", {}, signature)


# ------------------------------------------------------------------------------- TwiML
def test_parse_twiml_finds_stream_and_parameters() -> None:
    response = VoiceResponse()
    connect = Connect()
    stream = Stream(url="wss://gw.example/twilio/stream")
    stream.parameter(name="call_id", value="call-1")
    stream.parameter(name="persona", value="waste-management")
    connect.append(stream)
    response.append(connect)
    twiml = parse_twiml(str(response))
    assert twiml.connects_stream
    assert twiml.stream_url == "wss://gw.example/twilio/stream"
    assert twiml.parameters == {"call_id": "call-1", "persona": "waste-management"}


def test_parse_twiml_busy_answer_has_no_stream() -> None:
    response = VoiceResponse()
    response.say("All our agents are busy.")
    response.hangup()
    twiml = parse_twiml(str(response))
    assert not twiml.connects_stream and twiml.verbs == ("Say", "Hangup")
    with pytest.raises(ValueError):
        parse_twiml("<html>")


def test_rebase_url_moves_public_stream_url_to_the_local_gateway() -> None:
    assert (
        rebase_url("wss://pub.example/twilio/stream", "https://pub.example", "http://127.0.0.1:8080")
        == "ws://127.0.0.1:8080/twilio/stream"
    )
    same = "ws://127.0.0.1:8080/twilio/stream"
    assert rebase_url(same, "http://127.0.0.1:8080", "http://127.0.0.1:8080") == same


# ------------------------------------------------------------------------- caller audio
def test_caller_audio_is_resampled_to_8k_and_framed(tmp_path: Path) -> None:
    t = np.arange(16_000) / 16_000
    path = tmp_path / "tone.wav"
    sf.write(path, 0.5 * np.sin(2 * np.pi * 440 * t), 16_000, subtype="FLOAT")
    pcm = read_caller_audio(path)
    assert pcm.dtype == np.int16 and abs(len(pcm) - 8000) <= 1
    frames = split_frames(np.concatenate([pcm[:8000], pcm[:10]]))  # 50 frames + 10 samples
    assert len(frames) == 51 and all(f.shape == (160,) for f in frames)
    ulaw_path = tmp_path / "mulaw.wav"
    sf.write(ulaw_path, pcm, 8000, subtype="ULAW")
    assert len(read_caller_audio(ulaw_path)) == len(pcm)


# ------------------------------------------------------------- a whole call, fake gateway
@dataclass
class FakeGateway:
    """Checks signatures like ours must, answers TwiML, echoes caller audio back as the bot."""

    received: list[dict] = field(default_factory=list)
    raw_text: list[str] = field(default_factory=list)
    upgrade_signature_ok: bool | None = None
    webhook_form: dict[str, str] = field(default_factory=dict)
    status_form: dict[str, str] = field(default_factory=dict)
    port: int = 0
    busy: bool = False

    def app(self) -> FastAPI:
        app = FastAPI()
        validator = RequestValidator(TOKEN)

        @app.post("/twilio/voice")
        async def voice(request: Request) -> Response:
            form = dict(parse_qsl((await request.body()).decode()))
            if not validator.validate(str(request.url), form, request.headers.get("X-Twilio-Signature", "")):
                return Response(status_code=403)
            self.webhook_form = form
            response = VoiceResponse()
            if self.busy:
                response.say("busy")
                response.hangup()
            else:
                connect = Connect()
                stream = Stream(url=f"ws://127.0.0.1:{self.port}/twilio/stream")
                stream.parameter(name="call_id", value="fake-call")
                stream.parameter(name="persona", value="general-assistant")
                connect.append(stream)
                response.append(connect)
            return Response(str(response), media_type="application/xml")

        @app.post("/twilio/status")
        async def status(request: Request) -> Response:
            form = dict(parse_qsl((await request.body()).decode()))
            if validator.validate(str(request.url), form, request.headers.get("X-Twilio-Signature", "")):
                self.status_form = form
            return Response(status_code=204)

        @app.websocket("/twilio/stream")
        async def stream(ws: WebSocket) -> None:
            self.upgrade_signature_ok = validator.validate(
                str(ws.url), {}, ws.headers.get("X-Twilio-Signature", "")
            )
            if not self.upgrade_signature_ok:
                await ws.close(code=1008)
                return
            await ws.accept()
            sid = None
            try:
                while True:
                    text = await ws.receive_text()
                    self.raw_text.append(text)
                    try:
                        msg = json.loads(text)
                    except json.JSONDecodeError:
                        continue
                    self.received.append(msg)
                    if msg.get("event") == "start":
                        sid = msg["start"]["streamSid"]
                    elif msg.get("event") == "media" and sid:
                        await ws.send_text(json.dumps(
                            {"event": "media", "streamSid": sid, "media": {"payload": msg["media"]["payload"]}}
                        ))
                        if msg["media"]["chunk"] == "10":
                            await ws.send_text(json.dumps({"event": "mark", "streamSid": sid, "mark": {"name": "m10"}}))
                    elif msg.get("event") == "stop":
                        await ws.close()
                        return
            except WebSocketDisconnect:
                return

        return app


@asynccontextmanager
async def serve(fake: FakeGateway) -> AsyncIterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    fake.port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(fake.app(), log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{fake.port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


def _speech_like(path: Path, seconds: float = 1.5, lead_s: float = 0.3) -> Path:
    """Leading silence, then a loud tone: 'speech' from lead_s on."""
    rate = 16_000
    t = np.arange(int(seconds * rate)) / rate
    audio = np.where(t >= lead_s, 0.3 * np.sin(2 * np.pi * 300 * t), 0.0)
    sf.write(path, audio, rate, subtype="PCM_16")
    return path


@pytest.mark.asyncio
async def test_whole_call_against_a_checking_fake_gateway(tmp_path: Path) -> None:
    fake = FakeGateway()
    audio = _speech_like(tmp_path / "caller.wav")
    async with serve(fake) as url:
        report = await run_call(CallOptions(
            audio=audio, gateway_url=url, auth_token=TOKEN, dtmf=(DtmfPlan("4#", at_s=0.5),),
            raw_messages=(RawMessage(0.7, "not json"),), tail_silence_s=0.2,
            out_wav=tmp_path / "bot.wav", report_path=tmp_path / "report.json",
        ))
    assert report.status == "completed", report.error
    assert report.call_id == "fake-call" and report.persona == "general-assistant"
    assert fake.upgrade_signature_ok is True
    assert fake.webhook_form["CallStatus"] == "ringing" and fake.webhook_form["Direction"] == "inbound"
    assert fake.status_form.get("CallStatus") == "completed"
    events = [m["event"] for m in fake.received]
    assert events[:2] == ["connected", "start"] and events[-1] == "stop"
    assert fake.received[1]["start"]["customParameters"] == {"call_id": "fake-call", "persona": "general-assistant"}
    media = [m for m in fake.received if m["event"] == "media"]
    assert len(media) == report.frames_out == 85  # 1.7 s of 20 ms frames
    assert [int(m["media"]["chunk"]) for m in media] == list(range(1, 86))
    assert [int(m["media"]["timestamp"]) for m in media] == [20 * i for i in range(85)]
    sequence = [int(m["sequenceNumber"]) for m in fake.received[1:]]
    assert sequence == list(range(1, len(sequence) + 1))
    assert [m["dtmf"]["digit"] for m in fake.received if m["event"] == "dtmf"] == ["4", "#"]
    assert "not json" in fake.raw_text and report.raw_messages_sent == 1
    assert any(m["event"] == "mark" and m["mark"]["name"] == "m10" for m in fake.received)
    assert report.marks_received == 1 and report.marks_echoed == 1
    # The echo bot answers each frame at once: everything arrives, in time, while the caller speaks.
    assert report.frames_in == pytest.approx(report.media_messages_in) == pytest.approx(85, abs=1)
    assert report.first_bot_audio_ms is not None and report.first_bot_audio_ms < 200
    assert report.late_frames == 0 and report.underrun_ms == 0
    assert report.duplex_fraction is not None and report.duplex_fraction >= 0.95
    assert report.caller_speech_ms == pytest.approx(1200, abs=40)
    written = json.loads((tmp_path / "report.json").read_text())
    assert written["call_id"] == "fake-call" and written["frames_out"] == 85
    bot, rate = sf.read(tmp_path / "bot.wav", dtype="int16")
    assert rate == 8000
    # The echoed tone sits on the timeline about jitter_ms + first arrival after start.
    onset = np.argmax(np.abs(bot) > 3000) / rate
    assert 0.3 + 0.08 <= onset <= 0.3 + 0.08 + 0.15


@pytest.mark.asyncio
async def test_bad_token_is_refused_and_busy_is_rejected(tmp_path: Path) -> None:
    fake = FakeGateway()
    audio = _speech_like(tmp_path / "caller.wav", seconds=0.2)
    async with serve(fake) as url:
        refused = await run_call(CallOptions(audio=audio, gateway_url=url, auth_token="wrong-token-123"))
        fake.busy = True
        busy = await run_call(CallOptions(audio=audio, gateway_url=url, auth_token=TOKEN))
    assert refused.status == "refused" and refused.http_status == 403 and refused.frames_out == 0
    assert busy.status == "rejected" and busy.twiml_verbs == ["Say", "Hangup"] and busy.call_id is None
    assert fake.received == []
