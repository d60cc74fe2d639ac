"""The model tick on static buffers: only the given rows advance, outputs come back in row order."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from app.config import WorkerSettings
from app.protocol import FRAME_SAMPLES, Ended, Ready, Sampling, Text
from app.worker.engine import Engine
from app.worker.model.lm import LMConfig, PersonaPlexLM
from app.worker.model.mimi import Mimi, MimiConfig
from app.worker.runtime import build_runtime
from app.worker.tick import (
    ModelTick,
    Recorder,
    cuda_graph_recorder,
    graph_hazards,
    trace_recorder,
)


def _models(slots: int) -> tuple[PersonaPlexLM, Mimi]:
    torch.manual_seed(0)
    lm = PersonaPlexLM(LMConfig.tiny(), max_slots=slots).eval()
    mimi = Mimi(MimiConfig.tiny(), max_slots=slots).eval()
    return lm, mimi


def _speechy(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, FRAME_SAMPLES)) * 3000).astype(np.int16)


def test_only_the_given_rows_advance_and_outputs_follow_row_order() -> None:
    lm, mimi = _models(3)
    tick = ModelTick(lm, mimi)
    kv_before = torch.stack([ring.kv[:, 0] for ring in lm.rings]).clone()
    offsets = []
    for t in range(4):
        out = tick.run([2, 1], _speechy(2, t))
        assert out.shape == (2, FRAME_SAMPLES + 1 + 16) and out.dtype == np.int16
        offsets.append(lm.tokens.offset.tolist())
    assert offsets[-1] == [0, 4, 4]  # slot 0 never ran
    assert torch.equal(torch.stack([ring.kv[:, 0] for ring in lm.rings]), kv_before)
    # After the first two frames (offset > max delay) the rows carry valid agent codes.
    pcm, text, codes, _ = tick.split(out)
    assert pcm.shape == (2, FRAME_SAMPLES) and text.shape == (2,) and codes.shape == (2, 8)
    assert (codes >= 0).all() and (codes < 2048).all()


def test_same_frames_give_the_same_output_whichever_slot_and_batch() -> None:
    """Row results do not depend on the slot index or on the other rows of the tick."""
    frames = [_speechy(1, 10 + t) for t in range(5)]
    lm_a, mimi_a = _models(3)
    lm_b, mimi_b = _models(3)
    for lm in (lm_a, lm_b):
        lm.set_sampling([0, 1, 2], seed=99)
    alone = ModelTick(lm_a, mimi_a)
    busy = ModelTick(lm_b, mimi_b)
    for t, frame in enumerate(frames):
        a = alone.run([0], frame)
        b = busy.run([1, 2], np.concatenate([frame, _speechy(1, 50 + t)]))
        assert np.array_equal(a[0, FRAME_SAMPLES:], b[0, FRAME_SAMPLES:])  # text + codes exactly
        assert np.abs(a[0, :FRAME_SAMPLES].astype(int) - b[0, :FRAME_SAMPLES].astype(int)).max() <= 1


def test_a_cuda_graph_needs_a_cuda_device() -> None:
    lm, mimi = _models(1)
    with pytest.raises(ValueError, match="CUDA"):
        ModelTick(lm, mimi, cuda_graph=True)


# ---------------------------------------------------------------------------- capture and replay
# A CUDA graph freezes every Python decision the tick makes at capture and replays the same kernels
# on the same tensors. `trace_recorder` does exactly that on CPU, so these tests check what the
# worker's CUDA graph relies on: joins, leaves and aborts between ticks keep a recorded tick valid.


class _Calls:
    """Drives one engine through a script of calls; records every output per call."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.leases: dict[str, object] = {}
        self.outputs: dict[str, list[object]] = {}

    def open(self, call_id: str, persona: str, seed: int) -> None:
        box: list[object] = []
        lease = self.engine.open(call_id, persona, Sampling(seed=seed), box.append)
        assert lease is not None
        self.leases[call_id], self.outputs[call_id] = lease, box

    def heard(self, call_id: str) -> list[object]:
        """What the caller got: bot audio, text with frame index, the end (not timings)."""
        kept = []
        for item in self.outputs[call_id]:
            if isinstance(item, Ready):
                kept.append(("ready", item.slot))
            elif isinstance(item, (bytes, Text, Ended)):
                kept.append(item)
        return kept


def _script(calls: _Calls, t: int, at_tick: Callable[[int], None] | None = None) -> None:
    """Tick t of a busy line: calls join, talk, hang up, get aborted; slots are reused."""
    script = {
        0: [("open", "a", "waste-management", 1), ("open", "b", "restaurant-orders", 2)],
        3: [("open", "c", "general-assistant", 3)],
        12: [("end", "a")],
        14: [("open", "d", "waste-management", 4)],  # takes a's slot
        21: [("abort", "b")],
        22: [("open", "e", "restaurant-orders", 5)],
        33: [("end", "c"), ("end", "d")],
    }
    for action in script.get(t, []):
        if action[0] == "open":
            calls.open(*action[1:])
        elif action[0] == "end":
            calls.engine.end(calls.leases[action[1]])
        else:
            calls.engine.abort(calls.leases[action[1]])
    for call_id, lease in calls.leases.items():
        if call_id in ("c",) and t % 5 == 4:
            continue  # c's network hiccups: no frame this tick, its row rests
        calls.engine.push(lease, _speechy(1, 1000 * ord(call_id[0]) + t).tobytes())
    if at_tick is not None:
        at_tick(t)
    calls.engine.step()


