"""CallTape: what the gateway keeps of a call so that another worker can take it over; bounded.

A call's LM state is a pure function of its persona prompt and its token history (17 tokens per
80 ms frame), so a new worker rebuilds it from `Start.resume`: the last complete frames and the
caller audio just before the resume point (to warm its codec). The tape keeps exactly that, plus
the caller frames a new worker must be sent again.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from app import protocol


class CallTape:
    """The call's complete frames and recent caller frames, in call-frame numbering.

    Call frame j is the j-th caller frame the call sent (over all its workers). The answer to caller
    frame j carries the tokens of complete frame j - 1; `completed` frames 0 .. completed - 1 are
    known, the last `max_frames` of them kept. Caller frames are kept from the oldest a resume
    needs (MAX_WARM_FRAMES before the resume point) to the newest sent: `caller_frames` of them.
    """

    def __init__(self, *, max_frames: int = protocol.MAX_RESUME_FRAMES, caller_frames: int) -> None:
        self.history = protocol.CallHistory(max_frames)  # the complete frames
        self._caller: deque[bytes] = deque(maxlen=caller_frames)  # caller frames sent - len .. sent - 1
        self.sent = 0  # caller frames sent (the index of the next one)
        self.answered = 0  # caller frames whose answer was pushed toward the caller

    @property
    def completed(self) -> int:
        """Complete frames known."""
        return self.history.completed

    @property
    def max_frames(self) -> int:
        return self.history.capacity

    def add_caller(self, pcm: bytes) -> int:
        """Caller frame `sent` (PCM16, one 80 ms frame) was taken for sending; returns its index."""
        self._caller.append(pcm)
        self.sent += 1
        return self.sent - 1

    def caller(self, index: int) -> bytes | None:
        """Caller frame `index` if still kept."""
        first = self.sent - len(self._caller)
        if first <= index < self.sent:
            return self._caller[index - first]
        return None

    def add_answer(self, index: int, tokens: np.ndarray | None) -> None:
        """The answer to caller frame `index` arrived, with the tokens of complete frame index - 1."""
        if tokens is not None and index - 1 == self.completed:
            self.history.add(tokens)

    def frames(self) -> np.ndarray:
        """[n, 17] int16: the last n = min(completed, max_frames) complete frames, oldest first."""
        return self.history.span(self.history.first, self.completed)

    def resume(self) -> protocol.Resume:
        """Start.resume for a worker taking the call over at frame `completed`."""
        n = self.completed
        warm = [self.caller(i) for i in range(max(0, n - protocol.MAX_WARM_FRAMES), n)]
        kept = [pcm for pcm in warm if pcm is not None]
        pcm = np.frombuffer(b"".join(kept), dtype="<i2").reshape(-1, protocol.FRAME_SAMPLES)
        return protocol.Resume.of(self.frames(), n, pcm)
