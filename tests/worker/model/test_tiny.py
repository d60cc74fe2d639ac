"""The random-weight models: weights for any config built once and shared by every slot count."""

from __future__ import annotations

import torch

from app.worker.model.lm import LMConfig
from app.worker.model.mimi import MimiConfig
from app.worker.model.tiny import build_weights, configs, models_for


def test_full_size_models_share_one_copy_of_the_weights() -> None:
    """The bench's --full path wired on the meta device: PersonaPlex sizes, bf16 weights and KV, no weight copies."""
    meta = torch.device("meta")
    lm_cfg, mimi_cfg = configs(full=True)
    weights, _, _ = build_weights(lm_cfg, mimi_cfg, device=meta, dtype=torch.bfloat16)
    lm, mimi = models_for(weights, 32, meta)
    assert len(lm.rings) == 32  # one KV ring per layer, [2, S, H, C, Dh] each
    assert tuple(lm.rings[0].kv.shape) == (2, 32, 32, 3000, 128) and lm.rings[0].kv.dtype == torch.bfloat16
    assert lm.text_emb.weight.dtype == torch.bfloat16
    assert 7.6e9 < sum(p.numel() for p in lm.parameters()) < 7.8e9  # 8 depformer steps only
    assert mimi.encoder_transformer.layers[0].attn.ring.kv.shape[1] == 32

    assert configs() == (LMConfig.tiny(), MimiConfig.tiny())
    tiny, _, _ = build_weights(*configs(), device=torch.device("cpu"), dtype=torch.float32)
    lm_a, mimi_a = models_for(tiny, 2, torch.device("cpu"))
    lm_b, _ = models_for(tiny, 5, torch.device("cpu"))
    assert lm_a.text_emb.weight.data_ptr() == lm_b.text_emb.weight.data_ptr()
    assert mimi_a.quantizer.codebooks.data_ptr() == tiny.mimi["quantizer.codebooks"].data_ptr()
    assert lm_b.rings[0].kv.shape[1] == 5 and int(lm_b.tokens.offset.sum()) == 0
