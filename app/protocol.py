"""Messages between the gateway and a worker on `WS /v1/session`, defined once for both sides.

A session is one call. Control messages are JSON text frames; audio is binary frames of raw
PCM16 little-endian mono at 24 kHz, exactly one 80 ms model frame (1920 samples) each.

    gateway -> worker   Start, then audio frames (caller), then End
    worker  -> gateway  Ready (slot held, persona loaded), then one bot frame for every caller
                        frame, silence included, plus Text events and Timing reports (how long
                        caller frames waited for their tick); Move when the worker asks the
                        gateway to take the call elsewhere (it is draining); Ended when the worker
                        closes the session, Error (then close) on a refusal or a failure

A bot frame is the bot's 80 ms of PCM16 followed by the 17 tokens (int16 LE) of the call frame
that this step completed (`pack_bot_frame`): text, the agent's 8 codes, the caller's 8 codes; all
-1 while none is complete (the first step). A call's model state is its persona plus those frames,
so the gateway keeps them (at most a context's worth) and any worker can rebuild the call from
them: `Start.resume` carries them with the seed the call samples with (`Ready.seed`).

Full duplex: the worker never waits for a turn; it answers every caller frame with a bot frame.
"""

from __future__ import annotations

import base64
import binascii
from collections import deque
from typing import Annotated, Literal

import numpy as np

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

SAMPLE_RATE = 24_000
FRAME_SAMPLES = 1920  # 80 ms at 24 kHz: one Mimi frame
FRAME_BYTES = FRAME_SAMPLES * 2  # PCM16
FRAME_SECONDS = FRAME_SAMPLES / SAMPLE_RATE
SESSION_PATH = "/v1/session"
MAX_TOP_K = 512  # the engine's top-k bound (app/worker/model/sampling.py); 0 = no top-k filter
TOKENS_PER_FRAME = 17  # text, 8 agent codes, 8 caller codes
TOKEN_BYTES = TOKENS_PER_FRAME * 2  # int16 LE
BOT_FRAME_BYTES = FRAME_BYTES + TOKEN_BYTES
MAX_RESUME_FRAMES = 3000  # a context's worth of call frames (240 s): more is never needed
MAX_WARM_FRAMES = 25  # caller audio replayed into a new worker's codec before a resumed call (2 s)
TIMING_FIRST_FRAMES = 4  # a session's first Timing covers its first 4 frames (alignment early in the call)
TIMING_EVERY_FRAMES = 12  # then one Timing per 12 frames (~1 s)


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


