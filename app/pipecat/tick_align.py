"""TickAligner: where the gateway cuts the caller's audio into 80 ms frames, so that each frame is
complete just before the worker's tick instead of at a random phase of its grid.

The worker ticks on a fixed grid (`protocol.Timing.tick_ms` apart, one grid for all its calls). A
caller frame is sent once its last audio message has arrived and then waits at the worker for the
next tick: 0-80 ms, 40 ms on average, which the caller hears as delay. The worker reports the
least wait over about a second of frames (`protocol.Timing`). Where frames complete is set by the
audio itself: dropping `d` seconds of the caller's audio once makes every later frame complete `d`
later, i.e. wait `d` less; inserting `d` seconds of silence makes them complete earlier. Frames can
only complete when a transport message arrives (20 ms for Twilio and for WebRTC), so a shift is a
whole number of those messages ("steps").

With the least wait W, a margin m (what the network and the gateway's own scheduling may add to a
frame's way, which the least wait of the window has already shown to fit) and a step s:

    W >= m + s      drop floor((W - m) / s) steps: the wait becomes W - k s, in [m, m + s)
    W <  m / 2      insert one step of silence: frames complete so close to the tick that jitter
                    makes some of them miss it (each one that misses waits a whole tick)
    otherwise       nothing

After a shift the next reports are ignored for `settle_s` (their frames were cut before it); a
new worker (a moved call: a new grid) starts over. Plain Python, no clock of its own.
"""

from __future__ import annotations

import math

DEFAULT_MARGIN_S = 0.008
DEFAULT_SETTLE_S = 2.0


class TickAligner:
    """Turns the worker's Timing reports into framing shifts (see the module docstring)."""

    def __init__(self, *, margin_s: float = DEFAULT_MARGIN_S, settle_s: float = DEFAULT_SETTLE_S) -> None:
        if margin_s <= 0:
            raise ValueError(f"margin_s must be > 0, got {margin_s}")
        self.margin_s = margin_s
        self.settle_s = settle_s
        self._quiet_until = -math.inf
        self.shifts = 0  # shifts decided (drops and inserts)

    def restart(self) -> None:
        """A new worker session (its own grid): the next report counts."""
        self._quiet_until = -math.inf

    def shift(self, *, wait_s: float, step_s: float, now: float) -> float:
        """Seconds of caller audio to drop (> 0) or of silence to insert (< 0) for a report of least
        wait `wait_s`, with transport messages of `step_s`; 0.0 for none."""
        if now < self._quiet_until or step_s <= 0:
            return 0.0
        if wait_s >= self.margin_s + step_s:
            steps = math.floor((wait_s - self.margin_s) / step_s)
            shift = steps * step_s
        elif wait_s < self.margin_s / 2:
            shift = -step_s
        else:
            return 0.0
        self._quiet_until = now + self.settle_s
        self.shifts += 1
        return shift
