"""One call on the gateway, from its media connection to its final record: the call lifecycle that
every channel (Twilio media streams, WebRTC peers) goes through.

A channel (app/gateway/twilio.py, app/gateway/webrtc.py) admits a call with its own checks,
resolves the call's `Persona` once, and hands over a `Channel`: what is specific to it (building
the transport and pipeline, telling the caller's side why the call ended, closing the
connection). The rest happens here, the same way for every channel:

    open_call       record connecting -> PersonaPlexService for the persona, followed by the
                    session -> the channel's pipeline -> registered live (`state.sessions`)
    CallSession.run the pipeline until the call ends -> final record -> unregistered -> metrics
                    -> the channel's connection closed

The persona gives the call's max duration, its worker Start and (Twilio) its transfer number.

Record: connecting (open_call) -> active on the worker's Ready -> ended:
      the caller hung up                completed, caller_hangup
      persona's max_call_seconds        completed, max_duration
      the caller asked for a person     transferring (after-stream TwiML completes it, transfer)
      worker lost / refused / busy      failed, worker_lost / error / busy
      the caller's side vanished        failed, error ("closed without a stop message")
      the gateway shut down             failed, error

A call whose worker is lost or drains moves to another one (PersonaPlexService does it through the
gateway's router): the record stays active, gets the new worker_id/slot and worker_changes, and an
event `worker_changed` (old_worker, new_worker, reason, gap_ms, next_frame, resumed_frames). Only
when no worker can take it over does it end failed, worker_lost.

Ending the pipeline: a call that ends with a reason (any of the above but a vanished caller) gets
an `EndFrame`: the service sends `protocol.End` with the reason and waits briefly for the worker's
`Ended`, the output transport plays out what it holds, the connection closes. Only when that takes
longer than END_TIMEOUT_S, when the caller's side vanished (nothing left to play to), or when the
gateway task itself is cancelled, is the pipeline cancelled.

Redis writes (transitions, DTMF, marks, the bot's text, timings, the final record) go through the
gateway's `StateWriter` (app/gateway/writes.py), in order, off the media path; while Redis is
unreachable the call goes on and its writes wait in the writer's bounded queue (the bot's text
and marks are what a full queue drops first). A call that ends during an outage is finished
(unregistered, connection closed) after FINAL_WRITE_WAIT_S; its final record is written when
Redis is back.
Records: pickup_ms (stream start -> first bot audio pushed), prefill_ms (from Ready),
first_audio_ms (Ready -> first bot audio pushed), frames_in/out/dropped (80 ms frames).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from pipecat.frames.frames import EndFrame
from pipecat.pipeline.worker import PipelineWorker
from pipecat.workers.runner import WorkerRunner

from app import protocol
from app.callstate import TERMINAL, CallStatus, CallStore, EndReason, InvalidTransition, Reservation
from app.gateway.state import GatewayState
from app.personas import Persona
from app.pipecat.service import PersonaPlexService, WorkerChange

logger = logging.getLogger(__name__)

_COMPLETED_REASONS = frozenset({EndReason.CALLER_HANGUP, EndReason.MAX_DURATION, EndReason.TRANSFER})
_DROPPABLE = frozenset({"text", "mark"})  # events a full write queue may drop (never status or DTMF)
FINAL_WRITE_WAIT_S = 5.0  # how long a call's end waits for its final record to be written
END_TIMEOUT_S = 3.0  # an EndFrame's way through the pipeline (End/Ended, play-out, close), then cancel

Op = Callable[[], Awaitable[Any]]


class Channel(Protocol):
    """What a kind of call connection provides to the lifecycle (one instance per call)."""

    name: str  # "twilio" | "webrtc", for logs
    output_chunk_s: float  # the output transport's chunk: the service's playout trim cuts whole ones

    def build(self, call: CallSession, service: PersonaPlexService) -> PipelineWorker:
        """The call's transport and pipeline around `service`, its events wired to `call`."""
        ...

    def ended(self, reason: EndReason) -> None:
        """The call is ending for `reason` (told once, the first reason given)."""
        ...

    async def close(self) -> None:
        """Close the connection to the caller's side (once the record is final)."""
        ...


