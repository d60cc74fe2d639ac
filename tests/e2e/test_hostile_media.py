"""A hostile caller cannot stall the gateway, grow it, or harm other calls, through real processes.

One valid Twilio `media` message whose payload decodes to 1 MB of μ-law once froze the gateway's
event loop for 9.6 s (the resampler built [n, 49] index arrays for the whole payload): every other
call went silent, /healthz went unanswered and the gateway grew by 2.7 GB. Now uvicorn refuses any
WebSocket message over 64 KiB (that stream alone closes, 1009), the serializer refuses text over
8 KiB before parsing it and payloads over 4 Twilio frames before decoding them, and malformed JSON
(deep nesting: RecursionError) is skipped; each refusal costs that message and nothing else.

The callers here speak Twilio's protocol themselves (app.sim builds the signed requests and the
messages) so that the test sees when each of the bot's media messages arrives: a bystander's
largest gap between two of them is what the bystander hears as silence.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from app.callstate import CallStore
from app.gateway.serializer import MAX_MESSAGE_CHARS, MAX_WS_MESSAGE_BYTES
from app.sim.twilio import SIGNATURE_HEADER, StreamMessages, new_sid, parse_twiml, sign, voice_webhook_params
from tests.e2e.conftest import TWILIO_TOKEN, Stack, bad_messages, tail

pytestmark = pytest.mark.asyncio(loop_scope="function")

SILENCE = b"\xff" * 160  # 20 ms of μ-law silence
# A bystander may not hear more than this between two bot messages. The bug froze everyone for
# 9.6 s; a worker overrunning its tick on a loaded box alone leaves gaps of ~220 ms (measured).
MAX_GAP_S = 0.400
MAX_RSS_GROWTH_KB = 50 * 1024


@dataclass
class Caller:
    """One call placed as Twilio places it; sends 20 ms of silence every 20 ms in real time and
    notes the loop time of every bot media message."""

    stack: Stack
    call_sid: str = field(default_factory=lambda: new_sid("CA"))
    arrivals: list[float] = field(default_factory=list)
    call_id: str = ""
    ws: ClientConnection | None = None
    messages: StreamMessages | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def start(self) -> Caller:
        account_sid = new_sid("AC")
        params = voice_webhook_params(
            call_sid=self.call_sid, account_sid=account_sid, from_number="+15550123456", to_number="+15550109999"
        )
        url = f"{self.stack.gateway_url}/twilio/voice"
        async with httpx.AsyncClient(timeout=10) as http:
            answer = await http.post(url, data=params, headers={SIGNATURE_HEADER: sign(TWILIO_TOKEN, url, params)})
        assert answer.status_code == 200, answer.text
        twiml = parse_twiml(answer.text)
        assert twiml.stream_url, twiml.text
        self.call_id = twiml.parameters.get("call_id", "")
        self.ws = await websockets.connect(
            twiml.stream_url, additional_headers={SIGNATURE_HEADER: sign(TWILIO_TOKEN, twiml.stream_url)}
        )
        self.messages = StreamMessages(new_sid("MZ"), self.call_sid, account_sid)
        await self.ws.send(self.messages.connected())
        await self.ws.send(self.messages.start(dict(twiml.parameters)))
        self.tasks = [asyncio.create_task(self._send()), asyncio.create_task(self._receive())]
        return self

    async def _send(self) -> None:
        loop = asyncio.get_running_loop()
        began, i = loop.time(), 0
        with contextlib.suppress(ConnectionClosed):
            while True:
                await self.ws.send(self.messages.media(SILENCE, chunk=i + 1, timestamp_ms=20 * i))
                i += 1
                await asyncio.sleep(max(0.0, began + 0.020 * i - loop.time()))

    async def _receive(self) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(ConnectionClosed):
            async for raw in self.ws:
                if json.loads(raw).get("event") == "media":
                    self.arrivals.append(loop.time())

    async def send_raw(self, data: str | bytes) -> None:
        with contextlib.suppress(ConnectionClosed):  # the gateway may close on it: the caller notices later
            await self.ws.send(data)

    async def wait_for_bot_audio(self, seconds: float, timeout_s: float = 20.0) -> None:
        """Until the bot has been talking for `seconds`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not self.arrivals or loop.time() - self.arrivals[0] < seconds:
            assert loop.time() < deadline, f"no bot audio after {timeout_s} s"
            assert self.ws.close_code is None, f"stream closed: {self.ws.close_code}"
            await asyncio.sleep(0.05)

    async def wait_for_steady_audio(self, seconds: float = 1.0, timeout_s: float = 15.0) -> None:
        """Until the bot's audio has come without a gap of MAX_GAP_S / 2 for `seconds`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.largest_gap_s(loop.time() - seconds, loop.time()) >= MAX_GAP_S / 2:
            assert loop.time() < deadline, f"no steady bot audio after {timeout_s} s"
            await asyncio.sleep(0.05)

    async def wait_closed(self, timeout_s: float = 5.0) -> int | None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.ws.wait_closed(), timeout_s)
        return self.ws.close_code

    async def hang_up(self) -> None:
        """`stop`, then close, as Twilio does."""
        self.tasks[0].cancel()
        with contextlib.suppress(ConnectionClosed):
            await self.ws.send(self.messages.stop())
            await asyncio.sleep(0.3)
        await self.ws.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def largest_gap_s(self, since: float, until: float) -> float:
        """The longest time without bot audio within [since, until], counting silence at either end."""
        points = [since] + [t for t in self.arrivals if since < t < until] + [until]
        return max(b - a for a, b in zip(points, points[1:]))


def _memory_kb(stack: Stack) -> dict[str, int]:
    """The gateway's resident set now and at its peak (VmRSS, VmHWM), in kB."""
    status = Path(f"/proc/{stack.gateway.process.pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) for key in ("VmRSS", "VmHWM")}


async def _poll_healthz(http: httpx.AsyncClient, stack: Stack, seconds: float) -> list[float]:
    """GET /healthz every 50 ms for `seconds`; the time each took (a failure raises)."""
    loop = asyncio.get_running_loop()
    took: list[float] = []
    end = loop.time() + seconds
    while loop.time() < end:
        sent = loop.time()
        response = await http.get(f"{stack.gateway_url}/healthz")
        assert response.status_code == 200
        took.append(loop.time() - sent)
        await asyncio.sleep(0.05)
    return took


async def _record(stack: Stack, call_id: str, timeout_s: float = 10.0):
    store = CallStore(aioredis.from_url(stack.redis_url, decode_responses=True))
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            record = await store.get_call(call_id)
            if (record is not None and record.ended_at is not None) or loop.time() > deadline:
                return record
            await asyncio.sleep(0.1)
    finally:
        await store.redis.aclose()


def _why(stack: Stack) -> str:
    return f"\n--- gateway log ---\n{tail(stack.gateway.log)}\n--- worker log ---\n{tail(stack.worker.log)}"


async def test_a_1mb_media_message_ends_only_its_own_stream_and_nobody_hears_it(stack: Stack) -> None:
    loop = asyncio.get_running_loop()
    bystander = await Caller(stack).start()
    hostiles: list[Caller] = []
    try:
        await bystander.wait_for_bot_audio(1.0)
        for _ in range(2):
            hostiles.append(await Caller(stack).start())
        just_over, huge = hostiles
        await just_over.wait_for_bot_audio(0.5)
        await huge.wait_for_bot_audio(0.5)
        await bystander.wait_for_steady_audio()  # calls joining cost bystanders a gap of their own
        # Built before the clock starts, so the test's own JSON/base64 work is not in the measurement.
        one_mb = huge.messages.media(bytes(1_000_000), chunk=1, timestamp_ms=0)  # valid, 1.3 MB of JSON
        over_limit = "x" * (MAX_WS_MESSAGE_BYTES + 1)
        # The client is made (~100 ms: its TLS context) and the poller running before the clock starts.
        async with httpx.AsyncClient(timeout=2.0) as http:
            health = asyncio.create_task(_poll_healthz(http, stack, 3.0))
            await asyncio.sleep(0.5)
            memory_before = _memory_kb(stack)
            sent_at = loop.time()
            await huge.send_raw(one_mb)
            await just_over.send_raw(over_limit)
            took = await health  # /healthz answered all along (each GET raises if not)
        window_end = loop.time()
        memory_after = _memory_kb(stack)

        gap = bystander.largest_gap_s(sent_at - 0.1, window_end)
        before = bystander.largest_gap_s(sent_at - 0.5, sent_at)
        silence = f"bystander: {gap * 1000:.0f} ms of silence ({before * 1000:.0f} ms just before)"
        assert gap < MAX_GAP_S, silence + _why(stack)
        assert max(took) < 1.0, f"/healthz took up to {max(took):.2f} s"
        grew = {key: memory_after[key] - memory_before[key] for key in memory_after}
        assert grew["VmRSS"] < MAX_RSS_GROWTH_KB and grew["VmHWM"] < MAX_RSS_GROWTH_KB, (grew, memory_before)
        # Each oversized message closed its own stream: "message too big" (1006 where the gateway's
        # close raced the 1.3 MB still being sent, and the connection was reset instead).
        assert await just_over.wait_closed() == 1009, _why(stack)
        assert await huge.wait_closed() in (1009, 1006), _why(stack)
        # The bystander's call goes on and ends as usual.
        heard = len(bystander.arrivals)
        await asyncio.sleep(0.5)
        assert len(bystander.arrivals) > heard and bystander.ws.close_code is None
    finally:
        for caller in [bystander, *hostiles]:
            await caller.hang_up()
    record = await _record(stack, bystander.call_id)
    assert record is not None and record.status == "completed" and record.end_reason == "caller_hangup"
    for hostile in hostiles:  # ended, not left behind
        record = await _record(stack, hostile.call_id)
        assert record is not None and record.ended_at is not None, _why(stack)


async def test_junk_under_the_websocket_limit_is_skipped_and_the_call_goes_on(stack: Stack) -> None:
    loop = asyncio.get_running_loop()
    caller = await Caller(stack).start()
    try:
        await caller.wait_for_bot_audio(0.5)
        bad_before = await bad_messages(stack.gateway_url)
        junk = [
            caller.messages.media(bytes(45_000), chunk=1, timestamp_ms=0),  # 60 KB: over the text bound
            caller.messages.media(bytes(3_000), chunk=1, timestamp_ms=0),  # 4 KB: payload over its bound
            "[" * 5_000,  # RecursionError in json.loads
            '{"event": "media", "media": {"payload": ' + "[" * 5_000 + "}}",  # likewise, inside a message
            "[" * 60_000,  # deep, and over the text bound: never parsed
        ]
        assert all(len(j) < MAX_WS_MESSAGE_BYTES for j in junk) and len(junk[2]) < MAX_MESSAGE_CHARS
        sent_at = loop.time()
        for data in junk:
            await caller.send_raw(data)
        await asyncio.sleep(1.5)
        assert caller.ws.close_code is None, _why(stack)
        gap = caller.largest_gap_s(sent_at - 0.1, loop.time())
        assert gap < MAX_GAP_S, f"the caller heard {gap * 1000:.0f} ms of silence{_why(stack)}"
        assert await bad_messages(stack.gateway_url) >= bad_before + len(junk)  # each one noticed and counted
    finally:
        await caller.hang_up()
    record = await _record(stack, caller.call_id)
    assert record is not None and record.status == "completed" and record.end_reason == "caller_hangup"
