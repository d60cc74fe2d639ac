"""The browser softphone: a page, the persona list and WebRTC offers (Pipecat's SmallWebRTC on aiortc).

GET  /                the softphone page (plain HTML/CSS/JS from app/gateway/static, no network needed)
GET  /api/personas    {"personas": [{"id", "name"}], "default": id, "ice_servers": [...]} for the page
POST /api/offer       {"sdp", "type": "offer", "persona"} -> {"sdp", "type": "answer", "pc_id", "call_id", ...}
                      400 {"error", "message"} for a bad request or SDP, 503 {"error": "busy", ...}
                      when no worker has a free slot (the record ends rejected, busy)

One offer is one call, with the same record and lifecycle as a Twilio call (channel "webrtc"):

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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from aiortc.exceptions import InvalidStateError
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pipecat.pipeline.worker import PipelineWorker
from pipecat.transports.base_transport import TransportParams
from pipecat.transports.smallwebrtc.connection import IceServer, SmallWebRTCConnection
from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis.exceptions import RedisError

from app import protocol
from app.callstate import CallStatus, CallStore, EndReason, Reservation
from app.config import GatewaySettings
from app.gateway.pipeline import call_worker
from app.gateway.session import CallSession, fail_call
from app.gateway.state import GatewayState, gateway_state
from app.personas import Persona
from app.pipecat.service import PersonaPlexService

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
SAMPLE_RATE = protocol.SAMPLE_RATE  # 24 kHz both ways: the model's own rate
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


class WebRTCCallSession(CallSession):
    """A CallSession that also tells the page why the call ended (the first reason, as it is given)."""

    def __init__(self, *, page: PageChannel, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.page = page
        self.browser_connected = asyncio.Event()

    def request_end(self, reason: EndReason | None, error: str | None = None) -> None:
        first = reason is not None and self.end_reason is None
        super().request_end(reason, error)
        if first and reason is not None:
            self.page.send("ended", reason=reason.value)  # never the detail: it names workers and URLs

    def on_browser_closed(self) -> None:
        """The browser closed its peer connection: a hang-up once connected, else a failed start."""
        if self.browser_connected.is_set():
            self.request_end(EndReason.CALLER_HANGUP)
        else:
            self.request_end(EndReason.ERROR, "the browser closed the connection before it was established")


def build_webrtc_pipeline(
    connection: SmallWebRTCConnection,
    *,
    call_id: str,
    service: PersonaPlexService,
    on_text: Callable[[str], None],
) -> tuple[PipelineWorker, SmallWebRTCTransport]:
    """The transport and the pipeline worker for one browser call, 24 kHz both ways.

        SmallWebRTCTransport.input()   Opus -> PCM16 mono 24 kHz frames
          -> PersonaPlexService        80 ms frames to and from the worker (no resampling at 24 kHz)
          -> TranscriptRecorder        the bot's text -> call events and the page
          -> transport.output()        PCM16 24 kHz -> Opus, in 20 ms writes
    """
    transport = SmallWebRTCTransport(
        connection,
        TransportParams(
            audio_in_enabled=True,
            audio_out_enabled=True,
            audio_in_sample_rate=SAMPLE_RATE,
            audio_out_sample_rate=SAMPLE_RATE,
            audio_in_channels=1,
            audio_out_channels=1,
            audio_out_10ms_chunks=2,
            audio_out_end_silence_secs=0,
        ),
        input_name=f"webrtc-in-{call_id}",
        output_name=f"webrtc-out-{call_id}",
    )
    return call_worker(transport, service, on_text, call_id=call_id, sample_rate=SAMPLE_RATE), transport


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
        try:
            reservation = await _ring_and_reserve(state.store, call_id, persona)
        except (RedisError, OSError):
            logger.exception("call %s: call state unavailable", call_id)
            await _close_quietly(connection)
            await fail_call(state.store, call_id, EndReason.ERROR, "call state unavailable")
            return _error(503, "unavailable", UNAVAILABLE_MESSAGE)
        if reservation is None:
            state.metrics.calls.labels(CallStatus.REJECTED.value, EndReason.BUSY.value).inc()
            logger.warning("call %s (webrtc, %s): no free slot, rejected", call_id, persona.id)
            await _close_quietly(connection)
            return _error(503, "busy", BUSY_MESSAGE)

        try:
            session, worker = _build_call(state, connection, call_id, persona, reservation, offered_at)
        except Exception as exc:  # the call cannot start: its record must still end and the slot come back
            logger.exception("call %s: could not build the pipeline", call_id)
            await fail_call(state.store, call_id, EndReason.ERROR, f"could not build the pipeline: {exc!r}")
            await state.store.release_slot(call_id)
            await _close_quietly(connection)
            return _error(500, "error", "The call could not be started.")
        state.sessions[call_id] = session
        task = asyncio.create_task(
            _run_call(state, session, worker, connection), name=f"call-{call_id}-webrtc"
        )
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        logger.info("call %s (webrtc): persona %s, answering the offer", call_id, persona.id)
        return JSONResponse({**answer, "call_id": call_id, "persona": {"id": persona.id, "name": persona.name}})


async def _ring_and_reserve(store: CallStore, call_id: str, persona: Persona) -> Reservation | None:
    """Create the record (ringing) and reserve a slot: connecting, or rejected busy (returns None)."""
    await store.create_call(call_id, channel="webrtc", persona=persona.id)
    reservation = await store.reserve_slot(call_id)
    if reservation is None:
        await store.end_call(call_id, CallStatus.REJECTED, EndReason.BUSY, error="no worker has a free slot")
        return None
    await store.transition(call_id, CallStatus.CONNECTING)
    return reservation


def _build_call(
    state: GatewayState,
    connection: SmallWebRTCConnection,
    call_id: str,
    persona: Persona,
    reservation: Reservation,
    offered_at: float,
) -> tuple[WebRTCCallSession, PipelineWorker]:
    page = PageChannel(connection, call_id)
    session = WebRTCCallSession(
        page=page,
        call_id=call_id,
        store=state.store,
        metrics=state.metrics,
        max_seconds=persona.max_call_seconds,
        started_at=offered_at,
    )
    service = state.new_service(call_id, persona, reservation)
    session.attach(service)

    @service.event_handler("on_ready")
    async def _on_ready(_service: PersonaPlexService, _ready: protocol.Ready) -> None:
        page.send("status", status="active")

    def on_text(text: str) -> None:
        session.note_text(text)
        page.send("text", text=text)

    worker, transport = build_webrtc_pipeline(connection, call_id=call_id, service=service, on_text=on_text)

    @transport.event_handler("on_client_connected")
    async def _on_connected(_transport: Any, _connection: SmallWebRTCConnection) -> None:
        logger.info("call %s: browser connected", call_id)
        session.browser_connected.set()

    @transport.event_handler("on_client_disconnected")
    async def _on_disconnected(_transport: Any, _connection: SmallWebRTCConnection) -> None:
        session.on_browser_closed()

    @transport.event_handler("on_app_message")
    async def _on_message(_transport: Any, message: Any, _sender: str) -> None:
        if isinstance(message, dict) and message.get("type") == "hangup":
            session.request_end(EndReason.CALLER_HANGUP)

    @connection.event_handler("failed")
    async def _on_failed(_connection: SmallWebRTCConnection) -> None:
        session.request_end(EndReason.ERROR, "the browser connection failed (ICE/DTLS)")

    return session, worker


async def _run_call(
    state: GatewayState,
    session: WebRTCCallSession,
    worker: PipelineWorker,
    connection: SmallWebRTCConnection,
) -> None:
    """Run the call to its end; a browser that never connects ends it (failed, error)."""
    watchdog = asyncio.create_task(_connect_watchdog(session), name=f"call-{session.call_id}-connect")
    try:
        await session.run(worker)
    except asyncio.CancelledError:
        logger.warning("call %s: cancelled", session.call_id)
        raise
    finally:
        watchdog.cancel()
        state.sessions.pop(session.call_id, None)
        state.metrics.frames_dropped_finished += session.frames_dropped
        await _close_quietly(connection)


async def _connect_watchdog(session: WebRTCCallSession) -> None:
    try:
        await asyncio.wait_for(session.browser_connected.wait(), timeout=BROWSER_CONNECT_TIMEOUT_S)
    except TimeoutError:
        session.request_end(
            EndReason.ERROR, f"the browser did not connect within {BROWSER_CONNECT_TIMEOUT_S} s (ICE/DTLS)"
        )


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

