"""The delay the server adds to a call, per segment: N concurrent simulated Twilio calls through a
real gateway and a real worker (tiny random-weight model on CPU unless told otherwise).

    python bench/latency.py [--calls 4] [--seconds 20] [--repeat 1] [--stall-ms 300]
        [--worker-model tiny] [--worker-compile] [--no-frame-align] [--twilio-media-chunk-ms 20]
        [--json-out FILE] [--keep-dir DIR]

What runs (all started here, all stopped here, also on Ctrl-C or an error): an embedded Redis,
`python -m app.cli worker` and `python -m app.cli gateway` of this tree, and the callers in this
process (`app.sim.run_call`: signed webhook, signed stream, 20 ms μ-law media in real time).

Each run: N calls at once, --seconds of caller audio each. The numbers are the gateway's own
per-frame histograms (`gateway_added_latency_seconds{segment}`, every answered frame it plays:
app/pipecat/latency.py), read from its /metrics at the edges of windows (app/sim/latency.py):
    steady      from --settle-s after the last call started until the stall (or the end)
    stall       with --stall-ms: the worker is stopped (SIGSTOP) that long at --stall-at-s, then
                continued; this window runs from the stall until 1 s after it ends
    recovered   from 1 s after the stall until the end: the issue's "back to its baseline within 1 s"
The end is 1.5 s before the first call's audio runs out. Per window and segment: frames, mean, p50,
p95, p99 (ms; the buckets are 2.5 ms wide up to 100 ms). Also per run: the worker's overruns and
catch-ups, the gateway's playout re-syncs, and the callers' late frames (CallReport). One JSON line
per run on stdout, then a summary; logs on stderr. Fields and measurements: bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from gateway_load import (  # noqa: E402 (bench/ on the path first: this file runs as a script)
    REPO,
    Proc,
    caller_wav,
    child_env,
    commit_of,
    free_port,
    keep_logs,
    log,
    start_proc,
    tail,
    wait_http,
    write_json_out,
)

import httpx  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from app.callstate import EmbeddedRedis  # noqa: E402
from app.sim import CallOptions, run_call  # noqa: E402
from app.sim.report import CallReport  # noqa: E402
from app.sim.latency import SEGMENTS, LatencySnapshot, scrape_latency, window  # noqa: E402

TWILIO_TOKEN = "bench-twilio-auth-token"
WORKER_TOKEN = "bench-worker-token"
ADMIN_TOKEN = "bench-admin-token"
STARTUP_TIMEOUT_S = 600.0  # a compiling worker (--worker-compile) takes minutes
RECOVERY_S = 1.0  # the stall window ends this long after the worker continues
END_MARGIN_S = 1.5  # the last window ends this long before the callers' audio runs out
COUNTERS = {  # field -> (which process, sample: a counter's _total or a histogram's _sum / _count)
    "worker_overruns": ("worker", "worker_tick_overruns_total"),
    "worker_catch_ups": ("worker", "worker_tick_catch_ups_total"),
    "worker_frames_dropped": ("worker", "worker_frames_dropped_total"),
    "worker_busy_ticks": ("worker", "worker_tick_seconds_count"),
    "worker_tick_s": ("worker", "worker_tick_seconds_sum"),
    "gateway_playout_resyncs": ("gateway", "gateway_playout_resyncs_total"),
    "gateway_playout_trimmed_s": ("gateway", "gateway_playout_trimmed_seconds_total"),
    "gateway_backlog_dropped_frames": ("gateway", "gateway_backlog_dropped_frames_total"),
}


@dataclass
class Stack:
    worker: Proc
    gateway: Proc
    worker_url: str
    gateway_url: str
    commit: str | None


@contextlib.contextmanager
def running_stack(args: argparse.Namespace, tmp: Path) -> Iterator[Stack]:
    with contextlib.ExitStack() as stack:
        redis = EmbeddedRedis(tmp / "redis" / "bench.rdb")
        stack.callback(redis.close)
        w_port, g_port = free_port(), free_port()
        cpus = os.sched_getaffinity(0)
        env = child_env({
            "PERSONAS_DIR": str(REPO / "personas"),
            "WORKER_TOKEN": WORKER_TOKEN,
            "WORKER_MODEL": args.worker_model,
            "WORKER_DEVICE": args.worker_device,
            "WORKER_STATE_DIR": str(tmp / "worker-state"),
            "WORKER_MAX_SLOTS": str(max(args.calls, 1)),
            "WORKER_HOST": "127.0.0.1",
            "WORKER_PORT": str(w_port),
            "WORKER_ID": f"bench-worker-{w_port}",
            "TWILIO_AUTH_TOKEN": TWILIO_TOKEN,
            "ADMIN_TOKEN": ADMIN_TOKEN,
            "REDIS_URL": redis.url,
            "REDIS_EMBEDDED_PATH": str(tmp / "unused-redis" / "db.rdb"),
            "GATEWAY_HOST": "127.0.0.1",
            "GATEWAY_PORT": str(g_port),
            "PUBLIC_URL": f"http://127.0.0.1:{g_port}",
            "FRAME_ALIGN": "true" if args.frame_align else "false",
            "TWILIO_MEDIA_CHUNK_MS": str(args.twilio_media_chunk_ms),
            "WORKER_COMPILE": "true" if args.worker_compile else "false",
            "LOG_LEVEL": args.log_level,
        })
        worker = start_proc(
            "worker", [sys.executable, "-m", "app.cli", "worker"], env=env, cwd=REPO,
            log_path=tmp / "worker.log", cpus=cpus,
        )
        stack.callback(worker.stop)
        gateway = start_proc(
            "gateway", [sys.executable, "-m", "app.cli", "gateway"], env=env, cwd=REPO,
            log_path=tmp / "gateway.log", cpus=cpus,
        )
        stack.callback(gateway.stop)
        worker_url, gateway_url = f"http://127.0.0.1:{w_port}", f"http://127.0.0.1:{g_port}"
        wait_http(worker, f"{worker_url}/healthz", STARTUP_TIMEOUT_S)
        wait_http(gateway, f"{gateway_url}/healthz", STARTUP_TIMEOUT_S)
        wait_http(gateway, f"{gateway_url}/readyz", STARTUP_TIMEOUT_S)
        yield Stack(worker, gateway, worker_url, gateway_url, commit_of(REPO))


async def counters(http: httpx.AsyncClient, stack: Stack) -> dict[str, float]:
    texts = {
        "worker": (await http.get(f"{stack.worker_url}/metrics")).text,
        "gateway": (await http.get(f"{stack.gateway_url}/metrics")).text,
    }
    samples = {
        process: {(sample.name): sample.value for family in text_string_to_metric_families(text) for sample in family.samples}
        for process, text in texts.items()
    }
    return {field: samples[process].get(name, float("nan")) for field, (process, name) in COUNTERS.items()}


async def snapshot_at(http: httpx.AsyncClient, stack: Stack, when: float) -> tuple[LatencySnapshot, float]:
    """The gateway's histograms at `when` (monotonic), and when they were read."""
    await asyncio.sleep(max(0.0, when - time.monotonic()))
    return await scrape_latency(http, stack.gateway_url), time.monotonic()


