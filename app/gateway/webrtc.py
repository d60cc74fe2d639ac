"""The browser softphone: a page, the persona list and WebRTC offers (Pipecat's SmallWebRTC on aiortc).

GET  /                the softphone page (plain HTML/CSS/JS from app/gateway/static, no network needed)
GET  /api/personas    {"personas": [{"id", "name"}], "default": id, "ice_servers": [...]} for the page
POST /api/offer       {"sdp", "type": "offer", "persona"} -> {"sdp", "type": "answer", "pc_id", "call_id", ...}
                      400 {"error", "message"} for a bad request or SDP, 503 {"error": "busy", ...}
                      when no worker has a free slot (the record ends rejected, busy)

One offer is one call, run by the gateway's call lifecycle (app/gateway/session.py) with
`BrowserPeer` as its channel: the same record and states as a Twilio call (channel "webrtc"):

    ringing (offer accepted) -> connecting (slot reserved, pipeline starting) -> active (worker Ready)
      -> completed caller_hangup   the page's {"type": "hangup"} message, or the browser closed the
                                   peer connection after it had connected
      -> completed max_duration    the persona's max_call_seconds
      -> failed worker_lost/error/busy   the worker went away or refused; the browser connection
                                   failed or never came up

Audio runs at 24 kHz both ways (the model's rate): Opus in the browser <-> aiortc <-> PCM16 24 kHz
frames <-> PersonaPlexService, with no telephone-band resampling. No VAD, no interruptions.

Text to the page goes over the WebRTC data channel the page opens, as Pipecat app messages (JSON):
    {"type": "status", "status": "active"}      the persona is on the line
    {"type": "text", "text": " word"}            the model's text as it streams
    {"type": "ended", "reason": "worker_lost"}   the call ended on the server's side (any end reason)
The page sends {"type": "hangup"} before closing its peer connection.

ICE: no STUN/TURN servers are configured; the browser and the gateway must reach each other's host
candidates (same machine, LAN or VPN). The answer carries all of the gateway's candidates (the page
sends its offer after gathering, so no trickle endpoint is needed).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from aiortc.exceptions import InvalidStateError
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pipecat.pipeline.worker import PipelineWorker
from pipecat.transports.smallwebrtc.connection import IceServer, SmallWebRTCConnection
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis.exceptions import RedisError

from app import protocol
from app.callstate import CallStatus, CallStore, EndReason, Reservation
from app.config import GatewaySettings
from app.gateway.pipeline import WEBRTC_CHUNK_S, build_webrtc_pipeline
from app.gateway.session import CallSession, fail_call, open_call
from app.gateway.state import gateway_state
from app.personas import Persona
from app.pipecat.service import PersonaPlexService

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_SDP_CHARS = 64_000
BROWSER_CONNECT_TIMEOUT_S = 20  # offer answered -> the browser's peer connection is up
BUSY_MESSAGE = "All lines are busy right now. Please try again in a minute."
UNAVAILABLE_MESSAGE = "The call service is unavailable right now. Please try again later."
_CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "media-src 'self' blob: mediastream:; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
# The page's files, served from memory: name -> media type.
_ASSETS = {
    "softphone.html": "text/html; charset=utf-8",
    "softphone.css": "text/css; charset=utf-8",
    "softphone.js": "text/javascript; charset=utf-8",
}


class OfferRequest(BaseModel):
    """The page's offer: an SDP offer and the persona it wants to talk to (default if omitted)."""

    model_config = ConfigDict(extra="ignore")

    sdp: str = Field(min_length=1, max_length=MAX_SDP_CHARS)
    type: Literal["offer"]
    persona: str | None = Field(default=None, max_length=64)


def _error(status_code: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status_code)


def sdp_problem(sdp: str) -> str | None:
    """Why an SDP offer cannot be a softphone call (aiortc accepts some nonsense), or None."""
    lines = [line.strip() for line in sdp.splitlines()]
    if not lines or lines[0] != "v=0":
        return "not an SDP offer: it must start with 'v=0'"
    if not any(line.startswith("m=audio ") for line in lines):
        return "the offer has no audio (m=audio) section: the page must send the microphone"
    if not any(line.startswith("a=ice-ufrag:") for line in lines):
        return "the offer has no ICE credentials (a=ice-ufrag)"
    if not any(line.startswith("a=fingerprint:") for line in lines):
        return "the offer has no DTLS fingerprint (a=fingerprint)"
    return None


class PageChannel:
    """JSON messages to the page over the WebRTC data channel (queued until the channel opens)."""

    def __init__(self, connection: SmallWebRTCConnection, call_id: str) -> None:
        self._connection = connection
        self._call_id = call_id

    def send(self, kind: str, **data: Any) -> None:
        try:
            self._connection.send_app_message({"type": kind, **data})
        except InvalidStateError as exc:  # the channel is closing: the call is ending anyway
            logger.info("call %s: could not send %r to the page: %r", self._call_id, kind, exc)


