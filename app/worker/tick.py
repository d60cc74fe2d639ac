"""The model part of one engine tick, on static buffers: Mimi encode -> LM step -> Mimi decode.

Every tensor the tick reads or writes has a fixed shape and lives in a buffer allocated once for
`max_slots` rows: caller PCM in, the `active` mask in, and one packed int16 block out (bot PCM,
text token and agent codes of every row). Joins and leaves only change the models' per-slot state
in place between ticks, so the same work can be replayed as a CUDA graph.

`ModelTick.run` is eager by default. With `cuda_graph=True` on a CUDA device it captures the tick
once (after warm-up ticks with every row inactive, which leave all state untouched) and replays the
graph; the host copies in and out go through pinned buffers, and the copy out is the tick's only
host sync. The graph path has not yet been run on a GPU in this project: it is off unless asked
for (WORKER_CUDA_GRAPH=1), and the bench compares it with the eager path.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from app.protocol import FRAME_SAMPLES
from app.worker.model.lm import PersonaPlexLM
from app.worker.model.mimi import Mimi

logger = logging.getLogger(__name__)

_WARMUP_TICKS = 3


class ModelTick:
    """Mimi encode -> LM step -> Mimi decode for all `max_slots` rows on static buffers."""

    def __init__(self, lm: PersonaPlexLM, mimi: Mimi, *, cuda_graph: bool = False) -> None:
        self.lm, self.mimi = lm, mimi
        s, dev = lm.max_slots, lm.device
        self.slots = s
        self.device = dev
        self.width = FRAME_SAMPLES + 1 + lm.cfg.agent_codebooks  # PCM, text token, agent codes
        pinned = dev.type == "cuda"
        self._pcm_host = torch.zeros(s, FRAME_SAMPLES, dtype=torch.float32, pin_memory=pinned)  # [S, 1920]
        self._active_host = torch.zeros(s, dtype=torch.bool, pin_memory=pinned)  # [S]
        self._out_host = torch.zeros(s, self.width, dtype=torch.int16, pin_memory=pinned)  # [S, 1929]
        self._pcm = torch.zeros(s, FRAME_SAMPLES, dtype=torch.float32, device=dev)  # [S, 1920]
        self._active = torch.zeros(s, dtype=torch.bool, device=dev)  # [S]
        self._out = torch.zeros(s, self.width, dtype=torch.int16, device=dev)  # [S, 1929]
        self._graph: torch.cuda.CUDAGraph | None = None
        self.last_wait_s = 0.0  # time the last run() was blocked on the copy out (the device's work)
        if cuda_graph:
            if dev.type != "cuda":
                raise ValueError(f"a CUDA graph needs a CUDA device, the model is on {dev}")
            self._capture()

    @property
    def graphed(self) -> bool:
        return self._graph is not None

    @torch.inference_mode()
    def _compute(self) -> None:
        """The tick's tensor work: reads `_pcm`, `_active`; writes `_out`. No host sync inside."""
        lm, cfg = self.lm, self.lm.cfg
        codes = self.mimi.encode_step(self._pcm, self._active)  # [S, 8] caller codes
        frame = torch.full((self.slots, cfg.num_streams), -1, dtype=torch.long, device=self.device)  # [S, 17]
        user = 1 + cfg.agent_codebooks
        frame[:, user : user + cfg.agent_codebooks] = codes
        out = lm.step(frame, self._active)  # text [S], audio [S, 8], valid [S]
        bot = self.mimi.decode_step(out.audio, self._active & out.valid)  # [S, 1920], zeros where not valid
        bot16 = (bot.float().clamp(-1.0, 1.0) * 32767.0).round().to(torch.int16)  # [S, 1920]
        # Token ids < 32768 fit int16: one block, one transfer.
        self._out.copy_(torch.cat([bot16, out.text[:, None].to(torch.int16), out.audio.to(torch.int16)], dim=1))

    def _capture(self) -> None:
        self._active.zero_()  # warm-up and capture with every row inactive: no state changes
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(_WARMUP_TICKS):
                self._compute()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._compute()
        torch.cuda.synchronize(self.device)
        self._graph = graph
        logger.info("engine tick captured as a CUDA graph for %d slots", self.slots)

    def run(self, rows: list[int], pcm: np.ndarray) -> np.ndarray:
        """One tick for the caller frames `pcm` [n, 1920] int16 of slots `rows`; other rows rest.

        Returns the packed output of those rows, [n, 1920 + 1 + 8] int16, in the same order.
        """
        self._pcm_host.zero_()
        self._active_host.zero_()
        if rows:
            index = torch.as_tensor(rows, dtype=torch.long)
            self._pcm_host[index] = torch.from_numpy(pcm.astype(np.float32) * (1.0 / 32768.0))
            self._active_host[index] = True
        self._pcm.copy_(self._pcm_host, non_blocking=True)
        self._active.copy_(self._active_host, non_blocking=True)
        if self._graph is not None:
            self._graph.replay()
        else:
            self._compute()
        waited = time.perf_counter()
        self._out_host.copy_(self._out, non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the tick's one host sync
        self.last_wait_s = time.perf_counter() - waited
        return self._out_host.numpy()[rows]

    def split(self, packed: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Packed rows -> (PCM16 [n, 1920], text token [n], agent codes [n, 8])."""
        return packed[:, :FRAME_SAMPLES], packed[:, FRAME_SAMPLES], packed[:, FRAME_SAMPLES + 1 :]
