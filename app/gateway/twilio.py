"""Twilio endpoints: the voice webhook, the media stream and status callbacks.

POST /twilio/voice   admission: the call's record (ringing) and a worker slot reserved for it at
                     once (atomically in Redis), then TwiML `<Connect><Stream url=wss://.../twilio/
                     stream>` with the call id, persona and the call's stream token as
                     `<Parameter>`s; when no worker has a free slot, a polite busy message then
                     `<Dial>` the overflow number or `<Hangup/>` (the record ends rejected, busy). A
                     reservation whose stream never comes is released by the reaper
                     (STREAM_TIMEOUT_S, app/gateway/upkeep.py).
WS   /twilio/stream  Twilio Media Streams (connected, start, media, dtmf, mark, stop): one call, run
                     by the gateway's call lifecycle (app/gateway/session.py) with `TwilioStream`
                     as its channel; its persona is the one the webhook recorded. Accepted only for
                     a call the webhook created, still ringing, with that call's token (once: a
                     replayed upgrade finds the record no longer ringing).
POST /twilio/status  call status callbacks, recorded as events; a final status ends an open call
                     that nobody else will end truthfully (see `status_callback`).
POST /twilio/after-stream  the `<Connect action>`: once the stream ends, `<Dial>` the persona's
                     transfer number for a call the caller asked to transfer (DTMF 0); a call that
                     lost its worker (none could take it over) hears an apology; then hang up.

With TWILIO_AUTH_TOKEN set, all of them require a valid X-Twilio-Signature (the stream on its upgrade
request): otherwise 403 and nothing else happens.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request, Response, WebSocket
from fastapi.responses import PlainTextResponse
from pipecat.pipeline.worker import PipelineWorker
from redis.exceptions import RedisError
from starlette.websockets import WebSocketDisconnect, WebSocketState
from twilio.twiml.voice_response import Connect, VoiceResponse

from app.callstate import TERMINAL, CallRecord, CallStatus, EndReason, InvalidTransition
from app.gateway.pipeline import build_twilio_pipeline
from app.gateway.security import websocket_url
from app.gateway.serializer import GuardedTwilioSerializer, parse_message
from app.gateway.session import CallSession, open_call
from app.gateway.state import GatewayState, gateway_state
from app.pipecat.service import PersonaPlexService

logger = logging.getLogger(__name__)

STREAM_PATH = "/twilio/stream"
AFTER_STREAM_PATH = "/twilio/after-stream"
TRANSFER_DIGIT = "0"  # the caller presses 0 to be put through to the persona's transfer number
START_TIMEOUT_S = 10.0
_CALL_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_FINAL_STATUSES = frozenset({"completed", "busy", "failed", "no-answer", "canceled"})
_LOST = frozenset({EndReason.WORKER_LOST, EndReason.GATEWAY_LOST})  # the caller hears an apology
BUSY_MESSAGE = "Thank you for calling {name}. All of our lines are busy right now. Please call again later."
TROUBLE_MESSAGE = "Sorry, we are having technical difficulties. Please call again later."
LOST_MESSAGE = "We are sorry, the line to our assistant was lost. Please call again in a moment."


def _twiml(response: VoiceResponse) -> Response:
    return Response(content=str(response), media_type="application/xml")


def _forbidden(state: GatewayState, endpoint: str) -> Response:
    state.metrics.webhooks.labels(endpoint, "forbidden").inc()
    return PlainTextResponse("forbidden: bad or missing X-Twilio-Signature\n", status_code=403)


def _http_url(state: GatewayState, request: Request, path: str) -> str:
    base = state.settings.public_url or str(request.base_url)
    return base.rstrip("/") + path


def _stream_url(state: GatewayState, request: Request) -> str:
    if state.settings.public_url:
        return websocket_url(state.settings.public_url.rstrip("/") + STREAM_PATH)
    return websocket_url(str(request.base_url).rstrip("/") + STREAM_PATH)


async def voice(request: Request) -> Response:
    """Answer a call: connect it to a persona's media stream, or say busy."""
    state = gateway_state(request)
    form = await request.form()
    if not state.signatures.check_webhook(request, form):
        return _forbidden(state, "voice")
    params = {k: v for k, v in form.items() if isinstance(v, str)}
    to_number, from_number, call_sid = params.get("To"), params.get("From"), params.get("CallSid")
    persona = state.personas.for_number(to_number)
    call_id = call_sid if call_sid and _CALL_ID.match(call_sid) else f"call-{uuid.uuid4().hex}"
    try:
        ringing = await _ringing_record(state, call_id, persona.id, from_number, to_number, call_sid)
        if not ringing:
            state.metrics.webhooks.labels("voice", "duplicate").inc()
            response = VoiceResponse()
            response.hangup()
            return _twiml(response)
        refusal = state.admission.refusal(call_id)
        if refusal is not None:
            state.metrics.refused.labels("twilio").inc()
            return await _busy(state, call_id, persona.name, error=refusal, outcome="full")
        if await state.store.reserve_slot(call_id) is None:  # atomic: two callers never get one slot
            return await _busy(state, call_id, persona.name)
    except (RedisError, OSError) as exc:
        logger.warning("voice webhook for %s: call state unavailable (%r): the caller hears the trouble message",
                       call_id, exc)
        state.metrics.webhooks.labels("voice", "error").inc()
        response = VoiceResponse()
        response.say(TROUBLE_MESSAGE)
        response.hangup()
        return _twiml(response)
    response = VoiceResponse()
    connect = Connect(action=_http_url(state, request, AFTER_STREAM_PATH))
    stream = connect.stream(url=_stream_url(state, request))
    stream.parameter(name="call_id", value=call_id)
    stream.parameter(name="persona", value=persona.id)
    stream.parameter(name="token", value=state.stream_tokens.issue(call_id))
    response.append(connect)
    state.admission.admitted(call_id)
    state.metrics.webhooks.labels("voice", "connect").inc()
    logger.info("call %s from %s to %s: persona %s, connecting the stream", call_id, from_number, to_number, persona.id)
    return _twiml(response)


