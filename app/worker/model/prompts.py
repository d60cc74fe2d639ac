"""The persona prompt: voice prompt -> 0.5 s silence -> `<system> role <system>` -> 0.5 s silence.

Before the first conversational frame PersonaPlex is run over, in order (every token given):
1. the voice prompt: agent audio = the voice's tokens (or, for an official `.pt` voice, its stored
   LM input embeddings replayed), text = PAD, user audio = the constant SINE tokens;
2. 6 frames of silence: agent = SILENCE tokens, text = PAD, user = SINE;
3. the role prompt wrapped as `<system> ... <system>`, one text token per frame, agent = SILENCE,
   user = SINE;
4. 6 more frames of silence.

Because nothing is sampled, the whole prompt is one parallel causal forward (`build_prompt_state`)
whose per-slot state is the same for every call of a persona: compute it once, cache it, and
copy it into any slot with `PersonaPlexLM.import_slot`. `step_prompt_state` steps the very same
frames one by one through `PersonaPlexLM.step`; the tests hold the two equal.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from app.worker.model.lm import LMConfig, PersonaPlexLM, SlotState
from app.worker.model.mimi import Mimi

SILENCE_TOKENS = (948, 243, 1178, 546, 1736, 1030, 1978, 2008)
SINE_TOKENS = (430, 1268, 381, 1611, 1095, 1495, 56, 472)
TEXT_PAD = 3
SILENCE_FRAMES = 6
SYSTEM_TAG = "<system>"


@dataclass(frozen=True)
class VoiceEmbeddings:
    """An official voice `.pt`: LM input embeddings of N prompt frames and the token cache after."""

    embeddings: Tensor  # [N, D]
    cache: Tensor  # [K, CT] long


@dataclass(frozen=True)
class VoiceCodes:
    """A voice prompt given as Mimi codes (a `.wav` voice encoded by our Mimi)."""

    codes: Tensor  # [M, 8] long


Voice = VoiceEmbeddings | VoiceCodes


def wrap_system(text: str) -> str:
    """`<system> text <system>`, unless the text is already wrapped."""
    cleaned = text.strip()
    if cleaned.startswith(SYSTEM_TAG) and cleaned.endswith(SYSTEM_TAG) and len(cleaned) > len(SYSTEM_TAG):
        return cleaned
    return f"{SYSTEM_TAG} {cleaned} {SYSTEM_TAG}"


def _frame(cfg: LMConfig, text: int, agent: tuple[int, ...] | Tensor) -> Tensor:
    """One undelayed frame of all streams.  # [K]"""
    frame = torch.empty(cfg.num_streams, dtype=torch.long)
    frame[0] = text
    frame[1 : 1 + cfg.agent_codebooks] = torch.as_tensor(agent, dtype=torch.long)
    frame[1 + cfg.agent_codebooks :] = torch.as_tensor(SINE_TOKENS, dtype=torch.long)
    return frame


def prompt_frames(cfg: LMConfig, text_tokens: list[int], voice_codes: Tensor | None = None) -> Tensor:
    """The given frames of a persona prompt after the voice: [K, F] (voice codes first if given)."""
    frames = []
    if voice_codes is not None:
        frames += [_frame(cfg, TEXT_PAD, codes) for codes in voice_codes]
    silence = _frame(cfg, TEXT_PAD, SILENCE_TOKENS)
    frames += [silence] * SILENCE_FRAMES
    frames += [_frame(cfg, int(tok), SILENCE_TOKENS) for tok in text_tokens]
    frames += [silence] * SILENCE_FRAMES
    return torch.stack(frames, dim=1)


@dataclass
class _Ring:
    """The official per-call token cache, simulated on the host for fully given frames."""

    cache: np.ndarray  # [K, CT] int64
    provided: np.ndarray  # [K, CT] bool
    offset: int


def _replay_given(
    cfg: LMConfig, ring: _Ring, frames: np.ndarray, columns: list[np.ndarray] | None
) -> None:
    """Advance `ring` over fully given frames [K, F] exactly as `PersonaPlexLM.step` would.

    Appends the input column of every step that runs the transformer to `columns`.
    """
    ct = ring.cache.shape[1]
    initial = np.asarray(cfg.initial_tokens, dtype=np.int64)
    delays = np.asarray(cfg.delays, dtype=np.int64)
    streams = np.arange(len(delays))
    for frame in frames.T:
        o = ring.offset
        write = (o + delays) % ct
        ring.cache[streams, write] = frame
        ring.provided[streams, write] = True
        early = o <= delays
        ring.cache[streams[early], o % ct] = initial[early]
        ring.provided[streams[early], o % ct] = True
        if o == 0:
            ring.cache[:, 0] = initial
        else:
            if columns is not None:
                columns.append(ring.cache[:, (o - 1) % ct].copy())
            ring.provided[:, (o - 1) % ct] = False
        ring.offset = o + 1


def _fresh_ring(cfg: LMConfig) -> _Ring:
    return _Ring(
        cache=np.full((cfg.num_streams, cfg.token_ring), cfg.ungenerated_token, dtype=np.int64),
        provided=np.zeros((cfg.num_streams, cfg.token_ring), dtype=bool),
        offset=0,
    )


