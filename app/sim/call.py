"""One simulated phone call through the gateway's real Twilio endpoints, as Twilio places it.

    POST {public}/twilio/voice (signed form)  ->  TwiML <Connect><Stream url> + <Parameter>s
    WS   {stream url} (signed upgrade)        ->  connected, start, media every 20 ms in real
                                                  time (+ dtmf, raw), then stop / close / drop
    meanwhile: bot media/mark/clear received  ->  playout timeline (app.sim.playout)
    POST {public}/twilio/status (completed), then GET /api/calls/{id} for the record (admin token)
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import numpy as np
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus

from app.sim import mulaw
from app.sim.audio import FRAME_MS, PHONE_RATE, frame_dbfs, read_caller_audio, split_frames, write_wav
from app.sim.playout import Playout
from app.sim.report import CallReport
from app.sim.twilio import (
    SIGNATURE_HEADER,
    StreamMessages,
    new_sid,
    parse_twiml,
    rebase_url,
    sign,
    status_callback_params,
    voice_webhook_params,
)

logger = logging.getLogger(__name__)

Hangup = Literal["stop", "close", "drop"]
TERMINAL_STATUSES = frozenset({"completed", "failed", "rejected"})
DEFAULT_TO = "+15550109999"  # claimed by no persona: the default persona answers
DEFAULT_FROM = "+15550123456"


@dataclass(frozen=True)
class DtmfPlan:
    """Digits pressed `at_s` seconds after `start`, `gap_s` apart."""

    digits: str
    at_s: float = 1.0
    gap_s: float = 0.25

    @classmethod
    def parse(cls, text: str) -> DtmfPlan:
        """`DIGITS[@SECONDS]`, e.g. `12#@1.5`; digits from 0-9 * #."""
        digits, _, at = text.partition("@")
        if not digits or any(d not in "0123456789*#" for d in digits):
            raise ValueError(f"DTMF {text!r}: digits must be 0-9, * or #")
        try:
            at_s = float(at) if at else 1.0
        except ValueError as exc:
            raise ValueError(f"DTMF {text!r}: time after '@' must be seconds") from exc
        if at_s < 0:
            raise ValueError(f"DTMF {text!r}: time must be >= 0")
        return cls(digits=digits, at_s=at_s)


@dataclass(frozen=True)
class RawMessage:
    """A message sent as-is `at_s` seconds after `start` (malformed or unknown input tests)."""

    at_s: float
    data: str | bytes


@dataclass(frozen=True)
class CallOptions:
    audio: Path
    gateway_url: str = "http://127.0.0.1:8080"
    public_url: str | None = None  # URL Twilio uses (signatures); default gateway_url
    auth_token: str | None = None  # TWILIO_AUTH_TOKEN; None sends unsigned requests
    admin_token: str | None = None  # ADMIN_TOKEN, to fetch the record and transcript
    account_sid: str | None = None
    to_number: str = DEFAULT_TO
    from_number: str = DEFAULT_FROM
    dtmf: tuple[DtmfPlan, ...] = ()
    raw_messages: tuple[RawMessage, ...] = ()
    hangup: Hangup = "stop"
    tail_silence_s: float = 0.5  # silence the caller keeps sending after its audio
    stop_linger_s: float = 0.5  # after `stop`, how long the gateway may take to close first
    jitter_ms: float = 80.0
    speech_dbfs: float = -40.0
    status_callback: bool = True
    out_wav: Path | None = None
    report_path: Path | None = None
    timeout_s: float = 10.0
    record_timeout_s: float = 5.0


@dataclass
class _Live:
    """Mutable state of the call while it runs."""

    t0: float  # loop time `start` was sent
    playout: Playout
    messages: StreamMessages
    speech_windows: list[float] = field(default_factory=list)
    frames_out: int = 0
    send_late: int = 0
    media_in: int = 0
    marks_received: int = 0
    marks_echoed: int = 0
    pending_marks: list[tuple[float, str]] = field(default_factory=list)
    clears: int = 0
    unexpected: int = 0
    dtmf_sent: str = ""
    raw_sent: int = 0
    gateway_closed_at: float | None = None