async def _ringing_record(
    state: GatewayState,
    call_id: str,
    persona: str,
    from_number: str | None,
    to_number: str | None,
    call_sid: str | None,
) -> bool:
    """Create the call's record (ringing); a retried webhook for a still-ringing call reuses it."""
    try:
        await state.store.create_call(
            call_id,
            channel="twilio",
            persona=persona,
            from_number=from_number,
            to_number=to_number,
            twilio_call_sid=call_sid,
        )
        return True
    except InvalidTransition:
        existing = await state.store.get_call(call_id)
        if existing is not None and existing.status == CallStatus.RINGING:
            logger.info("call %s: webhook repeated while ringing", call_id)
            return True
        logger.warning(
            "call %s: webhook for a call already %s, hanging up", call_id, existing.status if existing else "?"
        )
        return False


async def _busy(
    state: GatewayState,
    call_id: str,
    persona_name: str,
    *,
    error: str = "no worker has a free slot",
    outcome: str = "busy",
) -> Response:
    response = VoiceResponse()
    response.say(BUSY_MESSAGE.format(name=persona_name))
    overflow = state.settings.overflow_number
    if overflow:
        response.dial(overflow)
    else:
        response.hangup()
    await state.store.end_call(call_id, CallStatus.REJECTED, EndReason.BUSY, error=error)
    state.metrics.calls.labels(CallStatus.REJECTED.value, EndReason.BUSY.value).inc()
    state.metrics.webhooks.labels("voice", outcome).inc()
    logger.warning("call %s: %s, %s", call_id, error, f"dialling {overflow}" if overflow else "hanging up")
    return _twiml(response)


async def status_callback(request: Request) -> Response:
    """Record a call status callback; a final status ends a call that is still open."""
    state = gateway_state(request)
    form = await request.form()
    if not state.signatures.check_webhook(request, form):
        return _forbidden(state, "status")
    call_sid, call_status = form.get("CallSid"), form.get("CallStatus")
    if not isinstance(call_sid, str) or not isinstance(call_status, str):
        return PlainTextResponse("CallSid and CallStatus are required\n", status_code=400)
    state.metrics.webhooks.labels("status", call_status).inc()
    record = await state.store.get_call(call_sid) if _CALL_ID.match(call_sid) else None
    if record is None:
        logger.info("status %s for unknown call %s: ignored", call_status, call_sid)
        return Response(status_code=204)
    duration = form.get("CallDuration")
    await state.store.add_event(
        record.call_id, "twilio_status", status=call_status, duration=duration if isinstance(duration, str) else None
    )
    if call_status in _FINAL_STATUSES:
        state.admission.started(record.call_id)  # over before its stream started: no longer counted
        if record.status not in TERMINAL:
            await _end_by_status(state, record, call_status)
    return Response(status_code=204)


