"""Draining a worker (POST /admin/drain; SIGTERM does the same, see tests/e2e/test_failover.py):
the registry says so at once, live sessions get Move, new ones are refused, and the server exits
once its sessions are gone or the grace period is over."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from app.protocol import End, decode_server, encode
from app.worker.runtime import Runtime
from app.worker.server import WorkerServer

from .test_server import TOKEN, Worker, frame, redis_url, serve, session, start, wait_for  # noqa: F401  (fixture)


@dataclass
class Running:
    worker: Worker
    server: WorkerServer
    thread: threading.Thread

    def drain(self, token: str = TOKEN) -> httpx.Response:
        return httpx.post(
            f"{self.worker.http}/admin/drain", headers={"Authorization": f"Bearer {token}"}, timeout=5
        )

    def draining_in_registry(self) -> bool:
        return any(w.worker_id == self.worker.settings.worker_id and w.draining for w in self.worker.workers())


@contextlib.contextmanager
def serve_drainable(runtime: Runtime, tmp: Path, redis_url: str, **overrides: object) -> Iterator[Running]:
    """The worker's server in a thread; heartbeats slow on purpose: the drain must reach the
    registry by itself."""
    with serve(runtime, tmp, redis_url, **({"worker_heartbeat_s": 5.0} | overrides)) as worker:
        yield Running(worker, worker.server, worker.thread)


def _until_move(ws) -> list[str]:
    """Messages up to and including the Move (bot frames skipped)."""
    seen = []
    while True:
        message = ws.recv(timeout=10)
        if isinstance(message, str):
            seen.append(decode_server(message).type)
            if seen[-1] == "move":
                return seen


def test_drain_moves_live_calls_refuses_new_ones_and_exits_when_they_are_gone(
    runtime: Runtime, redis_url: str, tmp_path: Path
) -> None:
    with serve_drainable(runtime, tmp_path, redis_url) as running:
        assert running.drain(token="not-the-worker-token").status_code == 403
        assert not running.draining_in_registry()
        with session(running.worker) as live:
            assert start(live, "call-live").type == "ready"
            live.send(frame(0))
            reply = running.drain()
            assert reply.status_code == 202 and reply.json()["sessions"] == 1 and reply.json()["started"]
            assert running.drain().json()["started"] is False  # idempotent
            assert "move" in _until_move(live)
            wait_for(running.draining_in_registry, timeout=5)  # at once, not at the next (5 s) heartbeat
            assert running.worker.health()["draining"] is True
            with session(running.worker) as late:  # a gateway that did not see the drain yet
                refused = start(late, "call-late")
                assert refused.type == "error" and refused.code == "shutting_down"
            assert running.thread.is_alive()  # the moved call's old session is still here
            live.send(encode(End(reason="moved")))
            with contextlib.suppress(ConnectionClosed, TimeoutError):
                while True:
                    live.recv(timeout=5)
        running.thread.join(20)
        assert not running.thread.is_alive()  # no session left: the worker exited
    assert running.worker.settings.worker_id not in [w.worker_id for w in running.worker.workers()]


@pytest.mark.parametrize("grace_s", [1.0])
def test_drain_exits_after_the_grace_period_with_calls_left(
    runtime: Runtime, redis_url: str, tmp_path: Path, grace_s: float
) -> None:
    with serve_drainable(runtime, tmp_path, redis_url, worker_drain_grace_s=grace_s) as running:
        with session(running.worker) as stuck:
            assert start(stuck, "call-stuck").type == "ready"
            started = time.monotonic()
            assert running.drain().status_code == 202
            assert "move" in _until_move(stuck)  # ... which this gateway ignores
            running.thread.join(grace_s + 20)
            assert not running.thread.is_alive()
            assert time.monotonic() - started >= grace_s * 0.9
