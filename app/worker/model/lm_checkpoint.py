"""Official PersonaPlex LM checkpoint layout (moshi `LMModel`, dep_q=16) <-> `PersonaPlexLM` state_dict.

Official layout: per-codebook ModuleLists (`emb.{k}`, `depformer_in.{k}`, `depformer_emb.{k}`,
`linears.{k}`, `depformer.layers.{i}.gating.{k}`), multi-linear depformer attention stored as one
`[dep_q * out, in]` matrix, RMSNorm scales `alpha` of shape [1, 1, dim]. Ours stacks per-step
weights as [P, out, in] and keeps only the first `depformer_steps` depformer steps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from app.worker.model.errors import check_layout
from app.worker.model.lm import AGENT_CODEBOOKS, LMConfig


def expected_official_shapes(cfg: LMConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the official checkpoint and its shape."""
    d, dd, p = cfg.dim, cfg.depformer_dim, cfg.dep_q
    h, hd = cfg.ffn_hidden, cfg.depformer_ffn_hidden
    shapes: dict[str, tuple[int, ...]] = {}
    for k in range(cfg.n_q):
        shapes[f"emb.{k}.weight"] = (cfg.card + 1, d)
    shapes["text_emb.weight"] = (cfg.text_card + 1, d)
    shapes["text_linear.weight"] = (cfg.text_vocab, d)
    shapes["out_norm.alpha"] = (1, 1, d)
    for i in range(cfg.num_layers):
        pre = f"transformer.layers.{i}."
        shapes[pre + "self_attn.in_proj_weight"] = (3 * d, d)
        shapes[pre + "self_attn.out_proj.weight"] = (d, d)
        shapes[pre + "norm1.alpha"] = (1, 1, d)
        shapes[pre + "norm2.alpha"] = (1, 1, d)
        shapes[pre + "gating.linear_in.weight"] = (2 * h, d)
        shapes[pre + "gating.linear_out.weight"] = (d, h)
    for k in range(p):
        shapes[f"depformer_in.{k}.weight"] = (dd, d)
        shapes[f"linears.{k}.weight"] = (cfg.card, dd)
    for k in range(p - 1):
        shapes[f"depformer_emb.{k}.weight"] = (cfg.card + 1, dd)
    shapes["depformer_text_emb.weight"] = (cfg.text_card + 1, dd)
    for i in range(cfg.depformer_num_layers):
        pre = f"depformer.layers.{i}."
        shapes[pre + "self_attn.in_proj_weight"] = (p * 3 * dd, dd)
        shapes[pre + "self_attn.out_proj.weight"] = (p * dd, dd)
        shapes[pre + "norm1.alpha"] = (1, 1, dd)
        shapes[pre + "norm2.alpha"] = (1, 1, dd)
        for k in range(p):
            shapes[pre + f"gating.{k}.linear_in.weight"] = (2 * hd, dd)
            shapes[pre + f"gating.{k}.linear_out.weight"] = (dd, hd)
    return shapes


def _check(sd: dict[str, Tensor], cfg: LMConfig) -> None:
    check_layout(sd, expected_official_shapes(cfg), "PersonaPlex LM checkpoint")