async def _end_by_status(state: GatewayState, record: CallRecord, call_status: str) -> None:
    """Twilio says the call is over. Who ends the record, and why, so that the reason stays true:
    - its media session runs here: the session ends (and writes its own final record);
    - ringing (the stream never started): ended here, the caller hung up (or the status's error);
    - transferring (the after-stream dial never came): failed, the transfer was not made;
    - another gateway's call: left to it while it lives (its stream's stop ends it), else
      failed/gateway_lost (the status must not pass for a clean hang-up)."""
    completed = call_status == "completed"
    detail = None if completed else f"twilio status {call_status}"
    session = state.sessions.get(record.call_id)
    if session is not None:
        session.request_end(EndReason.CALLER_HANGUP if completed else EndReason.ERROR, detail)
        return
    if record.status == CallStatus.RINGING:
        status = CallStatus.COMPLETED if completed else CallStatus.FAILED
        reason, error = (EndReason.CALLER_HANGUP, None) if completed else (EndReason.ERROR, detail)
    elif record.status == CallStatus.TRANSFERRING:
        status, reason, error = CallStatus.FAILED, EndReason.ERROR, f"the call ended ({call_status}) before the transfer"
    elif record.gateway_id in await state.store.live_gateways() and record.gateway_id != state.store.gateway_id:
        logger.info("call %s: twilio status %s; its gateway %s ends it", record.call_id, call_status, record.gateway_id)
        return
    else:
        status, reason = CallStatus.FAILED, EndReason.GATEWAY_LOST
        error = f"twilio status {call_status} while gateway {record.gateway_id} running the call was gone"
    if await state.store.end_call(record.call_id, status, reason, error=error) is not None:
        state.metrics.calls.labels(status.value, reason.value).inc()
    await state.store.release_slot(record.call_id)
    logger.info("call %s: ended by twilio status %s: %s (%s)", record.call_id, call_status, status.value, reason.value)


@dataclass(frozen=True)
class StreamStart:
    stream_sid: str
    call_sid: str | None
    call_id: str | None
    persona: str | None
    token: str | None = None  # the call's stream token (the webhook's <Parameter>)


async def media_stream(websocket: WebSocket) -> None:
    """One call's Twilio media stream, from the signed upgrade to the end of the call."""
    state = gateway_state(websocket)
    if not state.signatures.check_stream(websocket):
        state.metrics.webhooks.labels("stream", "forbidden").inc()
        await websocket.send_denial_response(
            PlainTextResponse("forbidden: bad or missing X-Twilio-Signature\n", status_code=403)
        )
        return
    await websocket.accept()
    start = await _read_start(websocket, state)
    if start is None:
        await _close(websocket, 1008)
        return
    stream_started = time.monotonic()
    try:
        call = await _open_call(state, websocket, start, stream_started)
    except (RedisError, OSError) as exc:
        logger.warning("stream %s: call state unavailable (%r): stream refused", start.stream_sid, exc)
        call = None
    finally:
        if start.call_id is not None:
            state.admission.started(start.call_id)  # a live call now (counted as one), or none at all
    if call is None:
        state.metrics.webhooks.labels("stream", "rejected").inc()
        await _close(websocket, 1008)
        return
    state.metrics.webhooks.labels("stream", "started").inc()
    await call.run()


