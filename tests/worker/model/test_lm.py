"""PersonaPlex LM (app/worker/model/lm.py, lm_checkpoint.py).

Oracle: transformers' MoshiForConditionalGeneration (temporal transformer, text head, 8-step depth
decoder) and a standalone 16-step MoshiDepthDecoder, loaded with the same tiny random weights
written in the official key layout and mapped by a test-local official -> HF key map.

What HF cannot express directly, and how the tests handle it (all comparisons stay exact maths):
  * RoPE: HF rotates halves, the official code rotates interleaved pairs -> the key map permutes the
    q/k projection rows per head (a relabelling of dimensions; q.k is unchanged).
  * MoshiConfig forces the depth decoder to `num_codebooks` (8) steps -> the 16-step depformer is
    compared with a standalone MoshiDepthDecoder(num_codebooks=16); the 8-step one inside
    MoshiForConditionalGeneration checks the agent steps.
  * HF's causal mask ignores `sliding_window` -> beyond `context` the window is passed to HF as an
    explicit 4D mask; below it HF's own causal mask is used.
  * HF embeddings have no zero token (-1 -> zero vector) -> oracle inputs hold real tokens only and
    the zero-token rule is tested on its own (test_zero_token_embeds_to_zero).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import pytest
import torch

from app.worker.model import lm_checkpoint as ck
from app.worker.model.errors import CheckpointError
from app.worker.model.lm import LMConfig, PersonaPlexLM
from app.worker.model.prompts import SINE_TOKENS
from tests.worker.model.reference import lm_forward_sequence, ring_views, training_window

CFG = LMConfig.tiny()
ATOL = 1e-4
AGENT = 8  # agent codebooks; HF's num_codebooks


# ----------------------------------------------------------------------------------- helpers
@functools.lru_cache(maxsize=None)
def _official_weights(cfg: LMConfig, seed: int) -> dict[str, torch.Tensor]:
    """Random weights (all 16 depformer steps) in the official key layout."""
    model = PersonaPlexLM(cfg, 1, depformer_steps=cfg.dep_q)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(noise * p.shape[-1] ** -0.5)
    return ck.to_official(model.state_dict(), cfg)


def make_model(cfg: LMConfig = CFG, max_slots: int = 3, depformer_steps: int = 8, seed: int = 0) -> PersonaPlexLM:
    model = PersonaPlexLM(cfg, max_slots, depformer_steps=depformer_steps)
    model.load_state_dict(ck.from_official(_official_weights(cfg, seed), cfg, depformer_steps))
    return model.eval()


def random_frames(batch: int, n: int, gen: torch.Generator, cfg: LMConfig = CFG) -> torch.Tensor:
    """Fully given frames [B, 17, N]."""
    text = torch.randint(0, cfg.text_card, (batch, 1, n), generator=gen)
    audio = torch.randint(0, cfg.card, (batch, cfg.n_q, n), generator=gen)
    return torch.cat([text, audio], dim=1)


def state_rows(model: PersonaPlexLM) -> dict[str, torch.Tensor]:
    return {name: buf.clone() for name, buf in model.named_buffers()}


def all_kv(model: PersonaPlexLM) -> torch.Tensor:
    """Every layer's KV ring, stacked: [L, 2, S, H, C, Dh]."""
    return torch.stack([ring.kv for ring in model.rings])


def stepped(model: PersonaPlexLM, n: int) -> torch.Tensor:
    """The reference's view for n positions stepped one at a time through the LM's ring: [n, n]."""
    return ring_views(model.cfg.context, 1, n)


def depformer_view(model: PersonaPlexLM) -> torch.Tensor:
    """The reference's depformer ring (one cell per checkpoint step, no context bound): [P, P]."""
    return ring_views(model.cfg.dep_q, 1, model.depformer_steps, context=None)


def manual_columns(frames: torch.Tensor, cfg: LMConfig = CFG) -> torch.Tensor:
    """Delayed input columns written out by hand from the official LMGen rules."""
    b, k, n = frames.shape
    initial = [cfg.text_initial_id] + [cfg.audio_initial_id] * cfg.n_q
    cols = torch.empty_like(frames)
    for s in range(k):
        for t in range(n):
            src = t - cfg.delays[s]
            cols[:, s, t] = frames[:, s, src] if src >= 1 else initial[s]
    return cols


