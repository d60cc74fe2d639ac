"""OutputPacer: the one real-time clock of the bot's audio on its way to the caller.

Who paces, and why here (Pipecat 1.14, read from pipecat/transports):

- The worker answers every caller frame with one 80 ms bot frame, on its own tick. The frames reach
  the gateway with network and scheduling jitter, and in bursts after a stall or a move.
- Twilio (`FastAPIWebsocketOutputTransport`) has no real-time clock: after each 20 ms chunk,
  `write_audio_frame` sleeps *half* a chunk and restarts that clock whenever it has fallen behind,
  so it drains at twice real time. Whatever it is given too early goes on to Twilio's playout
  buffer, a queue nobody on our side can see or trim.
- The browser (`SmallWebRTCOutputTransport`): aiortc's audio track is a real-time sample clock
  (the RTP sender takes 10 ms every 10 ms on an absolute schedule, silence when it has nothing)
  and `write_audio_frame` returns once its chunk was taken. Audio given to it early waits in
  pipecat's output audio queue, which is unbounded and, again, out of our reach.

So this pacer decides every bot frame's due time, in one place, and never hands audio on faster
than real time (beyond `tolerance_s`): a downstream real-time sink (Twilio's buffer, aiortc's
track) then drains at least as fast as it is filled and holds no more than the frame in play plus
the tolerance; any backlog forms here, where the playout target bounds it. The transports only
write: Twilio's half-chunk sleep sends one frame's four 20 ms media messages within about 30 ms and
keeps no memory across frames; aiortc turns the frames it is given into RTP at the rate it gets them.
Neither transport is subclassed or reconfigured for this.

Rules, with FRAME = 80 ms:
- Frame n after the clock's anchor is due at anchor + n * FRAME, and is never pushed earlier.
- A frame pushed late by at most `tolerance_s` (timer jitter, a slightly late worker) keeps the
  schedule: the next one comes that much sooner, which brings the sink's buffer back to its level.
- Later than that (nothing to play: the worker stalled or moved; or the event loop did), the clock
  restarts at now (`restarted`). The sink has played silence meanwhile; catching up would only
  move that much latency into its queue, for good.
- Playout target: when a frame is due and more than `target_frames` frames wait behind it, the
  oldest are dropped until `target_frames` are left (a re-sync, `dropped`). This is what takes a
  late frame's latency back out (after a restart, or when the worker's clock runs ahead of ours),
  so the latency the pacer adds stays at most (target_frames + 1) frames, plus the tolerance.
- `capacity` bounds the queue on arrival (a burst): the oldest frame is dropped.
A dropped frame never leaves a gap on the caller's timeline: the next frame takes its due time.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from app import protocol

T = TypeVar("T")


@dataclass(frozen=True)
class Paced(Generic[T]):
    """A frame that is due now."""

    item: T
    dropped: int = 0  # older frames dropped just before it to get back to the playout target
    restarted: bool = False  # the clock restarted for it (it came more than the tolerance late)


class OutputPacer(Generic[T]):
    """A bounded queue of frames handed out one per frame period (see the module docstring)."""

    def __init__(
        self,
        *,
        capacity: int,
        target_frames: int = 1,
        frame_s: float = protocol.FRAME_SECONDS,
        tolerance_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        """Args:
        capacity: frames held at most (>= 1); on arrival beyond it the oldest is dropped.
        target_frames: frames that may wait behind the due one (capped at capacity - 1).
        frame_s: the frame period.
        tolerance_s: how late a frame may be pushed and the schedule kept (default half a frame).
        clock, sleep: the time source (tests pass a virtual one).
        """
        if capacity < 1 or target_frames < 0:
            raise ValueError(f"capacity must be >= 1 and target_frames >= 0, got {capacity}, {target_frames}")
        self.capacity = capacity
        self.target_frames = min(target_frames, capacity - 1)
        self.frame_s = frame_s
        self.tolerance_s = frame_s / 2 if tolerance_s is None else tolerance_s
        self._clock = clock
        self._sleep = sleep
        self._queue: deque[T] = deque()
        self._ready = asyncio.Event()
        self._due: float | None = None  # when the next frame is due (None: the clock has not started)

    def __len__(self) -> int:
        return len(self._queue)

    def put(self, item: T) -> int:
        """Queue a frame; returns how many older frames were dropped to stay within capacity (0 or 1)."""
        dropped = 0
        if len(self._queue) >= self.capacity:
            self._queue.popleft()
            dropped = 1
        self._queue.append(item)
        self._ready.set()
        return dropped

    async def next(self) -> Paced[T]:
        """Wait until a frame is due, and hand it out."""
        while True:
            while not self._queue:
                self._ready.clear()
                await self._ready.wait()
            wait_s = self._due - self._clock() if self._due is not None else 0.0
            if wait_s <= 0:
                break
            await self._sleep(wait_s)
        now = self._clock()
        restarted = False
        if self._due is None:
            self._due = now
        elif now - self._due > self.tolerance_s:
            self._due = now
            restarted = True
        dropped = 0
        while len(self._queue) > self.target_frames + 1:
            self._queue.popleft()
            dropped += 1
        item = self._queue.popleft()
        self._due += self.frame_s
        return Paced(item, dropped=dropped, restarted=restarted)
