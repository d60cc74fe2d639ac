"""The gateway's call-state writer: in order, through a Redis outage, bounded."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from app.callstate import CallStatus, CallStore, EmbeddedRedis, EndReason
from app.gateway.writes import StateWriter


def _kill(server: EmbeddedRedis) -> None:
    os.kill(int(Path(server._server.pidfile).read_text().strip()), signal.SIGKILL)
    deadline = time.monotonic() + 10
    while server.alive(timeout_s=0.2) and time.monotonic() < deadline:
        time.sleep(0.05)


async def test_writes_made_while_redis_is_down_are_all_written_in_order_once_it_is_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = EmbeddedRedis(tmp_path / "db.rdb")
    client = aioredis.from_url(server.url, decode_responses=True)
    store = CallStore(client, gateway_id="gw")
    writer = StateWriter()
    writer.start()
    try:
        await store.create_call("c", channel="twilio", persona="p")
        await store.transition("c", CallStatus.CONNECTING)
        await asyncio.to_thread(_kill, server)

        with caplog.at_level(logging.WARNING, logger="app.gateway.writes"):
            writer.submit(lambda: store.transition("c", CallStatus.ACTIVE), call_id="c", what="active")
            for i in range(200):
                writer.submit(lambda i=i: store.add_event("c", "text", text=f"w{i} "), call_id="c", what="text",
                              droppable=True)
            last = writer.submit(
                lambda: store.end_call("c", CallStatus.COMPLETED, EndReason.CALLER_HANGUP, frames_in=7),
                call_id="c", what="end",
            )
            await asyncio.sleep(1.5)  # the call goes on; the writer retries
            assert writer.redis_unreachable and writer.queued == 202
        unreachable_logs = [r for r in caplog.records if "redis unreachable" in r.getMessage()]
        assert len(unreachable_logs) == 1  # once per interval, not once per write or try

        await asyncio.to_thread(server.restart)
        assert await asyncio.wait_for(last, 20) is True
        record = await store.get_call("c")
        assert (record.status, record.end_reason, record.frames_in) == (
            CallStatus.COMPLETED, EndReason.CALLER_HANGUP, 7,
        )
        assert await store.transcript("c") == "".join(f"w{i} " for i in range(200))  # every piece, in order
        assert not writer.redis_unreachable and writer.queued == 0
    finally:
        await writer.stop(timeout_s=1)
        await client.aclose()
        server.close()


async def test_a_full_queue_drops_the_oldest_text_never_a_status_write() -> None:
    gate = asyncio.Event()
    written: list[str] = []

    def op(name: str):
        async def run() -> None:
            await gate.wait()
            written.append(name)
        return run

    writer = StateWriter(max_writes=4)
    writer.start()
    try:
        futures = [writer.submit(op("status-1"), call_id="c", what="status")]
        futures += [writer.submit(op(f"text-{i}"), call_id="c", what="text", droppable=True) for i in range(3)]
        futures.append(writer.submit(op("status-2"), call_id="c", what="status"))  # pushes out text-0
        futures.append(writer.submit(op("text-3"), call_id="c", what="text", droppable=True))  # pushes out text-1
        gate.set()
        results = await asyncio.gather(*futures)
    finally:
        await writer.stop(timeout_s=1)
    assert written == ["status-1", "text-2", "status-2", "text-3"]
    assert results == [True, False, False, True, True, True]
    assert writer.stats.dropped == 2 and writer.stats.refused == 0


async def test_a_write_that_fails_for_another_reason_is_skipped_and_the_rest_go_on(redis_client) -> None:
    store = CallStore(redis_client)
    await store.create_call("c", channel="twilio", persona="p")
    writer = StateWriter()
    writer.start()
    try:
        bad = writer.submit(lambda: store.transition("c", CallStatus.ACTIVE), call_id="c", what="ringing->active")
        good = writer.submit(lambda: store.add_event("c", "text", text="hi"), call_id="c", what="text")
        assert await asyncio.wait_for(bad, 5) is False
        assert await asyncio.wait_for(good, 5) is True
    finally:
        await writer.stop(timeout_s=1)
    assert await store.transcript("c") == "hi"
