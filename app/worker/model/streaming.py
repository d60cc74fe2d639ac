"""Per-slot streaming state shared by the LM and Mimi: slot masks, the state protocol, the KV ring.

Every network keeps its per-call state in buffers with `max_slots` rows (moshi-style, one row per
call). A module holding such state is a `SlotStateful`: `reset_slots(mask)` clears the rows where
`mask` [S] is True and leaves every other row bit for bit. A network resets all its stateful
submodules at once (`reset_stateful`), so a call joins by resetting its row and leaves by being
masked off.

The KV ring follows the reference's streaming attention (NVIDIA/personaplex `moshi`,
`RingKVCache.complete` and the mask `StreamingMultiheadAttention` builds from its positions):
a call that writes the positions ending (exclusive) at `end` into a ring of `capacity` cells first
stores them, then labels the cell at `end % capacity` (the oldest, position `end - capacity`) as
position `end`, which no query of the call may see. So:

    a query at position q sees the key at position p  iff  end - capacity < p <= q  (and p >= 0)

Stepping one position at a time (the LM, the depformer) a query sees the capacity - 1 most recent
positions, itself included; Mimi, writing two positions per frame, sees capacity - 2 then
capacity - 1. `ring_visible` states the rule once; every attention path (LM step and prefill,
depformer, Mimi streaming and whole-clip) builds its mask from it.
"""

from __future__ import annotations

import abc
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SlotsArg = Union[Tensor, int, Sequence[int]]


def slot_mask(slots: SlotsArg, max_slots: int, device: torch.device) -> Tensor:
    """bool [S] from a bool mask [S], a LongTensor/sequence of indices, or one index."""
    if isinstance(slots, Tensor) and slots.dtype == torch.bool:
        if slots.shape != (max_slots,):
            raise ValueError(f"slot mask must have shape ({max_slots},), got {tuple(slots.shape)}")
        return slots.to(device)
    if isinstance(slots, Tensor) and (slots.is_floating_point() or slots.dim() > 1):
        raise ValueError(f"slots must be a [S] bool mask or 1-D indices, got {slots.dtype} {tuple(slots.shape)}")
    idx = torch.as_tensor(slots, dtype=torch.long).reshape(-1)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= max_slots):
        raise ValueError(f"slot index out of range [0, {max_slots}): {idx.tolist()}")
    mask = torch.zeros(max_slots, dtype=torch.bool, device=device)
    mask[idx.to(device)] = True
    return mask


def check_slot(slot: int, max_slots: int) -> int:
    if not 0 <= int(slot) < max_slots:
        raise ValueError(f"slot {slot} out of range [0, {max_slots})")
    return int(slot)


def rows(mask: Tensor, ndim: int) -> Tensor:
    """View a [S] mask so it broadcasts over a tensor with `ndim` dims and slots first."""
    return mask.view(-1, *([1] * (ndim - 1)))


class SlotStateful(nn.Module, abc.ABC):
    """A module holding per-slot streaming state (rows = call slots)."""

    @abc.abstractmethod
    def reset_slots(self, mask: Tensor) -> None:
        """Clear the state of the rows where `mask` [S] is True; other rows stay bit for bit."""


def materialise_buffers(module: nn.Module, device: torch.device) -> None:
    """Allocate the buffers still on meta (per-slot state of a model built on meta) on `device`;
    the model's `init_state` fills them."""
    for m in module.modules():
        for name, buf in list(m.named_buffers(recurse=False)):
            if buf.is_meta:
                setattr(m, name, torch.empty(buf.shape, dtype=buf.dtype, device=device))


def reset_stateful(module: nn.Module, mask: Tensor) -> None:
    """Reset the rows `mask` [S] of every `SlotStateful` inside `module` (itself included)."""
    for m in module.modules():
        if isinstance(m, SlotStateful):
            m.reset_slots(mask)


# ------------------------------------------------------------------------------ the ring rule
def ring_visible(kpos: Tensor, qpos: Tensor, end: Tensor | int, capacity: int) -> Tensor:
    """The reference ring's attention rule (module docstring): bool, broadcast of the inputs.

    kpos: key positions (negative = empty cell); qpos: query positions; end: the end (exclusive)
    of the positions written by the call the query belongs to; capacity: the ring's cells.
    """
    return (kpos >= 0) & (kpos <= qpos) & (kpos > end - capacity)


def first_visible(end: int, capacity: int) -> int:
    """Lowest position a call writing up to `end` (exclusive) may see: the rule for one host int."""
    return max(0, end - capacity + 1)


def held_positions(last: Tensor, capacity: int) -> Tensor:
    """Position held by each ring cell when `last` [...] is the newest position written -> [..., C].

    Cell j holds the newest position <= last that is j modulo C (negative: never written)."""
    j = torch.arange(capacity, device=last.device)
    return last[..., None] - torch.remainder(last[..., None] - j, capacity)


