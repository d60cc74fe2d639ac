"""The model part of one engine tick, on static buffers: Mimi encode -> LM step -> Mimi decode.

Every tensor the tick reads or writes has a fixed shape and lives in a buffer allocated once for
`max_slots` rows: caller PCM in, the `active` mask in, and one packed int16 block out (bot PCM,
the output frame's text token and agent codes, and the caller codes of this frame, every row). Joins and leaves only change the models' per-slot state
in place between ticks, so the same work can be replayed as a CUDA graph.

With `compile="inductor"` the tick's work is compiled once with `torch.compile` (one graph, no
breaks, static shapes): elementwise chains fuse into few kernels, which matters on a GPU where every
operator is a kernel even inside a CUDA graph. It compiles at construction (minutes at full size;
torch's on-disk cache makes a restart faster), with every row inactive, so no state moves.

`ModelTick.run` is eager by default. `capture(recorder)` records the tick's work once, with every
row inactive (which leaves all state untouched), and from then on `run` replays the recording:

- `cuda_graph_recorder(device)`: a CUDA graph (after warm-up ticks on a side stream). The host copies
  in and out go through pinned buffers, and the copy out is the tick's only host sync. This path has
  not yet been run on a GPU in this project: it is off unless asked for (WORKER_CUDA_GRAPH=1).
- `trace_recorder`: the CPU stand-in with the same contract. It records the tick's aten operators
  once (`make_fx`), every Python decision frozen as it was at capture, and replays exactly those on
  the same tensors. A tick that stays correct under this replay while calls join and leave keeps a
  CUDA graph valid too, and `graph_hazards` lists what in the recording a CUDA graph cannot hold
  (host reads of device values, data-dependent shapes, tensors made from host data).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from app.protocol import FRAME_SAMPLES
from app.worker.model.lm import PersonaPlexLM
from app.worker.model.mimi import Mimi

logger = logging.getLogger(__name__)

_WARMUP_TICKS = 3

Work = Callable[[], None]
Replay = Callable[[], object]
Recorder = Callable[[Work], Replay]  # records `work` once; the result replays it
COMPILE_BACKENDS = ("inductor", "aot_eager")  # aot_eager: same tracing, no code generation (tests)

# aten operators a CUDA graph cannot hold or that make the host wait for the device.
_HAZARDS = {
    "_local_scalar_dense": "reads a device value on the host (.item(), int(), bool(), tolist())",
    "nonzero": "data-dependent shape (nonzero, bool-mask indexing)",
    "masked_select": "data-dependent shape",
    "unique": "data-dependent shape",
    "_unique": "data-dependent shape",
    "_unique2": "data-dependent shape",
    "unique_consecutive": "data-dependent shape",
    "unique_dim": "data-dependent shape",
    "repeat_interleave": "data-dependent shape when repeats is a tensor",
    "bincount": "data-dependent shape",
    "lift_fresh_copy": "a tensor made from host data inside the tick (a host->device copy on a GPU)",
    "_assert_async": "a device-side assert that syncs",
}


class ModelTick:
    """Mimi encode -> LM step -> Mimi decode for all `max_slots` rows on static buffers."""

    def __init__(
        self, lm: PersonaPlexLM, mimi: Mimi, *, cuda_graph: bool = False, compile: str | None = None
    ) -> None:
        self.lm, self.mimi = lm, mimi
        s, dev = lm.max_slots, lm.device
        self.slots = s
        self.device = dev
        self.width = FRAME_SAMPLES + 1 + 2 * lm.cfg.agent_codebooks  # PCM, text token, agent codes, caller codes
        pinned = dev.type == "cuda"
        self._pcm_host = torch.zeros(s, FRAME_SAMPLES, dtype=torch.float32, pin_memory=pinned)  # [S, 1920]
        self._active_host = torch.zeros(s, dtype=torch.bool, pin_memory=pinned)  # [S]
        self._out_host = torch.zeros(s, self.width, dtype=torch.int16, pin_memory=pinned)  # [S, 1937]
        self._pcm = torch.zeros(s, FRAME_SAMPLES, dtype=torch.float32, device=dev)  # [S, 1920]
        self._active = torch.zeros(s, dtype=torch.bool, device=dev)  # [S]
        self._out = torch.zeros(s, self.width, dtype=torch.int16, device=dev)  # [S, 1937]
        self.replay: Replay | None = None  # what the recorder returned; run() calls it instead of the work
        self.last_wait_s = 0.0  # time the last run() was blocked on the copy out (the device's work)
        self.compiled = compile
        self.compile_s = 0.0
        self.work: Work = self._compute  # what one tick runs when not replaying: eager or compiled
        if compile is not None:
            if compile not in COMPILE_BACKENDS:
                raise ValueError(f"compile backend must be one of {COMPILE_BACKENDS}, got {compile!r}")
            self.work = torch.compile(self._compute, backend=compile, fullgraph=True, dynamic=False)
            started = time.perf_counter()
            self._rest_all_rows()
            with torch.inference_mode():
                self.work()  # compiles now, not on a caller's first tick
            self.compile_s = time.perf_counter() - started
            logger.info("engine tick compiled (%s) for %d slots in %.1f s", compile, s, self.compile_s)
        if cuda_graph:
            if dev.type != "cuda":
                raise ValueError(f"a CUDA graph needs a CUDA device, the model is on {dev}")
            self.capture(cuda_graph_recorder(dev))

    @property
    def graphed(self) -> bool:
        return self.replay is not None

    def capture(self, record: Recorder) -> None:
        """Record the tick's work once with `record`; `run` replays the recording from now on.

        Between ticks only: the work is recorded with every row inactive, so recording (and any
        warm-up the recorder runs) leaves every slot's state as it was; calls may already be running.
        """
        self._rest_all_rows()
        self.replay = record(self.work)
        logger.info("engine tick captured for %d slots (%s)", self.slots, getattr(record, "__name__", record))

    def _rest_all_rows(self) -> None:
        self._pcm.zero_()
        self._active.zero_()

    def _compute(self) -> None:
        """The tick's tensor work: reads `_pcm`, `_active`; writes `_out`. No host sync inside.

        Callers run it in inference mode (not entered here: a compiled graph cannot switch it)."""
        lm, cfg = self.lm, self.lm.cfg
        codes = self.mimi.encode_step(self._pcm, self._active)  # [S, 8] caller codes
        frame = torch.full((self.slots, cfg.num_streams), -1, dtype=torch.long, device=self.device)  # [S, 17]
        user = 1 + cfg.agent_codebooks
        frame[:, user : user + cfg.agent_codebooks] = codes
        out = lm.step(frame, self._active)  # text [S], audio [S, 8], valid [S]
        bot = self.mimi.decode_step(out.audio, self._active & out.valid)  # [S, 1920], zeros where not valid
        bot16 = (bot.float().clamp(-1.0, 1.0) * 32767.0).round().to(torch.int16)  # [S, 1920]
        # Token ids < 32768 fit int16: one block, one transfer.
        self._out.copy_(
            torch.cat([bot16, out.text[:, None].to(torch.int16), out.audio.to(torch.int16), codes.to(torch.int16)], dim=1)
        )

    def run(self, rows: list[int], pcm: np.ndarray) -> np.ndarray:
        """One tick for the caller frames `pcm` [n, 1920] int16 of slots `rows`; other rows rest.

        Returns the packed output of those rows, [n, 1920 + 1 + 8 + 8] int16, in the same order.
        """
        self._pcm_host.zero_()
        self._active_host.zero_()
        if rows:
            index = torch.as_tensor(rows, dtype=torch.long)
            self._pcm_host[index] = torch.from_numpy(pcm.astype(np.float32) * (1.0 / 32768.0))
            self._active_host[index] = True
        self._pcm.copy_(self._pcm_host, non_blocking=True)
        self._active.copy_(self._active_host, non_blocking=True)
        with torch.inference_mode():
            if self.replay is not None:
                self.replay()
            else:
                self._run_work()
        waited = time.perf_counter()
        self._out_host.copy_(self._out, non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the tick's one host sync
        self.last_wait_s = time.perf_counter() - waited
        return self._out_host.numpy()[rows]

    def _run_work(self) -> None:
        """One tick of `work`. A compiled tick never recompiles on a caller's tick (minutes): if its
        guards fail, the tick, untouched so far, runs eagerly, from then on, and that is logged."""
        if self.compiled is None:
            self.work()
            return
        try:
            with torch.compiler.set_stance("fail_on_recompile"):
                self.work()
        except RuntimeError as exc:
            if "recompile" not in str(exc):
                raise
            logger.error("the compiled engine tick would recompile; running it eagerly from now on: %s",
                         str(exc).splitlines()[0])
            self.work, self.compiled = self._compute, None
            self.work()

    def split(self, packed: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Packed rows -> (PCM16 [n, 1920], output text token [n], output agent codes [n, 8],
        this frame's caller codes [n, 8]); tokens are -1 where the output frame is not valid."""
        a = FRAME_SAMPLES + 1
        k = self.lm.cfg.agent_codebooks
        return packed[:, :FRAME_SAMPLES], packed[:, FRAME_SAMPLES], packed[:, a : a + k], packed[:, a + k :]


