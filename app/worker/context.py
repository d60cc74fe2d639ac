"""A call outlives the model's window: its history, and rebuilding its context before the prompt falls out.

A call's model state is its persona prompt plus its frames (17 tokens each: text, the agent's 8
codes, the caller's 8), so it can always be rebuilt: import the persona's cached prompt state and
prefill frames after it. The engine does that in two places:

- **Long calls.** The reference's ring shows a query at position p the positions p - C + 2 .. p
  (C = context). The persona prompt holds positions 0 .. N - 2 of a slot whose prompt state has
  offset N, and a step at offset o writes position o - 1; so the prompt is whole in the window while
  o <= C - 1 (`ContextPolicy.limit`), which also keeps every position below the trained context.
  `margin` frames before that, a `RebuildJob` starts building, in a scratch slot over the same
  weights, the persona prompt followed by the call's last `keep` complete frames, positions
  restarting after the prompt. It prefills at most `chunk` frames between two ticks (the per-tick
  budget), catches up with the frames the call completed meanwhile, adds the frame in progress
  (its text and first agent code are sampled, its delayed codes come with the next step) and then
  replaces the slot's state in one copy. If the limit comes first the job finishes at once (a
  stall, counted).
- **A call moving in** (`Start.resume`): persona + the frames the gateway kept, all of them if they
  fit (then the slot is exactly the one the call left: same offsets, same samples), else the last
  `keep`.

`protocol.CallHistory` keeps a call's complete frames on the host, at most one context's worth.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from app.protocol import CallHistory
from app.worker.model.lm import PersonaPlexLM
from app.worker.model.lm_state import SlotState

AGENT = slice(1, 9)  # a frame's agent codes
CALLER = slice(9, 17)  # a frame's caller codes


@dataclass(frozen=True)
class ContextPolicy:
    """When and how much of a call to rebuild (module docstring); sizes in frames."""

    context: int
    margin: int
    keep: int
    chunk: int

    @property
    def limit(self) -> int:
        """The highest offset a slot may step at with its whole prompt in the window."""
        return self.context - 1

    def keep_for(self, prompt_frames: int) -> int:
        """Frames kept after a prompt of `prompt_frames`: at most `keep`, and at most half the room
        the window leaves after the prompt and the margin (so a rebuilt call runs long before the
        next). 0: the prompt leaves no room, the persona's calls cannot be rebuilt."""
        room = self.limit - self.margin - prompt_frames
        return max(0, min(self.keep, room // 2))

    def due(self, offset: int) -> bool:
        return offset >= self.limit - self.margin


@dataclass(frozen=True)
class RebuildReport:
    """One rebuild swapped into a call's slot: what it kept and what it cost."""

    call_id: str
    slot: int
    first_frame: int  # the first call frame kept after the persona prompt
    stop_frame: int  # frames first_frame .. stop_frame - 1 were prefilled complete
    in_progress: np.ndarray | None  # [17] the frame in progress, added last (-1: its delayed codes)
    forced: bool  # the window's limit came first: finished at once
    chunk_frames: tuple[int, ...]  # complete frames prefilled by each chunk, in order
    chunk_seconds: tuple[float, ...]  # prefill time of each chunk (the last: the frame in progress)
    offset: int  # the slot's offset after the swap


def frames_tensor(frames: np.ndarray, device: torch.device) -> torch.Tensor:
    """int16 [n, 17] frames -> the LM's prefill layout [17, n] long."""
    return torch.as_tensor(frames.astype(np.int64)).T.contiguous().to(device)


class RebuildJob:
    """Builds one call's new context in a scratch slot, chunk by chunk (module docstring)."""

    def __init__(
        self, scratch: PersonaPlexLM, persona_state: SlotState, history: CallHistory, keep: int
    ) -> None:
        self.scratch = scratch
        scratch.reset(0)
        scratch.import_slot(0, persona_state)
        self.next_frame = max(history.first, history.completed - keep)  # the next call frame to prefill
        self.first_kept = self.next_frame
        self.prefilled = 0
        self.chunk_frames: list[int] = []
        self.chunk_seconds: list[float] = []
        self.started = time.perf_counter()

    def advance(self, history: CallHistory, budget: int) -> int:
        """Prefill up to `budget` complete frames the call has and the scratch lacks; how many."""
        stop = min(history.completed, self.next_frame + budget)
        if stop <= self.next_frame:
            return 0
        started = time.perf_counter()
        frames = history.span(self.next_frame, stop)
        self.scratch.prefill_frames(0, frames_tensor(frames, self.scratch.device))
        self._sync()
        self.chunk_seconds.append(time.perf_counter() - started)
        done = stop - self.next_frame
        self.chunk_frames.append(done)
        self.prefilled += done
        self.next_frame = stop
        return done

    def caught_up(self, history: CallHistory) -> bool:
        return self.next_frame >= history.completed

    def finish(self, in_progress: np.ndarray | None) -> SlotState:
        """Add the call's frame in progress, if any (text, first agent code and caller codes given,
        the delayed agent codes -1) and return the rebuilt state, to import into the call's slot."""
        started = time.perf_counter()
        if in_progress is not None:
            self.scratch.prefill_frames(0, frames_tensor(in_progress[None], self.scratch.device))
        state = self.scratch.export_slot(0)
        self._sync()
        self.chunk_seconds.append(time.perf_counter() - started)
        return state

    def _sync(self) -> None:
        if self.scratch.device.type == "cuda":
            torch.cuda.synchronize(self.scratch.device)
