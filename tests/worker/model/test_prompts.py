"""The persona prompt: its frames, parallel prefill == stepping, and cached state copied into a slot."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from app.worker.model import loading, prompts, tiny
from app.worker.model.lm import LMConfig, PersonaPlexLM
from app.worker.model.lm_state import SlotState
from app.worker.model.mimi import Mimi, MimiConfig

ROLE = "You answer the city waste management line. Be brief."


@pytest.fixture(scope="module")
def models(tiny_checkpoint: Path) -> tuple[PersonaPlexLM, Mimi, loading.CheckpointFiles]:
    files = loading.resolve_checkpoint(tiny_checkpoint)
    lm = loading.load_lm(files.lm, LMConfig.tiny(), max_slots=3)
    mimi = loading.load_mimi(files.mimi, MimiConfig.tiny(), max_slots=1)
    return lm, mimi, files


@pytest.fixture(scope="module")
def role_tokens(models) -> list[int]:
    _, _, files = models
    sp = loading.load_tokenizer(files.tokenizer, LMConfig.tiny())
    return sp.encode(prompts.wrap_system(ROLE))


def _assert_same_state(a: SlotState, b: SlotState, atol: float = 1e-5) -> None:
    assert int(a.offset) == int(b.offset)
    assert torch.equal(a.cache, b.cache)
    assert torch.equal(a.provided, b.provided)
    assert a.kv.shape == b.kv.shape
    torch.testing.assert_close(a.kv, b.kv, atol=atol, rtol=0)


def test_wrap_system_adds_tags_once() -> None:
    assert prompts.wrap_system("  Be nice. ") == "<system> Be nice. <system>"
    assert prompts.wrap_system("<system> Be nice. <system>") == "<system> Be nice. <system>"


def test_prompt_frames_follow_the_official_order() -> None:
    cfg = LMConfig.tiny()
    voice = torch.arange(3 * 8).view(3, 8) + 100
    text = [17, 18, 19, 20]
    frames = prompts.prompt_frames(cfg, text, voice)  # [17, F]
    assert frames.shape == (17, 3 + 6 + 4 + 6)
    silence = torch.tensor(prompts.SILENCE_TOKENS)
    sine = torch.tensor(prompts.SINE_TOKENS)
    assert torch.equal(frames[1:9, :3].T, voice)
    assert (frames[0, :3] == prompts.TEXT_PAD).all()
    assert (frames[1:9, 3:].T == silence).all()
    assert frames[0, 3:9].tolist() == [prompts.TEXT_PAD] * 6
    assert frames[0, 9:13].tolist() == text
    assert frames[0, 13:].tolist() == [prompts.TEXT_PAD] * 6
    assert (frames[9:, :].T == sine).all()


def test_role_prompt_is_tokenised_with_system_tags(models, role_tokens: list[int]) -> None:
    _, _, files = models
    sp = loading.load_tokenizer(files.tokenizer)
    assert sp.decode(role_tokens) == f"<system> {ROLE} <system>"


@pytest.mark.parametrize("voice_kind", ["none", "codes", "embeddings"])
def test_parallel_prefill_equals_stepping(models, role_tokens: list[int], voice_kind: str) -> None:
    lm, mimi, files = models
    voice: prompts.Voice | None = None
    if voice_kind == "codes":
        audio = tiny.synthetic_voice(np.random.default_rng(3))
        voice = prompts.voice_codes_from_audio(mimi, audio)
    elif voice_kind == "embeddings":
        voice = loading.load_voice_embeddings(files.voices_dir / "NATF0.pt", lm.cfg)

    parallel = prompts.build_prompt_state(lm, 1, role_tokens, voice)
    stepped = prompts.step_prompt_state(lm, 2, role_tokens, voice)
    _assert_same_state(parallel, stepped)
    voice_frames = 0 if voice is None else (
        voice.codes.shape[0] if isinstance(voice, prompts.VoiceCodes) else voice.embeddings.shape[0] + 1
    )
    assert int(parallel.offset) == voice_frames + 2 * prompts.SILENCE_FRAMES + len(role_tokens)


def test_voice_pt_replays_like_the_audio_it_was_made_from(models, role_tokens: list[int]) -> None:
    """An official-style `.pt` voice made from audio gives the prompt state of that audio's codes."""
    lm, mimi, _ = models
    audio = tiny.synthetic_voice(np.random.default_rng(5))
    from_codes = prompts.build_prompt_state(lm, 0, role_tokens, prompts.voice_codes_from_audio(mimi, audio))
    from_pt = prompts.build_prompt_state(
        lm, 0, role_tokens, prompts.voice_embeddings_from_audio(lm, mimi, audio, slot=0)
    )
    _assert_same_state(from_codes, from_pt)