def cuda_graph_recorder(device: torch.device) -> Recorder:
    """Records work as a CUDA graph on `device`, after warm-up runs on a side stream."""

    def cuda_graph(work: Work) -> Replay:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(_WARMUP_TICKS):
                work()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.inference_mode():
            work()
        torch.cuda.synchronize(device)
        return graph.replay  # the bound method keeps the graph alive

    return cuda_graph


def trace_recorder(work: Work) -> torch.fx.GraphModule:
    """Records work as the aten operators it runs once (see the module docstring): a GraphModule
    whose call replays them on the very tensors the work touched (state updates stay in place)."""
    with torch.inference_mode():
        try:
            return make_fx(lambda: work())()
        except RuntimeError as exc:  # e.g. a host read of a device value: a CUDA graph could not hold it
            raise RuntimeError(f"the tick cannot be recorded as one fixed graph: {exc}") from exc


def graph_hazards(graph: torch.fx.GraphModule) -> list[str]:
    """The operators of a `trace_recorder` recording that a CUDA graph cannot hold, as
    "name: why" (empty: none)."""
    found = []
    for node in graph.graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
        if name in _HAZARDS:
            found.append(f"{node.name}: {_HAZARDS[name]}")
        elif name == "_to_copy" and node.kwargs.get("device") is not None:
            found.append(f"{node.name}: moves a tensor to {node.kwargs['device']} inside the tick")
        elif name in ("index", "index_put", "index_put_", "_index_put_impl_") and _bool_indices(node):
            found.append(f"{node.name}: bool-mask indexing (a nonzero and a host sync on a GPU)")
    return found


def _bool_indices(node: torch.fx.Node) -> bool:
    indices = node.args[1] if len(node.args) > 1 else ()
    for index in indices if isinstance(indices, (list, tuple)) else ():
        value = index.meta.get("val") if isinstance(index, torch.fx.Node) else None
        if isinstance(value, torch.Tensor) and value.dtype in (torch.bool, torch.uint8):
            return True
    return False
