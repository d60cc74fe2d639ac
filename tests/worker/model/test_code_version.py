"""MODEL_CODE_VERSION moves with the prefill's numerics (app/worker/model/__init__.py says why).

A golden prefill: a tiny LM with seeded weights runs two persona prompts (a voice given as codes,
and one given as replayed embeddings, both past the context so the rings wrap). Its states are
summarised by exact token rings and by fixed random projections of the KV. When any code the
prefill runs changes a number (the attention rule, RoPE, a norm, the embedding sum, the token
ring), the summary moves and this test fails until MODEL_CODE_VERSION is bumped and the golden
below is recomputed for it (run this file with GOLDEN_PRINT=1 to print the new figures). Edits that
change no number keep the version, so they keep every cached persona state.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import torch

from app.worker.model import MODEL_CODE_VERSION, prompts
from app.worker.model.lm import LMConfig, PersonaPlexLM
from app.worker.model.lm_state import SlotState

GOLDEN_VERSION = 1
GOLDEN = {
    "codes": {
        "offset": 36,
        "tokens": "fc76953bda51a33c",
        "kv": [-0.9888422, 37.843709, -33.7923851, 27.9656463, -117.5519817, 50.3592398],
    },
    "embeddings": {
        "offset": 36,
        "tokens": "fc76953bda51a33c",
        "kv": [59.5520136, 64.8746194, 8.1536808, -9.2945367, -120.2201856, -1.377863],
    },
}
TOLERANCE = 1e-4  # relative to the projections' scale: rounding noise of other CPUs passes, numerics don't


def _summary(state: SlotState) -> dict[str, object]:
    digest = hashlib.sha256(state.cache.numpy().tobytes() + state.provided.numpy().tobytes()).hexdigest()[:16]
    kv = state.kv.double().flatten()
    gen = torch.Generator().manual_seed(99)
    proj = torch.randn(6, kv.numel(), generator=gen, dtype=torch.float64) / kv.numel() ** 0.5
    return {"offset": int(state.offset), "tokens": digest, "kv": [round(float(x), 7) for x in proj @ kv]}


def _golden_states() -> dict[str, dict[str, object]]:
    cfg = dataclasses.replace(LMConfig.tiny(), context=24)
    torch.manual_seed(1234)
    lm = PersonaPlexLM(cfg, max_slots=2).eval()
    with torch.no_grad():
        for p in lm.parameters():  # larger than the default init, so attention is far from uniform
            p.mul_(20.0)
    gen = torch.Generator().manual_seed(7)
    role = [int(t) for t in torch.randint(4, cfg.text_card, (15,), generator=gen)]
    codes = prompts.VoiceCodes(codes=torch.randint(0, cfg.card, (9, 8), generator=gen))
    other = torch.randint(0, cfg.card, (9, 8), generator=gen)  # another voice, replayed as embeddings
    frames = prompts.prompt_frames(cfg, [], other)[:, :9]  # [17, 9]: its voice frames
    columns = lm.frames_to_columns(frames[None])[:, :, :-1]
    voice = prompts.VoiceEmbeddings(
        embeddings=lm.embed_columns(columns)[0].float(),
        cache=torch.randint(0, cfg.text_card, (cfg.num_streams, cfg.cache_len), generator=gen),
    )
    return {
        "codes": _summary(prompts.build_prompt_state(lm, 0, role, codes)),
        "embeddings": _summary(prompts.build_prompt_state(lm, 1, role, voice)),
    }


def test_the_prefill_numerics_match_the_golden_of_this_version() -> None:
    found = _golden_states()
    if os.environ.get("GOLDEN_PRINT"):
        print(f"GOLDEN_VERSION = {MODEL_CODE_VERSION}\nGOLDEN = {found!r}")
    assert MODEL_CODE_VERSION == GOLDEN_VERSION, (
        f"MODEL_CODE_VERSION is {MODEL_CODE_VERSION}: recompute the golden (GOLDEN_PRINT=1) for it"
    )
    for name, want in GOLDEN.items():
        got = found[name]
        assert got["offset"] == want["offset"] and got["tokens"] == want["tokens"], name
        scale = max(abs(x) for x in want["kv"])
        drift = max(abs(a - b) for a, b in zip(got["kv"], want["kv"]))
        assert drift <= TOLERANCE * scale, (
            f"{name}: the prefill's numbers moved by {drift:.3g} (scale {scale:.3g}) while MODEL_CODE_VERSION "
            f"stayed {MODEL_CODE_VERSION}: bump it in app/worker/model/__init__.py and recompute the golden"
        )
