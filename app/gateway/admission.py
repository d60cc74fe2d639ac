"""Admission: whether this gateway takes one more call, and how late its event loop runs.

A gateway process past its CPU does not slow down gracefully: every call's bot audio comes late
or is dropped (bench/README.md, "One gateway core": one core carries ~25-35 calls). So a gateway
may be capped (`GATEWAY_MAX_CALLS`): beyond the cap a new call hears the busy message (Twilio:
the same TwiML as "no free slot", the overflow number when there is one; the softphone: 503)
instead of degrading the calls already up. The count is this process's live calls plus those its
webhook admitted whose media stream has not started yet (each counted until the stream starts or
`STREAM_TIMEOUT_S` passes), so a burst of webhooks cannot overshoot it.

`LoopLag` is the signal that a gateway is near its core, whatever the machine: a task that sleeps
`period_s` and notes how much later than asked it woke. Its worst value over the last `window_s`
is the `gateway_event_loop_lag_seconds` gauge, and with `GATEWAY_MAX_LOOP_LAG_MS` a gateway whose
loop ran that late in the last window refuses new calls the same way. Measured on one core
(bench/gateway_load.py): worst lag ~3 ms at 10 calls with every frame on time, 71 ms at 25 calls
with 6 % of frames late, 150-300 ms beyond.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable

LAG_PERIOD_S = 0.1
LAG_WINDOW_S = 5.0


class LoopLag:
    """The event loop's timer lateness: the worst of the last `window_s` (see the module docstring)."""

    def __init__(
        self,
        *,
        period_s: float = LAG_PERIOD_S,
        window_s: float = LAG_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        if period_s <= 0 or window_s < period_s:
            raise ValueError(f"period_s > 0 and window_s >= period_s, got {period_s}, {window_s}")
        self.period_s = period_s
        self.window_s = window_s
        self._clock = clock
        self._sleep = sleep
        self._samples: deque[tuple[float, float]] = deque()  # (when measured, lag in seconds)
        self._task: asyncio.Task | None = None

    def note(self, lag_s: float, now: float) -> None:
        """One measurement (the task's; tests call it directly)."""
        self._samples.append((now, max(0.0, lag_s)))
        self._forget(now)

    def worst_s(self, now: float | None = None) -> float:
        """The worst lag measured in the last window (0.0 when none)."""
        self._forget(self._clock() if now is None else now)
        return max((lag for _, lag in self._samples), default=0.0)

    def _forget(self, now: float) -> None:
        while self._samples and self._samples[0][0] < now - self.window_s:
            self._samples.popleft()

    async def run(self) -> None:
        """Measure until cancelled."""
        while True:
            asked_at = self._clock()
            await self._sleep(self.period_s)
            woke_at = self._clock()
            self.note(woke_at - asked_at - self.period_s, woke_at)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run(), name="gateway-loop-lag")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass


class Admission:
    """Counts this gateway's calls against `max_calls` (0: no cap) and watches its loop lag against
    `max_loop_lag_s` (0: not watched)."""

    def __init__(
        self,
        *,
        max_calls: int,
        pending_s: float,
        live_calls: Callable[[], int],
        max_loop_lag_s: float = 0.0,
        loop_lag_s: Callable[[], float] = lambda: 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_calls < 0 or pending_s <= 0 or max_loop_lag_s < 0:
            raise ValueError(
                f"max_calls >= 0, pending_s > 0 and max_loop_lag_s >= 0, got {max_calls}, {pending_s}, {max_loop_lag_s}"
            )
        self.max_calls = max_calls
        self.max_loop_lag_s = max_loop_lag_s
        self._loop_lag_s = loop_lag_s
        self.pending_s = pending_s
        self._live_calls = live_calls
        self._clock = clock
        self._pending: dict[str, float] = {}  # call id -> until when it counts without a stream

    def calls(self, *, besides: str | None = None) -> int:
        """Live calls plus admitted ones whose stream has not started (and has not timed out), not
        counting `besides` (a webhook Twilio repeated for a call admitted already)."""
        now = self._clock()
        for call_id in [c for c, until in self._pending.items() if until <= now]:
            del self._pending[call_id]
        return self._live_calls() + len(self._pending) - (besides in self._pending)

    def refusal(self, call_id: str | None = None) -> str | None:
        """Why one more call (`call_id`) would be refused (None: it is taken)."""
        if self.max_calls and self.calls(besides=call_id) >= self.max_calls:
            return f"this gateway is at its limit of {self.max_calls} calls (GATEWAY_MAX_CALLS)"
        if self.max_loop_lag_s:
            lag_s = self._loop_lag_s()
            if lag_s > self.max_loop_lag_s:
                return (
                    f"this gateway's event loop ran {lag_s * 1000:.0f} ms late (GATEWAY_MAX_LOOP_LAG_MS "
                    f"{self.max_loop_lag_s * 1000:.0f}): it is at its CPU"
                )
        return None

    def admitted(self, call_id: str) -> None:
        """A webhook connected `call_id`: it counts until its stream starts (`started`) or times out."""
        self._pending[call_id] = self._clock() + self.pending_s

    def started(self, call_id: str) -> None:
        """`call_id`'s stream started: it is a live call now (or it ended before that)."""
        self._pending.pop(call_id, None)
