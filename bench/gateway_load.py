"""How many concurrent calls one gateway core carries: N simulated Twilio calls through ONE real
gateway process, pinned to one CPU core, against a stand-in worker that answers at once.

    python bench/gateway_load.py [--calls 10,25,50,100,150,200] [--seconds 20] [--repeat 1]
        [--gateway-core C] [--repo DIR] [--callers-per-process 25] [--json-out FILE]

What runs (all started here, all stopped here, also on Ctrl-C or an error):
    embedded Redis            app.callstate.EmbeddedRedis on a temporary path
    stand-in worker           bench/standin_worker.py, its own process (bench only: one bot frame
                              per caller frame at once, registered in Redis with many slots)
    gateway                   `python -m app.cli gateway` with cwd=--repo (that tree's `app`),
                              pinned to --gateway-core (the CPU affinity is set before exec)
    callers                   bench/load_callers.py processes, --callers-per-process calls each,
                              app.sim.run_call: signed webhook, media stream of 20 ms JSON
                              messages in real time, stop, status callback
Redis, the stand-in worker and the callers run on the other CPU(s), so only the gateway's own
work is on its core (other programs on the machine may still run there: see load_1m).

For each N (each --repeat times): N calls of --seconds of caller audio (a quiet speech-like
signal made with numpy), started over --stagger-s. The measuring window runs from
`stagger + --setup-s` after the first start until --seconds after it, while every call streams.
One JSON line per run on stdout, then a summary line; logs on stderr, process logs in --keep-dir
(default a temporary directory, removed at the end). Fields: bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from app.callstate import EmbeddedRedis
from app.sim.audio import PHONE_RATE, float_to_pcm16, write_wav

BENCH = Path(__file__).resolve().parent
TWILIO_TOKEN = "bench-twilio-auth-token"
WORKER_TOKEN = "bench-worker-token"
ADMIN_TOKEN = "bench-admin-token"
CLK_TCK = os.sysconf("SC_CLK_TCK")
LATE_LIMIT = 0.01  # the target: fewer than 1 % late frames
STARTUP_TIMEOUT_S = 60.0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_json_out(path: Path | None, objects: list[dict[str, Any]]) -> None:
    """--json-out: all result objects as one JSON list (nothing without a path)."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(objects, indent=1), encoding="utf-8")


def keep_logs(tmp: Path, keep_dir: Path | None) -> None:
    """--keep-dir: copy the run's directory (process logs) there, without Redis' data files."""
    if keep_dir is not None:
        keep_dir.mkdir(parents=True, exist_ok=True)
        shutil.copytree(tmp, keep_dir / tmp.name, ignore=shutil.ignore_patterns("*.rdb", "*.aof", "*.sock"))
        log(f"logs kept in {keep_dir / tmp.name}")


def tail(path: Path, lines: int = 30) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# ------------------------------------------------------------------------------------ /proc
def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # fields[0] is field 3 (state)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def runqueue_wait_seconds(pid: int) -> float:
    """Time the process's threads were runnable but waiting for a CPU, seconds (the second field of
    /proc/<pid>/task/<tid>/schedstat, summed over the threads alive now). Pinned to one core, that is
    time other programs (or its own other threads) held the core while it had work to do."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        schedstat = task / "schedstat"
        if schedstat.exists():  # a thread that ended meanwhile has no file any more
            total += int(schedstat.read_text().split()[1])
    return total / 1e9


def memory_mib(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak RSS) of a process, MiB."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024.0
    return out


def thread_cpus(pid: int) -> list[str]:
    """The distinct Cpus_allowed_list of the process's threads (one entry when all agree)."""
    seen: set[str] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        status = (task / "status").read_text()
        for line in status.splitlines():
            if line.startswith("Cpus_allowed_list:"):
                seen.add(line.split(":", 1)[1].strip())
    return sorted(seen)


