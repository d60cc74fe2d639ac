"""LatencyTrace: where each caller frame's answer spent its time between the caller and the caller.

The caller's 80 ms of framing are the model's own (it needs the whole frame); everything past that
is added by the server, in three segments, per caller frame and the bot frame that answers it:

    gateway_in    the frame's last caller audio arrived (`InputAudioRawFrame.metadata
                  [RECEIVED_AT]` when the serializer stamped it, else when the service got it)
                  -> the frame sent to the worker (resampling, framing, the send queue)
    worker        sent -> its bot frame came back (network both ways, the wait for the worker's
                  tick, the tick, the worker's send)
    gateway_out   came back -> handed to the output transport (resampling, the pacer's playout)

A frame the pacer drops (re-sync, burst) has no gateway_out and is not reported; neither are
frames sent again to a new worker after a move (the first sending counts: what the caller lived).
Frames are matched by call frame index: one bot frame answers each caller frame, in order.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

RECEIVED_AT = "received_at"  # InputAudioRawFrame.metadata key: time.monotonic() the message arrived


@dataclass(frozen=True, slots=True)
class FrameLatency:
    """One answered caller frame: seconds per segment (module docstring)."""

    gateway_in: float
    worker: float
    gateway_out: float

    @property
    def total(self) -> float:
        return self.gateway_in + self.worker + self.gateway_out


class LatencyTrace:
    """Per call frame index: arrived, sent, answered; `played` completes one into a FrameLatency.

    At most `capacity` frames are kept (the oldest go first): frames that are never answered or
    never played (dropped) cannot pile up.
    """

    def __init__(self, capacity: int = 64) -> None:
        self.capacity = capacity
        self._frames: OrderedDict[int, list[float]] = OrderedDict()  # index -> [arrived, sent, answered]

    def __len__(self) -> int:
        return len(self._frames)

    def sent(self, index: int, arrived_at: float, sent_at: float) -> None:
        if index in self._frames:
            return  # sent again after a move: the first sending is what the caller lived
        self._frames[index] = [arrived_at, sent_at, -1.0]
        while len(self._frames) > self.capacity:
            self._frames.popitem(last=False)

    def answered(self, index: int, at: float) -> None:
        times = self._frames.get(index)
        if times is not None and times[2] < 0:
            times[2] = at

    def played(self, index: int, at: float) -> FrameLatency | None:
        """The frame's answer was handed to the output transport at `at`: its latency (None when
        it was not traced, or not answered); it and every older frame are forgotten."""
        while self._frames:
            first = next(iter(self._frames))
            if first > index:
                return None
            arrived, sent, answered = self._frames.pop(first)
            if first == index:
                if answered < 0:
                    return None
                return FrameLatency(gateway_in=sent - arrived, worker=answered - sent, gateway_out=at - answered)
        return None
