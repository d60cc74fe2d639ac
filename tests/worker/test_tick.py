"""The model tick on static buffers: only the given rows advance, outputs come back in row order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.protocol import FRAME_SAMPLES
from app.worker.model.lm import LMConfig, PersonaPlexLM
from app.worker.model.mimi import Mimi, MimiConfig
from app.worker.tick import ModelTick


def _models(slots: int) -> tuple[PersonaPlexLM, Mimi]:
    torch.manual_seed(0)
    lm = PersonaPlexLM(LMConfig.tiny(), max_slots=slots).eval()
    mimi = Mimi(MimiConfig.tiny(), max_slots=slots).eval()
    return lm, mimi


def _speechy(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, FRAME_SAMPLES)) * 3000).astype(np.int16)


def test_only_the_given_rows_advance_and_outputs_follow_row_order() -> None:
    lm, mimi = _models(3)
    tick = ModelTick(lm, mimi)
    kv_before = lm.kv[:, :, 0].clone()
    offsets = []
    for t in range(4):
        out = tick.run([2, 1], _speechy(2, t))
        assert out.shape == (2, FRAME_SAMPLES + 1 + 8) and out.dtype == np.int16
        offsets.append(lm.offset.tolist())
    assert offsets[-1] == [0, 4, 4]  # slot 0 never ran
    assert torch.equal(lm.kv[:, :, 0], kv_before)
    # After the first two frames (offset > max delay) the rows carry valid agent codes.
    pcm, text, codes = tick.split(out)
    assert pcm.shape == (2, FRAME_SAMPLES) and text.shape == (2,) and codes.shape == (2, 8)
    assert (codes >= 0).all() and (codes < 2048).all()


def test_same_frames_give_the_same_output_whichever_slot_and_batch() -> None:
    """Row results do not depend on the slot index or on the other rows of the tick."""
    frames = [_speechy(1, 10 + t) for t in range(5)]
    lm_a, mimi_a = _models(3)
    lm_b, mimi_b = _models(3)
    for lm in (lm_a, lm_b):
        lm.set_sampling([0, 1, 2], seed=99)
    alone = ModelTick(lm_a, mimi_a)
    busy = ModelTick(lm_b, mimi_b)
    for t, frame in enumerate(frames):
        a = alone.run([0], frame)
        b = busy.run([1, 2], np.concatenate([frame, _speechy(1, 50 + t)]))
        assert np.array_equal(a[0, FRAME_SAMPLES:], b[0, FRAME_SAMPLES:])  # text + codes exactly
        assert np.abs(a[0, :FRAME_SAMPLES].astype(int) - b[0, :FRAME_SAMPLES].astype(int)).max() <= 1


def test_a_cuda_graph_needs_a_cuda_device() -> None:
    lm, mimi = _models(1)
    with pytest.raises(ValueError, match="CUDA"):
        ModelTick(lm, mimi, cuda_graph=True)
