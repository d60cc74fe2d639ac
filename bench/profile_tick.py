"""Where a tick's GPU time goes: kernels per tick, GPU busy time per tick, the costliest kernels.

Runs the worker's model tick (`ModelTick`, every row active) on random full-size weights, the same
models as `callcenter bench --full`, once timed without the profiler and once under
`torch.profiler` (CUDA activity). Prints one JSON object per slot count:

    python bench/profile_tick.py --slots 1,32 --cuda-graph [--compile]     # on a GPU
    python bench/profile_tick.py --tiny --device cpu --slots 2 --ticks 3    # the script itself, on CPU

`wall_ms_p50`: a tick from the copy in to the copy out, unprofiled. `gpu_busy_ms_per_tick`: the sum
of the kernels' own times (what the tick costs the GPU; the rest of the wall time is launch gaps and
host work). `kernels_per_tick`: kernel launches, also inside a CUDA graph's replay. On CPU the
kernel fields are 0 and `top` lists CPU operators instead.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from app.worker.bench import caller_frames
from app.worker.engine import engine_threads
from app.worker.model import tiny
from app.worker.runtime import resolve_device
from app.worker.tick import ModelTick


def _device_us(event: Any) -> float:
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, name):
            return float(getattr(event, name))
    return 0.0


def _is_kernel(event: Any) -> bool:
    return getattr(event, "device_type", None) == torch.autograd.DeviceType.CUDA


def profile_slots(tick: ModelTick, slots: int, ticks: int, seed: int) -> dict[str, Any]:
    rows = list(range(slots))
    frames = [np.frombuffer(f, "<i2") for f in caller_frames(16, seed)]
    pcm = np.stack([frames[i % len(frames)] for i in range(slots)])  # [S, 1920]
    for _ in range(5):
        tick.run(rows, pcm)
    walls = []
    for _ in range(ticks):
        started = time.perf_counter()
        tick.run(rows, pcm)
        walls.append(time.perf_counter() - started)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if tick.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(ticks):
            tick.run(rows, pcm)
    averages = prof.key_averages()
    kernels = [e for e in averages if _is_kernel(e)]
    if kernels:
        top = sorted(kernels, key=_device_us, reverse=True)[:15]
        top_rows = [{"kernel": e.key[:90], "ms_per_tick": round(_device_us(e) / ticks / 1000, 4),
                     "calls_per_tick": round(e.count / ticks, 2)} for e in top]
    else:
        top = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
        top_rows = [{"op": e.key[:90], "ms_per_tick": round(e.self_cpu_time_total / ticks / 1000, 4),
                     "calls_per_tick": round(e.count / ticks, 2)} for e in top]
    return {
        "device": torch.cuda.get_device_name(tick.device) if tick.device.type == "cuda" else "cpu",
        "slots": slots,
        "cuda_graph": tick.graphed,
        "compiled": tick.compiled,
        "ticks": ticks,
        "wall_ms_p50": round(statistics.median(walls) * 1000, 3),
        "wall_ms_max": round(max(walls) * 1000, 3),
        "gpu_busy_ms_per_tick": round(sum(_device_us(e) for e in kernels) / ticks / 1000, 3),
        "kernels_per_tick": round(sum(e.count for e in kernels) / ticks, 1),
        "top": top_rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", default="1,32")
    parser.add_argument("--ticks", type=int, default=20)
    parser.add_argument("--tiny", action="store_true", help="tiny config (checks the script on CPU)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cuda-graph", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    lm_cfg, mimi_cfg = tiny.configs(full=not args.tiny)
    device, dtype = resolve_device(args.device, "auto")
    if not args.tiny:
        dtype = torch.bfloat16
    torch.set_num_threads(engine_threads(device))  # as the worker's engine thread
    with torch.inference_mode():
        weights, lm1, mimi1 = tiny.build_weights(lm_cfg, mimi_cfg, device=device, dtype=dtype, seed=args.seed)
        del lm1, mimi1
        for slots in (int(s) for s in args.slots.split(",")):
            lm, mimi = tiny.models_for(weights, slots, device)
            lm.set_sampling(list(range(slots)), seed=args.seed)
            tick = ModelTick(lm, mimi, cuda_graph=args.cuda_graph and device.type == "cuda",
                             compile="inductor" if args.compile else None)
            record = profile_slots(tick, slots, args.ticks, args.seed)
            record["compile_s"] = round(tick.compile_s, 1)
            print(json.dumps(record), flush=True)
            del tick, lm, mimi
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
