"""`callcenter bench`: time the worker's tick (Mimi encode -> LM step -> Mimi decode) per slot count.

For each slot count S a worker engine with `max_slots = S` runs the real tick (`Engine.step`, with its
scheduler, packing, sinks and metrics) on random weights: the tiny config by default (CPU, CI), or
with `full=True` the full-size PersonaPlex config (bf16 weights and KV), meant for a GPU. Calls join
and leave during the run: every `churn_every` ticks one call ends and a new one takes its slot, its
persona state imported from the persona cache (the pickup path, `Runtime.join_slot`). The runtime
is built by the worker's own builder (`runtime.runtime_from_models`) on the random-weight models
(`model/tiny.py`), a synthetic persona and a stand-in tokenizer: the persona state is computed once
by the real prompt prefill, written to a persona cache on disk and read back from it, as a worker
start does.

One JSON object per slot count (see bench/README.md for every field), then a summary with the
largest slot count whose p99 tick is within the budget (70 ms: an 80 ms frame leaves 10 ms slack).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import inspect
import logging
import os
import resource
import statistics
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from app.personas import Persona, PersonaBook
from app.protocol import FRAME_SAMPLES, FRAME_SECONDS, Error, Ready, Sampling
from app.worker import persona_cache
from app.worker.call import Call
from app.worker.context import ContextPolicy, RebuildReport
from app.worker.engine import Engine, TickResult, engine_threads
from app.worker.metrics import WorkerMetrics
from app.worker.model import prompts, tiny
from app.worker.model.lm import LMConfig, PersonaPlexLM
from app.worker.model.mimi import Mimi, MimiConfig
from app.worker.runtime import Runtime, resolve_device, runtime_from_models

logger = logging.getLogger(__name__)

PERSONA_ID = "bench"
REPO_ROOT = Path(__file__).resolve().parents[2]
# Calls that make the host wait for the device when their tensor lives there.
_SYNC_CALLS = frozenset({"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero",
                         "masked_select", "unique", "cpu"})


@dataclass(frozen=True)
class BenchOptions:
    """What `run_bench` measures; the CLI fills it from its flags."""

    full: bool = False
    slots: tuple[int, ...] = (1, 8, 16, 32, 64)
    ticks: int = 50  # measured ticks per slot count
    warmup: int = 10  # ticks run first and not measured
    churn_every: int = 8  # one call leaves and a new one joins every this many ticks (0: never)
    device: str = "auto"
    dtype: str = "auto"  # 'auto': bfloat16 for --full, else the worker's choice for the device
    context: int | None = None  # LM context override (frames); None: the config's (3000 full size)
    budget_ms: float = 70.0
    seed: int = 0
    voice_seconds: float = 10.0  # the synthetic persona: voice prompt length ...
    role_tokens: int = 60  # ... and role prompt tokens, tags included (the reference's 3.7 s pickup had these)
    state_dir: Path | None = None  # persona cache lives here; None: a temporary directory
    cuda_graph: bool = False  # replay the tick as a CUDA graph (GPU only)
    compile: bool = False  # torch.compile the tick (inductor), as WORKER_COMPILE=1 does
    rebuild_margin: int = 50  # long calls (WORKER_REBUILD_*): with a small --context, rebuilds run
    rebuild_keep_s: float = 120.0  # during the measured ticks and the record says what they cost
    rebuild_chunk: int = 64

    def __post_init__(self) -> None:
        if not self.slots or min(self.slots) < 1:
            raise ValueError("slot counts must be >= 1")
        if self.ticks < 1 or self.warmup < 0 or self.churn_every < 0:
            raise ValueError("ticks must be >= 1, warmup and churn_every >= 0")


@dataclass
class _Sink:
    """Records what the engine delivers to the bench's calls."""

    pickups_ms: list[float] = field(default_factory=list)
    frames: int = 0
    errors: list[str] = field(default_factory=list)

    def __call__(self, item: object) -> None:
        if isinstance(item, bytes):
            self.frames += 1
        elif isinstance(item, Ready):
            self.pickups_ms.append(item.prefill_ms)
        elif isinstance(item, Error):
            self.errors.append(f"{item.code}: {item.message}")