async def run_call(options: CallOptions) -> CallReport:
    """Place one simulated call; returns the report (and writes the wav/report files if asked)."""
    began = time.perf_counter()
    caller = read_caller_audio(options.audio)  # (n,) int16 at 8 kHz
    tail = np.zeros(int(options.tail_silence_s * PHONE_RATE), dtype=np.int16)
    frames = split_frames(np.concatenate([caller, tail]))
    public = (options.public_url or options.gateway_url).rstrip("/")
    gateway = options.gateway_url.rstrip("/")
    call_sid = new_sid("CA")
    account_sid = options.account_sid or new_sid("AC")
    report = CallReport(
        status="failed",
        hangup=options.hangup,
        call_sid=call_sid,
        account_sid=account_sid,
        jitter_ms=options.jitter_ms,
        speech_dbfs=options.speech_dbfs,
    )
    async with httpx.AsyncClient(timeout=options.timeout_s) as http:
        await _place(options, report, http, frames, public, gateway)
        if options.status_callback and report.stream_sid is not None:
            await _status_callback(options, report, http, public, gateway)
        if options.admin_token and report.call_id:
            await _fetch_record(options, report, http, gateway)
    report.timings.total_ms = (time.perf_counter() - began) * 1000.0
    if options.report_path is not None:
        options.report_path.parent.mkdir(parents=True, exist_ok=True)
        options.report_path.write_text(report.model_dump_json(indent=2), encoding="utf-8")
    return report


async def _place(
    options: CallOptions,
    report: CallReport,
    http: httpx.AsyncClient,
    frames: list[np.ndarray],
    public: str,
    gateway: str,
) -> None:
    """Webhook, TwiML, then the media stream; fills `report`."""
    params = voice_webhook_params(
        call_sid=report.call_sid,
        account_sid=report.account_sid,
        from_number=options.from_number,
        to_number=options.to_number,
    )
    headers = {"User-Agent": "TwilioProxy/1.1"}
    if options.auth_token:
        headers[SIGNATURE_HEADER] = sign(options.auth_token, f"{public}/twilio/voice", params)
    sent = time.perf_counter()
    try:
        response = await http.post(f"{gateway}/twilio/voice", data=params, headers=headers)
    except httpx.HTTPError as exc:
        report.error = f"webhook POST {gateway}/twilio/voice failed: {exc!r}"
        logger.error("%s", report.error)
        return
    report.timings.webhook_ms = (time.perf_counter() - sent) * 1000.0
    if response.status_code != 200:
        report.status, report.http_status = "refused", response.status_code
        report.error = f"webhook answered HTTP {response.status_code}: {response.text[:200]}"
        logger.warning("%s", report.error)
        return
    try:
        twiml = parse_twiml(response.text)
    except ValueError as exc:
        report.error = str(exc)
        logger.error("call %s: %s", report.call_sid, exc)
        return
    report.twiml_verbs = list(twiml.verbs)
    report.parameters = dict(twiml.parameters)
    report.call_id = twiml.parameters.get("call_id") or twiml.parameters.get("callId")
    report.persona = twiml.parameters.get("persona") or twiml.parameters.get("persona_id")
    if not twiml.connects_stream:
        report.status = "rejected"
        logger.info("call %s rejected by TwiML %s", report.call_sid, "/".join(twiml.verbs))
        return
    report.stream_url = twiml.stream_url
    await _stream(options, report, frames, public, gateway, twiml.parameters)


async def _stream(
    options: CallOptions,
    report: CallReport,
    frames: list[np.ndarray],
    public: str,
    gateway: str,
    custom: dict[str, str],
) -> None:
    signed_url = report.stream_url or ""
    url = rebase_url(signed_url, public, gateway)
    headers = {"User-Agent": "Twilio.TmeWs/1.0"}
    if options.auth_token:
        headers[SIGNATURE_HEADER] = sign(options.auth_token, signed_url)
    opened = time.perf_counter()
    try:
        ws = await websockets.connect(
            url, additional_headers=headers, open_timeout=options.timeout_s, max_size=2**20
        )
    except InvalidStatus as exc:
        report.status, report.http_status = "refused", exc.response.status_code
        report.error = f"stream upgrade answered HTTP {exc.response.status_code}"
        logger.warning("call %s: %s", report.call_sid, report.error)
        return
    except (OSError, TimeoutError, websockets.InvalidHandshake) as exc:
        report.error = f"stream connect to {url} failed: {exc!r}"
        logger.error("call %s: %s", report.call_sid, report.error)
        return
    report.timings.ws_connect_ms = (time.perf_counter() - opened) * 1000.0
    report.stream_sid = new_sid("MZ")
    messages = StreamMessages(report.stream_sid, report.call_sid, report.account_sid)
    loop = asyncio.get_running_loop()
    live: _Live | None = None
    receiver: asyncio.Task[None] | None = None
    try:
        await ws.send(messages.connected())
        await ws.send(messages.start(custom))
        live = _Live(t0=loop.time(), playout=Playout(jitter_ms=options.jitter_ms), messages=messages)
        receiver = asyncio.create_task(_receive(ws, live, report.stream_sid))
        finished = await _send(ws, live, frames, options)
        report.timings.call_ms = (loop.time() - live.t0) * 1000.0
        await _hang_up(ws, live, options, finished, receiver)
        try:
            await asyncio.wait_for(receiver, timeout=options.timeout_s)
        except TimeoutError:
            logger.error("call %s: receiver still running after hang-up", report.call_sid)
            receiver.cancel()
        report.status = "completed" if finished else "failed"
        if not finished:
            report.error = f"gateway closed the stream {live.gateway_closed_at or 0:.2f} s after start"
    except ConnectionClosed as exc:
        report.error = f"stream closed during setup: {exc!r}"
        logger.error("call %s: %s", report.call_sid, report.error)
    finally:
        if receiver is not None and not receiver.done():
            receiver.cancel()
        if ws.close_code is None and options.hangup != "drop":
            await ws.close()
        report.close_code = ws.close_code
    if live is not None:
        _summarise(report, live, options)


