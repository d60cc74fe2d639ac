"""Random-weight models: the tiny checkpoint of the tests and the local demo, the bench's weights.

Nothing here is a real voice bot; it is what runs without the gated PersonaPlex files:
- `make_tiny_checkpoint` writes random weights for the tiny configs in exactly the official file
  names and key layout (plus a tiny sentencepiece model and voice prompts), so tests and the local
  demo (`WORKER_MODEL=tiny`) go through the very same loader (`loading.py`) as the real checkpoint;
- `build_weights` / `models_for` build random weights in memory for any LMConfig / MimiConfig, tiny
  or full size (no checkpoint file, no licence, no download: the bench), shared without a copy by
  the models of any slot count;
- `synthetic_voice`: speech-like audio, for voice prompts and simulated callers.
"""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece
import torch
from safetensors.torch import save_file

from app.worker.model import lm_checkpoint, loading, mimi_checkpoint
from app.worker.model.lm import LMConfig, PersonaPlexLM
from app.worker.model.mimi import Mimi, MimiConfig
from app.worker.model.prompts import voice_embeddings_from_audio
from app.worker.model.streaming import materialise_buffers


# ---------------------------------------------------------------------------------------------
# The tiny checkpoint (files in the official layout)


def train_tiny_tokenizer(vocab_size: int) -> bytes:
    """Train a sentencepiece model of `vocab_size` pieces with ids 0..3 = unk/EPAD, BOS, EOS, PAD."""
    corpus = [
        "<system> You are a friendly agent of the city waste management line. <system>",
        "<system> You take food orders for a restaurant; be brief and polite. <system>",
        "hello thank you for calling how can I help you today",
        "your pickup is scheduled for tuesday morning, anything else?",
        "one large pizza with mushrooms and a lemonade, that will be twelve dollars",
        "please hold while I transfer your call to a colleague",
        "ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?'-()<>/",
    ] * 8
    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        minloglevel=2,
        num_threads=1,
    )
    return buf.getvalue()


def make_tiny_checkpoint(
    directory: str | os.PathLike,
    *,
    seed: int = 0,
    voices: tuple[str, ...] = loading.OFFICIAL_VOICES,
) -> loading.CheckpointFiles:
    """Write random tiny-config weights in exactly the official file names and key layout.

    Also writes a tiny sentencepiece model and `voices.tgz` with voice prompts made by running
    our own Mimi + LM over synthetic voice audio (the way the official `.pt` files are made).
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    lm_cfg, mimi_cfg = LMConfig.tiny(), MimiConfig.tiny()
    torch.manual_seed(seed)
    mimi = Mimi(mimi_cfg, max_slots=1)
    lm = PersonaPlexLM(lm_cfg, max_slots=1, depformer_steps=lm_cfg.dep_q)
    mimi.eval()
    lm.eval()
    save_file(_contiguous(mimi_checkpoint.to_official(mimi.state_dict(), mimi_cfg)), str(root / loading.MIMI_FILE))
    save_file(_contiguous(lm_checkpoint.to_official(lm.state_dict(), lm_cfg)), str(root / loading.LM_FILE))
    (root / loading.TOKENIZER_FILE).write_bytes(train_tiny_tokenizer(lm_cfg.text_card))

    staging = root / f".{loading.VOICES_DIR}.build"
    (staging / loading.VOICES_DIR).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in voices:
        audio = synthetic_voice(rng)
        voice = voice_embeddings_from_audio(lm, mimi, audio)
        loading.save_voice_embeddings(staging / loading.VOICES_DIR / f"{name}.pt", voice)
    with tarfile.open(root / loading.VOICES_ARCHIVE, "w:gz") as tar:
        tar.add(staging / loading.VOICES_DIR, arcname=loading.VOICES_DIR)
    for path in (staging / loading.VOICES_DIR).iterdir():
        path.unlink()
    (staging / loading.VOICES_DIR).rmdir()
    staging.rmdir()
    return loading.resolve_checkpoint(root)


def synthetic_voice(rng: np.random.Generator, seconds: float = 1.2) -> np.ndarray:
    """A voiced-speech-like signal (gliding harmonics, syllable envelope) at 24 kHz.  # [T]"""
    rate = loading.VOICE_SAMPLE_RATE
    t = np.arange(int(seconds * rate)) / rate
    f0 = rng.uniform(100, 220) * (1 + 0.1 * np.sin(2 * np.pi * 1.5 * t))
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voiced = sum(np.sin(h * phase) / h for h in range(1, 8))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2
    noise = 0.02 * rng.standard_normal(t.shape)
    return (0.3 * voiced * envelope + noise).astype(np.float32)


def _contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


# ---------------------------------------------------------------------------------------------
# Random weights in memory (any config, tiny or full size)


def configs(full: bool = False) -> tuple[LMConfig, MimiConfig]:
    """The tiny configs, or with `full` the full-size PersonaPlex-7B ones."""
    if full:
        return LMConfig.personaplex_7b(), MimiConfig.personaplex()
    return LMConfig.tiny(), MimiConfig.tiny()


@dataclass
class RandomWeights:
    """Random weights built once and shared by the models of every slot count."""

    lm_cfg: LMConfig
    mimi_cfg: MimiConfig
    dtype: torch.dtype  # the LM's (Mimi is float32)
    lm: dict[str, torch.Tensor]
    mimi: dict[str, torch.Tensor]


def build_weights(
    lm_cfg: LMConfig, mimi_cfg: MimiConfig, *, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> tuple[RandomWeights, PersonaPlexLM, Mimi]:
    """Random weights for any config (tiny or full size) on `device`, plus one-slot models holding them.

    The LM is built on the meta device, materialised with `to_empty` on `device` and filled by its
    own random init (normal, std 0.02; norms 1): no checkpoint file and no host copy of 16 GB.
    Mimi (79 M parameters at full size) is built directly on `device` with its own init, in float32
    as in the worker. The one-slot models serve a persona prefill; `models_for` makes the others.
    """
    torch.manual_seed(seed)
    with torch.device("meta"):
        lm = PersonaPlexLM(lm_cfg, max_slots=1, dtype=dtype)
    lm.to_empty(device=device)
    lm.init_weights()
    lm.init_state()
    lm.eval()
    mimi = Mimi(mimi_cfg, max_slots=1, device=device, dtype=torch.float32)
    mimi.init_state()
    mimi.eval()
    weights = RandomWeights(lm_cfg, mimi_cfg, dtype, dict(lm.state_dict()), dict(mimi.state_dict()))
    return weights, lm, mimi


def models_for(weights: RandomWeights, slots: int, device: torch.device) -> tuple[PersonaPlexLM, Mimi]:
    """LM and Mimi for `slots` calls sharing `weights` (no copy); only the per-slot state is new."""
    with torch.device("meta"):
        lm = PersonaPlexLM(weights.lm_cfg, max_slots=slots, dtype=weights.dtype)
        mimi = Mimi(weights.mimi_cfg, max_slots=slots, dtype=torch.float32)
    for model, state in ((lm, weights.lm), (mimi, weights.mimi)):
        model.load_state_dict(state, strict=True, assign=True)
        materialise_buffers(model, device)
        model.init_state()
        model.eval()
    return lm, mimi


