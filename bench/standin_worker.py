"""A stand-in worker for `bench/gateway_load.py`: bench only, never used by the product.

    python bench/standin_worker.py --port 8091 --redis-url unix:///.../redis.sock \
        --token TOKEN [--worker-id standin-1] [--max-slots 1024] [--text-every 0]

It speaks `WS /v1/session` exactly as app/protocol.py defines it, and answers at once, so that a
load test through the real gateway measures the gateway alone:

    Authorization: Bearer <token> checked on the upgrade (403 otherwise, 404 for another path)
    Start  -> Ready(worker_id, slot, prefill_ms=0, seed, next_frame)
    each caller frame (PCM16 80 ms) -> one bot frame (`protocol.pack_bot_frame`): a quiet 400 Hz
              tone (about -40 dBFS) plus the 17 tokens of the call frame that step completed
              (all equal to the frame index mod 30000; none for the first frame)
    End    -> Ended(reason, frames_in, frames_out), then the session closes
    Move   never; Text only with --text-every N (one Text after every N-th caller frame)

It registers itself in Redis as a worker with `--max-slots` slots (app.callstate.CallStore:
register_worker, then heartbeat every --heartbeat-s with the sessions in use, unregister at
exit), so the real gateway reserves and routes calls to it as to a real worker. It prints one
line `standin-worker ready <url>` on stdout once it is registered and listening. SIGINT or
SIGTERM stops it (sessions cut, registration removed).
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import signal
import sys
from http import HTTPStatus
from pathlib import Path

import numpy as np
import redis.asyncio as aioredis
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from app import protocol
from app.callstate import CallStore

logger = logging.getLogger("standin_worker")

TONE_HZ = 400.0  # 60 samples a period at 24 kHz: one 1920-sample frame holds exactly 32 of them
TONE_AMPLITUDE = 330  # about -40 dBFS: quiet speech level
DEFAULT_SEED = 1


def tone_frame() -> bytes:
    """One 80 ms PCM16 frame of the tone; repeating it is seamless (a whole number of periods)."""
    t = np.arange(protocol.FRAME_SAMPLES) / protocol.SAMPLE_RATE
    pcm = np.round(TONE_AMPLITUDE * np.sin(2 * np.pi * TONE_HZ * t)).astype("<i2")
    return pcm.tobytes()


class StandinWorker:
    """The sessions of the stand-in worker; slots are only numbers handed out and taken back."""

    def __init__(self, *, worker_id: str, token: str, max_slots: int, text_every: int) -> None:
        self.worker_id = worker_id
        self.token = token
        self.max_slots = max_slots
        self.text_every = text_every
        self.free_slots = list(range(max_slots - 1, -1, -1))
        self.sessions = 0
        self.frames_in = 0
        self.frames_out = 0
        self.pcm = tone_frame()

    def check_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path != protocol.SESSION_PATH:
            return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
        header = request.headers.get("Authorization") or ""
        if not header.startswith("Bearer ") or not hmac.compare_digest(
            header.removeprefix("Bearer ").strip().encode(), self.token.encode()
        ):
            return connection.respond(HTTPStatus.FORBIDDEN, "bad worker token\n")
        return None

    async def session(self, ws: ServerConnection) -> None:
        try:
            first = await ws.recv()
            try:
                start = protocol.decode_client(first)
            except protocol.ProtocolError as exc:
                await ws.send(protocol.encode(protocol.Error(code="bad_request", message=str(exc))))
                return
            if not isinstance(start, protocol.Start):
                await ws.send(protocol.encode(protocol.Error(code="bad_request", message="start first")))
                return
            if not self.free_slots:
                await ws.send(protocol.encode(protocol.Error(code="busy", message="no free slot")))
                return
            slot = self.free_slots.pop()
            self.sessions += 1
            try:
                await self._serve(ws, start, slot)
            finally:
                self.sessions -= 1
                self.free_slots.append(slot)
        except ConnectionClosed:
            logger.debug("session closed by the gateway")

    async def _serve(self, ws: ServerConnection, start: protocol.Start, slot: int) -> None:
        next_frame = 0
        if start.resume is not None:
            start.resume.tokens()  # a malformed resume raises ProtocolError here: a gateway bug
            next_frame = start.resume.next_frame
        seed = start.sampling.seed if start.sampling.seed is not None else DEFAULT_SEED
        ready = protocol.Ready(
            call_id=start.call_id, worker_id=self.worker_id, slot=slot, prefill_ms=0.0, seed=seed,
            next_frame=next_frame,
        )
        await ws.send(protocol.encode(ready))
        count = 0
        sent = 0
        async for message in ws:
            if isinstance(message, str):
                end = protocol.decode_client(message)
                if isinstance(end, protocol.End):
                    ended = protocol.Ended(reason=end.reason, frames_in=count, frames_out=sent)
                    await ws.send(protocol.encode(ended))
                    return
                await ws.send(protocol.encode(protocol.Error(code="bad_request", message="start twice")))
                return
            protocol.check_frame(message)
            index = next_frame + count  # the call frame this step answers
            count += 1
            self.frames_in += 1
            tokens = np.full(protocol.TOKENS_PER_FRAME, (index - 1) % 30_000) if index else None
            await ws.send(protocol.pack_bot_frame(self.pcm, tokens))
            sent += 1
            self.frames_out += 1
            if self.text_every and count % self.text_every == 0:
                await ws.send(protocol.encode(protocol.Text(text=" word", frame=count - 1)))


async def run(args: argparse.Namespace) -> None:
    worker = StandinWorker(
        worker_id=args.worker_id, token=args.token, max_slots=args.max_slots, text_every=args.text_every
    )
    url = f"ws://{args.host}:{args.port}"
    redis = aioredis.from_url(args.redis_url, decode_responses=True)
    store = CallStore(redis)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    try:
        async with serve(
            worker.session, args.host, args.port, process_request=worker.check_request, compression=None,
            max_size=2**20,
        ) as server:
            await store.register_worker(args.worker_id, url, args.max_slots, heartbeat_s=args.heartbeat_s)
            print(f"standin-worker ready {url}", flush=True)
            try:
                while not stopping.is_set():
                    try:
                        await asyncio.wait_for(stopping.wait(), args.heartbeat_s)
                    except TimeoutError:
                        await store.heartbeat(
                            args.worker_id, worker.sessions, url=url, max_slots=args.max_slots,
                            heartbeat_s=args.heartbeat_s,
                        )
            finally:
                await store.unregister_worker(args.worker_id)
                server.close()
        logger.info(
            "stand-in worker %s stopped: %d frames in, %d frames out", args.worker_id, worker.frames_in,
            worker.frames_out,
        )
    finally:
        await redis.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--token", required=True, help="the WORKER_TOKEN the gateway sends")
    parser.add_argument("--worker-id", default="standin-worker")
    parser.add_argument("--max-slots", type=int, default=1024)
    parser.add_argument("--heartbeat-s", type=float, default=2.0)
    parser.add_argument("--text-every", type=int, default=0, help="a Text after every N-th caller frame (0: none)")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    if args.max_slots < 1:
        parser.error("--max-slots must be >= 1")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