def from_official(
    sd: dict[str, Tensor], cfg: LMConfig, depformer_steps: int = AGENT_CODEBOOKS
) -> dict[str, Tensor]:
    """Official keys -> `PersonaPlexLM(cfg, ..., depformer_steps=depformer_steps)` state_dict.

    Raises CheckpointError naming every missing or unexpected tensor and each wrong shape.
    """
    if not 1 <= depformer_steps <= cfg.dep_q:
        raise ValueError(f"depformer_steps must be in [1, {cfg.dep_q}], got {depformer_steps}")
    _check(sd, cfg)
    d, dd, p, q = cfg.dim, cfg.depformer_dim, depformer_steps, cfg.dep_q
    out: dict[str, Tensor] = {
        "text_emb.weight": sd["text_emb.weight"],
        "audio_emb": torch.stack([sd[f"emb.{k}.weight"] for k in range(cfg.n_q)]),
        "text_head.weight": sd["text_linear.weight"],
        "out_norm.weight": sd["out_norm.alpha"].reshape(d),
    }
    for i in range(cfg.num_layers):
        src, dst = f"transformer.layers.{i}.", f"layers.{i}."
        out[dst + "attn_norm.weight"] = sd[src + "norm1.alpha"].reshape(d)
        out[dst + "attn_in.weight"] = sd[src + "self_attn.in_proj_weight"]
        out[dst + "attn_out.weight"] = sd[src + "self_attn.out_proj.weight"]
        out[dst + "ffn_norm.weight"] = sd[src + "norm2.alpha"].reshape(d)
        out[dst + "ffn_in.weight"] = sd[src + "gating.linear_in.weight"]
        out[dst + "ffn_out.weight"] = sd[src + "gating.linear_out.weight"]
    out["depformer.in_proj"] = torch.stack([sd[f"depformer_in.{k}.weight"] for k in range(p)])
    out["depformer.text_emb.weight"] = sd["depformer_text_emb.weight"]
    out["depformer.audio_emb"] = torch.stack([sd[f"depformer_emb.{k}.weight"] for k in range(p - 1)])
    out["depformer.heads"] = torch.stack([sd[f"linears.{k}.weight"] for k in range(p)])
    for i in range(cfg.depformer_num_layers):
        src, dst = f"depformer.layers.{i}.", f"depformer.layers.{i}."
        out[dst + "attn_norm.weight"] = sd[src + "norm1.alpha"].reshape(dd)
        out[dst + "attn_in"] = sd[src + "self_attn.in_proj_weight"].reshape(q, 3 * dd, dd)[:p].contiguous()
        out[dst + "attn_out"] = sd[src + "self_attn.out_proj.weight"].reshape(q, dd, dd)[:p].contiguous()
        out[dst + "ffn_norm.weight"] = sd[src + "norm2.alpha"].reshape(dd)
        out[dst + "ffn_in"] = torch.stack([sd[src + f"gating.{k}.linear_in.weight"] for k in range(p)])
        out[dst + "ffn_out"] = torch.stack([sd[src + f"gating.{k}.linear_out.weight"] for k in range(p)])
    return out


def to_official(sd: dict[str, Tensor], cfg: LMConfig) -> dict[str, Tensor]:
    """`PersonaPlexLM` state_dict (holding all cfg.dep_q depformer steps) -> official keys."""
    if "depformer.in_proj" not in sd:
        raise ValueError("state_dict has no 'depformer.in_proj': not a PersonaPlexLM state_dict")
    p = sd["depformer.in_proj"].shape[0]
    if p != cfg.dep_q:
        raise ValueError(f"to_official needs all {cfg.dep_q} depformer steps, the state_dict holds {p}")
    d, dd = cfg.dim, cfg.depformer_dim
    out: dict[str, Tensor] = {
        "text_emb.weight": sd["text_emb.weight"],
        "text_linear.weight": sd["text_head.weight"],
        "out_norm.alpha": sd["out_norm.weight"].reshape(1, 1, d),
        "depformer_text_emb.weight": sd["depformer.text_emb.weight"],
    }
    for k in range(cfg.n_q):
        out[f"emb.{k}.weight"] = sd["audio_emb"][k].contiguous()
    for i in range(cfg.num_layers):
        src, dst = f"layers.{i}.", f"transformer.layers.{i}."
        out[dst + "norm1.alpha"] = sd[src + "attn_norm.weight"].reshape(1, 1, d)
        out[dst + "self_attn.in_proj_weight"] = sd[src + "attn_in.weight"]
        out[dst + "self_attn.out_proj.weight"] = sd[src + "attn_out.weight"]
        out[dst + "norm2.alpha"] = sd[src + "ffn_norm.weight"].reshape(1, 1, d)
        out[dst + "gating.linear_in.weight"] = sd[src + "ffn_in.weight"]
        out[dst + "gating.linear_out.weight"] = sd[src + "ffn_out.weight"]
    for k in range(p):
        out[f"depformer_in.{k}.weight"] = sd["depformer.in_proj"][k].contiguous()
        out[f"linears.{k}.weight"] = sd["depformer.heads"][k].contiguous()
    for k in range(p - 1):
        out[f"depformer_emb.{k}.weight"] = sd["depformer.audio_emb"][k].contiguous()
    for i in range(cfg.depformer_num_layers):
        src = dst = f"depformer.layers.{i}."
        out[dst + "norm1.alpha"] = sd[src + "attn_norm.weight"].reshape(1, 1, dd)
        out[dst + "norm2.alpha"] = sd[src + "ffn_norm.weight"].reshape(1, 1, dd)
        out[dst + "self_attn.in_proj_weight"] = sd[src + "attn_in"].reshape(p * 3 * dd, dd)
        out[dst + "self_attn.out_proj.weight"] = sd[src + "attn_out"].reshape(p * dd, dd)
        for k in range(p):
            out[dst + f"gating.{k}.linear_in.weight"] = sd[src + "ffn_in"][k].contiguous()
            out[dst + f"gating.{k}.linear_out.weight"] = sd[src + "ffn_out"][k].contiguous()
    return out