def test_wav_voice_file_goes_through_loader(models, role_tokens: list[int], tmp_path: Path) -> None:
    lm, mimi, _ = models
    audio = tiny.synthetic_voice(np.random.default_rng(9), seconds=1.0)
    path = tmp_path / "custom.wav"
    soundfile.write(path, audio, 16_000)  # 24000 samples at 16 kHz: 1.5 s, resampled to 24 kHz
    voice = loading.load_voice(path, lm.cfg, mimi)
    assert isinstance(voice, prompts.VoiceCodes)
    assert voice.codes.shape == (math.ceil(1.5 * 12.5), 8)  # padded to whole 80 ms frames
    state = prompts.build_prompt_state(lm, 0, role_tokens, voice)
    assert int(state.offset) == voice.codes.shape[0] + 12 + len(role_tokens)


def _run_call(lm: PersonaPlexLM, slot: int, user_codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Step a call in `slot` with caller codes [T, 8]; other rows stay inactive."""
    s = lm.max_slots
    active = torch.zeros(s, dtype=torch.bool)
    active[slot] = True
    frame = torch.full((s, 17), -1, dtype=torch.long)
    texts, audios = [], []
    for codes in user_codes:
        frame[slot, 9:] = codes
        out = lm.step(frame, active)
        texts.append(out.text[slot])
        audios.append(out.audio[slot])
    return torch.stack(texts), torch.stack(audios)


def test_cached_persona_state_in_another_slot_behaves_like_fresh_prefill(
    tiny_checkpoint: Path, role_tokens: list[int]
) -> None:
    files = loading.resolve_checkpoint(tiny_checkpoint)
    cfg = LMConfig.tiny()
    voice = loading.load_voice_embeddings(files.voices_dir / "NATM0.pt", cfg)
    cached_lm = loading.load_lm(files.lm, cfg, max_slots=3)
    fresh_lm = loading.load_lm(files.lm, cfg, max_slots=3)

    # The persona is prefilled once in slot 0, cached, and copied into slot 2 of a busy model.
    cache = prompts.build_prompt_state(cached_lm, 0, role_tokens, voice)
    cached_lm.import_slot(2, cache)
    # The other model prefills the same persona directly in slot 2.
    prompts.build_prompt_state(fresh_lm, 0, role_tokens, voice)
    prompts.build_prompt_state(fresh_lm, 2, role_tokens, voice)
    _assert_same_state(cached_lm.export_slot(2), fresh_lm.export_slot(2), atol=0)

    for lm in (cached_lm, fresh_lm):
        lm.set_sampling(2, seed=1234)
    user = torch.randint(0, cfg.card, (20, 8), generator=torch.Generator().manual_seed(7))
    text_a, audio_a = _run_call(cached_lm, 2, user)
    text_b, audio_b = _run_call(fresh_lm, 2, user)
    assert torch.equal(text_a, text_b)
    assert torch.equal(audio_a, audio_b)
    # The call really samples (not all one token), so equality means something.
    assert audio_a[2:].unique().numel() > 5