class _BenchTokenizer:
    """Stands in for sentencepiece (the bench has no tokenizer file): piece i is '▁w{i}', one per word."""

    def __init__(self, vocab: int) -> None:
        self._pieces = [f"▁w{i}" for i in range(vocab)]
        self._ids = {piece: i for i, piece in enumerate(self._pieces)}

    def vocab_size(self) -> int:
        return len(self._pieces)

    def id_to_piece(self, id: int) -> str:
        return self._pieces[id]

    def encode(self, text: str) -> list[int]:
        """One id per word: 'w{i}' is i, any other word (the '<system>' tags) is 4."""
        return [self._ids.get(f"▁{word}", 4) for word in text.split()]


def _device_to_host(args: tuple) -> bool:
    """`host.copy_(device_tensor)`: the host waits for the device (nothing to wait for on a CPU)."""
    if len(args) < 2 or not isinstance(args[0], torch.Tensor) or not isinstance(args[1], torch.Tensor):
        return False
    return args[0].device.type == "cpu" and args[1].device.type != "cpu"


class _TorchCalls(TorchFunctionMode):
    """Counts torch calls made from Python, and the sync-prone ones with their call sites, apart for
    the tick and for joins (calls made under `Runtime.join_slot`)."""

    def __init__(self) -> None:
        super().__init__()
        self.tick_calls = 0
        self.join_calls = 0
        self.tick_syncs: list[str] = []
        self.join_syncs: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        sync = (
            name in _SYNC_CALLS
            or (name in ("__getitem__", "__setitem__") and _bool_index(args))
            or (name == "copy_" and _device_to_host(args))
        )
        site, in_join = _call_site()
        if in_join:
            self.join_calls += 1
            if sync:
                self.join_syncs.append(f"{site} {name}")
        else:
            self.tick_calls += 1
            if sync:
                self.tick_syncs.append(f"{site} {name}")
        return func(*args, **(kwargs or {}))


def _bool_index(args: tuple) -> bool:
    """A bool-mask index (x[mask], x[mask] = v): its result size needs the mask's count on the host."""
    index = args[1] if len(args) > 1 else None
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


def _call_site() -> tuple[str, bool]:
    """('app/...py:line' of the innermost caller in the app, whether it runs under a join)."""
    app_dir = REPO_ROOT / "app"
    frame = inspect.currentframe()
    site = None
    in_join = False
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if site is None and path.is_relative_to(app_dir) and path.name != "bench.py":
            site = f"{path.relative_to(REPO_ROOT)}:{frame.f_lineno}"
        in_join = in_join or frame.f_code.co_name == "join_slot"
        frame = frame.f_back
    return site or "?", in_join


# ------------------------------------------------------------------------------------ models
def _configs(options: BenchOptions) -> tuple[LMConfig, MimiConfig]:
    lm_cfg, mimi_cfg = tiny.configs(full=options.full)
    if options.context is not None:
        lm_cfg = dataclasses.replace(lm_cfg, context=options.context)
    return lm_cfg, mimi_cfg


# ------------------------------------------------------------------------------------ persona
@dataclass(frozen=True)
class _Persona:
    """The bench's synthetic persona: the runtime builder that serves it, and what its prompt state cost."""

    runtime: Callable[[PersonaPlexLM, Mimi], Runtime]  # the worker's runtime on these models (cache hit)
    prefill_ms: float  # the prompt prefill, computed once (cache miss), and written to the cache
    load_ms: float  # reading it back from the persona cache onto the device (cache hit)
    frames: int
    prefill_was_cached: bool  # the cache already held it (--state-dir of an earlier run): no prefill ran


