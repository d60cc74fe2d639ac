"""One call's connections to PersonaPlex workers (`WS /v1/session`, app/protocol.py).

`WorkerLink` connects with the worker token, sends `Start`, waits for `Ready`, reads the session's
messages and ends it with `End`. What can go wrong is sorted into two answers the service acts on:

- `Refusal`: a worker could not take the call (unreachable, HTTP status, busy, shutting down, no
  Ready in time, a bad message). `final` when no other worker would do better (a bad token, an
  unknown persona, a protocol error); `report` when the worker is suspect (tell the router).
- `Loss`: a serving worker stopped serving (its connection dropped, its heartbeat lapsed, it
  ended or failed the session): the call may move to another worker.

It knows nothing of Pipecat frames, routing or the call's tape; bot frames, text and the worker's
Timing reports are handed to the callbacks the service passes to `receive`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from app import protocol
from app.callstate import EndReason, Reservation

logger = logging.getLogger(__name__)

_MAX_MESSAGE_BYTES = 2**20
_CLOSE_TIMEOUT_S = 1.0


@dataclass
class WorkerSession:
    """One worker connection of the call, from its Ready on."""

    ws: ClientConnection
    reservation: Reservation
    ready: protocol.Ready
    base: int  # call frame index of this session's first caller frame (and answer)
    generation: int  # 0 for the call's first worker, +1 per move
    next_send: int = 0  # call frame index of the next caller frame to send here
    last_send_at: float = 0.0  # time.monotonic() of the last caller frame sent here
    answers: int = 0  # bot frames received from this session
    last_answer_at: float = field(default_factory=time.monotonic)  # the last bot frame (or the session's start)
    replay_until: int = 0  # answers (and text) for call frames below this were heard from an older worker
    paused: bool = False  # no caller frames go here (the call is moving away)
    broken: bool = False  # a send failed: the receive loop reports the loss
    lost_reason: str | None = None  # set by the worker watch before it cuts the connection
    move: asyncio.Event = field(default_factory=asyncio.Event)  # the worker asked us to move

    @property
    def worker_id(self) -> str:
        return self.reservation.worker_id


@dataclass(frozen=True)
class Loss:
    """Why a worker session stopped serving the call (the call may move on)."""

    reason: str  # WorkerChange.reason: connection_lost | heartbeat_lapsed | worker_ended | worker_error | draining
    detail: str
    end_reason: EndReason = EndReason.WORKER_LOST
    report: bool = True  # tell the router (the worker is suspect)


@dataclass(frozen=True)
class Refusal:
    """A worker that could not take the call, or a session that failed for good."""

    end_reason: EndReason
    detail: str
    final: bool = False  # no other worker would do better (bad token, unknown persona, a bad message)
    report: bool = False  # the worker is suspect


OnBotFrame = Callable[[WorkerSession, bytes], None]
OnText = Callable[[str], Awaitable[None]]
OnTiming = Callable[[WorkerSession, protocol.Timing], None]


class WorkerLink:
    """Opens, reads and ends one call's worker sessions (see the module docstring)."""

    def __init__(self, *, call_id: str, worker_token: str, connect_timeout_s: float, end_timeout_s: float) -> None:
        self.call_id = call_id
        self._worker_token = worker_token
        self.connect_timeout_s = connect_timeout_s
        self.end_timeout_s = end_timeout_s

    async def open(
        self, reservation: Reservation, start: protocol.Start, *, base: int, generation: int
    ) -> WorkerSession | Refusal:
        """Connect to the reserved worker, send Start and wait for Ready."""
        ws = await self.connect(reservation)
        if isinstance(ws, Refusal):
            return ws
        try:
            opened = await self.start(ws, reservation, start, base=base, generation=generation)
        except BaseException:  # cancelled (the call ended) or a bug: the connection must not linger
            ws.transport.abort()
            raise
        if isinstance(opened, Refusal):
            await close_quietly(ws)
        return opened

    async def connect(self, reservation: Reservation) -> ClientConnection | Refusal:
        """The WebSocket to the reserved worker (authorized with the worker token)."""
        url = reservation.url.rstrip("/") + protocol.SESSION_PATH
        try:
            return await asyncio.wait_for(
                connect(
                    url,
                    additional_headers={"Authorization": f"Bearer {self._worker_token}"},
                    compression=None,
                    proxy=None,
                    open_timeout=None,
                    close_timeout=_CLOSE_TIMEOUT_S,
                    max_size=_MAX_MESSAGE_BYTES,
                ),
                timeout=self.connect_timeout_s,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            detail = f"worker {reservation.worker_id} refused the session: HTTP {status}"
            if status in (401, 403):
                return Refusal(EndReason.ERROR, detail + " (check WORKER_TOKEN)", final=True)
            return Refusal(EndReason.WORKER_LOST, detail, report=True)
        except (OSError, TimeoutError, WebSocketException) as exc:
            return Refusal(
                EndReason.WORKER_LOST,
                f"cannot connect to worker {reservation.worker_id} at {url}: {exc!r}",
                report=True,
            )

    async def start(
        self, ws: ClientConnection, reservation: Reservation, start: protocol.Start, *, base: int, generation: int
    ) -> WorkerSession | Refusal:
        """Send Start on a connected socket and wait for Ready."""
        worker = reservation.worker_id
        try:
            await ws.send(protocol.encode(start))
            async with asyncio.timeout(self.connect_timeout_s):
                while True:
                    message = await ws.recv()
                    if isinstance(message, bytes):
                        logger.warning("call %s: audio before ready from worker %s, ignored", self.call_id, worker)
                        continue
                    reply = protocol.decode_server(message)
                    if isinstance(reply, protocol.Ready):
                        return WorkerSession(
                            ws=ws, reservation=reservation, ready=reply, base=base, generation=generation
                        )
                    if isinstance(reply, protocol.Error):
                        return refusal_for(reply, worker)
                    if isinstance(reply, protocol.Ended):
                        return Refusal(
                            EndReason.WORKER_LOST, f"worker {worker} ended the session before ready: {reply.reason}"
                        )
                    if isinstance(reply, protocol.Move):
                        return Refusal(EndReason.WORKER_LOST, f"worker {worker} is draining ({reply.reason})")
        except TimeoutError:
            return Refusal(
                EndReason.WORKER_LOST,
                f"worker {worker} sent no ready within {self.connect_timeout_s:g} s",
                report=True,
            )
        except ConnectionClosed as exc:
            return Refusal(EndReason.WORKER_LOST, f"worker {worker} closed before ready: {exc}", report=True)
        except protocol.ProtocolError as exc:
            return Refusal(EndReason.ERROR, f"worker {worker} sent a bad message: {exc}", final=True)
        return Refusal(EndReason.ERROR, f"worker {worker}: no ready")  # not reached: the loop returns

    async def receive(
        self,
        session: WorkerSession,
        *,
        on_bot_frame: OnBotFrame,
        on_text: OnText,
        on_timing: OnTiming | None = None,
        closing: Callable[[], bool],
    ) -> Loss | Refusal | None:
        """The session's messages until it stops serving.

        Returns a Loss (the call may move), a final Refusal (the worker failed the call for good),
        or None when we ended it (`closing()` was true by then).
        """
        ws = session.ws
        try:
            async for message in ws:
                if isinstance(message, bytes):
                    on_bot_frame(session, message)
                    continue
                try:
                    reply = protocol.decode_server(message)
                except protocol.ProtocolError as exc:
                    logger.warning("call %s: ignoring a bad message from the worker: %s", self.call_id, exc)
                    continue
                if isinstance(reply, protocol.Text):
                    if session.base + reply.frame >= session.replay_until:  # frame: the session's output index
                        await on_text(reply.text)
                elif isinstance(reply, protocol.Timing):
                    if on_timing is not None:
                        on_timing(session, reply)
                elif isinstance(reply, protocol.Move):
                    logger.info(
                        "call %s: worker %s asks to move the call (%s)", self.call_id, session.worker_id, reply.reason
                    )
                    session.move.set()
                elif isinstance(reply, protocol.Error):
                    if closing():
                        return None
                    if reply.code in ("shutting_down", "internal", "busy"):
                        return Loss(
                            "worker_error",
                            f"worker refused the session ({reply.code}): {reply.message}",
                            report=reply.code == "internal",
                        )
                    return Refusal(
                        EndReason.ERROR, f"worker refused the session ({reply.code}): {reply.message}", final=True
                    )
                elif isinstance(reply, protocol.Ended):
                    if closing():
                        return None
                    return Loss("worker_ended", f"worker ended the session: {reply.reason}", report=False)
        except ConnectionClosed as exc:
            if closing():
                return None
            return _lost(session, f"worker connection lost: {exc}")
        if closing():
            return None
        return _lost(session, "worker connection closed")

    async def end(self, ws: ClientConnection, reason: str) -> None:
        """Send End (bounded by end_timeout_s); a connection already gone is only logged."""
        try:
            await asyncio.wait_for(ws.send(protocol.encode(protocol.End(reason=reason))), timeout=self.end_timeout_s)
        except (ConnectionClosed, TimeoutError, OSError) as exc:
            logger.info("call %s: could not send end to the worker: %r", self.call_id, exc)


def _lost(session: WorkerSession, detail: str) -> Loss:
    if session.lost_reason == "heartbeat_lapsed":
        return Loss("heartbeat_lapsed", f"worker {session.worker_id} missed its heartbeat")
    if session.lost_reason == "worker_stalled":
        return Loss("worker_stalled", f"worker {session.worker_id} stopped answering")
    return Loss("connection_lost", detail)


def refusal_for(error: protocol.Error, worker: str) -> Refusal:
    """How to treat a worker's Error answer to Start."""
    detail = f"worker {worker} refused the session ({error.code}): {error.message}"
    if error.code == "busy":
        return Refusal(EndReason.BUSY, detail)
    if error.code == "shutting_down":
        return Refusal(EndReason.WORKER_LOST, detail)
    if error.code == "internal":
        return Refusal(EndReason.WORKER_LOST, detail, report=True)
    return Refusal(EndReason.ERROR, detail, final=True)


async def close_quietly(ws: ClientConnection) -> None:
    """Close a worker connection; one that fails to close is only logged (it is dropped anyway)."""
    try:
        await ws.close()
    except (OSError, WebSocketException) as exc:
        logger.info("closing the worker connection: %r", exc)