def _run_script(
    settings: WorkerSettings,
    capture_at: int | None,
    record: Recorder = trace_recorder,
    ticks: int = 40,
    compile: str | None = None,
) -> _Calls:
    runtime = build_runtime(settings)
    calls = _Calls(Engine(runtime, worker_id="w", max_queue_frames=4, compile=compile))

    def at_tick(t: int) -> None:
        if t == capture_at:
            calls.engine.model_tick.capture(record)

    for t in range(ticks):
        _script(calls, t, at_tick)
    assert calls.engine.model_tick.graphed == (capture_at is not None)
    return calls


def _assert_same_calls(eager: _Calls, replayed: _Calls, label: str) -> None:
    for call_id in eager.outputs:
        want, got = eager.heard(call_id), replayed.heard(call_id)
        assert [type(x) for x in got] == [type(x) for x in want], (label, call_id)
        assert got == want, f"call {call_id} differs when the tick is {label}"


def test_a_recorded_tick_serves_joins_leaves_and_aborts_exactly_like_the_eager_one(
    make_settings: Callable[..., WorkerSettings],
) -> None:
    """Recorded before the first call and recorded mid-call: every caller hears exactly the same."""
    settings = make_settings(worker_max_slots=3)
    eager = _run_script(settings, capture_at=None)
    for capture_at in (0, 17):
        _assert_same_calls(eager, _run_script(settings, capture_at=capture_at), f"recorded at tick {capture_at}")
    heard = {call_id: eager.heard(call_id) for call_id in eager.outputs}
    assert sum(isinstance(x, bytes) for x in heard["c"]) > 20  # ran past both models' contexts
    assert isinstance(heard["b"][-1], Ended) and heard["b"][-1].reason == "aborted"


def test_a_compiled_tick_serves_the_same_calls_as_the_eager_one(
    make_settings: Callable[..., WorkerSettings],
) -> None:
    """torch.compile of the tick (one graph, in-place state functionalised and written back) keeps
    every caller's audio and text; aot_eager traces exactly as inductor does, without codegen."""
    settings = make_settings(worker_max_slots=3)
    eager = _run_script(settings, capture_at=None)
    compiled = _run_script(settings, capture_at=None, compile="aot_eager")
    assert compiled.engine.model_tick.compiled == "aot_eager"  # joins and leaves never forced a recompile
    _assert_same_calls(eager, compiled, "compiled")


def test_a_compiled_tick_that_would_recompile_runs_eagerly_instead() -> None:
    lm, mimi = _models(2)
    tick = ModelTick(lm, mimi, compile="aot_eager")
    assert tick.compiled == "aot_eager" and tick.compile_s > 0
    tick.run([0], _speechy(1, 0))
    lm.sampling.temp_text = lm.sampling.temp_text.double()  # a tensor the compiled tick was specialised on changes dtype
    out = tick.run([0, 1], _speechy(2, 1))
    assert out.shape == (2, FRAME_SAMPLES + 1 + 16)
    assert tick.compiled is None and tick.work == tick._compute


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU machine)")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_cuda_graph_serves_calls_exactly_like_the_eager_tick(
    make_settings: Callable[..., WorkerSettings], dtype: str
) -> None:
    """The worker's CUDA graph (WORKER_CUDA_GRAPH): captured before calls and mid-call, on the GPU."""
    settings = make_settings(worker_max_slots=3, worker_device="cuda", worker_dtype=dtype)
    eager = _run_script(settings, capture_at=None)
    record = cuda_graph_recorder(torch.device("cuda"))
    for capture_at in (0, 17):
        label = f"a CUDA graph captured at tick {capture_at}"
        _assert_same_calls(eager, _run_script(settings, capture_at=capture_at, record=record), label)
    runtime = build_runtime(settings)
    assert Engine(runtime, worker_id="w", max_queue_frames=4, cuda_graph=True).model_tick.graphed


def test_the_engine_tick_holds_nothing_a_cuda_graph_cannot() -> None:
    lm, mimi = _models(4)
    tick = ModelTick(lm, mimi)
    tick.capture(trace_recorder)
    assert graph_hazards(tick.replay) == []


def test_hazards_are_named_and_host_reads_refuse_to_record() -> None:
    x, buf = torch.randn(8), torch.zeros(8)

    def host_data_and_bool_mask() -> None:
        buf.add_(torch.tensor([1.0] * 8))  # host data made into a tensor inside the tick
        buf[x > 0] = 2.0  # bool-mask indexing: a nonzero on the GPU
        x.to("meta")  # a copy between devices

    hazards = graph_hazards(trace_recorder(host_data_and_bool_mask))
    assert any("host data" in h for h in hazards)
    assert any("bool-mask" in h for h in hazards)
    assert any("moves a tensor" in h for h in hazards)

    def host_read() -> None:
        buf.mul_(int((x > 0).sum()))  # the count is read on the host: frozen at capture

    with pytest.raises(RuntimeError, match="fixed graph"):
        trace_recorder(host_read)


def test_the_inductor_compiled_tick_serves_the_same_calls(make_settings: Callable[..., WorkerSettings]) -> None:
    """WORKER_COMPILE's real path (generated code; minutes to compile on a small CPU)."""
    settings = make_settings(worker_max_slots=3)
    eager = _run_script(settings, capture_at=None)
    compiled = _run_script(settings, capture_at=None, compile="inductor")
    for call_id in eager.outputs:
        want, got = eager.heard(call_id), compiled.heard(call_id)
        assert [x for x in got if not isinstance(x, bytes)] == [x for x in want if not isinstance(x, bytes)]
        pcm_want = np.frombuffer(b"".join(x for x in want if isinstance(x, bytes)), "<i2").astype(int)
        pcm_got = np.frombuffer(b"".join(x for x in got if isinstance(x, bytes)), "<i2").astype(int)
        assert pcm_got.shape == pcm_want.shape and np.abs(pcm_got - pcm_want).max() <= 2  # fused float math
