"""What the gateway's routes share: settings, the call store, personas, metrics and live calls."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import Request, WebSocket

from app.callstate import CallStore
from app.config import GatewaySettings
from app.gateway.metrics import GatewayMetrics
from app.gateway.security import TwilioSignatures
from app.personas import PersonaBook

if TYPE_CHECKING:
    from app.gateway.session import CallSession


@dataclass
class GatewayState:
    settings: GatewaySettings
    store: CallStore
    personas: PersonaBook
    metrics: GatewayMetrics
    signatures: TwilioSignatures
    sessions: dict[str, CallSession] = field(default_factory=dict)  # call id -> live media session

    def frames_dropped_of_live_calls(self) -> list[int]:
        return [s.frames_dropped for s in self.sessions.values()]


def gateway_state(connection: Request | WebSocket) -> GatewayState:
    """The state the app's lifespan put on `app.state.gateway`."""
    return connection.app.state.gateway
