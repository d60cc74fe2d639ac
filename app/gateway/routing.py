"""Which worker a call goes to: the gateway's `WorkerRouter` (app/pipecat/service.py) on Redis.

A call's slot is reserved atomically in Redis (`CallStore.reserve_slot`): on a routable worker
(heartbeat fresh, not draining, not suspect) with the most free slots, never on one the call is
moving away from. A worker this gateway could not connect to, or lost a session on, is marked
suspect for `suspect_s`: no gateway sends it a new call meanwhile (a restarted worker clears the
mark when it registers).

While Redis is unreachable a worker's heartbeat cannot be read: `lapsed` says False (the call's
own connection still tells a dead worker) and logs that once per 30 s for the gateway (`app/outage.py`).
"""

from __future__ import annotations

import logging

from redis.exceptions import RedisError

from app.callstate import CallStore, Reservation
from app.outage import OutageLog

logger = logging.getLogger(__name__)



class RedisRouter:
    """Reserve, move and release calls' worker slots through the call store."""

    def __init__(self, store: CallStore, *, suspect_s: float) -> None:
        self.store = store
        self.suspect_s = suspect_s
        self._heartbeats_outage = OutageLog(logger, "workers' heartbeats", failing="unreadable, redis unreachable")

    async def reserve(self, call_id: str, avoid: frozenset[str]) -> Reservation | None:
        return await self.store.reserve_slot(call_id, exclude=sorted(avoid))

    async def release(self, call_id: str) -> None:
        await self.store.release_slot(call_id)

    async def report_failure(self, worker_id: str, detail: str) -> None:
        logger.warning("worker %s is suspect for %.0f s: %s", worker_id, self.suspect_s, detail)
        await self.store.mark_suspect(worker_id, self.suspect_s, detail)

    async def lapsed(self, worker_id: str) -> bool:
        try:
            lapsed = await self.store.worker_lapsed(worker_id)
        except (RedisError, OSError) as exc:
            self._heartbeats_outage.failed(exc, ": calls go on")
            return False
        self._heartbeats_outage.recovered()
        return lapsed
