"""Rotary position embedding of the LM and of Mimi: interleaved pairs (2i, 2i+1), float32 math.

The cos/sin tables depend on the positions only, so a forward pass builds them once (`rope_tables`)
and every layer only rotates (`rotate`): a few operators per layer instead of a dozen.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

Tables = tuple[Tensor, Tensor]  # cos, sin: [B, 1, T, Dh/2] float32


def rope_tables(pos: Tensor, head_dim: int, max_period: float) -> Tables:
    """cos and sin [B, 1, T, Dh/2] (float32) for positions pos [B, T]."""
    ds = torch.arange(head_dim // 2, device=pos.device, dtype=torch.float32)
    freqs = torch.exp(ds * (-math.log(max_period) * 2 / head_dim))  # [Dh/2]
    angles = pos.to(torch.float32)[:, None, :, None] * freqs  # [B, 1, T, Dh/2]
    return torch.cos(angles), torch.sin(angles)


def rotate(x: Tensor, tables: Tables) -> Tensor:
    """x [..., B, H, T, Dh] rotated by `tables` (leading dims broadcast, e.g. q and k stacked)."""
    cos, sin = tables
    dh = x.shape[-1]
    xr, xi = x.float().unflatten(-1, (dh // 2, 2)).unbind(-1)  # [..., B, H, T, Dh/2] each
    out = torch.stack([xr * cos - xi * sin, xr * sin + xi * cos], dim=-1)  # [..., B, H, T, Dh/2, 2]
    return out.flatten(-2).to(x.dtype)
