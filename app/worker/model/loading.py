"""Load the official PersonaPlex files into our networks.

The files are the ones of the Hugging Face repo `nvidia/personaplex-7b-v1`:

    model.safetensors                                  the LM (moshi key layout)
    tokenizer-e351c8d8-checkpoint125.safetensors       Mimi
    tokenizer_spm_32k_3.model                          sentencepiece, ids 0..3 = EPAD, BOS, EOS, PAD
    voices.tgz -> voices/*.pt                          voice prompts as replayable LM input embeddings

They come from a local directory or from the hub through huggingface_hub (gated: accept the licence
and set HF_TOKEN). The translation between the official key layout and our modules lives in
`lm_checkpoint.py` and `mimi_checkpoint.py`; this module does the file work and the checks.
`tiny.make_tiny_checkpoint` writes random weights for the tiny configs in exactly this layout, so
tests and the local demo go through the very same loader.
"""

from __future__ import annotations

import functools
import logging
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from app.worker.model import lm_checkpoint, mimi_checkpoint
from app.worker.model.errors import CheckpointError
from app.worker.model.lm import LMConfig, PersonaPlexLM
from app.worker.model.mimi import Mimi, MimiConfig
from app.worker.model.prompts import Voice, VoiceEmbeddings, voice_codes_from_audio

logger = logging.getLogger(__name__)

DEFAULT_REPO = "nvidia/personaplex-7b-v1"
LM_FILE = "model.safetensors"
MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
TOKENIZER_FILE = "tokenizer_spm_32k_3.model"
VOICES_ARCHIVE = "voices.tgz"
VOICES_DIR = "voices"

OFFICIAL_VOICES = tuple(
    [f"NAT{g}{i}" for g in "FM" for i in range(4)] + [f"VAR{g}{i}" for g in "FM" for i in range(5)]
)
VOICE_SAMPLE_RATE = 24_000
VOICE_TARGET_LUFS = -24.0


@dataclass(frozen=True)
class CheckpointFiles:
    """Where the four official artefacts are on local disk."""

    lm: Path
    mimi: Path
    tokenizer: Path
    voices_dir: Path


# ---------------------------------------------------------------------------------------------
# Finding the files


