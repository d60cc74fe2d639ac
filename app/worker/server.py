"""`callcenter worker`: WS /v1/session (one call per session), GET /healthz, GET /metrics.

A session: the gateway connects with `Authorization: Bearer $WORKER_TOKEN` (anything else is refused
with HTTP 403 before the socket is accepted), sends `Start`, gets `Ready` once its persona is loaded
into a slot (or `Error` unknown_persona / busy, then close), then streams caller frames (binary,
exactly one 80 ms PCM16 frame each) and receives one bot frame per caller frame plus `Text`. `End`
answers the frames still queued, sends `Ended` and closes; a dropped socket frees the slot at once.
The worker registers in Redis at start, heartbeats with its used slot count and unregisters at exit.

Drain (SIGTERM, or `POST /admin/drain` with the worker token): the worker says `draining` in its
heartbeat at once (no gateway routes a new call here), answers a new `Start` with
`Error(shutting_down)` (the gateway tries another worker), and sends every live session `Move`: the
gateway resumes the call on another worker, then ends this session. Once no session is left, or
after `worker_drain_grace_s`, the server exits (the sessions still here then get
`Error(shutting_down)`). uvicorn's own SIGTERM handling is replaced by this (`WorkerServer`);
SIGINT (or a second SIGTERM) still stops at once.

Each socket is a `_Connection`: only the transport (the websocket, the outbox the engine fills, the
send lock, whether it is closed). The call it carries is the engine's record (`call.py`): its id,
its slot and whether it was asked to move are read from and written to that record.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict
from types import FrameType

import uvicorn
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response
from redis.exceptions import RedisError

from app.callstate import CallStore, connect_redis
from app.config import WorkerSettings
from app.outage import OutageLog
from app.protocol import (
    FRAME_SECONDS,
    SESSION_PATH,
    End,
    Ended,
    Error,
    Move,
    ProtocolError,
    Ready,
    Start,
    check_frame,
    decode_client,
    encode,
)
from app.worker.call import Call, Output
from app.worker.context import ContextPolicy
from app.worker.engine import Engine
from app.worker.metrics import CONTENT_TYPE, WorkerMetrics
from app.worker.runtime import Runtime, UnknownPersona, build_runtime

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 10.0  # the gateway must say Start this soon after connecting
READY_TIMEOUT_S = 30.0  # joins are applied between ticks; this only catches a wedged engine
DRAIN_TIMEOUT_S = 5.0  # after End: time for the queued frames and Ended to go out
OUTBOX_FRAMES = 64  # bot frames buffered toward a slow reader before the oldest is dropped

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_INVALID_DATA = 1007
CLOSE_POLICY = 1008
CLOSE_INTERNAL = 1011
CLOSE_TRY_AGAIN = 1013
_CLOSE_FOR_ERROR = {
    "bad_request": CLOSE_INVALID_DATA,
    "unknown_persona": CLOSE_POLICY,
    "busy": CLOSE_TRY_AGAIN,
    "unauthorized": CLOSE_POLICY,
    "internal": CLOSE_INTERNAL,
    "shutting_down": CLOSE_GOING_AWAY,
}


def context_policy(settings: WorkerSettings, runtime: Runtime) -> ContextPolicy:
    """When the engine rebuilds a long call's context, from the settings (sizes in frames)."""
    return ContextPolicy(
        context=runtime.lm.cfg.context,
        margin=settings.worker_rebuild_margin_frames,
        keep=max(1, round(settings.worker_rebuild_keep_s / FRAME_SECONDS)),
        chunk=settings.worker_rebuild_chunk_frames,
    )


