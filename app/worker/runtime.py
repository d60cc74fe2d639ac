"""The worker's model runtime: networks, tokenizer, personas and their cached prompt states.

`build_runtime(settings)` loads everything once at start:
- the checkpoint: 'tiny' (random weights written once under WORKER_STATE_DIR; they only make
  noise), 'hf' (the official files from the hub, HF_TOKEN for the gated repo) or a local directory;
  the network sizes are read from the files, so a directory may hold the tiny checkpoint too;
- device and dtype ('auto': cuda + bfloat16 when a GPU is there, else cpu + float32; Mimi always
  runs in float32);
- the personas (`personas/*.yaml`), each voice checked against the checkpoint's voices directory,
  each role prompt tokenised and its prompt state computed once, in a scratch slot, and kept;
  computed states are cached on disk under WORKER_STATE_DIR/persona-cache/ (`persona_cache.py`),
  so a restart with the same weights, prompt, voice and dtype loads them instead.
The part after the weights are loaded (personas, voices, prompt states, the `Runtime`) is
`runtime_from_models`, which the bench (`app/worker/bench.py`) runs on random weights too.
A call's join is then a copy: reset the rows, import the persona state, set the sampling.
"""

from __future__ import annotations

import functools
import logging
import shutil
import time
from collections.abc import Callable
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors import safe_open

from app.config import WorkerSettings
from app.personas import Persona, PersonaBook, load_personas
from app.protocol import FRAME_SAMPLES, ProtocolError, Sampling
from app.worker import persona_cache
from app.worker.context import frames_tensor
from app.worker.model import lm_checkpoint, loading, mimi_checkpoint, prompts, sampling, tiny
from app.worker.model.errors import CheckpointError
from app.worker.model.lm import LMConfig, PersonaPlexLM
from app.worker.model.lm_state import SlotState
from app.worker.model.mimi import Mimi, MimiConfig

logger = logging.getLogger(__name__)

TINY_DIRNAME = "tiny-checkpoint"
SKIPPED_TEXT_IDS = frozenset({0, 3})  # EPAD and PAD: the model's "no new text" tokens

TINY_BANNER = """
################################################################################
#  WORKER_MODEL=tiny: RANDOM TINY WEIGHTS. The bot will only make NOISE.       #
#  For a real voice bot set WORKER_MODEL=hf (HF_TOKEN, licence accepted on the  #
#  hub) or WORKER_MODEL=/path/to/personaplex-7b-v1 and run it on a GPU.         #
################################################################################"""


class TextTokenizer(Protocol):
    """What the runtime uses of a sentencepiece processor."""

    def vocab_size(self) -> int: ...

    def id_to_piece(self, id: int) -> str: ...

    def encode(self, text: str) -> list[int]: ...


class UnknownPersona(KeyError):
    """A session asked for a persona this worker does not serve."""