# ------------------------------------------------------------------------------ HF oracle
def _rope_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Official interleaved-pair RoPE rows -> HF rotate-half rows, per head."""
    out_dim, in_dim = w.shape
    dh = out_dim // heads
    return w.view(heads, dh // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def official_to_hf(off: dict[str, torch.Tensor], cfg: LMConfig, depth_steps: int) -> tuple[dict, dict]:
    """(MoshiForConditionalGeneration state_dict with `depth_steps` depth steps, 16-step MoshiDepthDecoder)."""
    d, dd, q = cfg.dim, cfg.depformer_dim, cfg.dep_q
    main: dict[str, torch.Tensor] = {}
    for k in range(cfg.n_q):
        main[f"embed_tokens.{k}.weight"] = off[f"emb.{k}.weight"]
    main["decoder.model.embed_tokens.weight"] = off["text_emb.weight"]
    main["decoder.model.norm.weight"] = off["out_norm.alpha"].reshape(d)
    main["decoder.lm_head.weight"] = off["text_linear.weight"]
    for i in range(cfg.num_layers):
        src, dst = f"transformer.layers.{i}.", f"decoder.model.layers.{i}."
        wq, wk, wv = off[src + "self_attn.in_proj_weight"].chunk(3, dim=0)
        main[dst + "self_attn.q_proj.linear.weight"] = _rope_permute(wq, cfg.num_heads)
        main[dst + "self_attn.k_proj.linear.weight"] = _rope_permute(wk, cfg.num_heads)
        main[dst + "self_attn.v_proj.linear.weight"] = wv
        main[dst + "self_attn.o_proj.linear.weight"] = off[src + "self_attn.out_proj.weight"]
        main[dst + "mlp.fc1.weight"] = off[src + "gating.linear_in.weight"]
        main[dst + "mlp.fc2.weight"] = off[src + "gating.linear_out.weight"]
        main[dst + "input_layernorm.weight"] = off[src + "norm1.alpha"].reshape(d)
        main[dst + "post_attention_layernorm.weight"] = off[src + "norm2.alpha"].reshape(d)

    def depth(steps: int, prefix: str) -> dict[str, torch.Tensor]:
        sd = {
            prefix + "text_embed_tokens.weight": off["depformer_text_emb.weight"],
            prefix + "input_projections.weight": torch.stack([off[f"depformer_in.{k}.weight"] for k in range(steps)]),
            prefix + "lm_heads.weight": torch.stack([off[f"linears.{k}.weight"] for k in range(steps)]),
        }
        for k in range(steps - 1):
            sd[prefix + f"embed_tokens.{k}.weight"] = off[f"depformer_emb.{k}.weight"]
        for i in range(cfg.depformer_num_layers):
            src, dst = f"depformer.layers.{i}.", f"{prefix}layers.{i}."
            qkv = off[src + "self_attn.in_proj_weight"].view(q, 3, dd, dd)[:steps]
            for j, name in enumerate("qkv"):
                sd[dst + f"self_attn.{name}_proj.linear.weight"] = qkv[:, j]
            sd[dst + "self_attn.o_proj.linear.weight"] = off[src + "self_attn.out_proj.weight"].view(q, dd, dd)[:steps]
            sd[dst + "mlp.fc1.weight"] = torch.stack([off[src + f"gating.{k}.linear_in.weight"] for k in range(steps)])
            sd[dst + "mlp.fc2.weight"] = torch.stack([off[src + f"gating.{k}.linear_out.weight"] for k in range(steps)])
            sd[dst + "input_layernorm.weight"] = off[src + "norm1.alpha"].reshape(dd)
            sd[dst + "post_attention_layernorm.weight"] = off[src + "norm2.alpha"].reshape(dd)
        return sd

    main.update(depth(depth_steps, "depth_decoder."))
    return main, depth(q, "")


@functools.lru_cache(maxsize=None)
def _hf_models(cfg: LMConfig, seed: int):
    transformers = pytest.importorskip("transformers")
    from transformers.models.moshi.modeling_moshi import MoshiDepthConfig, MoshiDepthDecoder

    depth_kwargs = dict(
        hidden_size=cfg.depformer_dim,
        num_hidden_layers=cfg.depformer_num_layers,
        num_attention_heads=cfg.depformer_num_heads,
        ffn_dim=2 * cfg.depformer_ffn_hidden,
        rms_norm_eps=cfg.norm_eps,
        sliding_window=cfg.dep_q,
        max_position_embeddings=cfg.dep_q,
        hidden_act="silu",
    )
    mimi = transformers.MimiConfig(
        hidden_size=16, num_filters=4, codebook_dim=8, num_quantizers=AGENT, vector_quantization_hidden_dimension=8,
        upsample_groups=16, num_hidden_layers=1, intermediate_size=32, num_attention_heads=2, num_key_value_heads=2,
    )
    config = transformers.MoshiConfig(
        vocab_size=cfg.text_card,
        hidden_size=cfg.dim,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        ffn_dim=2 * cfg.ffn_hidden,
        rms_norm_eps=cfg.norm_eps,
        max_position_embeddings=4 * cfg.context,
        sliding_window=cfg.context,
        num_codebooks=AGENT,
        audio_vocab_size=cfg.card,
        hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": cfg.max_period},
        audio_encoder_config=mimi.to_dict(),
        depth_decoder_config=dict(depth_kwargs),
        attn_implementation="eager",
    )
    main_sd, depth16_sd = official_to_hf(_official_weights(cfg, seed), cfg, AGENT)
    hf = transformers.MoshiForConditionalGeneration(config).eval()
    result = hf.load_state_dict(main_sd, strict=False)
    assert not result.unexpected_keys
    assert all(k.startswith("audio_encoder.") for k in result.missing_keys), result.missing_keys
    depth16 = MoshiDepthDecoder(
        MoshiDepthConfig(
            vocab_size=cfg.text_card, input_size=cfg.dim, audio_vocab_size=cfg.card, num_codebooks=cfg.dep_q,
            attn_implementation="eager", **depth_kwargs,
        )
    ).eval()
    depth16.load_state_dict(depth16_sd, strict=True)
    return hf, depth16



def _additive(mask: torch.Tensor) -> torch.Tensor:
    return torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)


def _hf_forward(cfg: LMConfig, seed: int, cols: torch.Tensor, mask: torch.Tensor, depth_mask16: torch.Tensor):
    """HF text logits [B, T, Vt], 8-step and 16-step audio logits [B, P, T, card] for columns
    [B, 17, T+1], HF given our masks: mask [T, T] (temporal), depth_mask16 [16, 16] (16-step decoder)."""
    hf, depth16 = _hf_models(cfg, seed)
    b, _, t1 = cols.shape
    t = t1 - 1
    attn = _additive(mask)[None, None].expand(b, 1, t, t)
    with torch.no_grad():
        out = hf(
            input_ids=cols[:, 0, :t],
            moshi_audio_codes=cols[:, 1 : 1 + AGENT, :t],
            user_audio_codes=cols[:, 1 + AGENT :, :t],
            attention_mask=attn,
            use_cache=False,
        )
        hidden = out.last_hidden_state.reshape(b * t, 1, cfg.dim)
        results = []
        causal8 = torch.ones(AGENT, AGENT, dtype=torch.bool).tril()
        for decoder, steps, dmask in ((hf.depth_decoder, AGENT, causal8), (depth16, cfg.dep_q, depth_mask16)):
            ids = cols[:, :steps, 1:].permute(0, 2, 1).reshape(b * t, steps)  # text, codebooks 0..steps-2
            logits = decoder(
                input_ids=ids, last_hidden_state=hidden,
                attention_mask=_additive(dmask)[None, None].expand(b * t, 1, steps, steps), use_cache=False,
            ).logits
            results.append(logits.view(b, t, steps, -1).permute(0, 2, 1, 3))
    return out.logits, results[0], results[1]


def _random_columns(b: int, t1: int, gen: torch.Generator, cfg: LMConfig = CFG) -> torch.Tensor:
    cols = torch.cat(
        [
            torch.randint(0, cfg.text_card + 1, (b, 1, t1), generator=gen),
            torch.randint(0, cfg.card + 1, (b, cfg.n_q, t1), generator=gen),
        ],
        dim=1,
    )
    cols[:, 0, 0] = cfg.text_initial_id
    cols[:, 1:, 0] = cfg.audio_initial_id
    return cols


# ------------------------------------------------------------------------------------ tests
def test_matches_hf_moshi_teacher_forced():
    """The whole-sequence reference's text and audio logits (8-step HF depth decoder and 16-step one)
    equal HF's given the same masks, float32: inside the context, and with the reference's 16-step
    depformer ring, where step 15 does not see step 0."""
    gen = torch.Generator().manual_seed(10)
    cols = _random_columns(2, 21, gen)  # T = 20 < context
    mask = training_window(20, CFG.context)
    dep16 = ring_views(CFG.dep_q, 1, CFG.dep_q, context=None)
    assert not bool(dep16[15, 0]) and int(dep16.sum()) == int(torch.ones(16, 16).tril().sum()) - 1
    hf_text, hf_audio8, hf_audio16 = _hf_forward(CFG, 0, cols, mask, dep16)
    m8, m16 = make_model(depformer_steps=8), make_model(depformer_steps=16)
    text8, audio8 = lm_forward_sequence(m8, cols, mask, depformer_view(m8))
    text16, audio16 = lm_forward_sequence(m16, cols, mask, depformer_view(m16))
    assert text8.shape == hf_text.shape == (2, 20, CFG.text_vocab)
    assert audio8.shape == hf_audio8.shape == (2, 8, 20, CFG.card)
    assert audio16.shape == hf_audio16.shape == (2, 16, 20, CFG.card)
    assert float(hf_text.abs().max()) > 1.0  # non-trivial logits
    torch.testing.assert_close(text8, hf_text, atol=ATOL, rtol=0)
    torch.testing.assert_close(text16, hf_text, atol=ATOL, rtol=0)
    torch.testing.assert_close(audio8, hf_audio8, atol=ATOL, rtol=0)
    torch.testing.assert_close(audio16, hf_audio16, atol=ATOL, rtol=0)
    # The ring matters for step 15 only: a plain causal 16-step decoder differs there, nowhere else.
    _, _, causal16 = _hf_forward(CFG, 0, cols, mask, torch.ones(16, 16, dtype=torch.bool).tril())
    torch.testing.assert_close(causal16[:, :15], hf_audio16[:, :15], atol=ATOL, rtol=0)
    assert float((causal16[:, 15] - hf_audio16[:, 15]).abs().max()) > 1e-3


def test_reference_ring_mask_matches_hf_given_it():
    """Past `context` the reference ring shows a stepped query its C - 1 latest positions; the
    whole-sequence reference under that mask equals HF under it, and differs from the training window."""
    cfg = dataclasses.replace(CFG, context=8)
    gen = torch.Generator().manual_seed(11)
    cols = _random_columns(1, 25, gen, cfg)
    view = ring_views(cfg.context, 1, 24)
    assert torch.equal(view, training_window(24, cfg.context - 1))  # the rule, stated plainly
    model = make_model(cfg, 1)
    hf_text, hf_audio8, _ = _hf_forward(cfg, 0, cols, view, ring_views(cfg.dep_q, 1, cfg.dep_q, context=None))
    text, audio = lm_forward_sequence(model, cols, view, depformer_view(model))
    torch.testing.assert_close(text, hf_text, atol=ATOL, rtol=0)
    torch.testing.assert_close(audio, hf_audio8, atol=ATOL, rtol=0)
    trained, _ = lm_forward_sequence(model, cols, training_window(24, cfg.context), depformer_view(model))
    torch.testing.assert_close(trained[:, : cfg.context - 1], text[:, : cfg.context - 1], atol=ATOL, rtol=0)
    assert float((trained[:, cfg.context - 1 :] - text[:, cfg.context - 1 :]).abs().max()) > 1e-3


def test_zero_token_embeds_to_zero():
    model = make_model(max_slots=1)
    cols = torch.full((1, 17, 2), -1, dtype=torch.long)
    assert torch.equal(model.embed_columns(cols), torch.zeros(1, 2, CFG.dim))
    cols[0, 0, 1] = 7
    cols[0, 5, 1] = 100
    want = model.text_emb.weight[7] + model.audio_emb[4, 100]
    torch.testing.assert_close(model.embed_columns(cols)[0, 1], want)
    assert model.replay_frame().tolist() == [CFG.text_pad_id] + [CFG.card] * 16


def test_frames_to_columns_follows_official_delays():
    gen = torch.Generator().manual_seed(1)
    frames = random_frames(2, 9, gen)
    model = make_model(max_slots=1)
    assert torch.equal(model.frames_to_columns(frames), manual_columns(frames))


@pytest.mark.parametrize("depformer_steps", [8, 16])
@pytest.mark.parametrize("context", [CFG.context, 6])
def test_streaming_forced_equals_the_reference(depformer_steps, context):
    """Stepping fully given frames gives the whole-sequence reference's logits under the reference
    ring's views (inside the window, and 4x past a context of 6), and echoes the frames delayed."""
    cfg = dataclasses.replace(CFG, context=context)
    gen = torch.Generator().manual_seed(2)
    n = 26
    frames = random_frames(3, n, gen)
    model = make_model(cfg, max_slots=3, depformer_steps=depformer_steps)
    active = torch.ones(3, dtype=torch.bool)
    outs = [model.step(frames[:, :, i], active, return_logits=True) for i in range(n)]
    cols = model.frames_to_columns(frames)
    text, audio = lm_forward_sequence(model, cols, stepped(model, n - 1), depformer_view(model))  # positions 0..n-2
    for i in range(1, n):
        torch.testing.assert_close(outs[i].text_logits, text[:, i - 1], atol=ATOL, rtol=0)
        torch.testing.assert_close(outs[i].audio_logits, audio[:, :, i - 1], atol=ATOL, rtol=0)
    assert outs[1].audio_logits.shape == (3, depformer_steps, CFG.card)
    for i in range(n):
        assert outs[i].valid.tolist() == [i >= 2] * 3
        if i >= 2:
            assert torch.equal(outs[i].text, frames[:, 0, i - 1])
            assert torch.equal(outs[i].audio, frames[:, 1:9, i - 1])
        else:
            assert bool((outs[i].text == -1).all()) and bool((outs[i].audio == -1).all())
    assert model.tokens.offset.tolist() == [n] * 3
    if context < n - 1:  # the test can fail: the training-style window gives other logits past it
        trained, _ = lm_forward_sequence(model, cols, training_window(n - 1, context), depformer_view(model))
        assert float((trained[:, context - 1 :] - text[:, context - 1 :]).abs().max()) > 1e-3