def commit_of(repo: Path) -> str | None:
    """HEAD's commit of a checkout or worktree, read from its files (no git command is run).
    None when it cannot be told. The working tree may differ from it (uncommitted edits)."""
    dot_git = repo / ".git"
    if dot_git.is_file():
        text = dot_git.read_text().strip()
        if not text.startswith("gitdir:"):
            return None
        git_dir = (repo / text.removeprefix("gitdir:").strip()).resolve()
    elif dot_git.is_dir():
        git_dir = dot_git
    else:
        return None
    head_file = git_dir / "HEAD"
    if not head_file.exists():
        return None
    head = head_file.read_text().strip()
    if not head.startswith("ref:"):
        return head[:12]
    ref = head.removeprefix("ref:").strip()
    common = git_dir
    if (git_dir / "commondir").exists():
        common = (git_dir / (git_dir / "commondir").read_text().strip()).resolve()
    for base in (git_dir, common):
        if (base / ref).exists():
            return (base / ref).read_text().strip()[:12]
    packed = common / "packed-refs"
    if packed.exists():
        for line in packed.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1] == ref:
                return parts[0][:12]
    return None


# ------------------------------------------------------------------------------------ processes
@dataclass
class Proc:
    name: str
    process: subprocess.Popen[Any]
    log: Path

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{tail(self.log)}")

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGINT, then SIGKILL after timeout_s."""
        if self.process.poll() is None:
            log(f"stopping {self.name} (pid {self.process.pid})")
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log(f"{self.name} did not stop within {timeout_s:.0f} s after SIGINT: killing it")
                self.process.kill()
                self.process.wait(timeout=10)


def _pin(cpus: set[int]) -> Any:
    def pin() -> None:
        os.sched_setaffinity(0, cpus)

    return pin


def start_proc(
    name: str, args: list[str], *, env: dict[str, str], cwd: Path, log_path: Path, cpus: set[int],
    stdin: int | None = None, stdout: int | None = None,
) -> Proc:
    """A child in its own session (a Ctrl-C reaches only this script, which stops it in order),
    pinned to `cpus` before exec (so every thread it ever starts is pinned)."""
    handle = log_path.open("wb")
    try:
        process = subprocess.Popen(
            args, env=env, cwd=cwd, stdin=stdin, stdout=stdout if stdout is not None else handle, stderr=handle,
            start_new_session=True, text=stdout is not None or stdin is not None,
            preexec_fn=_pin(cpus),  # noqa: PLW1509 (this script starts no thread)
        )
    finally:
        handle.close()
    return Proc(name, process, log_path)


def read_line(proc: Proc, timeout_s: float) -> str:
    """The next line the child prints on stdout, within timeout_s."""
    stream: TextIO = proc.process.stdout  # type: ignore[assignment]
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"{proc.name}: no line on stdout within {timeout_s:.0f} s:\n{tail(proc.log)}")
        ready, _, _ = select.select([stream], [], [], min(left, 0.5))
        if ready:
            line = stream.readline()
            if not line:
                proc.process.wait(timeout=5)
                raise RuntimeError(f"{proc.name} exited ({proc.process.returncode}) before a line:\n{tail(proc.log)}")
            return line.strip()
        proc.check_alive()


def wait_http(proc: Proc, url: str, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        proc.check_alive()
        try:
            response = httpx.get(url, timeout=1.0)
            if response.status_code == 200:
                return
            last = f"HTTP {response.status_code}: {response.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.2)
    raise RuntimeError(f"{proc.name}: {url} not ready after {timeout_s:.0f} s ({last}):\n{tail(proc.log)}")


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """Our environment without inherited callcenter settings (as tests/e2e/conftest.py base_env)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "WORKER_", "GATEWAY_", "PUBLIC_"))}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return env | extra


# ------------------------------------------------------------------------------------ audio
def caller_wav(path: Path, seconds: float, seed: int = 0) -> None:
    """Quiet speech-like caller audio, 8 kHz: 0.5 s silence, then ~1.4 s 'utterances' (voiced
    harmonics of a wandering pitch, syllable-rate envelope, a little noise) and ~0.8 s pauses,
    around -30 dBFS RMS while speaking. The gateway's cost does not depend on the content."""
    rng = np.random.default_rng(seed)
    n = int(seconds * PHONE_RATE)
    t = np.arange(n) / PHONE_RATE
    f0 = 140.0 + 30.0 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / PHONE_RATE
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    syllables = 0.5 * (1 - np.cos(2 * np.pi * 4.0 * t))
    talking = ((t - 0.5) % 2.2 < 1.4) & (t >= 0.5)
    signal_ = (voiced + 0.3 * rng.standard_normal(n)) * syllables * talking
    rms = np.sqrt(np.mean(signal_[talking] ** 2)) if talking.any() else 1.0
    write_wav(path, float_to_pcm16(signal_ / rms * 10 ** (-30 / 20)))