async def _send(ws: ClientConnection, live: _Live, frames: list[np.ndarray], options: CallOptions) -> bool:
    """Caller media every 20 ms on an absolute clock, plus DTMF, raw messages and mark echoes.

    Returns False if the gateway closed the stream before the caller finished.
    """
    loop = asyncio.get_running_loop()
    extras: list[tuple[float, str | bytes, str]] = []
    for plan in options.dtmf:
        for i, digit in enumerate(plan.digits):
            extras.append((plan.at_s + i * plan.gap_s, "", digit))
    for raw in options.raw_messages:
        extras.append((raw.at_s, raw.data, ""))
    extras.sort(key=lambda e: e[0])
    step = FRAME_MS / 1000.0
    try:
        for i, frame in enumerate(frames):
            due = live.t0 + i * step
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif -delay > step:
                live.send_late += 1
            offset = i * step
            while extras and extras[0][0] <= offset:
                _, data, digit = extras.pop(0)
                if digit:
                    await ws.send(live.messages.dtmf(digit))
                    live.dtmf_sent += digit
                else:
                    await ws.send(data)
                    live.raw_sent += 1
            await _echo_marks(ws, live, loop.time() - live.t0)
            await ws.send(live.messages.media(mulaw.encode(frame), chunk=i + 1, timestamp_ms=i * FRAME_MS))
            live.frames_out += 1
            if frame_dbfs(frame) >= options.speech_dbfs:
                live.speech_windows.append(loop.time() - live.t0)
    except ConnectionClosed:
        live.gateway_closed_at = loop.time() - live.t0
        logger.warning("gateway closed the stream after %d caller frames", live.frames_out)
        return False
    return True


async def _echo_marks(ws: ClientConnection, live: _Live, now_s: float) -> None:
    """Answer the bot's marks whose audio has been played, as Twilio does."""
    due = [m for m in live.pending_marks if m[0] <= now_s]
    for mark in due:
        live.pending_marks.remove(mark)
        await ws.send(live.messages.mark(mark[1]))
        live.marks_echoed += 1


async def _hang_up(
    ws: ClientConnection, live: _Live, options: CallOptions, finished: bool, receiver: asyncio.Task[None]
) -> None:
    """stop: send `stop`, give the gateway `stop_linger_s` to close, then close (as Twilio does);
    close: a close frame without `stop`; drop: the TCP connection just vanishes."""
    if not finished:
        return
    if options.hangup == "drop":
        ws.transport.abort()
        return
    try:
        if options.hangup == "stop":
            await ws.send(live.messages.stop())
            await asyncio.wait({receiver}, timeout=options.stop_linger_s)
        await ws.close()
    except ConnectionClosed:
        logger.info("stream already closed at hang-up")


async def _receive(ws: ClientConnection, live: _Live, stream_sid: str) -> None:
    """Bot messages until the socket closes: media onto the playout, marks, clears."""
    loop = asyncio.get_running_loop()
    try:
        async for raw in ws:
            now = loop.time() - live.t0
            message = _parse(raw)
            event = message.get("event") if message is not None else None
            if message is None or message.get("streamSid") != stream_sid:
                live.unexpected += 1
                logger.warning("unexpected message from the gateway: %.200r", raw)
                continue
            if event == "media":
                payload = (message.get("media") or {}).get("payload") or ""
                try:
                    pcm = mulaw.decode(base64.b64decode(payload, validate=True))
                except ValueError as exc:
                    live.unexpected += 1
                    logger.warning("bot media payload is not base64: %s", exc)
                    continue
                live.media_in += 1
                live.playout.add(pcm, now)
            elif event == "mark":
                live.marks_received += 1
                name = str((message.get("mark") or {}).get("name", ""))
                live.pending_marks.append((live.playout.queued_until_s(now), name))
            elif event == "clear":
                live.clears += 1
                live.playout.clear(now)
                live.pending_marks = [(now, name) for _, name in live.pending_marks]
            else:
                live.unexpected += 1
                logger.warning("unknown event from the gateway: %.200r", raw)
    except ConnectionClosed as exc:
        logger.debug("stream receive ended: %r", exc)
    if live.gateway_closed_at is None:
        live.gateway_closed_at = loop.time() - live.t0