def test_offset_zero_initialises_without_transformer_call():
    model = make_model(max_slots=2)
    gen = torch.Generator().manual_seed(3)
    frames = random_frames(2, 3, gen)
    kv0 = all_kv(model).clone()
    out = model.step(frames[:, :, 0], torch.ones(2, dtype=torch.bool))
    assert out.valid.tolist() == [False, False]
    assert model.tokens.offset.tolist() == [1, 1]
    assert torch.equal(all_kv(model), kv0)
    assert torch.equal(model.tokens.cache[:, :, 0], model.tokens.initial[None].expand(2, -1))
    out = model.step(frames[:, :, 1], torch.ones(2, dtype=torch.bool))
    assert out.valid.tolist() == [False, False]
    assert not torch.equal(all_kv(model), kv0)
    out = model.step(frames[:, :, 2], torch.ones(2, dtype=torch.bool))
    assert out.valid.tolist() == [True, True]


def test_kv_ring_wraparound_with_sampling_matches_the_reference_ring():
    """Stepping far past `context` (ring wraps) with sampled text/agent tokens equals the
    whole-sequence reference (checked against HF above) under the reference ring's views, over the
    tokens actually produced."""
    cfg = dataclasses.replace(CFG, context=8)
    model = make_model(cfg, max_slots=2)
    model.set_sampling(torch.tensor([0, 1]), seed=torch.tensor([5, 6]), top_k_audio=50)
    gen = torch.Generator().manual_seed(4)
    n = 30
    user = torch.randint(0, cfg.card, (2, 8, n), generator=gen)
    active = torch.ones(2, dtype=torch.bool)
    outs = []
    for i in range(n):
        frame = torch.full((2, 17), -1, dtype=torch.long)
        frame[:, 9:] = user[:, :, i]
        outs.append(model.step(frame, active, return_logits=True))
    # Frame j (1 <= j <= n-2) is complete after step j + 1.
    frames = torch.zeros(2, 17, n - 1, dtype=torch.long)
    frames[:, 9:] = user[:, :, : n - 1]
    for j in range(1, n - 1):
        assert bool(outs[j + 1].valid.all())
        frames[:, 0, j] = outs[j + 1].text
        frames[:, 1:9, j] = outs[j + 1].audio
    cols = model.frames_to_columns(frames)
    text, audio = lm_forward_sequence(model, cols, stepped(model, n - 2), depformer_view(model))  # 0..n-3
    for i in range(1, n - 1):
        torch.testing.assert_close(outs[i].text_logits, text[:, i - 1], atol=ATOL, rtol=0)
        torch.testing.assert_close(outs[i].audio_logits, audio[:, :, i - 1], atol=ATOL, rtol=0)
    assert len({tuple(o.audio[0].tolist()) for o in outs[2:]}) > 1  # really sampled