# ------------------------------------------------------------------------------------ bench
def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


@dataclass
class Stack:
    gateway: Proc
    worker: Proc
    gateway_url: str
    redis_url: str
    gateway_cpus: set[int]
    client_cpus: set[int]
    tmp: Path
    commit: str | None  # HEAD of --repo when the gateway started (its code is what it imported then)


@contextlib.contextmanager
def running_stack(args: argparse.Namespace, tmp: Path, gateway_cpus: set[int], client_cpus: set[int]) -> Iterator[Stack]:
    with contextlib.ExitStack() as stack:
        redis = EmbeddedRedis(tmp / "redis" / "bench.rdb")
        stack.callback(redis.close)
        w_port, g_port = free_port(), free_port()
        worker = start_proc(
            "stand-in worker",
            [sys.executable, str(BENCH / "standin_worker.py"), "--port", str(w_port), "--redis-url", redis.url,
             "--token", WORKER_TOKEN, "--max-slots", str(args.worker_slots), "--text-every", str(args.text_every)],
            env=child_env({}), cwd=REPO, log_path=tmp / "standin-worker.log", cpus=client_cpus,
            stdout=subprocess.PIPE,
        )
        stack.callback(worker.stop)
        line = read_line(worker, STARTUP_TIMEOUT_S)
        if not line.startswith("standin-worker ready"):
            raise RuntimeError(f"stand-in worker said {line!r}, expected `standin-worker ready <url>`")
        g_env = child_env({
            "PERSONAS_DIR": str(args.repo / "personas"),
            "WORKER_TOKEN": WORKER_TOKEN,
            "TWILIO_AUTH_TOKEN": TWILIO_TOKEN,
            "ADMIN_TOKEN": ADMIN_TOKEN,
            "REDIS_URL": redis.url,
            "REDIS_EMBEDDED_PATH": str(tmp / "unused-redis" / "db.rdb"),
            "GATEWAY_HOST": "127.0.0.1",
            "GATEWAY_PORT": str(g_port),
            "PUBLIC_URL": f"http://127.0.0.1:{g_port}",
            "LOG_LEVEL": args.gateway_log_level,
        })
        where = subprocess.run(
            [sys.executable, "-c", "import app.cli, app; print(app.__file__)"], env=g_env, cwd=args.repo,
            capture_output=True, text=True, timeout=120, check=False,
        )
        if where.returncode != 0:
            raise RuntimeError(f"cannot import app.cli from {args.repo}:\n{where.stderr[-2000:]}")
        imported = Path(where.stdout.strip()).resolve()
        if not imported.is_relative_to(args.repo.resolve()):
            raise RuntimeError(f"with cwd={args.repo} python imports app from {imported}, not from that tree")
        commit = commit_of(args.repo)
        profile = [] if args.gateway_profile is None else ["-m", "cProfile", "-o", str(args.gateway_profile.resolve())]
        gateway = start_proc(
            "gateway", [sys.executable, *profile, "-m", "app.cli", "gateway"], env=g_env, cwd=args.repo,
            log_path=tmp / "gateway.log", cpus=gateway_cpus,
        )
        stack.callback(gateway.stop)
        url = f"http://127.0.0.1:{g_port}"
        wait_http(gateway, f"{url}/healthz")
        wait_http(gateway, f"{url}/readyz")
        yield Stack(gateway, worker, url, redis.url, gateway_cpus, client_cpus, tmp, commit)


