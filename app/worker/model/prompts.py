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

from app.worker.model.lm import LMConfig, PersonaPlexLM
from app.worker.model.lm_state import SlotState
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


@torch.no_grad()
def build_prompt_state(
    lm: PersonaPlexLM, slot: int, text_tokens: list[int], voice: Voice | None
) -> SlotState:
    """Run the whole persona prompt in `slot` as one parallel prefill and return its state.

    The slot is reset first; afterwards it holds the prompt state (ready for the first
    conversational frame) and the returned copy can be imported into any other slot.
    """
    lm.reset(slot)
    voice_codes = None
    if isinstance(voice, VoiceEmbeddings):
        # Official replay: the stored embeddings stand in for the voice frames' input columns,
        # then the stored token cache replaces the ring.
        lm.prefill_frames(slot, embeddings=voice.embeddings.to(device=lm.device, dtype=lm.dtype))
        lm.set_token_state(slot, cache=voice.cache)
    elif isinstance(voice, VoiceCodes):
        voice_codes = voice.codes
    lm.prefill_frames(slot, frames=prompt_frames(lm.cfg, text_tokens, voice_codes))
    return lm.export_slot(slot)


@torch.no_grad()
def step_prompt_state(
    lm: PersonaPlexLM, slot: int, text_tokens: list[int], voice: Voice | None
) -> SlotState:
    """The reference: the same prompt stepped frame by frame through `PersonaPlexLM.step`."""
    cfg, s = lm.cfg, lm.max_slots
    active = torch.zeros(s, dtype=torch.bool, device=lm.device)
    active[slot] = True
    frame = torch.full((s, cfg.num_streams), -1, dtype=torch.long, device=lm.device)
    lm.reset(slot)
    voice_codes = None
    if isinstance(voice, VoiceEmbeddings):
        frame[slot] = lm.replay_frame()
        emb = torch.zeros(s, cfg.dim, device=lm.device, dtype=lm.dtype)
        for vec in voice.embeddings:
            emb[slot] = vec.to(device=lm.device, dtype=lm.dtype)
            lm.step(frame, active, embeddings=emb, use_embeddings=active)
        lm.set_token_state(slot, cache=voice.cache)
    elif isinstance(voice, VoiceCodes):
        voice_codes = voice.codes
    frames = prompt_frames(cfg, text_tokens, voice_codes).to(lm.device)
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
def voice_embeddings_from_audio(
    lm: PersonaPlexLM, mimi: Mimi, audio: np.ndarray, slot: int = 0
) -> VoiceEmbeddings:
    """Make an official-style voice `.pt` payload from 24 kHz audio.

    Runs the voice frames (text PAD, agent = the voice's codes, user = SINE) in `slot` and keeps
    the input embedding of every transformer step plus the token cache after the last frame, as
    the official `save_voice_prompt_embeddings` does. The slot is reset afterwards.
    """
    codes = voice_codes_from_audio(mimi, audio).codes  # [M, 8]
    if codes.shape[0] < 2:
        raise ValueError("a voice prompt needs at least two frames (160 ms) of audio")
    frames = torch.stack([_frame(lm.cfg, TEXT_PAD, c) for c in codes.cpu()], dim=1)  # [K, M]
    columns = lm.frames_to_columns(frames[None].to(lm.device))[:, :, :-1]  # [1, K, M-1]
    embeddings = lm.embed_columns(columns)[0]  # [M-1, D]
    lm.reset(slot)
    lm.prefill_frames(slot, frames=frames)
    cache = lm.tokens.cache[slot].clone()
    lm.reset(slot)
    return VoiceEmbeddings(embeddings=embeddings.float().cpu(), cache=cache.cpu())
