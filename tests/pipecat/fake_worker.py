"""A small stand-in for `WS /v1/session` speaking app/protocol.py, for gateway and service tests.

It answers Start with Ready, every caller frame with one bot frame (an echo of the caller's frame
by default), sends a Text every `text_every` frames, and answers End with Ended. Knobs make it
refuse, stall/burst, or drop the connection without a close.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass, field
from http import HTTPStatus

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from app import protocol

logger = logging.getLogger(__name__)

TOKEN = "test-worker-token"


@dataclass
class FakeWorker:
    token: str = TOKEN
    worker_id: str = "fake-1"
    prefill_ms: float = 5.0
    text_every: int = 5  # a Text after every 5th caller frame
    echo: bool = True  # bot frame = caller frame; else silence
    refuse: str | None = None  # an Error code to answer Start with
    hold_frames: int = 0  # hold this many replies, then send them in one burst
    drop_after: int | None = None  # abort the TCP connection after this many caller frames

    starts: list[protocol.Start] = field(default_factory=list)
    ends: list[protocol.End] = field(default_factory=list)
    frames_in: int = 0
    frames_out: int = 0
    _server: Server | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("fake worker not started")
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"ws://{host}:{port}"

    async def start(self) -> None:
        self._server = await serve(self._session, "127.0.0.1", 0, process_request=self._check_request, compression=None)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def _check_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path != protocol.SESSION_PATH:
            return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return connection.respond(HTTPStatus.FORBIDDEN, "bad worker token\n")
        return None

    async def _session(self, ws: ServerConnection) -> None:
        try:
            start = protocol.decode_client(await ws.recv())
            if not isinstance(start, protocol.Start):
                await ws.send(protocol.encode(protocol.Error(code="bad_request", message="start first")))
                return
            self.starts.append(start)
            if self.refuse:
                await ws.send(protocol.encode(protocol.Error(code=self.refuse, message="refused by the fake")))
                return
            await asyncio.sleep(self.prefill_ms / 1000)
            ready = protocol.Ready(call_id=start.call_id, worker_id=self.worker_id, slot=0, prefill_ms=self.prefill_ms)
            await ws.send(protocol.encode(ready))
            await self._stream(ws)
        except ConnectionClosed:
            pass

    async def _stream(self, ws: ServerConnection) -> None:
        held: list[bytes] = []
        count = 0
        async for message in ws:
            if isinstance(message, str):
                end = protocol.decode_client(message)
                if isinstance(end, protocol.End):
                    self.ends.append(end)
                    ended = protocol.Ended(reason=end.reason, frames_in=count, frames_out=self.frames_out)
                    await ws.send(protocol.encode(ended))
                    return
                continue
            protocol.check_frame(message)
            count += 1
            self.frames_in += 1
            if self.drop_after is not None and count >= self.drop_after:
                ws.transport.abort()
                return
            held.append(message if self.echo else bytes(protocol.FRAME_BYTES))
            if len(held) >= max(self.hold_frames, 1):
                for reply in held:
                    await ws.send(reply)
                    self.frames_out += 1
                held.clear()
            if self.text_every and count % self.text_every == 0:
                await ws.send(protocol.encode(protocol.Text(text=f" word{count}", frame=count)))


class FakeWorkerThread:
    """A FakeWorker on its own event loop in a thread (for tests that run a server in another thread)."""

    def __init__(self, worker: FakeWorker) -> None:
        self.worker = worker
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-worker", daemon=True)

    def __enter__(self) -> FakeWorker:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.worker.start(), self._loop).result(timeout=10)
        return self.worker

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.worker.stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