async def _read_start(websocket: WebSocket, state: GatewayState) -> StreamStart | None:
    """Read up to Twilio's `start` message (after `connected`); None if the stream never starts."""
    try:
        async with asyncio.timeout(START_TIMEOUT_S):
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    logger.info("twilio stream closed before its start message")
                    return None
                data = message.get("text") or message.get("bytes") or b""
                parsed, why = parse_message(data)
                if parsed is None:
                    state.metrics.bad_messages.inc()
                    logger.warning("twilio stream: ignoring a message before start (%s)", why)
                    continue
                event = parsed["event"]
                if event == "connected":
                    continue
                if event == "start":
                    start = _parse_start(parsed)
                    if start is not None:
                        return start
                    state.metrics.bad_messages.inc()
                    logger.warning("twilio stream: start message without a streamSid: %.200s", data)
                    continue
                if event == "stop":
                    return None
                state.metrics.bad_messages.inc()
                logger.warning("twilio stream: ignoring %r before start", event)
    except TimeoutError:
        logger.warning("twilio stream: no start message within %.0f s", START_TIMEOUT_S)
    except WebSocketDisconnect:
        logger.info("twilio stream closed before its start message")
    return None


def _parse_start(message: dict[str, Any]) -> StreamStart | None:
    start = message.get("start")
    if not isinstance(start, dict):
        return None
    stream_sid = start.get("streamSid") or message.get("streamSid")
    if not isinstance(stream_sid, str) or not stream_sid:
        return None
    custom = start.get("customParameters")
    custom = custom if isinstance(custom, dict) else {}
    media_format = start.get("mediaFormat")
    if isinstance(media_format, dict) and (
        media_format.get("encoding") not in (None, "audio/x-mulaw")
        or media_format.get("sampleRate") not in (None, 8000)
    ):
        logger.warning("twilio stream %s: unexpected media format %s (expecting μ-law 8 kHz)", stream_sid, media_format)
    call_sid = start.get("callSid")

    def text(value: Any) -> str | None:
        return value if isinstance(value, str) and value else None

    return StreamStart(
        stream_sid=stream_sid,
        call_sid=text(call_sid),
        call_id=text(custom.get("call_id")),
        persona=text(custom.get("persona")),
        token=text(custom.get("token")),
    )


async def _open_call(
    state: GatewayState, websocket: WebSocket, start: StreamStart, stream_started: float
) -> CallSession | None:
    """Admit the stream as its call's media session (connecting), or None when it must not go on:
    only for a call the signed webhook created (its token), still ringing (once).

    The persona is resolved here, once: the one the webhook recorded (else the default).
    """
    call_id = start.call_id
    if call_id is None or not _CALL_ID.match(call_id):
        logger.warning("stream %s: no valid call id in its parameters: rejected", start.stream_sid)
        return None
    if not state.stream_tokens.check(call_id, start.token):
        state.metrics.webhooks.labels("stream", "bad_token").inc()
        logger.warning("stream %s for call %s without that call's token: rejected", start.stream_sid, call_id)
        return None
    if call_id in state.sessions:
        logger.warning("call %s: a media stream is already running, rejecting a second one", call_id)
        return None
    record = await state.store.get_call(call_id)
    if record is None:
        logger.warning("stream %s for call %s, which no webhook created: rejected", start.stream_sid, call_id)
        return None
    if record.status != CallStatus.RINGING:
        logger.warning("call %s: stream for a call already %s, rejecting it", call_id, record.status.value)
        return None
    persona = state.personas.get(record.persona) or state.personas.for_number(None)
    if persona.id != record.persona:
        logger.warning("call %s: unknown persona %r, using %s", call_id, record.persona, persona.id)
    if start.persona and start.persona != persona.id:
        logger.warning("call %s: the stream asks for persona %r, the call has %s", call_id, start.persona, persona.id)
    return await open_call(
        state,
        TwilioStream(websocket, state, start),
        call_id=call_id,
        persona=persona,
        started_at=stream_started,
        stream_sid=start.stream_sid,
        twilio_call_sid=start.call_sid,
    )


