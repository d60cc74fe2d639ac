"""Test-side references for the model: the reference ring's views and whole-sequence forwards.

`ring_views` restates, in plain Python, how NVIDIA's reference streaming attention
(NVIDIA/personaplex, `moshi/modules/transformer.py`: `RingKVCache.complete` and the mask that
`StreamingMultiheadAttention.forward` builds) decides what a query sees: a ring of `capacity`
cells, each call writes `chunk` positions, then labels every cell with a position computed from
`end_offset` (the cell at `end_offset % capacity` gets the label `end_offset`, a position no
query of the call may see) and masks by label (`pos_k >= 0`, causal, `delta < context`). It
knows nothing of `app/`: the model's masks are checked against it.

`lm_forward_sequence` and `depformer_forward` run our networks' weights over whole sequences with
an explicit mask: checked against transformers' Moshi (given the same masks), they are the
teacher-forced references for streaming, sampled or given, of any length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from app.worker.model.lm import Depformer, PersonaPlexLM, embed, embed_stacked, multi_linear
from app.worker.model.rope import rope_tables


def ring_views(capacity: int, chunk: int, n: int, context: int | None = None) -> Tensor:
    """bool [n, n] (query, key position): what the reference ring shows each of n positions
    written `chunk` at a time. context defaults to the capacity (None: no delta bound, the depformer)."""
    limit = capacity if context is None else context
    views = torch.zeros(n, n, dtype=torch.bool)
    held: list[int | None] = [None] * capacity  # position stored in each cell
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        for p in range(start, stop):
            held[p % capacity] = p
        end = stop  # end_offset after the call
        end_index = end % capacity
        for i, position in enumerate(held):
            if position is None or i >= end:
                continue  # never written: label -1
            delta = i - end_index
            label = end + delta if delta <= 0 else end + delta - capacity
            for q in range(start, stop):
                if 0 <= label <= q and (context is None or q - label < limit):
                    views[q, position] = True
    return views


def training_window(n: int, context: int) -> Tensor:
    """bool [n, n]: causal within `context` positions (the model as trained; transformers' window)."""
    pos = torch.arange(n)
    delta = pos[:, None] - pos[None, :]
    return (delta >= 0) & (delta < context)


@torch.no_grad()
def depformer_forward(depformer: Depformer, out: Tensor, tokens: Tensor, mask: Tensor) -> Tensor:
    """Teacher-forced depformer logits: out [N, D], tokens [N, P] (text, codebooks 0..P-2), mask
    [P, P] (step, step) -> [N, P, card] float32."""
    p = depformer.steps
    x = torch.einsum("nd,pod->npo", out, depformer.in_proj)  # [N, P, Dd]
    tok = [embed(depformer.text_emb.weight, tokens[:, :1])]
    if p > 1:
        tok.append(embed_stacked(depformer.audio_emb, tokens[:, 1:p]))
    x = x + torch.cat(tok, dim=1)
    n = x.shape[0]
    for layer in depformer.layers:
        qkv = multi_linear(layer.attn_norm(x), layer.attn_in).view(n, p, 3, layer.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # [N, Hd, P, Dh]
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + multi_linear(att.transpose(1, 2).reshape(n, p, -1), layer.attn_out)
        a, g = multi_linear(layer.ffn_norm(x), layer.ffn_in).chunk(2, dim=-1)
        x = x + multi_linear(F.silu(a) * g, layer.ffn_out)
    return multi_linear(x, depformer.heads).float()


@torch.no_grad()
def lm_forward_sequence(
    model: PersonaPlexLM, columns: Tensor, mask: Tensor, depformer_mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Whole-sequence teacher-forced forward, no state (reference forward_codes + depformer training).

    columns [B, 17, T + 1] (delayed input columns). Position t uses input column t and its
    depformer is teacher-forced with column t + 1. mask [T, T] (query, key) for the temporal
    transformer; depformer_mask [P, P] (default: causal). KV pass through the model's kv_dtype as
    the streaming ring stores them. Returns text logits [B, T, Vt] and audio logits [B, P, T, card].
    """
    b, k, t1 = columns.shape
    t = t1 - 1
    cfg = model.cfg
    x = model.embed_columns(columns[:, :, :-1])  # [B, T, D]
    pos = torch.arange(t)
    rope = rope_tables(pos[None].expand(b, -1), cfg.head_dim, cfg.max_period)
    for layer in model.layers:
        q, kk, v = layer.qkv(x, rope)
        kk = kk.to(model.kv_dtype).to(q.dtype)
        v = v.to(model.kv_dtype).to(q.dtype)
        x = layer.finish(x, F.scaled_dot_product_attention(q, kk, v, attn_mask=mask))
    out = model.out_norm(x)  # [B, T, D]
    text_logits = model.text_head(out).float()
    p = model.depformer_steps
    if depformer_mask is None:
        depformer_mask = torch.ones(p, p, dtype=torch.bool).tril()
    dep_tokens = columns[:, :p, 1:].permute(0, 2, 1).reshape(b * t, p)  # [B*T, P]
    audio = depformer_forward(model.depformer, out.reshape(b * t, -1), dep_tokens, depformer_mask)
    return text_logits, audio.view(b, t, p, -1).permute(0, 2, 1, 3)
