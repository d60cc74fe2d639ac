"""RoPE tables built once per forward and shared by layers, q and k rotated together."""

from __future__ import annotations

import torch

from app.worker.model.rope import rope_tables, rotate


def test_position_zero_is_the_identity_and_pairs_keep_their_length() -> None:
    x = torch.randn(2, 4, 3, 16)  # [B, H, T, Dh]
    pos = torch.tensor([[0, 5, 2999], [0, 1, 2]])
    y = rotate(x, rope_tables(pos, 16, 10000.0))
    assert torch.equal(y[:, :, 0], x[:, :, 0])
    pair_norms = lambda t: t.unflatten(-1, (8, 2)).norm(dim=-1)  # noqa: E731
    torch.testing.assert_close(pair_norms(y), pair_norms(x))


def test_scores_depend_only_on_the_distance_between_query_and_key() -> None:
    q, k = torch.randn(1, 1, 1, 32, dtype=torch.float64), torch.randn(1, 1, 1, 32, dtype=torch.float64)

    def score(pq: int, pk: int) -> float:
        rq = rotate(q, rope_tables(torch.tensor([[pq]]), 32, 10000.0)).double()
        rk = rotate(k, rope_tables(torch.tensor([[pk]]), 32, 10000.0)).double()
        return float((rq * rk).sum())

    assert abs(score(7, 3) - score(107, 103)) < 1e-4
    assert abs(score(7, 3) - score(3, 7)) > 1e-3


def test_stacked_q_and_k_rotate_exactly_as_each_alone() -> None:
    qk = torch.randn(2, 3, 4, 1, 8, dtype=torch.bfloat16)  # [2, B, H, T, Dh]
    tables = rope_tables(torch.tensor([[4], [90], [2000]]), 8, 10000.0)
    both = rotate(qk, tables)
    assert both.dtype == torch.bfloat16
    assert torch.equal(both[0], rotate(qk[0], tables)) and torch.equal(both[1], rotate(qk[1], tables))
