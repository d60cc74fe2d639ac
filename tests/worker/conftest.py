"""Worker test fixtures: settings on the tiny checkpoint, one loaded runtime per module."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from app.config import WorkerSettings

REPO = Path(__file__).resolve().parents[2]
PERSONAS = REPO / "personas"


@pytest.fixture
def make_settings(tmp_path: Path, tiny_checkpoint: Path) -> Callable[..., WorkerSettings]:
    """WorkerSettings on the session's tiny checkpoint directory, state under tmp_path."""

    def make(**overrides: object) -> WorkerSettings:
        values: dict[str, object] = {
            "worker_model": str(tiny_checkpoint),
            "worker_state_dir": tmp_path / "state",
            "worker_max_slots": 3,
            "worker_device": "cpu",
            "worker_dtype": "float32",
            "personas_dir": PERSONAS,
            "redis_embedded_path": tmp_path / "redis" / "test.rdb",
            "worker_token": "test-worker-token",
            "worker_id": "test-worker",
        }
        values.update(overrides)
        return WorkerSettings(**values)

    return make


@pytest.fixture(scope="module")
def runtime(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """A runtime with 3 slots on the tiny checkpoint, shared by a module's tests."""
    from app.worker.runtime import build_runtime

    state = tmp_path_factory.mktemp("worker-state")
    settings = WorkerSettings(
        worker_model=str(tiny_checkpoint),
        worker_state_dir=state,
        worker_max_slots=3,
        worker_device="cpu",
        worker_dtype="float32",
        personas_dir=PERSONAS,
    )
    return build_runtime(settings)
