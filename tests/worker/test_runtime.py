"""Building the worker runtime: model source, device, personas and their prompt states."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from app.config import WorkerSettings
from app.personas import PersonaError
from app.protocol import Sampling
from app.worker.model import loading, prompts
from app.worker.model.lm import LMConfig
from app.worker.model.mimi import MimiConfig
from app.worker.runtime import (
    Runtime,
    UnknownPersona,
    build_runtime,
    detect_configs,
    ensure_tiny_checkpoint,
    resolve_device,
)

from .conftest import PERSONAS


def test_tiny_model_is_written_once_under_the_state_dir_with_a_loud_banner(
    make_settings: Callable[..., WorkerSettings], caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(worker_model="tiny", worker_max_slots=1)
    with caplog.at_level(logging.WARNING, logger="app.worker.runtime"):
        rt = build_runtime(settings)
    assert rt.kind == "tiny"
    assert "only make NOISE" in caplog.text
    root = settings.worker_state_dir / "tiny-checkpoint"
    weights = root / loading.LM_FILE
    assert weights.is_file()
    stamp = weights.stat().st_mtime_ns
    again = build_runtime(settings)  # second start: reuses the files
    assert weights.stat().st_mtime_ns == stamp
    assert again.prompt_states.keys() == rt.prompt_states.keys()
    assert not [p for p in settings.worker_state_dir.iterdir() if p.name.endswith(".partial")]


def test_an_incomplete_tiny_checkpoint_is_rewritten(tmp_path: Path) -> None:
    root = tmp_path / "tiny-checkpoint"
    root.mkdir()
    (root / loading.LM_FILE).write_bytes(b"half a file")
    files = ensure_tiny_checkpoint(root)
    assert detect_configs(files) == (LMConfig.tiny(), MimiConfig.tiny())


def test_device_auto_picks_cpu_float32_without_a_gpu() -> None:
    device, dtype = resolve_device("auto", "auto")
    if torch.cuda.is_available():
        assert (device.type, dtype) == ("cuda", torch.bfloat16)
    else:
        assert (device.type, dtype) == ("cpu", torch.float32)
    assert resolve_device("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)


def test_every_persona_gets_its_prompt_state_once(runtime: Runtime) -> None:
    assert set(runtime.prompt_states) == {"general-assistant", "restaurant-orders", "waste-management"}
    for persona_id, state in runtime.prompt_states.items():
        tokens = runtime.role_tokens[persona_id]
        wrapped = prompts.wrap_system(runtime.personas.personas[persona_id].prompt)
        assert tokens == runtime.tokenizer.encode(wrapped) and wrapped.startswith("<system> ")
        voice = runtime.voices[persona_id]
        assert isinstance(voice, prompts.VoiceEmbeddings)  # the checkpoint's bundled .pt voices
        # voice frames, 6 silence, the role prompt, 6 silence: all behind the state's offset
        assert int(state.offset) == voice.embeddings.shape[0] + 1 + 6 + len(tokens) + 6
    assert runtime.kind == "dir" and runtime.device.type == "cpu"


def test_join_copies_the_state_and_sets_persona_sampling_with_overrides(runtime: Runtime) -> None:
    lm = runtime.lm
    runtime.join_slot(1, "restaurant-orders", Sampling(text_temperature=0.2, seed=42))
    state = runtime.prompt_states["restaurant-orders"]
    assert int(lm.tokens.offset[1]) == int(state.offset)
    assert torch.equal(lm.tokens.cache[1], state.cache)
    exported = lm.export_slot(1)
    assert torch.equal(exported.kv, state.kv)
    persona = runtime.personas.personas["restaurant-orders"].sampling
    assert lm.sampling.temp_text[1].item() == pytest.approx(0.2)  # the call's override
    assert lm.sampling.temp_audio[1].item() == pytest.approx(persona.audio_temperature)  # the persona's value
    assert int(lm.sampling.top_k_text[1]) == persona.text_top_k
    assert int(lm.sampling.top_k_audio[1]) == persona.audio_top_k
    assert int(lm.sampling.seed[1]) == 42
    with pytest.raises(UnknownPersona):
        runtime.join_slot(1, "nobody")


def test_a_persona_voice_missing_from_the_voices_dir_stops_the_start(
    make_settings: Callable[..., WorkerSettings], tmp_path: Path
) -> None:
    personas = tmp_path / "personas"
    shutil.copytree(PERSONAS, personas)
    broken = personas / "waste-management.yaml"
    broken.write_text(broken.read_text().replace("voice: NATM1", "voice: custom/nobody.wav"))
    with pytest.raises(PersonaError) as err:
        build_runtime(make_settings(personas_dir=personas))
    assert "waste-management.yaml" in str(err.value) and "voice" in str(err.value)


def test_a_broken_persona_file_stops_the_start_naming_file_and_field(
    make_settings: Callable[..., WorkerSettings], tmp_path: Path
) -> None:
    personas = tmp_path / "personas"
    shutil.copytree(PERSONAS, personas)
    (personas / "general-assistant.yaml").write_text(
        "id: general-assistant\nname: x\nprompt: hi\nvoice: NATF2\nsampling: {text_top_k: -1}\n"
    )
    with pytest.raises(PersonaError) as err:
        build_runtime(make_settings(personas_dir=personas))
    assert "general-assistant.yaml" in str(err.value) and "sampling.text_top_k" in str(err.value)
