"""One call on this worker: the one record the scheduler, the engine and the server share.

`Engine.open` makes a `Call` and hands it back; that record is the call's handle from then on
(`push`, `end`, `abort` take it). The scheduler's slot table says which record holds which slot, and
a request is applied only while the slot still holds *that record* (identity, not equality): a late
request of an ended call can never touch the next call in the same slot. A record holds a slot once.

It is a module of its own, not part of `scheduler.py`, because three modules write parts of it, each
from its own thread, and the ownership of each field is easiest to see in one place:
    the scheduler  phase, slot, queue, wait_s, reason, aborted, joined, frames_in/run/dropped:
                   under its lock (final once the call is released, so anyone may read them then);
    the engine     resume, history, frames_out, next_frame, offset, caller_codes, rebuilds, waits:
                   on the engine thread only;
    the server     moving: on the event loop only.
The identity fields (call_id, persona_id, sampling, sink) never change.

Lifecycle (`SlotPhase`, a call's own phase):  FREE -> PREFILLING -> ACTIVE -> DRAINING -> FREE
(see `scheduler.py`); FREE before the call is reserved and again once it left its slot.
Plain Python, no torch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

from app.protocol import (
    TIMING_EVERY_FRAMES,
    TIMING_FIRST_FRAMES,
    CallHistory,
    Ended,
    Error,
    Ready,
    Resume,
    Sampling,
    Text,
    Timing,
)

Output = bytes | Ready | Text | Timing | Error | Ended
Sink = Callable[[Output], None]


class SlotPhase(StrEnum):
    FREE = "free"
    PREFILLING = "prefilling"
    ACTIVE = "active"
    DRAINING = "draining"


class QueueWaits:
    """The least queue wait over a run of a call's frames, for `protocol.Timing`: the first report
    after `first` frames (the gateway aligns early in the call), then one every `every` frames."""

    def __init__(self, first: int = TIMING_FIRST_FRAMES, every: int = TIMING_EVERY_FRAMES) -> None:
        self.first, self.every = first, every
        self.reports = 0
        self._least = float("inf")
        self._count = 0

    def add(self, wait_s: float) -> tuple[float, int] | None:
        """One frame's wait; (least wait, frames) when a report is due, else None."""
        self._least = min(self._least, wait_s)
        self._count += 1
        if self._count < (self.first if self.reports == 0 else self.every):
            return None
        report = (self._least, self._count)
        self.reports += 1
        self._least, self._count = float("inf"), 0
        return report


@dataclass(eq=False)  # compared and hashed by identity: the record is the handle
class Call:
    """Everything about one call on this worker; see the module docstring for who writes what."""

    call_id: str
    persona_id: str
    sampling: Sampling
    sink: Sink  # the engine's outputs, called from the engine thread
    history: CallHistory
    resume: Resume | None = field(default=None, repr=False)  # a call moving in: its frames, until loaded

    # the scheduler's, under its lock
    phase: SlotPhase = SlotPhase.FREE
    slot: int = -1  # -1 until reserved; kept after the release (the slot no longer holds this record)
    queue: deque[tuple[bytes, float]] = field(default_factory=deque, repr=False)  # (PCM16, arrived) not yet run
    wait_s: float = 0.0  # how long the frame of the last planned tick waited in the queue
    reason: str = ""  # why it left: the End's reason, or "aborted"
    aborted: bool = False  # freed by an abort (True) or drained after a leave
    joined: bool = False  # the engine loaded its state (activate); stays True after the release
    frames_in: int = 0
    frames_run: int = 0
    frames_dropped: int = 0

    # the engine thread's
    frames_out: int = 0
    next_frame: int = 0  # call frame index of the next caller frame this slot steps
    offset: int = 0  # the slot's LM offset (host mirror): the next step writes KV position offset - 1
    caller_codes: np.ndarray | None = None  # [8] caller codes of the frame in progress
    rebuilds: int = 0
    waits: QueueWaits = field(default_factory=QueueWaits, repr=False)

    # the server's, on its event loop
    moving: bool = False  # the gateway was asked to move this call elsewhere