def create_app(settings: WorkerSettings, runtime: Runtime) -> FastAPI:
    """The worker's FastAPI app around a loaded `Runtime`; the engine thread lives with the app."""
    worker_id = settings.resolved_worker_id
    metrics = WorkerMetrics(runtime.max_slots)
    engine = Engine(
        runtime,
        worker_id=worker_id,
        max_queue_frames=settings.worker_max_queue_frames,
        metrics=metrics,
        cuda_graph=settings.worker_cuda_graph and runtime.device.type == "cuda",
        compile="inductor" if settings.worker_compile else None,
        policy=context_policy(settings, runtime),
    )

    drain = Drain(settings.worker_drain_grace_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis, embedded = await connect_redis(settings)
        store = CallStore(redis)
        engine.start()
        heartbeat: asyncio.Task[None] | None = None
        draining: asyncio.Task[None] | None = None
        stopping = asyncio.Event()

        async def beat() -> None:
            await store.heartbeat(
                worker_id,
                engine.scheduler.stats().used,
                url=settings.resolved_worker_url,
                max_slots=runtime.max_slots,
                heartbeat_s=settings.worker_heartbeat_s,
                draining=drain.draining,
            )

        try:
            await store.register_worker(
                worker_id, settings.resolved_worker_url, runtime.max_slots, heartbeat_s=settings.worker_heartbeat_s
            )
            logger.info(
                "worker %s registered at %s with %d slots", worker_id, settings.resolved_worker_url, runtime.max_slots
            )
            heartbeat = asyncio.create_task(_heartbeat(beat, worker_id, settings.worker_heartbeat_s, stopping))
            draining = asyncio.create_task(drain.run(beat))
            app.state.store = store
            yield
        finally:
            stopping.set()
            if draining is not None and not draining.done():
                draining.cancel()
                await asyncio.gather(draining, return_exceptions=True)
            if heartbeat is not None:
                try:  # a heartbeat in flight may finish; one stuck on Redis is cancelled
                    await asyncio.wait_for(heartbeat, settings.worker_heartbeat_s + 5.0)
                except TimeoutError:
                    logger.warning("heartbeat task of worker %s did not stop in time", worker_id)
            try:
                await store.unregister_worker(worker_id)
            except (RedisError, OSError) as exc:
                logger.warning("could not unregister worker %s: %s", worker_id, exc)
            await asyncio.to_thread(engine.stop)
            await redis.aclose()
            if embedded is not None:
                await asyncio.to_thread(embedded.close)

    app = FastAPI(title="callcenter worker", lifespan=lifespan)
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.runtime = runtime
    app.state.drain = drain

    @app.websocket(SESSION_PATH)
    async def session(ws: WebSocket) -> None:
        if not _authorized(ws.headers.get("authorization"), settings.worker_token):
            client = f"{ws.client.host}:{ws.client.port}" if ws.client else "?"
            logger.warning("session from %s refused: missing or wrong bearer token", client)
            metrics.sessions.labels(outcome="unauthorized").inc()
            await ws.close(code=CLOSE_POLICY)  # before accept: the client gets HTTP 403
            return
        await ws.accept()
        connection = _Connection(ws, engine, metrics, drain)
        drain.add(connection)
        try:
            await connection.run()
        finally:
            drain.discard(connection)

    @app.post("/admin/drain", status_code=202)
    async def admin_drain(request: Request) -> JSONResponse:
        """Start draining (see the module docstring); idempotent."""
        if not _authorized(request.headers.get("authorization"), settings.worker_token):
            return JSONResponse({"error": "unauthorized"}, status_code=403)
        started = drain.request("admin")
        return JSONResponse(
            {"draining": True, "started": started, "sessions": len(drain.sessions), "grace_s": drain.grace_s},
            status_code=202,
        )

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        st = engine.scheduler.stats()
        ticks = engine.stats()
        body = {
            "status": "ok" if ticks.running else "engine_stopped",
            "worker_id": worker_id,
            "draining": drain.draining,
            "url": settings.resolved_worker_url,
            "model": {
                "kind": runtime.kind,
                "source": runtime.source,
                "device": str(runtime.device),
                "dtype": str(runtime.dtype).removeprefix("torch."),
                "makes_noise_only": runtime.kind == "tiny",
            },
            "personas": sorted(runtime.prompt_states),
            "slots": {
                "max": st.max_slots,
                "used": st.used,
                "free": st.free,
                "prefilling": st.prefilling,
                "active": st.active,
                "draining": st.draining,
            },
            "frames": {"in": st.frames_in, "run": st.frames_run, "dropped": st.frames_dropped},
            "ticks": asdict(ticks),
            # How the tick runs: WORKER_COMPILE / WORKER_CUDA_GRAPH as they took effect (a compiled
            # tick that had to fall back to eager shows compiled: null).
            "tick": {"compiled": engine.model_tick.compiled, "cuda_graph": engine.model_tick.graphed},
        }
        return JSONResponse(body, status_code=200 if ticks.running else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app


def _authorized(header: str | None, token: str) -> bool:
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header.removeprefix("Bearer ").strip().encode(), token.encode())


async def _heartbeat(
    beat: Callable[[], Awaitable[None]], worker_id: str, every_s: float, stopping: asyncio.Event
) -> None:
    """Every `every_s` seconds: this worker is alive (slots in use, draining) until `stopping`.
    While Redis is unreachable that is logged once per 30 s (`app/outage.py`), not once per beat."""
    outage = OutageLog(logger, f"heartbeat of worker {worker_id}")
    while not stopping.is_set():
        try:
            await asyncio.wait_for(stopping.wait(), every_s)
            return
        except TimeoutError:
            pass
        try:
            await beat()
        except (RedisError, OSError) as exc:
            outage.failed(exc, ": calls go on")
            continue
        outage.recovered()


class Drain:
    """The worker's drain (module docstring): requested once; `done` once no session is left or
    the grace period is over, then `on_done` (set by `WorkerServer`: the server exits)."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.sessions: set[_Connection] = set()
        self.reason = ""
        self.on_done: Callable[[], None] | None = None
        self.done = asyncio.Event()
        self._requested = asyncio.Event()
        self._left = asyncio.Event()  # a session left

    @property
    def draining(self) -> bool:
        return self._requested.is_set()

    def request(self, reason: str) -> bool:
        """Start draining; False if already draining."""
        if self.draining:
            return False
        self.reason = reason
        self._requested.set()
        return True

    def add(self, session: _Connection) -> None:
        self.sessions.add(session)

    def discard(self, session: _Connection) -> None:
        self.sessions.discard(session)
        self._left.set()

    async def run(self, beat: Callable[[], Awaitable[None]]) -> None:
        """Wait for a request, then drain: say so in the registry, ask every session to move, wait."""
        await self._requested.wait()
        started = time.monotonic()
        logger.warning(
            "draining (%s): %d sessions to move, exiting when none is left or in %.0f s",
            self.reason, len(self.sessions), self.grace_s,
        )
        try:
            await beat()  # at once, not at the next heartbeat: no gateway routes a new call here
        except (RedisError, OSError) as exc:
            logger.warning("could not record the drain in redis (the next heartbeat will): %s", exc)
        for session in list(self.sessions):
            await session.move(self.reason)
        deadline = started + self.grace_s
        while self.sessions and time.monotonic() < deadline:
            self._left.clear()
            try:
                await asyncio.wait_for(self._left.wait(), deadline - time.monotonic())
            except TimeoutError:
                break
        if self.sessions:
            logger.warning("drain grace over with %d sessions left: they end now", len(self.sessions))
        else:
            logger.info("drained in %.1f s: no session left", time.monotonic() - started)
        self.done.set()
        if self.on_done is not None:
            self.on_done()


class _Outbox:
    """Engine -> session hand-off: `sink` runs on the engine thread, the session reads on its loop.

    Bounded: past OUTBOX_FRAMES queued items the oldest bot frame is dropped (counted); control
    messages are never dropped.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, metrics: WorkerMetrics) -> None:
        self._loop = loop
        self._metrics = metrics
        self._items: deque[Output] = deque()
        self._ready = asyncio.Event()
        self.dropped = 0

    def sink(self, item: Output) -> None:
        self._loop.call_soon_threadsafe(self._put, item)

    def _put(self, item: Output) -> None:
        if len(self._items) >= OUTBOX_FRAMES:
            for i, queued in enumerate(self._items):
                if isinstance(queued, bytes):
                    del self._items[i]
                    self.dropped += 1
                    self._metrics.output_dropped.inc()
                    break
        self._items.append(item)
        self._ready.set()

    async def get(self) -> Output:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()


