"""The gateway's call-state writes: one ordered queue, one writer task, and Redis outages survived.

Everything a live call writes to Redis (transitions, timings, DTMF, marks, the bot's text, the
final record) is handed to `StateWriter.submit` and written in submission order by one task, off
the media path. While Redis is unreachable the writer keeps the write at the head of the queue
and tries it again (backoff up to RETRY_MAX_S): the calls go on, and everything is written, in
order, once Redis is back. The queue is bounded (`max_writes`): when it is full the oldest
*droppable* write (a text piece, a mark) makes room; a write that may not be dropped (a status
change, the final record) is only refused if the whole queue is such writes, and that is logged
as an error. An outage shorter than the queue loses no record.

A write that fails for another reason (an `InvalidTransition`: a status callback ended the record
meanwhile; a bug) is logged once and skipped: it would fail again.
Redis trouble is logged once per 30 s with the queue's length (`app/outage.py`), not once per write.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.callstate import InvalidTransition
from app.outage import OutageLog

logger = logging.getLogger(__name__)

Op = Callable[[], Awaitable[Any]]

RETRY_FIRST_S = 0.1
RETRY_MAX_S = 2.0
MAX_WRITES = 20_000  # ~10 minutes of 30 busy calls' text pieces; a few MB at most
_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)


@dataclass
class _Write:
    op: Op
    call_id: str
    what: str
    droppable: bool
    done: asyncio.Future[bool] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


@dataclass
class WriterStats:
    written: int = 0
    retries: int = 0  # tries that found Redis unreachable
    dropped: int = 0  # droppable writes pushed out of a full queue
    refused: int = 0  # writes that could not be queued (the queue was full of writes that may not drop)
    failed: int = 0  # writes that failed for another reason (skipped)


class StateWriter:
    """The gateway's one call-state write queue (see the module docstring)."""

    def __init__(self, *, max_writes: int = MAX_WRITES) -> None:
        if max_writes < 1:
            raise ValueError(f"max_writes must be >= 1, got {max_writes}")
        self.max_writes = max_writes
        self.stats = WriterStats()
        self._queue: deque[_Write] = deque()
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._outage = OutageLog(logger, "call-state writer")

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def redis_unreachable(self) -> bool:
        """The last write found Redis unreachable (and it has not been written since)."""
        return self._outage.failing

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="call-state-writer")

    async def stop(self, timeout_s: float) -> None:
        """Write what is queued (for at most `timeout_s`), then stop; what is left is logged."""
        if self._task is None:
            return
        deadline = time.monotonic() + timeout_s
        while self._queue and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None
        if self._queue:
            calls = sorted({w.call_id for w in self._queue})
            logger.error(
                "call-state writer stopped with %d writes unwritten (redis unreachable?) for calls %s",
                len(self._queue), ", ".join(calls[:20]),
            )
            for write in self._queue:
                if not write.done.done():
                    write.done.set_result(False)
            self._queue.clear()

    def submit(self, op: Op, *, call_id: str, what: str, droppable: bool = False) -> asyncio.Future[bool]:
        """Queue a write; the future is True once written, False if it was dropped or failed."""
        write = _Write(op=op, call_id=call_id, what=what, droppable=droppable)
        if len(self._queue) >= self.max_writes and not self._make_room(write):
            return write.done
        self._queue.append(write)
        self._ready.set()
        return write.done

    def _make_room(self, write: _Write) -> bool:
        for i, queued in enumerate(self._queue):
            if queued.droppable:
                del self._queue[i]
                queued.done.set_result(False)
                self.stats.dropped += 1
                if self.stats.dropped == 1 or self.stats.dropped % 1000 == 0:
                    logger.warning("call-state queue full (%d): dropped %d text/mark writes so far",
                                   self.max_writes, self.stats.dropped)
                return True
        if write.droppable:
            write.done.set_result(False)
            self.stats.dropped += 1
            return False
        self.stats.refused += 1
        write.done.set_result(False)
        logger.error("call %s: call-state queue full of status writes: %s NOT written", write.call_id, write.what)
        return False

    async def _run(self) -> None:
        delay = RETRY_FIRST_S
        while True:
            while not self._queue:
                self._ready.clear()
                await self._ready.wait()
            write = self._queue[0]
            try:
                await write.op()
            except _UNREACHABLE as exc:
                self.stats.retries += 1
                self._outage.failed(exc, f": {len(self._queue)} call-state writes queued")
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            except InvalidTransition as exc:  # e.g. a status callback ended the record meanwhile
                logger.warning("call %s: %s not written: %s", write.call_id, write.what, exc)
                self._finish(write, False)
            except Exception:  # a write that fails for another reason would fail again: skip it
                logger.exception("call %s: writing %s failed", write.call_id, write.what)
                self.stats.failed += 1
                self._finish(write, False)
            else:
                self.stats.written += 1
                self._finish(write, True)
            delay = RETRY_FIRST_S
            self._outage.recovered(f": {len(self._queue)} call-state writes still queued")

    def _finish(self, write: _Write, ok: bool) -> None:
        if self._queue and self._queue[0] is write:
            self._queue.popleft()
        if not write.done.done():
            write.done.set_result(ok)