def windows_of(args: argparse.Namespace) -> tuple[float, float | None, float]:
    """(steady from, stall at or None, end), seconds after the first call started."""
    steady_from = args.stagger_s + args.settle_s
    end = args.seconds - END_MARGIN_S
    if args.stall_ms <= 0:
        return steady_from, None, end
    return steady_from, args.stall_at_s, end


async def run_level(args: argparse.Namespace, stack: Stack, audio: Path, label: str) -> dict[str, Any]:
    options = CallOptions(
        audio=audio, gateway_url=stack.gateway_url, auth_token=TWILIO_TOKEN, admin_token=ADMIN_TOKEN,
        timeout_s=30.0,
    )
    steady_from, stall_at, end = windows_of(args)
    async with httpx.AsyncClient(timeout=10.0) as http:
        before = await counters(http, stack)
        began = time.monotonic()

        async def call(i: int) -> CallReport:
            await asyncio.sleep(i * args.stagger_s / max(args.calls - 1, 1))
            return await run_call(options)

        calls = [asyncio.create_task(call(i)) for i in range(args.calls)]
        edges = {"steady_from": await snapshot_at(http, stack, began + steady_from)}
        stalled_s = None
        if stall_at is not None:
            edges["stall"] = await snapshot_at(http, stack, began + stall_at)
            pid = stack.worker.process.pid
            stopped = time.monotonic()
            os.kill(pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(args.stall_ms / 1000.0)
            finally:
                os.kill(pid, signal.SIGCONT)
            resumed = time.monotonic()
            stalled_s = resumed - stopped
            edges["recovered_from"] = await snapshot_at(http, stack, resumed + RECOVERY_S)
        edges["end"] = await snapshot_at(http, stack, began + end)
        reports = await asyncio.gather(*calls)
        after = await counters(http, stack)

    spans: dict[str, tuple[str, str]] = {"steady": ("steady_from", "stall" if stall_at is not None else "end")}
    if stall_at is not None:
        spans |= {"stall": ("stall", "recovered_from"), "recovered": ("recovered_from", "end")}
    result: dict[str, Any] = {
        "run": label, "calls": args.calls, "seconds": args.seconds, "frame_align": args.frame_align,
        "twilio_media_chunk_ms": args.twilio_media_chunk_ms, "worker_compile": args.worker_compile,
        "completed": sum(r.status == "completed" for r in reports),
        "errors": sorted({r.error for r in reports if r.error})[:5],
        "stall_ms": None if stalled_s is None else round(stalled_s * 1000.0, 1),
        # seconds after the first call started
        "windows_s": {name: [round(edges[a][1] - began, 2), round(edges[b][1] - began, 2)] for name, (a, b) in spans.items()},
    }
    for name, (a, b) in spans.items():
        span = window(edges[b][0], edges[a][0])
        result[name] = {segment: span[segment].summary_ms() for segment in SEGMENTS}
    result |= {field: after[field] - before[field] for field in COUNTERS if field != "worker_tick_s"}
    ticks = result["worker_busy_ticks"]
    tick_s = after["worker_tick_s"] - before["worker_tick_s"]
    result["worker_tick_mean_ms"] = round(tick_s / ticks * 1000.0, 2) if ticks else None
    frames_in = sum(r.frames_in for r in reports)
    result |= {
        "caller_late_frames": sum(r.late_frames for r in reports),
        "caller_late_fraction": round(sum(r.late_frames for r in reports) / frames_in, 4) if frames_in else None,
        "first_bot_audio_ms_max": max((r.first_bot_audio_ms or 0.0 for r in reports), default=None),
        "load_1m": round(os.getloadavg()[0], 2),
        "commit": stack.commit,
    }
    return result


def summary_of(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The runs' steady total p50 / p99 and, with a stall, the recovered total p50 / p95 next to
    the steady ones (ms)."""

    def pick(window_name: str, q: str) -> list[float | None]:
        return [r[window_name]["total"][q] for r in results if window_name in r]

    return {
        "summary": True,
        "runs": len(results),
        "steady_total_p50_ms": pick("steady", "p50_ms"),
        "steady_total_p95_ms": pick("steady", "p95_ms"),
        "steady_total_p99_ms": pick("steady", "p99_ms"),
        "recovered_total_p50_ms": pick("recovered", "p50_ms"),
        "recovered_total_p95_ms": pick("recovered", "p95_ms"),
        "stall_total_max_bucket_ms": pick("stall", "max_bucket_ms"),
        "targets": "steady total p50 <= 50 ms, p99 <= 120 ms at 4 calls; recovered == steady within 1 s",
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=4, help="concurrent calls (default 4)")
    p.add_argument("--seconds", type=float, default=20.0, help="caller audio per call (default 20)")
    p.add_argument("--repeat", type=int, default=1, help="runs (default 1)")
    p.add_argument("--stagger-s", type=float, default=1.0, help="the calls start over this long (default 1)")
    p.add_argument("--settle-s", type=float, default=3.0,
                   help="the steady window opens this long after the last start (the gateway aligns its "
                   "framing in a call's first 2 s; default 3)")
    p.add_argument("--stall-ms", type=float, default=0.0, help="stop the worker this long mid-run (0: no stall)")
    p.add_argument("--stall-at-s", type=float, default=9.0, help="when, after the first call started (default 9)")
    p.add_argument("--no-frame-align", dest="frame_align", action="store_false",
                   help="the gateway's FRAME_ALIGN off (caller frames cut where they fall)")
    p.add_argument("--worker-model", default="tiny", help="WORKER_MODEL (default tiny: random weights)")
    p.add_argument("--worker-device", default="cpu", help="WORKER_DEVICE (default cpu)")
    p.add_argument("--worker-compile", action="store_true",
                   help="WORKER_COMPILE: the worker compiles its tick at start (minutes), so the tick's "
                   "own compute stops dominating what is measured")
    p.add_argument("--twilio-media-chunk-ms", type=int, choices=(10, 20, 40, 80), default=20,
                   help="TWILIO_MEDIA_CHUNK_MS: bot audio per outbound media message (default 20)")
    p.add_argument("--log-level", default="warning", help="the processes' LOG_LEVEL (default warning)")
    p.add_argument("--json-out", type=Path, help="all result objects as one JSON list")
    p.add_argument("--keep-dir", type=Path, help="keep the process logs here")
    return p


def check(args: argparse.Namespace) -> None:
    if args.calls < 1 or args.repeat < 1:
        raise SystemExit("--calls and --repeat must be >= 1")
    steady_from, stall_at, end = windows_of(args)
    if stall_at is None:
        if end - steady_from < 3.0:
            raise SystemExit("--seconds leaves a steady window under 3 s after --stagger-s + --settle-s")
        return
    if stall_at - steady_from < 3.0:
        raise SystemExit("--stall-at-s leaves a steady window under 3 s")
    if end - (stall_at + args.stall_ms / 1000.0 + RECOVERY_S) < 3.0:
        raise SystemExit("--seconds leaves a recovered window under 3 s after the stall")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    check(args)

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    tmp = Path(tempfile.mkdtemp(prefix="latency-bench-"))
    results: list[dict[str, Any]] = []
    try:
        audio = tmp / "caller.wav"
        caller_wav(audio, args.seconds)
        with running_stack(args, tmp) as stack:
            log(f"worker ({args.worker_model}, {args.worker_device}) and gateway up; logs in {tmp}")
            try:
                for rep in range(args.repeat):
                    result = asyncio.run(run_level(args, stack, audio, f"n{args.calls}-r{rep + 1}"))
                    results.append(result)
                    print(json.dumps(result), flush=True)
            except Exception:
                log(f"--- gateway ---\n{tail(stack.gateway.log)}\n--- worker ---\n{tail(stack.worker.log)}")
                raise
            summary = summary_of(results)
            print(json.dumps(summary), flush=True)
            write_json_out(args.json_out, [*results, summary])
    finally:
        keep_logs(tmp, args.keep_dir)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
