"""The gateway's upkeep in Redis: its heartbeat, and ending the records nobody else will end.

Each gateway process has its own id (`instance_id`: the configured name or the hostname, plus the
pid and a random suffix, so a restarted gateway is a new one), beats every `gateway_heartbeat_s`
and, every `gateway_reap_s` (and once at start), runs `CallStore.reap`: the calls of a gateway
that stopped beating end failed/gateway_lost, a `ringing` record whose stream never came within
`stream_timeout_s` ends failed/error, and their worker slots are released. Every live gateway does
it, so the records of a killed gateway are ended within about `gateway_lapse_s + gateway_reap_s`
(~17 s with the defaults) by whichever gateway is left or starts next.

While Redis is unreachable both loops keep trying and say so once per 30 s (`app/outage.py`), not per try.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket

from redis.exceptions import RedisError

from app.callstate import CallStore
from app.config import GatewaySettings
from app.gateway.metrics import GatewayMetrics
from app.outage import OutageLog

logger = logging.getLogger(__name__)


def instance_id(settings: GatewaySettings) -> str:
    """This gateway process's id in Redis: unique per process, readable by an operator."""
    return f"{settings.gateway_id or socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class Upkeep:
    """The heartbeat and reaper tasks of one gateway process (see the module docstring)."""

    def __init__(self, store: CallStore, settings: GatewaySettings, metrics: GatewayMetrics) -> None:
        if store.gateway_id is None:
            raise ValueError("the gateway's CallStore needs its gateway_id")
        self.gateway_id = store.gateway_id
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self._tasks: list[asyncio.Task[None]] = []
        self._beat_outage = OutageLog(logger, f"gateway {self.gateway_id} heartbeat")
        self._reap_outage = OutageLog(logger, f"gateway {self.gateway_id} reaper")

    async def start(self) -> None:
        """Beat and reap once now (a Redis error is logged, not raised), then keep doing it."""
        await self._beat()
        await self._reap()
        self._tasks = [
            asyncio.create_task(self._every(self.settings.gateway_heartbeat_s, self._beat), name="gateway-heartbeat"),
            asyncio.create_task(self._every(self.settings.gateway_reap_s, self._reap), name="gateway-reaper"),
        ]

    async def stop(self) -> None:
        """Stop both loops and unregister (the calls still open are then reaped by the others)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        try:
            await self.store.unregister_gateway(self.gateway_id)
        except (RedisError, OSError) as exc:
            logger.warning("could not unregister gateway %s: %r", self.gateway_id, exc)

    async def _every(self, period_s: float, step) -> None:
        while True:
            await asyncio.sleep(period_s)
            await step()

    async def _beat(self) -> None:
        try:
            await self.store.gateway_heartbeat(self.gateway_id, self.settings.gateway_heartbeat_s)
        except (RedisError, OSError) as exc:
            self._beat_outage.failed(exc)
            return
        self._beat_outage.recovered()

    async def _reap(self) -> None:
        try:
            reaped = await self.store.reap(
                stream_timeout_s=self.settings.stream_timeout_s,
                transfer_timeout_s=self.settings.transfer_timeout_s,
            )
        except (RedisError, OSError) as exc:
            self._reap_outage.failed(exc)
            return
        self._reap_outage.recovered()
        for record in reaped:
            self.metrics.reaped.labels(record.end_reason.value).inc()
            logger.warning(
                "call %s: was %s with nobody to end it: failed (%s): %s",
                record.call_id, record.was.value, record.end_reason.value, record.error,
            )
