"""The per-call Pipecat pipeline, for each channel:

    transport.input()                 caller audio as PCM16 frames at the transport's rate
      -> PersonaPlexService           that rate <-> 24 kHz, the worker session, the bot audio's pacing
      -> TranscriptRecorder           the bot's text -> call events (and the page, for WebRTC)
      -> transport.output()           bot audio back to the caller

Twilio: FastAPIWebsocketTransport(GuardedTwilioSerializer), μ-law 8 kHz <-> PCM16 8 kHz, media
messages of 20 ms in and `chunk_s` (GatewaySettings.twilio_media_chunk_ms) out. WebRTC:
SmallWebRTCTransport (aiortc), Opus <-> PCM16 24 kHz, 20 ms writes (WEBRTC_CHUNK_S).

The output transports send whole chunks only: a partial one waits for the next frame's audio. So
the service's playout trim cuts whole chunks (PersonaPlexService's `output_chunk_s`, the same
value), or a cut would leave a chunk's remainder standing in the transport.

Each pipeline runs at its transport's own rate both ways, so pipecat's stream resamplers (which
hold up to ~140 ms) pass audio through untouched; the service converts with its low-latency
resampler instead. The service's pacer is the one real-time clock of the bot's audio; the output
transports only write what it hands them (app/pipecat/pacer.py). No VAD, no interruptions, no turn
tracking, no idle timeout (the persona's max duration applies), no end-of-stream silence.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import WebSocket
from pipecat.frames.frames import Frame, TTSTextFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.serializers.base_serializer import FrameSerializer
from pipecat.transports.base_transport import BaseTransport, TransportParams
from pipecat.transports.smallwebrtc.connection import SmallWebRTCConnection
from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport
from pipecat.transports.websocket.fastapi import FastAPIWebsocketParams, FastAPIWebsocketTransport

from app import protocol
from app.pipecat.service import PersonaPlexService

TELEPHONE_RATE = 8000
WEBRTC_RATE = protocol.SAMPLE_RATE  # 24 kHz both ways: the model's own rate
WEBRTC_CHUNK_S = 0.020  # aiortc takes 10 ms at a time; 20 ms writes keep its queue short


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
    """transport in -> PersonaPlexService -> TranscriptRecorder -> transport out, for one call."""
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
    chunk_s: float = 0.020,
) -> tuple[PipelineWorker, FastAPIWebsocketTransport]:
    """The transport and the pipeline worker for one call on an accepted Twilio WebSocket; the bot's
    audio goes out in media messages of `chunk_s` (a multiple of 10 ms)."""
    transport = FastAPIWebsocketTransport(
        websocket,
        FastAPIWebsocketParams(
            serializer=serializer,
            audio_in_enabled=True,
            audio_out_enabled=True,
            audio_in_sample_rate=TELEPHONE_RATE,
            audio_out_sample_rate=TELEPHONE_RATE,
            audio_out_10ms_chunks=_tens_of_ms(chunk_s),
            audio_out_end_silence_secs=0,
            add_wav_header=False,
            allowed_origins=[],  # Twilio sends no Origin; the signature authenticates it
            session_timeout=None,
        ),
        input_name=f"twilio-in-{call_id}",
        output_name=f"twilio-out-{call_id}",
    )
    return call_worker(transport, service, on_text, call_id=call_id, sample_rate=TELEPHONE_RATE), transport


def build_webrtc_pipeline(
    connection: SmallWebRTCConnection,
    *,
    call_id: str,
    service: PersonaPlexService,
    on_text: Callable[[str], None],
) -> tuple[PipelineWorker, SmallWebRTCTransport]:
    """The transport and the pipeline worker for one browser call, 24 kHz mono both ways."""
    transport = SmallWebRTCTransport(
        connection,
        TransportParams(
            audio_in_enabled=True,
            audio_out_enabled=True,
            audio_in_sample_rate=WEBRTC_RATE,
            audio_out_sample_rate=WEBRTC_RATE,
            audio_in_channels=1,
            audio_out_channels=1,
            audio_out_10ms_chunks=_tens_of_ms(WEBRTC_CHUNK_S),
            audio_out_end_silence_secs=0,
        ),
        input_name=f"webrtc-in-{call_id}",
        output_name=f"webrtc-out-{call_id}",
    )
    return call_worker(transport, service, on_text, call_id=call_id, sample_rate=WEBRTC_RATE), transport


def _tens_of_ms(chunk_s: float) -> int:
    tens = round(chunk_s * 100)
    if tens < 1 or abs(tens - chunk_s * 100) > 1e-6:
        raise ValueError(f"an output chunk is a whole number of 10 ms, got {chunk_s} s")
    return tens