def run_level(args: argparse.Namespace, stack: Stack, calls: int, seconds: float, audio: Path, label: str) -> dict[str, Any]:
    """N calls at once; returns the JSON object of this run."""
    per_proc = max(1, args.callers_per_process)
    procs_n = math.ceil(calls / per_proc)
    offsets = [i * args.stagger_s / calls for i in range(calls)]
    run_dir = stack.tmp / label
    run_dir.mkdir(parents=True)
    clients: list[Proc] = []
    outs: list[Path] = []
    load_before = os.getloadavg()
    try:
        for p in range(procs_n):
            out = run_dir / f"callers-{p}.json"
            client = start_proc(
                f"callers {p}", [sys.executable, str(BENCH / "load_callers.py")], env=child_env({}), cwd=REPO,
                log_path=run_dir / f"callers-{p}.log", cpus=stack.client_cpus,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            )
            clients.append(client)
            outs.append(out)
            spec = {
                "gateway_url": stack.gateway_url, "public_url": stack.gateway_url, "auth_token": TWILIO_TOKEN,
                "audio": str(audio), "out": str(out), "calls": offsets[p::procs_n], "timeout_s": args.call_timeout_s,
                "uvloop": args.client_uvloop, "mode": args.client, "compression": args.client_compression,
            }
            client.process.stdin.write(json.dumps(spec) + "\n")  # type: ignore[union-attr]
            client.process.stdin.flush()  # type: ignore[union-attr]
        for client in clients:
            line = read_line(client, STARTUP_TIMEOUT_S)
            if line != "ready":
                raise RuntimeError(f"{client.name} said {line!r}, expected `ready`")
        t0 = time.time() + 0.5
        for client in clients:
            client.process.stdin.write(f"go {t0!r}\n")  # type: ignore[union-attr]
            client.process.stdin.close()  # type: ignore[union-attr]
        window = (t0 + args.stagger_s + args.setup_s, t0 + seconds)
        pids = {"gateway": [stack.gateway.process.pid], "worker": [stack.worker.process.pid],
                "clients": [c.process.pid for c in clients]}

        def sample() -> dict[str, float]:
            out = {k: sum(cpu_seconds(pid) for pid in v) for k, v in pids.items()}
            out["gateway_wait"] = runqueue_wait_seconds(stack.gateway.process.pid)
            out["clients_wait"] = sum(runqueue_wait_seconds(pid) for pid in pids["clients"])
            out["loop_lag"] = gateway_loop_lag_s(stack.gateway_url)
            return out

        gateway_cpu_start = cpu_seconds(stack.gateway.process.pid)
        _sleep_until(window[0], stack, clients)
        first = sample()
        samples = [(time.time(), first)]
        while time.time() < window[1]:
            _sleep_until(min(window[1], time.time() + args.sample_s), stack, clients)
            samples.append((time.time(), sample()))
        last = samples[-1][1]
        window_s = samples[-1][0] - samples[0][0]
        memory = memory_mib(stack.gateway.process.pid)
        cpus_seen = thread_cpus(stack.gateway.process.pid)
        load_window = os.getloadavg()
        deadline = time.monotonic() + seconds + args.stagger_s + 4 * args.call_timeout_s + 30
        for client in clients:
            left = deadline - time.monotonic()
            try:
                client.process.wait(timeout=max(left, 1.0))
            except subprocess.TimeoutExpired as exc:
                raise RuntimeError(f"{client.name} still running long after its calls should have ended:\n"
                                   f"{tail(client.log)}") from exc
            if client.process.returncode != 0:
                raise RuntimeError(f"{client.name} exited with {client.process.returncode}:\n{tail(client.log)}")
        gateway_cpu_total = cpu_seconds(stack.gateway.process.pid) - gateway_cpu_start
    finally:
        for client in clients:
            client.stop(timeout_s=5.0)
    reports: list[dict[str, Any]] = []
    for out in outs:
        reports.extend(json.loads(out.read_text()))
    return summarise(
        args, stack, calls, seconds, label, reports, window, samples, first, last, window_s, memory, cpus_seen,
        load_before, load_window, procs_n, gateway_cpu_total,
    )


def _sleep_until(when: float, stack: Stack, clients: list[Proc]) -> None:
    while (left := when - time.time()) > 0:
        time.sleep(min(left, 0.25))
        stack.gateway.check_alive()
        stack.worker.check_alive()
        for client in clients:
            if client.process.poll() is not None and client.process.returncode != 0:
                raise RuntimeError(f"{client.name} exited with {client.process.returncode}:\n{tail(client.log)}")


