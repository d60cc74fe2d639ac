"""The JSON report of one simulated call; every figure is defined where it is declared."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

CallOutcome = Literal["completed", "rejected", "refused", "failed"]


class Timings(BaseModel):
    """Milliseconds, measured by the caller (this simulator)."""

    webhook_ms: float | None = Field(None, description="POST /twilio/voice round trip")
    ws_connect_ms: float | None = Field(None, description="signed WebSocket upgrade of the stream URL")
    first_bot_audio_ms: float | None = Field(None, description="`start` sent -> first bot media received")
    call_ms: float | None = Field(None, description="`start` sent -> hang-up (stop/close/drop)")
    total_ms: float | None = Field(None, description="webhook sent -> report written")


class CallReport(BaseModel):
    """What happened on one simulated Twilio call."""

    call_id: str | None = Field(None, description="our call id (TwiML <Parameter>), None if no stream")
    persona: str | None = Field(None, description="persona id (TwiML <Parameter>)")
    status: CallOutcome = Field(
        description="completed: the caller played all its audio and hung up as asked; rejected: the "
        "TwiML answered without a stream (busy); refused: HTTP error on the webhook or the WS upgrade; "
        "failed: the gateway ended the stream early or the simulator hit an error"
    )
    http_status: int | None = Field(None, description="HTTP status of a refused webhook or WS upgrade")
    error: str | None = None
    hangup: Literal["stop", "close", "drop"]
    call_sid: str
    account_sid: str
    stream_sid: str | None = None
    stream_url: str | None = None
    parameters: dict[str, str] = Field(default_factory=dict, description="TwiML <Parameter>s")
    twiml_verbs: list[str] = Field(default_factory=list)
    first_bot_audio_ms: float | None = Field(None, description="`start` sent -> first bot media received")
    frames_out: int = Field(0, description="caller media messages sent, 20 ms (160 μ-law bytes) each")
    frames_in: float = Field(0, description="bot audio received, in 20 ms frames (payload bytes / 160)")
    media_messages_in: int = Field(0, description="bot media messages received")
    late_frames: int = Field(
        0,
        description="bot payloads that arrived after the caller's playout buffer had run dry (each one "
        "is an audible gap); playout starts jitter_ms after the first/each late arrival",
    )
    late_fraction: float | None = Field(None, description="late_frames / frames_in")
    underrun_ms: float = Field(0, description="total length of the gaps the late payloads caused")
    largest_gap_ms: float = Field(0, description="the longest single gap the caller heard (0: none)")
    jitter_ms: float = Field(description="the playout buffer of the model above")
    playout_delay_ms_mean: float | None = Field(None, description="arrival -> playback, mean over payloads")
    playout_delay_ms_max: float | None = Field(None, description="arrival -> playback, worst payload")
    caller_speech_ms: float = Field(0, description="20 ms caller frames at or above speech_dbfs, in ms")
    speech_dbfs: float = Field(description="level above which a caller frame counts as speech")
    duplex_fraction: float | None = Field(
        None,
        description="fraction of caller speech frames during which bot audio was playing (midpoint "
        "of the 20 ms window inside the bot's playout timeline): full duplex means close to 1",
    )
    send_late_frames: int = Field(
        0, description="caller frames this simulator sent more than 20 ms behind its real-time clock"
    )
    dtmf_sent: str = ""
    raw_messages_sent: int = Field(0, description="extra raw (malformed/unknown) messages injected")
    marks_received: int = 0
    marks_echoed: int = 0
    clears_received: int = Field(0, description="`clear` messages (full duplex: expected 0)")
    cleared_ms: float = 0
    unexpected_messages: int = Field(0, description="bot messages that are not media/mark/clear of our stream")
    close_code: int | None = Field(None, description="WebSocket close code seen by the caller")
    bot_wav: str | None = None
    timings: Timings = Field(default_factory=Timings)
    record: dict[str, Any] | None = Field(None, description="GET /api/calls/{id} record (admin token)")
    events: list[dict[str, Any]] | None = Field(None, description="the call's event stream (admin token)")
    transcript: str | None = Field(None, description="the bot's text (admin token)")