async def open_call(
    state: GatewayState,
    channel: Channel,
    *,
    call_id: str,
    persona: Persona,
    started_at: float,
    reservation: Reservation | None = None,
    **connecting: Any,
) -> CallSession | None:
    """Move the record to connecting (with the `connecting` fields), build the call and register it live.

    None when the call did not start: the record could not move to connecting (it is another
    stream's, or ended meanwhile: it is left alone), or the pipeline could not be built (the record
    ends failed, error). The reservation passed in is released then; closing the channel's
    connection is the caller's. Call-state (Redis) errors propagate.
    """
    try:
        await state.store.transition(call_id, CallStatus.CONNECTING, **connecting)
    except InvalidTransition as exc:
        logger.warning("call %s: %s", call_id, exc)
        if reservation is not None:
            await state.store.release_slot(call_id)
        return None
    call = CallSession(state=state, channel=channel, call_id=call_id, persona=persona, started_at=started_at)
    try:
        service = state.new_service(call_id, persona, reservation, output_chunk_s=channel.output_chunk_s)
        call.attach(service)
        call.worker = channel.build(call, service)
    except Exception as exc:  # the call cannot start: its record must still end and the slot come back
        logger.exception("call %s: could not build the %s pipeline", call_id, channel.name)
        await fail_call(state.store, call_id, EndReason.ERROR, f"could not build the pipeline: {exc!r}")
        if reservation is not None:
            await state.store.release_slot(call_id)
        return None
    state.sessions[call_id] = call
    return call