def summarise(
    args: argparse.Namespace, stack: Stack, calls: int, seconds: float, label: str, reports: list[dict[str, Any]],
    window: tuple[float, float], samples: list[tuple[float, dict[str, float]]], first: dict[str, float],
    last: dict[str, float], window_s: float, memory: dict[str, float], cpus_seen: list[str],
    load_before: tuple[float, float, float], load_window: tuple[float, float, float], procs_n: int,
    gateway_cpu_total: float,
) -> dict[str, Any]:
    if len(reports) != calls:
        raise RuntimeError(f"{len(reports)} call reports for {calls} calls")
    completed = [r for r in reports if r["status"] == "completed"]
    errors = sorted({str(r.get("error")) for r in reports if r["status"] != "completed"})
    frames_in = sum(r.get("frames_in", 0) for r in reports)
    frames_out = sum(r.get("frames_out", 0) for r in reports)
    late = sum(r.get("late_frames", 0) for r in reports)
    send_late = sum(r.get("send_late_frames", 0) for r in reports)
    gaps = [r["largest_gap_ms"] for r in reports if "largest_gap_ms" in r]
    first_audio = [r["first_bot_audio_ms"] for r in reports if r.get("first_bot_audio_ms") is not None]
    start_late = [r["start_late_s"] for r in reports if "start_late_s" in r]
    w0, w1 = samples[0][0], samples[-1][0]
    call_seconds = 0.0
    in_window = 0
    for r in reports:
        s, e = r.get("stream_start"), r.get("stream_end")
        if s is None or e is None:
            continue
        call_seconds += max(0.0, min(e, w1) - max(s, w0))
        in_window += s <= w0 and e >= w1
    gateway_cpu = last["gateway"] - first["gateway"]
    shares = [
        (b[1]["gateway"] - a[1]["gateway"]) / (b[0] - a[0]) for a, b in itertools.pairwise(samples) if b[0] > a[0]
    ]
    lags = [1000 * s["loop_lag"] for _, s in samples if s.get("loop_lag") is not None]
    return {
        "run": label,
        "calls": calls,
        "seconds": seconds,
        "completed": len(completed),
        "failed": calls - len(completed),
        "errors": errors[:5],
        "frames_out": frames_out,
        "frames_in": round(frames_in, 1),
        "late_frames": late,
        "late_fraction": rounded(late / frames_in if frames_in else None, 5),
        "bot_audio_delivered": rounded(frames_in / frames_out if frames_out else None, 4),
        "largest_gap_ms_p99": rounded(percentile(gaps, 99), 1),
        "largest_gap_ms_max": rounded(max(gaps) if gaps else None, 1),
        "calls_with_a_gap": sum(g > 0 for g in gaps),
        "first_bot_audio_ms_p50": rounded(percentile(first_audio, 50), 1),
        "first_bot_audio_ms_max": rounded(max(first_audio) if first_audio else None, 1),
        "window_s": round(window_s, 2),
        "calls_in_window": in_window,
        "call_seconds_in_window": round(call_seconds, 1),
        "gateway_cpu_s": round(gateway_cpu, 3),
        "gateway_cpu_ms_per_call_s": rounded(1000 * gateway_cpu / call_seconds if call_seconds else None, 2),
        "gateway_cpu_share": rounded(gateway_cpu / window_s if window_s else None),
        "gateway_cpu_share_max": rounded(max(shares) if shares else None),
        "gateway_runqueue_wait_share": rounded(
            (last["gateway_wait"] - first["gateway_wait"]) / window_s if window_s else None
        ),
        "gateway_loop_lag_ms_p50": rounded(percentile(lags, 50), 1),
        "gateway_loop_lag_ms_max": rounded(max(lags) if lags else None, 1),
        "gateway_cpu_s_whole_run": round(gateway_cpu_total, 2),
        "gateway_rss_mib": rounded(memory.get("VmRSS"), 1),
        "gateway_peak_rss_mib": rounded(memory.get("VmHWM"), 1),
        "gateway_cpus": sorted(stack.gateway_cpus),
        "gateway_threads_cpus_allowed": cpus_seen,
        "worker_cpu_share": rounded((last["worker"] - first["worker"]) / window_s if window_s else None),
        "client": args.client,
        "client_compression": args.client_compression if args.client == "lean" else "deflate",
        "client_processes": procs_n,
        "client_cpus": sorted(stack.client_cpus),
        "client_cpu_share": rounded((last["clients"] - first["clients"]) / window_s if window_s else None),
        "client_runqueue_wait_share": rounded(
            (last["clients_wait"] - first["clients_wait"]) / window_s if window_s else None
        ),
        "client_send_late_frames": send_late,
        "client_send_late_fraction": rounded(send_late / frames_out if frames_out else None, 5),
        "client_start_late_s_max": rounded(max(start_late) if start_late else None),
        "load_1m_before": round(load_before[0], 2),
        "load_1m_window": round(load_window[0], 2),
    }