def _run_call(model, slot, user, seed, temp, start, n_ticks, others=None):
    """Tick the model n_ticks times; `slot` joins at tick `start` (reset + seed). Returns its outputs."""
    s = model.max_slots
    outs = []
    for tick in range(n_ticks):
        active = torch.zeros(s, dtype=torch.bool)
        frame = torch.full((s, 17), -1, dtype=torch.long)
        if others is not None:
            for other_slot, other_user in others.items():
                active[other_slot] = True
                frame[other_slot, 9:] = other_user[:, tick]
        if tick == start:
            model.reset([slot])
            model.set_sampling([slot], temperature_text=temp, temperature_audio=temp, seed=seed)
        if tick >= start:
            active[slot] = True
            frame[slot, 9:] = user[:, tick - start]
        out = model.step(frame, active, return_logits=True)
        if tick >= start:
            outs.append((out.text[slot], out.audio[slot], out.valid[slot], out.text_logits[slot], out.audio_logits[slot]))
    return outs


@pytest.mark.parametrize("temp", [0.0, 0.9])
def test_slot_joining_later_equals_same_call_alone(temp):
    """A call joining at tick k while other slots run equals the same call alone (greedy and seeded)."""
    gen = torch.Generator().manual_seed(5)
    m = 14
    user = torch.randint(0, CFG.card, (8, m), generator=gen)
    others = {0: torch.randint(0, CFG.card, (8, m + 6), generator=gen), 2: torch.randint(0, CFG.card, (8, m + 6), generator=gen)}
    alone = _run_call(make_model(max_slots=3), 1, user, 77, temp, 0, m)
    model = make_model(max_slots=3)
    model.set_sampling([0, 2], temperature_text=0.9, temperature_audio=0.9, seed=3)
    joined = _run_call(model, 1, user, 77, temp, 6, m + 6, others)
    assert len(alone) == len(joined) == m
    for a, j in zip(alone, joined):
        assert torch.equal(a[0], j[0]) and torch.equal(a[1], j[1]) and torch.equal(a[2], j[2])
        torch.testing.assert_close(a[3], j[3], atol=ATOL, rtol=0)
        torch.testing.assert_close(a[4], j[4], atol=ATOL, rtol=0)
    assert sum(bool(a[2]) for a in alone) == m - 2


