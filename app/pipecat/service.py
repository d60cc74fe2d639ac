"""PersonaPlexService: a Pipecat service that talks to a PersonaPlex worker over `WS /v1/session`.

Put it between a transport's input and output, like any speech-to-speech service:

    Pipeline([transport.input(), PersonaPlexService(...), transport.output()])

- On `StartFrame` it gets a worker from its `WorkerRouter` (unless it was given a `Reservation`),
  connects, sends `protocol.Start` and waits for `protocol.Ready` (app/pipecat/worker_link.py).
  A worker that cannot be reached or refuses (busy, shutting down) is reported to the router and
  the next one is tried; none left: `busy` (none had a slot) or `worker_lost`.
- `InputAudioRawFrame`s (any sample rate, mono or interleaved) become exact 80 ms frames at 24 kHz
  (app/pipecat/caller_frames.py), sent from a bounded queue (`send_queue_frames`, the oldest
  dropped), at most `max_in_flight_frames` unanswered at the worker. Caller audio before the
  first `Ready` is not sent. Where the frames are cut follows the worker's tick grid (its
  `protocol.Timing` reports; app/pipecat/tick_align.py), so a frame waits there 8-28 ms for its
  tick, not 0-80 ms.
- Each played frame's server-added latency (gateway in, worker, gateway out) is handed to
  `on_latency` (app/pipecat/latency.py).
- Every bot frame (`protocol.unpack_bot_frame`) is converted to the pipeline's output rate and
  pushed downstream as `SpeechOutputAudioRawFrame` when the `OutputPacer` says it is due: the
  pacer is the one real-time clock of the bot's audio (app/pipecat/pacer.py says why it is here
  and what the Twilio and WebRTC output transports do instead). It holds a small playout target
  (`playout_target_frames`) and re-syncs to it, so a late frame's latency never stays; a burst
  beyond `output_queue_frames` is dropped; a delay that stands (frames that all wait for their due
  time) is cut out of the audio, in a pause when it can (app/pipecat/playout_trim.py). Drops,
  re-syncs and cuts are counted in `SessionStats`.
  The frame's tokens go to the call's `CallTape` (app/pipecat/tape.py).
- The model's text is pushed downstream as `TTSTextFrame`s (word pieces, spaces included).
- Full duplex: no VAD, no interruption frames, nothing cleared when the caller speaks.

Moving a call (needs a router). The tape keeps the call's complete frames (at most
MAX_RESUME_FRAMES) and the caller frames it may have to send again. When the worker's connection
drops, its heartbeat lapses (`WorkerRouter.lapsed`, checked every `heartbeat_check_s`), it
answers none of the frames it holds for `answer_timeout_s` (alive but wedged, or a silent network
break), it ends or fails the session, or it sends `protocol.Move` (draining), the service asks the router for
another worker (avoiding the old one; a lost one is reported), connects with `Start(resume=...)`
(the seed from the old `Ready`) and swaps the connection under its running sender and pacer:
answers to caller frames the caller already heard are dropped, the caller frames since the
resume point are sent again, and the pipeline notices nothing but a short gap. On a Move the old
worker keeps serving until the new one is found and connected; with no worker free it keeps
serving and the move is tried again. With the old one gone and no worker within
`failover_timeout_s`, the call fails with `worker_lost`.

Ending:
- `EndFrame` (a clean end: the caller hung up, max duration, transfer) sends `protocol.End` with
  the frame's reason, waits up to `end_timeout_s` for the worker's `Ended` (the worker then logs
  the session as ended, not aborted), closes the connection and releases the slot.
- `CancelFrame` (the caller's side vanished, the gateway shuts down, or an end took too long)
  sends `End` too, but does not wait for `Ended`.
- Failures travel upstream as `ErrorFrame`s (`force_treat_as_permanent`, so the pipeline worker's
  `processor_unusable_policy` applies) and set `end_reason` (busy, worker_lost, error).

The service knows workers only through `WorkerRouter` (app/pipecat/router.py): no Redis here.

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
from collections.abc import Callable
from dataclasses import dataclass

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
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from app import protocol
from app.callstate import EndReason, Reservation
from app.pipecat.audio import FrameResampler
from app.pipecat.caller_frames import CallerFrames, StandingBacklog
from app.pipecat.latency import RECEIVED_AT, FrameLatency, LatencyTrace
from app.pipecat.pacer import OutputPacer
from app.pipecat.playout_trim import PlayoutTrim
from app.pipecat.router import WorkerRouter
from app.pipecat.tape import CallTape
from app.pipecat.tick_align import TickAligner
from app.pipecat.worker_link import Loss, Refusal, WorkerLink, WorkerSession, close_quietly

logger = logging.getLogger(__name__)

MODEL_NAME = "personaplex-7b"
_RESERVE_RETRY_S = 0.25  # while looking for a worker and none has a free slot
_MOVE_RETRY_S = 1.0  # a Move that found no worker is tried again after this long
_SILENCE = bytes(protocol.FRAME_BYTES)
BUSY_GRACE_S = 1.0  # a worker that says busy for a slot reserved there is asked again this long
_BUSY_RETRY_S = 0.05
LOOP_LAG_S = 0.25  # the worker watch woke this much late: the gateway's loop was starved, not the worker


def credited_answer_at(*, now: float, asleep_at: float, period_s: float, last_answer_at: float) -> float:
    """The time of a worker's last answer as the stall check may count it. When the watch that
    slept `period_s` from `asleep_at` wakes more than LOOP_LAG_S late, this event loop itself was
    starved (an overloaded gateway): answers may be waiting unread, so the silence says nothing of
    the worker, which is credited with an answer one period ago."""
    if now - asleep_at > period_s + LOOP_LAG_S:
        return max(last_answer_at, now - period_s)
    return last_answer_at

__all__ = ["PersonaPlexService", "SessionStats", "WorkerChange", "WorkerRouter"]


@dataclass
class SessionStats:
    """Counters of one call, in 80 ms frames (over all the workers it used)."""

    frames_in: int = 0  # caller frames sent to a worker (not counting those sent again after a move)
    frames_received: int = 0  # bot frames received that the caller had not heard yet
    frames_out: int = 0  # bot frames pushed downstream
    frames_dropped: int = 0  # bot frames never pushed: beyond the output queue, re-synced away, or cut whole
    playout_resyncs: int = 0  # times the pacer dropped frames to get back to its playout target
    playout_restarts: int = 0  # times the pacer's clock restarted: a bot frame came too late to keep time
    playout_trimmed_ms: float = 0.0  # bot audio cut to take a standing delay out (app/pipecat/playout_trim.py)
    input_frames_dropped: int = 0  # caller frames not sent: the send queue was full, stale after a move, or a backlog
    backlog_dropped: int = 0  # of those, left unsent because they stood in the send queue (StandingBacklog)
    align_shifts: int = 0  # times the caller's framing moved to the worker's tick (app/pipecat/tick_align.py)
    align_dropped_ms: float = 0.0  # caller audio dropped by those shifts
    align_inserted_ms: float = 0.0  # silence inserted by them
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
    reason: str  # connection_lost | heartbeat_lapsed | worker_stalled | worker_ended | worker_error | draining
    next_frame: int  # the call frame the new worker resumed at
    resumed_frames: int  # complete frames sent in Start.resume
    slot: int
    gap_ms: float | None = None  # caller-side silence between the two workers' audio (None: not known)


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
        playout_target_frames: int = 1,
        send_queue_frames: int = 8,
        max_in_flight_frames: int = 3,
        connect_timeout_s: float = 10.0,
        end_timeout_s: float = 1.0,
        failover_timeout_s: float = 5.0,
        heartbeat_check_s: float = 1.0,
        answer_timeout_s: float = 2.0,
        frame_align: bool = True,
        output_chunk_s: float = 0.020,
        on_latency: Callable[[FrameLatency], None] | None = None,
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
        output_queue_frames: bot 80 ms frames buffered toward the caller before dropping (a burst).
        playout_target_frames: bot frames that may wait behind the one being played before the
            pacer re-syncs (drops the oldest); at most output_queue_frames - 1.
        send_queue_frames: caller 80 ms frames buffered toward the worker before dropping.
        max_in_flight_frames: caller frames a worker may hold unanswered (at most its own queue, so
            it never drops one: frames are numbered by the order they were sent).
        connect_timeout_s: limit for connecting and for the worker's Ready.
        end_timeout_s: how long EndFrame waits for the worker's Ended.
        failover_timeout_s: how long a call whose worker is gone looks for another one.
        heartbeat_check_s: how often the serving worker's heartbeat is checked (0: never).
        answer_timeout_s: a worker that answers none of the caller frames it holds for this long
            (its host is alive, its engine wedged, or the network between us silently lost) is
            treated as lost and the call moves (checked with the heartbeat).
        frame_align: cut the caller's frames so that each is complete just before the worker's
            tick, from the worker's `protocol.Timing` reports (app/pipecat/tick_align.py).
        output_chunk_s: the output transport's chunk (it sends whole chunks only, holding a partial
            one back for the next frame): the playout trim cuts whole chunks of the bot's frames.
        on_latency: told each played frame's latency per segment (app/pipecat/latency.py); keep it cheap.
        audio_passthrough: also push the caller's InputAudioRawFrames downstream.
        """
        if router is None and reservation is None:
            raise ValueError("PersonaPlexService needs a WorkerRouter to get a worker, or a Reservation")
        if output_queue_frames < 1 or send_queue_frames < 1 or max_in_flight_frames < 1:
            raise ValueError("output_queue_frames, send_queue_frames and max_in_flight_frames must be >= 1")
        chunks = protocol.FRAME_SECONDS / output_chunk_s if output_chunk_s > 0 else 0.0
        if chunks < 1 or abs(chunks - round(chunks)) > 1e-6:
            raise ValueError(f"output_chunk_s must divide a {protocol.FRAME_SECONDS} s frame, got {output_chunk_s}")
        super().__init__(settings=ServiceSettings(model=MODEL_NAME), **kwargs)
        self.call_id = call_id
        self.persona = persona
        self._router = router
        self._reservation = reservation
        self._sampling = sampling or protocol.Sampling()
        self._output_sample_rate = output_sample_rate
        self._max_in_flight = max_in_flight_frames
        self._failover_timeout_s = failover_timeout_s
        self._heartbeat_check_s = heartbeat_check_s
        self._answer_timeout_s = answer_timeout_s
        self._audio_passthrough = audio_passthrough
        self._link = WorkerLink(
            call_id=call_id, worker_token=worker_token, connect_timeout_s=connect_timeout_s, end_timeout_s=end_timeout_s
        )

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
        self._session: WorkerSession | None = None
        self._candidate: ClientConnection | None = None  # a worker being connected during a move
        self._session_task: asyncio.Task | None = None
        self._recv_task: asyncio.Task | None = None
        self._pacer_task: asyncio.Task | None = None
        self._sender_task: asyncio.Task | None = None
        self._watch_task: asyncio.Task | None = None
        self._retry_task: asyncio.Task | None = None  # a Move tried again later
        self._pacer: OutputPacer[tuple[bytes, int, int]] = OutputPacer(  # (audio, generation, call frame index)
            capacity=output_queue_frames, target_frames=playout_target_frames
        )
        self._caller = CallerFrames(send_queue_frames)
        self._backlog = StandingBacklog()
        self._aligner = TickAligner() if frame_align else None
        self._trim = PlayoutTrim(step_s=output_chunk_s)
        self._latency = LatencyTrace()
        self._on_latency = on_latency
        self._send_wake = asyncio.Event()
        self._changes: dict[int, WorkerChange] = {}  # generation -> change not yet told
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
        self._pacer_task = self.create_task(self._play_out(), name=f"{self}::pacer")
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
        arrived_at = frame.metadata.get(RECEIVED_AT) or time.monotonic()
        queued, dropped = self._caller.add(frame.audio, frame.sample_rate, frame.num_channels, arrived_at)
        self.stats.input_frames_dropped += dropped
        if queued:
            self._send_wake.set()

    async def _send_audio(self) -> None:
        """Caller frames to the serving worker in call-frame order: first those a new worker must
        get again (from the tape), then new ones. Never more than max_in_flight unanswered: the
        worker's queue holds that many, so it never drops one (frames are numbered by the order
        they were sent: a frame dropped there would shift every later answer onto the wrong
        frame). While the worker is behind (a stall) the frames wait here, in the bounded send
        queue, and go as its answers come; a worker that answers nothing is moved off by the
        answer timeout."""
        while True:
            session = self._session
            if session is None or session.paused or session.broken:
                await self._wait_send()
                continue
            if session.next_send >= self.tape.sent and not self._caller:
                await self._wait_send()
                continue
            if self._window_full(session):
                await self._wait_send()  # an answer (or a new session) opens the window
                continue
            resend = session.next_send < self.tape.sent
            arrived_at = None
            if resend:
                pcm = self.tape.caller(session.next_send)
                if pcm is None:
                    logger.warning(
                        "call %s: caller frame %d is no longer kept, sending silence", self.call_id, session.next_send
                    )
                    pcm = _SILENCE
            else:
                pcm, arrived_at = self._caller.pop()
                if self._backlog.take(pcm, waiting=len(self._caller)):
                    self.stats.backlog_dropped += 1
                    self.stats.input_frames_dropped += 1
                    logger.debug("call %s: a caller frame left unsent: a backlog stood in the send queue", self.call_id)
                    continue
                self.tape.add_caller(pcm)
            index = session.next_send
            session.next_send += 1
            session.last_send_at = time.monotonic()
            if arrived_at is not None:
                self._latency.sent(index, arrived_at, session.last_send_at)
            try:
                await session.ws.send(pcm)
            except ConnectionClosed:
                session.broken = True  # the receive loop reports the loss; the frame is on the tape
                continue
            if resend:
                self.stats.frames_resent += 1
            else:
                self.stats.frames_in += 1

    def _window_full(self, session: WorkerSession) -> bool:
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
                self._watch_task = self.create_task(self._watch_worker(), name=f"{self}::watch")
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
                    await close_quietly(self._session.ws)
                await self._release_slot()

    async def _follow(self, session: WorkerSession) -> None:
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
                    logger.warning(
                        "call %s: worker %s asks to move the call, but there is no router",
                        self.call_id, session.worker_id,
                    )
                    session.move.clear()
                    continue
                new = await self._move(session, recv, Loss("draining", "the worker is draining", report=False))
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

    async def _receive(self, session: WorkerSession) -> Loss | None:
        """The session's messages until it stops serving: a Loss (the call may move), or None
        (ended by us, or failed for good: `_fail` was called)."""
        outcome = await self._link.receive(
            session,
            on_bot_frame=self._take_bot_frame,
            on_text=self._push_text,
            on_timing=self._take_timing,
            closing=lambda: self._closing,
        )
        if isinstance(outcome, Refusal):
            await self._fail(outcome.end_reason, outcome.detail)
            return None
        return outcome

    async def _first_session(self) -> WorkerSession | None:
        """Reserve and connect the call's first worker, trying the next one after a failure."""
        avoid: set[str] = set()
        reservation = self._reservation
        if reservation is None and self._router is not None:
            reservation = await self._router.reserve(self.call_id, frozenset())
        if reservation is None:
            await self._fail(EndReason.BUSY, "no worker has a free slot")
            return None
        start = protocol.Start(call_id=self.call_id, persona=self.persona, sampling=self._sampling)
        busy_until: float | None = None
        while True:
            self._reservation = reservation
            opened = await self._link.open(reservation, start, base=0, generation=0)
            if isinstance(opened, WorkerSession):
                return opened
            if opened.end_reason == EndReason.BUSY and not opened.final:
                # A slot is reserved for this call there: the worker is still freeing the slot of
                # a call that just ended (its End in flight). Ask it again for a moment first.
                busy_until = busy_until if busy_until is not None else time.monotonic() + BUSY_GRACE_S
                if time.monotonic() < busy_until:
                    await asyncio.sleep(_BUSY_RETRY_S)
                    continue
            busy_until = None
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

    async def _move(self, old: WorkerSession, old_recv: asyncio.Task | None, loss: Loss) -> WorkerSession | None:
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
        reason, last = loss.reason, loss.detail
        while True:
            if old_recv is not None and old_recv.done():  # the old worker went away meanwhile
                gone = old_recv.result()
                old_recv = None
                old.paused = True
                if gone is None:
                    return None
                reason, last = gone.reason, gone.detail
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
                    await asyncio.wait(
                        {pause} | ({old_recv} if old_recv is not None else set()), return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    pause.cancel()
                continue
            opened = await self._resume_on(reservation, old, old_recv, reason)
            if isinstance(opened, WorkerSession):
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
        self, reservation: Reservation, old: WorkerSession, old_recv: asyncio.Task | None, reason: str
    ) -> WorkerSession | Refusal:
        """Connect to `reservation`'s worker, then stop feeding `old` and resume the call there
        (`reason`: why the call moves, for the WorkerChange)."""
        ws = await self._link.connect(reservation)
        if isinstance(ws, Refusal):
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
            opened = await self._link.start(ws, reservation, start, base=base, generation=old.generation + 1)
            if isinstance(opened, Refusal):
                await close_quietly(ws)
                return opened
            if opened.ready.next_frame != base:
                logger.warning(
                    "call %s: worker %s resumed at frame %d, asked %d",
                    self.call_id, reservation.worker_id, opened.ready.next_frame, base,
                )
            if old_recv is not None:
                await self.cancel_task(old_recv)
                await self._link.end(old.ws, "moved")
            await close_quietly(old.ws)
            self._install(opened)
            installed = True
            change = WorkerChange(
                old_worker=old.worker_id,
                new_worker=reservation.worker_id,
                reason=reason,
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

    def _install(self, session: WorkerSession) -> None:
        """Make `session` the serving one: send it the caller frames from its base on, dropping
        frames that went stale while no worker served the call (only a window's worth stays)."""
        session.next_send = session.base
        session.replay_until = self.tape.answered
        if self._aligner is not None:
            self._aligner.restart()  # a new worker: a new tick grid
        pending = self.tape.sent - session.base
        self.stats.input_frames_dropped += self._caller.trim(max(1, self._max_in_flight - pending))
        self._backlog.reset()
        self._session = session
        self._send_wake.set()

    async def _watch_worker(self) -> None:
        """Cut the serving worker's connection once its heartbeat has lapsed, or once it has
        answered none of the frames it holds for `answer_timeout_s` (the receive loop then moves
        the call). Redis trouble is the router's to report; the check is tried again."""
        router = self._router
        if router is None:
            return
        while True:
            asleep_at = time.monotonic()
            await asyncio.sleep(self._heartbeat_check_s)
            now = time.monotonic()
            session = self._session
            if session is None or session.paused or session.lost_reason is not None:
                continue
            session.last_answer_at = credited_answer_at(
                now=now, asleep_at=asleep_at, period_s=self._heartbeat_check_s, last_answer_at=session.last_answer_at
            )
            waiting = session.next_send > session.base + session.answers  # frames it holds unanswered
            silent_s = now - session.last_answer_at
            if waiting and silent_s > self._answer_timeout_s:
                logger.warning(
                    "call %s: worker %s answered nothing for %.1f s", self.call_id, session.worker_id, silent_s
                )
                session.lost_reason = "worker_stalled"
                session.ws.transport.abort()
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
    def _take_timing(self, session: WorkerSession, timing: protocol.Timing) -> None:
        """Move the caller's framing toward the worker's tick (app/pipecat/tick_align.py), when the
        report is of the serving worker in a steady state (no backlog here or there)."""
        # A standing frame queued at the worker (after a stall) shows as a wait of more than a
        # tick, and is taken out like any other wait; frames still queued here are not a steady state.
        if self._aligner is None or session is not self._session or session.paused or self._caller:
            return
        shift = self._aligner.shift(wait_s=timing.wait_ms / 1000, step_s=self._caller.chunk_s, now=time.monotonic())
        if not shift:
            return
        self._caller.shift(shift)
        self.stats.align_shifts += 1
        if shift > 0:
            self.stats.align_dropped_ms += shift * 1000
        else:
            self.stats.align_inserted_ms -= shift * 1000
        logger.debug(
            "call %s: frames waited %.1f ms for worker %s's tick: framing moved %+.0f ms",
            self.call_id, timing.wait_ms, session.worker_id, shift * 1000,
        )

    def _take_bot_frame(self, session: WorkerSession, data: bytes) -> None:
        index = session.base + session.answers  # the caller frame this answers
        session.answers += 1
        session.last_answer_at = time.monotonic()
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
        self._latency.answered(index, session.last_answer_at)
        audio = self._out_resampler.process_pcm16(pcm)
        self.stats.frames_dropped += self._pacer.put((audio, session.generation, index))

    async def _play_out(self) -> None:
        """Push each bot frame downstream when the pacer says it is due (app/pipecat/pacer.py)."""
        generation = 0
        last_end: float | None = None  # when the last pushed frame has played out
        while True:
            paced = await self._pacer.next()
            if paced.dropped:
                self.stats.frames_dropped += paced.dropped
                self.stats.playout_resyncs += 1
            if paced.restarted:
                self.stats.playout_restarts += 1
                self._trim.cancel()
                logger.debug("call %s: playout clock restarted (a bot frame came late)", self.call_id)
            audio, frame_generation, index = paced.item
            if paced.lead_s is not None:
                self._trim.offer(paced.lead_s, time.monotonic())
                logger.debug(
                    "call %s: bot frames waited at least %.1f ms for playout: %.0f ms to cut",
                    self.call_id, paced.lead_s * 1000, self._trim.pending_s * 1000,
                )
            audio, cut_s = self._trim.cut(audio, self._out_rate, time.monotonic())
            if cut_s:
                self._pacer.advance(cut_s)
                self.stats.playout_trimmed_ms += cut_s * 1000
                if not audio:
                    self.stats.frames_dropped += 1
                    continue  # the whole frame went: the next one is due now
            await self.push_frame(SpeechOutputAudioRawFrame(audio=audio, sample_rate=self._out_rate, num_channels=1))
            pushed = time.monotonic()
            self.stats.frames_out += 1
            latency = self._latency.played(index, pushed)
            if latency is not None and self._on_latency is not None:
                self._on_latency(latency)
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
        """End the worker session (End; graceful: wait briefly for Ended), stop the tasks, release the slot."""
        if self._shut_down:
            return
        self._shut_down = True
        self._closing = True
        session = self._session
        if session is not None:
            await self._link.end(session.ws, reason)
            recv = self._recv_task
            if graceful and recv is not None and not recv.done():
                done, _ = await asyncio.wait({recv}, timeout=self._link.end_timeout_s)
                if not done:
                    logger.warning(
                        "call %s: worker %s sent no ended within %.1f s",
                        self.call_id, session.worker_id, self._link.end_timeout_s,
                    )
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
                await close_quietly(ws)
        await self._release_slot()

    async def _release_slot(self) -> None:
        if self._released or self._router is None:
            return
        self._released = True
        try:
            await self._router.release(self.call_id)
        except Exception as exc:  # the router's store is down: its owner releases it later; don't break teardown
            logger.warning("call %s: could not release the worker slot: %r", self.call_id, exc)


def _reason_text(reason: object) -> str:
    if isinstance(reason, str) and reason:
        return reason[:100]
    return "caller_hangup"


async def _set_later(event: asyncio.Event, delay_s: float) -> None:
    await asyncio.sleep(delay_s)
    event.set()
