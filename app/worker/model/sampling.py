"""Per-row token sampling with a counter-based RNG.

Every row carries its own temperature, top-k and seed. The random numbers for a row are a pure
function of (seed, offset, stream, token id): a seeded call samples the same tokens whatever the
other rows do and whenever it joined, on CPU and on GPU alike (integer hashing is exact on both).
Sampling is Gumbel-max over the top-k logits, which draws from softmax(logits / temperature)
restricted to the top k, like the official multinomial-over-top-k. temperature <= 0 is greedy.

With a static candidate `width` (the largest top-k the worker serves; `candidate_width`), a step
takes one `topk` of that width and draws noise for those candidates only: the same uniform for the
same (key, token id) as the full-vocabulary path, so the same tokens, for k/V of the work (25 of
32 000 text ids, 250 of 2 048 audio ids). The two paths differ only on exact ties of a logit at the
k-th place across the width's edge, or of two scores (argmax order), neither seen in float32 logits.
"""

from __future__ import annotations

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
_MASK16 = 0xFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32), exact: every partial product stays < 2**49."""
    lo = x * (c & _MASK16)
    hi = ((x * (c >> 16)) & _MASK16) << 16
    return (lo + hi) & _MASK32


def hash32(x: Tensor) -> Tensor:
    """32-bit integer mixer ("lowbias32") on int64 tensors holding values in [0, 2**32)."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    x = x ^ (x >> 16)
    return x


def seed_key(seed: Tensor) -> Tensor:
    """The seed's part of a row key, [N] from seed [N] long: a constant of the seed, made once."""
    seed = seed.long()
    k = hash32(((seed >> 32) & _MASK32) ^ 0x9E3779B9)
    return hash32(k ^ (seed & _MASK32))


def step_key(seed_k: Tensor, offset: Tensor) -> Tensor:
    """The key of a row's step: its `seed_key` mixed with its offset [N] long (shared by streams)."""
    offset = offset.long()
    k = hash32(seed_k ^ (offset & _MASK32))
    return hash32(k ^ ((offset >> 32) & _MASK32))


def stream_key(step_k: Tensor, stream: Tensor | int) -> Tensor:
    """The key of one token stream of a step: [N] with stream int or [N]; [N, 1] with [P] -> [N, P]."""
    if isinstance(stream, Tensor):
        return hash32(step_k ^ (stream.to(step_k.device, torch.long) & _MASK32))
    return hash32(step_k ^ (int(stream) & _MASK32))  # a Python scalar: no host copy, graph-capturable


def row_keys(seed: Tensor, offset: Tensor, stream: Tensor | int) -> Tensor:
    """Mix (seed, offset, stream) into one 32-bit key per row. seed, offset: [N] long."""
    return stream_key(step_key(seed_key(seed), offset), stream)


def token_hashes(vocab: int, device: torch.device | str) -> Tensor:
    """The token ids' part of every uniform, [vocab] long: a constant of the vocabulary, made once."""
    return hash32(torch.arange(vocab, device=device, dtype=torch.long) + 0x632BE5AB)


def uniform_from_keys(keys: Tensor, tokens: Tensor) -> Tensor:
    """Uniform numbers in (0, 1), float32 [..., V], for keys [...] and `token_hashes` [V] (or a
    selection of them per key, [..., V])."""
    bits = hash32(keys[..., None] ^ tokens)  # [..., V]
    return ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def uniform(seed: Tensor, offset: Tensor, stream: Tensor | int, vocab: int) -> Tensor:
    """Uniform numbers in (0, 1), float32 [..., vocab], one per (row, stream, token id).

    seed, offset [N] with stream int or [N] give [N, V]; seed, offset [N, 1] with stream [P] give
    [N, P, V]: the noise of P streams in one go, equal to P separate calls.
    """
    return uniform_from_keys(row_keys(seed, offset, stream), token_hashes(vocab, seed.device))


def gumbel_from_keys(keys: Tensor, tokens: Tensor) -> Tensor:
    """Standard Gumbel noise, float32 [..., V], for keys [...] and `token_hashes` [V]."""
    return -torch.log(-torch.log(uniform_from_keys(keys, tokens)))


