"""Start-up and shutdown of the real processes: broken personas, `callcenter up`, Ctrl-C, a dying child."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import ROOT, base_env, free_port, tail


@pytest.fixture
def broken_personas(tmp_path: Path) -> Path:
    directory = tmp_path / "personas"
    shutil.copytree(ROOT / "personas", directory)
    path = directory / "restaurant-orders.yaml"
    path.write_text(path.read_text().replace("voice: VARF1", "voice: ../../etc/passwd.wav"))
    return directory


@pytest.mark.parametrize("verb", ["gateway", "worker", "up"])
def test_a_broken_persona_file_stops_start_up_naming_file_and_field(
    verb: str, broken_personas: Path, tmp_path: Path
) -> None:
    env = base_env(tmp_path, None) | {
        "PERSONAS_DIR": str(broken_personas),
        "GATEWAY_PORT": str(free_port()),
        "WORKER_PORT": str(free_port()),
    }
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", verb], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "restaurant-orders.yaml" in output and "voice" in output, output


def _pids(log: Path) -> dict[str, int]:
    """The latest pid each child was started with."""
    return {m[0]: int(m[1]) for m in re.findall(r"started (\w+) \(pid (\d+)\)", log.read_text(errors="replace"))}


def _start_up(tmp_path: Path, db_dir: Path | None = None) -> tuple[subprocess.Popen[bytes], Path, str]:
    """`callcenter up` in `tmp_path` (its embedded Redis under `db_dir`, default `tmp_path`)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    g_port = free_port()
    env = base_env(tmp_path, None) | {"GATEWAY_PORT": str(g_port), "WORKER_PORT": str(free_port())}
    env["REDIS_EMBEDDED_PATH"] = str((db_dir or tmp_path) / "redis" / "db.rdb")
    log = tmp_path / "up.log"
    with log.open("wb") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "up"], env=env, cwd=tmp_path, stdout=handle, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + 120
    while "callcenter is up" not in log.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"`callcenter up` did not come up:\n{tail(log)}")
        time.sleep(0.2)
    return process, log, f"http://127.0.0.1:{g_port}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def test_up_runs_redis_worker_and_gateway_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    process, log, gateway = _start_up(tmp_path)
    try:
        text = log.read_text()
        assert f"{gateway}/twilio/voice" in text and "/metrics" in text  # the URLs are printed
        assert httpx.get(f"{gateway}/readyz", timeout=5).status_code == 200  # the worker registered
        pids = _pids(log)
        assert set(pids) == {"worker", "gateway"}
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0, tail(log)
        assert not any(_alive(pid) for pid in pids.values())
        assert (tmp_path / "redis" / "db.rdb").exists()  # embedded Redis saved its file
    finally:
        if process.poll() is None:
            process.kill()


def test_up_restarts_a_dead_worker_and_keeps_serving(tmp_path: Path) -> None:
    process, log, gateway = _start_up(tmp_path)
    try:
        first = _pids(log)["worker"]
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while (_pids(log).get("worker") == first or not _ready(gateway)) and time.monotonic() < deadline:
            assert process.poll() is None, tail(log)  # `up` itself keeps running
            time.sleep(0.2)
        text = log.read_text(errors="replace")
        assert "worker exited" in text and "starting it again" in text, tail(log)
        assert _pids(log)["worker"] != first and _alive(_pids(log)["worker"]), tail(log)
        assert _ready(gateway), tail(log)  # the new worker registered: calls can be taken again
        assert process.poll() is None
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=60)


def test_up_exits_non_zero_when_the_gateway_dies(tmp_path: Path) -> None:
    process, log, _ = _start_up(tmp_path)
    try:
        pids = _pids(log)
        os.kill(pids["gateway"], signal.SIGKILL)
        assert process.wait(timeout=60) != 0, tail(log)
        assert "gateway exited" in log.read_text()
        assert not _alive(pids["worker"])
    finally:
        if process.poll() is None:
            process.kill()


def _ready(gateway: str) -> bool:
    try:
        return httpx.get(f"{gateway}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