class _Connection:
    """One WS /v1/session: the transport of one call. `call` is the call's record once its Ready
    went out (from then on the drain may move it)."""

    def __init__(self, ws: WebSocket, engine: Engine, metrics: WorkerMetrics, drain: Drain) -> None:
        self.ws = ws
        self.engine = engine
        self.metrics = metrics
        self.drain = drain
        self.outbox = _Outbox(asyncio.get_running_loop(), metrics)
        self.call: Call | None = None
        self._send_lock = asyncio.Lock()
        self._closed = False

    async def move(self, reason: str) -> None:
        """Ask the gateway to move this call elsewhere (once). A call whose Ready has not gone out yet
        is not asked here: its connection checks the drain right after the Ready."""
        call = self.call
        if call is None or call.moving:
            return
        call.moving = True
        logger.info("call %s: asking the gateway to move it (%s)", call.call_id, reason)
        await self._send_text(encode(Move(reason=reason)))

    async def run(self) -> None:
        start: Start | None = None
        call: Call | None = None
        sender: asyncio.Task[None] | None = None
        try:
            start = await self._start()
            if start is None:
                return
            if self.drain.draining:
                logger.info("call %s refused: the worker is draining", start.call_id)
                self.metrics.sessions.labels(outcome="draining").inc()
                await self._fail(Error(code="shutting_down", message="the worker is draining"))
                return
            call = await self._open(start)
            if call is None or not await self._ready(call):
                return
            self.call = call
            if self.drain.draining:
                await self.move(self.drain.reason or "draining")
            sender = asyncio.create_task(self._send_loop())
            ended = await self._receive_loop(call)
            if ended:
                try:
                    await asyncio.wait_for(asyncio.shield(sender), DRAIN_TIMEOUT_S)
                except TimeoutError:
                    logger.warning("call %s: no Ended within %.0f s after End", call.call_id, DRAIN_TIMEOUT_S)
        except Exception:
            logger.exception("call %s: session failed", start.call_id if start is not None else "?")
            await self._fail(Error(code="internal", message="worker session error"))
        finally:
            if call is not None:
                self.engine.abort(call)  # no-op once the call left its slot
            if sender is not None and not sender.done():
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)

    async def _start(self) -> Start | None:
        try:
            message = await asyncio.wait_for(self.ws.receive(), START_TIMEOUT_S)
        except TimeoutError:
            await self._fail(Error(code="bad_request", message=f"no start message within {START_TIMEOUT_S:.0f} s"))
            return None
        if message["type"] == "websocket.disconnect":
            return None
        text = message.get("text")
        if text is None:
            await self._fail(Error(code="bad_request", message="the first message must be a JSON start message"))
            return None
        try:
            start = decode_client(text)
        except ProtocolError as exc:
            await self._fail(Error(code="bad_request", message=str(exc)))
            return None
        if not isinstance(start, Start):
            await self._fail(Error(code="bad_request", message=f"expected start, got {start.type}"))
            return None
        return start

    async def _open(self, start: Start) -> Call | None:
        """The call's record once the engine gave it a slot; None (and the error sent) if refused."""
        try:
            call = self.engine.open(start.call_id, start.persona, start.sampling, self.outbox.sink, start.resume)
        except ProtocolError as exc:
            logger.warning("call %s: start refused: %s", start.call_id, exc)
            await self._fail(Error(code="bad_request", message=str(exc)))
            return None
        except UnknownPersona:
            logger.warning("call %s: unknown persona %r", start.call_id, start.persona)
            self.metrics.sessions.labels(outcome="unknown_persona").inc()
            await self._fail(Error(code="unknown_persona", message=f"persona {start.persona!r} is not served here"))
            return None
        if call is None:
            logger.warning("call %s refused: all %d slots are in use", start.call_id, self.engine.runtime.max_slots)
            self.metrics.sessions.labels(outcome="busy").inc()
            await self._fail(Error(code="busy", message="no free call slot on this worker"))
        return call

    async def _ready(self, call: Call) -> bool:
        """Send the call's Ready once the engine loaded it; False (and the error sent) if it failed."""
        try:
            first = await asyncio.wait_for(self.outbox.get(), READY_TIMEOUT_S)
        except TimeoutError:
            logger.error("call %s: slot %d not ready within %.0f s", call.call_id, call.slot, READY_TIMEOUT_S)
            await self._fail(Error(code="internal", message="the engine did not load the call in time"))
            return False
        if not isinstance(first, Ready):
            await self._deliver(first)
            return False
        await self._send_text(encode(first))
        return True

    async def _receive_loop(self, call: Call) -> bool:
        """Caller frames into the engine until End (True) or a disconnect / bad input (False)."""
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                logger.info("call %s: gateway disconnected (code %s)", call.call_id, message.get("code"))
                return False
            data = message.get("bytes")
            if data is not None:
                try:
                    self.engine.push(call, check_frame(data))
                except ProtocolError as exc:
                    logger.warning("call %s: %s", call.call_id, exc)
                    self.engine.abort(call)
                    await self._fail(Error(code="bad_request", message=str(exc)))
                    return False
                continue
            try:
                control = decode_client(message.get("text") or "")
            except ProtocolError as exc:
                logger.warning("call %s: %s", call.call_id, exc)
                self.engine.abort(call)
                await self._fail(Error(code="bad_request", message=str(exc)))
                return False
            if isinstance(control, End):
                logger.info("call %s: end (%s)", call.call_id, control.reason)
                self.engine.end(call, control.reason)
                return True
            self.engine.abort(call)
            await self._fail(Error(code="bad_request", message="start may only be sent once"))
            return False

    async def _send_loop(self) -> None:
        while not self._closed:
            item = await self.outbox.get()
            await self._deliver(item)
            if isinstance(item, (Ended, Error)):
                return

    async def _deliver(self, item: Output) -> None:
        if isinstance(item, bytes):
            await self._send_bytes(item)
        elif isinstance(item, Ended):
            await self._send_text(encode(item))
            await self._close(CLOSE_NORMAL)
        elif isinstance(item, Error):
            await self._fail(item)
        else:
            await self._send_text(encode(item))

    async def _fail(self, error: Error) -> None:
        """Send an Error and close with the matching code (once)."""
        await self._send_text(encode(error))
        await self._close(_CLOSE_FOR_ERROR.get(error.code, CLOSE_INTERNAL))

    async def _send_text(self, text: str) -> None:
        await self._send({"type": "websocket.send", "text": text})

    async def _send_bytes(self, data: bytes) -> None:
        await self._send({"type": "websocket.send", "bytes": data})

    async def _close(self, code: int) -> None:
        await self._send({"type": "websocket.close", "code": code, "reason": ""})

    async def _send(self, message: dict) -> None:
        """Send unless closed; a peer that has gone away just marks the connection closed."""
        async with self._send_lock:
            if self._closed:
                return
            if message["type"] == "websocket.close":
                self._closed = True
            try:
                await self.ws.send(message)
            except (WebSocketDisconnect, RuntimeError) as exc:  # the gateway went away meanwhile
                self._closed = True
                call_id = self.call.call_id if self.call is not None else "?"
                logger.info("call %s: gateway gone while sending (%s)", call_id, type(exc).__name__)


