"""Time the gateway's resampler per frame: the streaming FrameResampler against the original one.

    python bench/resampler.py [--seconds 2] [--repeat 5]

The two frames the gateway converts on every call, on its event loop:
    8 kHz -> 24 kHz   one 20 ms Twilio media message (160 samples in, 480 out)
    24 kHz -> 8 kHz   one 80 ms worker frame (1920 samples in, 640 out)
The original (index matrices + einsum) is tests/pipecat/reference_resampler.py, the one copy of it.
Each figure is the best of `--repeat` runs of `--seconds` each (the least disturbed by other load),
microseconds per frame; the last column is what share of one core a call costs at that rate.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from app.pipecat.audio import FrameResampler  # noqa: E402
from tests.pipecat.reference_resampler import ReferenceResampler  # noqa: E402

CASES = (("8k -> 24k, 20 ms message", 8000, 24000, 160, 0.020), ("24k -> 8k, 80 ms frame", 24000, 8000, 1920, 0.080))


def per_call_us(process: Callable[[np.ndarray], np.ndarray], frame: np.ndarray, seconds: float, repeat: int) -> float:
    for _ in range(20):  # warm up
        process(frame)
    best = float("inf")
    for _ in range(repeat):
        calls, began = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - began) < seconds:
            for _ in range(50):
                process(frame)
            calls += 50
        best = min(best, elapsed / calls * 1e6)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one timed run")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per figure (the best counts)")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    print(f"{'case':<26} {'old us':>9} {'new us':>9} {'speed-up':>9} {'new, % of a core':>17}")
    for name, in_rate, out_rate, samples, period_s in CASES:
        frame = (rng.standard_normal(samples) * 8000).astype(np.int16)
        old = per_call_us(ReferenceResampler(in_rate, out_rate).process, frame, args.seconds, args.repeat)
        new = per_call_us(FrameResampler(in_rate, out_rate).process, frame, args.seconds, args.repeat)
        share = new / (period_s * 1e6) * 100
        print(f"{name:<26} {old:>9.1f} {new:>9.1f} {old / new:>8.1f}x {share:>16.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