def make_persona(
    options: BenchOptions, lm: PersonaPlexLM, mimi: Mimi, cache_dir: Path, device: torch.device
) -> _Persona:
    """A synthetic persona (voice prompt from synthetic speech, random role words) through the cache.

    Its runtime is built as the worker builds one (`runtime_from_models`), here twice on the one-slot
    models: first the prefill (a miss, written to the cache), then the read back (a hit).
    """
    rng = np.random.default_rng(options.seed)
    voice = prompts.voice_embeddings_from_audio(lm, mimi, tiny.synthetic_voice(rng, options.voice_seconds))
    tokenizer = _BenchTokenizer(lm.cfg.text_card)
    words = options.role_tokens - len(tokenizer.encode(prompts.wrap_system("")))  # the tags are tokens too
    prompt = " ".join(f"w{t}" for t in rng.integers(4, lm.cfg.text_card, max(words, 1)))
    persona = Persona(id=PERSONA_ID, name="Bench persona", prompt=prompt, voice="NATF2")
    book = PersonaBook(personas={PERSONA_ID: persona}, sources={PERSONA_ID: cache_dir}, default_id=PERSONA_ID)
    runtime = functools.partial(
        runtime_from_models,
        tokenizer=tokenizer,
        book=book,
        voice_for=lambda _: voice,
        cache=persona_cache.PersonaCache(cache_dir, lm.cfg, lm.kv_dtype),
        checkpoint=f"bench-random:{'full' if options.full else 'tiny'}:seed={options.seed}",
        kind="bench",
        source="random weights",
        device=device,
    )
    prefilled = runtime(lm, mimi)
    loaded = runtime(lm, mimi)
    if not loaded.prompt_cached[PERSONA_ID]:
        raise RuntimeError(f"the persona cache in {cache_dir} lost the state it just wrote")
    return _Persona(
        runtime=runtime,
        prefill_ms=prefilled.prompt_ms[PERSONA_ID],
        load_ms=loaded.prompt_ms[PERSONA_ID],
        frames=int(loaded.prompt_states[PERSONA_ID].offset),
        prefill_was_cached=prefilled.prompt_cached[PERSONA_ID],
    )