def test_other_slots_unaffected_by_a_joining_call():
    gen = torch.Generator().manual_seed(6)
    m = 10
    user = torch.randint(0, CFG.card, (8, m), generator=gen)
    other = torch.randint(0, CFG.card, (8, m + 4), generator=gen)
    base = make_model(max_slots=3)
    base.set_sampling([0], seed=9)
    without = _run_call(base, 0, other, 9, 0.8, 0, m + 4)
    model = make_model(max_slots=3)
    with_join = []
    for tick in range(m + 4):
        if tick == 0:
            model.reset([0])
            model.set_sampling([0], temperature_text=0.8, temperature_audio=0.8, seed=9)
        if tick == 4:
            model.reset([2])
            model.set_sampling([2], seed=1)
        frame = torch.full((3, 17), -1, dtype=torch.long)
        frame[0, 9:] = other[:, tick]
        active = torch.tensor([True, False, tick >= 4])
        if tick >= 4:
            frame[2, 9:] = user[:, tick - 4]
        out = model.step(frame, active, return_logits=True)
        with_join.append((out.text[0], out.audio[0], out.text_logits[0]))
    for a, b in zip(without, with_join):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        torch.testing.assert_close(a[3], b[2], atol=ATOL, rtol=0)


def test_inactive_rows_bit_for_bit_unchanged():
    model = make_model(max_slots=3)
    gen = torch.Generator().manual_seed(7)
    frames = random_frames(3, 6, gen)
    for i in range(4):
        model.step(frames[:, :, i], torch.ones(3, dtype=torch.bool))
    before = state_rows(model)
    emb = torch.randn(3, CFG.dim, generator=gen)
    model.step(
        frames[:, :, 4],
        torch.tensor([True, False, True]),
        embeddings=emb,
        use_embeddings=torch.tensor([False, True, True]),
    )
    after = state_rows(model)
    for name, buf in before.items():
        ring = name.endswith(".kv")  # [2, S, H, C, Dh]
        row = (lambda t: t[:, 1]) if ring else (lambda t: t[1] if t.dim() and t.shape[0] == 3 else t)
        assert torch.equal(row(buf), row(after[name])), name
    assert not torch.equal(before["rings.0.kv"][:, 0], after["rings.0.kv"][:, 0])
    # Nothing active: nothing changes at all.
    model.step(frames[:, :, 5], torch.zeros(3, dtype=torch.bool))
    for name, buf in state_rows(model).items():
        assert torch.equal(buf, after[name]), name


@pytest.mark.parametrize("slots", [torch.tensor([1]), torch.tensor([False, True, False]), [1], 1])
def test_reset_clears_only_selected_rows(slots):
    model = make_model(max_slots=3)
    gen = torch.Generator().manual_seed(8)
    frames = random_frames(3, 4, gen)
    model.set_sampling([0, 1, 2], seed=torch.tensor([1, 2, 3]), temperature_text=0.3)
    for i in range(4):
        model.step(frames[:, :, i], torch.ones(3, dtype=torch.bool))
    before = state_rows(model)
    model.reset(slots)
    after = state_rows(model)
    assert int(model.tokens.offset[1]) == 0
    assert bool((model.tokens.cache[1] == -2).all()) and not bool(model.tokens.provided[1].any())
    assert float(model.sampling.temp_text[1]) == pytest.approx(CFG.default_temperature_text)
    assert int(model.sampling.top_k_audio[1]) == CFG.default_top_k_audio
    for name, buf in before.items():
        if name.endswith(".kv"):  # [2, S, H, C, Dh]: the reset row is zeroed, the others kept
            assert torch.equal(buf[:, [0, 2]], after[name][:, [0, 2]]), name
            assert bool((after[name][:, 1] == 0).all()) and bool((buf[:, 1] != 0).any()), name
        elif buf.dim() and buf.shape[0] == 3:
            assert torch.equal(buf[[0, 2]], after[name][[0, 2]]), name
        else:
            assert torch.equal(buf, after[name]), name