class BrowserPeer:
    """A browser's WebRTC peer connection as a call's `Channel` (app/gateway/session.py).

    The caller hangs up with the page's {"type": "hangup"}, or by closing the peer connection once
    it is up; a connection that fails (ICE/DTLS), closes before it is up, or is not up within
    BROWSER_CONNECT_TIMEOUT_S fails the call (error). The page hears {"type": "status", "status":
    "active"} on the worker's Ready, the model's text, and why the call ended: {"type": "ended",
    "reason": ...} once, never the detail (it names workers and URLs).
    """

    name = "webrtc"
    output_chunk_s = WEBRTC_CHUNK_S

    def __init__(self, connection: SmallWebRTCConnection, call_id: str) -> None:
        self.connection = connection
        self.page = PageChannel(connection, call_id)
        self.connected = False  # the browser's peer connection came up
        self._watchdog: asyncio.TimerHandle | None = None

    def build(self, call: CallSession, service: PersonaPlexService) -> PipelineWorker:
        page = self.page

        @service.event_handler("on_ready")
        async def _on_ready(_service: PersonaPlexService, _ready: protocol.Ready) -> None:
            page.send("status", status="active")

        def on_text(text: str) -> None:
            call.note_text(text)
            page.send("text", text=text)

        worker, transport = build_webrtc_pipeline(
            self.connection, call_id=call.call_id, service=service, on_text=on_text
        )

        @transport.event_handler("on_client_connected")
        async def _on_connected(_transport: Any, _connection: SmallWebRTCConnection) -> None:
            logger.info("call %s: browser connected", call.call_id)
            self.connected = True

        @transport.event_handler("on_client_disconnected")
        async def _on_disconnected(_transport: Any, _connection: SmallWebRTCConnection) -> None:
            if self.connected:
                call.request_end(EndReason.CALLER_HANGUP)
            else:
                call.request_end(EndReason.ERROR, "the browser closed the connection before it was established")

        @transport.event_handler("on_app_message")
        async def _on_message(_transport: Any, message: Any, _sender: str) -> None:
            if isinstance(message, dict) and message.get("type") == "hangup":
                call.request_end(EndReason.CALLER_HANGUP)

        @self.connection.event_handler("failed")
        async def _on_failed(_connection: SmallWebRTCConnection) -> None:
            call.request_end(EndReason.ERROR, "the browser connection failed (ICE/DTLS)")

        def _connect_deadline() -> None:
            if not self.connected:
                call.request_end(
                    EndReason.ERROR, f"the browser did not connect within {BROWSER_CONNECT_TIMEOUT_S} s (ICE/DTLS)"
                )

        self._watchdog = asyncio.get_running_loop().call_later(BROWSER_CONNECT_TIMEOUT_S, _connect_deadline)
        return worker

    def ended(self, reason: EndReason) -> None:
        self.page.send("ended", reason=reason.value)  # never the detail: it names workers and URLs

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        await _close_quietly(self.connection)


