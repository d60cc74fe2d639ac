"""What the gateway's routes share: settings, the call store and its writer, personas, metrics,
signatures and stream tokens, the router and the live calls."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import Request, WebSocket

from app.callstate import CallStore, Reservation
from app.config import GatewaySettings
from app.gateway.admission import Admission, LoopLag
from app.gateway.metrics import GatewayMetrics
from app.gateway.routing import RedisRouter
from app.gateway.security import StreamTokens, TwilioSignatures
from app.gateway.writes import StateWriter
from app.personas import Persona, PersonaBook
from app.pipecat.service import PersonaPlexService

if TYPE_CHECKING:
    from app.gateway.session import CallSession


@dataclass
class GatewayState:
    settings: GatewaySettings
    store: CallStore
    personas: PersonaBook
    metrics: GatewayMetrics
    signatures: TwilioSignatures
    router: RedisRouter
    stream_tokens: StreamTokens
    writer: StateWriter  # every live call's Redis writes, in order, through outages
    admission: Admission  # whether this gateway takes one more call (GATEWAY_MAX_CALLS)
    loop_lag: LoopLag  # how late this event loop runs
    sessions: dict[str, CallSession] = field(default_factory=dict)  # call id -> live call (session.open_call)

    def new_service(
        self,
        call_id: str,
        persona: Persona,
        reservation: Reservation | None = None,
        *,
        output_chunk_s: float = 0.020,
    ) -> PersonaPlexService:
        """A call's PersonaPlexService with this gateway's worker token, router and queue settings;
        `output_chunk_s` is its output transport's chunk (app/gateway/pipeline.py)."""
        return PersonaPlexService(
            call_id=call_id,
            persona=persona.id,
            worker_token=self.settings.worker_token,
            router=self.router,
            reservation=reservation,
            output_queue_frames=self.settings.output_queue_frames,
            connect_timeout_s=self.settings.worker_connect_timeout_s,
            failover_timeout_s=self.settings.worker_failover_timeout_s,
            heartbeat_check_s=self.settings.worker_heartbeat_check_s,
            answer_timeout_s=self.settings.worker_answer_timeout_s,
            frame_align=self.settings.frame_align,
            output_chunk_s=output_chunk_s,
            on_latency=self.metrics.observe_latency,
        )

    def frames_dropped_of_live_calls(self) -> list[int]:
        return [s.frames_dropped for s in self.sessions.values()]


def gateway_state(connection: Request | WebSocket) -> GatewayState:
    """The state the app's lifespan put on `app.state.gateway`."""
    return connection.app.state.gateway