@dataclass
class Runtime:
    """Everything the engine needs to serve calls; the model code knows nothing of the rest."""

    kind: str  # 'tiny', 'hf' or 'dir'
    source: str  # where the weights came from (directory or hub repo)
    device: torch.device
    dtype: torch.dtype
    lm: PersonaPlexLM
    mimi: Mimi
    tokenizer: TextTokenizer
    personas: PersonaBook
    role_tokens: dict[str, list[int]]
    voices: dict[str, prompts.Voice]
    prompt_states: dict[str, SlotState]  # persona id -> state after its whole prompt (on `device`)
    prompt_ms: dict[str, float]  # persona id -> time its prompt state took at start (prefill or load)
    prompt_cached: dict[str, bool] = field(default_factory=dict)  # persona id -> loaded from the disk cache
    _prompt_frames: dict[str, int] = field(default_factory=dict, repr=False)  # persona id -> prompt offset

    @property
    def max_slots(self) -> int:
        return self.lm.max_slots

    def has_persona(self, persona_id: str) -> bool:
        return persona_id in self.prompt_states

    @torch.inference_mode()
    def join_slot(self, slot: int, persona_id: str, sampling: Sampling | None = None) -> int:
        """Load a persona's cached prompt state into `slot`, ready for the call's first frame.

        Resets the LM row and the slot's Mimi encoder and decoder, imports the state, sets the
        persona's sampling with the call's overrides (a seed override makes the call reproducible).
        Returns the seed the slot samples with (a fresh random one unless the call gave one).
        """
        state = self._state(persona_id)
        self.lm.reset(slot)
        self.lm.import_slot(slot, state)
        self._set_sampling(slot, persona_id, sampling)
        self.mimi.reset(torch.tensor([slot], dtype=torch.long))
        return int(self.lm.sampling.seed[slot])

    @torch.inference_mode()
    def prefill_in_place(self, slot: int, persona_id: str, sampling: Sampling | None = None) -> None:
        """The reference for `join_slot`: run the persona's whole prompt in `slot` itself."""
        self._state(persona_id)
        prompts.build_prompt_state(self.lm, slot, self.role_tokens[persona_id], self.voices[persona_id])
        self._set_sampling(slot, persona_id, sampling)
        self.mimi.reset(torch.tensor([slot], dtype=torch.long))

    def prompt_frames(self, persona_id: str) -> int:
        """The offset of a slot right after the persona's prompt (its frames, the voice's included);
        read once per persona, so the engine's checks between ticks never read the device."""
        frames = self._prompt_frames.get(persona_id)
        if frames is None:
            frames = self._prompt_frames[persona_id] = int(self._state(persona_id).offset)
        return frames

    @torch.inference_mode()
    def prefill_slot(self, slot: int, frames: np.ndarray) -> None:
        """Run a call's given frames (int16 [n, 17]) in `slot` after what it holds, in one prefill."""
        self.lm.prefill_frames(slot, frames_tensor(np.asarray(frames), self.device))

    @torch.inference_mode()
    def warm_codec(self, slot: int, agent_codes: np.ndarray, caller_pcm: np.ndarray) -> None:
        """Bring the slot's Mimi up to a call moving in: decode its last agent codes ([w, 8]) and
        encode the caller's last audio (PCM16 [m, 1920]), outputs discarded. Other rows rest."""
        mimi = self.mimi
        active = torch.zeros(mimi.max_slots, dtype=torch.bool, device=self.device)
        active[slot] = True
        codes = torch.zeros(mimi.max_slots, mimi.cfg.num_codebooks, dtype=torch.long, device=self.device)
        for row in np.asarray(agent_codes, dtype=np.int64).reshape(-1, mimi.cfg.num_codebooks):
            codes[slot] = torch.as_tensor(row, device=self.device)
            mimi.decode_step(codes, active)
        pcm = torch.zeros(mimi.max_slots, mimi.cfg.frame_size, dtype=torch.float32, device=self.device)
        for frame in np.asarray(caller_pcm).reshape(-1, mimi.cfg.frame_size):
            pcm[slot] = torch.as_tensor(frame.astype(np.float32) / 32768.0, device=self.device)
            mimi.encode_step(pcm, active)

    def text_piece(self, token: int) -> str | None:
        """The text of one model text token ('▁' -> ' '), None for the padding tokens."""
        if token in SKIPPED_TEXT_IDS or not 0 <= token < self.tokenizer.vocab_size():
            return None
        return self.tokenizer.id_to_piece(token).replace("▁", " ")

    def _state(self, persona_id: str) -> SlotState:
        state = self.prompt_states.get(persona_id)
        if state is None:
            raise UnknownPersona(persona_id)
        return state

    def check_sampling(self, persona_id: str, sampling: Sampling | None) -> None:
        """Raise ProtocolError when the call's top-k (its override, or its persona's) does not fit
        the static candidate widths this worker samples with (set from the personas it serves)."""
        base = self.personas.personas[persona_id].sampling
        over = sampling or Sampling()
        params = self.lm.sampling
        for name, k, width in (
            ("text_top_k", _pick(over.text_top_k, base.text_top_k), params.text_width),
            ("audio_top_k", _pick(over.audio_top_k, base.audio_top_k), params.audio_width),
        ):
            if width is not None and not 1 <= k <= width:
                raise ProtocolError(
                    f"sampling.{name} {k} is not served here: this worker samples among at most {width} "
                    "candidates (the largest top-k of its personas)"
                )

    def _set_sampling(self, slot: int, persona_id: str, sampling: Sampling | None) -> None:
        base = self.personas.personas[persona_id].sampling
        over = sampling or Sampling()
        self.lm.set_sampling(
            slot,
            temperature_text=_pick(over.text_temperature, base.text_temperature),
            temperature_audio=_pick(over.audio_temperature, base.audio_temperature),
            top_k_text=_pick(over.text_top_k, base.text_top_k),
            top_k_audio=_pick(over.audio_top_k, base.audio_top_k),
            seed=over.seed,
        )


def _pick(override, default):
    return default if override is None else override


# ------------------------------------------------------------------------------------- building
def resolve_device(name: str, dtype_name: str) -> tuple[torch.device, torch.dtype]:
    """'auto' picks cuda + bfloat16 when a GPU is there, else cpu + float32."""
    if name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"WORKER_DEVICE={name} but torch sees no CUDA device")
    if dtype_name == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, dtype_name)
    return device, dtype


