"""A browser's side of a softphone call, in aiortc, for tests: a tone as the microphone, the offer
posted to /api/offer, the data channel's JSON messages and the bot's audio collected."""

from __future__ import annotations

import asyncio
import fractions
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from av import AudioFrame

RATE = 48_000
FRAME = 960  # 20 ms at 48 kHz


class ToneTrack(MediaStreamTrack):
    """A microphone playing a sine tone, in real time (20 ms frames at 48 kHz)."""

    kind = "audio"

    def __init__(self, hz: float, level: float = 0.3) -> None:
        super().__init__()
        self.hz = hz
        self.level = level
        self._start: float | None = None
        self._sent = 0

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        else:
            await asyncio.sleep(max(0.0, self._start + self._sent / RATE - time.monotonic()))
        t = (np.arange(FRAME) + self._sent) / RATE
        pcm = (self.level * 32767 * np.sin(2 * np.pi * self.hz * t)).astype(np.int16)
        frame = AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.pts = self._sent
        frame.time_base = fractions.Fraction(1, RATE)
        self._sent += FRAME
        return frame


@dataclass
class SoftphonePeer:
    """One call from "the page": offer, answer, events, audio, hang-up."""

    pc: RTCPeerConnection
    tone: ToneTrack
    messages: list[dict[str, Any]] = field(default_factory=list)
    audio: list[np.ndarray] = field(default_factory=list)  # mono 48 kHz int16 chunks from the bot
    answer: dict[str, Any] | None = None
    _reader: asyncio.Task | None = None
    _channel: Any = None

    @classmethod
    def create(cls, tone_hz: float = 5000.0) -> SoftphonePeer:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        peer = cls(pc=pc, tone=ToneTrack(tone_hz))
        peer._channel = pc.createDataChannel("events", ordered=True)

        @peer._channel.on("message")
        def _on_message(message: str | bytes) -> None:
            peer.messages.append(json.loads(message))

        @pc.on("track")
        def _on_track(track: MediaStreamTrack) -> None:
            peer._reader = asyncio.ensure_future(peer._read(track))

        pc.addTrack(peer.tone)
        return peer

    async def offer(self) -> dict[str, str]:
        """The SDP offer with all candidates (aiortc gathers them in setLocalDescription)."""
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return {"sdp": self.pc.localDescription.sdp, "type": self.pc.localDescription.type}

    async def call(self, http: httpx.AsyncClient, base: str, persona: str | None = None) -> httpx.Response:
        """POST the offer; on 200 apply the answer (the call is then connecting)."""
        body: dict[str, Any] = await self.offer()
        if persona is not None:
            body["persona"] = persona
        response = await http.post(f"{base}/api/offer", json=body)
        if response.status_code == 200:
            self.answer = response.json()
            await self.pc.setRemoteDescription(
                RTCSessionDescription(sdp=self.answer["sdp"], type=self.answer["type"])
            )
        return response

    async def _read(self, track: MediaStreamTrack) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            pcm = frame.to_ndarray().reshape(-1, len(frame.layout.channels))[:, 0]  # [n] first channel
            self.audio.append(pcm.astype(np.int16))

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("type") == kind]

    async def wait_for(self, kind: str, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while not self.of_type(kind):
            if time.monotonic() > deadline:
                raise AssertionError(f"no {kind!r} message within {timeout} s; got {self.messages}")
            await asyncio.sleep(0.02)
        return self.of_type(kind)[0]

    def recent_audio(self, seconds: float) -> np.ndarray:
        pcm = np.concatenate(self.audio) if self.audio else np.zeros(0, np.int16)
        return pcm[-int(seconds * RATE) :]

    async def hang_up(self) -> None:
        """What the page does: {"type": "hangup"} on the data channel, then close."""
        if self._channel.readyState == "open":
            self._channel.send(json.dumps({"type": "hangup"}))
        await asyncio.sleep(0.2)
        await self.close()

    async def close(self) -> None:
        await self.pc.close()
        if self._reader is not None:
            self._reader.cancel()