def test_agent_logits_same_with_8_or_16_depformer_steps():
    """Skipping the user depformer steps gives the same agent logits and the same samples."""
    gen = torch.Generator().manual_seed(9)
    n = 8
    user = torch.randint(0, CFG.card, (2, 8, n), generator=gen)
    runs = []
    for steps in (8, 16):
        model = make_model(max_slots=2, depformer_steps=steps)
        model.set_sampling([0, 1], seed=torch.tensor([4, 5]), temperature_text=torch.tensor([0.0, 0.7]))
        outs = []
        for i in range(n):
            frame = torch.full((2, 17), -1, dtype=torch.long)
            frame[:, 9:] = user[:, :, i]
            outs.append(model.step(frame, torch.ones(2, dtype=torch.bool), return_logits=True))
        runs.append(outs)
    for a, b in zip(*runs):
        assert b.audio_logits.shape[1] == 16 and a.audio_logits.shape[1] == 8
        assert torch.equal(a.text, b.text) and torch.equal(a.audio, b.audio)
        torch.testing.assert_close(a.text_logits, b.text_logits, atol=1e-6, rtol=0)
        torch.testing.assert_close(a.audio_logits, b.audio_logits[:, :8], atol=1e-6, rtol=0)


def test_missing_user_tokens_become_zero_tokens_with_8_steps():
    model = make_model(max_slots=1)
    frame = torch.full((1, 17), -1, dtype=torch.long)
    for _ in range(3):
        model.step(frame, torch.ones(1, dtype=torch.bool))
    target = int(model.tokens.offset[0] - 1) % CFG.cache_len
    assert bool((model.tokens.cache[0, 9:, target] == -1).all())
    assert bool((model.tokens.cache[0, :9, target] >= 0).all())


def _prompt_frames(n: int, gen: torch.Generator) -> torch.Tensor:
    frames = random_frames(1, n, gen)[0]
    frames[9:] = torch.tensor(SINE_TOKENS)[:, None]
    return frames


def _assert_same_state(a, b, atol=ATOL):
    assert int(a.offset) == int(b.offset)
    assert torch.equal(a.cache, b.cache)
    assert torch.equal(a.provided, b.provided)
    assert a.kv.shape == b.kv.shape
    torch.testing.assert_close(a.kv, b.kv, atol=atol, rtol=0)