def checkpoint_files(settings: WorkerSettings) -> tuple[str, str, loading.CheckpointFiles]:
    """(kind, source, files) for WORKER_MODEL; creates the tiny checkpoint on first use."""
    if settings.worker_model == "tiny":
        root = settings.worker_state_dir / TINY_DIRNAME
        logger.warning(TINY_BANNER)
        return "tiny", str(root), ensure_tiny_checkpoint(root)
    if settings.worker_model == "hf":
        logger.info("fetching %s from the Hugging Face hub (cached after the first time)", settings.worker_hf_repo)
        return "hf", settings.worker_hf_repo, loading.resolve_checkpoint(None, repo_id=settings.worker_hf_repo)
    return "dir", settings.worker_model, loading.resolve_checkpoint(Path(settings.worker_model))


def ensure_tiny_checkpoint(root: Path) -> loading.CheckpointFiles:
    """The tiny random checkpoint under `root`, written (atomically) if it is not there yet."""
    try:
        return loading.resolve_checkpoint(root)
    except CheckpointError:
        if root.exists():
            logger.warning("tiny checkpoint at %s is incomplete; writing it again", root)
    staging = root.with_name(f".{root.name}.{int(time.time() * 1000)}.partial")
    tiny.make_tiny_checkpoint(staging)
    if root.exists():
        shutil.rmtree(root)
    try:
        staging.rename(root)
    except OSError as exc:  # another worker on this machine wrote it meanwhile: use theirs
        logger.info("tiny checkpoint appeared at %s meanwhile (%s); using it", root, exc)
        shutil.rmtree(staging)
    else:
        logger.info("wrote the tiny random checkpoint to %s", root)
    return loading.resolve_checkpoint(root)


def detect_configs(files: loading.CheckpointFiles) -> tuple[LMConfig, MimiConfig]:
    """Which configs (tiny or full PersonaPlex) the checkpoint files hold, from their headers."""
    lm_key, mimi_key = "text_emb.weight", "encoder.model.0.conv.conv.weight"
    lm_shape = _header_shape(files.lm, lm_key)
    mimi_shape = _header_shape(files.mimi, mimi_key)
    lm_cfg = next(
        (c for c in (LMConfig.personaplex_7b(), LMConfig.tiny())
         if lm_checkpoint.expected_official_shapes(c)[lm_key] == lm_shape),
        None,
    )
    mimi_cfg = next(
        (c for c in (MimiConfig.personaplex(), MimiConfig.tiny())
         if mimi_checkpoint.expected_official_shapes(c)[mimi_key] == mimi_shape),
        None,
    )
    if lm_cfg is None:
        raise CheckpointError(f"{files.lm}: {lm_key} has shape {lm_shape}: neither PersonaPlex-7B nor tiny")
    if mimi_cfg is None:
        raise CheckpointError(f"{files.mimi}: {mimi_key} has shape {mimi_shape}: neither PersonaPlex Mimi nor tiny")
    return lm_cfg, mimi_cfg


def _header_shape(path: Path, key: str) -> tuple[int, ...]:
    try:
        with safe_open(str(path), framework="pt") as f:
            if key not in f.keys():
                raise CheckpointError(f"{path}: no tensor {key}")
            return tuple(f.get_slice(key).get_shape())
    except (OSError, RuntimeError) as exc:  # safetensors raises its own error (a RuntimeError subclass)
        raise CheckpointError(f"{path}: not a readable safetensors file: {exc}") from exc


@torch.inference_mode()
def build_runtime(settings: WorkerSettings) -> Runtime:
    """Load model, tokenizer and personas, and compute every persona's prompt state once."""
    book = load_personas(settings.personas_dir)
    kind, source, files = checkpoint_files(settings)
    book.check_voices(files.voices_dir)
    device, dtype = resolve_device(settings.worker_device, settings.worker_dtype)
    lm_cfg, mimi_cfg = detect_configs(files)
    if settings.worker_context is not None:
        if lm_cfg != LMConfig.tiny() and settings.worker_context > lm_cfg.context:  # tiny: random weights
            raise CheckpointError(
                f"WORKER_CONTEXT={settings.worker_context} exceeds the {lm_cfg.context} frames the model was trained with"
            )
        lm_cfg = dataclasses.replace(lm_cfg, context=settings.worker_context)
    slots = settings.worker_max_slots
    started = time.perf_counter()
    lm = loading.load_lm(files.lm, lm_cfg, max_slots=slots, device=device, dtype=dtype)
    mimi = loading.load_mimi(files.mimi, mimi_cfg, max_slots=slots, device=device, dtype=torch.float32)
    tokenizer = loading.load_tokenizer(files.tokenizer, lm_cfg)
    if mimi_cfg.frame_size != FRAME_SAMPLES:
        raise CheckpointError(f"{files.mimi}: Mimi frame of {mimi_cfg.frame_size} samples, need {FRAME_SAMPLES}")
    logger.info(
        "loaded %s model (%s) on %s/%s for %d slots in %.1f s",
        kind, source, device, str(dtype).removeprefix("torch."), slots, time.perf_counter() - started,
    )
    return runtime_from_models(
        lm, mimi, tokenizer, book,
        voice_for=lambda persona: loading.load_voice(persona.voice_path(files.voices_dir), lm_cfg, mimi),
        cache=persona_cache.PersonaCache(settings.worker_state_dir / persona_cache.CACHE_DIRNAME, lm_cfg, lm.kv_dtype),
        checkpoint=persona_cache.checkpoint_identity(files.lm),
        kind=kind, source=source, device=device,
    )


