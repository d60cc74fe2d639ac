"""`callcenter bench` on the tiny model: the JSON it prints is complete and self-consistent (no speed checks)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli import main

ROOT = Path(__file__).resolve().parents[2]

POSITIVE_MS = (
    "tick_p50_ms", "tick_p99_ms", "tick_max_ms", "step_p50_ms", "step_p99_ms", "host_ms_p50",
    "host_bookkeeping_ms_p50", "host_dispatch_ms_est", "dispatch_us_per_call", "pickup_ms", "pickup_max_ms",
)


def test_bench_prints_one_consistent_object_per_slot_count_and_a_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "bench.json"
    argv = ["bench", "--slots", "1,3", "--ticks", "4", "--warmup", "1", "--churn-every", "2",
            "--json-out", str(out_file)]
    assert main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert json.loads(out_file.read_text()) == lines
    *runs, summary = lines
    assert [r["slots"] for r in runs] == [1, 3]
    for r in runs:
        assert (r["device"], r["model"], r["dtype"], r["ticks"], r["warmup_ticks"]) == ("cpu", "tiny", "float32", 4, 1)
        for name in POSITIVE_MS:
            assert r[name] > 0, name
        assert r["tick_max_ms"] >= r["tick_p99_ms"] >= r["tick_p50_ms"]
        assert r["step_p99_ms"] >= r["step_p50_ms"]
        assert r["tick_p50_ms"] >= r["host_bookkeeping_ms_p50"]
        assert r["pickup_max_ms"] >= r["pickup_ms"] and r["pickups"] >= 1  # calls joined during the run
        assert 0 < r["rows_per_tick_mean"] <= r["slots"]
        assert r["peak_memory_bytes"] > 0 and r["peak_memory_kind"].startswith("peak RSS")
        assert r["within_budget"] == (r["tick_p99_ms"] <= 70.0)
        # No sync-prone call (item, tolist, bool of a tensor, mask indexing, ...) anywhere in the tick:
        # its one host transfer (app/worker/tick.py, device -> pinned host) waits for nothing on a CPU.
        assert r["host_syncs_per_tick"] == 0 and r["host_sync_sites"] == []
        assert r["torch_calls_per_tick"] > r["torch_calls_per_join"] > 0
    fitting = [r["slots"] for r in runs if r["tick_p99_ms"] <= 70.0]
    assert summary["summary"] is True
    assert summary["max_slots_within_budget"] == (max(fitting) if fitting else None)
    assert summary["persona_prompt_frames"] > 100  # 10 s of voice + silences + 60 role tokens
    assert summary["persona_prefill_ms"] > 0 and summary["persona_cache_load_ms"] > 0
    assert summary["persona_prefill_was_cached"] is False


def test_bench_reports_what_long_call_rebuilds_cost(capsys: pytest.CaptureFixture[str]) -> None:
    """With a context just above the bench persona's prompt, calls rebuild during the measured ticks."""
    argv = ["bench", "--slots", "2", "--ticks", "120", "--warmup", "2", "--churn-every", "0", "--context", "300",
            "--rebuild-chunk", "8", "--rebuild-margin", "20"]
    assert main(argv) == 0
    run, _summary = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert run["context"] == 300 and run["rebuilds"] >= 2 and run["rebuilds_forced"] == 0
    assert run["rebuild_chunks_mean"] >= 2  # spread over several between-ticks windows
    assert run["rebuild_ms_max"] >= run["rebuild_ms_p50"] > 0 and run["rebuild_chunk_ms_max"] > 0
    assert run["steps_rebuilding"] >= run["rebuilds"] and run["step_p99_ms_rebuilding"] > 0


def test_bench_rejects_bad_slot_counts(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--slots", "8,x"])
    assert exc.value.code == 2
    assert "slot counts" in capsys.readouterr().err


def test_the_bench_script_runs_the_same_verb() -> None:
    done = subprocess.run(
        [sys.executable, "bench/engine_tick.py", "--slots", "2", "--ticks", "2", "--warmup", "0",
         "--churn-every", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    run, summary = [json.loads(line) for line in done.stdout.splitlines()]
    assert run["slots"] == 2 and run["ticks"] == 2 and summary["summary"] is True


def _script(*argv: str) -> list[dict]:
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_tick_ops_counts_every_part_of_the_full_size_tick() -> None:
    (full,) = _script("bench/tick_ops.py", "--config", "full", "--slots", "4")
    assert full["config"] == "full" and full["slots"] == 4
    assert sum(full["by_part"].values()) == full["ops_per_tick"]
    assert {"temporal", "depformer", "mimi", "sampling"} <= set(full["by_part"])
    # 32 temporal layers and 8 steps x 6 depformer layers: each part scales with its layers.
    assert full["by_part"]["temporal"] >= 32 * 10 and full["by_part"]["depformer"] >= 48 * 5
    assert full["attention_calls"] == 32 + 8 * 6 + 2 * 8  # temporal, depformer, Mimi encoder + decoder


def test_profile_tick_reports_per_tick_costs_on_cpu() -> None:
    (run,) = _script("bench/profile_tick.py", "--tiny", "--device", "cpu", "--slots", "2", "--ticks", "2")
    assert (run["device"], run["slots"], run["ticks"], run["cuda_graph"]) == ("cpu", 2, 2, False)
    assert run["wall_ms_max"] >= run["wall_ms_p50"] > 0
    assert run["kernels_per_tick"] == 0 and run["top"] and all(r["ms_per_tick"] >= 0 for r in run["top"])


def test_the_gpu_session_script_refuses_unknown_stages_before_doing_anything(tmp_path: Path) -> None:
    script = ROOT / "bench" / "gpu_session.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    done = subprocess.run(["bash", str(script), "warp"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={"OUT": str(tmp_path / "out"), "PATH": "/usr/bin:/bin"}, check=False)
    assert done.returncode == 2 and "unknown stage warp" in done.stderr
    assert not (tmp_path / "out").exists()  # refused before doing anything


def test_the_gpu_session_script_runs_its_bench_and_profile_stages_on_the_tiny_model(tmp_path: Path) -> None:
    """The plumbing a lent GPU's one command relies on, tried on CPU (MODEL empty: tiny)."""
    out = tmp_path / "out"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OUT": str(out), "PYTHON": sys.executable, "MODEL": "",
           "SLOTS": "1,2", "TICKS": "2", "PROFILE_SLOTS": "1", "COMMIT": "abc1234"}
    done = subprocess.run(["bash", "bench/gpu_session.sh", "eager", "profile"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    *runs, summary = json.loads((out / "bench-eager.json").read_text())
    assert [r["slots"] for r in runs] == [1, 2] and summary["commit"] == "abc1234"
    (profiled,) = [json.loads(line) for line in (out / "profile.jsonl").read_text().splitlines()]
    assert profiled["slots"] == 1 and profiled["device"] == "cpu"
