"""PlayoutTrim: takes the bot audio's standing delay out at the gateway, a little audio at a time.

The output pacer (app/pipecat/pacer.py) reports, about once a second (and soon after its clock
restarts), the least time its frames waited for their due time (`Paced.lead_s`). That much of every frame's delay is not needed for
jitter: it is where the pacer's schedule happens to sit after a restart, or a whole frame that
stands behind the playing one since a burst. The sink downstream (Twilio's buffer, aiortc's track)
plays all it is given, in real time, so the only way to take the delay out is to play less audio:
this cuts it from the start of the next frames and the pacer moves its schedule that much earlier
(`OutputPacer.advance`).

With the least wait L, a margin m and a step s (the output transport's chunk: it sends whole
chunks only, so cutting whole chunks leaves it no partial chunk to hold back):

    L >= m + s / 2  cut round((L - m) / s) steps (the nearest whole step), at most one frame's
                    worth per frame
    otherwise       nothing

The margin is 0 by default: a call's first frame sets the pacer's schedule when it comes, so its
frames wait nothing at the start, and a call after a stall is back where it started, within half a
step. A cut up to half a step too long makes that frame late by as much: it goes when it comes (the
pacer keeps its schedule within its tolerance), a gap of at most 10 ms once, and the frames after
it keep time, as at the start of the call.

A cut waits for a quiet frame (the bot listening, between words) for at most `quiet_wait_s`, then
takes the next frame: a standing delay must not stay because the bot keeps talking. Plain Python,
no clock of its own.
"""

from __future__ import annotations

import math

import numpy as np

from app.pipecat.audio import is_quiet

DEFAULT_MARGIN_S = 0.0  # as at the start of a call (see the module docstring)
DEFAULT_STEP_S = 0.020
DEFAULT_QUIET_WAIT_S = 0.3  # a pause between words mostly comes within it, and a stall is gone within a second


class PlayoutTrim:
    """Decides how much of each bot frame to cut (see the module docstring)."""

    def __init__(
        self,
        *,
        margin_s: float = DEFAULT_MARGIN_S,
        step_s: float = DEFAULT_STEP_S,
        quiet_wait_s: float = DEFAULT_QUIET_WAIT_S,
    ) -> None:
        if margin_s < 0 or step_s <= 0 or quiet_wait_s < 0:
            raise ValueError(f"margin_s >= 0, step_s > 0 and quiet_wait_s >= 0, got {margin_s}, {step_s}, {quiet_wait_s}")
        self.margin_s = margin_s
        self.step_s = step_s
        self.quiet_wait_s = quiet_wait_s
        self.pending_s = 0.0  # still to cut
        self._force_at = math.inf  # cut even a loud frame from then on
        self.trimmed_s = 0.0  # cut so far (all frames)
        self.trims = 0  # lead reports that asked for a cut

    def offer(self, lead_s: float, now: float) -> None:
        """A lead report: the least time the last frames waited in the pacer. The pacer starts a
        new window at each cut (`OutputPacer.advance`), so a report that comes while a cut is
        pending is about what stands now: it replaces the pending cut (a catch-up's delay grows
        for a few frames after the first report) and keeps its deadline, or cancels it when
        nothing stands any more."""
        steps = math.floor((lead_s - self.margin_s) / self.step_s + 0.5)
        if steps < 1:
            self.cancel()
            return
        self.pending_s = steps * self.step_s
        if self._force_at == math.inf:
            self._force_at = now + self.quiet_wait_s
        self.trims += 1

    def cancel(self) -> None:
        """Forget a pending cut (the pacer restarted: a new phase, a new report will come)."""
        self.pending_s = 0.0
        self._force_at = math.inf

    def cut(self, audio: bytes, sample_rate: int, now: float) -> tuple[bytes, float]:
        """The frame's PCM16 audio with its cut taken from the start, and the seconds cut (0.0:
        the frame unchanged). A whole frame may go (b"")."""
        if self.pending_s <= 0:
            return audio, 0.0
        samples = np.frombuffer(audio, dtype="<i2")
        if not is_quiet(samples) and now < self._force_at:
            return audio, 0.0
        step = max(1, round(self.step_s * sample_rate))
        steps = min(round(self.pending_s / self.step_s), len(samples) // step)
        if steps <= 0:
            return audio, 0.0
        cut_s = steps * self.step_s
        self.pending_s = max(0.0, self.pending_s - cut_s)
        if self.pending_s < self.step_s / 2:
            self.pending_s = 0.0
            self._force_at = math.inf
        self.trimmed_s += cut_s
        return audio[steps * step * 2 :], cut_s
