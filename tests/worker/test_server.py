"""The worker over a real uvicorn on 127.0.0.1 with a real (embedded) Redis and the tiny model."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis.asyncio as aioredis
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from app.callstate import CallStore, EmbeddedRedis, WorkerInfo
from app.config import WorkerSettings
from app.protocol import BOT_FRAME_BYTES, SESSION_PATH, TIMING_FIRST_FRAMES, End, Start, decode_server, encode
from app.protocol import Sampling as CallSampling
from app.worker.runtime import Runtime
from app.worker.server import WorkerServer, bound_socket, create_app, make_server

from .conftest import PERSONAS

TOKEN = "test-worker-token"


@dataclass
class Worker:
    settings: WorkerSettings
    redis_url: str
    server: WorkerServer | None = None  # what `callcenter worker` runs, in `thread`
    thread: threading.Thread | None = None

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.settings.worker_port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.settings.worker_port}{SESSION_PATH}"

    def health(self) -> dict:
        return httpx.get(f"{self.http}/healthz", timeout=5).json()

    def workers(self) -> list[WorkerInfo]:
        return asyncio.run(_workers(self.redis_url))


async def _workers(url: str) -> list[WorkerInfo]:
    client = aioredis.from_url(url, decode_responses=True)
    try:
        return await CallStore(client).workers()
    finally:
        await client.aclose()


@contextlib.contextmanager
def serve(runtime: Runtime, tmp: Path, redis_url: str, **overrides: object) -> Iterator[Worker]:
    """Run the worker's server (`make_server`, as `callcenter worker` does) in a thread on a free
    loopback port; stop it afterwards."""
    sock = bound_socket("127.0.0.1")
    port = sock.getsockname()[1]
    values: dict[str, object] = {
        "worker_model": runtime.source,
        "worker_state_dir": tmp / "state",
        "worker_max_slots": runtime.max_slots,
        "worker_host": "127.0.0.1",
        "worker_port": port,
        "worker_token": TOKEN,
        "worker_id": f"w-{port}",
        "personas_dir": PERSONAS,
        "redis_url": redis_url,
        "worker_heartbeat_s": 0.2,
    }
    values.update(overrides)
    settings = WorkerSettings(**values)
    server = make_server(settings, runtime)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("worker did not start")
        time.sleep(0.02)
    try:
        yield Worker(settings=settings, redis_url=redis_url, server=server, thread=thread)
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    embedded = EmbeddedRedis(tmp_path_factory.mktemp("redis") / "worker-test.rdb")
    yield embedded.url
    embedded.close()


@pytest.fixture(scope="module")
def worker(runtime: Runtime, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    with serve(runtime, tmp_path_factory.mktemp("worker"), redis_url) as w:
        yield w


def session(w: Worker, token: str = TOKEN) -> ClientConnection:
    return connect(w.ws, additional_headers={"Authorization": f"Bearer {token}"}, open_timeout=5)


def start(ws: ClientConnection, call_id: str, persona: str = "general-assistant", seed: int = 1):
    ws.send(encode(Start(call_id=call_id, persona=persona, sampling=CallSampling(seed=seed))))
    return decode_server(ws.recv(timeout=5))


def frame(i: int) -> bytes:
    t = (np.arange(1920) + i * 1920) / 24000
    return (3000 * np.sin(2 * np.pi * 200 * t)).astype("<i2").tobytes()


def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def closed_code(ws: ClientConnection) -> int | None:
    with contextlib.suppress(ConnectionClosed, TimeoutError):
        while True:
            ws.recv(timeout=5)
    return ws.close_code


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token-123"}, {"Authorization": TOKEN}])
def test_a_missing_or_wrong_token_is_refused_before_the_socket_opens(worker: Worker, headers: dict) -> None:
    with pytest.raises(InvalidStatus) as err:
        connect(worker.ws, additional_headers=headers, open_timeout=5)
    assert err.value.response.status_code == 403


def test_unknown_persona_is_an_error_then_close(worker: Worker) -> None:
    with session(worker) as ws:
        reply = start(ws, "call-unknown", persona="no-such-line")
        assert reply.type == "error" and reply.code == "unknown_persona"
        assert closed_code(ws) == 1008
    assert worker.health()["slots"]["used"] == 0


def test_a_call_gets_one_bot_frame_per_caller_frame_and_end_frees_the_slot(worker: Worker) -> None:
    n = 6
    with session(worker) as ws:
        ready = start(ws, "call-ok")
        assert ready.type == "ready" and ready.call_id == "call-ok" and ready.worker_id == worker.settings.worker_id
        assert 0 <= ready.prefill_ms < 1000
        assert worker.health()["slots"]["used"] == 1
        bot: list[bytes] = []
        texts = []
        for i in range(n):
            ws.send(frame(i))
            while len(bot) < i + 1:
                message = ws.recv(timeout=5)
                if isinstance(message, bytes):
                    bot.append(message)
                else:
                    texts.append(decode_server(message))
        assert all(len(b) == BOT_FRAME_BYTES for b in bot)
        ws.send(encode(End(reason="caller_hangup")))
        ended = None
        while ended is None:
            message = ws.recv(timeout=5)
            if isinstance(message, str):
                parsed = decode_server(message)
                if parsed.type == "ended":
                    ended = parsed
                else:
                    texts.append(parsed)
        assert (ended.reason, ended.frames_in, ended.frames_out) == ("caller_hangup", n, n)
        assert {t.type for t in texts} <= {"text", "timing"}
        assert all(0 <= t.frame < n for t in texts)
        # The gateway aligns its framing from these: the least wait over the first frames, on the tick grid.
        timings = [t for t in texts if t.type == "timing"]
        assert [t.frames for t in timings] == [TIMING_FIRST_FRAMES]
        assert timings[0].tick_ms > 0 and timings[0].wait_ms >= 0
        assert closed_code(ws) == 1000
    wait_for(lambda: worker.health()["slots"]["used"] == 0)
    metrics = httpx.get(f"{worker.http}/metrics", timeout=5).text
    assert "worker_tick_seconds_bucket" in metrics
    frames_out = next(line for line in metrics.splitlines() if line.startswith("worker_frames_out_total"))
    assert float(frames_out.split()[1]) >= n


def test_a_dropped_connection_frees_the_slot(worker: Worker) -> None:
    with session(worker) as ws:
        assert start(ws, "call-drop").type == "ready"
        ws.send(frame(0))
        ws.recv(timeout=5)
        assert worker.health()["slots"]["used"] == 1
        ws.socket.shutdown(socket.SHUT_RDWR)  # no End, no close handshake: the TCP connection just goes away
        wait_for(lambda: worker.health()["slots"]["used"] == 0)


def test_a_wrong_sized_frame_is_a_bad_request_and_frees_the_slot(worker: Worker) -> None:
    with session(worker) as ws:
        assert start(ws, "call-bad").type == "ready"
        ws.send(b"\x00" * 100)
        reply = decode_server(ws.recv(timeout=5))
        assert reply.type == "error" and reply.code == "bad_request" and "100 bytes" in reply.message
        assert closed_code(ws) == 1007
    wait_for(lambda: worker.health()["slots"]["used"] == 0)


def test_a_first_message_that_is_not_start_is_a_bad_request(worker: Worker) -> None:
    with session(worker) as ws:
        ws.send(json.dumps({"type": "start", "persona": "general-assistant"}))  # no call_id
        reply = decode_server(ws.recv(timeout=5))
        assert reply.type == "error" and reply.code == "bad_request" and "call_id" in reply.message


def test_more_calls_than_slots_get_busy(worker: Worker) -> None:
    slots = worker.settings.worker_max_slots
    with contextlib.ExitStack() as stack:
        calls = [stack.enter_context(session(worker)) for _ in range(slots)]
        for i, ws in enumerate(calls):
            assert start(ws, f"call-fill-{i}").type == "ready"
        with session(worker) as extra:
            reply = start(extra, "call-extra")
            assert reply.type == "error" and reply.code == "busy"
            assert closed_code(extra) == 1013
        health = worker.health()
        assert (health["slots"]["used"], health["slots"]["free"]) == (slots, 0)
    wait_for(lambda: worker.health()["slots"]["used"] == 0)
    with session(worker) as again:  # a slot given back is served again
        assert start(again, "call-after").type == "ready"


def test_healthz_reports_the_model_and_the_engine(worker: Worker) -> None:
    health = worker.health()
    assert health["status"] == "ok"
    assert health["model"]["kind"] == "dir" and health["model"]["device"] == "cpu"
    assert health["slots"]["max"] == worker.settings.worker_max_slots
    assert health["ticks"]["running"] is True
    assert health["tick"] == {"compiled": None, "cuda_graph": False}  # the defaults: eager
    assert set(health["personas"]) == {"general-assistant", "restaurant-orders", "waste-management"}


def test_worker_compile_compiles_the_engine_tick_before_the_worker_serves(
    runtime: Runtime, make_settings: Callable[..., WorkerSettings]
) -> None:
    app = create_app(make_settings(worker_compile=True, worker_cuda_graph=True), runtime)
    tick = app.state.engine.model_tick
    assert tick.compiled == "inductor" and tick.compile_s > 0
    assert tick.graphed is False  # WORKER_CUDA_GRAPH only takes effect on a CUDA device


def test_the_worker_registers_heartbeats_and_unregisters(runtime: Runtime, redis_url: str, tmp_path: Path) -> None:
    with serve(runtime, tmp_path, redis_url, worker_id="w-registry") as w:
        (info,) = [i for i in w.workers() if i.worker_id == "w-registry"]
        assert info.url == w.settings.resolved_worker_url == f"ws://127.0.0.1:{w.settings.worker_port}"
        assert info.max_slots == runtime.max_slots and info.alive
        with session(w) as ws:
            assert start(ws, "call-hb").type == "ready"
            wait_for(lambda: next(i for i in w.workers() if i.worker_id == "w-registry").active == 1)
        first_beat = info.heartbeat_at
        wait_for(lambda: next(i for i in w.workers() if i.worker_id == "w-registry").heartbeat_at > first_beat)
    assert "w-registry" not in [i.worker_id for i in w.workers()]
