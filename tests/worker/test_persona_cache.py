"""Persona prompt states cached on disk: hits equal the prefill, any input change misses, bad files recover."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from app.config import WorkerSettings
from app.worker import persona_cache
from app.worker.model import loading, prompts
from app.worker.model.lm import LMConfig
from app.worker.model.lm_state import SlotState
from app.worker.persona_cache import PersonaCache, checkpoint_identity, state_key
from app.worker.runtime import Runtime, build_runtime

from .conftest import PERSONAS


def assert_same_state(a: SlotState, b: SlotState) -> None:
    assert int(a.offset) == int(b.offset)
    assert torch.equal(a.cache, b.cache)
    assert torch.equal(a.provided, b.provided)
    assert a.kv.dtype == b.kv.dtype and torch.equal(a.kv, b.kv)


def cache_files(settings: WorkerSettings) -> list[Path]:
    return sorted((settings.worker_state_dir / persona_cache.CACHE_DIRNAME).iterdir())


@pytest.fixture
def first(make_settings: Callable[..., WorkerSettings]) -> tuple[WorkerSettings, Runtime]:
    """A runtime built on an empty state dir: every persona prefilled and written to the cache."""
    settings = make_settings(worker_max_slots=1)
    return settings, build_runtime(settings)


def test_a_restart_loads_every_persona_state_equal_to_the_prefill(first: tuple[WorkerSettings, Runtime]) -> None:
    settings, cold = first
    assert cold.prompt_cached == dict.fromkeys(cold.prompt_states, False)
    files = cache_files(settings)
    assert len(files) == len(cold.prompt_states)
    assert all(f.suffix == ".safetensors" for f in files)  # no temporary files left behind

    warm = build_runtime(settings)
    assert warm.prompt_cached == dict.fromkeys(cold.prompt_states, True)
    for persona_id, state in cold.prompt_states.items():
        assert_same_state(warm.prompt_states[persona_id], state)
    assert cache_files(settings) == files


def test_a_changed_role_prompt_misses_only_that_persona(
    first: tuple[WorkerSettings, Runtime], tmp_path: Path
) -> None:
    settings, cold = first
    personas = tmp_path / "personas-edited"
    shutil.copytree(PERSONAS, personas)
    path = personas / "restaurant-orders.yaml"
    data = yaml.safe_load(path.read_text())
    data["prompt"] = "Always greet in Dutch. " + data["prompt"]
    path.write_text(yaml.safe_dump(data))
    edited = build_runtime(settings.model_copy(update={"personas_dir": personas}))
    assert edited.prompt_cached == {
        "general-assistant": True, "restaurant-orders": False, "waste-management": True
    }
    assert int(edited.prompt_states["restaurant-orders"].offset) > int(cold.prompt_states["restaurant-orders"].offset)


@pytest.mark.parametrize("damage", ["truncated", "flipped", "foreign"])
def test_a_damaged_cache_file_is_logged_and_recomputed(
    first: tuple[WorkerSettings, Runtime], damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings, cold = first
    victim = next(f for f in cache_files(settings) if f.name.startswith("waste-management."))
    data = victim.read_bytes()
    if damage == "truncated":
        victim.write_bytes(data[: len(data) // 2])
    elif damage == "flipped":  # one bit in the tensor data: only the checksum can tell
        victim.write_bytes(data[:-3] + bytes([data[-3] ^ 0x01]) + data[-2:])
    else:
        save_file({"kv": torch.zeros(1)}, str(victim))
    with caplog.at_level(logging.WARNING, logger="app.worker.persona_cache"):
        again = build_runtime(settings)
    assert "waste-management" in caplog.text and "computing it again" in caplog.text
    assert damage != "flipped" or "checksum" in caplog.text
    assert again.prompt_cached["waste-management"] is False
    assert again.prompt_cached["general-assistant"] is True
    assert_same_state(again.prompt_states["waste-management"], cold.prompt_states["waste-management"])
    assert build_runtime(settings).prompt_cached["waste-management"] is True  # rewritten, whole


def test_new_weights_with_the_same_size_and_mtime_miss(tiny_checkpoint: Path, tmp_path: Path) -> None:
    copy = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, copy)
    lm_file = copy / loading.LM_FILE
    before = checkpoint_identity(lm_file)
    assert checkpoint_identity(lm_file) == before
    stat = lm_file.stat()
    weights = load_file(str(lm_file))
    name = sorted(weights)[-1]
    weights[name] = weights[name] + 1.0  # same shapes, so same header and file size
    save_file(weights, str(lm_file))
    os.utime(lm_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert lm_file.stat().st_size == stat.st_size
    assert checkpoint_identity(lm_file) != before


def test_the_key_covers_prompt_voice_weights_and_dtypes() -> None:
    cfg = LMConfig.tiny()
    voice = prompts.VoiceEmbeddings(embeddings=torch.ones(3, cfg.dim), cache=torch.zeros(17, 4, dtype=torch.long))
    base = {
        "checkpoint": "abc",
        "cfg": cfg,
        "dtype": torch.float32,
        "kv_dtype": torch.float32,
        "device": torch.device("cpu"),
        "role_tokens": [5, 6, 7],
        "voice": voice,
    }
    key = state_key(**base)
    assert state_key(**base) == key
    other_voice = prompts.VoiceEmbeddings(embeddings=voice.embeddings * 2, cache=voice.cache)
    for change in (
        {"checkpoint": "abd"},
        {"cfg": LMConfig.personaplex_7b()},
        {"dtype": torch.bfloat16},
        {"kv_dtype": torch.bfloat16},
        {"role_tokens": [5, 6, 8]},
        {"voice": other_voice},
        {"voice": prompts.VoiceCodes(codes=torch.zeros(3, 8, dtype=torch.long))},
    ):
        assert state_key(**{**base, **change}) != key, change


def test_store_then_load_round_trips_and_other_keys_miss(runtime: Runtime, tmp_path: Path) -> None:
    cache = PersonaCache(tmp_path / "cache", runtime.lm.cfg, runtime.lm.kv_dtype)
    state = runtime.prompt_states["general-assistant"]
    path = cache.store("general-assistant", "k1" * 32, state, {"why": "test"})
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == [path.name]
    assert_same_state(cache.load("general-assistant", "k1" * 32, torch.device("cpu")), state)
    assert cache.load("general-assistant", "k2" * 32, torch.device("cpu")) is None
    with pytest.raises(persona_cache.CorruptEntry):
        bad = SlotState(offset=state.offset, cache=state.cache, provided=state.provided, kv=state.kv[:, :, :, 1:])
        cache.store("general-assistant", "k3" * 32, bad)
