"""`callcenter`: run the worker, the gateway, both at once (`up`), a simulated call, persona checks.

    callcenter up                       embedded Redis (unless REDIS_URL) + one worker + the gateway
    callcenter worker [--host --port]   PersonaPlex inference server (WS /v1/session)
    callcenter gateway [--host --port]  Twilio webhooks and media streams, admin API
    callcenter call --audio caller.wav  a simulated Twilio call through the gateway
    callcenter personas check [--dir]   load and validate personas/*.yaml
    callcenter bench [--full] [--slots] time the engine tick per slot count (JSON lines on stdout)

Settings come from the environment / `.env` (app/config.py); options override a few of them.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import inspect
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from app.config import GatewaySettings, WorkerSettings
from app.personas import PersonaError, load_personas

logger = logging.getLogger("callcenter")

EXIT_FAILED = 1
EXIT_CONFIG = 2
# What the `worker` extra installs (pyproject.toml); the gateway runs without it.
WORKER_MODULES = ("torch", "safetensors", "sentencepiece", "huggingface_hub", "pyloudnorm")


def missing_worker_modules() -> list[str]:
    """The worker extra's modules this environment cannot import (found without importing them)."""
    missing = []
    for name in WORKER_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def _worker_extra_missing(verb: str) -> bool:
    missing = missing_worker_modules()
    if missing:
        logger.error(
            "`callcenter %s` runs the model and needs the 'worker' extra (missing: %s): "
            "pip install 'callcenter[worker]'. The gateway alone does not.", verb, ", ".join(missing),
        )
    return bool(missing)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `callcenter` command; returns (and exits with) the process status."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.log_level != "debug":
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per health poll otherwise
    try:
        code = args.handler(args)
    except PersonaError as exc:
        logger.error("persona error: %s", exc)
        code = EXIT_CONFIG
    except ValidationError as exc:
        logger.error("invalid settings: %s", exc)
        code = EXIT_CONFIG
    except KeyboardInterrupt:
        logger.info("interrupted")
        code = 130
    if argv is None:
        sys.exit(code)
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="callcenter", description=__doc__.split("\n")[0])
    parser.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "info"),
                        choices=["debug", "info", "warning", "error"])
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    up = verbs.add_parser("up", help="embedded Redis + one worker + the gateway, until Ctrl-C")
    up.add_argument("--ready-timeout", type=float, default=600.0,
                    help="seconds the worker and gateway may take to answer /healthz")
    up.set_defaults(handler=_cmd_up)

    for name, text, handler in (("worker", "run a worker", _cmd_worker),
                                ("gateway", "run the gateway", _cmd_gateway)):
        sub = verbs.add_parser(name, help=text)
        sub.add_argument("--host", help=f"listen address (default from {name.upper()}_HOST)")
        sub.add_argument("--port", type=int, help=f"listen port (default from {name.upper()}_PORT)")
        sub.set_defaults(handler=handler)

    call = verbs.add_parser("call", help="place a simulated Twilio call through the gateway")
    call.add_argument("--audio", type=Path, required=True, help="caller wav (any rate; resampled to 8 kHz)")
    call.add_argument("--gateway-url",
                      help="where the gateway listens (default http://127.0.0.1:GATEWAY_PORT)")
    call.add_argument("--public-url",
                      help="URL Twilio would use, for signatures (default PUBLIC_URL or --gateway-url)")
    call.add_argument("--to", default=None,
                      help="dialled number, picks the persona (default: a number no persona claims)")
    call.add_argument("--from", dest="from_number", default=None, help="caller number")
    call.add_argument("--out", type=Path, help="write the bot's audio here (8 kHz wav, real timeline)")
    call.add_argument("--report", type=Path, help="write the JSON report here (default: stdout)")
    call.add_argument("--dtmf", action="append", default=[], metavar="DIGITS[@SECONDS]",
                      help="press digits at a time after start, e.g. 12#@1.5 (repeatable)")
    call.add_argument("--hangup", choices=["stop", "close", "drop"], default="stop",
                      help="stop: send stop then close (as Twilio); close: close without stop; "
                      "drop: cut the TCP connection")
    call.add_argument("--tail-silence", type=float, default=0.5, help="seconds of silence after the audio")
    call.add_argument("--jitter-ms", type=float, default=80.0, help="caller playout buffer for late-frame counting")
    call.add_argument("--auth-token", help="Twilio auth token to sign with (default TWILIO_AUTH_TOKEN)")
    call.add_argument("--admin-token", help="to fetch the record and transcript (default ADMIN_TOKEN)")
    call.add_argument("--no-status-callback", action="store_true", help="do not POST /twilio/status at the end")
    call.set_defaults(handler=_cmd_call)

    bench = verbs.add_parser("bench", help="time the engine tick per slot count on random weights")
    bench.add_argument("--full", action="store_true",
                       help="full-size PersonaPlex config (random bf16 weights, for a GPU); default: tiny")
    bench.add_argument("--slots", type=_slot_counts, default=(1, 8, 16, 32, 64),
                       help="comma-separated slot counts (default 1,8,16,32,64)")
    bench.add_argument("--ticks", type=int, default=50, help="measured ticks per slot count")
    bench.add_argument("--warmup", type=int, default=10, help="ticks run before measuring")
    bench.add_argument("--churn-every", type=int, default=8,
                       help="one call leaves and a new one joins every N ticks (0: never)")
    bench.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda' or 'cuda:N'")
    bench.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                       help="LM weights and KV (auto: bfloat16 with --full, else as the worker)")
    bench.add_argument("--context", type=int, default=None, help="LM context in frames (default: the config's)")
    bench.add_argument("--rebuild-chunk", type=int, default=64,
                       help="frames a long call's context rebuild prefills between ticks (WORKER_REBUILD_CHUNK_FRAMES)")
    bench.add_argument("--rebuild-margin", type=int, default=50,
                       help="frames before the window's limit a rebuild starts (WORKER_REBUILD_MARGIN_FRAMES)")
    bench.add_argument("--rebuild-keep-s", type=float, default=120.0,
                       help="conversation a rebuild keeps (WORKER_REBUILD_KEEP_S); a small --context makes "
                       "calls rebuild during the run")
    bench.add_argument("--budget-ms", type=float, default=70.0, help="p99 tick budget for the summary")
    bench.add_argument("--cuda-graph", action="store_true",
                       help="replay the tick as a CUDA graph (GPU only), as WORKER_CUDA_GRAPH=1 does")
    bench.add_argument("--compile", action="store_true",
                       help="torch.compile the tick (inductor) per slot count, as WORKER_COMPILE=1 does")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--state-dir", type=Path, default=None,
                       help="keep the persona cache here (default: a temporary directory)")
    bench.add_argument("--json-out", type=Path, default=None, help="also write every object as a JSON list here")
    bench.set_defaults(handler=_cmd_bench)

    personas = verbs.add_parser("personas", help="persona files")
    persona_verbs = personas.add_subparsers(dest="personas_verb", required=True, metavar="VERB")
    check = persona_verbs.add_parser("check", help="load and validate every persona file")
    check.add_argument("--dir", type=Path, default=None, help="personas directory (default PERSONAS_DIR)")
    check.set_defaults(handler=_cmd_personas_check)
    return parser


