"""The per-call Pipecat pipeline for a Twilio media stream.

    FastAPIWebsocketTransport(GuardedTwilioSerializer).input()   μ-law 8 kHz -> PCM16 8 kHz frames
      -> PersonaPlexService                                      8 kHz <-> 24 kHz, worker session
      -> TranscriptRecorder                                      the bot's text -> call events
      -> transport.output()                                      PCM16 8 kHz -> μ-law media messages

The pipeline runs at 8 kHz both ways so pipecat's own stream resamplers (which hold up to ~140 ms)
pass audio through untouched; the service converts with its low-latency resampler instead.
No VAD, no interruptions, no turn tracking, no idle timeout (the persona's max duration applies).
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import WebSocket
from pipecat.frames.frames import Frame, TTSTextFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.serializers.base_serializer import FrameSerializer
from pipecat.transports.base_transport import BaseTransport
from pipecat.transports.websocket.fastapi import FastAPIWebsocketParams, FastAPIWebsocketTransport

from app.pipecat.service import PersonaPlexService

TELEPHONE_RATE = 8000


class TranscriptRecorder(FrameProcessor):
    """Hands every TTSTextFrame's text to `on_text` and passes all frames on unchanged."""

    def __init__(self, on_text: Callable[[str], None], **kwargs) -> None:
        super().__init__(enable_direct_mode=True, **kwargs)
        self._on_text = on_text

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSTextFrame) and direction == FrameDirection.DOWNSTREAM:
            self._on_text(frame.text)
        await self.push_frame(frame, direction)


def call_worker(
    transport: BaseTransport,
    service: PersonaPlexService,
    on_text: Callable[[str], None],
    *,
    call_id: str,
    sample_rate: int,
) -> PipelineWorker:
    """transport in -> PersonaPlexService -> TranscriptRecorder -> transport out, for one call.

    The pipeline runs at the transport's own rate both ways (the service converts); no VAD,
    interruptions, turn tracking or idle timeout: the persona's max duration applies.
    """
    pipeline = Pipeline([transport.input(), service, TranscriptRecorder(on_text), transport.output()])
    return PipelineWorker(
        pipeline,
        name=f"call-{call_id}",
        params=PipelineParams(audio_in_sample_rate=sample_rate, audio_out_sample_rate=sample_rate),
        enable_rtvi=False,
        enable_turn_tracking=False,
        idle_timeout_secs=None,
        cancel_on_idle_timeout=False,
        cancel_timeout_secs=5.0,
    )


def build_twilio_pipeline(
    websocket: WebSocket,
    *,
    call_id: str,
    serializer: FrameSerializer,
    service: PersonaPlexService,
    on_text: Callable[[str], None],
) -> tuple[PipelineWorker, FastAPIWebsocketTransport]:
    """The transport and the pipeline worker for one call on an accepted Twilio WebSocket."""
    transport = FastAPIWebsocketTransport(
        websocket,
        FastAPIWebsocketParams(
            serializer=serializer,
            audio_in_enabled=True,
            audio_out_enabled=True,
            audio_in_sample_rate=TELEPHONE_RATE,
            audio_out_sample_rate=TELEPHONE_RATE,
            audio_out_10ms_chunks=2,  # 20 ms media messages, as Twilio sends them
            audio_out_end_silence_secs=0,
            add_wav_header=False,
            allowed_origins=[],  # Twilio sends no Origin; the signature authenticates it
            session_timeout=None,
        ),
        input_name=f"twilio-in-{call_id}",
        output_name=f"twilio-out-{call_id}",
    )
    return call_worker(transport, service, on_text, call_id=call_id, sample_rate=TELEPHONE_RATE), transport