def gateway_loop_lag_s(gateway_url: str) -> float | None:
    """The gateway's `gateway_event_loop_lag_seconds` (its worst timer lateness of the last 5 s),
    read from /metrics; None when it cannot be read (an older tree without it, or no answer in 2 s)."""
    try:
        with urllib.request.urlopen(f"{gateway_url}/metrics", timeout=2.0) as response:
            text = response.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("gateway_event_loop_lag_seconds "):
            return float(line.split()[1])
    return None


def parse_calls(text: str) -> list[int]:
    try:
        calls = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--calls {text!r}: a comma list of integers") from exc
    if not calls or min(calls) < 1:
        raise argparse.ArgumentTypeError(f"--calls {text!r}: at least one count, each >= 1")
    return calls


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=parse_calls, default=[10, 25, 50, 100, 150, 200], help="comma list of N")
    p.add_argument("--seconds", type=float, default=20.0, help="caller audio per call (the call is 0.5 s longer)")
    p.add_argument("--repeat", type=int, default=1, help="runs per N")
    p.add_argument("--gateway-core", type=int, default=None,
                   help="the CPU the gateway is pinned to (default: the highest this script may use)")
    p.add_argument("--repo", type=Path, default=REPO, help="source tree the gateway runs from (cwd of `python -m app.cli`)")
    p.add_argument("--callers-per-process", type=int, default=25)
    p.add_argument("--stagger-s", type=float, default=2.0, help="call starts spread over this long")
    p.add_argument("--setup-s", type=float, default=1.0, help="after the last start, before the window opens")
    p.add_argument("--sample-s", type=float, default=1.0, help="gateway CPU sampled this often in the window")
    p.add_argument("--pause-s", type=float, default=3.0, help="between runs (the gateway ends the last calls)")
    p.add_argument("--call-timeout-s", type=float, default=10.0)
    p.add_argument("--worker-slots", type=int, default=1024)
    p.add_argument("--text-every", type=int, default=0, help="stand-in worker: a Text every N frames (0: none)")
    p.add_argument("--gateway-log-level", default="info")
    p.add_argument("--client", choices=("lean", "sim"), default="lean",
                   help="lean: bench/load_callers.py's own caller (same messages, same playout model, cheaper); "
                        "sim: app.sim.run_call, as `callcenter call`")
    p.add_argument("--client-compression", choices=("deflate", "none"), default="deflate",
                   help="lean caller: offer permessage-deflate (as app.sim does) or not")
    p.add_argument("--client-uvloop", action=argparse.BooleanOptionalAction, default=True,
                   help="run the callers on uvloop (cheaper client; the gateway's uvicorn uses it too)")
    p.add_argument("--idle-s", type=float, default=5.0, help="gateway CPU measured this long with no call (0: skip)")
    p.add_argument("--gateway-profile", type=Path, default=None,
                   help="run the gateway under cProfile, its stats written here at exit (slows it down)")
    p.add_argument("--warmup-calls", type=int, default=2, help="short calls placed once before the first run")
    p.add_argument("--keep-dir", type=Path, default=None, help="keep process logs and call reports here")
    p.add_argument("--json-out", type=Path, default=None, help="also write all objects as one JSON list")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.repo = args.repo.resolve()
    if not (args.repo / "app" / "cli.py").exists():
        raise SystemExit(f"--repo {args.repo}: no app/cli.py there")
    if args.repeat < 1 or args.callers_per_process < 1:
        raise SystemExit("--repeat and --callers-per-process must be >= 1")
    if args.seconds - args.stagger_s - args.setup_s < 3.0:
        raise SystemExit("--seconds must leave a window of at least 3 s after --stagger-s + --setup-s")
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        raise SystemExit(f"needs 2 CPUs or more (one for the gateway, the rest for the callers); allowed: {allowed}")
    core = allowed[-1] if args.gateway_core is None else args.gateway_core
    if core not in allowed:
        raise SystemExit(f"--gateway-core {core} is not among the CPUs allowed here: {allowed}")
    gateway_cpus, client_cpus = {core}, set(allowed) - {core}

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored (`cmd &`)
    tmp = Path(tempfile.mkdtemp(prefix="gateway-load-"))
    results: list[dict[str, Any]] = []
    try:
        os.sched_setaffinity(0, client_cpus)  # this script (and Redis, started below) off the gateway's core
        audio = tmp / "caller.wav"
        caller_wav(audio, args.seconds)
        warm_audio = tmp / "warmup.wav"
        caller_wav(warm_audio, 2.0)
        with running_stack(args, tmp, gateway_cpus, client_cpus) as stack:
            log(f"gateway from {args.repo} on CPU {core}; callers, stand-in worker, Redis on {sorted(client_cpus)}; "
                f"logs in {tmp}")
            if args.warmup_calls:
                _warmup(args, stack, warm_audio)
            idle = idle_share(stack, args.idle_s)
            log(f"idle gateway: {idle} of a core over {args.idle_s:g} s")
            for calls in args.calls:
                for rep in range(args.repeat):
                    time.sleep(args.pause_s)
                    result = run_level(args, stack, calls, args.seconds, audio, f"n{calls}-r{rep + 1}")
                    result |= {"repo": str(args.repo), "commit": stack.commit}
                    results.append(result)
                    print(json.dumps(result), flush=True)
            summary = summary_of(args, results, core, client_cpus) | {
                "gateway_idle_cpu_share": idle, "commit": stack.commit,
            }
            print(json.dumps(summary), flush=True)
            write_json_out(args.json_out, [*results, summary])
    finally:
        keep_logs(tmp, args.keep_dir)
        shutil.rmtree(tmp, onerror=_rmtree_error)
    return 0