def _replay_frame(cfg: LMConfig) -> np.ndarray:
    """The frame the official embedding replay declares as given at each step.  # [K]"""
    frame = np.asarray(cfg.initial_tokens, dtype=np.int64).copy()
    frame[0] = TEXT_PAD
    return frame


@torch.no_grad()
def build_prompt_state(
    lm: PersonaPlexLM, slot: int, text_tokens: list[int], voice: Voice | None
) -> SlotState:
    """Run the whole persona prompt in `slot` as one parallel prefill and return its state."""
    cfg = lm.cfg
    ring = _fresh_ring(cfg)
    inputs: list[Tensor] = []
    columns: list[np.ndarray] = []
    voice_codes = None
    if isinstance(voice, VoiceEmbeddings):
        n = voice.embeddings.shape[0]
        _replay_given(cfg, ring, np.tile(_replay_frame(cfg)[:, None], (1, n + 1)), None)
        ring.cache = voice.cache.cpu().numpy().astype(np.int64).copy()
        inputs.append(voice.embeddings.to(device=lm.device, dtype=lm.dtype))
    elif isinstance(voice, VoiceCodes):
        voice_codes = voice.codes
    frames = prompt_frames(cfg, text_tokens, voice_codes)
    _replay_given(cfg, ring, frames.numpy(), columns)
    if columns:
        col = torch.as_tensor(np.stack(columns, axis=1), device=lm.device)  # [K, T]
        inputs.append(lm.embed_columns(col[None])[0])
    embeddings = torch.cat(inputs, dim=0)  # [T, D]
    lm.reset(torch.tensor([slot], device=lm.device))
    lm.prefill(slot, embeddings)
    lm.set_token_state(
        slot,
        offset=ring.offset,
        cache=torch.as_tensor(ring.cache, device=lm.device),
        provided=torch.as_tensor(ring.provided, device=lm.device),
    )
    return lm.export_slot(slot)


@torch.no_grad()
def step_prompt_state(
    lm: PersonaPlexLM, slot: int, text_tokens: list[int], voice: Voice | None
) -> SlotState:
    """The reference: the same prompt stepped frame by frame through `PersonaPlexLM.step`."""
    cfg = lm.cfg
    s = lm.max_slots
    active = torch.zeros(s, dtype=torch.bool, device=lm.device)
    active[slot] = True
    lm.reset(torch.tensor([slot], device=lm.device))
    voice_codes = None
    if isinstance(voice, VoiceEmbeddings):
        replay = torch.as_tensor(_replay_frame(cfg), device=lm.device)
        frame = torch.full((s, cfg.num_streams), -1, dtype=torch.long, device=lm.device)
        frame[slot] = replay
        emb = torch.zeros(s, cfg.dim, device=lm.device, dtype=lm.dtype)
        use = active.clone()
        # The offset-0 step runs no transformer and consumes no embedding.
        lm.step(frame, active, embeddings=emb, use_embeddings=use)
        for vec in voice.embeddings:
            emb[slot] = vec.to(device=lm.device, dtype=lm.dtype)
            lm.step(frame, active, embeddings=emb, use_embeddings=use)
        lm.set_token_state(slot, cache=voice.cache.to(lm.device))
    elif isinstance(voice, VoiceCodes):
        voice_codes = voice.codes
    frames = prompt_frames(cfg, text_tokens, voice_codes).to(lm.device)
    frame = torch.full((s, cfg.num_streams), -1, dtype=torch.long, device=lm.device)
    for t in range(frames.shape[1]):
        frame[slot] = frames[:, t]
        lm.step(frame, active)
    return lm.export_slot(slot)


@torch.no_grad()
def voice_codes_from_audio(mimi: Mimi, audio: np.ndarray) -> VoiceCodes:
    """Encode a 24 kHz voice prompt (zero-padded to whole frames) with a fresh Mimi state."""
    frame = mimi.cfg.frame_size
    pad = (-audio.shape[0]) % frame
    pcm = torch.as_tensor(np.pad(audio, (0, pad)), dtype=torch.float32, device=mimi.device)
    codes = mimi.encode(pcm[None].to(mimi.dtype))[0]  # [8, M]
    return VoiceCodes(codes=codes.T.contiguous())


@torch.no_grad()
def voice_embeddings_from_audio(lm: PersonaPlexLM, mimi: Mimi, audio: np.ndarray, slot: int = 0) -> VoiceEmbeddings:
    """Make an official-style voice `.pt` payload: run the voice frames, keep the input embeddings
    of every transformer step and the token cache after the last frame (slot `slot` is used)."""
    cfg = lm.cfg
    codes = voice_codes_from_audio(mimi, audio).codes
    ring = _fresh_ring(cfg)
    columns: list[np.ndarray] = []
    frames = torch.stack([_frame(cfg, TEXT_PAD, c) for c in codes], dim=1)
    _replay_given(cfg, ring, frames.numpy(), columns)
    col = torch.as_tensor(np.stack(columns, axis=1), device=lm.device)  # [K, M-1]
    embeddings = lm.embed_columns(col[None])[0]  # [M-1, D]
    return VoiceEmbeddings(embeddings=embeddings.float().cpu(), cache=torch.as_tensor(ring.cache))
