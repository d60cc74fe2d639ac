"""The gateway's heartbeat and reaper: a dead gateway's records end, a live one's never do."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
import redis.asyncio as aioredis

from app.callstate import CallStatus, CallStore, EndReason
from app.config import GatewaySettings
from app.gateway.metrics import GatewayMetrics
from app.gateway.upkeep import Upkeep, instance_id


def settings(**overrides: float) -> GatewaySettings:
    values = {"gateway_heartbeat_s": 0.1, "gateway_reap_s": 0.1, "stream_timeout_s": 15.0} | overrides
    return GatewaySettings(redis_url="unix:///nonexistent", **values)


async def open_call(store: CallStore, call_id: str) -> None:
    await store.create_call(call_id, channel="twilio", persona="p")
    assert await store.reserve_slot(call_id) is not None
    await store.transition(call_id, CallStatus.CONNECTING)
    await store.transition(call_id, CallStatus.ACTIVE)


def test_each_gateway_process_gets_its_own_id() -> None:
    config = GatewaySettings(gateway_id="gw-east", redis_url="unix:///nonexistent")
    first, second = instance_id(config), instance_id(config)
    assert first.startswith("gw-east-") and second.startswith("gw-east-") and first != second


async def test_a_live_gateway_ends_the_calls_of_one_that_stopped_beating_and_frees_their_slots(
    redis_client,
) -> None:
    dead_store = CallStore(redis_client, gateway_id="gw-dead")
    live_store = CallStore(redis_client, gateway_id="gw-live")
    await live_store.register_worker("w", "ws://127.0.0.1:1", max_slots=4)
    dead, live = Upkeep(dead_store, settings(), GatewayMetrics()), Upkeep(live_store, settings(), GatewayMetrics())
    await dead.start()
    await live.start()
    try:
        await open_call(dead_store, "of-the-dead")
        await open_call(live_store, "of-the-living")
        for task in dead._tasks:  # the dead gateway's process vanished: no unregister, no more beats
            task.cancel()
        await asyncio.sleep(0.3)
        assert (await live_store.get_call("of-the-dead")).status == CallStatus.ACTIVE  # not lapsed yet

        await redis_client.hset("cc:gateway:gw-dead", "heartbeat_at", repr(time.time() - 60))
        deadline = time.monotonic() + 5
        while (await live_store.get_call("of-the-dead")).status == CallStatus.ACTIVE and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        record = await live_store.get_call("of-the-dead")
        assert (record.status, record.end_reason) == (CallStatus.FAILED, EndReason.GATEWAY_LOST)
        assert (await live_store.get_call("of-the-living")).status == CallStatus.ACTIVE
        (worker,) = await live_store.workers()
        assert worker.reserved == 1
        assert live.metrics.reaped.labels("gateway_lost")._value.get() == 1
    finally:
        await live.stop()
        await dead.stop()
    assert await live_store.live_gateways() == set()  # both unregistered at stop


async def test_while_redis_is_unreachable_the_loops_keep_trying_and_log_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = aioredis.from_url("unix:///nonexistent/redis.sock", decode_responses=True)
    upkeep = Upkeep(CallStore(client, gateway_id="gw"), settings(), GatewayMetrics())
    with caplog.at_level(logging.WARNING, logger="app.gateway.upkeep"):
        await upkeep.start()  # does not raise
        await asyncio.sleep(0.6)  # ~6 beats and ~6 reaps fail
        await upkeep.stop()
    lines = [r for r in caplog.records if "redis unreachable" in r.getMessage()]
    assert len(lines) == 2, [r.getMessage() for r in lines]  # one per loop, not one per try
    await client.aclose()