class WorkerServer(uvicorn.Server):
    """uvicorn whose SIGTERM drains the worker (module docstring) instead of cutting its sessions;
    the server exits once the drain is done. SIGINT, or a second SIGTERM, stops at once."""

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self.drain = drain
        self._loop: asyncio.AbstractEventLoop | None = None
        drain.on_done = self._drained

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets=sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and not self.should_exit and not self.drain.draining and self._loop is not None:
            logger.warning("SIGTERM: draining (again to stop at once)")
            self._loop.call_soon_threadsafe(self.drain.request, "SIGTERM")
            return
        super().handle_exit(sig, frame)

    def _drained(self) -> None:
        self.should_exit = True


def make_server(settings: WorkerSettings, runtime: Runtime) -> WorkerServer:
    """The worker's app under a WorkerServer on WORKER_HOST:WORKER_PORT."""
    app = create_app(settings, runtime)
    config = uvicorn.Config(
        app,
        host=settings.worker_host,
        port=settings.worker_port,
        lifespan="on",
        log_level="info",
        timeout_graceful_shutdown=10,
    )
    return WorkerServer(config, app.state.drain)


def run_worker(settings: WorkerSettings, runtime: Runtime | None = None) -> None:
    """Load the model (unless given) and serve the worker until interrupted or drained."""
    runtime = runtime if runtime is not None else build_runtime(settings)
    server = make_server(settings, runtime)
    logger.info("worker %s listening on %s:%d", settings.resolved_worker_id, settings.worker_host, settings.worker_port)
    server.run()


def bound_socket(host: str = "127.0.0.1") -> socket.socket:
    """A listening-ready TCP socket on a free port (for tests and `callcenter up`)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    return sock
