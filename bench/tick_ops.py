"""Count the operators of one engine tick, by part of the model, for the full-size and tiny configs.

With the tick replayed as a CUDA graph, the host cost is gone but every operator is still one GPU
kernel (launch gap plus a tail of a microsecond or more each, even when tiny): at full size the
count is what stands between the memory-bandwidth floor and the measured tick. This counts the
aten operators that do work (views and other metadata-only operators excluded) of
`ModelTick._compute`, the worker's tick, on the meta device: no weights, no GPU, instant.

    python bench/tick_ops.py                    # full-size and tiny, 1 and 32 slots
    python bench/tick_ops.py --config full --slots 32

Prints one JSON object per (config, slots): `ops_per_tick` and `by_part` (temporal transformer,
depformer, sampling, Mimi, the LM's token bookkeeping and embeddings, the tick's own packing).
Counted outside inference mode, where composite operators are split into the kernels they run
(`linear` into a matmul, `.float()` into a copy); an attention call and an RMSNorm count as one
each: a GPU runs one fused kernel for them where the meta device runs their decompositions. So
`ops_per_tick` estimates the kernels one tick launches on a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from app.worker.model.lm import (
    Depformer,
    DepformerBlock,
    LMConfig,
    PersonaPlexLM,
    TemporalBlock,
)
from app.worker.model.mimi import Mimi, MimiConfig
from app.worker.tick import ModelTick

_METADATA_OPS = {"_unsafe_view", "alias", "as_strided", "detach", "expand", "lift_fresh", "permute", "select",
                 "slice", "split", "split_with_sizes", "squeeze", "t", "transpose", "unbind", "unflatten",
                 "unsqueeze", "view", "_reshape_alias", "reshape", "chunk", "narrow", "diagonal"}


def _part(frame: FrameType | None) -> str:
    """Which part of the tick the innermost app frame belongs to."""
    while frame is not None:
        path = frame.f_code.co_filename
        if path.endswith("sampling.py"):
            return "sampling"
        owner = frame.f_locals.get("self")
        if isinstance(owner, (Depformer, DepformerBlock)):
            return "depformer"
        if isinstance(owner, TemporalBlock) or frame.f_code.co_name == "_temporal_step":
            return "temporal"
        if path.endswith("mimi.py"):
            return "mimi"
        if path.endswith("lm.py") and frame.f_code.co_name == "step":
            return "lm_tokens_and_heads"
        if path.endswith("tick.py"):
            return "tick_packing"
        frame = frame.f_back
    return "other"


class _OpCounter(TorchDispatchMode):
    """Counts working aten operators by part; a call of one of `_FUSED_ON_GPU` counts once."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: Counter[str] = Counter()
        self.ops: Counter[str] = Counter()
        self.in_fused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if not self.in_fused and name not in _METADATA_OPS and not getattr(func, "is_view", False):
            self.parts[_part(sys._getframe(1))] += 1
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


# One fused kernel each on a GPU; on the meta device (and CPU) they run as their decompositions.
_FUSED_ON_GPU = {F.scaled_dot_product_attention: "attention", F.rms_norm: "rms_norm"}


class _FusedAsOne(TorchFunctionMode):
    def __init__(self, counter: _OpCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = _FUSED_ON_GPU.get(func)
        if name is None or self.counter.in_fused:
            return func(*args, **(kwargs or {}))
        self.counter.parts[_part(sys._getframe(1))] += 1
        self.counter.ops[name] += 1
        self.counter.in_fused = True
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.counter.in_fused = False


def count(config: str, slots: int) -> dict[str, Any]:
    """Operators of one tick with every row active (one frame in, one out per slot)."""
    lm_cfg = LMConfig.personaplex_7b() if config == "full" else LMConfig.tiny()
    mimi_cfg = MimiConfig.personaplex() if config == "full" else MimiConfig.tiny()
    with torch.device("meta"):
        lm = PersonaPlexLM(lm_cfg, max_slots=slots, dtype=torch.bfloat16).eval()
        mimi = Mimi(mimi_cfg, max_slots=slots, dtype=torch.float32).eval()
    tick = ModelTick(lm, mimi)
    tick._active.fill_(True)
    counter = _OpCounter()
    with counter, _FusedAsOne(counter):
        tick._compute()
    return {
        "config": config,
        "slots": slots,
        "ops_per_tick": sum(counter.parts.values()),
        "by_part": dict(counter.parts.most_common()),
        "attention_calls": counter.ops["attention"],
        "top_ops": dict(counter.ops.most_common(12)),
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=["full", "tiny", "both"], default="both")
    parser.add_argument("--slots", default="1,32", help="comma-separated slot counts (default 1,32)")
    args = parser.parse_args(argv)
    configs = ["full", "tiny"] if args.config == "both" else [args.config]
    for config in configs:
        for slots in (int(s) for s in args.slots.split(",")):
            print(json.dumps(count(config, slots)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
