"""The engine thread: one 80 ms tick for every call slot together.

Each tick: the slots that run (see `scheduler.py`) hand in one caller frame each; all rows go through
Mimi encode -> LM step -> Mimi decode at once (fixed shapes, an `active` mask), and each running slot
gets exactly one bot frame back (PCM16, 24 kHz, 1920 samples) plus the model's text as `Text`.
Joins (copying a persona's cached prompt state into a slot), leaves and aborts happen between ticks,
in this thread. Ticks follow a monotonic grid: an overrun is logged and counted, the next tick runs
at once, and missed grid points are skipped. A call's frames queued during a stall are not left
queued for the rest of the call (each tick takes one frame per slot, so they would be: the caller
would hear that much more delay from then on): while a running slot is behind after a tick (two
frames queued, or one behind a frame that had waited more than a whole tick: `Scheduler.behind`),
the next tick runs at once, off the grid (counted as a catch-up), so its queue is back to the one
frame that arrives for each grid point within a few ticks; then the grid resumes.

Each caller frame's wait in its queue (arrival to the start of its tick) is reported to the gateway
as `protocol.Timing` (the least over ~1 s of frames run on the grid: a catch-up, or the late tick
after an overrun, runs a frame as soon as it comes), so it can align its framing to the grid.

Each bot frame carries the tokens of the call frame its step completed (`protocol.pack_bot_frame`);
the engine keeps them too (`protocol.CallHistory`), rebuilds a long call's context before its
persona prompt would leave the attention window, and rebuilds a call moving in from another worker
from the frames it brings (`context.py`).

A call is one `Call` record (`call.py`): `open` makes it and returns it as the call's handle; the
scheduler's slot table says which record holds which slot, and the engine keeps its own per-call
state (history, offset, ...) on the record, so it has no table of calls of its own.

Outputs go to each call's `sink`, called from the engine thread; the server's sink hands them to
its event loop with `call_soon_threadsafe`. No model work ever runs on an event loop.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from app.protocol import (
    FRAME_SAMPLES,
    FRAME_SECONDS,
    CallHistory,
    Ended,
    Error,
    Ready,
    Resume,
    Sampling,
    Text,
    Timing,
    pack_bot_frame,
)
from app.worker.call import Call, Output, Sink, SlotPhase
from app.worker.context import AGENT, CALLER, ContextPolicy, RebuildJob, RebuildReport
from app.worker.metrics import WorkerMetrics
from app.worker.runtime import Runtime, UnknownPersona
from app.worker.scheduler import Scheduler
from app.worker.tick import ModelTick

logger = logging.getLogger(__name__)

_OVERRUN_LOG_EVERY_S = 5.0
_TICK_HISTORY = 512
_DECODER_WARM_FRAMES = 12  # agent frames a resumed call replays into its slot's Mimi decoder (~1 s)


def next_grid_point(deadline: float, now: float, period: float) -> tuple[float, float | None]:
    """The next tick time after the tick due at `deadline` finished at `now`.

    Ticks stay on the grid deadline + k * period (no drift). If the tick overran, the grid points
    already missed are skipped (no catch-up burst): the next tick is the latest missed grid point,
    so it runs at once, and the overrun (seconds behind) is returned; otherwise None.
    """
    nxt = deadline + period
    if now <= nxt:
        return nxt, None
    behind = now - nxt
    return nxt + (behind // period) * period, behind


@dataclass(frozen=True)
class TickResult:
    """What one tick did, for tests and the bench: per running slot, in slot order."""

    slots: list[int]
    text: list[int]  # text token of each slot's output frame (-1 while not valid)
    audio: torch.Tensor  # [n, 8] long: agent codes of each output frame (-1 while not valid), CPU
    pcm: list[bytes]  # PCM16 bot frames
    duration_s: float
    model_s: float = 0.0  # of duration_s: from the input copy to the device until the output is on the host
    wait_s: float = 0.0  # of model_s: blocked in the one device->host copy (waiting for the device)


@dataclass(frozen=True)
class EngineStats:
    ticks: int
    busy_ticks: int
    overruns: int
    tick_errors: int
    tick_p50_ms: float | None
    tick_p99_ms: float | None
    tick_last_ms: float | None
    running: bool
    rebuilds: int = 0  # long calls' contexts rebuilt
    rebuild_chunks: int = 0  # rebuild prefills run between ticks (the frame-in-progress step included)
    catch_ups: int = 0  # ticks run at once, off the grid, because a slot had a backlog


@dataclass
class _Counters:
    ticks: int = 0
    busy_ticks: int = 0
    overruns: int = 0
    tick_errors: int = 0
    rebuilds: int = 0
    rebuild_chunks: int = 0
    catch_ups: int = 0
    durations: deque[float] = field(default_factory=lambda: deque(maxlen=_TICK_HISTORY))


class Engine:
    """Runs the call slots of one `Runtime`; see the module docstring.

    Thread use: `open`, `push`, `end`, `abort`, `stats` from any thread; `start`/`stop` from the
    owner; `step` only while the thread is not started (tests, bench).
    """

    def __init__(
        self,
        runtime: Runtime,
        *,
        worker_id: str,
        max_queue_frames: int,
        metrics: WorkerMetrics | None = None,
        tick_s: float = FRAME_SECONDS,
        cuda_graph: bool = False,
        compile: str | None = None,
        policy: ContextPolicy | None = None,
        on_rebuild: Callable[[RebuildReport], None] | None = None,
    ) -> None:
        """policy: when to rebuild long calls (default: the model's context, a 50-frame margin,
        120 s kept, 64 frames per tick). on_rebuild: told of each rebuild right after its swap,
        between ticks, on the engine thread (tests and the bench)."""
        self.runtime = runtime
        self.policy = policy or ContextPolicy(context=runtime.lm.cfg.context, margin=50, keep=1500, chunk=64)
        if self.policy.context != runtime.lm.cfg.context:
            raise ValueError(f"policy for context {self.policy.context}, the model's is {runtime.lm.cfg.context}")
        self._scratch = None  # a one-slot LM over the same weights, made at the first rebuild
        self._job: tuple[Call, RebuildJob] | None = None
        self._no_room_logged: set[str] = set()
        self._on_rebuild = on_rebuild
        self.model_tick = ModelTick(runtime.lm, runtime.mimi, cuda_graph=cuda_graph, compile=compile)
        self.worker_id = worker_id
        self.tick_s = tick_s
        self.metrics = metrics
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.scheduler = Scheduler(runtime.max_slots, max_queue_frames, on_request=self._wake.set)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # guards _counters
        self._counters = _Counters()
        self._seen_in = 0
        self._seen_dropped = 0
        self._overruns_unlogged = 0
        self._overrun_logged_at = 0.0

    # ------------------------------------------------------------------------ calls (any thread)
    def open(
        self, call_id: str, persona_id: str, sampling: Sampling | None, sink: Sink, resume: Resume | None = None
    ) -> Call | None:
        """Reserve a slot for a call and return its record, the call's handle; its `Ready` (or an
        `Error`) arrives on `sink`. None: no free slot.

        resume: a call moving in with its frames (rebuilt at the join). Raises UnknownPersona for a
        persona this worker does not serve, ProtocolError for a malformed resume or a top-k this
        worker's sampling width cannot serve.
        """
        if not self.runtime.has_persona(persona_id):
            raise UnknownPersona(persona_id)
        self.runtime.check_sampling(persona_id, sampling)
        if resume is not None:
            resume.tokens()  # a malformed payload is refused here, not in the engine thread
            resume.warm_pcm()
        if self._stop.is_set():
            return None
        call = Call(
            call_id=call_id, persona_id=persona_id, sampling=sampling or Sampling(), sink=sink,
            history=CallHistory(self.policy.context), resume=resume,
        )
        return call if self.scheduler.reserve(call) else None

    def push(self, call: Call, frame: bytes) -> bool:
        """Queue one caller frame (exactly FRAME_BYTES of PCM16); False once the call left its slot."""
        return self.scheduler.push_frame(call, frame)

    def end(self, call: Call, reason: str = "caller_hangup") -> None:
        """The call is over: answer the frames still queued, then `Ended(reason)` and the slot is free."""
        self.scheduler.request_leave(call, reason)

    def abort(self, call: Call) -> None:
        """Free the slot at the next tick boundary without answering queued frames."""
        self.scheduler.request_abort(call)

    # -------------------------------------------------------------------------------- thread
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("engine already started")
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread; calls still open get `Error(shutting_down)`."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.error("engine thread did not stop within %.1f s", timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def step(self, *, on_grid: bool = True) -> TickResult:
        """Apply pending requests and run one tick now (only when the thread is not started).
        on_grid=False: the tick is a catch-up, off the grid (as the thread runs one when a slot has
        a backlog): its frames' waits say nothing about the grid and stay out of `Timing`."""
        if self.running:
            raise RuntimeError("step() is for an engine whose thread is not running")
        with torch.inference_mode():
            self._between_ticks()
            return self._tick(on_grid=on_grid)

    def stats(self) -> EngineStats:
        with self._lock:
            c = self._counters
            durations = sorted(c.durations)
            last = c.durations[-1] * 1000 if c.durations else None
            return EngineStats(
                ticks=c.ticks,
                busy_ticks=c.busy_ticks,
                overruns=c.overruns,
                tick_errors=c.tick_errors,
                tick_p50_ms=_percentile(durations, 0.50),
                tick_p99_ms=_percentile(durations, 0.99),
                tick_last_ms=last,
                running=self.running,
                rebuilds=c.rebuilds,
                rebuild_chunks=c.rebuild_chunks,
                catch_ups=c.catch_ups,
            )

    def _run(self) -> None:
        threads = engine_threads(self.runtime.device)
        torch.set_num_threads(threads)
        logger.info(
            "engine started: %d slots, tick %.0f ms, %d torch thread(s)",
            self.runtime.max_slots, self.tick_s * 1000, threads,
        )
        period = self.tick_s
        next_tick = time.monotonic() + period
        catch_up = False  # a slot has a backlog: the next tick runs at once, off the grid
        with torch.inference_mode():
            while not self._stop.is_set():
                try:
                    self._wake.clear()
                    self._between_ticks()
                    due = time.monotonic() >= next_tick
                    if not due and not catch_up:
                        self._wake.wait(next_tick - time.monotonic())
                        continue
                    # On the grid: a tick that starts at its grid point (within a quarter period of
                    # wake-up jitter). The one right after an overrun runs late, at once: as a
                    # catch-up, its frames' waits say nothing about where the grid is.
                    self._tick(on_grid=due and time.monotonic() - next_tick <= period / 4)
                    if due:
                        next_tick, behind = next_grid_point(next_tick, time.monotonic(), period)
                        if behind is not None:
                            self._overrun(behind)
                    else:
                        self._count_catch_up()
                    catch_up = self.scheduler.behind(period)
                except Exception:  # a bug here must not kill every call silently: log, keep serving
                    logger.exception("engine loop error; continuing")
                    time.sleep(period)
                    next_tick = time.monotonic() + period
            self._shutdown_calls()
        logger.info("engine stopped")

    # ------------------------------------------------------------------------- between ticks
    def _between_ticks(self) -> None:
        changes = self.scheduler.apply_requests()
        for call in changes.releases:
            self._release(call)
        for call in changes.joins:
            self._join(call)
        if changes.releases or changes.joins:
            self._update_gauges()
        self._keep_context()

    def _join(self, call: Call) -> None:
        started = time.perf_counter()
        try:
            seed = self._load(call)
            if self.runtime.device.type == "cuda":
                torch.cuda.synchronize(self.runtime.device)
        except Exception as exc:
            logger.exception(
                "call %s: loading persona %s into slot %d failed", call.call_id, call.persona_id, call.slot
            )
            self._emit(call, Error(code="internal", message=f"loading the persona failed: {exc}"))
            self.scheduler.request_abort(call)
            return
        prefill_ms = (time.perf_counter() - started) * 1000
        if not self.scheduler.activate(call):
            return  # aborted while loading; its release comes at the next apply
        if self.metrics is not None:
            self.metrics.prefill_seconds.observe(prefill_ms / 1000)
        logger.info(
            "call %s joined slot %d (persona %s) in %.1f ms", call.call_id, call.slot, call.persona_id, prefill_ms
        )
        self._emit(
            call, Ready(
                call_id=call.call_id, worker_id=self.worker_id, slot=call.slot, prefill_ms=prefill_ms,
                seed=seed, next_frame=call.next_frame,
            ),
        )

    def _load(self, call: Call) -> int:
        """The call's persona into its slot, then, for a call moving in, its frames: all of them when
        they fit the window (the very state it left), else the last ones a rebuild keeps. Returns
        the seed the call samples with."""
        rt, slot = self.runtime, call.slot
        seed = rt.join_slot(slot, call.persona_id, call.sampling)
        prompt = rt.prompt_frames(call.persona_id)
        call.offset = prompt
        resume = call.resume
        if resume is None:
            return seed
        frames = resume.tokens()  # [n, 17]: frames next_frame - n .. next_frame - 1
        call.history.load(frames[-self.policy.context :], resume.next_frame)
        call.next_frame = resume.next_frame
        keep = self.policy.keep_for(prompt) if self.policy.due(prompt + len(frames)) else len(frames)
        kept = frames[len(frames) - keep :]
        if len(kept):
            rt.prefill_slot(slot, kept)
        call.offset = prompt + len(kept)
        rt.warm_codec(slot, frames[-_DECODER_WARM_FRAMES - 1 : -1, AGENT], resume.warm_pcm())
        call.caller_codes = frames[-1, CALLER].copy() if len(frames) else None  # of frame next_frame - 1
        call.resume = None
        return seed

    def _release(self, call: Call) -> None:
        logger.info(
            "call %s left slot %d (%s): %d frames in, %d out, %d dropped",
            call.call_id, call.slot, call.reason, call.frames_in, call.frames_out, call.frames_dropped,
        )
        if self.metrics is not None:
            self.metrics.sessions.labels(outcome="aborted" if call.aborted else "ended").inc()
        self._emit(
            call, Ended(reason=call.reason, frames_in=call.frames_in, frames_out=call.frames_out), abort_on_error=False
        )

    def _shutdown_calls(self) -> None:
        """At stop: every call still open or joining gets Error(shutting_down)."""
        for call in self.scheduler.apply_requests().releases:
            self._release(call)
        message = Error(code="shutting_down", message="the worker is shutting down")
        for call in self.scheduler.calls():  # the joins just handed over (never loaded) included
            self._emit(call, message, abort_on_error=False)

    # ---------------------------------------------------------------------------------- tick
    def _tick(self, *, on_grid: bool) -> TickResult:
        plan = self.scheduler.plan_tick()
        started = time.perf_counter()
        result = TickResult(slots=[], text=[], audio=torch.empty(0, 8, dtype=torch.long), pcm=[], duration_s=0.0)
        if plan:
            try:
                result = self._run_model(plan, started, on_grid=on_grid)
            except Exception as exc:
                slots = [call.slot for call, _ in plan]
                logger.exception("tick failed for slots %s; ending those calls", slots)
                with self._lock:
                    self._counters.tick_errors += 1
                if self.metrics is not None:
                    self.metrics.tick_errors.inc()
                for call, _ in plan:
                    self._emit(call, Error(code="internal", message=f"engine tick failed: {exc}"))
                    self.scheduler.request_abort(call)
        duration = time.perf_counter() - started
        with self._lock:
            self._counters.ticks += 1
            if plan:
                self._counters.busy_ticks += 1
                self._counters.durations.append(duration)
        if self.metrics is not None:
            self.metrics.ticks.inc()
            if plan:
                self.metrics.busy_ticks.inc()
                self.metrics.tick_seconds.observe(duration)
        self._update_counters()
        return result

    def _run_model(self, plan: list[tuple[Call, bytes]], started: float, *, on_grid: bool) -> TickResult:
        """Run the planned calls' frames; a call in the plan holds its slot for the whole tick
        (releases happen between ticks only). Only an on-grid tick's waits go into `Timing`: a
        catch-up tick runs a frame as soon as it comes, so its wait (~0) would tell the gateway its
        framing is too close to a tick that is not there (and it would move it for nothing)."""
        rt = self.runtime
        rows = [call.slot for call, _ in plan]
        audio_in = np.frombuffer(b"".join(frame for _, frame in plan), dtype="<i2").reshape(len(plan), FRAME_SAMPLES)
        model_started = time.perf_counter()
        host = self.model_tick.run(rows, audio_in)  # [n, 1920 + 1 + 8] int16; the tick's one host sync
        model_done = time.perf_counter()

        texts: list[int] = []
        frames_out: list[bytes] = []
        pcm16, text, agent, caller = self.model_tick.split(host)
        for i, (call, _) in enumerate(plan):
            pcm_bytes = pcm16[i].astype("<i2").tobytes()
            token = int(text[i])
            texts.append(token)
            frames_out.append(pcm_bytes)
            index = call.frames_out
            call.frames_out += 1
            self._emit(call, pack_bot_frame(pcm_bytes, self._completed(call, token, agent[i], caller[i])))
            piece = rt.text_piece(token) if token >= 0 else None
            if piece:
                self._emit(call, Text(text=piece, frame=index))
            waits = call.waits.add(call.wait_s) if on_grid else None
            if waits is not None:
                least, frames = waits
                self._emit(call, Timing(frame=index, frames=frames, wait_ms=least * 1000, tick_ms=self.tick_s * 1000))
        if self.metrics is not None:
            self.metrics.frames_out.inc(len(plan))
        audio = torch.from_numpy(host[:, FRAME_SAMPLES + 1 :].astype(np.int64))
        return TickResult(
            slots=rows,
            text=texts,
            audio=audio,
            pcm=frames_out,
            duration_s=time.perf_counter() - started,
            model_s=model_done - model_started,
            wait_s=self.model_tick.last_wait_s,
        )

    def _completed(self, call: Call, text: int, agent: np.ndarray, caller: np.ndarray) -> np.ndarray | None:
        """After a step of `call`: the call frame it completed (the output frame, with the caller
        codes of the step before), kept in the call's history; None at the call's first step (its
        output frame is the prompt's last)."""
        tokens = None
        if call.caller_codes is not None and text >= 0:
            tokens = np.concatenate([[text], agent, call.caller_codes]).astype(np.int16)
            if call.history.completed == call.next_frame - 1:  # else a call moved in re-completed its last
                call.history.add(tokens)
        call.caller_codes = np.asarray(caller, dtype=np.int16).copy()
        call.next_frame += 1
        call.offset += 1
        return tokens

    # --------------------------------------------------------------------------- long calls
    def _keep_context(self) -> None:
        """Between ticks: spend at most one chunk of prefill (the per-tick budget, shared by all
        calls) on rebuilds, most urgent call first; a call that would step past the window's limit
        is rebuilt at once whatever the budget (a stall, counted as forced)."""
        budget = self.policy.chunk
        while True:
            urgent = self._most_urgent(past_limit=True)
            if self._job is None:
                nxt = urgent or (self._most_urgent(past_limit=False) if budget > 0 else None)
                if nxt is None:
                    return
                self._start_rebuild(nxt)
            spent, done = self._advance_rebuild(budget, force=urgent is not None)
            budget -= spent
            if not done and urgent is None:
                return  # the job goes on between the next two ticks

    def _most_urgent(self, past_limit: bool) -> Call | None:
        """The loaded call with the highest offset that is due (or, with past_limit, would step past
        the limit) and whose persona leaves room to rebuild; the one being rebuilt excluded."""
        best: Call | None = None
        rebuilding = self._job[0] if self._job is not None else None
        for call in self.scheduler.calls(SlotPhase.ACTIVE, SlotPhase.DRAINING):
            if call is rebuilding or not self.policy.due(call.offset):
                continue
            if past_limit and call.offset <= self.policy.limit:
                continue
            if not self._has_room(call.persona_id):
                continue
            if best is None or call.offset > best.offset:
                best = call
        return best

    def _has_room(self, persona_id: str) -> bool:
        prompt = self.runtime.prompt_frames(persona_id)
        if self.policy.keep_for(prompt) > 0:
            return True
        if persona_id not in self._no_room_logged:
            self._no_room_logged.add(persona_id)
            logger.warning(
                "persona %s: its prompt (%d frames) leaves no room in the %d-frame context with a %d-frame "
                "margin: its long calls cannot keep the prompt in the window",
                persona_id, prompt, self.policy.context, self.policy.margin,
            )
        return False

    def _start_rebuild(self, call: Call) -> None:
        keep = self.policy.keep_for(self.runtime.prompt_frames(call.persona_id))
        if self._scratch is None:
            self._scratch = self.runtime.lm.sharing_weights(1)
        self._job = (call, RebuildJob(self._scratch, self.runtime.prompt_states[call.persona_id], call.history, keep))

    def _advance_rebuild(self, budget: int, force: bool) -> tuple[int, bool]:
        """Prefill up to `budget` frames of the rebuild in progress and swap it in once caught up
        (everything at once if forced or its call would step past the limit). Returns the frames
        prefilled and whether the job is over."""
        if self._job is None:
            return 0, True
        call, job = self._job
        if not self.scheduler.holds(call):
            self._job = None  # the call left
            return 0, True
        forced = force or call.offset > self.policy.limit
        spent = job.advance(call.history, call.history.completed if forced else max(budget, 0))
        with self._lock:
            self._counters.rebuild_chunks += 1 if spent else 0
        if not (forced or (job.caught_up(call.history) and budget > spent)):
            return spent, False
        self._finish_rebuild(call, job, forced)
        return spent + 1, True  # + the frame in progress

    def _finish_rebuild(self, call: Call, job: RebuildJob, forced: bool) -> None:
        """Add the frame in progress to the caught-up rebuild and swap the state into the call's slot."""
        in_progress = None
        if call.next_frame == call.history.completed + 1 and call.caller_codes is not None:
            lm = self.runtime.lm
            column = (call.offset - 1) % lm.cfg.cache_len  # the target column of the call's last step
            text, first_agent = (int(t) for t in lm.tokens.cache[call.slot, :2, column].tolist())
            in_progress = np.full(17, -1, dtype=np.int16)
            in_progress[0], in_progress[1] = text, first_agent
            in_progress[CALLER] = call.caller_codes
        state = job.finish(in_progress)
        self.runtime.lm.import_slot(call.slot, state)
        call.offset = int(state.offset)
        call.rebuilds += 1
        self._job = None
        with self._lock:
            self._counters.rebuilds += 1
            self._counters.rebuild_chunks += 1
        total = time.perf_counter() - job.started
        if self.metrics is not None:
            self.metrics.rebuilds.labels(outcome="forced" if forced else "spread").inc()
            self.metrics.rebuild_seconds.observe(sum(job.chunk_seconds))
            for seconds in job.chunk_seconds:
                self.metrics.rebuild_chunk_seconds.observe(seconds)
        if self._on_rebuild is not None:
            self._on_rebuild(RebuildReport(
                call_id=call.call_id, slot=call.slot, first_frame=job.first_kept, stop_frame=job.next_frame,
                in_progress=in_progress, forced=forced, chunk_frames=tuple(job.chunk_frames),
                chunk_seconds=tuple(job.chunk_seconds), offset=call.offset,
            ))
        log = logger.warning if forced else logger.info
        log(
            "call %s: context rebuilt%s: persona + frames %d..%d (%d chunks, %.1f ms of prefill over %.0f ms)",
            call.call_id, " at once (the window's limit came first)" if forced else "", job.first_kept,
            call.history.completed - 1, len(job.chunk_seconds), sum(job.chunk_seconds) * 1000, total * 1000,
        )

    # ------------------------------------------------------------------------------ helpers
    def _emit(self, call: Call, item: Output, abort_on_error: bool = True) -> None:
        try:
            call.sink(item)
        except Exception:  # a broken sink (closed loop, ...) ends that call only
            logger.exception("call %s: delivering %s failed", call.call_id, type(item).__name__)
            if abort_on_error:
                self.scheduler.request_abort(call)

    def _count_catch_up(self) -> None:
        with self._lock:
            self._counters.catch_ups += 1
        if self.metrics is not None:
            self.metrics.catch_ups.inc()

    def _overrun(self, behind_s: float) -> None:
        with self._lock:
            self._counters.overruns += 1
        if self.metrics is not None:
            self.metrics.overruns.inc()
        self._overruns_unlogged += 1
        now = time.monotonic()
        if now - self._overrun_logged_at >= _OVERRUN_LOG_EVERY_S:
            logger.warning(
                "engine tick overran its %.0f ms slot (%d overruns since last report; %.1f ms behind)",
                self.tick_s * 1000, self._overruns_unlogged, behind_s * 1000,
            )
            self._overruns_unlogged = 0
            self._overrun_logged_at = now

    def _update_counters(self) -> None:
        if self.metrics is None:
            return
        st = self.scheduler.stats()
        if st.frames_in > self._seen_in:
            self.metrics.frames_in.inc(st.frames_in - self._seen_in)
            self._seen_in = st.frames_in
        if st.frames_dropped > self._seen_dropped:
            self.metrics.frames_dropped.inc(st.frames_dropped - self._seen_dropped)
            self._seen_dropped = st.frames_dropped
        self.metrics.active_slots.set(st.used)

    def _update_gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.active_slots.set(self.scheduler.stats().used)


def engine_threads(device: torch.device) -> int:
    """Torch threads for the engine thread: 1 on GPU (it only launches kernels); on CPU all cores
    but one, which stays for the event loop (a second OpenMP pool would fight the first)."""
    if device.type != "cpu":
        return 1
    return max(1, (os.cpu_count() or 2) - 1)


def _percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, int(round(q * (len(sorted_values) - 1))))
    return sorted_values[index] * 1000
