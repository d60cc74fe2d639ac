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
- Lead: every `lead_window` frames handed out, `Paced.lead_s` says the least time one of them
  waited here, from `put` to its hand-out. Windows are short (`first_lead_frames`) while a delay
  may be building or going: the first `short_windows` after the frame the clock started or
  restarted with (a worker catching up after a stall sends its frames faster than real time for a
  few ticks, so the first short window may still see a frame that waited nothing), and the one
  after a cut, so a stall's delay is seen and gone within about a second. Frames of a burst (put
  less than three quarters of a frame after the one before: that catch-up) do not count: they come
  earlier and earlier until it is over, so their least wait says nothing about the delay that
  stays; a window of burst frames only reports with the first frame after the burst.
  Frames that all waited that long are that much later than they need to be: after a restart
  the schedule's phase is where the first late frame happened to come, and a frame that stands behind the due one (within the playout target) is a
  whole frame of delay that never goes. Nothing here can take it out without cutting audio (the
  sink plays everything it is given, in real time): the consumer cuts that much from a frame
  (app/pipecat/playout_trim.py) and says so with `advance`, which moves the schedule earlier.
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

BURST_SPACING = 0.75  # of a frame: a frame put sooner than this after the one before is part of a burst


@dataclass(frozen=True)
class Paced(Generic[T]):
    """A frame that is due now."""

    item: T
    dropped: int = 0  # older frames dropped just before it to get back to the playout target
    restarted: bool = False  # the clock restarted for it (it came more than the tolerance late)
    lead_s: float | None = None  # every lead_window frames: the least time those frames waited here


class OutputPacer(Generic[T]):
    """A bounded queue of frames handed out one per frame period (see the module docstring)."""

    def __init__(
        self,
        *,
        capacity: int,
        target_frames: int = 1,
        frame_s: float = protocol.FRAME_SECONDS,
        tolerance_s: float | None = None,
        lead_window: int = 12,
        first_lead_frames: int = 4,
        short_windows: int = 3,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        """Args:
        capacity: frames held at most (>= 1); on arrival beyond it the oldest is dropped.
        target_frames: frames that may wait behind the due one (capped at capacity - 1).
        frame_s: the frame period.
        tolerance_s: how late a frame may be pushed and the schedule kept (default half a frame).
        lead_window: frames handed out per lead report (about a second of frames).
        first_lead_frames: frames of a short lead window (see the module docstring).
        short_windows: short lead windows after the clock (re)starts.
        clock, sleep: the time source (tests pass a virtual one).
        """
        if capacity < 1 or target_frames < 0 or lead_window < 1 or first_lead_frames < 1 or short_windows < 1:
            raise ValueError(
                "capacity, lead_window, first_lead_frames and short_windows must be >= 1 and target_frames >= 0, "
                f"got {capacity}, {lead_window}, {first_lead_frames}, {short_windows}, {target_frames}"
            )
        self.capacity = capacity
        self.target_frames = min(target_frames, capacity - 1)
        self.frame_s = frame_s
        self.tolerance_s = frame_s / 2 if tolerance_s is None else tolerance_s
        self._clock = clock
        self._sleep = sleep
        self.lead_window = lead_window
        self.first_lead_frames = first_lead_frames
        self.short_windows = short_windows
        self._queue: deque[tuple[T, float, bool]] = deque()  # (frame, when it was put, part of a burst)
        self._last_put: float | None = None
        self._ready = asyncio.Event()
        self._due: float | None = None  # when the next frame is due (None: the clock has not started)
        self._lead_frames = 0  # frames handed out in the current lead window
        self._lead_need = first_lead_frames  # frames of the current lead window
        self._short_left = short_windows - 1  # short windows still to come after the current one
        self._lead_s = float("inf")  # the least wait among them

    def __len__(self) -> int:
        return len(self._queue)

    def put(self, item: T) -> int:
        """Queue a frame; returns how many older frames were dropped to stay within capacity (0 or 1)."""
        dropped = 0
        if len(self._queue) >= self.capacity:
            self._queue.popleft()
            dropped = 1
        now = self._clock()
        burst = self._last_put is not None and now - self._last_put < self.frame_s * BURST_SPACING
        self._last_put = now
        self._queue.append((item, now, burst))
        self._ready.set()
        return dropped

    def advance(self, seconds: float) -> None:
        """The frame just handed out was `seconds` shorter than a frame (the consumer cut that much
        of it): the next frames are due that much sooner. Starts a new lead window, a short one
        (`first_lead_frames`): what is left after the cut is seen soon."""
        if seconds < 0:
            raise ValueError(f"advance takes seconds >= 0, got {seconds}")
        if self._due is not None:
            self._due -= seconds
        self._short_left = max(self._short_left, 1)
        self._reset_lead()

    def _reset_lead(self) -> None:
        """Start the next lead window: a short one while `_short_left` says so."""
        self._lead_frames = 0
        self._lead_need = self.lead_window
        if self._short_left > 0:
            self._short_left -= 1
            self._lead_need = self.first_lead_frames
        self._lead_s = float("inf")

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
        started = self._due is None
        if started:
            self._due = now
        elif now - self._due > self.tolerance_s:
            self._due = now
            restarted = True
        dropped = 0
        while len(self._queue) > self.target_frames + 1:
            self._queue.popleft()
            dropped += 1
        item, put_at, burst = self._queue.popleft()
        self._due += self.frame_s
        if started or restarted:
            # A new phase, set by this frame (it goes at once): the lead is that of the frames after it.
            self._short_left = self.short_windows
            self._reset_lead()
            return Paced(item, dropped=dropped, restarted=restarted)
        if not burst:
            self._lead_s = min(self._lead_s, now - put_at)
        self._lead_frames += 1
        lead_s = None
        if self._lead_frames >= self._lead_need and self._lead_s != float("inf"):  # a burst's frames only: wait
            lead_s = self._lead_s
            self._reset_lead()
        return Paced(item, dropped=dropped, restarted=restarted, lead_s=lead_s)
