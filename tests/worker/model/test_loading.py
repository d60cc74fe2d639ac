"""The loader: official files from a directory or the hub cache, checked tensors, voices, tokenizer."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from safetensors.torch import load_file, save_file

from app.worker.model import loading, tiny
from app.worker.model.errors import CheckpointError
from app.worker.model.lm import LMConfig
from app.worker.model.mimi import MimiConfig


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    shutil.rmtree(dst / loading.VOICES_DIR, ignore_errors=True)
    return dst


def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No network here: huggingface_hub serves only its cache (it reads the flag at import)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_tiny_checkpoint_has_exactly_the_official_files(tiny_checkpoint: Path) -> None:
    names = {p.name for p in tiny_checkpoint.iterdir() if not p.name.startswith(".")}
    assert {
        "model.safetensors",
        "tokenizer-e351c8d8-checkpoint125.safetensors",
        "tokenizer_spm_32k_3.model",
        "voices.tgz",
    } <= names
    with tarfile.open(tiny_checkpoint / "voices.tgz") as tar:
        members = sorted(m.name for m in tar.getmembers() if m.isfile())
    assert members == sorted(f"voices/{name}.pt" for name in loading.OFFICIAL_VOICES)


def test_official_key_layout_round_trips(tiny_checkpoint: Path) -> None:
    """The files carry the official key names and shapes, and load through the same loader."""
    from app.worker.model import lm_checkpoint, mimi_checkpoint

    files = loading.resolve_checkpoint(tiny_checkpoint)
    lm_cfg, mimi_cfg = LMConfig.tiny(), MimiConfig.tiny()
    lm_sd = load_file(str(files.lm))
    assert {k: tuple(v.shape) for k, v in lm_sd.items()} == lm_checkpoint.expected_official_shapes(lm_cfg)
    mimi_sd = load_file(str(files.mimi))
    assert {k: tuple(v.shape) for k, v in mimi_sd.items()} == mimi_checkpoint.expected_official_shapes(
        mimi_cfg
    )

    lm = loading.load_lm(files.lm, lm_cfg, max_slots=2, depformer_steps=lm_cfg.dep_q)
    again = lm_checkpoint.to_official(lm.state_dict(), lm_cfg)
    assert set(again) == set(lm_sd)
    for name, tensor in lm_sd.items():
        assert torch.equal(again[name], tensor), name

    mimi = loading.load_mimi(files.mimi, mimi_cfg, max_slots=2)
    again = mimi_checkpoint.to_official(mimi.state_dict(), mimi_cfg)
    assert set(again) == set(mimi_sd)
    for name, tensor in mimi_sd.items():
        assert torch.equal(again[name].to(tensor.dtype), tensor), name


def test_wrong_shape_names_the_tensor(tiny_checkpoint: Path, tmp_path: Path) -> None:
    root = _copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    sd = load_file(str(root / loading.LM_FILE))
    name = "text_linear.weight"
    sd[name] = sd[name][:-1].contiguous()
    save_file(sd, str(root / loading.LM_FILE))
    files = loading.resolve_checkpoint(root)
    with pytest.raises(CheckpointError) as err:
        loading.load_lm(files.lm, LMConfig.tiny(), max_slots=1)
    assert name in str(err.value)
    assert str(tuple(sd[name].shape)) in str(err.value) or "expected" in str(err.value)


def test_missing_tensor_is_named(tiny_checkpoint: Path, tmp_path: Path) -> None:
    root = _copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    sd = load_file(str(root / loading.MIMI_FILE))
    name = next(k for k in sorted(sd) if k.startswith("decoder"))
    del sd[name]
    save_file(sd, str(root / loading.MIMI_FILE))
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        loading.load_mimi(root / loading.MIMI_FILE, MimiConfig.tiny(), max_slots=1)


def test_truncated_file_is_a_clear_error(tiny_checkpoint: Path, tmp_path: Path) -> None:
    root = _copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    data = (root / loading.LM_FILE).read_bytes()
    (root / loading.LM_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        loading.load_lm(root / loading.LM_FILE, LMConfig.tiny(), max_slots=1)


def test_directory_lacking_files_says_which(tmp_path: Path) -> None:
    (tmp_path / loading.TOKENIZER_FILE).write_bytes(b"x")
    with pytest.raises(CheckpointError) as err:
        loading.resolve_checkpoint(tmp_path)
    for name in (loading.LM_FILE, loading.MIMI_FILE, loading.VOICES_ARCHIVE):
        assert name in str(err.value)


def test_hub_download_through_huggingface_hub_cache(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hub path is huggingface_hub's own download + cache; here served from a prepared cache."""
    _offline(monkeypatch)
    repo = tmp_path / "hub" / "models--nvidia--personaplex-7b-v1"
    snapshot = repo / "snapshots" / "0123456789abcdef"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123456789abcdef")
    for name in (loading.LM_FILE, loading.MIMI_FILE, loading.TOKENIZER_FILE, loading.VOICES_ARCHIVE):
        shutil.copy(tiny_checkpoint / name, snapshot / name)

    files = loading.resolve_checkpoint(None, cache_dir=tmp_path / "hub")
    assert files.lm == snapshot / loading.LM_FILE
    assert sorted(loading.list_voices(files.voices_dir)) == sorted(loading.OFFICIAL_VOICES)
    loading.load_lm(files.lm, LMConfig.tiny(), max_slots=1)


