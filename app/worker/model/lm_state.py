"""The LM's per-slot generation state besides the KV rings: token ring and sampling parameters.

Token ring semantics follow the reference `LMGen` exactly (ring of `CT = max_delay + 3` columns):
  * given tokens of the frame at offset `o` are written at `(o + delay_k) % CT` and marked provided;
  * while `o <= delay_k`, position `o % CT` of stream k holds the initial token (provided);
  * a row at offset 0 only initialises (no transformer call) and moves to offset 1;
  * otherwise the transformer input is column `(o - 1) % CT` (KV position `o - 1`) and the target
    column `o % CT` forces the depformer where provided; sampled tokens fill the rest;
  * the output frame is gathered at `o - max_delay + delay_k` once `o > max_delay`.

`TokenRing` holds offsets, ring and provided flags of every slot and does these reads and writes on
all rows at once (the step) or on one slot on the host (planning a prefill of given frames);
`SamplingParams` holds each row's temperature, top-k and seed. `SlotState` is one slot's exported
state (what the persona cache stores and a join imports), with its shape checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

from app.worker.model import sampling
from app.worker.model.streaming import SlotStateful

if TYPE_CHECKING:
    from app.worker.model.lm import LMConfig

UNGENERATED = -2  # reference ungenerated_token_id: ring cells not written yet


@dataclass
class SlotState:
    """Snapshot of one slot: offset, token ring and the KV positions actually written."""

    offset: Tensor  # [] long
    cache: Tensor  # [17, CT] long
    provided: Tensor  # [17, CT] bool
    kv: Tensor  # [L, 2, H, n, Dh]: the last n = min(offset - 1, context) KV positions, oldest first

    @property
    def num_positions(self) -> int:
        return int(self.kv.shape[3])

    def to(self, device: torch.device | str) -> "SlotState":
        return SlotState(
            offset=self.offset.to(device),
            cache=self.cache.to(device),
            provided=self.provided.to(device),
            kv=self.kv.to(device),
        )

    def problems(self, cfg: "LMConfig", kv_dtype: Optional[torch.dtype] = None) -> list[str]:
        """What keeps this state from fitting an LM of `cfg` (KV in `kv_dtype` if given); [] = fits."""
        ring = (cfg.num_streams, cfg.cache_len)
        if self.offset.dim() != 0 or self.offset.dtype != torch.long:
            return [f"offset must be a 0-d long tensor, got {self.offset.dtype} {tuple(self.offset.shape)}"]
        offset = int(self.offset)
        n = min(max(offset - 1, 0), cfg.context)
        want_kv = (cfg.num_layers, 2, cfg.num_heads, n, cfg.head_dim)
        found = []
        if offset < 0:
            found.append(f"offset {offset} < 0")
        if tuple(self.cache.shape) != ring or self.cache.dtype != torch.long:
            found.append(f"cache {self.cache.dtype} {tuple(self.cache.shape)}, want long {ring}")
        if tuple(self.provided.shape) != ring or self.provided.dtype != torch.bool:
            found.append(f"provided {self.provided.dtype} {tuple(self.provided.shape)}, want bool {ring}")
        kv_ok = tuple(self.kv.shape) == want_kv and (kv_dtype is None or self.kv.dtype == kv_dtype)
        if not kv_ok:
            want = f"{kv_dtype} {want_kv}" if kv_dtype is not None else str(want_kv)
            found.append(f"kv {self.kv.dtype} {tuple(self.kv.shape)} for offset {offset}, want {want}")
        return found


def ring_write(buf: Tensor, pos: Tensor, value: Tensor, mask: Tensor) -> None:
    """buf[s, k, pos[s, k]] = value[s, k] where mask[s, k]; other cells untouched. buf [S, K, CT]."""
    idx = pos[..., None]
    cur = buf.gather(2, idx)[..., 0]
    buf.scatter_(2, idx, torch.where(mask, value.to(buf.dtype), cur)[..., None])


class TokenRing(SlotStateful):
    """Offsets [S], token ring [S, 17, CT] and provided flags [S, 17, CT] of every slot."""

    def __init__(self, cfg: "LMConfig", max_slots: int, device=None) -> None:
        super().__init__()
        self.cfg = cfg
        s, k, ct = max_slots, cfg.num_streams, cfg.cache_len
        long = {"dtype": torch.long, "device": device}
        self.register_buffer("delays", torch.empty(k, **long), persistent=False)  # [17]
        self.register_buffer("initial", torch.empty(k, **long), persistent=False)  # [17]
        self.register_buffer("offset", torch.empty(s, **long), persistent=False)  # [S]
        self.register_buffer("cache", torch.empty(s, k, ct, **long), persistent=False)  # [S, 17, CT]
        self.register_buffer(
            "provided", torch.empty(s, k, ct, dtype=torch.bool, device=device), persistent=False
        )  # [S, 17, CT]

    def init_constants(self) -> None:
        self.delays.copy_(torch.tensor(self.cfg.delays, dtype=torch.long))
        self.initial.copy_(torch.tensor(self.cfg.initial_tokens, dtype=torch.long))

    def reset_slots(self, mask: Tensor) -> None:
        self.offset.copy_(torch.where(mask, 0, self.offset))
        self.cache.copy_(torch.where(mask[:, None, None], UNGENERATED, self.cache))
        self.provided.copy_(self.provided & ~mask[:, None, None])

    # ------------------------------------------------------------------ the step, all rows at once
    def write_given(self, frame: Tensor, rows: Tensor) -> None:
        """Reference prepare_step_input's ring writes for `rows` [S] at their current offset.

        frame [S, 17] long, undelayed; -1 = not given (nothing written)."""
        ct = self.cfg.cache_len
        o = self.offset[:, None]  # [S, 1]
        d = self.delays[None, :]  # [1, 17]
        wmask = rows[:, None] & (frame >= 0)  # [S, 17]
        wpos = (o + d) % ct
        ring_write(self.cache, wpos, frame, wmask)
        ring_write(self.provided, wpos, torch.ones_like(wmask), wmask)
        imask = rows[:, None] & (o <= d)
        ipos = (o % ct).expand_as(imask)
        ring_write(self.cache, ipos, self.initial[None].expand_as(imask), imask)
        ring_write(self.provided, ipos, torch.ones_like(imask), imask)

    def read(self) -> tuple[Tensor, Tensor, Tensor]:
        """At each row's offset o: input column (o - 1), target column o, its provided flags; [S, 17] each."""
        s, ns, ct = self.offset.shape[0], self.cfg.num_streams, self.cfg.cache_len
        o = self.offset
        in_pos = ((o - 1) % ct)[:, None, None].expand(s, ns, 1)
        tgt_pos = (o % ct)[:, None, None].expand(s, ns, 1)
        column = self.cache.gather(2, in_pos)[..., 0]
        target = self.cache.gather(2, tgt_pos)[..., 0]
        provided = self.provided.gather(2, tgt_pos)[..., 0]
        return column, target, provided

    def commit(self, tokens: Tensor, run: Tensor) -> tuple[Tensor, Tensor]:
        """Close the step of rows `run`: write `tokens` [S, 17] at the target column, clear the input
        column's provided flags, gather the output frame and advance the offsets.

        Returns the output frame's text and agent tokens [S, 9] (-1 where not valid) and valid [S]."""
        cfg = self.cfg
        s, ns, ct = self.offset.shape[0], cfg.num_streams, cfg.cache_len
        o = self.offset
        run_k = run[:, None].expand(s, ns)
        ring_write(self.cache, (o % ct)[:, None].expand(s, ns), tokens, run_k)
        ring_write(self.provided, ((o - 1) % ct)[:, None].expand(s, ns), torch.zeros_like(run_k), run_k)
        valid = run & (o > cfg.max_delay)
        n_out = 1 + cfg.agent_codebooks
        out_pos = (o[:, None] - cfg.max_delay + self.delays[None, :n_out]) % ct  # [S, 9]
        gathered = self.cache[:, :n_out].gather(2, out_pos[..., None])[..., 0]
        self.offset.add_(run.long())
        return torch.where(valid[:, None], gathered, -1), valid

    # ------------------------------------------------------------- one slot, planned on the host
    def plan_frames(self, slot: int, frames: Tensor, replay: bool) -> tuple[list[Tensor], list[int], int]:
        """Step given frames [17, N] of one slot on the host, as `step` would, and keep the result.

        A token may be -1 (not given) only where no step of these frames needs it: the delayed
        codes of the last frame, which the next `step` samples (a call's frame in progress).
        replay: the frames' transformer inputs are replayed embeddings (reference step_embeddings,
        which also steps the transformer at offset 0). Returns the transformer input columns [17]
        of the steps that run the transformer, the frame index of each and the KV position of the
        first (-1 if none). Raises ValueError if a step would need to sample.
        """
        ct = self.cfg.cache_len
        delays = [int(d) for d in self.cfg.delays]
        initial = self.initial.cpu()
        off = int(self.offset[slot])
        cache = self.cache[slot].cpu().clone()  # [17, CT]
        prov = self.provided[slot].cpu().clone()

        def write(o: int, col: Tensor) -> None:
            for k, d in enumerate(delays):
                if int(col[k]) >= 0:
                    cache[k, (o + d) % ct] = col[k]
                    prov[k, (o + d) % ct] = True
            for k, d in enumerate(delays):
                if o <= d:
                    cache[k, o % ct] = initial[k]
                    prov[k, o % ct] = True

        columns: list[Tensor] = []
        steps: list[int] = []
        p0 = -1
        for i in range(frames.shape[1]):
            write(off, frames[:, i])
            if off == 0:
                off = 1
                if not replay:
                    continue
                write(off, frames[:, i])
            missing = (~prov[:, off % ct]).nonzero()[:, 0].tolist()
            if missing:
                raise ValueError(
                    f"prefill of frame {i} (offset {off}): streams {missing} not given; nothing is sampled in a prefill"
                )
            if p0 < 0:
                p0 = off - 1
            columns.append(cache[:, (off - 1) % ct].clone())
            steps.append(i)
            prov[:, (off - 1) % ct] = False
            off += 1
        self.offset[slot] = off
        self.cache[slot] = cache.to(self.cache.device)
        self.provided[slot] = prov.to(self.provided.device)
        return columns, steps, p0

    def set_slot(
        self, slot: int, offset: Optional[int] = None, cache: Optional[Tensor] = None, provided: Optional[Tensor] = None
    ) -> None:
        """Overwrite one slot's offset, ring [17, CT] and/or provided flags [17, CT]."""
        ring = (self.cfg.num_streams, self.cfg.cache_len)
        if offset is not None:
            if int(offset) < 0:
                raise ValueError(f"offset must be >= 0, got {offset}")
            self.offset[slot] = int(offset)
        if cache is not None:
            if tuple(cache.shape) != ring:
                raise ValueError(f"cache must be {ring}, got {tuple(cache.shape)}")
            self.cache[slot] = cache.to(self.cache.device, torch.long)
        if provided is not None:
            if tuple(provided.shape) != ring:
                raise ValueError(f"provided must be {ring}, got {tuple(provided.shape)}")
            self.provided[slot] = provided.to(self.provided.device, torch.bool)