def resolve_checkpoint(
    source: str | os.PathLike | None = None,
    *,
    repo_id: str = DEFAULT_REPO,
    revision: str | None = None,
    token: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> CheckpointFiles:
    """Return local paths of the official files.

    `source` is a local directory holding the official files, or None to download them from
    `repo_id` on the Hugging Face hub (cached; progress bars from huggingface_hub; `token`
    defaults to HF_TOKEN).
    """
    if source is not None:
        return _local_files(Path(source))
    return _hub_files(repo_id, revision=revision, token=token, cache_dir=cache_dir)


def _local_files(root: Path) -> CheckpointFiles:
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory {root} does not exist")
    missing = [name for name in (LM_FILE, MIMI_FILE, TOKENIZER_FILE) if not (root / name).is_file()]
    voices = root / VOICES_DIR
    archive = root / VOICES_ARCHIVE
    if not voices.is_dir() and not archive.is_file():
        missing.append(f"{VOICES_DIR}/ or {VOICES_ARCHIVE}")
    if missing:
        raise CheckpointError(f"checkpoint directory {root} lacks: {', '.join(missing)}")
    if not voices.is_dir():
        extract_voices(archive, root)
    return CheckpointFiles(root / LM_FILE, root / MIMI_FILE, root / TOKENIZER_FILE, voices)


def _hub_files(
    repo_id: str, *, revision: str | None, token: str | None, cache_dir: str | os.PathLike | None
) -> CheckpointFiles:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    token = token or os.environ.get("HF_TOKEN") or None
    paths: dict[str, Path] = {}
    for name in (TOKENIZER_FILE, VOICES_ARCHIVE, MIMI_FILE, LM_FILE):
        try:
            paths[name] = Path(
                hf_hub_download(repo_id, name, revision=revision, token=token, cache_dir=cache_dir)
            )
        except GatedRepoError as exc:
            raise CheckpointError(
                f"{repo_id} is gated: accept the NVIDIA Open Model License on its hub page and set "
                f"HF_TOKEN to a token of that account ({exc.__class__.__name__})"
            ) from exc
        except RepositoryNotFoundError as exc:
            raise CheckpointError(f"hub repo {repo_id} not found or not visible to this token") from exc
        except LocalEntryNotFoundError as exc:
            raise CheckpointError(
                f"{name} of {repo_id} is not in the local cache and the hub cannot be reached: {exc}"
            ) from exc
    archive = paths[VOICES_ARCHIVE]
    voices = archive.parent / VOICES_DIR
    if not voices.is_dir():
        extract_voices(archive, archive.parent)
    return CheckpointFiles(paths[LM_FILE], paths[MIMI_FILE], paths[TOKENIZER_FILE], voices)


def extract_voices(archive: Path, dest: Path) -> Path:
    """Unpack `voices.tgz` into `dest/voices`, refusing members that would land outside it."""
    target = dest / VOICES_DIR
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = []
            for member in tar.getmembers():
                parts = Path(member.name).parts
                if member.isdir():
                    continue
                if not member.isfile() or ".." in parts or Path(member.name).is_absolute():
                    raise CheckpointError(f"{archive}: refusing unsafe member {member.name!r}")
                if parts[0] != VOICES_DIR:
                    raise CheckpointError(f"{archive}: member {member.name!r} is not under {VOICES_DIR}/")
                members.append(member)
            tmp = dest / f".{VOICES_DIR}.partial"
            tar.extractall(tmp, members=members, filter="data")
    except (tarfile.TarError, OSError) as exc:
        raise CheckpointError(f"{archive}: cannot unpack voices: {exc}") from exc
    (tmp / VOICES_DIR).rename(target)
    tmp.rmdir()
    logger.info("unpacked %d voices into %s", len(members), target)
    return target


# ---------------------------------------------------------------------------------------------
# Networks


def read_safetensors(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file; a truncated or foreign file is a CheckpointError naming it."""
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file: {exc}") from exc


def load_lm(
    path: Path,
    cfg: LMConfig,
    *,
    max_slots: int,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    depformer_steps: int = 8,
) -> PersonaPlexLM:
    """Build the LM for `max_slots` calls and load `model.safetensors` into it."""
    official = read_safetensors(path, device)
    convert = functools.partial(lm_checkpoint.from_official, depformer_steps=depformer_steps)
    ours = _named(path, convert, official, cfg)
    with torch.device("meta"):
        model = PersonaPlexLM(cfg, max_slots=max_slots, dtype=dtype, depformer_steps=depformer_steps)
    _load_into(model, ours, path, device)
    return model


def load_mimi(
    path: Path,
    cfg: MimiConfig,
    *,
    max_slots: int,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Mimi:
    """Build Mimi for `max_slots` calls and load the official Mimi safetensors into it."""
    official = read_safetensors(path, device)
    ours = _named(path, mimi_checkpoint.from_official, official, cfg)
    with torch.device("meta"):
        model = Mimi(cfg, max_slots=max_slots, dtype=dtype)
    _load_into(model, ours, path, device)
    return model


def _named(path: Path, convert, official: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    try:
        return convert(official, cfg)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def _load_into(
    model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, device: str | torch.device
) -> None:
    """Materialise a meta-built model on `device` and load `state` (weights) into it.

    Parameters come from `state`; non-persistent buffers (per-slot streaming state) are
    re-created by the model's own `reset` after materialisation.
    """
    model.to_empty(device=device)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: converted weights do not fit the model: missing {missing[:8]}, "
            f"unexpected {unexpected[:8]}"
        )
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{path}: {name} has shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)}"
            )
    # Each tensor takes the dtype the model built it in (Mimi keeps its codebooks in float32).
    cast = {name: t.to(device=device, dtype=expected[name].dtype) for name, t in state.items()}
    model.load_state_dict(cast, strict=True)
    model.init_state()
    model.eval()


# ---------------------------------------------------------------------------------------------
# Tokenizer and voices


def load_tokenizer(path: Path, cfg: LMConfig | None = None) -> sentencepiece.SentencePieceProcessor:
    """Load the sentencepiece model; with `cfg`, check its size against the LM's text card."""
    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a sentencepiece model: {exc}") from exc
    if cfg is not None and sp.vocab_size() != cfg.text_card:
        raise CheckpointError(
            f"{path}: tokenizer has {sp.vocab_size()} pieces, the LM's text card is {cfg.text_card}"
        )
    return sp


def list_voices(voices_dir: Path) -> dict[str, Path]:
    """Voice name -> file, for the `.pt` and `.wav` prompts in `voices_dir` (`.pt` wins a tie)."""
    found: dict[str, Path] = {}
    for suffix in (".wav", ".pt"):
        for path in sorted(voices_dir.glob(f"*{suffix}")):
            found[path.stem] = path
    return found


def load_voice(path: Path, cfg: LMConfig, mimi: Mimi) -> Voice:
    """A voice prompt from an official `.pt` (replayed embeddings) or a `.wav` (encoded by `mimi`)."""
    if path.suffix == ".pt":
        return load_voice_embeddings(path, cfg)
    if path.suffix == ".wav":
        return voice_codes_from_audio(mimi, load_voice_audio(path))
    raise CheckpointError(f"{path}: a voice prompt is a .pt or a .wav file")


def load_voice_embeddings(path: Path, cfg: LMConfig) -> VoiceEmbeddings:
    """Load an official voice `.pt` (`embeddings` [N, 1, 1, D], `cache` [1, K, CT])."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types for a foreign file; re-raised, named
        raise CheckpointError(f"{path}: not a voice prompt file: {exc}") from exc
    if not isinstance(data, dict) or "embeddings" not in data or "cache" not in data:
        raise CheckpointError(f"{path}: a voice prompt holds 'embeddings' and 'cache'")
    emb, cache = data["embeddings"], data["cache"]
    if emb.dim() != 4 or emb.shape[1:3] != (1, 1) or emb.shape[3] != cfg.dim or emb.shape[0] < 1:
        raise CheckpointError(
            f"{path}: embeddings has shape {tuple(emb.shape)}, expected (N, 1, 1, {cfg.dim})"
        )
    ring = cfg.cache_len
    if tuple(cache.shape) != (1, cfg.num_streams, ring):
        raise CheckpointError(
            f"{path}: cache has shape {tuple(cache.shape)}, expected (1, {cfg.num_streams}, {ring})"
        )
    return VoiceEmbeddings(embeddings=emb[:, 0, 0].float(), cache=cache[0].long())


def save_voice_embeddings(path: Path, voice: VoiceEmbeddings) -> None:
    """Write a voice prompt in the official `.pt` layout."""
    torch.save(
        {"embeddings": voice.embeddings[:, None, None].cpu(), "cache": voice.cache[None].cpu()}, path
    )


def load_voice_audio(path: Path) -> np.ndarray:
    """Read a `.wav` voice prompt: mono, 24 kHz, loudness-normalised to -24 LUFS.  # [T] float32"""
    import pyloudnorm
    import soundfile
    import soxr

    try:
        audio, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, OSError) as exc:
        raise CheckpointError(f"{path}: cannot read audio: {exc}") from exc
    mono = audio.mean(axis=1)
    if rate != VOICE_SAMPLE_RATE:
        mono = soxr.resample(mono, rate, VOICE_SAMPLE_RATE)
    if mono.shape[0] < VOICE_SAMPLE_RATE // 2:
        raise CheckpointError(f"{path}: a voice prompt needs at least 0.5 s of audio")
    meter = pyloudnorm.Meter(VOICE_SAMPLE_RATE)
    loudness = meter.integrated_loudness(mono)
    if not np.isfinite(loudness):
        raise CheckpointError(f"{path}: the voice prompt is silent")
    return pyloudnorm.normalize.loudness(mono, loudness, VOICE_TARGET_LUFS).astype(np.float32)
