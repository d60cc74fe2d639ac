"""Official Mimi checkpoint layout (moshi `MimiModel.state_dict()`) <-> our `Mimi` state dict.

Official keys, with C = n_filters, D = dimension, d = codebook_dim, N = codebook_size, R = len(ratios),
n = n_residual_layers, h = D // compress (residual hidden width), r_i = reversed(ratios)[i] in the encoder
and ratios[i] in the decoder (PersonaPlex: C=64, D=512, d=256, N=2048, R=4, n=1, 8 layers, 32 codebooks).
Conv weights are [out, in / groups, kernel]; transposed-conv weights are [in, out / groups, kernel].

SEANet encoder (`encoder.model` is an nn.Sequential; ELUs take indices but hold no tensors):
  encoder.model.0.conv.conv.{weight [C, 1, kernel_size], bias [C]}
  stage i in 0..R-1 (width W = C * 2**i), base b = 1 + i * (n + 2):
    encoder.model.{b+j}.block.1.conv.conv.{weight [W/2, W, residual_kernel_size], bias}   j in 0..n-1
    encoder.model.{b+j}.block.3.conv.conv.{weight [W, W/2, 1], bias}
    encoder.model.{b+n+1}.conv.conv.{weight [2W, W, 2 r_i], bias [2W]}                     (index b+n: ELU)
  encoder.model.{1 + R (n + 2) + 1}.conv.conv.{weight [D, C 2**R, last_kernel_size], bias [D]}
  -> PersonaPlex: convs at 0, 3, 6, 9, 12, 14; residual blocks at 1, 4, 7, 10.
SEANet decoder (top width T = C * 2**R):
  decoder.model.0.conv.conv.{weight [T, D, kernel_size], bias [T]}
  stage i (width W = T / 2**i), base b = 1 + i * (n + 2):
    decoder.model.{b+1}.convtr.convtr.{weight [W, W/2, 2 r_i], bias [W/2]}                 (index b: ELU)
    decoder.model.{b+2+j}.block.1.conv.conv.{weight [W/4, W/2, residual_kernel_size], bias}
    decoder.model.{b+2+j}.block.3.conv.conv.{weight [W/2, W/4, 1], bias}
  decoder.model.{1 + R (n + 2) + 1}.conv.conv.{weight [1, C, last_kernel_size], bias [1]}
  -> PersonaPlex: convtr at 2, 5, 8, 11; residual blocks at 3, 6, 9, 12; convs at 0, 14.
Transformers, side in {encoder, decoder}, layer l:
  {side}_transformer.transformer.layers.{l}.self_attn.in_proj_weight [3D, D]  (rows q;k;v, head-major)
  {side}_transformer.transformer.layers.{l}.self_attn.out_proj.weight [D, D]
  {side}_transformer.transformer.layers.{l}.norm1.{weight, bias} [D], .norm2.{weight, bias} [D]
  {side}_transformer.transformer.layers.{l}.linear1.weight [F, D], .linear2.weight [D, F]
  {side}_transformer.transformer.layers.{l}.layer_scale_1.scale [D], .layer_scale_2.scale [D]
  (ProjectedTransformer: no input_proj / output_projs tensors since d_model == dimension.)
Resampling: downsample.conv.conv.conv.weight [D, D, 2 stride] (no bias),
            upsample.convtr.convtr.convtr.weight [D, 1, 2 stride] (depthwise, no bias).
Split RVQ, q in {rvq_first (levels 0..n_semantic-1), rvq_rest (the other total_codebooks - n_semantic)}:
  quantizer.{q}.input_proj.weight [d, D, 1], quantizer.{q}.output_proj.weight [D, d, 1]
  quantizer.{q}.vq.layers.{k}._codebook.{_initialized [1], cluster_usage [N], embedding_sum [N, d]}
  The centroids are embedding_sum / cluster_usage.clamp(min=1e-5)[:, None]; `_initialized` is ignored.
"""

from __future__ import annotations

import torch
from torch import Tensor

from app.worker.model.errors import CheckpointError, check_layout
from app.worker.model.mimi import MimiConfig


