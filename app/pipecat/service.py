"""PersonaPlexService: a Pipecat service that talks to a PersonaPlex worker over `WS /v1/session`.

Put it between a transport's input and output, like any speech-to-speech service:

    Pipeline([transport.input(), PersonaPlexService(...), transport.output()])

- On `StartFrame` it gets a worker from its `WorkerRouter` (unless it was given a `Reservation`),
  connects (`Authorization: Bearer <worker token>`), sends `protocol.Start` and waits for
  `protocol.Ready`. A worker that cannot be reached or refuses (busy, shutting down) is reported
  to the router and the next one is tried; none left: `busy` (none had a slot) or `worker_lost`.
- `InputAudioRawFrame`s (any sample rate, mono or interleaved) are converted whole to 24 kHz PCM16
  and cut into exact 80 ms frames for the worker, from a bounded queue (`send_queue_frames`, the
  oldest dropped), at most `max_in_flight_frames` unanswered at the worker. Caller audio before
  the first `Ready` is not sent.
- Every bot frame (`protocol.unpack_bot_frame`) is converted to the pipeline's output rate and
  pushed downstream as `SpeechOutputAudioRawFrame`, paced in real time from a bounded queue
  (`output_queue_frames`): a stalled worker leaves nothing to catch up on, a burst beyond the
  queue is dropped and counted. Its tokens go to the call's `CallTape`.
- The model's text is pushed downstream as `TTSTextFrame`s (word pieces, spaces included).
- Full duplex: no VAD, no interruption frames, nothing cleared when the caller speaks.

Moving a call (needs a router). The service keeps a bounded `CallTape`: the call's complete frames
(at most MAX_RESUME_FRAMES) and the caller frames it may have to send again. When the worker's
connection drops, its heartbeat lapses (`WorkerRouter.lapsed`, checked every `heartbeat_check_s`),
it ends or fails the session, or it sends `protocol.Move` (draining), the service asks the router
for another worker (avoiding the old one; a lost one is reported), connects with
`Start(resume=...)` (the seed from the old `Ready`) and swaps the connection under its running
sender and pacer: answers to caller frames the caller already heard are dropped, the caller
frames since the resume point are sent again, and the pipeline notices nothing but a short gap.
On a Move the old worker keeps serving until the new one is found and connected; with no worker
free it keeps serving and the move is tried again. With the old one gone and no worker within
`failover_timeout_s`, the call fails with `worker_lost`.

- Failures travel upstream as `ErrorFrame`s (`force_treat_as_permanent`, so the pipeline worker's
  `processor_unusable_policy` applies) and set `end_reason` (busy, worker_lost, error).
  `EndFrame`/`CancelFrame` send `protocol.End`, close the connection and release the slot.

Event handlers (all awaited in order, keep them short):
    on_ready(service, ready: protocol.Ready)          the first worker holds a slot with the persona
    on_first_audio(service)                           the first bot frame was pushed downstream
    on_worker_changed(service, change: WorkerChange)  the call moved; told once the new worker's
                                                      first frame was pushed (gap known), or at the
                                                      end of a call that ended before that
    on_session_ended(service, reason: str, detail: str)
                                                      the session ended without us ending it
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    Frame,
    InputAudioRawFrame,
    SpeechOutputAudioRawFrame,
    StartFrame,
    TTSTextFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessorSetup
from pipecat.services.ai_service import AIService
from pipecat.services.settings import ServiceSettings
from pipecat.utils.text.base_text_aggregator import TextType
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from app import protocol
from app.callstate import EndReason, Reservation
from app.pipecat.audio import FrameResampler, float_to_pcm16, pcm16_mono

logger = logging.getLogger(__name__)

MODEL_NAME = "personaplex-7b"
_RESERVE_RETRY_S = 0.25  # while looking for a worker and none has a free slot
_MOVE_RETRY_S = 1.0  # a Move that found no worker is tried again after this long
_SILENCE = bytes(protocol.FRAME_BYTES)


class WorkerRouter(Protocol):
    """Where a call's worker comes from (the gateway's is app/gateway/routing.py, on Redis)."""

    async def reserve(self, call_id: str, avoid: frozenset[str]) -> Reservation | None:
        """A slot for the call on a worker not in `avoid` (the call's reservation moves there);
        None when no such worker has a free slot."""
        ...

    async def release(self, call_id: str) -> None:
        """The call holds no worker slot any more."""
        ...

    async def report_failure(self, worker_id: str, detail: str) -> None:
        """A connect to `worker_id` failed or its session was lost: route no new call there for now."""
        ...

    async def lapsed(self, worker_id: str) -> bool:
        """True when the worker's heartbeat is known to have lapsed."""
        ...


@dataclass
class SessionStats:
    """Counters of one call, in 80 ms frames (over all the workers it used)."""

    frames_in: int = 0  # caller frames sent to a worker (not counting those sent again after a move)
    frames_received: int = 0  # bot frames received that the caller had not heard yet
    frames_out: int = 0  # bot frames pushed downstream
    frames_dropped: int = 0  # bot frames dropped: the output queue was full
    input_frames_dropped: int = 0  # caller frames not sent: the send queue was full, or stale after a move
    frames_resent: int = 0  # caller frames sent again to a new worker
    frames_replayed: int = 0  # bot frames of a new worker for frames the caller had already heard
    texts: int = 0  # text pieces pushed downstream
    worker_changes: int = 0  # times the call moved to another worker
    failed_moves: int = 0  # the worker was lost and no other took the call over (0 or 1)


@dataclass(frozen=True)
class WorkerChange:
    """The call moved from one worker to another."""

    old_worker: str
    new_worker: str
    reason: str  # connection_lost | heartbeat_lapsed | worker_ended | worker_error | draining
    next_frame: int  # the call frame the new worker resumed at
    resumed_frames: int  # complete frames sent in Start.resume
    slot: int
    gap_ms: float | None = None  # caller-side silence between the two workers' audio (None: not known)


class CallTape:
    """What the gateway keeps of a call so another worker can take it over; bounded.

    Call frame j is the j-th caller frame the call sent (over all its workers). The answer to caller
    frame j carries the tokens of complete frame j - 1; `completed` frames 0 .. completed - 1 are
    known, the last `max_frames` of them kept. Caller frames are kept from the oldest a resume
    needs (MAX_WARM_FRAMES before the resume point) to the newest sent: `caller_frames` of them.
    """

    def __init__(self, *, max_frames: int = protocol.MAX_RESUME_FRAMES, caller_frames: int) -> None:
        self.history = protocol.CallHistory(max_frames)  # the complete frames
        self._caller: deque[bytes] = deque(maxlen=caller_frames)  # caller frames sent - len .. sent - 1
        self.sent = 0  # caller frames sent (the index of the next one)
        self.answered = 0  # caller frames whose answer was pushed toward the caller

    @property
    def completed(self) -> int:
        """Complete frames known."""
        return self.history.completed

    @property
    def max_frames(self) -> int:
        return self.history.capacity

    def add_caller(self, pcm: bytes) -> int:
        """Caller frame `sent` (PCM16, one 80 ms frame) was taken for sending; returns its index."""
        self._caller.append(pcm)
        self.sent += 1
        return self.sent - 1

    def caller(self, index: int) -> bytes | None:
        """Caller frame `index` if still kept."""
        first = self.sent - len(self._caller)
        if first <= index < self.sent:
            return self._caller[index - first]
        return None

    def add_answer(self, index: int, tokens: np.ndarray | None) -> None:
        """The answer to caller frame `index` arrived, with the tokens of complete frame index - 1."""
        if tokens is not None and index - 1 == self.completed:
            self.history.add(tokens)

    def frames(self) -> np.ndarray:
        """[n, 17] int16: the last n = min(completed, max_frames) complete frames, oldest first."""
        return self.history.span(self.history.first, self.completed)

    def resume(self) -> protocol.Resume:
        """Start.resume for a worker taking the call over at frame `completed`."""
        n = self.completed
        warm = [self.caller(i) for i in range(max(0, n - protocol.MAX_WARM_FRAMES), n)]
        kept = [pcm for pcm in warm if pcm is not None]
        pcm = np.frombuffer(b"".join(kept), dtype="<i2").reshape(-1, protocol.FRAME_SAMPLES)
        return protocol.Resume.of(self.frames(), n, pcm)


@dataclass
class _WorkerSession:
    """One worker connection of the call."""

    ws: ClientConnection
    reservation: Reservation
    ready: protocol.Ready
    base: int  # call frame index of this session's first caller frame (and answer)
    generation: int  # 0 for the call's first worker, +1 per move
    next_send: int = 0  # call frame index of the next caller frame to send here
    last_send_at: float = 0.0  # time.monotonic() of the last caller frame sent here
    answers: int = 0  # bot frames received from this session
    replay_until: int = 0  # answers (and text) for call frames below this were heard from an older worker
    paused: bool = False  # no caller frames go here (the call is moving away)
    broken: bool = False  # a send failed: the receive loop reports the loss
    lost_reason: str | None = None  # set by the heartbeat watch before it cuts the connection
    move: asyncio.Event = field(default_factory=asyncio.Event)  # the worker asked us to move

    @property
    def worker_id(self) -> str:
        return self.reservation.worker_id


@dataclass(frozen=True)
class _Loss:
    """Why a worker session stopped serving the call (the call may move on)."""

    reason: str  # WorkerChange.reason
    detail: str
    end_reason: EndReason = EndReason.WORKER_LOST
    report: bool = True  # tell the router (the worker is suspect)


@dataclass(frozen=True)
class _Refusal:
    """A worker that could not take the call."""

    end_reason: EndReason
    detail: str
    final: bool = False  # no other worker would do better (bad token, unknown persona, a bad message)
    report: bool = False  # the worker is suspect


class PersonaPlexService(AIService):
    """Full-duplex PersonaPlex speech-to-speech for one call (see the module docstring)."""

    def __init__(
        self,
        *,
        call_id: str,
        persona: str,
        worker_token: str,
        router: WorkerRouter | None = None,
        reservation: Reservation | None = None,
        sampling: protocol.Sampling | None = None,
        output_sample_rate: int | None = None,
        output_queue_frames: int = 4,
        send_queue_frames: int = 8,
        max_in_flight_frames: int = 3,
        connect_timeout_s: float = 10.0,
        end_timeout_s: float = 1.0,
        failover_timeout_s: float = 5.0,
        heartbeat_check_s: float = 1.0,
        audio_passthrough: bool = False,
        **kwargs,
    ) -> None:
        """Args:
        call_id, persona: sent to the worker in `protocol.Start`.
        worker_token: bearer token of `WS /v1/session`.
        router: reserves (unless `reservation` is given), moves and releases the call's slot;
            without one the call cannot move and the caller releases the slot.
        reservation: the first worker to use (already reserved).
        sampling: per-call sampling overrides.
        output_sample_rate: rate of the audio pushed downstream (default: the pipeline's output rate).
        output_queue_frames: bot 80 ms frames buffered toward the caller before dropping.
        send_queue_frames: caller 80 ms frames buffered toward the worker before dropping.
        max_in_flight_frames: caller frames a worker may hold unanswered (at most its own queue, so
            it never drops one: frames are numbered by the order they were sent).
        connect_timeout_s: limit for connecting and for the worker's Ready.
        end_timeout_s: how long EndFrame waits for the worker's Ended.
        failover_timeout_s: how long a call whose worker is gone looks for another one.
        heartbeat_check_s: how often the serving worker's heartbeat is checked (0: never).
        audio_passthrough: also push the caller's InputAudioRawFrames downstream.
        """
        if router is None and reservation is None:
            raise ValueError("PersonaPlexService needs a WorkerRouter to get a worker, or a Reservation")
        if output_queue_frames < 1 or send_queue_frames < 1 or max_in_flight_frames < 1:
            raise ValueError("output_queue_frames, send_queue_frames and max_in_flight_frames must be >= 1")
        super().__init__(settings=ServiceSettings(model=MODEL_NAME), **kwargs)
        self.call_id = call_id
        self.persona = persona
        self._worker_token = worker_token
        self._router = router
        self._reservation = reservation
        self._sampling = sampling or protocol.Sampling()
        self._output_sample_rate = output_sample_rate
        self._output_queue_frames = output_queue_frames
        self._max_in_flight = max_in_flight_frames
        self._connect_timeout_s = connect_timeout_s
        self._end_timeout_s = end_timeout_s
        self._failover_timeout_s = failover_timeout_s
        self._heartbeat_check_s = heartbeat_check_s
        self._audio_passthrough = audio_passthrough

        self.stats = SessionStats()
        # Caller frames kept: the warm-up before the resume point, the frame at it, those in flight
        # at the worker, and a margin for complete frames lagging behind answers.
        self.tape = CallTape(caller_frames=protocol.MAX_WARM_FRAMES + max_in_flight_frames + 8)
        self.ready: protocol.Ready | None = None  # the first worker's
        self.end_reason: EndReason | None = None
        self.error: str | None = None
        self.started_at: float | None = None  # time.monotonic() of StartFrame
        self.ready_at: float | None = None
        self.first_audio_at: float | None = None

        self._out_rate = 0
        self._session: _WorkerSession | None = None
        self._candidate: ClientConnection | None = None  # a worker being connected during a move
        self._session_task: asyncio.Task | None = None
        self._recv_task: asyncio.Task | None = None
        self._pacer_task: asyncio.Task | None = None
        self._sender_task: asyncio.Task | None = None
        self._watch_task: asyncio.Task | None = None
        self._retry_task: asyncio.Task | None = None  # a Move tried again later
        self._out_queue: deque[tuple[bytes, int]] = deque()  # (audio, generation), bounded by hand
        self._out_ready = asyncio.Event()
        self._in_queue: deque[bytes] = deque()  # caller frames not yet sent, bounded by hand
        self._send_queue_frames = send_queue_frames
        self._send_wake = asyncio.Event()
        self._changes: dict[int, WorkerChange] = {}  # generation -> change not yet told
        self._in_resampler: FrameResampler | None = None
        self._in_buffer = np.zeros(0)  # [n] 24 kHz samples waiting to fill a frame
        self._out_resampler = FrameResampler(protocol.SAMPLE_RATE, protocol.SAMPLE_RATE)  # set in setup()
        self._closing = False
        self._shut_down = False
        self._released = False

        self._register_event_handler("on_ready", sync=True)
        self._register_event_handler("on_first_audio", sync=True)
        self._register_event_handler("on_worker_changed", sync=True)
        self._register_event_handler("on_session_ended", sync=True)

    @property
    def reservation(self) -> Reservation | None:
        """The worker slot this call holds now (known once reserved)."""
        return self._reservation

    @property
    def worker_id(self) -> str | None:
        """The worker serving the call now."""
        return self._session.worker_id if self._session is not None else None

    # ------------------------------------------------------------------ pipecat lifecycle
    async def setup(self, setup: FrameProcessorSetup) -> None:
        await super().setup(setup)
        self._out_rate = self._output_sample_rate or setup.audio_out_sample_rate
        self._out_resampler = FrameResampler(protocol.SAMPLE_RATE, self._out_rate)

    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        self.started_at = time.monotonic()
        self._pacer_task = self.create_task(self._pace_output(), name=f"{self}::pacer")
        self._session_task = self.create_task(self._run_session(), name=f"{self}::session")

    async def stop(self, frame: EndFrame) -> None:
        await super().stop(frame)
        await self._shutdown(reason=_reason_text(frame.reason), graceful=True)

    async def cancel(self, frame: CancelFrame) -> None:
        await super().cancel(frame)
        await self._shutdown(reason=_reason_text(frame.reason), graceful=False)

    async def cleanup(self) -> None:
        await super().cleanup()
        await self._shutdown(reason="cleanup", graceful=False)

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame):
            self._take_caller_audio(frame)
            if self._audio_passthrough:
                await self.push_frame(frame, direction)
        else:
            await self.push_frame(frame, direction)

    # ------------------------------------------------------------------ caller -> worker
    def _take_caller_audio(self, frame: InputAudioRawFrame) -> None:
        if self.ready is None or self._closing or self.end_reason is not None:
            return
        if self._in_resampler is None or self._in_resampler.in_rate != frame.sample_rate:
            self._in_resampler = FrameResampler(frame.sample_rate, protocol.SAMPLE_RATE)
        mono = pcm16_mono(frame.audio, frame.num_channels)  # [n] at frame.sample_rate
        self._in_buffer = np.concatenate([self._in_buffer, self._in_resampler.process(mono)])
        while len(self._in_buffer) >= protocol.FRAME_SAMPLES:
            chunk = float_to_pcm16(self._in_buffer[: protocol.FRAME_SAMPLES])  # 1920 samples
            self._in_buffer = self._in_buffer[protocol.FRAME_SAMPLES :]
            if len(self._in_queue) >= self._send_queue_frames:
                self._in_queue.popleft()  # drop the oldest: latency stays bounded
                self.stats.input_frames_dropped += 1
            self._in_queue.append(chunk)
            self._send_wake.set()

    async def _send_audio(self) -> None:
        """Caller frames to the serving worker in call-frame order: first those a new worker must
        get again (from the tape), then new ones. Beyond max_in_flight unanswered frames it sends no
        faster than real time (one per 80 ms), so a burst never overflows the worker's queue and a
        worker that lost a frame is never starved."""
        while True:
            session = self._session
            if session is None or session.paused or session.broken:
                await self._wait_send()
                continue
            if session.next_send >= self.tape.sent and not self._in_queue:
                await self._wait_send()
                continue
            if self._window_full(session):
                wait_s = session.last_send_at + protocol.FRAME_SECONDS - time.monotonic()
                if wait_s > 0:
                    await self._wait_send(wait_s)
                    continue
            resend = session.next_send < self.tape.sent
            if resend:
                pcm = self.tape.caller(session.next_send)
                if pcm is None:
                    logger.warning("call %s: caller frame %d is no longer kept, sending silence",
                                   self.call_id, session.next_send)
                    pcm = _SILENCE
            else:
                pcm = self._in_queue.popleft()
                self.tape.add_caller(pcm)
            session.next_send += 1
            session.last_send_at = time.monotonic()
            try:
                await session.ws.send(pcm)
            except ConnectionClosed:
                session.broken = True  # the receive loop reports the loss; the frame is on the tape
                continue
            if resend:
                self.stats.frames_resent += 1
            else:
                self.stats.frames_in += 1

    def _window_full(self, session: _WorkerSession) -> bool:
        return session.next_send - (session.base + session.answers) >= self._max_in_flight

    async def _wait_send(self, timeout_s: float | None = None) -> None:
        """Until a caller frame, an answer or a new session arrives (or `timeout_s` passed)."""
        self._send_wake.clear()
        try:
            await asyncio.wait_for(self._send_wake.wait(), timeout_s)
        except TimeoutError:
            pass

    # ------------------------------------------------------------------ worker sessions
    async def _run_session(self) -> None:
        try:
            session = await self._first_session()
            if session is None:
                return
            self._install(session)
            self.ready = session.ready
            self.ready_at = time.monotonic()
            await self._call_event_handler("on_ready", session.ready)
            self._sender_task = self.create_task(self._send_audio(), name=f"{self}::sender")
            if self._router is not None and self._heartbeat_check_s > 0:
                self._watch_task = self.create_task(self._watch_heartbeat(), name=f"{self}::heartbeat")
            await self._follow(session)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # anything unexpected ends this call only, with its context logged
            logger.exception("call %s: worker session failed", self.call_id)
            await self._fail(EndReason.ERROR, f"worker session failed: {exc!r}")
        finally:
            if not self._closing:
                # The session ended on its own (failure or worker close): free the slot now.
                if self._session is not None:
                    await _close_quietly(self._session.ws)
                await self._release_slot()

    async def _follow(self, session: _WorkerSession) -> None:
        """Serve the call from `session`, moving it to another worker when needed, until it ends."""
        self._recv_task = self.create_task(self._receive(session), name=f"{self}::receive")
        while True:
            recv = self._recv_task
            moving = asyncio.ensure_future(session.move.wait())
            try:
                await asyncio.wait({recv, moving}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                moving.cancel()
            if recv.done():
                loss = recv.result()
                if loss is None:
                    return  # ended by us, or failed for good
                if self._router is None:
                    await self._fail(loss.end_reason, loss.detail)
                    return
                new = await self._move(session, None, loss)
            else:
                if self._router is None:
                    logger.warning("call %s: worker %s asks to move the call, but there is no router",
                                   self.call_id, session.worker_id)
                    session.move.clear()
                    continue
                new = await self._move(session, recv, _Loss("draining", "the worker is draining", report=False))
                if new is session:  # no worker free: stay, and try again in a while
                    session.move.clear()
                    if self._retry_task is not None and not self._retry_task.done():
                        await self.cancel_task(self._retry_task)
                    self._retry_task = self.create_task(
                        _set_later(session.move, _MOVE_RETRY_S), name=f"{self}::move-retry"
                    )
                    continue
            if new is None:
                return
            session = new
            self._recv_task = self.create_task(self._receive(session), name=f"{self}::receive")

    async def _first_session(self) -> _WorkerSession | None:
        """Reserve and connect the call's first worker, trying the next one after a failure."""
        avoid: set[str] = set()
        reservation = self._reservation
        if reservation is None and self._router is not None:
            reservation = await self._router.reserve(self.call_id, frozenset())
        if reservation is None:
            await self._fail(EndReason.BUSY, "no worker has a free slot")
            return None
        start = protocol.Start(call_id=self.call_id, persona=self.persona, sampling=self._sampling)
        while True:
            self._reservation = reservation
            opened = await self._open(reservation, start, base=0, generation=0)
            if isinstance(opened, _WorkerSession):
                return opened
            avoid.add(reservation.worker_id)
            if opened.report and self._router is not None:
                await self._report(reservation.worker_id, opened.detail)
            if opened.final or self._router is None:
                await self._fail(opened.end_reason, opened.detail)
                return None
            reservation = await self._router.reserve(self.call_id, frozenset(avoid))
            if reservation is None:
                await self._fail(opened.end_reason, opened.detail)
                return None
            logger.info("call %s: trying worker %s next", self.call_id, reservation.worker_id)

    async def _move(
        self, old: _WorkerSession, old_recv: asyncio.Task | None, loss: _Loss
    ) -> _WorkerSession | None:
        """Move the call off `old` to another worker (module docstring).

        old_recv: the old session's receive loop while the old worker still serves (a Move), else
        None. Returns the new session; `old` itself when a Move found no worker (the call stays);
        None when the call failed (worker_lost, or a refusal no worker would do better on).
        """
        router = self._router
        if router is None:
            raise RuntimeError("moving a call needs a router")
        logger.warning("call %s: moving off worker %s (%s): %s", self.call_id, old.worker_id, loss.reason, loss.detail)
        if old_recv is None:
            old.paused = True
            if loss.report:
                await self._report(old.worker_id, loss.detail)
        deadline = time.monotonic() + self._failover_timeout_s
        avoid = {old.worker_id}
        last = loss.detail
        while True:
            if old_recv is not None and old_recv.done():  # the old worker went away meanwhile
                gone = old_recv.result()
                old_recv = None
                old.paused = True
                if gone is None:
                    return None
                loss = gone
                last = gone.detail
                if gone.report:
                    await self._report(old.worker_id, gone.detail)
                logger.warning("call %s: worker %s went away while moving: %s", self.call_id, old.worker_id, last)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if old_recv is not None:
                    logger.warning("call %s: no worker free to move to; staying on %s", self.call_id, old.worker_id)
                    return old
                self.stats.failed_moves += 1
                await self._fail(EndReason.WORKER_LOST, f"no worker could take the call over: {last}")
                return None
            reservation = await self._try_reserve(frozenset(avoid))
            if reservation is None:
                pause = asyncio.ensure_future(asyncio.sleep(min(_RESERVE_RETRY_S, remaining)))
                try:
                    await asyncio.wait({pause} | ({old_recv} if old_recv is not None else set()),
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    pause.cancel()
                continue
            opened = await self._resume_on(reservation, old, old_recv)
            if isinstance(opened, _WorkerSession):
                self._reservation = reservation
                return opened
            avoid.add(reservation.worker_id)
            last = opened.detail
            if opened.report:
                await self._report(reservation.worker_id, opened.detail)
            if opened.final:
                await self._fail(opened.end_reason, opened.detail)
                return None
            if old_recv is not None:
                old.paused = False
                self._send_wake.set()

    async def _try_reserve(self, avoid: frozenset[str]) -> Reservation | None:
        """router.reserve, where trouble (Redis down) counts as no worker free: the move retries."""
        if self._router is None:
            return None
        try:
            return await self._router.reserve(self.call_id, avoid)
        except Exception as exc:  # retried until the failover deadline, then worker_lost
            logger.warning("call %s: reserving another worker failed: %r", self.call_id, exc)
            return None

    async def _resume_on(
        self, reservation: Reservation, old: _WorkerSession, old_recv: asyncio.Task | None
    ) -> _WorkerSession | _Refusal:
        """Connect to `reservation`'s worker, then stop feeding `old` and resume the call there."""
        ws = await self._connect(reservation)
        if isinstance(ws, _Refusal):
            return ws
        self._candidate = ws
        installed = False
        try:
            old.paused = True  # from here the tape is the call: old answers still count, no new frames go out
            base = self.tape.completed
            start = protocol.Start(
                call_id=self.call_id,
                persona=self.persona,
                sampling=self._sampling.model_copy(update={"seed": old.ready.seed}),
                resume=self.tape.resume() if base else None,
            )
            opened = await self._send_start(ws, reservation, start, base=base, generation=old.generation + 1)
            if isinstance(opened, _Refusal):
                await _close_quietly(ws)
                return opened
            if opened.ready.next_frame != base:
                logger.warning("call %s: worker %s resumed at frame %d, asked %d",
                               self.call_id, reservation.worker_id, opened.ready.next_frame, base)
            if old_recv is not None:
                await self.cancel_task(old_recv)
                await self._end_quietly(old.ws, "moved")
            await _close_quietly(old.ws)
            self._install(opened)
            installed = True
            change = WorkerChange(
                old_worker=old.worker_id,
                new_worker=reservation.worker_id,
                reason=self._loss_reason(old, old_recv),
                next_frame=base,
                resumed_frames=min(base, self.tape.max_frames),
                slot=opened.ready.slot,
            )
            self._changes[opened.generation] = change
            self.stats.worker_changes += 1
            logger.info(
                "call %s: now on worker %s slot %d (resumed at frame %d, %d frames; prefill %.1f ms)",
                self.call_id, change.new_worker, change.slot, base, change.resumed_frames, opened.ready.prefill_ms,
            )
            return opened
        finally:
            self._candidate = None
            if not installed:
                ws.transport.abort()  # refused, failed or cancelled (the call ended meanwhile): drop it

    def _loss_reason(self, old: _WorkerSession, old_recv: asyncio.Task | None) -> str:
        if old_recv is not None:
            return "draining"
        return old.lost_reason or "connection_lost"

    def _install(self, session: _WorkerSession) -> None:
        """Make `session` the serving one: send it the caller frames from its base on, dropping
        frames that went stale while no worker served the call (only a window's worth stays)."""
        session.next_send = session.base
        session.replay_until = self.tape.answered
        pending = self.tape.sent - session.base
        keep = max(1, self._max_in_flight - pending)
        while len(self._in_queue) > keep:
            self._in_queue.popleft()
            self.stats.input_frames_dropped += 1
        self._session = session
        self._send_wake.set()

    async def _open(
        self, reservation: Reservation, start: protocol.Start, *, base: int, generation: int
    ) -> _WorkerSession | _Refusal:
        ws = await self._connect(reservation)
        if isinstance(ws, _Refusal):
            return ws
        try:
            opened = await self._send_start(ws, reservation, start, base=base, generation=generation)
        except BaseException:  # cancelled (the call ended) or a bug: the connection must not linger
            ws.transport.abort()
            raise
        if isinstance(opened, _Refusal):
            await _close_quietly(ws)
        return opened

    async def _connect(self, reservation: Reservation) -> ClientConnection | _Refusal:
        url = reservation.url.rstrip("/") + protocol.SESSION_PATH
        try:
            return await asyncio.wait_for(
                connect(
                    url,
                    additional_headers={"Authorization": f"Bearer {self._worker_token}"},
                    compression=None,
                    proxy=None,
                    open_timeout=None,
                    close_timeout=1.0,
                    max_size=2**20,
                ),
                timeout=self._connect_timeout_s,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            detail = f"worker {reservation.worker_id} refused the session: HTTP {status}"
            if status in (401, 403):
                return _Refusal(EndReason.ERROR, detail + " (check WORKER_TOKEN)", final=True)
            return _Refusal(EndReason.WORKER_LOST, detail, report=True)
        except (OSError, TimeoutError, WebSocketException) as exc:
            return _Refusal(
                EndReason.WORKER_LOST,
                f"cannot connect to worker {reservation.worker_id} at {url}: {exc!r}",
                report=True,
            )

    async def _send_start(
        self, ws: ClientConnection, reservation: Reservation, start: protocol.Start, *, base: int, generation: int
    ) -> _WorkerSession | _Refusal:
        """Send Start and wait for Ready."""
        worker = reservation.worker_id
        try:
            await ws.send(protocol.encode(start))
            async with asyncio.timeout(self._connect_timeout_s):
                while True:
                    message = await ws.recv()
                    if isinstance(message, bytes):
                        logger.warning("call %s: audio before ready from worker %s, ignored", self.call_id, worker)
                        continue
                    reply = protocol.decode_server(message)
                    if isinstance(reply, protocol.Ready):
                        return _WorkerSession(
                            ws=ws, reservation=reservation, ready=reply, base=base, generation=generation
                        )
                    if isinstance(reply, protocol.Error):
                        return _refusal_for(reply, worker)
                    if isinstance(reply, protocol.Ended):
                        return _Refusal(
                            EndReason.WORKER_LOST, f"worker {worker} ended the session before ready: {reply.reason}"
                        )
                    if isinstance(reply, protocol.Move):
                        return _Refusal(EndReason.WORKER_LOST, f"worker {worker} is draining ({reply.reason})")
        except TimeoutError:
            return _Refusal(
                EndReason.WORKER_LOST,
                f"worker {worker} sent no ready within {self._connect_timeout_s:g} s",
                report=True,
            )
        except ConnectionClosed as exc:
            return _Refusal(EndReason.WORKER_LOST, f"worker {worker} closed before ready: {exc}", report=True)
        except protocol.ProtocolError as exc:
            return _Refusal(EndReason.ERROR, f"worker {worker} sent a bad message: {exc}", final=True)
        return _Refusal(EndReason.ERROR, f"worker {worker}: no ready")  # not reached: the loop returns

    async def _receive(self, session: _WorkerSession) -> _Loss | None:
        """The session's messages until it stops serving: a _Loss (the call may move), or None
        (ended by us, or failed for good: `_fail` was called)."""
        ws = session.ws
        try:
            async for message in ws:
                if isinstance(message, bytes):
                    self._take_bot_frame(session, message)
                    continue
                try:
                    reply = protocol.decode_server(message)
                except protocol.ProtocolError as exc:
                    logger.warning("call %s: ignoring a bad message from the worker: %s", self.call_id, exc)
                    continue
                if isinstance(reply, protocol.Text):
                    if session.base + reply.frame >= session.replay_until:  # frame: the session's output index
                        await self._push_text(reply.text)
                elif isinstance(reply, protocol.Move):
                    logger.info("call %s: worker %s asks to move the call (%s)",
                                self.call_id, session.worker_id, reply.reason)
                    session.move.set()
                elif isinstance(reply, protocol.Error):
                    if self._closing:
                        return None
                    if reply.code in ("shutting_down", "internal", "busy"):
                        return _Loss(
                            "worker_error",
                            f"worker refused the session ({reply.code}): {reply.message}",
                            report=reply.code == "internal",
                        )
                    await self._fail(*_error_reason(reply))
                    return None
                elif isinstance(reply, protocol.Ended):
                    if self._closing:
                        return None
                    return _Loss("worker_ended", f"worker ended the session: {reply.reason}", report=False)
        except ConnectionClosed as exc:
            if self._closing:
                return None
            if session.lost_reason == "heartbeat_lapsed":
                return _Loss("heartbeat_lapsed", f"worker {session.worker_id} missed its heartbeat")
            return _Loss("connection_lost", f"worker connection lost: {exc}")
        if self._closing:
            return None
        if session.lost_reason == "heartbeat_lapsed":
            return _Loss("heartbeat_lapsed", f"worker {session.worker_id} missed its heartbeat")
        return _Loss("connection_lost", "worker connection closed")

    async def _watch_heartbeat(self) -> None:
        """Cut the serving worker's connection once its heartbeat has lapsed (the receive loop
        then moves the call). Redis trouble is logged and the check tried again."""
        router = self._router
        if router is None:
            return
        while True:
            await asyncio.sleep(self._heartbeat_check_s)
            session = self._session
            if session is None or session.paused or session.lost_reason is not None:
                continue
            try:
                lapsed = await router.lapsed(session.worker_id)
            except Exception as exc:  # the check is advisory: a Redis hiccup must not end the call
                logger.warning("call %s: heartbeat check of %s failed: %r", self.call_id, session.worker_id, exc)
                continue
            if lapsed and self._session is session:
                logger.warning("call %s: worker %s missed its heartbeat", self.call_id, session.worker_id)
                session.lost_reason = "heartbeat_lapsed"
                session.ws.transport.abort()

    async def _report(self, worker_id: str, detail: str) -> None:
        if self._router is None:
            return
        try:
            await self._router.report_failure(worker_id, detail)
        except Exception as exc:  # routing hint only: the call goes on without it
            logger.warning("call %s: could not report worker %s: %r", self.call_id, worker_id, exc)

    async def _fail(self, reason: EndReason, detail: str) -> None:
        """The session cannot go on: record why, tell the app, push an ErrorFrame upstream."""
        if self._closing:
            logger.info("call %s: %s (while ending)", self.call_id, detail)
            return
        if self.end_reason is None:
            self.end_reason = reason
            self.error = detail
        await self._call_event_handler("on_session_ended", reason.value, detail)
        await self.push_error(f"call {self.call_id}: {detail}", force_treat_as_permanent=True)

    # ------------------------------------------------------------------ worker -> caller
    def _take_bot_frame(self, session: _WorkerSession, data: bytes) -> None:
        index = session.base + session.answers  # the caller frame this answers
        session.answers += 1
        self._send_wake.set()  # the window moved
        try:
            pcm, tokens = protocol.unpack_bot_frame(data)
        except protocol.ProtocolError as exc:
            logger.warning("call %s: ignoring a bot frame: %s", self.call_id, exc)
            return
        self.tape.add_answer(index, tokens)
        if index < self.tape.answered:
            self.stats.frames_replayed += 1  # the old worker's answer was heard already
            return
        self.tape.answered = index + 1
        self.stats.frames_received += 1
        audio = self._out_resampler.process_pcm16(pcm)
        if len(self._out_queue) >= self._output_queue_frames:
            self._out_queue.popleft()  # drop the oldest: latency stays bounded
            self.stats.frames_dropped += 1
        self._out_queue.append((audio, session.generation))
        self._out_ready.set()

    async def _pace_output(self) -> None:
        """Push one bot frame per 80 ms at most; never catch up after a stall."""
        due: float | None = None
        generation = 0
        last_end: float | None = None  # when the last pushed frame has played out
        while True:
            while not self._out_queue:
                self._out_ready.clear()
                await self._out_ready.wait()
            audio, frame_generation = self._out_queue.popleft()
            now = time.monotonic()
            if due is None or now >= due:
                due = now
            else:
                await asyncio.sleep(due - now)
            due += protocol.FRAME_SECONDS
            await self.push_frame(SpeechOutputAudioRawFrame(audio=audio, sample_rate=self._out_rate, num_channels=1))
            pushed = time.monotonic()
            self.stats.frames_out += 1
            if frame_generation != generation:
                generation = frame_generation
                gap_ms = max(0.0, (pushed - last_end) * 1000) if last_end is not None else None
                await self._tell_changes(up_to=generation, gap_ms=gap_ms)
            last_end = pushed + protocol.FRAME_SECONDS
            if self.first_audio_at is None:
                self.first_audio_at = pushed
                await self._call_event_handler("on_first_audio")

    async def _tell_changes(self, *, up_to: int, gap_ms: float | None) -> None:
        """on_worker_changed for every change up to generation `up_to` (the last one with the gap)."""
        for generation in sorted(g for g in self._changes if g <= up_to):
            change = self._changes.pop(generation)
            if generation == up_to:
                change = dataclasses.replace(change, gap_ms=gap_ms)
            await self._call_event_handler("on_worker_changed", change)

    async def _push_text(self, text: str) -> None:
        if not text:
            return
        frame = TTSTextFrame(text, text_type=TextType.WORD)
        frame.includes_inter_frame_spaces = True
        self.stats.texts += 1
        await self.push_frame(frame)

    # ------------------------------------------------------------------ teardown
    async def _shutdown(self, *, reason: str, graceful: bool) -> None:
        """End the worker session (End, wait briefly for Ended), stop the tasks, release the slot."""
        if self._shut_down:
            return
        self._shut_down = True
        self._closing = True
        session = self._session
        if session is not None:
            await self._end_quietly(session.ws, reason)
            recv = self._recv_task
            if graceful and recv is not None and not recv.done():
                await asyncio.wait({recv}, timeout=self._end_timeout_s)
        tasks = (
            self._sender_task, self._watch_task, self._retry_task, self._pacer_task, self._recv_task, self._session_task
        )
        for task in tasks:
            if task is not None and not task.done():
                await self.cancel_task(task)
        self._sender_task = self._watch_task = self._retry_task = None
        self._pacer_task = self._recv_task = self._session_task = None
        if self._changes:
            await self._tell_changes(up_to=max(self._changes), gap_ms=None)
        for ws in (session.ws if session is not None else None, self._candidate):
            if ws is not None:
                await _close_quietly(ws)
        await self._release_slot()

    async def _end_quietly(self, ws: ClientConnection, reason: str) -> None:
        try:
            await asyncio.wait_for(ws.send(protocol.encode(protocol.End(reason=reason))), timeout=self._end_timeout_s)
        except (ConnectionClosed, TimeoutError, OSError) as exc:
            logger.info("call %s: could not send end to the worker: %r", self.call_id, exc)

    async def _release_slot(self) -> None:
        if self._released or self._router is None:
            return
        self._released = True
        try:
            await self._router.release(self.call_id)
        except Exception:  # Redis down: the reservation expires as stale; log, don't break teardown
            logger.exception("call %s: could not release the worker slot", self.call_id)


def _refusal_for(error: protocol.Error, worker: str) -> _Refusal:
    detail = f"worker {worker} refused the session ({error.code}): {error.message}"
    if error.code == "busy":
        return _Refusal(EndReason.BUSY, detail)
    if error.code == "shutting_down":
        return _Refusal(EndReason.WORKER_LOST, detail)
    if error.code == "internal":
        return _Refusal(EndReason.WORKER_LOST, detail, report=True)
    return _Refusal(EndReason.ERROR, detail, final=True)


def _error_reason(error: protocol.Error) -> tuple[EndReason, str]:
    return EndReason.ERROR, f"worker refused the session ({error.code}): {error.message}"


def _reason_text(reason: object) -> str:
    if isinstance(reason, str) and reason:
        return reason[:100]
    return "caller_hangup"


async def _set_later(event: asyncio.Event, delay_s: float) -> None:
    await asyncio.sleep(delay_s)
    event.set()


async def _close_quietly(ws: ClientConnection) -> None:
    try:
        await ws.close()
    except (OSError, WebSocketException) as exc:
        logger.info("closing the worker connection: %r", exc)
