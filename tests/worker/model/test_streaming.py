"""The per-slot KV ring (app/worker/model/streaming.py) shows each query what the reference ring does.

The views come from `reference.ring_views`, a plain restatement of NVIDIA's `RingKVCache`. The
ring's attention is probed directly: all-zero queries and keys give every visible key the same
weight, and one-hot values (one dimension per position) make the output name the positions seen.
"""

from __future__ import annotations

import pytest
import torch

from app.worker.model.streaming import KVRing, first_visible, reset_stateful, ring_visible, slot_mask
from tests.worker.model.reference import ring_views


def _seen(out: torch.Tensor) -> torch.Tensor:
    """Positions a probe output [..., n] (mean of one-hot values) attended to: bool [..., n]."""
    return out > 1e-6


def _probe(n: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero keys and one-hot values [S, 1, T, n] for the given positions [S, T]."""
    values = torch.nn.functional.one_hot(positions, n).float()[:, None]  # [S, 1, T, n]
    return torch.zeros_like(values), values


@pytest.mark.parametrize("capacity,chunk", [(4, 1), (6, 1), (8, 1), (6, 2), (8, 2), (7, 3)])
def test_streaming_calls_see_what_the_reference_ring_shows(capacity, chunk):
    n = 6 * capacity  # several times past the capacity
    ring = KVRing(max_slots=2, heads=1, capacity=capacity, head_dim=n)
    want = ring_views(capacity, chunk, n)
    write = torch.tensor([True, False])
    for start in range(0, n, chunk):
        pos = torch.arange(start, start + chunk)[None].expand(2, -1)  # [2, T]
        k, v = _probe(n, pos)
        out = ring.attend(torch.zeros_like(k), k, v, pos, write, ring.mask(pos))[0, 0]  # [T, n]
        assert torch.equal(_seen(out), want[start : start + chunk]), start
    assert bool((ring.kv[:, 1] == 0).all())  # a row that never advanced keeps its cells


@pytest.mark.parametrize("capacity", [4, 6, 8])
@pytest.mark.parametrize("split", [0, 5, 17])
def test_a_stepwise_forward_sees_what_one_position_calls_see(capacity, split):
    """attend_stepwise over T positions (in one or two forwards, past the capacity) == T calls."""
    n = 5 * capacity
    want = ring_views(capacity, 1, n)
    ring = KVRing(max_slots=2, heads=1, capacity=capacity, head_dim=n)
    seen = []
    for lo, hi in ((0, split), (split, n)):
        if hi == lo:
            continue
        pos = torch.arange(lo, hi)[None]
        k, v = _probe(n, pos)
        seen.append(_seen(ring.attend_stepwise(1, torch.zeros_like(k), k, v, lo)[0, 0]))
    assert torch.equal(torch.cat(seen), want)
    stepped = KVRing(max_slots=2, heads=1, capacity=capacity, head_dim=n)
    for p in range(n):
        pos = torch.tensor([[p], [p]])
        k, v = _probe(n, pos)
        stepped.attend(torch.zeros_like(k), k, v, pos, torch.tensor([False, True]), stepped.mask(pos))
    assert torch.equal(ring.kv, stepped.kv)  # the same cells afterwards


def test_the_rule_in_numbers():
    """Stepping: the C - 1 latest positions; two per call: C - 2 then C - 1; never the future."""
    c = 6
    q = torch.tensor(20)
    seen = [p for p in range(25) if bool(ring_visible(torch.tensor(p), q, q + 1, c))]
    assert seen == list(range(16, 21))
    first = [p for p in range(25) if bool(ring_visible(torch.tensor(p), torch.tensor(20), 22, c))]
    second = [p for p in range(25) if bool(ring_visible(torch.tensor(p), torch.tensor(21), 22, c))]
    assert len(first) == c - 2 and len(second) == c - 1
    assert first_visible(16, 16) == 1 and first_visible(15, 16) == 0


def test_export_load_and_reset_touch_one_row():
    ring = KVRing(max_slots=3, heads=2, capacity=5, head_dim=4)
    ring.kv.normal_()
    before = ring.kv.clone()
    window = ring.export(1, written=12)  # positions 7..11, oldest first
    assert window.shape == (2, 2, 5, 4)
    assert torch.equal(window[:, :, 0], before[:, 1, :, 7 % 5])
    ring.load(0, 12, window)
    assert torch.equal(ring.kv[:, 0], ring.kv[:, 1]) and torch.equal(ring.kv[:, 2], before[:, 2])
    short = ring.export(2, written=3)
    assert short.shape == (2, 2, 3, 4)
    reset_stateful(ring, slot_mask([1], 3, ring.kv.device))
    assert bool((ring.kv[:, 1] == 0).all()) and torch.equal(ring.kv[:, 2], before[:, 2])


@pytest.mark.parametrize(
    "slots,error",
    [(torch.tensor([True, False]), "shape"), ([3], "out of range"), (torch.tensor([[0]]), "1-D"), (-1, "out of range")],
)
def test_slot_mask_rejects_bad_slots(slots, error):
    with pytest.raises(ValueError, match=error):
        slot_mask(slots, 3, torch.device("cpu"))
