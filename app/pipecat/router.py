"""WorkerRouter: where PersonaPlexService gets a call's worker slot from.

The service knows workers only through this protocol: no Redis, no registry. The gateway's
implementation is `RedisRouter` (app/gateway/routing.py); a test or another application can pass
anything with these four methods.
"""

from __future__ import annotations

from typing import Protocol

from app.callstate import Reservation


class WorkerRouter(Protocol):
    """Reserves, moves and releases one call's worker slot; hears about failing workers."""

    async def reserve(self, call_id: str, avoid: frozenset[str]) -> Reservation | None:
        """A slot for the call on a worker not in `avoid` (the call's reservation moves there);
        None when no such worker has a free slot."""
        ...

    async def release(self, call_id: str) -> None:
        """The call holds no worker slot any more."""
        ...

    async def report_failure(self, worker_id: str, detail: str) -> None:
        """A connect to `worker_id` failed or its session was lost: route no new call there for now."""
        ...

    async def lapsed(self, worker_id: str) -> bool:
        """True when the worker's heartbeat is known to have lapsed."""
        ...