@pytest.mark.parametrize("n,split,context", [(14, 5, CFG.context), (45, 30, CFG.context), (45, 7, 6)])
def test_prefill_equals_stepping(n, split, context):
    """prefill (one parallel call, or two chained ones, also far past `context`) == n steps."""
    cfg = dataclasses.replace(CFG, context=context)
    gen = torch.Generator().manual_seed(12)
    frames = _prompt_frames(n, gen)
    model = make_model(cfg, max_slots=3)
    model.prefill_frames(0, frames)
    model.prefill_frames(2, frames[:, :split])
    model.prefill_frames(2, frames[:, split:])
    for i in range(n):
        frame = torch.full((3, 17), -1, dtype=torch.long)
        frame[1] = frames[:, i]
        model.step(frame, torch.tensor([False, True, False]))
    s0, s1, s2 = (model.export_slot(i) for i in range(3))
    assert int(s0.offset) == n and s0.num_positions == min(n - 1, context)
    _assert_same_state(s0, s1)
    _assert_same_state(s2, s1)
    # Continue all three identically: same tokens and logits.
    model.set_sampling([0, 1, 2], seed=21)
    user = torch.randint(0, CFG.card, (8, 6), generator=gen)
    for i in range(6):
        frame = torch.full((3, 17), -1, dtype=torch.long)
        frame[:, 9:] = user[:, i]
        out = model.step(frame, torch.ones(3, dtype=torch.bool), return_logits=True)
        assert torch.equal(out.text[0], out.text[1]) and torch.equal(out.audio[0], out.audio[1])
        assert torch.equal(out.text[2], out.text[1]) and torch.equal(out.audio[2], out.audio[1])
        torch.testing.assert_close(out.text_logits[0], out.text_logits[1], atol=ATOL, rtol=0)
        torch.testing.assert_close(out.text_logits[2], out.text_logits[1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("voice_as_embeddings", [False, True])
def test_prefill_then_step_equals_the_reference(voice_as_embeddings):
    """A prompt prefilled 5x past a context of 6 (as frames, or a voice replayed as embeddings
    first), then sampled steps: every logit equals the whole-sequence reference under the
    reference ring's views over the frames actually seen."""
    cfg = dataclasses.replace(CFG, context=6)
    gen = torch.Generator().manual_seed(17)
    n, m = 30, 10
    prompt = _prompt_frames(n, gen)
    model = make_model(cfg, max_slots=2)
    if voice_as_embeddings:  # the first 9 frames as an official .pt voice: 8 input embeddings + the token ring
        emb = model.embed_columns(model.frames_to_columns(prompt[None, :, :9]))[0, :8]
        model.prefill_frames(0, frames=prompt[:, :9])
        voice = model.export_slot(0)
        model.prefill_frames(1, embeddings=emb)
        model.set_token_state(1, cache=voice.cache, provided=voice.provided)
        model.prefill_frames(1, frames=prompt[:, 9:])
    else:
        model.prefill_frames(1, frames=prompt)
    model.set_sampling([1], seed=3, temperature_text=0.8, temperature_audio=0.8)
    user = torch.randint(0, cfg.card, (8, m), generator=gen)
    outs = []
    for i in range(m):
        frame = torch.full((2, 17), -1, dtype=torch.long)
        frame[1, 9:] = user[:, i]
        outs.append(model.step(frame, torch.tensor([False, True]), return_logits=True))
    frames = torch.zeros(1, 17, n + m - 1, dtype=torch.long)  # prompt, then what the call produced
    frames[0, :, :n] = prompt
    frames[0, 9:, n:] = user[:, : m - 1]
    for j in range(n, n + m - 1):
        frames[0, 0, j] = outs[j - n + 1].text[1]
        frames[0, 1:9, j] = outs[j - n + 1].audio[1]
    cols = model.frames_to_columns(frames)
    text, audio = lm_forward_sequence(model, cols, stepped(model, n + m - 2), depformer_view(model))
    for i in range(m - 1):  # step i ran KV position n - 1 + i
        torch.testing.assert_close(outs[i].text_logits[1], text[0, n - 1 + i], atol=ATOL, rtol=0)
        torch.testing.assert_close(outs[i].audio_logits[1], audio[0, :, n - 1 + i], atol=ATOL, rtol=0)
    assert len({int(o.text[1]) for o in outs[1:]}) > 1  # really sampled


@pytest.mark.parametrize("as_embeddings", [False, True])
def test_raw_prefill_plus_token_state_equals_stepping(as_embeddings):
    """The building block: prefill(slot, columns or embeddings) writes KV positions 0..T-1;
    set_token_state supplies offset, ring and flags. Also chained with `start`, past `context`."""
    gen = torch.Generator().manual_seed(15)
    n = 40
    frames = _prompt_frames(n, gen)
    model = make_model(max_slots=2)
    for i in range(n):
        frame = torch.full((2, 17), -1, dtype=torch.long)
        frame[1] = frames[:, i]
        model.step(frame, torch.tensor([False, True]))
    ref = model.export_slot(1)
    cols = model.frames_to_columns(frames[None])[0, :, : n - 1]  # inputs of KV positions 0..n-2
    inputs = model.embed_columns(cols[None])[0] if as_embeddings else cols
    model.prefill(0, inputs[..., :10] if not as_embeddings else inputs[:10])
    model.prefill(0, inputs[..., 10:] if not as_embeddings else inputs[10:], start=10)
    model.set_token_state(0, offset=n, cache=ref.cache, provided=ref.provided)
    _assert_same_state(model.export_slot(0), ref)


def test_meta_build_then_init_state():
    """The loader's path: build on meta, materialise with to_empty, load weights, init_state."""
    with torch.device("meta"):
        model = PersonaPlexLM(CFG, 2)
    model.to_empty(device="cpu")
    model.load_state_dict(ck.from_official(_official_weights(CFG, 0), CFG))
    model.init_state()
    assert model.tokens.offset.tolist() == [0, 0] and bool((model.tokens.cache == -2).all())
    assert model.tokens.delays.tolist() == list(CFG.delays) and model.tokens.initial.tolist() == list(CFG.initial_tokens)
    assert bool((all_kv(model) == 0).all())
    ref = make_model(max_slots=2)
    gen = torch.Generator().manual_seed(16)
    frames = random_frames(2, 4, gen)
    for i in range(4):
        a = model.step(frames[:, :, i], torch.ones(2, dtype=torch.bool), return_logits=True)
        b = ref.step(frames[:, :, i], torch.ones(2, dtype=torch.bool), return_logits=True)
    torch.testing.assert_close(a.text_logits, b.text_logits, atol=0, rtol=0)


def test_prefill_rejects_missing_tokens():
    model = make_model(max_slots=1)
    frames = torch.zeros(17, 3, dtype=torch.long)
    frames[0, 1] = -1
    with pytest.raises(ValueError, match=r"frame 1 .*streams \[0\] not given"):
        model.prefill_frames(0, frames)
    assert model.tokens.offset.tolist() == [0]  # refused before anything changed


def test_embedding_replay_equals_token_path():
    """Official voice-prompt flow: replaying the saved input embeddings (step_embeddings) then
    copying the saved token cache gives the token path's state; prefill(embeddings=) == steps."""
    gen = torch.Generator().manual_seed(13)
    n = 10
    frames = _prompt_frames(n, gen)
    model = make_model(max_slots=3)
    for i in range(n):  # slot 0: token path
        frame = torch.full((3, 17), -1, dtype=torch.long)
        frame[0] = frames[:, i]
        model.step(frame, torch.tensor([True, False, False]))
    # Official saves embed_codes(input) at every step from offset 1: n - 1 embeddings.
    emb = model.embed_columns(model.frames_to_columns(frames[None]))[0, : n - 1]
    replay = model.replay_frame()
    for i in range(n - 1):  # slot 1: step_embeddings path
        frame = torch.full((3, 17), -1, dtype=torch.long)
        frame[1] = replay
        embeddings = torch.zeros(3, CFG.dim)
        embeddings[1] = emb[i]
        model.step(frame, torch.tensor([False, True, False]), embeddings, torch.tensor([False, True, False]))
    model.prefill_frames(2, embeddings=emb)  # slot 2: parallel replay
    s0, s1, s2 = (model.export_slot(i) for i in range(3))
    assert int(s1.offset) == n
    _assert_same_state(s2, s1)
    torch.testing.assert_close(s1.kv, s0.kv, atol=ATOL, rtol=0)
    assert torch.equal(s1.provided, s0.provided)
    for slot, st in ((1, s1), (2, s2)):  # official: state.cache.copy_(voice_prompt_cache)
        model.import_slot(slot, dataclasses.replace(st, cache=s0.cache.clone()))
    more = _prompt_frames(5, gen)
    for i in range(5):
        out = model.step(more[:, i][None].expand(3, -1), torch.ones(3, dtype=torch.bool), return_logits=True)
        torch.testing.assert_close(out.text_logits[1], out.text_logits[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(out.text_logits[2], out.text_logits[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(out.audio_logits[1], out.audio_logits[0], atol=ATOL, rtol=0)


def test_export_import_roundtrip_across_slots():
    gen = torch.Generator().manual_seed(14)
    model = make_model(max_slots=2)
    model.prefill_frames(0, _prompt_frames(40, gen))  # past context: the ring has wrapped
    state = model.export_slot(0)
    assert state.kv.shape == (CFG.num_layers, 2, CFG.num_heads, CFG.context, CFG.head_dim)
    model.import_slot(1, state)
    _assert_same_state(model.export_slot(1), state, atol=0)
    model.set_sampling([0, 1], seed=8)
    user = torch.randint(0, CFG.card, (8,), generator=gen)
    frame = torch.full((2, 17), -1, dtype=torch.long)
    frame[:, 9:] = user
    out = model.step(frame, torch.ones(2, dtype=torch.bool), return_logits=True)
    torch.testing.assert_close(out.text_logits[0], out.text_logits[1], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.audio_logits[0], out.audio_logits[1], atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="kv"):
        model.import_slot(1, dataclasses.replace(state, kv=state.kv[:, :, :, :3]))


def test_checkpoint_roundtrip_and_shapes():
    off = _official_weights(CFG, 0)
    assert {k: tuple(v.shape) for k, v in off.items()} == ck.expected_official_shapes(CFG)
    back = ck.to_official(ck.from_official(off, CFG, 16), CFG)
    assert back.keys() == off.keys()
    assert all(torch.equal(back[k], off[k]) for k in off)
    PersonaPlexLM(CFG, 1).load_state_dict(ck.from_official(off, CFG))  # default: 8 steps, strict
    # The 7B config reproduces the published parameter count (8.37 B as shipped).
    total = sum(math.prod(s) for s in ck.expected_official_shapes(LMConfig.personaplex_7b()).values())
    assert round(total / 1e9, 2) == 8.37


def test_from_official_errors_name_the_tensor():
    off = dict(_official_weights(CFG, 0))
    bad = dict(off)
    bad["transformer.layers.1.gating.linear_in.weight"] = torch.zeros(5, 64)
    with pytest.raises(CheckpointError, match=r"transformer\.layers\.1\.gating\.linear_in\.weight.*\(5, 64\).*\(352, 64\)"):
        ck.from_official(bad, CFG)
    missing = dict(off)
    del missing["linears.3.weight"]
    del missing["depformer.layers.0.gating.12.linear_out.weight"]
    with pytest.raises(CheckpointError) as err:
        ck.from_official(missing, CFG)
    assert "linears.3.weight" in str(err.value)
    assert "depformer.layers.0.gating.12.linear_out.weight" in str(err.value)
    extra = dict(off)
    extra["transformer.layers.0.layer_scale_1.scale"] = torch.zeros(64)
    with pytest.raises(CheckpointError, match="layer_scale_1"):
        ck.from_official(extra, CFG)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_is_the_official_float32_formula(dtype: torch.dtype) -> None:
    """Official: var = eps + mean(x^2) in float32; y = (x * (alpha * rsqrt(var))).to(dtype)."""
    from app.worker.model.lm import RMSNorm

    gen = torch.Generator().manual_seed(11)
    norm = RMSNorm(4096, 1e-8, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(4096, generator=gen))
    x = (3 * torch.randn(8, 2, 4096, generator=gen)).to(dtype)
    xf = x.float()
    var = 1e-8 + torch.mean(xf * xf, dim=-1, keepdim=True)
    official = (xf * (norm.weight.float() * torch.rsqrt(var))).to(dtype)
    with torch.no_grad():
        got = norm(x)
    assert got.dtype == dtype
    step = torch.finfo(dtype).eps  # one rounding step: the products' order differs, nothing else
    torch.testing.assert_close(got, official, rtol=step, atol=step)
    if dtype != torch.float32:  # after the cast back, the order shows in (almost) no element
        assert (got != official).float().mean() < 1e-3


@pytest.mark.parametrize("temp", [0.0, 0.9])
def test_static_candidate_widths_step_exactly_the_same_tokens(temp):
    """Sampling with static top-k widths (noise for the candidates only) says what the
    whole-vocabulary path says, step after step, for the same seed and caller."""
    gen = torch.Generator().manual_seed(9)
    m = 24
    user = torch.randint(0, CFG.card, (8, m), generator=gen)
    whole = _run_call(make_model(max_slots=2), 1, user, 123, temp, 0, m)
    model = make_model(max_slots=2)
    model.sampling.set_widths(CFG.default_top_k_text, CFG.default_top_k_audio)
    fast = _run_call(model, 1, user, 123, temp, 0, m)
    for a, b in zip(whole, fast):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    assert sum(bool(a[2]) for a in whole) == m - 2