# ------------------------------------------------------------------------------------ running
def caller_frames(n: int, seed: int) -> list[bytes]:
    """n frames of speech-like caller audio (PCM16, 24 kHz)."""
    rng = np.random.default_rng(seed)
    audio = np.concatenate([tiny.synthetic_voice(rng, 1.0) for _ in range(-(-n * FRAME_SAMPLES // 24000))])
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2")
    return [pcm[i * FRAME_SAMPLES : (i + 1) * FRAME_SAMPLES].tobytes() for i in range(n)]


def dispatch_us(device: torch.device, rounds: int = 400) -> float:
    """Host cost of one small torch call on `device` (microseconds): Python + dispatch (+ launch on a
    GPU), the mean over a mix of the calls a tick is made of (indexing, where, gather, linear, cat,
    arithmetic) on tensors too small for their math to count."""
    x = torch.zeros(4, 8, device=device)
    w = torch.zeros(8, 8, device=device)
    m = torch.zeros(4, dtype=torch.bool, device=device)
    idx = torch.zeros(4, 1, dtype=torch.long, device=device)
    mix = (
        lambda: x[:, 0],
        lambda: torch.where(m[:, None], x, 0.0),
        lambda: x.gather(1, idx),
        lambda: torch.nn.functional.linear(x, w),
        lambda: torch.cat([x, x], dim=1),
        lambda: x * 2 + 1,  # two calls
    )
    calls_per_round = len(mix) + 1
    for fn in mix * 20:
        fn()
    _sync(device)
    started = time.perf_counter()
    for _ in range(rounds):
        for fn in mix:
            fn()
    elapsed = time.perf_counter() - started
    _sync(device)
    return elapsed / (rounds * calls_per_round) * 1e6


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _ms(seconds: list[float], q: float) -> float:
    return round(_pct(seconds, q) * 1000, 3)


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "torch.cuda.max_memory_allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "peak RSS of the process so far"


def _audit_step(engine: Engine, device: torch.device) -> dict[str, Any]:
    """One engine step (a join, then a tick; not timed) counting torch calls and sync-prone calls; on
    CUDA also the syncs torch itself reports (`torch.cuda.set_sync_debug_mode`). A compiled tick is
    one opaque call here (tracing the counter into it would recompile the tick)."""
    counter = _TorchCalls()
    tick = engine.model_tick
    compiled_work = tick.work
    if tick.compiled is not None:
        def unobserved() -> None:
            with torch.overrides._pop_mode_temporarily():
                compiled_work()

        tick.work = unobserved
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with counter:
                engine.step()
        finally:
            tick.work = compiled_work
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode(0)
    audit: dict[str, Any] = {
        "torch_calls_per_tick": counter.tick_calls,
        "host_syncs_per_tick": len(counter.tick_syncs),
        "host_sync_sites": sorted(set(counter.tick_syncs)),
        "torch_calls_per_join": counter.join_calls,
        "join_sync_sites": sorted(set(counter.join_syncs)),
    }
    if device.type == "cuda":  # join and tick together
        audit["cuda_syncs_per_step"] = sum("synchroniz" in str(w.message) for w in caught)
    return audit


def run_slots(
    slots: int, weights: tiny.RandomWeights, persona: _Persona, options: BenchOptions, device: torch.device,
    per_call_us: float,
) -> dict[str, Any]:
    """Run one slot count and return its JSON object."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    lm, mimi = tiny.models_for(weights, slots, device)
    policy = ContextPolicy(
        context=lm.cfg.context, margin=options.rebuild_margin,
        keep=max(1, round(options.rebuild_keep_s / FRAME_SECONDS)), chunk=options.rebuild_chunk,
    )
    rebuilds: list[RebuildReport] = []
    engine = Engine(persona.runtime(lm, mimi), worker_id="bench", max_queue_frames=2,
                    metrics=WorkerMetrics(slots), cuda_graph=options.cuda_graph,
                    compile="inductor" if options.compile else None, policy=policy, on_rebuild=rebuilds.append)
    sink = _Sink()
    frames = caller_frames(64, options.seed + slots)
    calls: list[Call] = []
    opened = 0

    def churn(t: int) -> None:
        """Every churn_every ticks the oldest call hangs up; free slots are filled with new calls."""
        nonlocal opened
        if options.churn_every and t and t % options.churn_every == 0 and calls:
            engine.end(calls.pop(0))  # leaves at this step's apply; its slot is free for the next
        while len(calls) < slots:
            call = engine.open(f"bench-{slots}-{opened}", PERSONA_ID, Sampling(seed=opened), sink)
            if call is None:
                break
            calls.append(call)
            opened += 1
        for call in calls:
            engine.push(call, frames[t % len(frames)])

    ticks: list[TickResult] = []
    steps: list[float] = []
    steps_rebuilding: list[float] = []  # of steps: those whose between-ticks work ran a rebuild chunk
    pickups_before = 0
    rebuilds_before = 0
    limit = 3 * (options.warmup + options.ticks) + 10
    with torch.inference_mode():
        t = 0
        while len(ticks) < options.ticks:  # ticks without any call running (after a churn) don't count
            if t > limit:
                raise RuntimeError(f"{slots} slots: only {len(ticks)} busy ticks in {t} steps")
            if t == options.warmup:
                pickups_before = len(sink.pickups_ms)
                rebuilds_before = len(rebuilds)
            churn(t)
            chunks = engine.stats().rebuild_chunks
            started = time.perf_counter()
            result = engine.step()
            step_s = time.perf_counter() - started
            if t >= options.warmup and result.slots:
                ticks.append(result)
                steps.append(step_s)
                if engine.stats().rebuild_chunks > chunks:
                    steps_rebuilding.append(step_s)
            t += 1
        pickups = sink.pickups_ms[pickups_before:] or sink.pickups_ms
        # One more churn, so that the audited step holds exactly one join and a full tick.
        engine.end(calls.pop(0))
        for call in calls:
            engine.push(call, frames[t % len(frames)])
        engine.step()
        audited = engine.open(f"bench-{slots}-audit", PERSONA_ID, Sampling(seed=opened), sink)
        if audited is None:
            raise RuntimeError(f"{slots} slots: no slot free after a call left")
        for call in [*calls, audited]:
            engine.push(call, frames[(t + 1) % len(frames)])
        audit = _audit_step(engine, device)
    if sink.errors:
        raise RuntimeError(f"{slots} slots: the engine reported {sink.errors[:3]}")
    tick_s = [r.duration_s for r in ticks]
    bookkeeping_s = [r.duration_s - r.model_s for r in ticks]
    dispatch_s = audit["torch_calls_per_tick"] * per_call_us / 1e6
    if device.type == "cuda":
        host_s = [r.duration_s - r.wait_s for r in ticks]
        host_method = "wall time of the tick minus the time blocked in its device->host copy"
    else:
        host_s = [b + dispatch_s for b in bookkeeping_s]
        host_method = ("estimate: engine work outside the model (measured) + torch calls per tick x "
                       "host cost of one small torch call (measured)")
    peak, peak_kind = _peak_memory(device)
    record: dict[str, Any] = {
        "device": _device_name(device),
        "model": "full" if options.full else "tiny",
        "dtype": str(lm.dtype).removeprefix("torch."),
        "kv_dtype": str(lm.kv_dtype).removeprefix("torch."),
        "context": lm.cfg.context,
        "cuda_graph": engine.model_tick.graphed,
        "compiled": engine.model_tick.compiled,
        "compile_s": round(engine.model_tick.compile_s, 1),
        "slots": slots,
        "ticks": len(ticks),
        "warmup_ticks": options.warmup,
        "rows_per_tick_mean": round(statistics.fmean(len(r.slots) for r in ticks), 2),
        "tick_p50_ms": _ms(tick_s, 0.50),
        "tick_p99_ms": _ms(tick_s, 0.99),
        "tick_max_ms": _ms(tick_s, 1.0),
        "within_budget": _ms(tick_s, 0.99) <= options.budget_ms,
        "step_p50_ms": _ms(steps, 0.50),
        "step_p99_ms": _ms(steps, 0.99),
        "host_ms_p50": _ms(host_s, 0.50),
        "host_bookkeeping_ms_p50": _ms(bookkeeping_s, 0.50),
        "host_dispatch_ms_est": round(dispatch_s * 1000, 3),
        "host_method": host_method,
        "dispatch_us_per_call": round(per_call_us, 3),
        "pickup_ms": round(_pct(pickups, 0.50), 3),
        "pickup_max_ms": round(max(pickups), 3),
        "pickups": len(pickups),
        **_rebuild_figures(rebuilds[rebuilds_before:], steps, steps_rebuilding),
        "peak_memory_bytes": peak,
        "peak_memory_gib": round(peak / 2**30, 3),
        "peak_memory_kind": peak_kind,
        **audit,
    }
    del engine, lm, mimi
    _free(device)
    return record


def _rebuild_figures(
    reports: list[RebuildReport], steps: list[float], steps_rebuilding: list[float]
) -> dict[str, Any]:
    """What the long-call rebuilds during the measured ticks cost, and the steps (between-ticks work
    + tick, what makes the next tick late) with a rebuild chunk next to all steps."""
    prefill = [sum(r.chunk_seconds) for r in reports]
    chunks = [c for r in reports for c in r.chunk_seconds]
    figures: dict[str, Any] = {"rebuilds": len(reports), "rebuilds_forced": sum(r.forced for r in reports)}
    if reports:
        figures.update({
            "rebuild_ms_p50": _ms(prefill, 0.50),
            "rebuild_ms_max": _ms(prefill, 1.0),
            "rebuild_frames_mean": round(statistics.fmean(r.stop_frame - r.first_frame for r in reports), 1),
            "rebuild_chunks_mean": round(statistics.fmean(len(r.chunk_seconds) for r in reports), 1),
            "rebuild_chunk_ms_p50": _ms(chunks, 0.50),
            "rebuild_chunk_ms_max": _ms(chunks, 1.0),
            "step_p99_ms_rebuilding": _ms(steps_rebuilding, 0.99) if steps_rebuilding else None,
            "steps_rebuilding": len(steps_rebuilding),
        })
    return figures


def run_bench(options: BenchOptions, emit: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
    """Run every slot count, `emit` each JSON object as it is done, the summary last; returns them all."""
    device, dtype = resolve_device(options.device, options.dtype)
    if options.full and options.dtype == "auto":
        dtype = torch.bfloat16
    if options.full and device.type != "cuda":
        logger.warning("--full on %s: 16 GB of weights and very slow ticks; it is meant for a GPU", device)
    threads_before = torch.get_num_threads()
    threads = engine_threads(device)  # what the worker's engine thread uses
    torch.set_num_threads(threads)
    try:
        return _run_all(options, device, dtype, threads, emit)
    finally:
        torch.set_num_threads(threads_before)


def _run_all(
    options: BenchOptions, device: torch.device, dtype: torch.dtype, threads: int,
    emit: Callable[[dict[str, Any]], None],
) -> list[dict[str, Any]]:
    logger.info("bench: %s model on %s/%s, slots %s, %d+%d ticks, %d torch threads",
                "full" if options.full else "tiny", device, dtype, list(options.slots), options.warmup,
                options.ticks, threads)
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-persona-") as tmp, torch.inference_mode():
        cache_dir = (options.state_dir or Path(tmp)) / persona_cache.CACHE_DIRNAME
        started = time.perf_counter()
        lm_cfg, mimi_cfg = _configs(options)
        weights, lm1, mimi1 = tiny.build_weights(lm_cfg, mimi_cfg, device=device, dtype=dtype, seed=options.seed)
        _sync(device)
        build_s = time.perf_counter() - started
        persona = make_persona(options, lm1, mimi1, cache_dir, device)
        del lm1, mimi1
        _free(device)
        logger.info("weights built in %.1f s; persona prompt of %d frames: prefill %.1f ms, cache load %.1f ms",
                    build_s, persona.frames, persona.prefill_ms, persona.load_ms)
        per_call_us = dispatch_us(device)
        out_of_memory = None
        for slots in options.slots:
            if out_of_memory is not None:
                record = {"slots": slots, "error": f"skipped: {out_of_memory} slots ran out of memory"}
            else:
                try:
                    record = run_slots(slots, weights, persona, options, device, per_call_us)
                except torch.OutOfMemoryError as exc:
                    logger.warning("%d slots: out of memory: %s", slots, exc)
                    out_of_memory = slots
                    record = {"slots": slots, "error": f"out of memory: {str(exc).splitlines()[0]}"}
                if out_of_memory == slots:
                    _free(device)  # after the except block: the traceback no longer holds the tensors
            records.append(record)
            emit(record)
    fitting = [r["slots"] for r in records if "tick_p99_ms" in r and r["tick_p99_ms"] <= options.budget_ms]
    summary = {
        "summary": True,
        "device": _device_name(device),
        "model": "full" if options.full else "tiny",
        "budget_ms": options.budget_ms,
        "max_slots_within_budget": max(fitting) if fitting else None,
        "persona_prompt_frames": persona.frames,
        "persona_prefill_ms": round(persona.prefill_ms, 3),
        "persona_prefill_was_cached": persona.prefill_was_cached,
        "persona_cache_load_ms": round(persona.load_ms, 3),
        "weights_build_s": round(build_s, 3),
        "torch": torch.__version__,
        "torch_threads": threads,
        "cpu_count": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "commit": _commit(),
    }
    records.append(summary)
    emit(summary)
    return records


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return "cpu"


def _commit() -> str | None:
    """The repository's short commit (for the README's table): CALLCENTER_COMMIT if set (a copy of
    the tree without .git, e.g. on a lent GPU machine), else git's; None outside a git checkout."""
    if os.environ.get("CALLCENTER_COMMIT"):
        return os.environ["CALLCENTER_COMMIT"]
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        logger.info("no git commit for the report: %s", exc)
        return None
    return done.stdout.strip() or None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
