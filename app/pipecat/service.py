"""PersonaPlexService: a Pipecat service that talks to a PersonaPlex worker over `WS /v1/session`.

Put it between a transport's input and output, like any speech-to-speech service:

    Pipeline([transport.input(), PersonaPlexService(...), transport.output()])

- On `StartFrame` it reserves a worker slot through Redis (`CallStore.reserve_slot`) unless it was
  given a `Reservation`, connects to the worker (`Authorization: Bearer <worker token>`), sends
  `protocol.Start` and waits for `protocol.Ready`.
- `InputAudioRawFrame`s (any sample rate, mono or interleaved) are converted whole to 24 kHz PCM16
  and cut into exact 80 ms frames for the worker. Caller audio before `Ready` is not sent.
- Every bot frame from the worker is converted to the pipeline's output rate and pushed downstream
  as `SpeechOutputAudioRawFrame`, paced in real time from a bounded queue (`output_queue_frames`):
  a stalled worker leaves nothing to catch up on, a burst beyond the queue is dropped and counted.
- The model's text is pushed downstream as `TTSTextFrame`s (word pieces, spaces included): the
  text of what the bot says, as a Pipecat TTS or speech-to-speech service reports it.
- Full duplex: no VAD, no interruption frames, nothing cleared when the caller speaks.
- Failures travel upstream as `ErrorFrame`s (`force_treat_as_permanent`, so the pipeline worker's
  `processor_unusable_policy` applies) and set `end_reason` (busy, worker_lost, error).
  `EndFrame`/`CancelFrame` send `protocol.End`, close the connection and release the slot.

Event handlers (all awaited in order, keep them short):
    on_ready(service, ready: protocol.Ready)          the worker holds a slot with the persona
    on_first_audio(service)                           the first bot frame was pushed downstream
    on_session_ended(service, reason: str, detail: str)
                                                      the session ended without us ending it
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

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
from app.callstate import CallStore, EndReason, Reservation
from app.pipecat.audio import FrameResampler, float_to_pcm16, pcm16_mono

logger = logging.getLogger(__name__)

MODEL_NAME = "personaplex-7b"


@dataclass
class SessionStats:
    """Counters of one session, in 80 ms frames."""

    frames_in: int = 0  # caller frames sent to the worker
    frames_received: int = 0  # bot frames received from the worker
    frames_out: int = 0  # bot frames pushed downstream
    frames_dropped: int = 0  # bot frames dropped: the output queue was full
    input_frames_dropped: int = 0  # caller frames not sent: the send queue was full
    texts: int = 0  # text pieces pushed downstream


class PersonaPlexService(AIService):
    """Full-duplex PersonaPlex speech-to-speech for one call (see the module docstring)."""

    def __init__(
        self,
        *,
        call_id: str,
        persona: str,
        worker_token: str,
        store: CallStore | None = None,
        reservation: Reservation | None = None,
        sampling: protocol.Sampling | None = None,
        output_sample_rate: int | None = None,
        output_queue_frames: int = 4,
        send_queue_frames: int = 8,
        connect_timeout_s: float = 10.0,
        end_timeout_s: float = 1.0,
        audio_passthrough: bool = False,
        **kwargs,
    ) -> None:
        """Args:
        call_id, persona: sent to the worker in `protocol.Start`.
        worker_token: bearer token of `WS /v1/session`.
        store: reserves (unless `reservation` is given) and releases the call's slot.
        reservation: the worker to use; without a store the caller releases its slot.
        sampling: per-call sampling overrides.
        output_sample_rate: rate of the audio pushed downstream (default: the pipeline's output rate).
        output_queue_frames: bot 80 ms frames buffered toward the caller before dropping.
        send_queue_frames: caller 80 ms frames buffered toward the worker before dropping.
        connect_timeout_s: limit for connecting and for the worker's Ready.
        end_timeout_s: how long EndFrame waits for the worker's Ended.
        audio_passthrough: also push the caller's InputAudioRawFrames downstream.
        """
        if store is None and reservation is None:
            raise ValueError("PersonaPlexService needs a CallStore to reserve a slot, or a Reservation")
        if output_queue_frames < 1 or send_queue_frames < 1:
            raise ValueError("output_queue_frames and send_queue_frames must be >= 1")
        super().__init__(settings=ServiceSettings(model=MODEL_NAME), **kwargs)
        self.call_id = call_id
        self.persona = persona
        self._worker_token = worker_token
        self._store = store
        self._reservation = reservation
        self._sampling = sampling or protocol.Sampling()
        self._output_sample_rate = output_sample_rate
        self._output_queue_frames = output_queue_frames
        self._connect_timeout_s = connect_timeout_s
        self._end_timeout_s = end_timeout_s
        self._audio_passthrough = audio_passthrough

        self.stats = SessionStats()
        self.ready: protocol.Ready | None = None
        self.end_reason: EndReason | None = None
        self.error: str | None = None
        self.started_at: float | None = None  # time.monotonic() of StartFrame
        self.ready_at: float | None = None
        self.first_audio_at: float | None = None

        self._out_rate = 0
        self._ws: ClientConnection | None = None
        self._session_task: asyncio.Task | None = None
        self._pacer_task: asyncio.Task | None = None
        self._sender_task: asyncio.Task | None = None
        self._out_queue: asyncio.Queue[bytes] = asyncio.Queue()  # bounded by hand: drop-oldest
        self._send_queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=send_queue_frames)
        self._in_resampler: FrameResampler | None = None
        self._in_buffer = np.zeros(0)  # [n] 24 kHz samples waiting to fill a frame
        self._out_resampler = FrameResampler(protocol.SAMPLE_RATE, protocol.SAMPLE_RATE)  # set in setup()
        self._closing = False
        self._shut_down = False
        self._released = False

        self._register_event_handler("on_ready", sync=True)
        self._register_event_handler("on_first_audio", sync=True)
        self._register_event_handler("on_session_ended", sync=True)

    @property
    def reservation(self) -> Reservation | None:
        """The worker slot this call holds (known once reserved)."""
        return self._reservation

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
            try:
                self._send_queue.put_nowait(chunk)
            except asyncio.QueueFull:
                self.stats.input_frames_dropped += 1

    async def _send_audio(self, ws: ClientConnection) -> None:
        while True:
            chunk = await self._send_queue.get()
            try:
                await ws.send(chunk)
            except ConnectionClosed:
                return  # the receive loop reports the loss
            self.stats.frames_in += 1

    # ------------------------------------------------------------------ worker session
    async def _run_session(self) -> None:
        ws: ClientConnection | None = None
        try:
            reservation = self._reservation
            if reservation is None and self._store is not None:
                reservation = await self._store.reserve_slot(self.call_id)
                self._reservation = reservation
            if reservation is None:
                await self._fail(EndReason.BUSY, "no worker has a free slot")
                return
            ws = await self._connect(reservation)
            if ws is None:
                return
            self._ws = ws
            await ws.send(
                protocol.encode(protocol.Start(call_id=self.call_id, persona=self.persona, sampling=self._sampling))
            )
            ready = await self._wait_ready(ws, reservation)
            if ready is None:
                return
            self.ready = ready
            self.ready_at = time.monotonic()
            logger.info(
                "call %s: worker %s slot %d ready (prefill %.1f ms)",
                self.call_id,
                ready.worker_id,
                ready.slot,
                ready.prefill_ms,
            )
            await self._call_event_handler("on_ready", ready)
            self._sender_task = self.create_task(self._send_audio(ws), name=f"{self}::sender")
            await self._receive(ws)
        except asyncio.CancelledError:
            raise
        except ConnectionClosed as exc:
            if not self._closing:
                await self._fail(EndReason.WORKER_LOST, f"worker connection lost: {exc}")
        except Exception as exc:  # anything unexpected ends this call only, with its context logged
            logger.exception("call %s: worker session failed", self.call_id)
            await self._fail(EndReason.ERROR, f"worker session failed: {exc!r}")
        finally:
            if not self._closing:
                # The session ended on its own (failure or worker close): free the slot now.
                if ws is not None:
                    await _close_quietly(ws)
                await self._release_slot()

    async def _connect(self, reservation: Reservation) -> ClientConnection | None:
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
            reason = EndReason.ERROR if status in (401, 403) else EndReason.WORKER_LOST
            hint = " (check WORKER_TOKEN)" if status in (401, 403) else ""
            await self._fail(reason, f"worker {reservation.worker_id} refused the session: HTTP {status}{hint}")
        except (OSError, TimeoutError, WebSocketException) as exc:
            await self._fail(
                EndReason.WORKER_LOST, f"cannot connect to worker {reservation.worker_id} at {url}: {exc!r}"
            )
        return None

    async def _wait_ready(self, ws: ClientConnection, reservation: Reservation) -> protocol.Ready | None:
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                while True:
                    message = await ws.recv()
                    if isinstance(message, bytes):
                        logger.warning("call %s: audio before ready from worker, ignored", self.call_id)
                        continue
                    reply = protocol.decode_server(message)
                    if isinstance(reply, protocol.Ready):
                        return reply
                    if isinstance(reply, protocol.Error):
                        await self._worker_error(reply)
                        return None
                    if isinstance(reply, protocol.Ended):
                        await self._fail(
                            EndReason.WORKER_LOST, f"worker ended the session before ready: {reply.reason}"
                        )
                        return None
        except TimeoutError:
            await self._fail(
                EndReason.WORKER_LOST,
                f"worker {reservation.worker_id} sent no ready within {self._connect_timeout_s:g} s",
            )
        except ConnectionClosed as exc:
            await self._fail(EndReason.WORKER_LOST, f"worker {reservation.worker_id} closed before ready: {exc}")
        except protocol.ProtocolError as exc:
            await self._fail(EndReason.ERROR, f"worker {reservation.worker_id} sent a bad message: {exc}")
        return None

    async def _receive(self, ws: ClientConnection) -> None:
        try:
            async for message in ws:
                if isinstance(message, bytes):
                    self._take_bot_frame(message)
                    continue
                try:
                    reply = protocol.decode_server(message)
                except protocol.ProtocolError as exc:
                    logger.warning("call %s: ignoring a bad message from the worker: %s", self.call_id, exc)
                    continue
                if isinstance(reply, protocol.Text):
                    await self._push_text(reply.text)
                elif isinstance(reply, protocol.Error):
                    await self._worker_error(reply)
                    return
                elif isinstance(reply, protocol.Ended):
                    if not self._closing:
                        await self._fail(EndReason.WORKER_LOST, f"worker ended the session: {reply.reason}")
                    return
        except ConnectionClosed as exc:
            if not self._closing:
                await self._fail(EndReason.WORKER_LOST, f"worker connection lost: {exc}")
            return
        if not self._closing:
            await self._fail(EndReason.WORKER_LOST, "worker connection closed")

    async def _worker_error(self, error: protocol.Error) -> None:
        reason = (
            EndReason.BUSY
            if error.code == "busy"
            else EndReason.WORKER_LOST
            if error.code == "shutting_down"
            else EndReason.ERROR
        )
        await self._fail(reason, f"worker refused the session ({error.code}): {error.message}")

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
    def _take_bot_frame(self, data: bytes) -> None:
        try:
            protocol.check_frame(data)
        except protocol.ProtocolError as exc:
            logger.warning("call %s: ignoring a bot frame: %s", self.call_id, exc)
            return
        self.stats.frames_received += 1
        audio = self._out_resampler.process_pcm16(data)
        if self._out_queue.qsize() >= self._output_queue_frames:
            self._out_queue.get_nowait()  # drop the oldest: latency stays bounded
            self.stats.frames_dropped += 1
        self._out_queue.put_nowait(audio)

    async def _pace_output(self) -> None:
        """Push one bot frame per 80 ms at most; never catch up after a stall."""
        due: float | None = None
        while True:
            audio = await self._out_queue.get()
            now = time.monotonic()
            if due is None or now >= due:
                due = now
            else:
                await asyncio.sleep(due - now)
            due += protocol.FRAME_SECONDS
            await self.push_frame(SpeechOutputAudioRawFrame(audio=audio, sample_rate=self._out_rate, num_channels=1))
            self.stats.frames_out += 1
            if self.first_audio_at is None:
                self.first_audio_at = time.monotonic()
                await self._call_event_handler("on_first_audio")

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
        ws = self._ws
        if ws is not None and self.ready is not None:
            try:
                await asyncio.wait_for(
                    ws.send(protocol.encode(protocol.End(reason=reason))), timeout=self._end_timeout_s
                )
            except (ConnectionClosed, TimeoutError, OSError) as exc:
                logger.info("call %s: could not send end to the worker: %r", self.call_id, exc)
            if graceful and self._session_task is not None and not self._session_task.done():
                await asyncio.wait({self._session_task}, timeout=self._end_timeout_s)
        for task in (self._sender_task, self._pacer_task, self._session_task):
            if task is not None and not task.done():
                await self.cancel_task(task)
        self._sender_task = self._pacer_task = self._session_task = None
        if ws is not None:
            await _close_quietly(ws)
        await self._release_slot()

    async def _release_slot(self) -> None:
        if self._released or self._store is None:
            return
        self._released = True
        try:
            await self._store.release_slot(self.call_id)
        except Exception:  # Redis down: the reservation expires as stale; log, don't break teardown
            logger.exception("call %s: could not release the worker slot", self.call_id)


def _reason_text(reason: object) -> str:
    if isinstance(reason, str) and reason:
        return reason[:100]
    return "caller_hangup"


async def _close_quietly(ws: ClientConnection) -> None:
    try:
        await ws.close()
    except (OSError, WebSocketException) as exc:
        logger.info("closing the worker connection: %r", exc)