class KVRing(SlotStateful):
    """Per-slot keys and values of the last `capacity` positions, one ring per attention layer.

    kv [2, S, H, C, Dh]: position p of a slot lives in cell p % C. Positions are kept by the owner
    (the LM's offsets, Mimi's step counters); the ring only stores and attends. Reset zeroes the
    rows (only theirs: a join costs one row, not the whole cache).
    """

    def __init__(self, max_slots: int, heads: int, capacity: int, head_dim: int, device=None, dtype=None) -> None:
        super().__init__()
        self.capacity = capacity
        shape = (2, max_slots, heads, capacity, head_dim)
        self.register_buffer("kv", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def reset_slots(self, mask: Tensor) -> None:
        if self.kv.is_meta:  # built on meta: nothing to clear until materialised (then init_state)
            return
        idx = mask.nonzero()[:, 0]  # a host sync: joins and leaves run between ticks, never in one
        self.kv.index_fill_(1, idx, 0.0)

    def _store(self, k: Tensor, v: Tensor, pos: Tensor, write: Tensor) -> None:
        """k, v [S, H, T, Dh] at positions pos [S, T] into the rows `write` [S]; other rows untouched."""
        s, h, t, dh = k.shape
        new = torch.stack([k, v]).to(self.kv.dtype)  # [2, S, H, T, Dh]
        idx = (pos % self.capacity)[None, :, None, :, None].expand(2, s, h, t, dh)
        self.kv.scatter_(3, idx, torch.where(rows(write, 4)[None], new, self.kv.gather(3, idx)))

    def mask(self, pos: Tensor) -> Tensor:
        """The rule's mask for one streaming call at positions pos [S, T] -> [S, 1, T, C].

        The same for every layer of a network: build it once per call and hand it to `attend`."""
        end = pos[:, -1:] + 1  # [S, 1]
        cells = held_positions(end - 1, self.capacity)  # [S, 1, C]
        return ring_visible(cells, pos[:, :, None], end[:, :, None], self.capacity)[:, None]

    def attend(self, q: Tensor, k: Tensor, v: Tensor, pos: Tensor, write: Tensor, mask: Tensor) -> Tensor:
        """One streaming call of all rows, as the reference's: store this call's keys, then attend.

        q, k, v [S, H, T, Dh] at consecutive positions pos [S, T]; write [S]: rows that advance
        (the others' output is garbage and their cells keep their values); mask: `mask(pos)`
        -> [S, H, T, Dh].
        """
        self._store(k, v, pos, write)
        keys, values = self.kv[0].to(q.dtype), self.kv[1].to(q.dtype)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)

    def attend_stepwise(self, slot: int, q: Tensor, k: Tensor, v: Tensor, p0: int) -> Tensor:
        """T positions p0.. of one slot in one forward, exactly as T one-position calls would see them.

        q, k, v [1, H, T, Dh]. Query p sees the ring's cells and this forward's keys under the rule
        with end = p + 1; afterwards the ring holds the last min(T, C) new keys -> [1, H, T, Dh].
        """
        t, c = q.shape[2], self.capacity
        qpos = p0 + torch.arange(t, device=q.device)  # [T]
        kpos = torch.cat([held_positions(qpos.new_tensor(p0 - 1), c), qpos])  # [C + T]
        mask = ring_visible(kpos[None, :], qpos[:, None], qpos[:, None] + 1, c)  # [T, C + T]
        ring_k, ring_v = self.kv[0, slot], self.kv[1, slot]  # [H, C, Dh]
        new_k, new_v = k[0].to(self.kv.dtype), v[0].to(self.kv.dtype)  # [H, T, Dh], rounded as stored
        keys = torch.cat([ring_k, new_k], dim=1)[None].to(q.dtype)
        values = torch.cat([ring_v, new_v], dim=1)[None].to(q.dtype)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        keep = min(t, c)
        cells = qpos[t - keep :] % c
        ring_k.index_copy_(1, cells, new_k[:, t - keep :])
        ring_v.index_copy_(1, cells, new_v[:, t - keep :])
        return out

    def window(self, written: int) -> Tensor:
        """Cells of the last min(written, C) positions of a slot that wrote `written`, oldest first."""
        n = min(max(written, 0), self.capacity)
        return torch.arange(written - n, written, device=self.kv.device) % self.capacity

    def export(self, slot: int, written: int) -> Tensor:
        """[2, H, n, Dh]: the slot's last n = min(written, C) positions in time order."""
        return self.kv[:, slot].index_select(2, self.window(written))

    def load(self, slot: int, written: int, kv: Tensor) -> None:
        """Inverse of `export`: kv [2, H, n, Dh] are the positions written - n .. written - 1."""
        self.kv[:, slot].index_copy_(2, self.window(written), kv.to(self.kv.device, self.kv.dtype))