@torch.inference_mode()
def runtime_from_models(
    lm: PersonaPlexLM,
    mimi: Mimi,
    tokenizer: TextTokenizer,
    book: PersonaBook,
    *,
    voice_for: Callable[[Persona], prompts.Voice],
    cache: persona_cache.PersonaCache,
    checkpoint: str,
    kind: str,
    source: str,
    device: torch.device,
) -> Runtime:
    """The runtime of networks already on `device`: every persona's prompt state, from `cache` or computed.

    Each persona's role prompt is tokenised, its voice prompt comes from `voice_for`, and its state is
    loaded from the persona cache or prefilled once in a scratch slot (then cached); `checkpoint`
    names the weights in the cache key. `build_runtime` calls this with the loaded checkpoint, the
    bench with random weights, a synthetic persona and a stand-in tokenizer.
    """
    set_sampling_widths(lm, book)
    role_tokens: dict[str, list[int]] = {}
    voices: dict[str, prompts.Voice] = {}
    states: dict[str, SlotState] = {}
    prompt_ms: dict[str, float] = {}
    cached: dict[str, bool] = {}
    scratch = 0  # every slot is free at start; the scratch slot is reset after use
    for persona_id, persona in book.personas.items():
        tokens = tokenizer.encode(prompts.wrap_system(persona.prompt))
        voice = voice_for(persona)
        key = persona_cache.state_key(
            checkpoint=checkpoint, cfg=lm.cfg, dtype=lm.dtype, kv_dtype=lm.kv_dtype, device=device,
            role_tokens=tokens, voice=voice,
        )
        t0 = time.perf_counter()
        compute = functools.partial(prompts.build_prompt_state, lm, scratch, tokens, voice)
        info = {"source": source, "voice": persona.voice, "text_tokens": len(tokens)}
        states[persona_id], cached[persona_id] = cache.get_or_compute(persona_id, key, device, compute, info)
        _sync(device)
        prompt_ms[persona_id] = (time.perf_counter() - t0) * 1000
        role_tokens[persona_id], voices[persona_id] = tokens, voice
        logger.info(
            "persona %s: prompt of %d frames (%d text tokens) %s in %.0f ms",
            persona_id, int(states[persona_id].offset), len(tokens),
            "loaded from the cache" if cached[persona_id] else "computed", prompt_ms[persona_id],
        )
    lm.reset(scratch)
    mimi.reset(torch.tensor([scratch], dtype=torch.long))
    return Runtime(
        kind=kind,
        source=source,
        device=device,
        dtype=lm.dtype,
        lm=lm,
        mimi=mimi,
        tokenizer=tokenizer,
        personas=book,
        role_tokens=role_tokens,
        voices=voices,
        prompt_states=states,
        prompt_ms=prompt_ms,
        prompt_cached=cached,
    )


def set_sampling_widths(lm: PersonaPlexLM, book: PersonaBook) -> None:
    """Static top-k candidate widths from the personas served (and the model's defaults): a step
    draws noise for that many candidates per row instead of the whole vocabulary."""
    cfg = lm.cfg
    personas = list(book.personas.values())
    text = sampling.candidate_width([p.sampling.text_top_k for p in personas] + [cfg.default_top_k_text], cfg.text_vocab)
    audio = sampling.candidate_width([p.sampling.audio_top_k for p in personas] + [cfg.default_top_k_audio], cfg.card)
    lm.sampling.set_widths(text, audio)
    logger.info(
        "sampling: %s text candidates, %s audio candidates per step",
        text if text is not None else f"all {cfg.text_vocab}", audio if audio is not None else f"all {cfg.card}",
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