@dataclass
class Softphone:
    """The softphone's routes and the calls it started (their tasks are held here until they end)."""

    assets: dict[str, bytes]
    tasks: set[asyncio.Task] = field(default_factory=set)

    # ------------------------------------------------------------------ page and personas
    def _asset(self, name: str) -> Response:
        return Response(
            content=self.assets[name],
            media_type=_ASSETS[name],
            headers={
                "Cache-Control": "no-cache",
                "Content-Security-Policy": _CONTENT_SECURITY_POLICY,
                "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer",
            },
        )

    async def page(self) -> Response:
        """The softphone page."""
        return self._asset("softphone.html")

    async def script(self) -> Response:
        return self._asset("softphone.js")

    async def stylesheet(self) -> Response:
        return self._asset("softphone.css")

    async def personas(self, request: Request) -> dict[str, Any]:
        """The personas a caller can pick: id and display name only."""
        state = gateway_state(request)
        book = state.personas
        return {
            "personas": [{"id": p.id, "name": p.name} for p in book.personas.values()],
            "default": book.default_id,
            "ice_servers": [_ice_server_json(server) for server in ice_servers(state.settings)],
        }

    # ------------------------------------------------------------------ offers
    async def offer(self, request: Request) -> JSONResponse:
        """Answer the page's WebRTC offer and start the call (see the module docstring)."""
        state = gateway_state(request)
        offered_at = time.monotonic()
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "bad_request", 'the body must be JSON: {"sdp": ..., "type": "offer", "persona": ...}')
        try:
            offer = OfferRequest.model_validate(body)
        except ValidationError as exc:
            return _error(400, "bad_request", _describe(exc))
        persona = state.personas.get(offer.persona) if offer.persona else state.personas.for_number(None)
        if persona is None:
            return _error(400, "unknown_persona", f"there is no persona {offer.persona!r}")
        refusal = state.admission.refusal()
        if refusal is not None:
            state.metrics.refused.labels("webrtc").inc()
            logger.warning("webrtc offer (%s) refused: %s", persona.id, refusal)
            return _error(503, "busy", BUSY_MESSAGE)
        problem = sdp_problem(offer.sdp)
        if problem is not None:
            logger.warning("webrtc offer refused: %s", problem)
            return _error(400, "bad_sdp", problem)
        connection = SmallWebRTCConnection(
            ice_servers=ice_servers(state.settings) or None, connection_timeout_secs=BROWSER_CONNECT_TIMEOUT_S
        )
        try:
            await connection.initialize(sdp=offer.sdp, type=offer.type)
        except Exception as exc:  # aiortc reports malformed SDP as ValueError, AttributeError, AssertionError...
            logger.warning("webrtc offer refused: the SDP cannot be used: %r", exc)
            await _close_quietly(connection)
            return _error(400, "bad_sdp", f"the SDP offer cannot be used: {exc!r}")
        answer = connection.get_answer()
        if answer is None:
            await _close_quietly(connection)
            raise RuntimeError("aiortc produced no SDP answer")

        call_id = f"web-{uuid.uuid4().hex}"
        peer = BrowserPeer(connection, call_id)
        try:
            reservation = await _ring_and_reserve(state.store, call_id, persona)
            call = None
            if reservation is not None:
                call = await open_call(
                    state, peer, call_id=call_id, persona=persona, started_at=offered_at, reservation=reservation
                )
        except (RedisError, OSError) as exc:
            logger.warning("call %s: call state unavailable (%r): offer refused", call_id, exc)
            await peer.close()
            await fail_call(state.store, call_id, EndReason.ERROR, "call state unavailable")
            return _error(503, "unavailable", UNAVAILABLE_MESSAGE)
        if reservation is None:
            state.metrics.calls.labels(CallStatus.REJECTED.value, EndReason.BUSY.value).inc()
            logger.warning("call %s (webrtc, %s): no free slot, rejected", call_id, persona.id)
            await peer.close()
            return _error(503, "busy", BUSY_MESSAGE)
        if call is None:  # open_call ended the record and released the slot
            await peer.close()
            return _error(500, "error", "The call could not be started.")
        task = asyncio.create_task(call.run(), name=f"call-{call_id}-webrtc")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        logger.info("call %s (webrtc): persona %s, answering the offer", call_id, persona.id)
        return JSONResponse({**answer, "call_id": call_id, "persona": {"id": persona.id, "name": persona.name}})


async def _ring_and_reserve(store: CallStore, call_id: str, persona: Persona) -> Reservation | None:
    """Create the record (ringing) and reserve a slot; no slot: the record ends rejected, busy (None)."""
    await store.create_call(call_id, channel="webrtc", persona=persona.id)
    reservation = await store.reserve_slot(call_id)
    if reservation is None:
        await store.end_call(call_id, CallStatus.REJECTED, EndReason.BUSY, error="no worker has a free slot")
        return None
    return reservation


def ice_servers(settings: GatewaySettings) -> list[IceServer]:
    """WEBRTC_ICE_SERVERS as ICE servers; turn: URLs carry the configured TURN credentials."""
    servers = []
    for url in settings.webrtc_ice_servers:
        if url.startswith(("turn:", "turns:")):
            servers.append(
                IceServer(
                    urls=url,
                    username=settings.webrtc_turn_username or None,
                    credential=settings.webrtc_turn_credential or None,
                )
            )
        else:
            servers.append(IceServer(urls=url))
    return servers


def _ice_server_json(server: IceServer) -> dict[str, str]:
    """An RTCIceServer dictionary for the page's RTCPeerConnection."""
    out = {"urls": server.urls}
    if server.username is not None:
        out["username"] = server.username
    if server.credential is not None:
        out["credential"] = server.credential
    return out


async def _close_quietly(connection: SmallWebRTCConnection) -> None:
    """Close a peer connection; aiortc can fail closing one whose offer it could not apply (logged)."""
    try:
        await connection.disconnect()
    except Exception as exc:  # closing is best effort: the connection is dropped either way
        logger.info("closing the peer connection %s: %r", connection.pc_id, exc)


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors()[:3]:
        where = ".".join(str(p) for p in error["loc"]) or "body"
        problems.append(f"{where}: {error['msg']}")
    return 'bad offer ({"sdp": ..., "type": "offer", "persona": ...}): ' + "; ".join(problems)


def load_assets(directory: Path = STATIC_DIR) -> dict[str, bytes]:
    """The page's files, read once (at app creation, not per request)."""
    return {name: (directory / name).read_bytes() for name in _ASSETS}


def build_router() -> APIRouter:
    """GET /, the page's script and stylesheet, GET /api/personas, POST /api/offer."""
    softphone = Softphone(assets=load_assets())
    router = APIRouter(tags=["softphone"])
    router.add_api_route("/", softphone.page, methods=["GET"], include_in_schema=False)
    router.add_api_route("/softphone.js", softphone.script, methods=["GET"], include_in_schema=False)
    router.add_api_route("/softphone.css", softphone.stylesheet, methods=["GET"], include_in_schema=False)
    router.add_api_route("/api/personas", softphone.personas, methods=["GET"])
    router.add_api_route("/api/offer", softphone.offer, methods=["POST"])
    return router