class SamplingParams(SlotStateful):
    """Per-row temperature, top-k and seed, plus the sampling RNG's constants.

    seed_key follows `seed` (a row's hashed seed); the token-id hashes of the text and audio
    vocabularies are made once, so a step does not hash them again.
    """

    def __init__(self, cfg: "LMConfig", max_slots: int, device=None) -> None:
        super().__init__()
        self.cfg = cfg
        s = max_slots
        long = {"dtype": torch.long, "device": device}
        self.register_buffer("temp_text", torch.empty(s, dtype=torch.float32, device=device), persistent=False)
        self.register_buffer("temp_audio", torch.empty(s, dtype=torch.float32, device=device), persistent=False)
        self.register_buffer("top_k_text", torch.empty(s, **long), persistent=False)
        self.register_buffer("top_k_audio", torch.empty(s, **long), persistent=False)
        self.register_buffer("seed", torch.empty(s, **long), persistent=False)
        self.register_buffer("seed_key", torch.empty(s, **long), persistent=False)
        self.register_buffer("text_token_hash", torch.empty(cfg.text_vocab, **long), persistent=False)
        self.register_buffer("audio_token_hash", torch.empty(cfg.card, **long), persistent=False)
        self.text_width: int | None = None  # static candidate widths (`set_widths`); None: whole vocabulary
        self.audio_width: int | None = None

    def set_widths(self, text: int | None, audio: int | None) -> None:
        """The static candidate widths of text and audio sampling (`sampling.candidate_width`; None:
        the whole vocabulary). Set before the tick is compiled or captured; rows' top-k must fit."""
        for name, width, vocab in (("text", text, self.cfg.text_vocab), ("audio", audio, self.cfg.card)):
            if width is not None and not 1 <= width < vocab:
                raise ValueError(f"{name} sampling width must be in [1, {vocab}), got {width}")
        self.text_width, self.audio_width = text, audio

    def init_constants(self) -> None:
        self.text_token_hash.copy_(sampling.token_hashes(self.cfg.text_vocab, self.seed.device))
        self.audio_token_hash.copy_(sampling.token_hashes(self.cfg.card, self.seed.device))

    def reset_slots(self, mask: Tensor) -> None:
        """Defaults of the config and a fresh random seed (torch's default generator) on `mask` rows."""
        cfg = self.cfg
        self.temp_text.copy_(torch.where(mask, cfg.default_temperature_text, self.temp_text))
        self.temp_audio.copy_(torch.where(mask, cfg.default_temperature_audio, self.temp_audio))
        self.top_k_text.copy_(torch.where(mask, cfg.default_top_k_text, self.top_k_text))
        self.top_k_audio.copy_(torch.where(mask, cfg.default_top_k_audio, self.top_k_audio))
        fresh = torch.randint(0, 2**62, (self.seed.shape[0],), dtype=torch.long).to(self.seed.device)
        self.seed.copy_(torch.where(mask, fresh, self.seed))
        self.seed_key.copy_(sampling.seed_key(self.seed))

    def set(self, mask: Tensor, **values: Optional[float | int | Tensor]) -> None:
        """Set temp_text, temp_audio, top_k_text, top_k_audio and/or seed on `mask` rows (a scalar
        or a [S] tensor each; None keeps the value)."""
        for name, value in values.items():
            if value is None:
                continue
            buf = getattr(self, name)
            v = torch.as_tensor(value, dtype=buf.dtype, device=buf.device)
            if v.dim() != 0 and v.shape != buf.shape:
                raise ValueError(f"sampling value must be a scalar or shape {tuple(buf.shape)}, got {tuple(v.shape)}")
            width = {"top_k_text": self.text_width, "top_k_audio": self.audio_width}.get(name)
            if width is not None:
                chosen = v if v.dim() == 0 else v[mask]
                if bool(((chosen <= 0) | (chosen > width)).any()):  # a host sync: between ticks only
                    raise ValueError(f"{name} must be in [1, {width}] on this worker (its sampling width)")
            buf.copy_(torch.where(mask, v, buf))
        self.seed_key.copy_(sampling.seed_key(self.seed))
