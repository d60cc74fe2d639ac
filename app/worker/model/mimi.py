"""Mimi neural audio codec: 24 kHz mono PCM <-> 12.5 Hz frames of 8 codes, streamed per call slot.

The computation is Kyutai's Mimi as shipped with PersonaPlex (causal SEANet encoder/decoder, a causal
transformer on each side at 25 Hz, a learnt stride-2 convolution down to 12.5 Hz and a depthwise learnt
transposed convolution back up, split residual VQ of which the first `num_codebooks` levels are used).

Streaming state is preallocated for `max_slots` rows; encoder and decoder have separate states:
- every causal conv keeps the last `(kernel - 1) * dilation + 1 - stride` input samples of each slot
  (zeros at reset; the downsampling conv replicates the slot's first latent instead, as officially);
- every transposed conv keeps its overlap-add tail of `kernel - stride` output samples (without bias);
- every transformer layer keeps a K/V ring of `context` steps (`streaming.KVRing`) with a per-slot
  position counter; RoPE is applied at absolute per-slot positions (interleaved pairs, as officially).
Attention follows the reference's streaming ring exactly: both steps of a frame are written into the
ring, then attended, so the first step of a frame sees the `context - 2` steps up to itself and the
second `context - 1` (`streaming.ring_visible`). The whole-signal `encode`/`decode` apply the same rule
frame by frame, so they equal streaming the frames (the reference encodes a voice prompt that way).
Inside the first `context - 1` steps this is also the training-style window of transformers' MimiModel.

Every per-slot operation runs on all rows with fixed shapes; `active` selects which rows advance and the
other rows keep every state tensor bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from app.worker.model.rope import Tables, rope_tables, rotate
from app.worker.model.streaming import KVRing, SlotStateful, reset_stateful, ring_visible, rows, slot_mask


@dataclass(frozen=True)
class MimiConfig:
    """Mimi hyper-parameters (official values by default)."""

    sample_rate: int = 24000
    frame_rate: float = 12.5
    channels: int = 1
    # SEANet (causal, ELU, constant padding, true skip).
    dimension: int = 512
    n_filters: int = 64
    ratios: tuple[int, ...] = (8, 6, 5, 4)  # decoder order; the encoder uses them reversed
    kernel_size: int = 7
    residual_kernel_size: int = 3
    last_kernel_size: int = 3
    n_residual_layers: int = 1
    dilation_base: int = 2
    compress: int = 2
    # Transformers (d_model = dimension, causal, LayerNorm, RoPE, layer scale, GELU FFN, no biases).
    num_heads: int = 8
    num_layers: int = 8
    dim_feedforward: int = 2048
    context: int = 250
    max_period: float = 10000.0
    layer_scale: float = 0.01
    norm_eps: float = 1e-5
    # Split residual VQ.
    codebook_dim: int = 256
    codebook_size: int = 2048
    total_codebooks: int = 32
    n_semantic: int = 1
    num_codebooks: int = 8
    codebook_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.channels != 1:
            raise ValueError(f"Mimi supports mono audio only, got channels={self.channels}")
        if self.sample_rate % self.hop_length != 0:
            raise ValueError(f"sample_rate {self.sample_rate} is not a multiple of hop {self.hop_length}")
        stride = self.encoder_frame_rate / self.frame_rate
        if stride != int(stride) or stride < 1:
            raise ValueError(f"encoder frame rate / frame_rate must be an integer, got {stride}")
        if self.dimension % self.num_heads != 0 or (self.dimension // self.num_heads) % 2 != 0:
            raise ValueError(f"dimension {self.dimension} must split into {self.num_heads} even-sized heads")
        if self.context <= self.resample_stride:
            raise ValueError(f"context {self.context} must be > {self.resample_stride} steps per frame")
        if not self.n_semantic < self.num_codebooks <= self.total_codebooks:
            raise ValueError(
                f"need n_semantic ({self.n_semantic}) < num_codebooks ({self.num_codebooks}) "
                f"<= total_codebooks ({self.total_codebooks})"
            )

    @classmethod
    def personaplex(cls) -> MimiConfig:
        """The Mimi shipped with PersonaPlex-7B (tokenizer-e351c8d8-checkpoint125)."""
        return cls()

    @classmethod
    def tiny(cls) -> MimiConfig:
        """Same structure and frame size (1920 samples), small widths, a short context, 10 codebooks."""
        return cls(
            dimension=32,
            n_filters=4,
            num_heads=4,
            num_layers=2,
            dim_feedforward=64,
            context=16,
            codebook_dim=16,
            total_codebooks=10,
        )

    @property
    def hop_length(self) -> int:
        """SEANet samples per latent step (960)."""
        return math.prod(self.ratios)

    @property
    def encoder_frame_rate(self) -> float:
        """Latent rate of the SEANet and the transformers (25 Hz)."""
        return self.sample_rate / self.hop_length

    @property
    def resample_stride(self) -> int:
        """Transformer steps per codec frame (2)."""
        return int(self.encoder_frame_rate / self.frame_rate)

    @property
    def frame_size(self) -> int:
        """PCM samples per codec frame (1920)."""
        return self.hop_length * self.resample_stride

    @property
    def head_dim(self) -> int:
        return self.dimension // self.num_heads


Device = torch.device | str | None


def _uniform_(t: Tensor, fan_in: int) -> None:
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(t, -bound, bound)


class _CausalConv1d(SlotStateful):
    """Causal Conv1d keeping the last `(k - 1) * dilation + 1 - stride` input samples per slot."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        max_slots: int,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = True,
        replicate_pad: bool = False,
        device: Device = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.stride = stride
        self.dilation = dilation
        self.groups = groups
        self.replicate_pad = replicate_pad
        self.context = (kernel_size - 1) * dilation + 1 - stride
        if self.context < 0:
            raise ValueError(f"stride {stride} larger than effective kernel of conv {kernel_size}x{dilation}")
        fan_in = in_channels // groups * kernel_size
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, kernel_size, device=device, dtype=dtype)
        )
        _uniform_(self.weight.data, fan_in)
        self.bias: nn.Parameter | None = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype))
            _uniform_(self.bias.data, fan_in)
        # [S, C_in, P]: the last P input samples of each slot.
        self.register_buffer(
            "state", torch.zeros(max_slots, in_channels, self.context, device=device, dtype=dtype), persistent=False
        )
        if replicate_pad:
            # [S]: slot has seen no input yet; its left context will replicate its first input.
            self.register_buffer("fresh", torch.ones(max_slots, dtype=torch.bool, device=device), persistent=False)

    def reset_slots(self, mask: Tensor) -> None:
        self.state.masked_fill_(rows(mask, 3), 0.0)
        if self.replicate_pad:
            self.fresh.masked_fill_(mask, True)

    def forward(self, x: Tensor, active: Tensor | None = None) -> Tensor:
        """x [B, C_in, T] -> [B, C_out, T // stride]. active None: offline from a fresh state."""
        if self.context == 0:
            return F.conv1d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)
        B, C, _ = x.shape
        if active is None:
            if self.replicate_pad:
                past = x[:, :, :1].expand(B, C, self.context)
            else:
                past = x.new_zeros(B, C, self.context)
        else:
            past = self.state
            if self.replicate_pad:
                past = torch.where(rows(self.fresh, 3), x[:, :, :1].expand(B, C, self.context), past)
        xp = torch.cat([past, x], dim=-1)  # [B, C_in, P + T]
        if active is not None:
            self.state.copy_(torch.where(rows(active, 3), xp[:, :, xp.shape[-1] - self.context :], self.state))
            if self.replicate_pad:
                self.fresh.logical_and_(~active)
        return F.conv1d(xp, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class _CausalConvTranspose1d(SlotStateful):
    """Causal ConvTranspose1d; keeps the overlap-add tail of `kernel - stride` outputs per slot."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        *,
        max_slots: int,
        groups: int = 1,
        bias: bool = True,
        device: Device = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if kernel_size < stride:
            raise ValueError(f"transposed conv kernel {kernel_size} shorter than stride {stride}")
        self.stride = stride
        self.groups = groups
        self.overlap = kernel_size - stride
        fan_in = out_channels // groups * kernel_size
        self.weight = nn.Parameter(
            torch.empty(in_channels, out_channels // groups, kernel_size, device=device, dtype=dtype)
        )
        _uniform_(self.weight.data, fan_in)
        self.bias: nn.Parameter | None = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype))
            _uniform_(self.bias.data, fan_in)
        # [S, C_out, K - stride]: partial outputs (bias excluded) still receiving contributions.
        self.register_buffer(
            "tail", torch.zeros(max_slots, out_channels, self.overlap, device=device, dtype=dtype), persistent=False
        )

    def reset_slots(self, mask: Tensor) -> None:
        self.tail.masked_fill_(rows(mask, 3), 0.0)

    def forward(self, x: Tensor, active: Tensor | None = None) -> Tensor:
        """x [B, C_in, T] -> [B, C_out, T * stride]. active None: offline from a fresh state."""
        n_out = x.shape[-1] * self.stride
        y = F.conv_transpose1d(x, self.weight, None, self.stride, groups=self.groups)  # [B, C_out, n_out + P]
        if self.overlap > 0:
            if active is not None:
                y = torch.cat([y[:, :, : self.overlap] + self.tail, y[:, :, self.overlap :]], dim=-1)
                self.tail.copy_(torch.where(rows(active, 3), y[:, :, n_out:], self.tail))
            y = y[:, :, :n_out]
        if self.bias is not None:
            y = y + self.bias[:, None]
        return y


class _ResBlock(nn.Module):
    """SEANet residual block: x + conv1x1(elu(conv_k(elu(x)))), identity skip."""

    def __init__(
        self, dim: int, cfg: MimiConfig, dilation: int, max_slots: int, device: Device, dtype: torch.dtype
    ) -> None:
        super().__init__()
        hidden = dim // cfg.compress
        kw = dict(max_slots=max_slots, device=device, dtype=dtype)
        self.conv1 = _CausalConv1d(dim, hidden, cfg.residual_kernel_size, dilation=dilation, **kw)
        self.conv2 = _CausalConv1d(hidden, dim, 1, **kw)

    def forward(self, x: Tensor, active: Tensor | None) -> Tensor:
        return x + self.conv2(F.elu(self.conv1(F.elu(x), active)), active)


class _EncoderStage(nn.Module):
    def __init__(
        self, dim: int, ratio: int, cfg: MimiConfig, max_slots: int, device: Device, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.res = nn.ModuleList(
            _ResBlock(dim, cfg, cfg.dilation_base**j, max_slots, device, dtype) for j in range(cfg.n_residual_layers)
        )
        self.down = _CausalConv1d(
            dim, 2 * dim, 2 * ratio, stride=ratio, max_slots=max_slots, device=device, dtype=dtype
        )

    def forward(self, x: Tensor, active: Tensor | None) -> Tensor:
        for block in self.res:
            x = block(x, active)
        return self.down(F.elu(x), active)


class _DecoderStage(nn.Module):
    def __init__(
        self, dim: int, ratio: int, cfg: MimiConfig, max_slots: int, device: Device, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.up = _CausalConvTranspose1d(
            dim, dim // 2, 2 * ratio, ratio, max_slots=max_slots, device=device, dtype=dtype
        )
        self.res = nn.ModuleList(
            _ResBlock(dim // 2, cfg, cfg.dilation_base**j, max_slots, device, dtype)
            for j in range(cfg.n_residual_layers)
        )

    def forward(self, x: Tensor, active: Tensor | None) -> Tensor:
        x = self.up(F.elu(x), active)
        for block in self.res:
            x = block(x, active)
        return x


class _SeanetEncoder(nn.Module):
    """[B, 1, T] -> [B, dimension, T / hop_length]."""

    def __init__(self, cfg: MimiConfig, max_slots: int, device: Device, dtype: torch.dtype) -> None:
        super().__init__()
        kw = dict(max_slots=max_slots, device=device, dtype=dtype)
        self.input_conv = _CausalConv1d(cfg.channels, cfg.n_filters, cfg.kernel_size, **kw)
        self.stages = nn.ModuleList(
            _EncoderStage(cfg.n_filters * 2**i, ratio, cfg, max_slots, device, dtype)
            for i, ratio in enumerate(reversed(cfg.ratios))
        )
        top = cfg.n_filters * 2 ** len(cfg.ratios)
        self.output_conv = _CausalConv1d(top, cfg.dimension, cfg.last_kernel_size, **kw)

    def forward(self, x: Tensor, active: Tensor | None) -> Tensor:
        x = self.input_conv(x, active)
        for stage in self.stages:
            x = stage(x, active)
        return self.output_conv(F.elu(x), active)


class _SeanetDecoder(nn.Module):
    """[B, dimension, T] -> [B, 1, T * hop_length]."""

    def __init__(self, cfg: MimiConfig, max_slots: int, device: Device, dtype: torch.dtype) -> None:
        super().__init__()
        kw = dict(max_slots=max_slots, device=device, dtype=dtype)
        top = cfg.n_filters * 2 ** len(cfg.ratios)
        self.input_conv = _CausalConv1d(cfg.dimension, top, cfg.kernel_size, **kw)
        self.stages = nn.ModuleList(
            _DecoderStage(top // 2**i, ratio, cfg, max_slots, device, dtype) for i, ratio in enumerate(cfg.ratios)
        )
        self.output_conv = _CausalConv1d(cfg.n_filters, cfg.channels, cfg.last_kernel_size, **kw)

    def forward(self, x: Tensor, active: Tensor | None) -> Tensor:
        x = self.input_conv(x, active)
        for stage in self.stages:
            x = stage(x, active)
        return self.output_conv(F.elu(x), active)


def _layer_norm_f32(x: Tensor, norm: nn.LayerNorm) -> Tensor:
    y = F.layer_norm(x.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps)
    return y.to(x.dtype)


class _Attention(nn.Module):
    """Causal multi-head self-attention; streaming through a per-slot K/V ring of `context` steps."""

    def __init__(self, cfg: MimiConfig, max_slots: int, device: Device, dtype: torch.dtype) -> None:
        super().__init__()
        D, H = cfg.dimension, cfg.num_heads
        self.num_heads = H
        # Rows [q; k; v], each [H * Dh] head-major (official in_proj_weight layout).
        self.in_proj = nn.Linear(D, 3 * D, bias=False, device=device, dtype=dtype)
        self.out_proj = nn.Linear(D, D, bias=False, device=device, dtype=dtype)
        self.ring = KVRing(max_slots, H, cfg.context, cfg.head_dim, device=device, dtype=dtype)

    def forward(self, x: Tensor, pos: Tensor, rope: Tables, mask: Tensor | None, active: Tensor | None) -> Tensor:
        """x [B, T, D] at absolute positions pos [B, T] (their rope tables). active None: whole
        signals, attending among themselves under mask [T, T]; else one streaming call of all
        slots through the ring (`active` [S] rows advance; mask from `KVRing.mask`) -> [B, T, D]."""
        B, T, D = x.shape
        qkv = self.in_proj(x).view(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k = rotate(qkv[:2], rope)  # [2, B, H, T, Dh]: q and k in one go
        v = qkv[2]
        if active is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, T, Dh]
        else:
            out = self.ring.attend(q, k, v, pos, active, mask)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, D))


class _TransformerLayer(nn.Module):
    """Pre-norm layer: x + s1 * attn(ln1(x)); x + s2 * linear2(gelu(linear1(ln2(x))))."""

    def __init__(self, cfg: MimiConfig, max_slots: int, device: Device, dtype: torch.dtype) -> None:
        super().__init__()
        D = cfg.dimension
        self.norm1 = nn.LayerNorm(D, eps=cfg.norm_eps, device=device, dtype=dtype)
        self.attn = _Attention(cfg, max_slots, device, dtype)
        self.norm2 = nn.LayerNorm(D, eps=cfg.norm_eps, device=device, dtype=dtype)
        self.linear1 = nn.Linear(D, cfg.dim_feedforward, bias=False, device=device, dtype=dtype)
        self.linear2 = nn.Linear(cfg.dim_feedforward, D, bias=False, device=device, dtype=dtype)
        self.scale1 = nn.Parameter(torch.full((D,), cfg.layer_scale, device=device, dtype=dtype))
        self.scale2 = nn.Parameter(torch.full((D,), cfg.layer_scale, device=device, dtype=dtype))

    def forward(self, x: Tensor, pos: Tensor, rope: Tables, mask: Tensor | None, active: Tensor | None) -> Tensor:
        x = x + self.scale1 * self.attn(_layer_norm_f32(x, self.norm1), pos, rope, mask, active)
        return x + self.scale2 * self.linear2(F.gelu(self.linear1(_layer_norm_f32(x, self.norm2))))


class _Transformer(SlotStateful):
    """Causal transformer over [B, T, D] with the reference's ring attention and per-slot positions."""

    def __init__(self, cfg: MimiConfig, max_slots: int, device: Device, dtype: torch.dtype) -> None:
        super().__init__()
        self.context, self.chunk = cfg.context, cfg.resample_stride
        self.head_dim, self.max_period = cfg.head_dim, cfg.max_period
        self.layers = nn.ModuleList(_TransformerLayer(cfg, max_slots, device, dtype) for _ in range(cfg.num_layers))
        # [S]: steps already written to each slot's K/V ring (= position of the next step).
        self.register_buffer("pos", torch.zeros(max_slots, dtype=torch.long, device=device), persistent=False)

    def reset_slots(self, mask: Tensor) -> None:
        self.pos.masked_fill_(mask, 0)

    def forward(self, x: Tensor, active: Tensor | None = None) -> Tensor:
        """x [B, T, D] -> [B, T, D]. active None: whole signals from position 0, seen frame by frame
        (T a multiple of the steps per frame); else one streaming call (one frame) of all slots."""
        B, T, _ = x.shape
        steps = torch.arange(T, device=x.device)
        mask = None
        if active is None:
            pos = steps.expand(B, T)  # [B, T]
            end = (steps // self.chunk + 1) * self.chunk  # [T]: the end of each step's frame
            mask = ring_visible(steps[None, :], steps[:, None], end[:, None], self.context)  # [T, T]
        else:
            pos = self.pos[:, None] + steps  # [S, T]
            mask = self.layers[0].attn.ring.mask(pos)  # [S, 1, T, C], the same for all layers
        rope = rope_tables(pos, self.head_dim, self.max_period)  # once for all layers
        for layer in self.layers:
            x = layer(x, pos, rope, mask, active)
        if active is not None:
            self.pos.add_(active.long() * T)
        return x


class _SplitRVQ(nn.Module):
    """Split residual VQ (semantic levels, then acoustic levels), float32 math."""

    def __init__(self, cfg: MimiConfig, device: Device) -> None:
        super().__init__()
        self.n_semantic = cfg.n_semantic
        self.num_codebooks = cfg.num_codebooks
        D, d = cfg.dimension, cfg.codebook_dim
        f32 = dict(bias=False, device=device, dtype=torch.float32)
        self.semantic_in = nn.Linear(D, d, **f32)
        self.semantic_out = nn.Linear(d, D, **f32)
        self.acoustic_in = nn.Linear(D, d, **f32)
        self.acoustic_out = nn.Linear(d, D, **f32)
        # [K_total, N, d]: centroids (official embedding_sum / cluster_usage.clamp(min=eps)).
        self.register_buffer(
            "codebooks", torch.randn(cfg.total_codebooks, cfg.codebook_size, d, device=device, dtype=torch.float32)
        )

    def _residual_encode(self, y: Tensor, levels: range) -> list[Tensor]:
        codes = []
        for k in levels:
            book = self.codebooks[k]  # [N, d]
            dist = (book * book).sum(-1) - 2.0 * (y @ book.t())  # [B, T, N], ||y - e||^2 - ||y||^2
            code = dist.argmin(dim=-1)  # [B, T]
            y = y - F.embedding(code, book)
            codes.append(code)
        return codes

    def encode(self, x: Tensor) -> Tensor:
        """x [B, T, D] -> codes [B, T, num_codebooks] long."""
        x = x.float()
        codes = self._residual_encode(self.semantic_in(x), range(self.n_semantic))
        codes += self._residual_encode(self.acoustic_in(x), range(self.n_semantic, self.num_codebooks))
        return torch.stack(codes, dim=-1)

    def decode(self, codes: Tensor) -> Tensor:
        """codes [B, T, num_codebooks] -> latent [B, T, D] float32."""
        semantic = F.embedding(codes[..., 0], self.codebooks[0])  # [B, T, d]
        for k in range(1, self.n_semantic):
            semantic = semantic + F.embedding(codes[..., k], self.codebooks[k])
        acoustic = F.embedding(codes[..., self.n_semantic], self.codebooks[self.n_semantic])
        for k in range(self.n_semantic + 1, self.num_codebooks):
            acoustic = acoustic + F.embedding(codes[..., k], self.codebooks[k])
        return self.semantic_out(semantic) + self.acoustic_out(acoustic)


class Mimi(nn.Module):
    """Mimi codec with separate per-slot streaming encoder and decoder states for `max_slots` calls."""

    def __init__(
        self,
        cfg: MimiConfig,
        max_slots: int,
        device: Device = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if max_slots < 1:
            raise ValueError(f"max_slots must be >= 1, got {max_slots}")
        self.cfg = cfg
        self.max_slots = max_slots
        self.dtype = dtype
        D, stride = cfg.dimension, cfg.resample_stride
        self.encoder = _SeanetEncoder(cfg, max_slots, device, dtype)
        self.encoder_transformer = _Transformer(cfg, max_slots, device, dtype)
        self.downsample = _CausalConv1d(
            D, D, 2 * stride, stride=stride, bias=False, replicate_pad=True,
            max_slots=max_slots, device=device, dtype=dtype,
        )
        self.quantizer = _SplitRVQ(cfg, device)
        self.upsample = _CausalConvTranspose1d(
            D, D, 2 * stride, stride, groups=D, bias=False, max_slots=max_slots, device=device, dtype=dtype
        )
        self.decoder_transformer = _Transformer(cfg, max_slots, device, dtype)
        self.decoder = _SeanetDecoder(cfg, max_slots, device, dtype)

    @property
    def device(self) -> torch.device:
        return self.encoder_transformer.pos.device

    # ---- slot state -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def init_state(self) -> None:
        """Initialise the streaming state of every slot (e.g. after building on meta and `to_empty`)."""
        self.reset(torch.ones(self.max_slots, dtype=torch.bool, device=self.device))

    def _encoder_side(self) -> list[nn.Module]:
        return [self.encoder, self.encoder_transformer, self.downsample]

    def _decoder_side(self) -> list[nn.Module]:
        return [self.upsample, self.decoder_transformer, self.decoder]

    def _reset(self, parts: list[nn.Module], slots: Tensor) -> None:
        mask = slot_mask(slots, self.max_slots, self.device)
        for part in parts:
            reset_stateful(part, mask)

    @torch.no_grad()
    def reset(self, slots: Tensor) -> None:
        """Clear encoder and decoder state of the given slots (bool mask [S] or LongTensor of indices)."""
        self._reset(self._encoder_side() + self._decoder_side(), slots)

    @torch.no_grad()
    def reset_encoder(self, slots: Tensor) -> None:
        """Clear only the encoder state of the given slots."""
        self._reset(self._encoder_side(), slots)

    @torch.no_grad()
    def reset_decoder(self, slots: Tensor) -> None:
        """Clear only the decoder state of the given slots."""
        self._reset(self._decoder_side(), slots)

    def _check_active(self, active: Tensor) -> None:
        if active.dtype != torch.bool or tuple(active.shape) != (self.max_slots,):
            raise ValueError(f"active must be a bool tensor of shape ({self.max_slots},), got "
                             f"{active.dtype} {tuple(active.shape)}")

    # ---- shared pipeline --------------------------------------------------------------------------------------

    def _encode_latent(self, pcm: Tensor, active: Tensor | None) -> Tensor:
        """pcm [B, T] -> codes [B, T / frame_size, K]."""
        x = self.encoder(pcm.to(self.dtype)[:, None, :], active)  # [B, D, T / hop]
        x = self.encoder_transformer(x.transpose(1, 2), active).transpose(1, 2)  # [B, D, T / hop]
        x = self.downsample(x, active)  # [B, D, F]
        return self.quantizer.encode(x.transpose(1, 2))  # [B, F, K]

    def _decode_latent(self, codes: Tensor, active: Tensor | None) -> Tensor:
        """codes [B, F, K] -> pcm [B, F * frame_size]."""
        x = self.quantizer.decode(codes).to(self.dtype).transpose(1, 2)  # [B, D, F]
        x = self.upsample(x, active)  # [B, D, F * stride]
        x = self.decoder_transformer(x.transpose(1, 2), active).transpose(1, 2)  # [B, D, F * stride]
        return self.decoder(x, active)[:, 0]  # [B, F * frame_size]

    # ---- streaming --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_step(self, pcm: Tensor, active: Tensor) -> Tensor:
        """Encode one frame per slot: pcm [S, frame_size] -> codes [S, K] long (0 for inactive rows)."""
        self._check_active(active)
        if tuple(pcm.shape) != (self.max_slots, self.cfg.frame_size):
            raise ValueError(f"pcm must have shape ({self.max_slots}, {self.cfg.frame_size}), got {tuple(pcm.shape)}")
        codes = self._encode_latent(pcm, active)[:, 0]  # [S, K]
        return torch.where(active[:, None], codes, torch.zeros_like(codes))

    @torch.no_grad()
    def decode_step(self, codes: Tensor, active: Tensor) -> Tensor:
        """Decode one frame per slot: codes [S, K] -> pcm [S, frame_size] (zeros for inactive rows).

        Codes are clamped to [0, codebook_size) so garbage in inactive rows cannot fault the lookup.
        """
        self._check_active(active)
        K = self.cfg.num_codebooks
        if tuple(codes.shape) != (self.max_slots, K) or codes.dtype.is_floating_point:
            raise ValueError(f"codes must be an integer tensor of shape ({self.max_slots}, {K}), got "
                             f"{codes.dtype} {tuple(codes.shape)}")
        codes = codes.long().clamp(0, self.cfg.codebook_size - 1)
        pcm = self._decode_latent(codes[:, None, :], active)  # [S, frame_size]
        return torch.where(active[:, None], pcm, torch.zeros_like(pcm))

    # ---- offline (stateless) ----------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, pcm: Tensor) -> Tensor:
        """Encode whole signals from a fresh state: pcm [B, T] -> codes [B, K, T // frame_size] long.

        T must be a multiple of frame_size (the official voice-prompt path zero-pads the last frame).
        Equal to streaming the frames one by one from a reset slot.
        """
        if pcm.dim() != 2 or pcm.shape[1] % self.cfg.frame_size != 0:
            raise ValueError(f"pcm must be [B, T] with T a multiple of {self.cfg.frame_size}, got {tuple(pcm.shape)}")
        return self._encode_latent(pcm, None).transpose(1, 2)

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """Decode whole code sequences from a fresh state: codes [B, K, F] -> pcm [B, F * frame_size]."""
        K = self.cfg.num_codebooks
        if codes.dim() != 3 or codes.shape[1] != K or codes.dtype.is_floating_point:
            raise ValueError(f"codes must be an integer tensor [B, {K}, F], got {codes.dtype} {tuple(codes.shape)}")
        return self._decode_latent(codes.long().transpose(1, 2), None)
