"""PersonaPlex LM: temporal transformer + depth transformer over 17 token streams, for many slots.

Streams: 0 text, 1..8 agent audio codebooks, 9..16 user audio codebooks; per-stream delays
`cfg.delays`. This file holds the weights and the forward passes. The per-slot streaming state
lives in its own modules: a `KVRing` per temporal layer (`streaming.py`: the reference's ring
attention, one rule for step and prefill), the token ring and the sampling parameters
(`lm_state.py`: the reference `LMGen` semantics). All of it is preallocated for `max_slots` rows
and every per-slot op runs on all rows at once with fixed shapes; an `active` mask decides which
rows advance, the others keep every state tensor bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from app.worker.model import sampling
from app.worker.model.lm_state import SamplingParams, SlotState, TokenRing
from app.worker.model.rope import Tables, rope_tables, rotate
from app.worker.model.streaming import (
    KVRing,
    SlotsArg,
    check_slot,
    first_visible,
    materialise_buffers,
    reset_stateful,
    slot_mask,
)

DELAYS: tuple[int, ...] = (0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1)
AGENT_CODEBOOKS = 8
ZERO_TOKEN = -1  # reference zero_token_id: embeds to a zero vector; as a given token: "not given"


def gating_hidden(dim: int, dim_feedforward: int) -> int:
    """Hidden width of the official SiLU gating FFN for a given `dim_feedforward`."""
    if dim_feedforward == 4 * dim:
        return (21 * dim) // 8
    return (2 * dim_feedforward) // 3


@dataclass(frozen=True)
class LMConfig:
    """PersonaPlex LM hyper-parameters (official loaders `_lm_kwargs` with dep_q=16)."""

    dim: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    dim_feedforward: int = 16896  # int(4.125 * 4096)
    context: int = 3000
    max_period: float = 10000.0
    text_card: int = 32000
    text_padding_id: Optional[int] = 3  # official existing_text_padding_id (None: extra output)
    card: int = 2048
    n_q: int = 16
    dep_q: int = 16
    delays: tuple[int, ...] = DELAYS
    depformer_dim: int = 1024
    depformer_num_layers: int = 6
    depformer_num_heads: int = 16
    depformer_dim_feedforward: int = 4224  # int(4.125 * 1024)
    norm_eps: float = 1e-8  # official rms_norm_f32
    default_temperature_text: float = 0.7
    default_temperature_audio: float = 0.8
    default_top_k_text: int = 25
    default_top_k_audio: int = 250

    def __post_init__(self) -> None:
        if len(self.delays) != self.n_q + 1:
            raise ValueError(f"need {self.n_q + 1} delays, got {len(self.delays)}")
        if min(self.delays) < 0:
            raise ValueError("delays must be >= 0")
        if self.dim % self.num_heads or self.depformer_dim % self.depformer_num_heads:
            raise ValueError("model dims must be divisible by their head counts")
        if not 1 <= self.dep_q <= self.n_q:
            raise ValueError(f"dep_q must be in [1, n_q], got {self.dep_q}")
        if self.n_q < 2 * AGENT_CODEBOOKS:
            raise ValueError(f"n_q must be >= {2 * AGENT_CODEBOOKS}")

    @classmethod
    def personaplex_7b(cls) -> "LMConfig":
        return cls()

    @classmethod
    def tiny(cls) -> "LMConfig":
        """Same streams, delays, cards and structure; small widths for tests."""
        return cls(
            dim=64,
            num_layers=2,
            num_heads=4,
            dim_feedforward=int(4.125 * 64),
            context=32,
            text_card=128,
            depformer_dim=32,
            depformer_num_layers=2,
            depformer_num_heads=2,
            depformer_dim_feedforward=int(4.125 * 32),
        )

    @property
    def num_streams(self) -> int:
        return self.n_q + 1

    @property
    def max_delay(self) -> int:
        return max(self.delays)

    @property
    def cache_len(self) -> int:
        return self.max_delay + 3

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def depformer_head_dim(self) -> int:
        return self.depformer_dim // self.depformer_num_heads

    @property
    def ffn_hidden(self) -> int:
        return gating_hidden(self.dim, self.dim_feedforward)

    @property
    def depformer_ffn_hidden(self) -> int:
        return gating_hidden(self.depformer_dim, self.depformer_dim_feedforward)

    @property
    def text_vocab(self) -> int:
        """Text head output size."""
        return self.text_card + (1 if self.text_padding_id is None else 0)

    @property
    def text_initial_id(self) -> int:
        return self.text_card

    @property
    def audio_initial_id(self) -> int:
        return self.card

    @property
    def text_pad_id(self) -> int:
        return self.text_card if self.text_padding_id is None else self.text_padding_id

    @property
    def initial_tokens(self) -> tuple[int, ...]:
        """Initial token per stream (text card for text, audio card for audio)."""
        return (self.text_initial_id,) + (self.audio_initial_id,) * self.n_q

    @property
    def agent_codebooks(self) -> int:
        return AGENT_CODEBOOKS


class RMSNorm(nn.Module):
    """Official RMSNorm: float32 statistics, eps inside the rsqrt, learnt `alpha` scale.

    One `F.rms_norm` call: for bf16/fp16 inputs it computes in float32 inside (one fused kernel on a
    GPU instead of the official formula's nine small ones plus casts). The float32 products come as
    (x * rsqrt(var)) * alpha where the official code has x * (alpha * rsqrt(var)): at most a rounding
    step apart (bit-exact in bf16 on the CPU tests, a step in a few fp16 elements).
    """

    def __init__(self, dim: int, eps: float, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == self.weight.dtype:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def embed(weight: Tensor, tokens: Tensor) -> Tensor:
    """Official ScaledEmbedding lookup: -1 gives a zero vector, other negatives clamp to 0."""
    out = F.embedding(tokens.clamp(min=0), weight)
    return torch.where((tokens == ZERO_TOKEN)[..., None], torch.zeros((), dtype=out.dtype, device=out.device), out)


def embed_stacked(weight: Tensor, tokens: Tensor) -> Tensor:
    """Per-stream lookup in stacked tables. weight [K, V, D], tokens [..., K] -> [..., K, D]."""
    k_idx = torch.arange(weight.shape[0], device=tokens.device).expand_as(tokens)
    out = weight[k_idx, tokens.clamp(min=0)]
    return torch.where((tokens == ZERO_TOKEN)[..., None], torch.zeros((), dtype=out.dtype, device=out.device), out)


def multi_linear(x: Tensor, weight: Tensor) -> Tensor:
    """One linear per step: x [N, T, in], weight [T, out, in] -> [N, T, out]."""
    return torch.einsum("nti,toi->nto", x, weight)


class TemporalBlock(nn.Module):
    """Pre-norm attention + SiLU gating FFN, no biases."""

    def __init__(self, cfg: LMConfig, device=None, dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        d, h = cfg.dim, cfg.ffn_hidden
        self.num_heads = cfg.num_heads
        self.attn_norm = RMSNorm(d, cfg.norm_eps, **kw)
        self.attn_in = nn.Linear(d, 3 * d, bias=False, **kw)
        self.attn_out = nn.Linear(d, d, bias=False, **kw)
        self.ffn_norm = RMSNorm(d, cfg.norm_eps, **kw)
        self.ffn_in = nn.Linear(d, 2 * h, bias=False, **kw)
        self.ffn_out = nn.Linear(h, d, bias=False, **kw)

    def qkv(self, x: Tensor, rope: Tables) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, T, D], rope tables of its positions -> q, k, v [B, H, T, Dh] (q, k rotated)."""
        b, t, _ = x.shape
        qkv = self.attn_in(self.attn_norm(x)).view(b, t, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = rotate(qkv[:2], rope)  # [2, B, H, T, Dh]: q and k in one go
        return q, k, qkv[2]

    def finish(self, x: Tensor, att: Tensor) -> Tensor:
        """Residual after attention (att [B, H, T, Dh]) then the FFN block."""
        b, _, t, _ = att.shape
        x = x + self.attn_out(att.transpose(1, 2).reshape(b, t, -1))
        a, g = self.ffn_in(self.ffn_norm(x)).chunk(2, dim=-1)
        return x + self.ffn_out(F.silu(a) * g)


class DepformerBlock(nn.Module):
    """Depformer layer with separate weights per step (multi-linear attention and FFN)."""

    def __init__(self, cfg: LMConfig, steps: int, device=None, dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        d, h = cfg.depformer_dim, cfg.depformer_ffn_hidden
        self.num_heads = cfg.depformer_num_heads
        self.ring = cfg.dep_q  # the reference's depformer ring has one cell per checkpoint step
        self.attn_norm = RMSNorm(d, cfg.norm_eps, **kw)
        self.attn_in = nn.Parameter(torch.empty(steps, 3 * d, d, **kw))
        self.attn_out = nn.Parameter(torch.empty(steps, d, d, **kw))
        self.ffn_norm = RMSNorm(d, cfg.norm_eps, **kw)
        self.ffn_in = nn.Parameter(torch.empty(steps, 2 * h, d, **kw))
        self.ffn_out = nn.Parameter(torch.empty(steps, d, h, **kw))

    def forward(self, x: Tensor, k: int, kv: tuple[Tensor, Tensor]) -> Tensor:
        """Step k of one frame: x [N, 1, Dd]; kv ([N, Hd, P, Dh] buffers) receive this step's key
        and value at index k, and it attends to the steps the reference's ring shows it."""
        n = x.shape[0]
        step = slice(k, k + 1)
        qkv = multi_linear(self.attn_norm(x), self.attn_in[step]).view(n, 1, 3, self.num_heads, -1)
        q, key, value = qkv.permute(2, 0, 3, 1, 4)  # each [N, Hd, 1, Dh]
        kbuf, vbuf = kv
        kbuf[:, :, k] = key[:, :, 0]
        vbuf[:, :, k] = value[:, :, 0]
        lo = first_visible(k + 1, self.ring)
        att = F.scaled_dot_product_attention(q, kbuf[:, :, lo : k + 1], vbuf[:, :, lo : k + 1])
        x = x + multi_linear(att.transpose(1, 2).reshape(n, 1, -1), self.attn_out[step])
        a, g = multi_linear(self.ffn_norm(x), self.ffn_in[step]).chunk(2, dim=-1)
        return x + multi_linear(F.silu(a) * g, self.ffn_out[step])


class Depformer(nn.Module):
    """Depth transformer predicting audio codebooks 0..P-1 of one frame from the temporal output."""

    def __init__(self, cfg: LMConfig, steps: int, device=None, dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        dd = cfg.depformer_dim
        self.steps = steps
        self.in_proj = nn.Parameter(torch.empty(steps, dd, cfg.dim, **kw))  # [P, Dd, D]
        self.text_emb = nn.Embedding(cfg.text_card + 1, dd, **kw)
        self.audio_emb = nn.Parameter(torch.empty(steps - 1, cfg.card + 1, dd, **kw))  # [P-1, card+1, Dd]
        self.layers = nn.ModuleList([DepformerBlock(cfg, steps, **kw) for _ in range(cfg.depformer_num_layers)])
        self.heads = nn.Parameter(torch.empty(steps, cfg.card, dd, **kw))  # [P, card, Dd]

    def step(self, k: int, out: Tensor, prev: Tensor, kv: list[tuple[Tensor, Tensor]]) -> Tensor:
        """Logits of step k. out [S, D], prev [S] long (previous token), kv per layer -> [S, card]."""
        if k == 0:
            tok = embed(self.text_emb.weight, prev)
        else:
            tok = embed(self.audio_emb[k - 1], prev)
        x = (F.linear(out, self.in_proj[k]) + tok)[:, None]  # [S, 1, Dd]
        for layer, layer_kv in zip(self.layers, kv):
            x = layer(x, k, layer_kv)
        return F.linear(x[:, 0], self.heads[k]).float()


@dataclass
class StepOutput:
    """Result of one `PersonaPlexLM.step` for all slots."""

    text: Tensor  # [S] long, text token of the output frame (-1 where not valid)
    audio: Tensor  # [S, 8] long, agent codebooks of the output frame, undelayed (-1 where not valid)
    valid: Tensor  # [S] bool, False for inactive rows and while offset <= max_delay
    text_logits: Optional[Tensor] = None  # [S, Vt] float32, logits for the text at this step's offset
    audio_logits: Optional[Tensor] = None  # [S, P, card] float32, depformer logits of this step


class PersonaPlexLM(nn.Module):
    """PersonaPlex LM with static per-slot generation state for `max_slots` concurrent calls.

    depformer_steps: depformer steps held and run (8 = agent codebooks only, 16 = all). Skipping
    the user steps gives the same agent logits because the depformer is causal over steps.
    """

    def __init__(
        self,
        cfg: LMConfig,
        max_slots: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        kv_dtype: Optional[torch.dtype] = None,
        depformer_steps: int = AGENT_CODEBOOKS,
    ) -> None:
        super().__init__()
        if max_slots < 1:
            raise ValueError(f"max_slots must be >= 1, got {max_slots}")
        if not AGENT_CODEBOOKS <= depformer_steps <= cfg.dep_q:
            raise ValueError(f"depformer_steps must be in [{AGENT_CODEBOOKS}, {cfg.dep_q}], got {depformer_steps}")
        kw = {"device": device, "dtype": dtype}
        self.cfg = cfg
        self.max_slots = max_slots
        self.depformer_steps = depformer_steps
        self.dtype = dtype
        self.kv_dtype = kv_dtype or dtype

        self.text_emb = nn.Embedding(cfg.text_card + 1, cfg.dim, **kw)
        self.audio_emb = nn.Parameter(torch.empty(cfg.n_q, cfg.card + 1, cfg.dim, **kw))  # [16, card+1, D]
        self.layers = nn.ModuleList([TemporalBlock(cfg, **kw) for _ in range(cfg.num_layers)])
        self.out_norm = RMSNorm(cfg.dim, cfg.norm_eps, **kw)
        self.text_head = nn.Linear(cfg.dim, cfg.text_vocab, bias=False, **kw)
        self.depformer = Depformer(cfg, depformer_steps, **kw)
        self.init_weights()

        # Per-slot state: one KV ring per layer ([2, S, H, C, Dh] each), tokens, sampling.
        self.rings = nn.ModuleList(
            KVRing(max_slots, cfg.num_heads, cfg.context, cfg.head_dim, device=device, dtype=self.kv_dtype)
            for _ in range(cfg.num_layers)
        )
        self.tokens = TokenRing(cfg, max_slots, device=device)
        self.sampling = SamplingParams(cfg, max_slots, device=device)
        self.init_state()

    @property
    def device(self) -> torch.device:
        return self.tokens.offset.device

    def sharing_weights(self, max_slots: int) -> "PersonaPlexLM":
        """Another LM over these very weights (no copy) with per-slot state of its own for
        `max_slots` calls: a scratch slot to rebuild a call's context while the call goes on."""
        with torch.device("meta"):
            other = PersonaPlexLM(
                self.cfg, max_slots, dtype=self.dtype, kv_dtype=self.kv_dtype, depformer_steps=self.depformer_steps
            )
        own = dict(self.named_modules())
        for name, module in other.named_modules():  # the very Parameter objects: no copy, no new tensor
            for pname, param in own[name].named_parameters(recurse=False):
                setattr(module, pname, param)
        materialise_buffers(other, self.device)
        other.init_state()
        return other.eval()

    @torch.no_grad()
    def init_state(self) -> None:
        """(Re)fill every buffer: constants, all slots reset, KV zeroed (e.g. after `to_empty`)."""
        self.tokens.init_constants()
        self.sampling.init_constants()
        self.reset(torch.ones(self.max_slots, dtype=torch.bool, device=self.device))

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Random init (normal(0, std) weights, unit norms) from torch's default generator."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)

    # ----------------------------------------------------------------------------------- slots
    @torch.no_grad()
    def reset(self, slots: SlotsArg) -> None:
        """Clear the selected rows: offset 0, empty token ring, zeroed KV rows, default sampling,
        fresh random seed."""
        reset_stateful(self, slot_mask(slots, self.max_slots, self.device))

    @torch.no_grad()
    def set_sampling(
        self,
        slots: SlotsArg,
        temperature_text: Optional[float | Tensor] = None,
        temperature_audio: Optional[float | Tensor] = None,
        top_k_text: Optional[int | Tensor] = None,
        top_k_audio: Optional[int | Tensor] = None,
        seed: Optional[int | Tensor] = None,
    ) -> None:
        """Set sampling parameters of the selected rows (a scalar or a [S] tensor each; None keeps).

        temperature <= 0 means greedy; top_k <= 0 means no top-k filter.
        """
        self.sampling.set(
            slot_mask(slots, self.max_slots, self.device),
            temp_text=temperature_text,
            temp_audio=temperature_audio,
            top_k_text=top_k_text,
            top_k_audio=top_k_audio,
            seed=seed,
        )

    def replay_frame(self) -> Tensor:
        """[17] long: the tokens reference `step_embeddings` gives (text PAD, initial audio tokens)."""
        frame = self.tokens.initial.clone()
        frame[0] = self.cfg.text_pad_id
        return frame

    # ------------------------------------------------------------------------------ embeddings
    def embed_columns(self, columns: Tensor) -> Tensor:
        """Reference embed_codes. columns [B, 17, T] long -> [B, T, D] (model dtype)."""
        if columns.dim() != 3 or columns.shape[1] != self.cfg.num_streams:
            raise ValueError(f"columns must be [B, {self.cfg.num_streams}, T], got {tuple(columns.shape)}")
        tok = columns.transpose(1, 2)  # [B, T, 17]
        audio = embed_stacked(self.audio_emb, tok[..., 1:]).float().sum(dim=-2)  # [B, T, D]
        text = embed(self.text_emb.weight, tok[..., 0]).float()
        return (audio + text).to(self.dtype)

    def frames_to_columns(self, frames: Tensor) -> Tensor:
        """Transformer input columns seen when `frames` are stepped from offset 0, all given.

        frames [B, 17, N] (undelayed) -> columns [B, 17, N]: column 0 is the initial tokens, column
        t >= 1 holds frames[t - delay_k] for stream k, or the initial token when t - delay_k < 1
        (frame 0 is consumed by the offset-0 initialisation, as in the reference LMGen).
        """
        b, k, n = frames.shape
        if k != self.cfg.num_streams:
            raise ValueError(f"frames must be [B, {self.cfg.num_streams}, N], got {tuple(frames.shape)}")
        t = torch.arange(n, device=frames.device)
        delays = self.tokens.delays.to(frames.device)
        src = t[None, :] - delays[:, None]  # [17, N]
        gathered = frames.gather(2, src.clamp(min=0)[None].expand(b, -1, -1))
        init = self.tokens.initial.to(frames.device)[None, :, None].expand(b, -1, n)
        return torch.where((src >= 1)[None], gathered, init)

    # --------------------------------------------------------------------------- streaming step
    def _temporal_step(self, x: Tensor, pos: Tensor, run: Tensor) -> Tensor:
        """One position per row. x [S, D], pos [S] (KV position), run [S] -> out_norm output [S, D]."""
        h = x[:, None, :]  # [S, 1, D]
        rope = rope_tables(pos[:, None], self.cfg.head_dim, self.cfg.max_period)  # once for all layers
        mask = self.rings[0].mask(pos[:, None])  # [S, 1, 1, C], the same for all layers
        for layer, ring in zip(self.layers, self.rings):
            q, k, v = layer.qkv(h, rope)  # [S, H, 1, Dh]
            h = layer.finish(h, ring.attend(q, k, v, pos[:, None], run, mask))
        return self.out_norm(h)[:, 0]

    @torch.no_grad()
    def step(
        self,
        frame: Tensor,
        active: Tensor,
        embeddings: Optional[Tensor] = None,
        use_embeddings: Optional[Tensor] = None,
        return_logits: bool = False,
    ) -> StepOutput:
        """Advance the active rows by one frame.

        frame [S, 17] long: tokens given for the current frame, undelayed; -1 = not given (text
        and agent: sample; user streams must be given). active [S] bool. use_embeddings [S] bool
        rows feed embeddings [S, D] to the transformer instead of embedding their input column
        (reference step_embeddings; give them `replay_frame()`); such a row at offset 0 initialises
        and steps in the same call, as in the reference. Other rows at offset 0 only initialise.
        """
        cfg, s = self.cfg, self.max_slots
        ns, p = cfg.num_streams, self.depformer_steps
        if frame.shape != (s, ns):
            raise ValueError(f"frame must be [{s}, {ns}], got {tuple(frame.shape)}")
        if active.shape != (s,):
            raise ValueError(f"active must be [{s}], got {tuple(active.shape)}")
        dev, tokens, params = self.device, self.tokens, self.sampling
        frame = frame.to(dev, torch.long)
        active = active.to(dev, torch.bool)
        if use_embeddings is None:
            emb_rows = torch.zeros_like(active)
        else:
            if embeddings is None or embeddings.shape != (s, cfg.dim):
                raise ValueError(f"use_embeddings needs embeddings [{s}, {cfg.dim}]")
            emb_rows = use_embeddings.to(dev, torch.bool) & active

        o0 = tokens.offset.clone()
        tokens.write_given(frame, active)
        init = active & (o0 == 0)
        tokens.offset.add_(init.long())
        tokens.write_given(frame, init & emb_rows)  # reference step_embeddings loops after the init
        run = active & ((o0 > 0) | emb_rows)
        o = tokens.offset.clone()  # >= 1 on run rows
        col_in, target, prov = tokens.read()  # [S, 17] each

        x = self.embed_columns(col_in[:, :, None])[:, 0]  # [S, D]
        if embeddings is not None and use_embeddings is not None:
            x = torch.where(emb_rows[:, None], embeddings.to(dev, self.dtype), x)
        out = self._temporal_step(x, (o - 1).clamp(min=0), run)  # [S, D]

        text_logits = self.text_head(out).float()  # [S, Vt]
        key = sampling.step_key(params.seed_key, o)  # [S]: this step's RNG key of each row, for every stream
        if params.text_width is not None:
            sampled_text = sampling.sample_candidates(
                text_logits, params.temp_text, params.top_k_text, sampling.stream_key(key, 0),
                params.text_token_hash, params.text_width,
            )
        else:
            text_noise = sampling.gumbel_from_keys(sampling.stream_key(key, 0), params.text_token_hash)  # [S, Vt]
            sampled_text = sampling.sample(
                text_logits, params.temp_text, params.top_k_text, params.seed, o, 0, noise=text_noise
            )
        prev = torch.where(prov[:, 0], target[:, 0], sampled_text)

        hd = cfg.depformer_num_heads
        kv = [
            (out.new_empty(s, hd, p, cfg.depformer_head_dim), out.new_empty(s, hd, p, cfg.depformer_head_dim))
            for _ in self.depformer.layers
        ]  # the depformer's ring, fresh for every frame as in the reference
        audio_tokens, audio_logits = [], []
        steps = torch.arange(1, p + 1, device=dev)  # the depformer steps' sampling streams
        dep_keys = sampling.stream_key(key[:, None], steps)  # [S, P]
        width = params.audio_width
        noise = None if width is not None else sampling.gumbel_from_keys(dep_keys, params.audio_token_hash)
        for k in range(p):
            logits = self.depformer.step(k, out, prev, kv)  # [S, card]
            if width is not None:
                tok = sampling.sample_candidates(
                    logits, params.temp_audio, params.top_k_audio, dep_keys[:, k], params.audio_token_hash, width
                )
            else:  # noise [S, P, card], made in one go
                tok = sampling.sample(
                    logits, params.temp_audio, params.top_k_audio, params.seed, o, 1 + k, noise=noise[:, k]
                )
            prev = torch.where(prov[:, 1 + k], target[:, 1 + k], tok)
            audio_tokens.append(tok)
            if return_logits:
                audio_logits.append(logits)

        sampled = torch.cat(
            [sampled_text[:, None], torch.stack(audio_tokens, dim=1), torch.full_like(target[:, 1 + p :], ZERO_TOKEN)],
            dim=1,
        )  # [S, 17]; user streams without a depformer step become zero-embedding tokens
        gathered, valid = tokens.commit(torch.where(prov, target, sampled), run)  # [S, 9], [S]
        return StepOutput(
            text=gathered[:, 0],
            audio=gathered[:, 1:],
            valid=valid,
            text_logits=text_logits if return_logits else None,
            audio_logits=torch.stack(audio_logits, dim=1) if return_logits else None,
        )

    # ---------------------------------------------------------------------------------- prefill
    def _prefill_transformer(self, slot: int, x: Tensor, p0: int) -> None:
        """KV positions p0..p0+T-1 of one slot in one causal forward, each position seeing exactly
        what stepping it would (the ring rule with end = its position + 1); x [T, D]."""
        t = x.shape[0]
        qpos = p0 + torch.arange(t, device=x.device)  # [T]
        h = x[None]  # [1, T, D]
        rope = rope_tables(qpos[None], self.cfg.head_dim, self.cfg.max_period)
        for layer, ring in zip(self.layers, self.rings):
            q, k, v = layer.qkv(h, rope)  # [1, H, T, Dh]
            h = layer.finish(h, ring.attend_stepwise(slot, q, k, v, p0))

    @torch.no_grad()
    def prefill(self, slot: int, inputs: Tensor, start: int = 0) -> None:
        """Parallel causal forward of T input positions for one slot, writing its KV positions
        start..start+T-1 (attending to the slot's KV positions before `start` as stepping would).

        inputs: input columns [17, T] long (delayed) or input embeddings [T, D]. Offset, token ring
        and provided flags are left alone: set them with `set_token_state` (KV positions written
        must equal offset - 1), or use `prefill_frames`.
        """
        slot = check_slot(slot, self.max_slots)
        cfg = self.cfg
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        if inputs.dtype in (torch.long, torch.int32, torch.int64):
            if inputs.dim() != 2 or inputs.shape[0] != cfg.num_streams:
                raise ValueError(f"columns must be [{cfg.num_streams}, T], got {tuple(inputs.shape)}")
            x = self.embed_columns(inputs.to(self.device, torch.long)[None])[0]
        else:
            if inputs.dim() != 2 or inputs.shape[1] != cfg.dim:
                raise ValueError(f"embeddings must be [T, {cfg.dim}], got {tuple(inputs.shape)}")
            x = inputs.to(self.device, self.dtype)
        if x.shape[0] > 0:
            self._prefill_transformer(slot, x, start)

    @torch.no_grad()
    def set_token_state(
        self,
        slot: int,
        offset: Optional[int] = None,
        cache: Optional[Tensor] = None,
        provided: Optional[Tensor] = None,
    ) -> None:
        """Overwrite one slot's offset, token ring [17, CT] and/or provided flags [17, CT]."""
        self.tokens.set_slot(check_slot(slot, self.max_slots), offset, cache, provided)

    @torch.no_grad()
    def prefill_frames(self, slot: int, frames: Optional[Tensor] = None, embeddings: Optional[Tensor] = None) -> None:
        """Run N given frames for one slot in one parallel forward.

        Same resulting state (offset, token ring, provided flags, KV) as N calls of `step` with
        those frames for this slot, from its current state. frames [17, N] long; every token a
        step of them reads must be given (>= 0): only the last frame's delayed agent codes may be
        -1, as in a call's frame in progress. embeddings [N, D]: replay stored input embeddings
        instead (reference step_embeddings); frames then default to `replay_frame()` repeated.
        """
        slot = check_slot(slot, self.max_slots)
        cfg = self.cfg
        ns = cfg.num_streams
        if frames is None and embeddings is None:
            raise ValueError("prefill needs frames or embeddings")
        if embeddings is not None:
            if embeddings.dim() != 2 or embeddings.shape[1] != cfg.dim:
                raise ValueError(f"embeddings must be [N, {cfg.dim}], got {tuple(embeddings.shape)}")
            if frames is None:
                frames = self.replay_frame()[:, None].expand(ns, embeddings.shape[0])
        if frames.dim() != 2 or frames.shape[0] != ns:
            raise ValueError(f"frames must be [{ns}, N], got {tuple(frames.shape)}")
        if embeddings is not None and embeddings.shape[0] != frames.shape[1]:
            raise ValueError(f"embeddings hold {embeddings.shape[0]} frames, frames hold {frames.shape[1]}")
        fr = frames.detach().to("cpu", torch.long)
        columns, steps, p0 = self.tokens.plan_frames(slot, fr, replay=embeddings is not None)
        if columns:
            dev = self.device
            if embeddings is not None:
                x = embeddings.to(dev, self.dtype)[torch.tensor(steps, device=dev)]
            else:
                x = self.embed_columns(torch.stack(columns, dim=1)[None].to(dev))[0]
            self._prefill_transformer(slot, x, p0)

    # --------------------------------------------------------------------------- export/import
    @torch.no_grad()
    def export_slot(self, slot: int) -> SlotState:
        """Copy of one slot's state, KV trimmed to the positions written (time order)."""
        slot = check_slot(slot, self.max_slots)
        written = int(self.tokens.offset[slot]) - 1
        return SlotState(
            offset=self.tokens.offset[slot].clone(),
            cache=self.tokens.cache[slot].clone(),
            provided=self.tokens.provided[slot].clone(),
            kv=torch.stack([ring.export(slot, written) for ring in self.rings]),  # [L, 2, H, n, Dh]
        )

    @torch.no_grad()
    def import_slot(self, slot: int, state: SlotState) -> None:
        """Load a SlotState into one slot (sampling parameters untouched)."""
        slot = check_slot(slot, self.max_slots)
        problems = state.problems(self.cfg)
        if problems:
            raise ValueError(f"SlotState does not fit this LM: {'; '.join(problems)}")
        off = int(state.offset)
        self.tokens.set_slot(slot, off, state.cache, state.provided)
        for ring, kv in zip(self.rings, state.kv):
            ring.load(slot, off - 1, kv)