def _simple_pairs(cfg: MimiConfig) -> list[tuple[str, str, tuple[int, ...]]]:
    """(official key, our key, official shape) for every tensor copied one to one (up to a reshape)."""
    pairs: list[tuple[str, str, tuple[int, ...]]] = []
    C, D, R, n = cfg.n_filters, cfg.dimension, len(cfg.ratios), cfg.n_residual_layers

    def conv(official: str, ours: str, out_ch: int, in_ch: int, kernel: int, bias: bool = True) -> None:
        pairs.append((f"{official}.weight", f"{ours}.weight", (out_ch, in_ch, kernel)))
        if bias:
            pairs.append((f"{official}.bias", f"{ours}.bias", (out_ch,)))

    def res_block(official: str, ours: str, width: int) -> None:
        hidden = width // cfg.compress
        conv(f"{official}.block.1.conv.conv", f"{ours}.conv1", hidden, width, cfg.residual_kernel_size)
        conv(f"{official}.block.3.conv.conv", f"{ours}.conv2", width, hidden, 1)

    conv("encoder.model.0.conv.conv", "encoder.input_conv", C, cfg.channels, cfg.kernel_size)
    for i, ratio in enumerate(reversed(cfg.ratios)):
        width, base = C * 2**i, 1 + i * (n + 2)
        for j in range(n):
            res_block(f"encoder.model.{base + j}", f"encoder.stages.{i}.res.{j}", width)
        conv(f"encoder.model.{base + n + 1}.conv.conv", f"encoder.stages.{i}.down", 2 * width, width, 2 * ratio)
    last = 1 + R * (n + 2) + 1
    conv(f"encoder.model.{last}.conv.conv", "encoder.output_conv", D, C * 2**R, cfg.last_kernel_size)

    top = C * 2**R
    conv("decoder.model.0.conv.conv", "decoder.input_conv", top, D, cfg.kernel_size)
    for i, ratio in enumerate(cfg.ratios):
        width, base = top // 2**i, 1 + i * (n + 2)
        # Transposed conv: weight [in, out, k], bias [out].
        pairs.append((f"decoder.model.{base + 1}.convtr.convtr.weight", f"decoder.stages.{i}.up.weight",
                      (width, width // 2, 2 * ratio)))
        pairs.append((f"decoder.model.{base + 1}.convtr.convtr.bias", f"decoder.stages.{i}.up.bias", (width // 2,)))
        for j in range(n):
            res_block(f"decoder.model.{base + 2 + j}", f"decoder.stages.{i}.res.{j}", width // 2)
    conv(f"decoder.model.{last}.conv.conv", "decoder.output_conv", cfg.channels, C, cfg.last_kernel_size)

    for side in ("encoder", "decoder"):
        for layer in range(cfg.num_layers):
            o = f"{side}_transformer.transformer.layers.{layer}"
            u = f"{side}_transformer.layers.{layer}"
            pairs += [
                (f"{o}.self_attn.in_proj_weight", f"{u}.attn.in_proj.weight", (3 * D, D)),
                (f"{o}.self_attn.out_proj.weight", f"{u}.attn.out_proj.weight", (D, D)),
                (f"{o}.norm1.weight", f"{u}.norm1.weight", (D,)),
                (f"{o}.norm1.bias", f"{u}.norm1.bias", (D,)),
                (f"{o}.norm2.weight", f"{u}.norm2.weight", (D,)),
                (f"{o}.norm2.bias", f"{u}.norm2.bias", (D,)),
                (f"{o}.linear1.weight", f"{u}.linear1.weight", (cfg.dim_feedforward, D)),
                (f"{o}.linear2.weight", f"{u}.linear2.weight", (D, cfg.dim_feedforward)),
                (f"{o}.layer_scale_1.scale", f"{u}.scale1", (D,)),
                (f"{o}.layer_scale_2.scale", f"{u}.scale2", (D,)),
            ]

    stride = cfg.resample_stride
    pairs.append(("downsample.conv.conv.conv.weight", "downsample.weight", (D, D, 2 * stride)))
    pairs.append(("upsample.convtr.convtr.convtr.weight", "upsample.weight", (D, 1, 2 * stride)))

    d = cfg.codebook_dim
    for official, ours in (("rvq_first", "semantic"), ("rvq_rest", "acoustic")):
        # Official 1x1 Conv1d weights [out, in, 1]; ours are Linear weights [out, in].
        pairs.append((f"quantizer.{official}.input_proj.weight", f"quantizer.{ours}_in.weight", (d, D, 1)))
        pairs.append((f"quantizer.{official}.output_proj.weight", f"quantizer.{ours}_out.weight", (D, d, 1)))
    return pairs


def _codebook_prefixes(cfg: MimiConfig) -> list[str]:
    """Official `..._codebook` prefix of each RVQ level, in level order."""
    first = [f"quantizer.rvq_first.vq.layers.{k}._codebook" for k in range(cfg.n_semantic)]
    rest = [f"quantizer.rvq_rest.vq.layers.{k}._codebook" for k in range(cfg.total_codebooks - cfg.n_semantic)]
    return first + rest


def expected_official_shapes(cfg: MimiConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the official Mimi checkpoint and its shape."""
    shapes = {official: shape for official, _, shape in _simple_pairs(cfg)}
    for prefix in _codebook_prefixes(cfg):
        shapes[f"{prefix}._initialized"] = (1,)
        shapes[f"{prefix}.cluster_usage"] = (cfg.codebook_size,)
        shapes[f"{prefix}.embedding_sum"] = (cfg.codebook_size, cfg.codebook_dim)
    return shapes


def _check_official(sd: dict[str, Tensor], cfg: MimiConfig) -> None:
    check_layout(sd, expected_official_shapes(cfg), "Mimi checkpoint")


def from_official(sd: dict[str, Tensor], cfg: MimiConfig) -> dict[str, Tensor]:
    """Official Mimi state dict -> `Mimi(cfg, ...)` state dict. Raises CheckpointError on any mismatch."""
    _check_official(sd, cfg)
    out: dict[str, Tensor] = {}
    for official, ours, shape in _simple_pairs(cfg):
        tensor = sd[official]
        out[ours] = tensor[..., 0] if ours.startswith("quantizer.") else tensor
    books = []
    for prefix in _codebook_prefixes(cfg):
        usage = sd[f"{prefix}.cluster_usage"].float().clamp(min=cfg.codebook_eps)  # [N]
        books.append(sd[f"{prefix}.embedding_sum"].float() / usage[:, None])  # [N, d]
    out["quantizer.codebooks"] = torch.stack(books)  # [K_total, N, d]
    return out


def to_official(sd: dict[str, Tensor], cfg: MimiConfig) -> dict[str, Tensor]:
    """`Mimi` state dict -> official layout (centroids written as embedding_sum with cluster_usage = 1)."""
    pairs = _simple_pairs(cfg)
    needed = [ours for _, ours, _ in pairs] + ["quantizer.codebooks"]
    missing = [k for k in needed if k not in sd]
    if missing:
        raise CheckpointError("Mimi state dict is missing: " + ", ".join(missing))
    out: dict[str, Tensor] = {}
    for official, ours, _ in pairs:
        tensor = sd[ours]
        out[official] = tensor[..., None] if ours.startswith("quantizer.") else tensor
    books = sd["quantizer.codebooks"]  # [K_total, N, d]
    expected = (cfg.total_codebooks, cfg.codebook_size, cfg.codebook_dim)
    if tuple(books.shape) != expected:
        raise CheckpointError(f"tensor 'quantizer.codebooks' has shape {tuple(books.shape)}, expected {expected}")
    for level, prefix in enumerate(_codebook_prefixes(cfg)):
        out[f"{prefix}._initialized"] = torch.ones(1, dtype=torch.float32)
        out[f"{prefix}.cluster_usage"] = torch.ones(cfg.codebook_size, dtype=torch.float32)
        out[f"{prefix}.embedding_sum"] = books[level].float().clone()
    return out
