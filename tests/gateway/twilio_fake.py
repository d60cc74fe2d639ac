"""Twilio's side of a call, for tests: signed webhooks and a media stream exactly as Twilio sends it."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
from twilio.request_validator import RequestValidator
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from app.sim import mulaw

AUTH_TOKEN = "test-twilio-auth-token"
ACCOUNT_SID = "AC" + "1" * 32


def sign(url: str, params: dict[str, str], token: str = AUTH_TOKEN) -> str:
    return RequestValidator(token).compute_signature(url, params)


async def post_signed(
    client: httpx.AsyncClient, url: str, params: dict[str, str], *, signature: str | None = "auto"
) -> httpx.Response:
    headers = {}
    if signature == "auto":
        headers["X-Twilio-Signature"] = sign(url, params)
    elif signature is not None:
        headers["X-Twilio-Signature"] = signature
    return await client.post(url, data=params, headers=headers)


def voice_params(call_sid: str, to: str = "+15550100001", caller: str = "+15557654321") -> dict[str, str]:
    return {
        "AccountSid": ACCOUNT_SID,
        "ApiVersion": "2010-04-01",
        "CallSid": call_sid,
        "CallStatus": "ringing",
        "Called": to,
        "Caller": caller,
        "Direction": "inbound",
        "From": caller,
        "To": to,
    }


@dataclass
class Twiml:
    connect_action: str | None
    stream_url: str | None
    parameters: dict[str, str]
    say: str | None
    dial: str | None
    hangup: bool


def parse_twiml(text: str) -> Twiml:
    root = ET.fromstring(text)
    stream = root.find("./Connect/Stream")
    params = {p.get("name", ""): p.get("value", "") for p in root.findall("./Connect/Stream/Parameter")}
    say, dial = root.find("./Say"), root.find("./Dial")
    connect = root.find("./Connect")
    return Twiml(
        connect_action=connect.get("action") if connect is not None else None,
        stream_url=stream.get("url") if stream is not None else None,
        parameters=params,
        say=say.text if say is not None else None,
        dial=dial.text if dial is not None else None,
        hangup=root.find("./Hangup") is not None,
    )


def tone(seconds: float, freq: float = 1000.0, level: float = 0.3, rate: int = 8000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (level * 32767 * np.sin(2 * np.pi * freq * t)).astype(np.int16)


# ---------------------------------------------------------------------------------- media stream
@dataclass
class MediaStream:
    """One Twilio media stream over a real WebSocket: sends what Twilio sends, collects the bot's media."""

    ws: ClientConnection
    stream_sid: str
    call_sid: str
    received: list[dict[str, Any]] = field(default_factory=list)
    received_at: list[float] = field(default_factory=list)
    seq: int = 0
    chunk: int = 0
    _reader: asyncio.Task | None = None

    @classmethod
    async def open(cls, url: str, *, call_sid: str, signature: str | None = "auto") -> MediaStream:
        headers = {}
        if signature == "auto":
            headers["X-Twilio-Signature"] = sign(url, {})
        elif signature is not None:
            headers["X-Twilio-Signature"] = signature
        ws = await connect(url, additional_headers=headers, proxy=None, compression=None, open_timeout=5)
        stream = cls(ws=ws, stream_sid="MZ" + call_sid[2:], call_sid=call_sid)
        stream._reader = asyncio.create_task(stream._read())
        return stream

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                self.received.append(json.loads(message))
                self.received_at.append(time.monotonic())
        except ConnectionClosed:
            pass

    @property
    def media(self) -> list[dict[str, Any]]:
        return [m for m in self.received if m.get("event") == "media"]

    def bot_audio(self) -> np.ndarray:
        return mulaw.decode(b"".join(base64.b64decode(m["media"]["payload"]) for m in self.media))

    async def send(self, message: dict[str, Any] | str) -> None:
        await self.ws.send(message if isinstance(message, str) else json.dumps(message))

    def _next(self) -> str:
        self.seq += 1
        return str(self.seq)

    async def start(self, parameters: dict[str, str]) -> None:
        await self.send({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        await self.send(
            {
                "event": "start",
                "sequenceNumber": self._next(),
                "start": {
                    "accountSid": ACCOUNT_SID,
                    "streamSid": self.stream_sid,
                    "callSid": self.call_sid,
                    "tracks": ["inbound"],
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                    "customParameters": parameters,
                },
                "streamSid": self.stream_sid,
            }
        )

    async def media_chunk(self, pcm: np.ndarray) -> None:
        self.chunk += 1
        await self.send(
            {
                "event": "media",
                "sequenceNumber": self._next(),
                "media": {
                    "track": "inbound",
                    "chunk": str(self.chunk),
                    "timestamp": str(self.chunk * 20),
                    "payload": base64.b64encode(mulaw.encode(pcm)).decode(),
                },
                "streamSid": self.stream_sid,
            }
        )

    async def play(self, pcm: np.ndarray, *, between: dict[int, list[dict[str, Any] | str]] | None = None) -> None:
        """Send `pcm` (8 kHz) as 20 ms media messages in real time; `between[i]` goes out before chunk i."""
        t0 = time.monotonic()
        for i, start in enumerate(range(0, len(pcm) - 159, 160)):
            for extra in (between or {}).get(i, []):
                await self.send(extra)
            await self.media_chunk(pcm[start : start + 160])
            delay = t0 + (i + 1) * 0.02 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)

    def dtmf(self, digit: str) -> dict[str, Any]:
        return {
            "event": "dtmf",
            "streamSid": self.stream_sid,
            "sequenceNumber": self._next(),
            "dtmf": {"track": "inbound_track", "digit": digit},
        }

    def mark(self, name: str) -> dict[str, Any]:
        return {"event": "mark", "sequenceNumber": self._next(), "streamSid": self.stream_sid, "mark": {"name": name}}

    async def stop(self) -> None:
        await self.send(
            {
                "event": "stop",
                "sequenceNumber": self._next(),
                "streamSid": self.stream_sid,
                "stop": {"accountSid": ACCOUNT_SID, "callSid": self.call_sid},
            }
        )
        await self.close()

    async def close(self) -> None:
        await self.ws.close()
        if self._reader is not None:
            await self._reader

    async def drop(self) -> None:
        """Lose the connection: no stop, no close frame."""
        self.ws.transport.abort()
        if self._reader is not None:
            await self._reader

    async def wait_closed_by_server(self, timeout: float) -> bool:
        if self._reader is None:
            return True
        try:
            await asyncio.wait_for(asyncio.shield(self._reader), timeout)
            return True
        except TimeoutError:
            return False

    async def closed_with(self, timeout: float = 5.0) -> int | None:
        """The close code of a stream the gateway closes (None if it stays open)."""
        if not await self.wait_closed_by_server(timeout):
            return None
        return self.ws.close_code