def _parse(raw: str | bytes) -> dict[str, Any] | None:
    if isinstance(raw, bytes):
        return None
    try:
        message = json.loads(raw)
    except json.JSONDecodeError:
        return None
    return message if isinstance(message, dict) else None


def _summarise(report: CallReport, live: _Live, options: CallOptions) -> None:
    playout = live.playout
    report.frames_out = live.frames_out
    report.frames_in = round(playout.frames_received, 2)
    report.media_messages_in = live.media_in
    if playout.first_arrival_s is not None:
        report.first_bot_audio_ms = playout.first_arrival_s * 1000.0
        report.timings.first_bot_audio_ms = report.first_bot_audio_ms
    report.late_frames = playout.late_frames
    report.late_fraction = playout.late_frames / report.frames_in if report.frames_in else None
    report.underrun_ms = playout.underrun_samples / PHONE_RATE * 1000.0
    report.largest_gap_ms = playout.largest_gap_samples / PHONE_RATE * 1000.0
    delays = playout.playout_delays_ms()
    if delays:
        report.playout_delay_ms_mean = float(np.mean(delays))
        report.playout_delay_ms_max = float(np.max(delays))
    report.caller_speech_ms = len(live.speech_windows) * FRAME_MS
    report.duplex_fraction = playout.coverage(live.speech_windows)
    report.send_late_frames = live.send_late
    report.dtmf_sent = live.dtmf_sent
    report.raw_messages_sent = live.raw_sent
    report.marks_received = live.marks_received
    report.marks_echoed = live.marks_echoed
    report.clears_received = live.clears
    report.cleared_ms = playout.cleared_samples / PHONE_RATE * 1000.0
    report.unexpected_messages = live.unexpected
    if options.out_wav is not None:
        write_wav(options.out_wav, playout.render())
        report.bot_wav = str(options.out_wav)


async def _status_callback(
    options: CallOptions, report: CallReport, http: httpx.AsyncClient, public: str, gateway: str
) -> None:
    """Twilio's `completed` status callback, after the stream has ended."""
    params = status_callback_params(
        call_sid=report.call_sid,
        account_sid=report.account_sid,
        from_number=options.from_number,
        to_number=options.to_number,
        duration_s=(report.timings.call_ms or 0) / 1000.0,
    )
    headers = {"User-Agent": "TwilioProxy/1.1"}
    if options.auth_token:
        headers[SIGNATURE_HEADER] = sign(options.auth_token, f"{public}/twilio/status", params)
    try:
        response = await http.post(f"{gateway}/twilio/status", data=params, headers=headers)
    except httpx.HTTPError as exc:
        logger.error("status callback for call %s failed: %r", report.call_sid, exc)
        return
    if response.status_code >= 300:
        logger.warning("status callback answered HTTP %d", response.status_code)


async def _fetch_record(
    options: CallOptions, report: CallReport, http: httpx.AsyncClient, gateway: str
) -> None:
    """GET /api/calls/{id} until the record is terminal (or the time is up)."""
    headers = {"Authorization": f"Bearer {options.admin_token}"}
    deadline = time.perf_counter() + options.record_timeout_s
    body: dict[str, Any] | None = None
    while True:
        try:
            response = await http.get(f"{gateway}/api/calls/{report.call_id}", headers=headers)
        except httpx.HTTPError as exc:
            logger.error("GET /api/calls/%s failed: %r", report.call_id, exc)
            return
        if response.status_code == 200:
            body = response.json()
            if isinstance(body, dict) and _record_of(body).get("status") in TERMINAL_STATUSES:
                break
        elif response.status_code != 404:
            logger.warning("GET /api/calls/%s answered HTTP %d", report.call_id, response.status_code)
            return
        if time.perf_counter() >= deadline:
            break
        await asyncio.sleep(0.1)
    if isinstance(body, dict):
        report.record = _record_of(body)
        report.events = body.get("events")
        report.transcript = body.get("transcript")


def _record_of(body: dict[str, Any]) -> dict[str, Any]:
    """The record in a GET /api/calls/{id} answer: {"call": {...}, "events": [...], "transcript": ...}."""
    record = body.get("call")
    return record if isinstance(record, dict) else {}