def test_hub_without_cache_or_network_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _offline(monkeypatch)
    with pytest.raises(CheckpointError, match="not in the local cache"):
        loading.resolve_checkpoint(None, cache_dir=tmp_path / "empty")


def test_voices_archive_with_escaping_member_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "voices.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        payload = b"evil"
        info = tarfile.TarInfo("voices/../../escape.pt")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(CheckpointError, match="unsafe"):
        loading.extract_voices(archive, tmp_path)
    assert not (tmp_path.parent / "escape.pt").exists()


def test_official_voice_file_loads_and_bad_one_is_named(tiny_checkpoint: Path, tmp_path: Path) -> None:
    cfg = LMConfig.tiny()
    files = loading.resolve_checkpoint(tiny_checkpoint)
    voice = loading.load_voice_embeddings(files.voices_dir / "NATF0.pt", cfg)
    assert voice.embeddings.shape[1] == cfg.dim and voice.embeddings.shape[0] >= 1
    assert voice.cache.shape == (cfg.num_streams, cfg.cache_len)

    bad = tmp_path / "bad.pt"
    torch.save({"embeddings": torch.zeros(3, 1, 1, cfg.dim + 1), "cache": voice.cache[None]}, bad)
    with pytest.raises(CheckpointError, match="embeddings"):
        loading.load_voice_embeddings(bad, cfg)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="junk.pt"):
        loading.load_voice_embeddings(tmp_path / "junk.pt", cfg)


def test_wav_voice_is_resampled_and_normalised(tmp_path: Path) -> None:
    import pyloudnorm

    rate = 16_000
    t = np.arange(2 * rate) / rate
    quiet = 0.01 * np.sin(2 * np.pi * 220 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    path = tmp_path / "custom.wav"
    soundfile.write(path, np.stack([quiet, quiet], axis=1), rate)

    audio = loading.load_voice_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(audio.shape[0] - 2 * loading.VOICE_SAMPLE_RATE) <= 2
    loudness = pyloudnorm.Meter(loading.VOICE_SAMPLE_RATE).integrated_loudness(audio)
    assert loudness == pytest.approx(-24.0, abs=0.1)

    soundfile.write(tmp_path / "silent.wav", np.zeros(rate), rate)
    with pytest.raises(CheckpointError, match="silent"):
        loading.load_voice_audio(tmp_path / "silent.wav")


def test_tokenizer_has_the_official_special_ids(tiny_checkpoint: Path, tmp_path: Path) -> None:
    cfg = LMConfig.tiny()
    sp = loading.load_tokenizer(tiny_checkpoint / loading.TOKENIZER_FILE, cfg)
    assert [sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()] == [0, 1, 2, 3]
    assert sp.decode(sp.encode("hello thank you")) == "hello thank you"

    other = tmp_path / "small.model"
    other.write_bytes(tiny.train_tiny_tokenizer(cfg.text_card + 32))
    with pytest.raises(CheckpointError, match="text card"):
        loading.load_tokenizer(other, cfg)