class CallSession:
    """One live call: runs its pipeline and keeps its Redis record in step (module docstring)."""

    def __init__(
        self,
        *,
        state: GatewayState,
        channel: Channel,
        call_id: str,
        persona: Persona,
        started_at: float | None = None,
    ) -> None:
        self.call_id = call_id
        self.persona = persona
        self.channel = channel
        self.store: CallStore = state.store
        self.metrics = state.metrics
        self._state = state
        self.max_seconds = float(persona.max_call_seconds)
        self.started_at = started_at if started_at is not None else time.monotonic()  # stream start
        self.end_reason: EndReason | None = None
        self.error: str | None = None
        self.service: PersonaPlexService | None = None
        self.worker: PipelineWorker | None = None
        self._end_requested = asyncio.Event()
        self._writer = state.writer
        self.finished = asyncio.Event()

    # ---------------------------------------------------------------- called from the pipeline
    def request_end(self, reason: EndReason | None, error: str | None = None) -> None:
        """End the call; the first reason given wins (None: the caller's side went away unannounced)."""
        if reason is not None and self.end_reason is None:
            self.end_reason = reason
            self.error = error
            logger.info("call %s: ending (%s)%s", self.call_id, reason.value, f": {error}" if error else "")
            self.channel.ended(reason)
        self._end_requested.set()

    def _write(self, op: Op, what: str, *, droppable: bool = False) -> asyncio.Future[bool]:
        return self._writer.submit(op, call_id=self.call_id, what=what, droppable=droppable)

    def note_event(self, kind: str, **data: Any) -> None:
        """Append an event to the call's stream (written in order by the gateway's writer; the
        bot's text and marks are the writes a full queue may drop)."""
        self._write(
            lambda: self.store.add_event(self.call_id, kind, **data), f"{kind} event", droppable=kind in _DROPPABLE
        )

    def note_text(self, text: str) -> None:
        self.note_event("text", text=text)

    @property
    def frames_dropped(self) -> int:
        return self.service.stats.frames_dropped if self.service is not None else 0

    def attach(self, service: PersonaPlexService) -> None:
        """Follow the service's session: Ready -> active, first audio -> pickup, failures -> end."""
        self.service = service

        @service.event_handler("on_ready")
        async def _on_ready(_service: PersonaPlexService, ready: protocol.Ready) -> None:
            self._write(
                lambda: self.store.transition(
                    self.call_id,
                    CallStatus.ACTIVE,
                    worker_id=ready.worker_id,
                    slot=ready.slot,
                    prefill_ms=ready.prefill_ms,
                ),
                "connecting -> active",
            )

        @service.event_handler("on_first_audio")
        async def _on_first_audio(svc: PersonaPlexService) -> None:
            if svc.first_audio_at is None:
                return
            pickup_s = svc.first_audio_at - self.started_at
            self.metrics.pickup.observe(pickup_s)
            first_audio_ms = (svc.first_audio_at - svc.ready_at) * 1000 if svc.ready_at is not None else None
            logger.info("call %s: first bot audio %.0f ms after the stream started", self.call_id, pickup_s * 1000)
            self._write(
                lambda: self.store.update(
                    self.call_id, pickup_ms=round(pickup_s * 1000, 1), first_audio_ms=_round(first_audio_ms)
                ),
                "pickup timings",
            )

        @service.event_handler("on_worker_changed")
        async def _on_worker_changed(svc: PersonaPlexService, change: WorkerChange) -> None:
            self.metrics.worker_changes.labels(change.reason).inc()
            if change.gap_ms is not None:
                self.metrics.worker_change_gap.observe(change.gap_ms / 1000)
            logger.info(
                "call %s: moved from worker %s to %s (%s), caller gap %s ms",
                self.call_id, change.old_worker, change.new_worker, change.reason,
                "?" if change.gap_ms is None else f"{change.gap_ms:.0f}",
            )
            changes = svc.stats.worker_changes
            self.note_event(
                "worker_changed",
                old_worker=change.old_worker,
                new_worker=change.new_worker,
                reason=change.reason,
                gap_ms=_round(change.gap_ms),
                next_frame=change.next_frame,
                resumed_frames=change.resumed_frames,
            )
            self._write(
                lambda: self.store.update(
                    self.call_id, worker_id=change.new_worker, slot=change.slot, worker_changes=changes
                ),
                "worker change",
            )

        @service.event_handler("on_session_ended")
        async def _on_session_ended(_service: PersonaPlexService, reason: str, detail: str) -> None:
            self.request_end(EndReason(reason), detail)

    # ---------------------------------------------------------------- running
    async def run(self) -> None:
        """Run the call to its end: the pipeline, the final record, then unregister and close."""
        try:
            if self.worker is None:
                raise RuntimeError(f"call {self.call_id} has no pipeline (use open_call)")
            await self._run_pipeline(self.worker)
        finally:
            if self._state.sessions.get(self.call_id) is self:
                del self._state.sessions[self.call_id]
            self.metrics.frames_dropped_finished += self.frames_dropped
            await self.channel.close()

    async def _run_pipeline(self, worker: PipelineWorker) -> None:
        """Run the pipeline until the call ends, end it (module docstring), write the final record."""
        runner = WorkerRunner(handle_sigint=False, handle_sigterm=False)
        await runner.add_workers(worker)
        run_task = asyncio.create_task(runner.run(), name=f"call-{self.call_id}-pipeline")
        ended = asyncio.create_task(self._end_requested.wait(), name=f"call-{self.call_id}-end")
        try:
            done, _ = await asyncio.wait(
                {run_task, ended}, timeout=self.max_seconds, return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                self.request_end(EndReason.MAX_DURATION)
            if not run_task.done():
                await self._end(worker, run_task)
            await run_task
        except asyncio.CancelledError:
            logger.warning("call %s: session cancelled (gateway shutting down?)", self.call_id)
            self.request_end(EndReason.ERROR, "gateway shut down during the call")
            await worker.cancel(reason="shutdown")
            raise
        except Exception as exc:
            logger.exception("call %s: pipeline failed", self.call_id)
            self.request_end(EndReason.ERROR, f"pipeline failed: {exc!r}")
        finally:
            ended.cancel()
            await asyncio.shield(self._finish())

    async def _end(self, worker: PipelineWorker, run_task: asyncio.Task) -> None:
        """End the running pipeline: an EndFrame for a call that ends with a reason, bounded by
        END_TIMEOUT_S; a cancel when the caller's side vanished or the EndFrame took too long."""
        reason = self.end_reason
        if reason is None:  # the caller's side is gone: there is nothing left to play out to
            await worker.cancel(reason=EndReason.CALLER_HANGUP.value)
            return
        await worker.queue_frame(EndFrame(reason=reason.value))
        done, _ = await asyncio.wait({run_task}, timeout=END_TIMEOUT_S)
        if not done:
            logger.warning(
                "call %s: the pipeline did not end within %.0f s, cancelling it", self.call_id, END_TIMEOUT_S
            )
            await worker.cancel(reason=reason.value)

    async def _finish(self) -> None:
        service = self.service
        stats = service.stats if service is not None else None
        if service is not None and self.end_reason is None and service.end_reason is not None:
            self.end_reason, self.error = service.end_reason, service.error
        if self.end_reason is None:
            self.end_reason, self.error = EndReason.ERROR, "media stream closed without a stop message"
        status = CallStatus.COMPLETED if self.end_reason in _COMPLETED_REASONS else CallStatus.FAILED
        reason, error = self.end_reason, self.error
        fields: dict[str, Any] = {}
        if stats is not None:
            fields = {
                "frames_in": stats.frames_in,
                "frames_out": stats.frames_out,
                "frames_dropped": stats.frames_dropped,
            }
            if stats.worker_changes:
                fields["worker_changes"] = stats.worker_changes
            if stats.failed_moves:
                self.metrics.worker_change_failures.inc(stats.failed_moves)
            self.metrics.playout_resyncs.inc(stats.playout_resyncs)
            self.metrics.playout_restarts.inc(stats.playout_restarts)
            self.metrics.playout_trimmed.inc(stats.playout_trimmed_ms / 1000)
            self.metrics.backlog_dropped.inc(stats.backlog_dropped)

        async def final_record() -> None:
            if reason == EndReason.TRANSFER:
                # The bot leaves; Twilio asks <Connect action> next, which dials and completes the record.
                await self.store.transition(self.call_id, CallStatus.TRANSFERRING, **fields)
            elif await self.store.end_call(self.call_id, status, reason, error=error, **fields) is not None:
                self.metrics.calls.labels(status.value, reason.value).inc()
            await self.store.release_slot(self.call_id)

        written = self._write(final_record, f"final record ({status.value}, {reason.value})")
        try:
            done, _ = await asyncio.wait({written}, timeout=FINAL_WRITE_WAIT_S)
            if not done:
                logger.warning(
                    "call %s: its final record is not written yet (redis unreachable?); it will be once redis is back",
                    self.call_id,
                )
            logger.info(
                "call %s (%s): %s (%s)%s%s",
                self.call_id,
                self.channel.name,
                "transferring" if reason == EndReason.TRANSFER else status.value,
                reason.value,
                f" frames {fields}" if fields else "",
                f", playout re-syncs {stats.playout_resyncs}, clock restarts {stats.playout_restarts}" if stats else "",
            )
        finally:
            self.finished.set()


async def fail_call(store: CallStore, call_id: str, reason: EndReason, error: str) -> None:
    """End a call that never got a media session (logged; a record already ended is left alone)."""
    try:
        record = await store.get_call(call_id)
        if record is not None and record.status not in TERMINAL:
            await store.end_call(call_id, CallStatus.FAILED, reason, error=error)
    except Exception:
        logger.exception("call %s: could not record the failure (%s)", call_id, error)


def _round(value: float | None) -> float | None:
    return round(value, 1) if value is not None else None