def gumbel(seed: Tensor, offset: Tensor, stream: Tensor | int, vocab: int) -> Tensor:
    """Standard Gumbel noise, float32 [N, vocab], a pure function of its key."""
    return gumbel_from_keys(row_keys(seed, offset, stream), token_hashes(vocab, seed.device))


MAX_TOP_K = 512  # top-k above this (and below the vocabulary) acts as this; 0 = no filter


def top_k_mask(logits: Tensor, top_k: Tensor) -> Tensor:
    """Bool [N, V]: True for tokens kept by per-row top-k (top_k <= 0 or >= V keeps all).

    The k-th largest value comes from one `topk` of a static width (min(MAX_TOP_K, V)), not a full
    sort: the same result for every k up to MAX_TOP_K, several times cheaper on a 32000-token row.
    """
    vocab = logits.shape[-1]
    width = min(MAX_TOP_K, vocab)
    k = top_k.long().clamp(min=1, max=width)  # [N]
    kth = logits.topk(width, dim=-1).values.gather(-1, (k - 1)[:, None])  # [N, 1]
    keep = logits >= kth
    no_filter = (top_k <= 0) | (top_k >= vocab)
    return keep | no_filter[:, None]


def candidate_width(top_ks: list[int], vocab: int) -> int | None:
    """The static candidate width for rows whose top-k is one of `top_ks` (0: no filter), or None
    when some row needs the whole vocabulary (no filter, or k >= vocab)."""
    if not top_ks or any(k <= 0 or k >= vocab for k in top_ks):
        return None
    return max(top_ks)


def sample_candidates(
    logits: Tensor,
    temperature: Tensor,
    top_k: Tensor,
    keys: Tensor,
    token_hash: Tensor,
    width: int,
) -> Tensor:
    """Sample one token per row among its top `top_k` (<= width) logits, noise for those only.

    logits [N, V]; temperature [N]; top_k [N] long in [1, width] (`SamplingParams.set` refuses
    others); keys [N] (`stream_key` of this stream); token_hash [V] (`token_hashes`). Returns [N].
    """
    logits = logits.float()
    temp = temperature.to(torch.float32)
    greedy = temp <= 0  # [N]
    safe_temp = torch.where(greedy, torch.ones_like(temp), temp)
    values, ids = logits.topk(width, dim=-1)  # [N, W] each, largest first
    k = top_k.long().clamp(min=1, max=width)  # [N]
    kth = values.gather(-1, (k - 1)[:, None])  # [N, 1]
    noise = gumbel_from_keys(keys, token_hash[ids])  # [N, W]: the full path's noise of these ids
    scores = (values / safe_temp[:, None] + noise).masked_fill(values < kth, float("-inf"))
    sampled = ids.gather(-1, scores.argmax(dim=-1, keepdim=True))[:, 0]
    return torch.where(greedy, logits.argmax(dim=-1), sampled)


def sample(
    logits: Tensor,
    temperature: Tensor,
    top_k: Tensor,
    seed: Tensor,
    offset: Tensor,
    stream: Tensor | int,
    noise: Tensor | None = None,
) -> Tensor:
    """Sample one token per row.

    logits [N, V] (any float dtype, computed in float32); temperature [N] float; top_k [N] long;
    seed [N] long; offset [N] long (the row's own step counter); stream: int or [N] long (which
    token stream of the step: 0 text, 1 + k depformer step k). Returns [N] long.
    noise [N, V]: this stream's `gumbel(seed, offset, stream, V)` when the caller made it already
    (e.g. from keys and token hashes kept between steps); then seed/offset/stream are not used.
    Rows with temperature <= 0 take the argmax of the logits.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V], got {tuple(logits.shape)}")
    logits = logits.float()
    vocab = logits.shape[-1]
    temp = temperature.to(torch.float32)
    greedy = temp <= 0  # [N]
    safe_temp = torch.where(greedy, torch.ones_like(temp), temp)
    if noise is None:
        noise = gumbel(seed, offset, stream, vocab)
    scores = logits / safe_temp[:, None] + noise
    scores = scores.masked_fill(~top_k_mask(logits, top_k), float("-inf"))
    sampled = scores.argmax(dim=-1)
    return torch.where(greedy, logits.argmax(dim=-1), sampled)
