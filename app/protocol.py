"""Messages between the gateway and a worker on `WS /v1/session`, defined once for both sides.

A session is one call. Control messages are JSON text frames; audio is binary frames of raw
PCM16 little-endian mono at 24 kHz, exactly one 80 ms model frame (1920 samples) each.

    gateway -> worker   Start, then audio frames (caller), then End
    worker  -> gateway  Ready (slot held, persona loaded), then one audio frame (bot) for every
                        caller frame, silence included, plus Text events; Ended when the worker
                        closes the session, Error (then close) on a refusal or a failure

Full duplex: the worker never waits for a turn; it answers every caller frame with a bot frame.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

SAMPLE_RATE = 24_000
FRAME_SAMPLES = 1920  # 80 ms at 24 kHz: one Mimi frame
FRAME_BYTES = FRAME_SAMPLES * 2  # PCM16
FRAME_SECONDS = FRAME_SAMPLES / SAMPLE_RATE
SESSION_PATH = "/v1/session"
MAX_TOP_K = 512  # the engine's top-k bound (app/worker/model/sampling.py); 0 = no top-k filter


class ProtocolError(ValueError):
    """A message that is not valid JSON of a known type, or a wrong-sized audio frame."""


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Sampling(_Message):
    """Per-call sampling overrides; None keeps the persona's value."""

    text_temperature: float | None = Field(default=None, ge=0, le=5)
    text_top_k: int | None = Field(default=None, ge=0, le=MAX_TOP_K)
    audio_temperature: float | None = Field(default=None, ge=0, le=5)
    audio_top_k: int | None = Field(default=None, ge=0, le=MAX_TOP_K)
    seed: int | None = Field(default=None, ge=0, lt=2**63)


class Start(_Message):
    type: Literal["start"] = "start"
    call_id: str = Field(min_length=1, max_length=128)
    persona: str = Field(min_length=1, max_length=128)
    sampling: Sampling = Sampling()


class End(_Message):
    type: Literal["end"] = "end"
    reason: str = "caller_hangup"


class Ready(_Message):
    type: Literal["ready"] = "ready"
    call_id: str
    worker_id: str
    slot: int
    prefill_ms: float


class Text(_Message):
    """A piece of the bot's text, as the model speaks it ("▁" already turned into spaces)."""

    type: Literal["text"] = "text"
    text: str
    frame: int


class Error(_Message):
    type: Literal["error"] = "error"
    code: Literal["bad_request", "unknown_persona", "busy", "unauthorized", "internal", "shutting_down"]
    message: str


class Ended(_Message):
    type: Literal["ended"] = "ended"
    reason: str
    frames_in: int
    frames_out: int


ClientMessage = Annotated[Start | End, Field(discriminator="type")]
ServerMessage = Annotated[Ready | Text | Error | Ended, Field(discriminator="type")]

_client = TypeAdapter(ClientMessage)
_server = TypeAdapter(ServerMessage)


def encode(message: _Message) -> str:
    """JSON text of a message, for a WebSocket text frame."""
    return message.model_dump_json()


def decode_client(data: str | bytes) -> Start | End:
    """Parse a gateway -> worker control message."""
    try:
        return _client.validate_json(data)
    except ValidationError as exc:
        raise ProtocolError(f"bad client message: {_summary(exc)}") from exc


def decode_server(data: str | bytes) -> Ready | Text | Error | Ended:
    """Parse a worker -> gateway control message."""
    try:
        return _server.validate_json(data)
    except ValidationError as exc:
        raise ProtocolError(f"bad server message: {_summary(exc)}") from exc


def check_frame(data: bytes) -> bytes:
    """An audio frame must be exactly one 80 ms PCM16 frame."""
    if len(data) != FRAME_BYTES:
        raise ProtocolError(f"audio frame of {len(data)} bytes, expected {FRAME_BYTES}")
    return data


def _summary(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'message'}: {err['msg']}" for err in exc.errors()[:3]
    )