def _rmtree_error(function: Any, path: str, exc_info: Any) -> None:
    log(f"could not remove {path} ({function.__name__}): {exc_info[1]!r}")


def idle_share(stack: Stack, seconds: float) -> float | None:
    """The gateway's CPU share with no call, over `seconds` (its background tasks)."""
    if seconds <= 0:
        return None
    pid = stack.gateway.process.pid
    began, cpu = time.monotonic(), cpu_seconds(pid)
    time.sleep(seconds)
    stack.gateway.check_alive()
    return round((cpu_seconds(pid) - cpu) / (time.monotonic() - began), 4)


def _warmup(args: argparse.Namespace, stack: Stack, audio: Path) -> None:
    """A few short calls first, so that the first run does not pay for imports and first-call work."""
    result = run_level(
        argparse.Namespace(**{**vars(args), "stagger_s": 0.2, "setup_s": 0.3, "sample_s": 0.5}),
        stack, args.warmup_calls, 2.0, audio, "warmup",
    )
    if result["failed"]:
        raise RuntimeError(f"warm-up calls failed: {result['errors']}; gateway log:\n{tail(stack.gateway.log)}")
    log(f"warm-up: {result['completed']} calls completed, late fraction {result['late_fraction']}")


def summary_of(args: argparse.Namespace, results: list[dict[str, Any]], core: int, client_cpus: set[int]) -> dict[str, Any]:
    def ok(r: dict[str, Any]) -> bool:
        return r["failed"] == 0 and r["late_fraction"] is not None and r["late_fraction"] < LATE_LIMIT

    def client_ok(r: dict[str, Any]) -> bool:
        return r["client_send_late_fraction"] is not None and r["client_send_late_fraction"] < LATE_LIMIT

    by_n: dict[int, list[dict[str, Any]]] = {}
    for r in results:
        by_n.setdefault(r["calls"], []).append(r)
    passing = [n for n, rs in by_n.items() if all(ok(r) for r in rs)]
    failing = [n for n in by_n if n not in passing]
    return {
        "summary": True,
        "max_calls_under_1pct_late": max(passing) if passing else None,
        "min_calls_over_1pct_late": min(failing) if failing else None,
        "calls_where_client_fell_behind": sorted(n for n, rs in by_n.items() if not all(client_ok(r) for r in rs)),
        "gateway_cpu_ms_per_call_s": {str(n): [r["gateway_cpu_ms_per_call_s"] for r in rs] for n, rs in by_n.items()},
        "repo": str(args.repo),
        "gateway_core": core,
        "client_cpus": sorted(client_cpus),
        "cpu_count": os.cpu_count(),
        "seconds": args.seconds,
        "repeat": args.repeat,
        "load_1m_end": round(os.getloadavg()[0], 2),
    }


if __name__ == "__main__":
    sys.exit(main())
