"""A small stand-in for `WS /v1/session` speaking app/protocol.py, for gateway and service tests.

It answers Start with Ready (seed, next_frame), every caller frame with one bot frame
(`protocol.pack_bot_frame`: an echo of the caller's frame by default, plus the tokens of the call
frame the step completed), sends a Text every `text_every` frames, and answers End with Ended.
A resumed Start (`Start.resume`) continues the call's frame numbering at `resume.next_frame`.

Its tokens are easy to check: complete call frame i is 17 times the value `frame_token(i)`, so the
answer to caller frame j carries `frame_token(j - 1)` (none for j = 0), on whichever worker.

By default it answers each frame at once. With `tick_s` it answers like a real worker's engine: on
a fixed grid (anchored `tick_phase_s` after the session's first caller frame arrived), one queued
frame per tick, with `protocol.Timing` reports of how long the frames waited (the worker's own
`QueueWaits`).

Knobs make it refuse, stall/burst (`hold_frames`, or once: `stall_after`), drop the connection
without a close, ask to move the call (`move_after`), take its time to answer End (`ended_delay_s`,
as a real worker finishing its tick does), or die like a killed process (`kill`). Each session
records the End it got and whether its Ended still reached the gateway (`ended_sent`): a gateway
that hangs up right after End never hears it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass, field
from http import HTTPStatus

import numpy as np
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from app import protocol
from app.worker.call import QueueWaits

logger = logging.getLogger(__name__)

TOKEN = "test-worker-token"
DEFAULT_SEED = 4242


def frame_token(index: int) -> int:
    """The value every token of complete call frame `index` has (fits int16, never -1)."""
    return index % 30_000


@dataclass
class FakeSession:
    """What one session on the fake saw."""

    start: protocol.Start
    next_frame: int  # call frame index of its first caller frame
    frames: list[bytes] = field(default_factory=list)  # caller frames received, in order
    ended: protocol.End | None = None
    ended_sent: bool = False  # our Ended went out before the gateway closed the connection
    waits: list[float] = field(default_factory=list)  # tick_s only: each frame's wait for its tick (s)
    timings: list[protocol.Timing] = field(default_factory=list)  # tick_s only: the reports sent
    max_queued: int = 0  # tick_s only: most caller frames waiting for a tick at once


@dataclass
class FakeWorker:
    token: str = TOKEN
    worker_id: str = "fake-1"
    prefill_ms: float = 5.0
    text_every: int = 5  # a Text after every 5th caller frame
    echo: bool = True  # bot frame = caller frame; else silence
    refuse: str | None = None  # an Error code to answer Start with
    refuse_times: int | None = None  # only the first this many Starts are refused (None: all)
    hold_frames: int = 0  # hold this many replies, then send them in one burst
    drop_after: int | None = None  # abort the TCP connection after this many caller frames
    move_after: int | None = None  # send Move after this many caller frames of a session
    stall_after: int | None = None  # once, after this many caller frames, answer nothing for stall_s
    stall_s: float = 0.0
    ended_delay_s: float = 0.0  # wait this long before answering End with Ended
    seed: int = DEFAULT_SEED  # Ready.seed when Start.sampling has none
    tick_s: float | None = None  # answer on a tick grid of this period (None: at once)
    tick_phase_s: float = 0.0  # the grid's first tick, after the first caller frame arrived

    starts: list[protocol.Start] = field(default_factory=list)
    ends: list[protocol.End] = field(default_factory=list)
    sessions: list[FakeSession] = field(default_factory=list)
    frames_in: int = 0
    frames_out: int = 0
    _server: Server | None = None
    _connections: set[ServerConnection] = field(default_factory=set)

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

    async def kill(self) -> None:
        """Die like `kill -9`: every connection cut without a close, no new one accepted."""
        if self._server is not None:
            self._server.close(close_connections=False)
        for ws in list(self._connections):
            ws.transport.abort()

    def _check_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path != protocol.SESSION_PATH:
            return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return connection.respond(HTTPStatus.FORBIDDEN, "bad worker token\n")
        return None

    async def _session(self, ws: ServerConnection) -> None:
        self._connections.add(ws)
        try:
            start = protocol.decode_client(await ws.recv())
            if not isinstance(start, protocol.Start):
                await ws.send(protocol.encode(protocol.Error(code="bad_request", message="start first")))
                return
            self.starts.append(start)
            if self.refuse and (self.refuse_times is None or len(self.starts) <= self.refuse_times):
                await ws.send(protocol.encode(protocol.Error(code=self.refuse, message="refused by the fake")))
                return
            next_frame = start.resume.next_frame if start.resume is not None else 0
            if start.resume is not None:
                start.resume.tokens()  # a malformed resume fails the test loudly here
                start.resume.warm_pcm()
            session = FakeSession(start=start, next_frame=next_frame)
            self.sessions.append(session)
            await asyncio.sleep(self.prefill_ms / 1000)
            seed = start.sampling.seed if start.sampling.seed is not None else self.seed
            ready = protocol.Ready(
                call_id=start.call_id, worker_id=self.worker_id, slot=0, prefill_ms=self.prefill_ms,
                seed=seed, next_frame=next_frame,
            )
            await ws.send(protocol.encode(ready))
            await self._stream(ws, session)
        except ConnectionClosed:
            pass
        finally:
            self._connections.discard(ws)

    async def _stream(self, ws: ServerConnection, session: FakeSession) -> None:
        held: list[bytes] = []
        count = 0
        queue: asyncio.Queue[tuple[bytes, float]] = asyncio.Queue()
        ticker: asyncio.Task | None = None

        async def answer(message: bytes) -> None:
            nonlocal count
            index = session.next_frame + count  # the call frame this step answers
            count += 1
            self.frames_in += 1
            session.frames.append(message)
            if self.drop_after is not None and count >= self.drop_after:
                ws.transport.abort()
                return
            tokens = np.full(protocol.TOKENS_PER_FRAME, frame_token(index - 1)) if index else None
            pcm = message if self.echo else bytes(protocol.FRAME_BYTES)
            held.append(protocol.pack_bot_frame(pcm, tokens))
            if len(held) >= max(self.hold_frames, 1):
                for reply in held:
                    await ws.send(reply)
                    self.frames_out += 1
                held.clear()
            if self.text_every and count % self.text_every == 0:
                await ws.send(protocol.encode(protocol.Text(text=f" word{index + 1}", frame=count - 1)))
            if self.move_after is not None and count == self.move_after:
                await ws.send(protocol.encode(protocol.Move(reason="draining")))
            if self.stall_after is not None and count == self.stall_after:
                await asyncio.sleep(self.stall_s)  # the caller frames meanwhile wait in the socket

        async def tick(period: float, first_at: float) -> None:
            waits = QueueWaits()
            loop = asyncio.get_running_loop()
            due = first_at
            while True:
                await asyncio.sleep(max(0.0, due - loop.time()))
                due += period
                if queue.empty():
                    continue
                message, arrived = queue.get_nowait()
                wait = loop.time() - arrived
                session.waits.append(wait)
                await answer(message)
                report = waits.add(wait)
                if report is not None:
                    timing = protocol.Timing(
                        frame=count - 1, frames=report[1], wait_ms=report[0] * 1000, tick_ms=period * 1000
                    )
                    session.timings.append(timing)
                    await ws.send(protocol.encode(timing))

        try:
            async for message in ws:
                if isinstance(message, str):
                    end = protocol.decode_client(message)
                    if isinstance(end, protocol.End):
                        self.ends.append(end)
                        session.ended = end
                        await asyncio.sleep(self.ended_delay_s)
                        ended = protocol.Ended(reason=end.reason, frames_in=count, frames_out=self.frames_out)
                        await ws.send(protocol.encode(ended))
                        session.ended_sent = True
                        return
                    continue
                protocol.check_frame(message)
                if self.tick_s is None:
                    await answer(message)
                    continue
                now = asyncio.get_running_loop().time()
                queue.put_nowait((message, now))
                session.max_queued = max(session.max_queued, queue.qsize())
                if ticker is None:
                    ticker = asyncio.create_task(tick(self.tick_s, now + self.tick_phase_s))
        finally:
            if ticker is not None:
                ticker.cancel()


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

    def kill(self) -> None:
        """FakeWorker.kill on the fake's own loop."""
        asyncio.run_coroutine_threadsafe(self.worker.kill(), self._loop).result(timeout=10)

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.worker.stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
