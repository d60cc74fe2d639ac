"""Fixtures: one embedded Redis (flushed per test), a fake worker thread, real gateways on uvicorn."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from app.callstate import TERMINAL, CallRecord, CallStore
from app.config import GatewaySettings
from app.gateway.app import create_app, make_server
from app.personas import PersonaBook
from tests.gateway.twilio_fake import AUTH_TOKEN
from tests.pipecat.fake_worker import TOKEN, FakeWorker, FakeWorkerThread

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def fake_worker() -> Iterator[FakeWorker]:
    with FakeWorkerThread(FakeWorker()) as worker:
        yield worker


class GatewayServer:
    """create_app(settings) served by uvicorn on 127.0.0.1:<free port> in a thread of its own."""

    def __init__(self, redis_url: str, personas: PersonaBook | None = None, **overrides: Any) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        values: dict[str, Any] = {
            "redis_url": redis_url,
            "public_url": self.base,
            "twilio_auth_token": AUTH_TOKEN,
            "admin_token": "test-admin-token",
            "worker_token": TOKEN,
            "personas_dir": REPO / "personas",
            "worker_connect_timeout_s": 3.0,
            "worker_failover_timeout_s": 1.0,
        }
        values.update(overrides)
        self.settings = GatewaySettings(**values)
        self.server = make_server(self.settings, create_app(self.settings, personas=personas))
        self._thread = threading.Thread(target=self._run, name=f"gateway-{self.port}", daemon=True)

    def _run(self) -> None:
        asyncio.run(self.server.serve(sockets=[self._socket]))

    @property
    def stream_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/twilio/stream"

    def start(self) -> GatewayServer:
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("gateway did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=15)
        self._socket.close()


@pytest.fixture
def gateway_factory(redis_url: str) -> Iterator[Callable[..., GatewayServer]]:
    servers: list[GatewayServer] = []

    def make(personas: PersonaBook | None = None, **overrides: Any) -> GatewayServer:
        server = GatewayServer(redis_url, personas, **overrides).start()
        servers.append(server)
        return server

    try:
        yield make
    finally:
        for server in servers:
            server.stop()


@pytest_asyncio.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
        yield client


async def wait_for_end(store: CallStore, call_id: str, timeout: float = 5.0) -> CallRecord:
    """The call's record once it reached a terminal status."""
    deadline = time.monotonic() + timeout
    while True:
        record = await store.get_call(call_id)
        if record is not None and record.status in TERMINAL:
            return record
        if time.monotonic() > deadline:
            raise AssertionError(f"call {call_id} did not end: {record}")
        await asyncio.sleep(0.05)


def statuses(events: list[dict[str, str]]) -> list[str]:
    return [e["to"] for e in events if e["type"] == "status"]