def _slot_counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"slot counts are comma-separated integers, got {text!r}") from exc
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"slot counts must be >= 1, got {text!r}")
    return counts


def _out(text: str) -> None:
    """Command output (tables, reports) to stdout; diagnostics go through logging."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _overrides(args: argparse.Namespace, prefix: str) -> dict[str, Any]:
    values = {f"{prefix}_host": args.host, f"{prefix}_port": args.port}
    return {k: v for k, v in values.items() if v is not None}


def _run(result: Any) -> int:
    """Run what a server entry point returned (a coroutine is run to completion)."""
    if inspect.isawaitable(result):
        result = asyncio.run(result)
    return int(result) if isinstance(result, int) else 0


def _cmd_worker(args: argparse.Namespace) -> int:
    if _worker_extra_missing("worker"):
        return EXIT_CONFIG
    from app.worker.server import run_worker

    return _run(run_worker(WorkerSettings(**_overrides(args, "worker"))))


def _cmd_gateway(args: argparse.Namespace) -> int:
    from app.gateway.app import run_gateway

    return _run(run_gateway(GatewaySettings(**_overrides(args, "gateway"))))


def _cmd_up(args: argparse.Namespace) -> int:
    if _worker_extra_missing("up"):
        return EXIT_CONFIG
    from app.supervisor import run_up

    return run_up(GatewaySettings(), WorkerSettings(), ready_timeout_s=args.ready_timeout)


def _cmd_call(args: argparse.Namespace) -> int:
    from app.sim import CallOptions, DtmfPlan, run_call
    from app.sim.call import DEFAULT_FROM, DEFAULT_TO

    settings = GatewaySettings()
    try:
        dtmf = tuple(DtmfPlan.parse(text) for text in args.dtmf)
    except ValueError as exc:
        logger.error("%s", exc)
        return EXIT_CONFIG
    if not args.audio.is_file():
        logger.error("%s: no such audio file", args.audio)
        return EXIT_CONFIG
    gateway_url = args.gateway_url or f"http://127.0.0.1:{settings.gateway_port}"
    options = CallOptions(
        audio=args.audio,
        gateway_url=gateway_url,
        public_url=args.public_url or settings.public_url,
        auth_token=args.auth_token or settings.twilio_auth_token,
        admin_token=args.admin_token or settings.admin_token,
        account_sid=settings.twilio_account_sid,
        to_number=args.to or DEFAULT_TO,
        from_number=args.from_number or DEFAULT_FROM,
        dtmf=dtmf,
        hangup=args.hangup,
        tail_silence_s=args.tail_silence,
        jitter_ms=args.jitter_ms,
        status_callback=not args.no_status_callback,
        out_wav=args.out,
        report_path=args.report,
    )
    try:
        report = asyncio.run(run_call(options))
    except ValueError as exc:  # unreadable audio
        logger.error("%s", exc)
        return EXIT_CONFIG
    if args.report is None:
        _out(report.model_dump_json(indent=2))
    else:
        summary = {
            k: getattr(report, k)
            for k in ("call_id", "persona", "status", "first_bot_audio_ms", "frames_out", "frames_in",
                      "late_frames", "duplex_fraction")
        }
        _out(json.dumps(summary))
    if report.status != "completed":
        logger.error("call %s: %s", report.status, report.error or "")
        return EXIT_FAILED
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    if _worker_extra_missing("bench"):
        return EXIT_CONFIG
    from app.worker.bench import BenchOptions, run_bench

    try:
        options = BenchOptions(
            full=args.full, slots=args.slots, ticks=args.ticks, warmup=args.warmup,
            churn_every=args.churn_every, device=args.device, dtype=args.dtype, context=args.context,
            budget_ms=args.budget_ms, seed=args.seed, state_dir=args.state_dir, cuda_graph=args.cuda_graph,
            compile=args.compile, rebuild_chunk=args.rebuild_chunk, rebuild_margin=args.rebuild_margin,
            rebuild_keep_s=args.rebuild_keep_s,
        )
    except ValueError as exc:
        logger.error("%s", exc)
        return EXIT_CONFIG
    records = run_bench(options, lambda record: _out(json.dumps(record)))
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(records, indent=2) + "\n")
        logger.info("wrote %s", args.json_out)
    return 0


def _cmd_personas_check(args: argparse.Namespace) -> int:
    directory = args.dir if args.dir is not None else GatewaySettings().personas_dir
    try:
        book = load_personas(directory)
    except PersonaError as exc:
        logger.error("personas check failed: %s", exc)
        return EXIT_FAILED
    rows = [("id", "name", "voice", "numbers", "max s", "transfer", "default", "file")]
    for persona_id, persona in book.personas.items():
        rows.append((
            persona_id,
            persona.name,
            persona.voice,
            ",".join(persona.numbers) or "-",
            str(persona.max_call_seconds),
            persona.transfer_number or "-",
            "yes" if persona_id == book.default_id else "",
            str(book.sources[persona_id]),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        _out("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    _out(f"{len(book.personas)} personas OK in {directory}")
    return 0


if __name__ == "__main__":
    main()
