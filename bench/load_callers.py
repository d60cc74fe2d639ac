"""One process of simulated Twilio callers for `bench/gateway_load.py` (bench only).

Started by gateway_load.py, not by hand. The handshake on stdin/stdout:

    stdin  line 1   the spec, JSON: mode ("sim" | "lean"), gateway_url, public_url, auth_token,
                    audio, out, calls (a list of start offsets in seconds), timeout_s, uvloop,
                    compression ("deflate" | "none", lean only)
    stdout          `ready` once everything is imported and prepared
    stdin  line 2   `go <t0>`: t0 is the wall-clock (time.time()) moment offset 0 stands for
    out file        a JSON list, one object per call (fields below), written when all calls ended

mode "sim": each call is `app.sim.run_call` (what `callcenter call` and the e2e tests place):
signed webhook, media stream in real time, stop, status callback. It costs the caller's CPU
~25-30 ms per call-second on this box (a TLS context per call for its HTTP client, μ-law encoding
and a level per frame, the websockets library with permessage-deflate).

mode "lean": the same call, message for message (app.sim.twilio builds and signs every message;
the caller's frames are μ-law encoded once per process, not once per call; the bot's audio goes
through the same `app.sim.playout.Playout`, so late_frames / frames_in / largest_gap_ms mean
exactly what they mean in `CallReport`), with one HTTP client for all calls of the process and
without decoding the bot's μ-law (only its length and arrival time matter to the playout). The
WebSocket's permessage-deflate is offered as `compression` says (app.sim always offers it; the
gateway accepts it, which costs the gateway a deflate per message each way).

Per call: status, error, frames_out, frames_in, late_frames, largest_gap_ms, underrun_ms,
send_late_frames, first_bot_audio_ms, webhook_ms, ws_connect_ms, and stream_start / stream_end
(wall clock, about when `start` was sent and when the caller hung up), from which
gateway_load.py computes the call-seconds inside its measuring window.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import httpx
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from app.sim import CallOptions, mulaw, run_call
from app.sim.audio import FRAME_MS, PHONE_RATE, read_caller_audio, split_frames
from app.sim.playout import Playout
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

logger = logging.getLogger("load_callers")

TAIL_SILENCE_S = 0.5  # as CallOptions.tail_silence_s
STOP_LINGER_S = 0.5  # as CallOptions.stop_linger_s
JITTER_MS = 80.0  # as CallOptions.jitter_ms
FROM_NUMBER, TO_NUMBER = "+15550123456", "+15550109999"  # as app.sim.call's defaults
SILENT = np.zeros(PHONE_RATE, dtype=np.int16)  # a view of it stands for a bot payload's samples


# ------------------------------------------------------------------------------------ sim
async def sim_call(options: CallOptions, at: float) -> dict[str, Any]:
    await _sleep_until(at)
    began = time.time()
    report = await run_call(options)
    t = report.timings
    stream_start = stream_end = None
    if t.ws_connect_ms is not None and t.call_ms is not None:
        stream_start = began + ((t.webhook_ms or 0.0) + t.ws_connect_ms) / 1000.0
        stream_end = stream_start + t.call_ms / 1000.0
    return {
        "status": report.status,
        "error": report.error,
        "start_late_s": began - at,
        "frames_out": report.frames_out,
        "frames_in": report.frames_in,
        "late_frames": report.late_frames,
        "largest_gap_ms": report.largest_gap_ms,
        "underrun_ms": report.underrun_ms,
        "send_late_frames": report.send_late_frames,
        "first_bot_audio_ms": report.first_bot_audio_ms,
        "webhook_ms": t.webhook_ms,
        "ws_connect_ms": t.ws_connect_ms,
        "stream_start": stream_start,
        "stream_end": stream_end,
    }


async def _sleep_until(at: float) -> None:
    delay = at - time.time()
    if delay > 0:
        await asyncio.sleep(delay)


# ------------------------------------------------------------------------------------ lean
@dataclass
class Lean:
    http: httpx.AsyncClient
    gateway: str
    public: str
    auth_token: str | None
    ulaw_frames: list[bytes]  # the caller's audio (with the tail silence), 160 μ-law bytes each
    timeout_s: float
    compression: str | None


async def lean_call(lean: Lean, at: float) -> dict[str, Any]:
    await _sleep_until(at)
    began = time.time()
    result: dict[str, Any] = {"status": "failed", "error": None, "start_late_s": began - at}
    call_sid, account_sid = new_sid("CA"), new_sid("AC")
    params = voice_webhook_params(
        call_sid=call_sid, account_sid=account_sid, from_number=FROM_NUMBER, to_number=TO_NUMBER
    )
    headers = {"User-Agent": "TwilioProxy/1.1"}
    if lean.auth_token:
        headers[SIGNATURE_HEADER] = sign(lean.auth_token, f"{lean.public}/twilio/voice", params)
    sent = time.perf_counter()
    try:
        response = await lean.http.post(f"{lean.gateway}/twilio/voice", data=params, headers=headers)
    except httpx.HTTPError as exc:
        result["error"] = f"webhook failed: {exc!r}"
        return result
    result["webhook_ms"] = (time.perf_counter() - sent) * 1000.0
    if response.status_code != 200:
        result |= {"status": "refused", "error": f"webhook answered HTTP {response.status_code}"}
        return result
    twiml = parse_twiml(response.text)
    if twiml.stream_url is None:
        result["status"] = "rejected"
        return result
    url = rebase_url(twiml.stream_url, lean.public, lean.gateway)
    ws_headers = {"User-Agent": "Twilio.TmeWs/1.0"}
    if lean.auth_token:
        ws_headers[SIGNATURE_HEADER] = sign(lean.auth_token, twiml.stream_url)
    opened = time.perf_counter()
    try:
        ws = await websockets.connect(
            url, additional_headers=ws_headers, open_timeout=lean.timeout_s, max_size=2**20,
            compression=lean.compression,
        )
    except InvalidStatus as exc:
        result |= {"status": "refused", "error": f"stream upgrade answered HTTP {exc.response.status_code}"}
        return result
    except (OSError, TimeoutError, websockets.InvalidHandshake) as exc:
        result["error"] = f"stream connect failed: {exc!r}"
        return result
    result["ws_connect_ms"] = (time.perf_counter() - opened) * 1000.0
    stream_sid = new_sid("MZ")
    messages = StreamMessages(stream_sid, call_sid, account_sid)
    loop = asyncio.get_running_loop()
    playout = Playout(jitter_ms=JITTER_MS)
    counts = {"send_late": 0, "frames_out": 0, "unexpected": 0}
    marks: list[tuple[float, str]] = []
    finished = False
    receiver: asyncio.Task[None] | None = None
    try:
        try:
            await ws.send(messages.connected())
            await ws.send(messages.start(dict(twiml.parameters)))
            t0 = loop.time()
            result["stream_start"] = time.time()
            receiver = asyncio.create_task(_lean_receive(ws, playout, marks, counts, stream_sid, t0))
            step = FRAME_MS / 1000.0
            for i, ulaw in enumerate(lean.ulaw_frames):
                delay = t0 + i * step - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                elif -delay > step:
                    counts["send_late"] += 1
                if marks:
                    now = loop.time() - t0
                    for mark in [m for m in marks if m[0] <= now]:
                        marks.remove(mark)
                        await ws.send(messages.mark(mark[1]))
                await ws.send(messages.media(ulaw, chunk=i + 1, timestamp_ms=i * FRAME_MS))
                counts["frames_out"] += 1
            finished = True
            result["stream_end"] = time.time()  # the hang-up, as CallReport.timings.call_ms ends
        except ConnectionClosed as exc:
            result["error"] = f"gateway closed the stream after {counts['frames_out']} caller frames: {exc!r}"
        try:
            if finished and receiver is not None:  # hang up as app.sim does: stop, linger, close
                await ws.send(messages.stop())
                await asyncio.wait({receiver}, timeout=STOP_LINGER_S)
                await ws.close()
        except ConnectionClosed:
            logger.info("stream already closed at hang-up")
        if receiver is not None:
            try:
                await asyncio.wait_for(receiver, timeout=lean.timeout_s)
            except TimeoutError:
                logger.error("call %s: receiver still running %.0f s after hang-up", call_sid, lean.timeout_s)
                result["error"] = "receiver still running after hang-up"
    finally:
        if receiver is not None and not receiver.done():
            receiver.cancel()
        if ws.close_code is None:
            await ws.close()
    result["status"] = "completed" if finished else "failed"
    result |= {
        "frames_out": counts["frames_out"],
        "frames_in": playout.frames_received,
        "late_frames": playout.late_frames,
        "largest_gap_ms": playout.largest_gap_samples / PHONE_RATE * 1000.0,
        "underrun_ms": playout.underrun_samples / PHONE_RATE * 1000.0,
        "send_late_frames": counts["send_late"],
        "first_bot_audio_ms": None if playout.first_arrival_s is None else playout.first_arrival_s * 1000.0,
        "unexpected_messages": counts["unexpected"],
    }
    status_params = status_callback_params(
        call_sid=call_sid, account_sid=account_sid, from_number=FROM_NUMBER, to_number=TO_NUMBER,
        duration_s=len(lean.ulaw_frames) * FRAME_MS / 1000.0,
    )
    headers = {"User-Agent": "TwilioProxy/1.1"}
    if lean.auth_token:
        headers[SIGNATURE_HEADER] = sign(lean.auth_token, f"{lean.public}/twilio/status", status_params)
    try:
        response = await lean.http.post(f"{lean.gateway}/twilio/status", data=status_params, headers=headers)
        if response.status_code >= 300:
            logger.warning("status callback answered HTTP %d", response.status_code)
    except httpx.HTTPError as exc:
        logger.error("status callback failed: %r", exc)
    return result


async def _lean_receive(
    ws: Any, playout: Playout, marks: list[tuple[float, str]], counts: dict[str, int], stream_sid: str, t0: float
) -> None:
    """Bot messages onto the playout (as app.sim.call._receive, without decoding the μ-law)."""
    loop = asyncio.get_running_loop()
    try:
        async for raw in ws:
            now = loop.time() - t0
            message = json.loads(raw) if isinstance(raw, str) else None
            if not isinstance(message, dict) or message.get("streamSid") != stream_sid:
                counts["unexpected"] += 1
                continue
            event = message.get("event")
            if event == "media":
                try:
                    size = len(base64.b64decode((message.get("media") or {}).get("payload") or "", validate=True))
                except binascii.Error:
                    counts["unexpected"] += 1
                    continue
                playout.add(SILENT[:size] if size <= len(SILENT) else np.zeros(size, dtype=np.int16), now)
            elif event == "mark":
                marks.append((playout.queued_until_s(now), str((message.get("mark") or {}).get("name", ""))))
            elif event == "clear":
                playout.clear(now)
            else:
                counts["unexpected"] += 1
    except ConnectionClosed:
        return


# ------------------------------------------------------------------------------------ main
async def run_all(spec: dict[str, Any], t0: float, lean: Lean | None) -> list[dict[str, Any]]:
    if lean is not None:
        tasks = [lean_call(lean, t0 + float(offset)) for offset in spec["calls"]]
    else:
        options = CallOptions(
            audio=Path(spec["audio"]), gateway_url=spec["gateway_url"], public_url=spec["public_url"],
            auth_token=spec["auth_token"], timeout_s=float(spec["timeout_s"]),
        )
        tasks = [sim_call(options, t0 + float(offset)) for offset in spec["calls"]]
    try:
        results = await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        if lean is not None:
            await lean.http.aclose()
    out: list[dict[str, Any]] = []
    for result in results:
        if isinstance(result, BaseException):
            if not isinstance(result, Exception):  # KeyboardInterrupt, SystemExit: stop, do not report
                raise result
            logger.error("a call raised: %r", result, exc_info=result)
            out.append({"status": "exception", "error": repr(result)})
        else:
            out.append(result)
    return out


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = json.loads(sys.stdin.readline())
    if spec["mode"] not in ("sim", "lean"):
        raise ValueError(f"mode {spec['mode']!r}: sim or lean")
    if spec.get("uvloop"):
        import uvloop

        runner = uvloop.run
    else:
        runner = asyncio.run
    ulaw_frames: list[bytes] = []
    if spec["mode"] == "lean":
        pcm = read_caller_audio(Path(spec["audio"]))
        tail = np.zeros(int(TAIL_SILENCE_S * PHONE_RATE), dtype=np.int16)
        ulaw_frames = [mulaw.encode(frame) for frame in split_frames(np.concatenate([pcm, tail]))]
    print("ready", flush=True)
    line = sys.stdin.readline().split()
    if len(line) != 2 or line[0] != "go":
        raise RuntimeError(f"expected `go <t0>` on stdin, got {line!r}")

    async def go() -> list[dict[str, Any]]:
        lean = None
        if spec["mode"] == "lean":
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=50)
            lean = Lean(
                http=httpx.AsyncClient(timeout=float(spec["timeout_s"]), limits=limits),
                gateway=spec["gateway_url"].rstrip("/"), public=spec["public_url"].rstrip("/"),
                auth_token=spec["auth_token"], ulaw_frames=ulaw_frames, timeout_s=float(spec["timeout_s"]),
                compression="deflate" if spec.get("compression", "deflate") == "deflate" else None,
            )
        return await run_all(spec, float(line[1]), lean)

    results = runner(go())
    Path(spec["out"]).write_text(json.dumps(results), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
