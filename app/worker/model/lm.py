"""PersonaPlex LM: temporal transformer + depth transformer over 17 token streams, with per-slot state.

Streams: 0 text, 1..8 agent audio codebooks, 9..16 user audio codebooks; per-stream delays
`cfg.delays`. All per-call state is preallocated for `max_slots` rows and every per-slot op runs
on all rows at once with fixed shapes; an `active` mask decides which rows advance, the others keep
every state tensor bit for bit.

Token ring semantics follow the official `LMGen` exactly (ring of `CT = max_delay + 3` columns):
  * given tokens of the frame at offset `o` are written at `(o + delay_k) % CT` and marked provided;
  * while `o <= delay_k`, position `o % CT` of stream k holds the initial token (provided);
  * a row at offset 0 only initialises (no transformer call) and moves to offset 1;
  * otherwise the transformer input is column `(o - 1) % CT` (KV position `o - 1`) and the target
    column `o % CT` forces the depformer where provided; sampled tokens fill the rest;
  * the output frame is gathered at `o - max_delay + delay_k` once `o > max_delay`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from app.worker.model import sampling
from app.worker.model.rope import Tables, rope_tables, rotate

DELAYS: tuple[int, ...] = (0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1)
AGENT_CODEBOOKS = 8
SILENCE_TOKENS: tuple[int, ...] = (948, 243, 1178, 546, 1736, 1030, 1978, 2008)
SINE_TOKENS: tuple[int, ...] = (430, 1268, 381, 1611, 1095, 1495, 56, 472)
UNGENERATED = -2  # official ungenerated_token_id: ring cells not written yet
ZERO_TOKEN = -1  # official zero_token_id: embeds to a zero vector; as a given token: "not given"

SlotsArg = Union[Tensor, int, Sequence[int]]


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
    def personaplex(cls) -> "LMConfig":
        return cls.personaplex_7b()

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

    @property
    def token_ring(self) -> int:
        """Alias of `cache_len`: columns of the per-slot token ring."""
        return self.cache_len

    @property
    def ungenerated_token(self) -> int:
        return UNGENERATED

    @property
    def depformer_total_steps(self) -> int:
        """Depformer steps in the checkpoint (agent + user codebooks)."""
        return self.dep_q


@dataclass
class StepOutput:
    """Result of one `PersonaPlexLM.step` for all slots."""

    text: Tensor  # [S] long, text token of the output frame (-1 where not valid)
    audio: Tensor  # [S, 8] long, agent codebooks of the output frame, undelayed (-1 where not valid)
    valid: Tensor  # [S] bool, False for inactive rows and while offset <= max_delay
    text_logits: Optional[Tensor] = None  # [S, Vt] float32, logits for the text at this step's offset
    audio_logits: Optional[Tensor] = None  # [S, P, card] float32, depformer logits of this step


@dataclass
class SlotState:
    """Snapshot of one slot: offset, token ring and the KV positions actually written."""

    offset: Tensor  # [] long
    cache: Tensor  # [17, CT] long
    provided: Tensor  # [17, CT] bool
    kv: Tensor  # [L, 2, H, n, Dh]: the last n KV positions in time order, ending at offset - 2

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
        self.attn_norm = RMSNorm(d, cfg.norm_eps, **kw)
        self.attn_in = nn.Parameter(torch.empty(steps, 3 * d, d, **kw))
        self.attn_out = nn.Parameter(torch.empty(steps, d, d, **kw))
        self.ffn_norm = RMSNorm(d, cfg.norm_eps, **kw)
        self.ffn_in = nn.Parameter(torch.empty(steps, 2 * h, d, **kw))
        self.ffn_out = nn.Parameter(torch.empty(steps, d, h, **kw))

    def forward(self, x: Tensor, k0: int, kv: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
        """x [N, T, Dd] for steps k0..k0+T-1.

        kv None: causal attention within x (needs k0 == 0). kv given ([N, Hd, P, Dh] buffers):
        T must be 1; this step's key/value go to index k0 and it attends to steps 0..k0.
        """
        n, t, _ = x.shape
        steps = slice(k0, k0 + t)
        qkv = multi_linear(self.attn_norm(x), self.attn_in[steps]).view(n, t, 3, self.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [N, Hd, T, Dh]
        if kv is None:
            if k0 != 0:
                raise ValueError("stateless depformer call must start at step 0")
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            if t != 1:
                raise ValueError("cached depformer call takes one step at a time")
            kbuf, vbuf = kv
            kbuf[:, :, k0] = k[:, :, 0]
            vbuf[:, :, k0] = v[:, :, 0]
            att = F.scaled_dot_product_attention(q, kbuf[:, :, : k0 + 1], vbuf[:, :, : k0 + 1])
        x = x + multi_linear(att.transpose(1, 2).reshape(n, t, -1), self.attn_out[steps])
        a, g = multi_linear(self.ffn_norm(x), self.ffn_in[steps]).chunk(2, dim=-1)
        return x + multi_linear(F.silu(a) * g, self.ffn_out[steps])


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

    def forward_train(self, out: Tensor, tokens: Tensor) -> Tensor:
        """Teacher-forced logits. out [N, D], tokens [N, P] (text, codebook 0..P-2) -> [N, P, card]."""
        p = self.steps
        x = torch.einsum("nd,pod->npo", out, self.in_proj)  # [N, P, Dd]
        tok_emb = [embed(self.text_emb.weight, tokens[:, :1])]
        if p > 1:
            tok_emb.append(embed_stacked(self.audio_emb, tokens[:, 1:p]))
        x = x + torch.cat(tok_emb, dim=1)
        for layer in self.layers:
            x = layer(x, 0)
        return multi_linear(x, self.heads).float()

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


def _ring_write(buf: Tensor, pos: Tensor, value: Tensor, mask: Tensor) -> None:
    """buf[s, k, pos[s, k]] = value[s, k] where mask[s, k]; other cells untouched. buf [S, K, CT]."""
    idx = pos[..., None]
    cur = buf.gather(2, idx)[..., 0]
    buf.scatter_(2, idx, torch.where(mask, value.to(buf.dtype), cur)[..., None])


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

        s, k, ct = max_slots, cfg.num_streams, cfg.cache_len
        long = {"dtype": torch.long, "device": device}
        self.register_buffer("delays", torch.empty(k, **long), persistent=False)  # [17]
        self.register_buffer("initial", torch.empty(k, **long), persistent=False)  # [17]
        self.register_buffer("offset", torch.empty(s, **long), persistent=False)  # [S]
        self.register_buffer("cache", torch.empty(s, k, ct, **long), persistent=False)  # [S, 17, CT]
        self.register_buffer(
            "provided", torch.empty(s, k, ct, dtype=torch.bool, device=device), persistent=False
        )  # [S, 17, CT]
        kv_shape = (cfg.num_layers, 2, s, cfg.num_heads, cfg.context, cfg.head_dim)
        self.register_buffer(
            "kv", torch.empty(kv_shape, dtype=self.kv_dtype, device=device), persistent=False
        )  # [L, 2, S, H, C, Dh]
        self.register_buffer("temp_text", torch.empty(s, dtype=torch.float32, device=device), persistent=False)
        self.register_buffer("temp_audio", torch.empty(s, dtype=torch.float32, device=device), persistent=False)
        self.register_buffer("top_k_text", torch.empty(s, **long), persistent=False)
        self.register_buffer("top_k_audio", torch.empty(s, **long), persistent=False)
        self.register_buffer("seed", torch.empty(s, **long), persistent=False)
        # Constants of the sampling RNG, kept so a step does not hash them again: each row's seed
        # key (follows `seed`) and the token-id hashes of the text and audio vocabularies.
        self.register_buffer("seed_key", torch.empty(s, **long), persistent=False)
        self.register_buffer("text_token_hash", torch.empty(cfg.text_vocab, **long), persistent=False)
        self.register_buffer("audio_token_hash", torch.empty(cfg.card, **long), persistent=False)
        self.init_state()

    @property
    def device(self) -> torch.device:
        return self.offset.device

    @torch.no_grad()
    def init_state(self) -> None:
        """(Re)fill every buffer: constants, all slots reset, KV zeroed (e.g. after `to_empty`)."""
        cfg = self.cfg
        self.delays.copy_(torch.tensor(cfg.delays, dtype=torch.long))
        self.initial.copy_(torch.tensor(cfg.initial_tokens, dtype=torch.long))
        self.text_token_hash.copy_(sampling.token_hashes(cfg.text_vocab, self.device))
        self.audio_token_hash.copy_(sampling.token_hashes(cfg.card, self.device))
        self.kv.zero_()
        self.reset(torch.ones(self.max_slots, dtype=torch.bool, device=self.device))

    # ----------------------------------------------------------------------------------- weights
    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Random init (normal(0, std) weights, unit norms) from torch's default generator."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)

    # ----------------------------------------------------------------------------------- slots
    def _slot_mask(self, slots: SlotsArg) -> Tensor:
        """bool [S] from a bool mask [S], a LongTensor/sequence of indices, or one index."""
        s = self.max_slots
        dev = self.offset.device
        if isinstance(slots, Tensor) and slots.dtype == torch.bool:
            if slots.shape != (s,):
                raise ValueError(f"slot mask must have shape ({s},), got {tuple(slots.shape)}")
            return slots.to(dev)
        idx = torch.as_tensor(slots, dtype=torch.long).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= s):
            raise ValueError(f"slot index out of range [0, {s}): {idx.tolist()}")
        mask = torch.zeros(s, dtype=torch.bool, device=dev)
        mask[idx.to(dev)] = True
        return mask

    def _check_slot(self, slot: int) -> int:
        if not 0 <= int(slot) < self.max_slots:
            raise ValueError(f"slot {slot} out of range [0, {self.max_slots})")
        return int(slot)

    @torch.no_grad()
    def reset(self, slots: SlotsArg) -> None:
        """Clear the selected rows: offset 0, empty token ring, default sampling, fresh random seed.

        Stale KV entries are not zeroed: attention masks them by position.
        """
        m = self._slot_mask(slots)
        cfg = self.cfg
        self.offset.copy_(torch.where(m, 0, self.offset))
        self.cache.copy_(torch.where(m[:, None, None], UNGENERATED, self.cache))
        self.provided.copy_(self.provided & ~m[:, None, None])
        self.temp_text.copy_(torch.where(m, cfg.default_temperature_text, self.temp_text))
        self.temp_audio.copy_(torch.where(m, cfg.default_temperature_audio, self.temp_audio))
        self.top_k_text.copy_(torch.where(m, cfg.default_top_k_text, self.top_k_text))
        self.top_k_audio.copy_(torch.where(m, cfg.default_top_k_audio, self.top_k_audio))
        fresh = torch.randint(0, 2**62, (self.max_slots,), dtype=torch.long).to(self.seed.device)
        self.seed.copy_(torch.where(m, fresh, self.seed))
        self.seed_key.copy_(sampling.seed_key(self.seed))

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
        m = self._slot_mask(slots)
        for buf, value in (
            (self.temp_text, temperature_text),
            (self.temp_audio, temperature_audio),
            (self.top_k_text, top_k_text),
            (self.top_k_audio, top_k_audio),
            (self.seed, seed),
        ):
            if value is None:
                continue
            v = torch.as_tensor(value, dtype=buf.dtype, device=buf.device)
            if v.dim() != 0 and v.shape != buf.shape:
                raise ValueError(f"sampling value must be a scalar or shape {tuple(buf.shape)}, got {tuple(v.shape)}")
            buf.copy_(torch.where(m, v, buf))
        self.seed_key.copy_(sampling.seed_key(self.seed))

    def replay_frame(self) -> Tensor:
        """[17] long: the tokens official `step_embeddings` gives (text PAD, initial audio tokens)."""
        frame = self.initial.clone()
        frame[0] = self.cfg.text_pad_id
        return frame

    # ------------------------------------------------------------------------------ embeddings
    def embed_columns(self, columns: Tensor) -> Tensor:
        """Official embed_codes. columns [B, 17, T] long -> [B, T, D] (model dtype)."""
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
        (frame 0 is consumed by the offset-0 initialisation, as in the official LMGen).
        """
        b, k, n = frames.shape
        if k != self.cfg.num_streams:
            raise ValueError(f"frames must be [B, {self.cfg.num_streams}, N], got {tuple(frames.shape)}")
        t = torch.arange(n, device=frames.device)
        src = t[None, :] - self.delays.to(frames.device)[:, None]  # [17, N]
        gathered = frames.gather(2, src.clamp(min=0)[None].expand(b, -1, -1))
        init = self.initial.to(frames.device)[None, :, None].expand(b, -1, n)
        return torch.where((src >= 1)[None], gathered, init)

    # ---------------------------------------------------------------------- stateless reference
    @torch.no_grad()
    def forward_sequence(self, columns: Tensor) -> tuple[Tensor, Tensor]:
        """Whole-sequence teacher-forced forward, no state (official forward_codes + depformer training).

        columns [B, 17, T + 1] (delayed input columns). Position t uses input column t and its
        depformer is teacher-forced with column t + 1. Returns text logits [B, T, Vt] and audio
        logits [B, P, T, card], float32. Attention is causal within `context` positions.
        """
        b, k, t1 = columns.shape
        if k != self.cfg.num_streams or t1 < 2:
            raise ValueError(f"columns must be [B, {self.cfg.num_streams}, T + 1] with T >= 1")
        t = t1 - 1
        x = self.embed_columns(columns[:, :, :-1])  # [B, T, D]
        pos = torch.arange(t, device=x.device)
        delta = pos[:, None] - pos[None, :]
        mask = (delta >= 0) & (delta < self.cfg.context)  # [T, T]
        rope = rope_tables(pos[None].expand(b, -1), self.cfg.head_dim, self.cfg.max_period)
        for layer in self.layers:
            q, kk, v = layer.qkv(x, rope)
            kk = kk.to(self.kv_dtype).to(q.dtype)
            v = v.to(self.kv_dtype).to(q.dtype)
            x = layer.finish(x, F.scaled_dot_product_attention(q, kk, v, attn_mask=mask))
        out = self.out_norm(x)  # [B, T, D]
        text_logits = self.text_head(out).float()
        p = self.depformer_steps
        dep_tokens = columns[:, :p, 1:].permute(0, 2, 1).reshape(b * t, p)  # [B*T, P]
        audio = self.depformer.forward_train(out.reshape(b * t, -1), dep_tokens)  # [B*T, P, card]
        return text_logits, audio.view(b, t, p, -1).permute(0, 2, 1, 3)

    # --------------------------------------------------------------------------- streaming step
    def _write_given(self, frame: Tensor, rows: Tensor) -> None:
        """prepare_step_input's cache writes for `rows` at their current offset."""
        ct = self.cfg.cache_len
        o = self.offset[:, None]  # [S, 1]
        d = self.delays[None, :]  # [1, 17]
        wmask = rows[:, None] & (frame >= 0)  # [S, 17]
        wpos = (o + d) % ct
        _ring_write(self.cache, wpos, frame, wmask)
        _ring_write(self.provided, wpos, torch.ones_like(wmask), wmask)
        imask = rows[:, None] & (o <= d)
        ipos = (o % ct).expand_as(imask)
        _ring_write(self.cache, ipos, self.initial[None].expand_as(imask), imask)
        _ring_write(self.provided, ipos, torch.ones_like(imask), imask)

    def _temporal_step(self, x: Tensor, pos: Tensor, run: Tensor) -> Tensor:
        """One position per row. x [S, D], pos [S] (KV position), run [S] -> out_norm output [S, D]."""
        s, c = self.max_slots, self.cfg.context
        rows = torch.arange(s, device=x.device)
        ring = pos % c  # [S]
        j = torch.arange(c, device=x.device)
        kpos = pos[:, None] - ((pos[:, None] - j[None, :]) % c)  # [S, C] absolute position held
        mask = (kpos >= 0)[:, None, None, :]  # [S, 1, 1, C]
        h = x[:, None, :]  # [S, 1, D]
        keep = run[:, None, None]
        rope = rope_tables(pos[:, None], self.cfg.head_dim, self.cfg.max_period)  # once for all layers
        for i, layer in enumerate(self.layers):
            q, k, v = layer.qkv(h, rope)  # [S, H, 1, Dh]
            k_ring, v_ring = self.kv[i, 0], self.kv[i, 1]  # [S, H, C, Dh]
            k_ring[rows, :, ring] = torch.where(keep, k[:, :, 0].to(self.kv_dtype), k_ring[rows, :, ring])
            v_ring[rows, :, ring] = torch.where(keep, v[:, :, 0].to(self.kv_dtype), v_ring[rows, :, ring])
            att = F.scaled_dot_product_attention(q, k_ring.to(q.dtype), v_ring.to(q.dtype), attn_mask=mask)
            h = layer.finish(h, att)
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
        (official step_embeddings; give them `replay_frame()`); such a row at offset 0 initialises
        and steps in the same call, as official. Other rows at offset 0 only initialise.
        """
        cfg, s = self.cfg, self.max_slots
        ns, ct, p = cfg.num_streams, cfg.cache_len, self.depformer_steps
        if frame.shape != (s, ns):
            raise ValueError(f"frame must be [{s}, {ns}], got {tuple(frame.shape)}")
        if active.shape != (s,):
            raise ValueError(f"active must be [{s}], got {tuple(active.shape)}")
        dev = self.offset.device
        frame = frame.to(dev, torch.long)
        active = active.to(dev, torch.bool)
        if use_embeddings is None:
            emb_rows = torch.zeros_like(active)
        else:
            if embeddings is None or embeddings.shape != (s, cfg.dim):
                raise ValueError(f"use_embeddings needs embeddings [{s}, {cfg.dim}]")
            emb_rows = use_embeddings.to(dev, torch.bool) & active

        o0 = self.offset.clone()
        self._write_given(frame, active)
        init = active & (o0 == 0)
        self.offset.add_(init.long())
        self._write_given(frame, init & emb_rows)  # official step_embeddings loops after the init
        run = active & ((o0 > 0) | emb_rows)
        o = self.offset.clone()  # >= 1 on run rows

        in_pos = ((o - 1) % ct)[:, None]  # [S, 1]
        tgt_pos = (o % ct)[:, None]
        col_in = self.cache.gather(2, in_pos[:, None].expand(s, ns, 1))[..., 0]  # [S, 17]
        target = self.cache.gather(2, tgt_pos[:, None].expand(s, ns, 1))[..., 0]  # [S, 17]
        prov = self.provided.gather(2, tgt_pos[:, None].expand(s, ns, 1))[..., 0]  # [S, 17]

        x = self.embed_columns(col_in[:, :, None])[:, 0]  # [S, D]
        if embeddings is not None and use_embeddings is not None:
            x = torch.where(emb_rows[:, None], embeddings.to(dev, self.dtype), x)
        out = self._temporal_step(x, (o - 1).clamp(min=0), run)  # [S, D]

        text_logits = self.text_head(out).float()  # [S, Vt]
        key = sampling.step_key(self.seed_key, o)  # [S]: this step's RNG key of each row, for every stream
        text_noise = sampling.gumbel_from_keys(sampling.stream_key(key, 0), self.text_token_hash)  # [S, Vt]
        sampled_text = sampling.sample(
            text_logits, self.temp_text, self.top_k_text, self.seed, o, 0, noise=text_noise
        )
        prev = torch.where(prov[:, 0], target[:, 0], sampled_text)

        dcfg = self.depformer
        hd = cfg.depformer_num_heads
        kv = [
            (
                out.new_empty(s, hd, p, cfg.depformer_head_dim),
                out.new_empty(s, hd, p, cfg.depformer_head_dim),
            )
            for _ in dcfg.layers
        ]
        audio_tokens, audio_logits = [], []
        steps = torch.arange(1, p + 1, device=dev)  # the depformer steps' sampling streams
        dep_keys = sampling.stream_key(key[:, None], steps)  # [S, P]
        noise = sampling.gumbel_from_keys(dep_keys, self.audio_token_hash)  # [S, P, card], one go
        for k in range(p):
            logits = dcfg.step(k, out, prev, kv)  # [S, card]
            tok = sampling.sample(
                logits, self.temp_audio, self.top_k_audio, self.seed, o, 1 + k, noise=noise[:, k]
            )
            prev = torch.where(prov[:, 1 + k], target[:, 1 + k], tok)
            audio_tokens.append(tok)
            if return_logits:
                audio_logits.append(logits)

        sampled = torch.cat(
            [sampled_text[:, None], torch.stack(audio_tokens, dim=1), torch.full_like(target[:, 1 + p :], ZERO_TOKEN)],
            dim=1,
        )  # [S, 17]; user streams without a depformer step become zero-embedding tokens
        run_k = run[:, None].expand(s, ns)
        _ring_write(self.cache, tgt_pos.expand(s, ns), torch.where(prov, target, sampled), run_k)
        _ring_write(self.provided, in_pos.expand(s, ns), torch.zeros_like(run_k), run_k)

        valid = run & (o > cfg.max_delay)
        n_out = 1 + AGENT_CODEBOOKS
        out_pos = (o[:, None] - cfg.max_delay + self.delays[None, :n_out]) % ct  # [S, 9]
        gathered = self.cache[:, :n_out].gather(2, out_pos[..., None])[..., 0]
        gathered = torch.where(valid[:, None], gathered, ZERO_TOKEN)
        self.offset.add_(run.long())
        return StepOutput(
            text=gathered[:, 0],
            audio=gathered[:, 1:],
            valid=valid,
            text_logits=text_logits if return_logits else None,
            audio_logits=torch.stack(audio_logits, dim=1) if return_logits else None,
        )

    # ---------------------------------------------------------------------------------- prefill
    def _prefill_transformer(self, slot: int, x: Tensor, p0: int) -> None:
        """Causal forward of T positions p0..p0+T-1 for one slot, attending to its ring; x [T, D]."""
        c = self.cfg.context
        t = x.shape[0]
        dev = x.device
        qpos = p0 + torch.arange(t, device=dev)  # [T]
        j = torch.arange(c, device=dev)
        last = p0 - 1
        ring_pos = last - ((last - j) % c) if last >= 0 else torch.full_like(j, -1)  # [C]
        kpos = torch.cat([ring_pos, qpos])  # [C + T]
        delta = qpos[:, None] - kpos[None, :]
        mask = (kpos[None, :] >= 0) & (delta >= 0) & (delta < c)  # [T, C + T]
        keep = min(t, c)
        widx = qpos[t - keep :] % c
        h = x[None]  # [1, T, D]
        rope = rope_tables(qpos[None], self.cfg.head_dim, self.cfg.max_period)
        for i, layer in enumerate(self.layers):
            q, k, v = layer.qkv(h, rope)  # [1, H, T, Dh]
            k_ring, v_ring = self.kv[i, 0, slot], self.kv[i, 1, slot]  # [H, C, Dh]
            k_new, v_new = k[0].to(self.kv_dtype), v[0].to(self.kv_dtype)  # [H, T, Dh]
            keys = torch.cat([k_ring, k_new], dim=1)[None].to(q.dtype)
            vals = torch.cat([v_ring, v_new], dim=1)[None].to(q.dtype)
            att = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask)
            k_ring.index_copy_(1, widx, k_new[:, t - keep :])
            v_ring.index_copy_(1, widx, v_new[:, t - keep :])
            h = layer.finish(h, att)

    @torch.no_grad()
    def prefill(self, slot: int, inputs: Tensor, start: int = 0) -> None:
        """Parallel causal forward of T input positions for one slot, writing its KV positions
        start..start+T-1 (attending to the slot's KV positions before `start`, within `context`).

        inputs: input columns [17, T] long (delayed, as `forward_sequence` takes them) or input
        embeddings [T, D]. Offset, token ring and provided flags are left alone: set them with
        `set_token_state` (KV positions written must equal offset - 1), or use `prefill_frames`.
        """
        slot = self._check_slot(slot)
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
        slot = self._check_slot(slot)
        ring = (self.cfg.num_streams, self.cfg.cache_len)
        if offset is not None:
            if int(offset) < 0:
                raise ValueError(f"offset must be >= 0, got {offset}")
            self.offset[slot] = int(offset)
        if cache is not None:
            if tuple(cache.shape) != ring:
                raise ValueError(f"cache must be {ring}, got {tuple(cache.shape)}")
            self.cache[slot] = cache.to(self.device, torch.long)
        if provided is not None:
            if tuple(provided.shape) != ring:
                raise ValueError(f"provided must be {ring}, got {tuple(provided.shape)}")
            self.provided[slot] = provided.to(self.device, torch.bool)

    @torch.no_grad()
    def prefill_frames(self, slot: int, frames: Optional[Tensor] = None, embeddings: Optional[Tensor] = None) -> None:
        """Run N fully given frames for one slot in one parallel forward.

        Same resulting state (offset, token ring, provided flags, KV) as N calls of `step` with
        those frames for this slot, from its current state. frames [17, N] long, every token
        given (>= 0). embeddings [N, D]: replay stored input embeddings instead (official
        step_embeddings); frames then default to `replay_frame()` repeated.
        """
        slot = self._check_slot(slot)
        cfg = self.cfg
        ns, ct = cfg.num_streams, cfg.cache_len
        if frames is None and embeddings is None:
            raise ValueError("prefill needs frames or embeddings")
        if embeddings is not None:
            if embeddings.dim() != 2 or embeddings.shape[1] != cfg.dim:
                raise ValueError(f"embeddings must be [N, {cfg.dim}], got {tuple(embeddings.shape)}")
            if frames is None:
                frames = self.replay_frame()[:, None].expand(ns, embeddings.shape[0])
        if frames.dim() != 2 or frames.shape[0] != ns:
            raise ValueError(f"frames must be [{ns}, N], got {tuple(frames.shape)}")
        n = frames.shape[1]
        if embeddings is not None and embeddings.shape[0] != n:
            raise ValueError(f"embeddings hold {embeddings.shape[0]} frames, frames hold {n}")
        fr = frames.detach().to("cpu", torch.long)
        if bool((fr < 0).any()):
            raise ValueError("prefill needs every token given (no -1): nothing is sampled in a prefill")

        delays = [int(d) for d in cfg.delays]
        initial = self.initial.cpu()
        off = int(self.offset[slot])
        cache = self.cache[slot].cpu().clone()  # [17, CT]
        prov = self.provided[slot].cpu().clone()

        def write(o: int, col: Tensor) -> None:
            for k, d in enumerate(delays):
                cache[k, (o + d) % ct] = col[k]
                prov[k, (o + d) % ct] = True
            for k, d in enumerate(delays):
                if o <= d:
                    cache[k, o % ct] = initial[k]
                    prov[k, o % ct] = True

        columns: list[Tensor] = []
        rows: list[int] = []
        p0 = -1
        for i in range(n):
            write(off, fr[:, i])
            if off == 0:
                off = 1
                if embeddings is None:
                    continue
                write(off, fr[:, i])
            if not bool(prov[:, off % ct].all()):
                raise RuntimeError(f"prefill at offset {off}: target tokens not all provided, sampling would be needed")
            if p0 < 0:
                p0 = off - 1
            columns.append(cache[:, (off - 1) % ct].clone())
            rows.append(i)
            prov[:, (off - 1) % ct] = False
            off += 1

        if columns:
            dev = self.offset.device
            if embeddings is not None:
                x = embeddings.to(dev, self.dtype)[torch.tensor(rows, device=dev)]
            else:
                x = self.embed_columns(torch.stack(columns, dim=1)[None].to(dev))[0]
            self._prefill_transformer(slot, x, p0)
        self.offset[slot] = off
        self.cache[slot] = cache.to(self.cache.device)
        self.provided[slot] = prov.to(self.provided.device)

    # --------------------------------------------------------------------------- export/import
    def _kv_window(self, offset: int) -> Tensor:
        """Ring indices of the KV positions held for a slot at `offset`, oldest first."""
        written = max(offset - 1, 0)
        n = min(written, self.cfg.context)
        return torch.arange(written - n, written, device=self.kv.device) % self.cfg.context

    @torch.no_grad()
    def export_slot(self, slot: int) -> SlotState:
        """Copy of one slot's state, KV trimmed to the positions written (time order)."""
        slot = self._check_slot(slot)
        off = int(self.offset[slot])
        kv = self.kv[:, :, slot].index_select(3, self._kv_window(off))  # [L, 2, H, n, Dh]
        return SlotState(
            offset=self.offset[slot].clone(),
            cache=self.cache[slot].clone(),
            provided=self.provided[slot].clone(),
            kv=kv.clone(),
        )

    @torch.no_grad()
    def import_slot(self, slot: int, state: SlotState) -> None:
        """Load a SlotState into one slot (sampling parameters untouched)."""
        slot = self._check_slot(slot)
        cfg = self.cfg
        off = int(state.offset)
        idx = self._kv_window(off)
        want_kv = (cfg.num_layers, 2, cfg.num_heads, idx.numel(), cfg.head_dim)
        if off < 0:
            raise ValueError(f"SlotState offset must be >= 0, got {off}")
        ring = (cfg.num_streams, cfg.cache_len)
        if tuple(state.cache.shape) != ring:
            raise ValueError(f"SlotState cache must be {ring}, got {tuple(state.cache.shape)}")
        if tuple(state.provided.shape) != ring:
            raise ValueError(f"SlotState provided must be {ring}, got {tuple(state.provided.shape)}")
        if tuple(state.kv.shape) != want_kv:
            raise ValueError(f"SlotState kv must be {want_kv} for offset {off}, got {tuple(state.kv.shape)}")
        self.offset[slot] = off
        self.cache[slot] = state.cache.to(self.cache.device, torch.long)
        self.provided[slot] = state.provided.to(self.provided.device, torch.bool)
        self.kv[:, :, slot].index_copy_(3, idx, state.kv.to(self.kv.device, self.kv_dtype))