class TwilioStream:
    """A Twilio media stream as a call's `Channel` (app/gateway/session.py).

    Its pipeline reads Twilio's messages through GuardedTwilioSerializer: `stop` is the caller's
    hang-up, DTMF `0` a transfer to the call persona's transfer number (when it has one), DTMF and
    marks are recorded as events. A stream that closes without `stop` vanished. Twilio learns why
    the call ended from the `<Connect action>` (after_stream), so `ended` tells it nothing.
    """

    name = "twilio"

    def __init__(self, websocket: WebSocket, state: GatewayState, start: StreamStart) -> None:
        self.websocket = websocket
        self._state = state
        self._start = start
        self.output_chunk_s = state.settings.twilio_media_chunk_ms / 1000

    def build(self, call: CallSession, service: PersonaPlexService) -> PipelineWorker:
        transfer_number = call.persona.transfer_number

        def on_event(event: str, message: dict[str, Any]) -> None:
            if event == "stop":
                call.request_end(EndReason.CALLER_HANGUP)
            elif event == "dtmf":
                digit = message.get("dtmf", {}).get("digit")
                call.note_event("dtmf", digit=str(digit)[:8] if digit is not None else None)
                if digit == TRANSFER_DIGIT and transfer_number:
                    call.note_event("transfer_requested", to=transfer_number)
                    call.request_end(EndReason.TRANSFER)
            elif event == "mark":
                mark = message.get("mark")
                call.note_event("mark", name=str(mark.get("name"))[:100] if isinstance(mark, dict) else None)

        serializer = GuardedTwilioSerializer(
            self._start.stream_sid,
            call_sid=self._start.call_sid,
            on_event=on_event,
            on_bad_message=lambda _why: self._state.metrics.bad_messages.inc(),
        )
        worker, transport = build_twilio_pipeline(
            self.websocket,
            call_id=call.call_id,
            serializer=serializer,
            service=service,
            on_text=call.note_text,
            chunk_s=self.output_chunk_s,
        )

        @transport.event_handler("on_client_disconnected")
        async def _on_disconnected(_transport: Any, _websocket: WebSocket) -> None:
            call.request_end(None)

        return worker

    def ended(self, reason: EndReason) -> None:
        """Nothing to send: the stream closing and the after-stream TwiML tell Twilio the rest."""

    async def close(self) -> None:
        await _close(self.websocket, 1000)


async def _close(websocket: WebSocket, code: int) -> None:
    if (
        websocket.client_state == WebSocketState.DISCONNECTED
        or websocket.application_state == WebSocketState.DISCONNECTED
    ):
        return
    try:
        await websocket.close(code=code)
    except (RuntimeError, OSError) as exc:
        logger.debug("closing the twilio stream: %r", exc)


async def after_stream(request: Request) -> Response:
    """`<Connect action>`: Twilio asks what to do once the media stream has ended.

    A call whose caller asked for a person (DTMF 0 on a persona with a transfer number) is in
    `transferring`: dial that number and complete the record with end_reason transfer.
    A call that ended failed/worker_lost hears an apology first. Anything else hangs up (its
    record was already ended by the media stream).
    """
    state = gateway_state(request)
    form = await request.form()
    if not state.signatures.check_webhook(request, form):
        return _forbidden(state, "after_stream")
    call_sid = form.get("CallSid")
    record = (
        await state.store.get_call(call_sid) if isinstance(call_sid, str) and _CALL_ID.match(call_sid) else None
    )
    response = VoiceResponse()
    persona = state.personas.get(record.persona) if record is not None else None
    if record is not None and record.status == CallStatus.TRANSFERRING and persona and persona.transfer_number:
        response.dial(persona.transfer_number)
        if await state.store.end_call(record.call_id, CallStatus.COMPLETED, EndReason.TRANSFER) is not None:
            state.metrics.calls.labels(CallStatus.COMPLETED.value, EndReason.TRANSFER.value).inc()
        state.metrics.webhooks.labels("after_stream", "transfer").inc()
        logger.info("call %s: transferring to %s", record.call_id, persona.transfer_number)
    elif record is not None and record.status == CallStatus.FAILED and record.end_reason in _LOST:
        response.say(LOST_MESSAGE)
        response.hangup()
        state.metrics.webhooks.labels("after_stream", "worker_lost").inc()
    else:
        response.hangup()
        state.metrics.webhooks.labels("after_stream", "hangup").inc()
    return _twiml(response)


def build_router() -> APIRouter:
    """POST /twilio/voice, WS /twilio/stream, POST /twilio/status."""
    router = APIRouter(prefix="/twilio", tags=["twilio"])
    router.add_api_route("/voice", voice, methods=["POST"])
    router.add_api_route("/status", status_callback, methods=["POST"])
    router.add_api_route("/after-stream", after_stream, methods=["POST"])
    router.add_api_websocket_route("/stream", media_stream)
    return router
