"""The engine thread: one 80 ms tick for every call slot together.

Each tick: the slots that run (see `scheduler.py`) hand in one caller frame each; all rows go through
Mimi encode -> LM step -> Mimi decode at once (fixed shapes, an `active` mask), and each running slot
gets exactly one bot frame back (PCM16, 24 kHz, 1920 samples) plus the model's text as `Text`.
Joins (copying a persona's cached prompt state into a slot), leaves and aborts happen between ticks,
in this thread. Ticks follow a monotonic grid: an overrun is logged and counted, the next tick runs
at once, and missed grid points are skipped rather than caught up in a burst.

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

from app.protocol import FRAME_SAMPLES, FRAME_SECONDS, Ended, Error, Ready, Sampling, Text
from app.worker.metrics import WorkerMetrics
from app.worker.runtime import Runtime, UnknownPersona
from app.worker.scheduler import Join, Lease, Release, Scheduler
from app.worker.tick import ModelTick

logger = logging.getLogger(__name__)

Output = bytes | Ready | Text | Error | Ended
Sink = Callable[[Output], None]

_OVERRUN_LOG_EVERY_S = 5.0
_TICK_HISTORY = 512


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


@dataclass
class _Call:
    """Engine-side data of one call (the scheduler's payload)."""

    call_id: str
    persona_id: str
    sampling: Sampling
    sink: Sink
    frames_out: int = 0


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


@dataclass
class _Counters:
    ticks: int = 0
    busy_ticks: int = 0
    overruns: int = 0
    tick_errors: int = 0
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
    ) -> None:
        self.runtime = runtime
        self.model_tick = ModelTick(runtime.lm, runtime.mimi, cuda_graph=cuda_graph, compile=compile)
        self.worker_id = worker_id
        self.tick_s = tick_s
        self.metrics = metrics
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.scheduler = Scheduler(runtime.max_slots, max_queue_frames, on_request=self._wake.set)
        self._calls: dict[int, tuple[Lease, _Call]] = {}  # engine thread only
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # guards _counters
        self._counters = _Counters()
        self._seen_in = 0
        self._seen_dropped = 0
        self._overruns_unlogged = 0
        self._overrun_logged_at = 0.0

    # ------------------------------------------------------------------------ calls (any thread)
    def open(self, call_id: str, persona_id: str, sampling: Sampling | None, sink: Sink) -> Lease | None:
        """Reserve a slot for a call; its `Ready` (or an `Error`) arrives on `sink`. None: no free slot.

        Raises UnknownPersona for a persona this worker does not serve.
        """
        if not self.runtime.has_persona(persona_id):
            raise UnknownPersona(persona_id)
        if self._stop.is_set():
            return None
        call = _Call(call_id=call_id, persona_id=persona_id, sampling=sampling or Sampling(), sink=sink)
        return self.scheduler.reserve(call_id, call)

    def push(self, lease: Lease, frame: bytes) -> bool:
        """Queue one caller frame (exactly FRAME_BYTES of PCM16); False once the call left its slot."""
        return self.scheduler.push_frame(lease, frame)

    def end(self, lease: Lease, reason: str = "caller_hangup") -> None:
        """The call is over: answer the frames still queued, then `Ended(reason)` and the slot is free."""
        self.scheduler.request_leave(lease, reason)

    def abort(self, lease: Lease) -> None:
        """Free the slot at the next tick boundary without answering queued frames."""
        self.scheduler.request_abort(lease)

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

    def step(self) -> TickResult:
        """Apply pending requests and run one tick now (only when the thread is not started)."""
        if self.running:
            raise RuntimeError("step() is for an engine whose thread is not running")
        with torch.inference_mode():
            self._between_ticks()
            return self._tick()

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
        with torch.inference_mode():
            while not self._stop.is_set():
                try:
                    self._wake.clear()
                    self._between_ticks()
                    now = time.monotonic()
                    if now < next_tick:
                        self._wake.wait(next_tick - now)
                        continue
                    self._tick()
                    next_tick, behind = next_grid_point(next_tick, time.monotonic(), period)
                    if behind is not None:
                        self._overrun(behind)
                except Exception:  # a bug here must not kill every call silently: log, keep serving
                    logger.exception("engine loop error; continuing")
                    time.sleep(period)
                    next_tick = time.monotonic() + period
            self._shutdown_calls()
        logger.info("engine stopped")

    # ------------------------------------------------------------------------- between ticks
    def _between_ticks(self) -> None:
        changes = self.scheduler.apply_requests()
        for release in changes.releases:
            self._release(release)
        for join in changes.joins:
            self._join(join)
        if changes.releases or changes.joins:
            self._update_gauges()

    def _join(self, join: Join) -> None:
        lease, call = join.lease, join.payload
        if not isinstance(call, _Call):
            raise TypeError(f"join payload must be a _Call, got {type(call).__name__}")
        started = time.perf_counter()
        try:
            self.runtime.join_slot(lease.slot, call.persona_id, call.sampling)
            if self.runtime.device.type == "cuda":
                torch.cuda.synchronize(self.runtime.device)
        except Exception as exc:
            logger.exception(
                "call %s: loading persona %s into slot %d failed", call.call_id, call.persona_id, lease.slot
            )
            self._emit(lease, call, Error(code="internal", message=f"loading the persona failed: {exc}"))
            self.scheduler.request_abort(lease)
            return
        prefill_ms = (time.perf_counter() - started) * 1000
        if not self.scheduler.activate(lease):
            return  # aborted while loading; its release comes at the next apply
        self._calls[lease.slot] = (lease, call)
        if self.metrics is not None:
            self.metrics.prefill_seconds.observe(prefill_ms / 1000)
        logger.info(
            "call %s joined slot %d (persona %s) in %.1f ms", call.call_id, lease.slot, call.persona_id, prefill_ms
        )
        self._emit(
            lease, call, Ready(call_id=call.call_id, worker_id=self.worker_id, slot=lease.slot, prefill_ms=prefill_ms)
        )

    def _release(self, release: Release) -> None:
        lease, call = release.lease, release.payload
        held = self._calls.get(lease.slot)
        if held is not None and held[0] == lease:
            del self._calls[lease.slot]
        if not isinstance(call, _Call):
            return
        logger.info(
            "call %s left slot %d (%s): %d frames in, %d out, %d dropped",
            call.call_id, lease.slot, release.reason, release.frames_in, call.frames_out, release.frames_dropped,
        )
        if self.metrics is not None:
            self.metrics.sessions.labels(outcome="aborted" if release.aborted else "ended").inc()
        self._emit(
            lease, call, Ended(reason=release.reason, frames_in=release.frames_in, frames_out=call.frames_out),
            abort_on_error=False,
        )

    def _shutdown_calls(self) -> None:
        """At stop: every call still open or joining gets Error(shutting_down)."""
        changes = self.scheduler.apply_requests()
        for release in changes.releases:
            self._release(release)
        message = Error(code="shutting_down", message="the worker is shutting down")
        pending = [(j.lease, j.payload) for j in changes.joins] + list(self._calls.values())
        for lease, call in pending:
            if isinstance(call, _Call):
                self._emit(lease, call, message, abort_on_error=False)
        self._calls.clear()

    # ---------------------------------------------------------------------------------- tick
    def _tick(self) -> TickResult:
        plan = self.scheduler.plan_tick()
        started = time.perf_counter()
        result = TickResult(slots=[], text=[], audio=torch.empty(0, 8, dtype=torch.long), pcm=[], duration_s=0.0)
        if plan:
            try:
                result = self._run_model(plan, started)
            except Exception as exc:
                slots = [lease.slot for lease, _ in plan]
                logger.exception("tick failed for slots %s; ending those calls", slots)
                with self._lock:
                    self._counters.tick_errors += 1
                if self.metrics is not None:
                    self.metrics.tick_errors.inc()
                for lease, _ in plan:
                    held = self._calls.get(lease.slot)
                    if held is not None and held[0] == lease:
                        self._emit(lease, held[1], Error(code="internal", message=f"engine tick failed: {exc}"))
                    self.scheduler.request_abort(lease)
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

    def _run_model(self, plan: list[tuple[Lease, bytes]], started: float) -> TickResult:
        rt = self.runtime
        rows = [lease.slot for lease, _ in plan]
        audio_in = np.frombuffer(b"".join(frame for _, frame in plan), dtype="<i2").reshape(len(plan), FRAME_SAMPLES)
        model_started = time.perf_counter()
        host = self.model_tick.run(rows, audio_in)  # [n, 1920 + 1 + 8] int16; the tick's one host sync
        model_done = time.perf_counter()

        texts: list[int] = []
        frames_out: list[bytes] = []
        for i, (lease, _) in enumerate(plan):
            pcm_bytes = host[i, :FRAME_SAMPLES].astype("<i2").tobytes()
            token = int(host[i, FRAME_SAMPLES])
            texts.append(token)
            frames_out.append(pcm_bytes)
            held = self._calls.get(lease.slot)
            if held is None or held[0] != lease:
                continue
            call = held[1]
            index = call.frames_out
            call.frames_out += 1
            self._emit(lease, call, pcm_bytes)
            piece = rt.text_piece(token) if token >= 0 else None
            if piece:
                self._emit(lease, call, Text(text=piece, frame=index))
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

    # ------------------------------------------------------------------------------ helpers
    def _emit(self, lease: Lease, call: _Call, item: Output, abort_on_error: bool = True) -> None:
        try:
            call.sink(item)
        except Exception:  # a broken sink (closed loop, ...) ends that call only
            logger.exception("call %s: delivering %s failed", call.call_id, type(item).__name__)
            if abort_on_error:
                self.scheduler.request_abort(lease)

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