class Resume(_Message):
    """A call moving in from another worker: what it said and heard so far.

    frames: base64 of int16 LE [n, 17], the call's last n complete frames (n <= MAX_RESUME_FRAMES);
    next_frame: the call frame index the next caller frame has (>= n); warm_audio: base64 of the
    caller's PCM16 just before that frame (at most MAX_WARM_FRAMES frames), which the worker runs
    through its codec's encoder only. The call's seed travels in `Start.sampling.seed`.
    """

    frames: str = Field(max_length=4 * MAX_RESUME_FRAMES * TOKEN_BYTES // 3 + 4)
    next_frame: int = Field(ge=0)
    warm_audio: str = Field(default="", max_length=4 * MAX_WARM_FRAMES * FRAME_BYTES // 3 + 4)

    def tokens(self) -> np.ndarray:
        """The frames as int16 [n, 17]. Raises ProtocolError on a malformed payload."""
        raw = _b64(self.frames, "resume.frames")
        if len(raw) % TOKEN_BYTES:
            raise ProtocolError(f"resume.frames: {len(raw)} bytes is not a whole number of frames")
        frames = np.frombuffer(raw, dtype="<i2").reshape(-1, TOKENS_PER_FRAME)
        if frames.shape[0] > self.next_frame:
            raise ProtocolError(f"resume: {frames.shape[0]} frames before frame {self.next_frame}")
        if frames.size and int(frames.min()) < 0:
            raise ProtocolError("resume.frames: a complete frame has no missing token")
        return frames

    def warm_pcm(self) -> np.ndarray:
        """The warm-up caller audio as int16 [m, 1920] (whole frames)."""
        raw = _b64(self.warm_audio, "resume.warm_audio")
        if len(raw) % FRAME_BYTES:
            raise ProtocolError(f"resume.warm_audio: {len(raw)} bytes is not a whole number of frames")
        return np.frombuffer(raw, dtype="<i2").reshape(-1, FRAME_SAMPLES)

    @classmethod
    def of(cls, frames: np.ndarray, next_frame: int, warm_pcm: np.ndarray | None = None) -> "Resume":
        """Build from int16-compatible frames [n, 17] and optional caller PCM16 [m, 1920]."""
        tokens = np.ascontiguousarray(frames, dtype="<i2").reshape(-1, TOKENS_PER_FRAME)[-MAX_RESUME_FRAMES:]
        warm = b"" if warm_pcm is None else np.ascontiguousarray(warm_pcm, dtype="<i2")[-MAX_WARM_FRAMES:].tobytes()
        return cls(
            frames=base64.b64encode(tokens.tobytes()).decode(),
            next_frame=next_frame,
            warm_audio=base64.b64encode(warm).decode(),
        )


class CallHistory:
    """A call's complete frames [17] int16 by call frame index: the last `capacity` of them (the
    worker's engine and the gateway keep one each; `Resume` carries them)."""

    def __init__(self, capacity: int) -> None:
        self._frames: deque[np.ndarray] = deque(maxlen=capacity)
        self.completed = 0  # frames 0 .. completed - 1 are complete

    def add(self, tokens: np.ndarray) -> None:
        """Frame `completed` is complete."""
        self._frames.append(np.asarray(tokens, dtype=np.int16).reshape(TOKENS_PER_FRAME).copy())
        self.completed += 1

    def load(self, frames: np.ndarray, completed: int) -> None:
        """Start from the frames completed - n .. completed - 1 (a call moving in)."""
        self._frames.clear()
        for row in frames:
            self._frames.append(np.asarray(row, dtype=np.int16).copy())
        self.completed = completed

    @property
    def capacity(self) -> int:
        return self._frames.maxlen or 0

    @property
    def first(self) -> int:
        """Index of the oldest frame kept."""
        return self.completed - len(self._frames)

    def span(self, start: int, stop: int) -> np.ndarray:
        """Frames start .. stop - 1 as int16 [n, 17]; they must be kept."""
        if not self.first <= start <= stop <= self.completed:
            raise IndexError(f"frames {start}..{stop - 1} not kept (kept {self.first}..{self.completed - 1})")
        if stop == start:
            return np.zeros((0, TOKENS_PER_FRAME), dtype=np.int16)
        return np.stack([self._frames[i - self.first] for i in range(start, stop)])


class Start(_Message):
    type: Literal["start"] = "start"
    call_id: str = Field(min_length=1, max_length=128)
    persona: str = Field(min_length=1, max_length=128)
    sampling: Sampling = Sampling()
    resume: Resume | None = None


class End(_Message):
    type: Literal["end"] = "end"
    reason: str = "caller_hangup"


class Ready(_Message):
    type: Literal["ready"] = "ready"
    call_id: str
    worker_id: str
    slot: int
    prefill_ms: float
    seed: int = 0  # the seed the call samples with: a resume elsewhere repeats it
    next_frame: int = 0  # the call frame index of the first caller frame this session answers


class Move(_Message):
    """The worker asks the gateway to move the call to another worker (then End this session)."""

    type: Literal["move"] = "move"
    reason: str = "draining"


class Text(_Message):
    """A piece of the bot's text, as the model speaks it ("▁" already turned into spaces)."""

    type: Literal["text"] = "text"
    text: str
    frame: int


class Timing(_Message):
    """How long the call's caller frames waited at the worker for the tick that ran them.

    Over the `frames` caller frames up to this session's output index `frame`: the least time
    between a frame's arrival at the worker and the start of its tick. The worker's ticks follow a
    fixed grid (`tick_ms` apart), so this is how early the gateway's frames complete before a tick;
    the gateway shifts its framing to shorten it (app/pipecat/tick_align.py).
    """

    type: Literal["timing"] = "timing"
    frame: int = Field(ge=0)
    frames: int = Field(ge=1)
    wait_ms: float = Field(ge=0)
    tick_ms: float = Field(gt=0)


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
ServerMessage = Annotated[Ready | Text | Timing | Move | Error | Ended, Field(discriminator="type")]

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


def decode_server(data: str | bytes) -> Ready | Text | Timing | Move | Error | Ended:
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


NO_TOKENS = np.full(TOKENS_PER_FRAME, -1, dtype="<i2")


def pack_bot_frame(pcm: bytes, tokens: np.ndarray | None = None) -> bytes:
    """One bot frame: PCM16 [1920] then the completed call frame's 17 tokens (None: no frame yet)."""
    check_frame(pcm)
    row = NO_TOKENS if tokens is None else np.asarray(tokens, dtype="<i2").reshape(TOKENS_PER_FRAME)
    return pcm + row.tobytes()


def unpack_bot_frame(data: bytes) -> tuple[bytes, np.ndarray | None]:
    """(PCM16 bytes, tokens int16 [17] or None while no frame is complete) of a bot frame."""
    if len(data) != BOT_FRAME_BYTES:
        raise ProtocolError(f"bot frame of {len(data)} bytes, expected {BOT_FRAME_BYTES}")
    tokens = np.frombuffer(data, dtype="<i2", offset=FRAME_BYTES)
    return data[:FRAME_BYTES], (None if int(tokens.min()) < 0 else tokens)


def _b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise ProtocolError(f"{what}: not base64: {exc}") from exc


def _summary(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'message'}: {err['msg']}" for err in exc.errors()[:3]
    )
