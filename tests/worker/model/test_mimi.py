"""Mimi codec: official checkpoint layout, oracle equality with transformers' MimiModel, per-slot streaming."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import Tensor

from app.worker.model.errors import CheckpointError
from app.worker.model.mimi import Mimi, MimiConfig
from app.worker.model.mimi_checkpoint import (
    expected_official_shapes,
    from_official,
    to_official,
)
from app.worker.model.rope import rope_tables
from tests.worker.model.reference import ring_views, training_window

CFG = MimiConfig.tiny()
FRAME = CFG.frame_size
N_FRAMES = 20  # 1.6 s: 40 transformer steps, more than 2x the tiny context of 16 (ring wrap-around)
# transformers' MimiModel attends within a training-style window; inside the reference ring's first
# `context - 1` steps the two agree, so the oracle tests run with a context longer than their signal.
HF_CFG = replace(CFG, context=2 * N_FRAMES * CFG.resample_stride + 1)


# ---- fixtures -----------------------------------------------------------------------------------------------


def _signal(n_frames: int, seed: int, batch: int = 1) -> Tensor:
    """Mix of amplitude-modulated sines and noise, [batch, n_frames * 1920] float32 in about [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n_frames * FRAME, dtype=torch.float64) / CFG.sample_rate
    rows = []
    for _ in range(batch):
        freqs = 80.0 + 2000.0 * torch.rand(3, generator=g, dtype=torch.float64)
        phases = 2 * math.pi * torch.rand(3, generator=g, dtype=torch.float64)
        envelope = 0.6 + 0.4 * torch.sin(2 * math.pi * 1.7 * t + phases[0])
        x = sum(0.25 * torch.sin(2 * math.pi * f * t + p) for f, p in zip(freqs, phases)) * envelope
        x = x + 0.05 * torch.randn(t.shape, generator=g, dtype=torch.float64)
        rows.append(x)
    return torch.stack(rows).float()


def _randomize_(model: Mimi, seed: int) -> None:
    """Random weights that keep activations O(1) and give varied codes (not the default init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".scale1", ".scale2")):
                p.copy_(0.2 + 0.4 * torch.rand(p.shape, generator=g))
            elif ".norm" in name and name.endswith(".weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                if name.endswith("upsample.weight"):  # depthwise transposed, kernel 2 x stride
                    fan_in = 2
                elif ".up." in name:  # transposed [in, out, 2 x stride]: 2 taps of every input channel
                    fan_in = 2 * p.shape[0]
                else:  # conv [out, in, k] or linear [out, in]
                    fan_in = p[0].numel()
                gain = 0.05 if name == "decoder.output_conv.weight" else 1.2  # keep the decoded PCM O(1)
                p.copy_(torch.randn(p.shape, generator=g) * (gain / math.sqrt(fan_in)))
        # Centroids of each RVQ level on the scale of that level's residual for a realistic signal.
        x = _signal(8, seed=seed + 1, batch=2)
        lat = model.encoder(x[:, None, :], None)
        lat = model.encoder_transformer(lat.transpose(1, 2), None).transpose(1, 2)
        lat = model.downsample(lat, None).transpose(1, 2).reshape(-1, CFG.dimension)  # [B * F, D]
        q = model.quantizer
        for k in range(CFG.total_codebooks):
            if k == 0 or k == CFG.n_semantic:
                residual = (q.semantic_in if k == 0 else q.acoustic_in)(lat)  # [B * F, d]
            book = residual.mean(0) + residual.std(0) * torch.randn(q.codebooks[k].shape, generator=g)
            q.codebooks[k].copy_(book)
            nearest = torch.cdist(residual, book).argmin(-1)
            residual = residual - book[nearest]


def _official_weights(seed: int = 0) -> dict[str, Tensor]:
    """Tiny random weights in the official key layout, with non-trivial cluster_usage (incl. one zero)."""
    model = Mimi(CFG, max_slots=1)
    _randomize_(model, seed)
    sd = to_official(model.state_dict(), CFG)
    g = torch.Generator().manual_seed(seed + 7)
    for key in list(sd):
        if key.endswith(".cluster_usage"):
            usage = 0.5 + 1.5 * torch.rand(sd[key].shape, generator=g)
            embedding_sum_key = key.replace("cluster_usage", "embedding_sum")
            sd[embedding_sum_key] = sd[embedding_sum_key] * usage[:, None]
            sd[key] = usage
    return sd


def _rope_permute(w: Tensor, heads: int) -> Tensor:
    """Official interleaved-pair RoPE rows -> transformers' rotate-half rows, per head."""
    out_dim, in_dim = w.shape
    return w.view(heads, out_dim // heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def _official_to_hf(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Test-only map: official moshi Mimi keys -> transformers MimiModel keys."""
    out: dict[str, Tensor] = {}
    D, H = CFG.dimension, CFG.num_heads
    for key, t in sd.items():
        parts = key.split(".")
        if parts[0] in ("encoder", "decoder") and parts[1] == "model":
            side = parts[0]
            rest = ".".join(parts[3:])
            rest = rest.replace("conv.conv.", "conv.").replace("convtr.convtr.", "conv.")
            out[f"{side}.{side}_seanet.layers.{parts[2]}.{rest}"] = t
        elif parts[0] in ("encoder_transformer", "decoder_transformer"):
            side = parts[0].split("_")[0]
            prefix = f"{side}.{side}_transformer.layers.{parts[3]}"
            name = ".".join(parts[4:])
            if name == "self_attn.in_proj_weight":
                q, k, v = t.split(D, dim=0)
                out[f"{prefix}.self_attn.q_proj.weight"] = _rope_permute(q, H)
                out[f"{prefix}.self_attn.k_proj.weight"] = _rope_permute(k, H)
                out[f"{prefix}.self_attn.v_proj.weight"] = v
            else:
                hf_name = {
                    "self_attn.out_proj.weight": "self_attn.o_proj.weight",
                    "norm1.weight": "input_layernorm.weight",
                    "norm1.bias": "input_layernorm.bias",
                    "norm2.weight": "post_attention_layernorm.weight",
                    "norm2.bias": "post_attention_layernorm.bias",
                    "linear1.weight": "mlp.fc1.weight",
                    "linear2.weight": "mlp.fc2.weight",
                    "layer_scale_1.scale": "self_attn_layer_scale.scale",
                    "layer_scale_2.scale": "mlp_layer_scale.scale",
                }[name]
                out[f"{prefix}.{hf_name}"] = t
        elif key == "downsample.conv.conv.conv.weight":
            out["encoder.downsample.conv.weight"] = t
        elif key == "upsample.convtr.convtr.convtr.weight":
            out["decoder.upsample.conv.weight"] = t
        elif parts[0] == "quantizer":
            rvq = {"rvq_first": "semantic", "rvq_rest": "acoustic"}[parts[1]]
            prefix = f"quantizer.{rvq}_residual_vector_quantizer"
            if parts[2] in ("input_proj", "output_proj"):
                out[f"{prefix}.{parts[2]}.weight"] = t
            else:  # vq.layers.{k}._codebook.{name}
                name = {"_initialized": "initialized", "cluster_usage": "cluster_usage", "embedding_sum": "embed_sum"}
                out[f"{prefix}.layers.{parts[4]}.codebook.{name[parts[6]]}"] = t
        else:
            raise KeyError(key)
    return out


def _hf_model(official: dict[str, Tensor]):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.MimiConfig(
        sampling_rate=CFG.sample_rate,
        audio_channels=1,
        hidden_size=CFG.dimension,
        num_filters=CFG.n_filters,
        num_residual_layers=CFG.n_residual_layers,
        upsampling_ratios=list(CFG.ratios),
        kernel_size=CFG.kernel_size,
        last_kernel_size=CFG.last_kernel_size,
        residual_kernel_size=CFG.residual_kernel_size,
        dilation_growth_rate=CFG.dilation_base,
        use_causal_conv=True,
        pad_mode="constant",
        compress=CFG.compress,
        trim_right_ratio=1.0,
        codebook_size=CFG.codebook_size,
        codebook_dim=CFG.codebook_dim,
        vector_quantization_hidden_dimension=CFG.codebook_dim,
        num_quantizers=CFG.total_codebooks,
        num_semantic_quantizers=CFG.n_semantic,
        use_conv_shortcut=False,
        upsample_groups=CFG.dimension,
        num_hidden_layers=CFG.num_layers,
        intermediate_size=CFG.dim_feedforward,
        num_attention_heads=CFG.num_heads,
        num_key_value_heads=CFG.num_heads,
        head_dim=CFG.head_dim,
        hidden_act="gelu",
        norm_eps=CFG.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": CFG.max_period},
        sliding_window=HF_CFG.context,
        layer_scale_initial_scale=CFG.layer_scale,
        attention_bias=False,
        use_cache=False,
        use_streaming=False,
    )
    model = transformers.MimiModel(hf_cfg).eval()
    model.load_state_dict(_official_to_hf(official), strict=True)
    return model


@pytest.fixture(scope="module")
def official() -> dict[str, Tensor]:
    return _official_weights(seed=0)


@pytest.fixture(scope="module")
def hf(official):
    return _hf_model(official)


def _ours(official: dict[str, Tensor], max_slots: int, cfg: MimiConfig = CFG) -> Mimi:
    model = Mimi(cfg, max_slots=max_slots).eval()
    model.load_state_dict(from_official(official, cfg), strict=True)
    return model


def _state(model: Mimi) -> dict[str, Tensor]:
    """Every per-slot buffer, slots first (the KV rings are [2, S, H, C, Dh])."""
    return {
        name: (buf.transpose(0, 1) if name.endswith("ring.kv") else buf).clone()
        for name, buf in model.named_buffers()
        if name != "quantizer.codebooks"
    }


def _stream_encode(model: Mimi, pcm: Tensor, slot: int = 0) -> Tensor:
    """Encode [T] frame by frame in one slot (others inactive) -> [K, F]."""
    active = torch.zeros(model.max_slots, dtype=torch.bool)
    active[slot] = True
    codes = []
    for f in range(pcm.shape[-1] // FRAME):
        frame = torch.zeros(model.max_slots, FRAME)
        frame[slot] = pcm[f * FRAME : (f + 1) * FRAME]
        codes.append(model.encode_step(frame, active)[slot])
    return torch.stack(codes, dim=-1)


def _stream_decode(model: Mimi, codes: Tensor, slot: int = 0) -> Tensor:
    """Decode [K, F] frame by frame in one slot -> [F * 1920]."""
    active = torch.zeros(model.max_slots, dtype=torch.bool)
    active[slot] = True
    out = []
    for f in range(codes.shape[-1]):
        step = torch.zeros(model.max_slots, CFG.num_codebooks, dtype=torch.long)
        step[slot] = codes[:, f]
        out.append(model.decode_step(step, active)[slot])
    return torch.cat(out)


# ---- checkpoint layout ----------------------------------------------------------------------------------------


def test_official_layout_roundtrip() -> None:
    model = Mimi(CFG, max_slots=1)
    ours = model.state_dict()
    official = to_official(ours, CFG)
    expected = expected_official_shapes(CFG)
    assert set(official) == set(expected)
    assert {k: tuple(v.shape) for k, v in official.items()} == expected
    back = from_official(official, CFG)
    assert set(back) == set(ours)
    for key, value in ours.items():
        assert torch.equal(back[key], value), key
    model.load_state_dict(back, strict=True)


def test_personaplex_official_shapes() -> None:
    cfg = MimiConfig.personaplex()
    shapes = expected_official_shapes(cfg)
    spot = {
        "encoder.model.0.conv.conv.weight": (64, 1, 7),
        "encoder.model.1.block.1.conv.conv.weight": (32, 64, 3),
        "encoder.model.1.block.3.conv.conv.weight": (64, 32, 1),
        "encoder.model.3.conv.conv.weight": (128, 64, 8),
        "encoder.model.12.conv.conv.weight": (1024, 512, 16),
        "encoder.model.14.conv.conv.weight": (512, 1024, 3),
        "decoder.model.0.conv.conv.weight": (1024, 512, 7),
        "decoder.model.2.convtr.convtr.weight": (1024, 512, 16),
        "decoder.model.2.convtr.convtr.bias": (512,),
        "decoder.model.12.block.1.conv.conv.weight": (32, 64, 3),
        "decoder.model.14.conv.conv.weight": (1, 64, 3),
        "encoder_transformer.transformer.layers.7.self_attn.in_proj_weight": (1536, 512),
        "decoder_transformer.transformer.layers.0.linear1.weight": (2048, 512),
        "decoder_transformer.transformer.layers.0.layer_scale_2.scale": (512,),
        "downsample.conv.conv.conv.weight": (512, 512, 4),
        "upsample.convtr.convtr.convtr.weight": (512, 1, 4),
        "quantizer.rvq_first.input_proj.weight": (256, 512, 1),
        "quantizer.rvq_rest.output_proj.weight": (512, 256, 1),
        "quantizer.rvq_first.vq.layers.0._codebook.embedding_sum": (2048, 256),
        "quantizer.rvq_rest.vq.layers.30._codebook.cluster_usage": (2048,),
        "quantizer.rvq_rest.vq.layers.30._codebook._initialized": (1,),
    }
    for key, shape in spot.items():
        assert shapes[key] == shape, key
    assert "quantizer.rvq_rest.vq.layers.31._codebook.embedding_sum" not in shapes
    assert not any(k.startswith(("encoder.model.2.", "encoder.model.13.", "decoder.model.1.")) for k in shapes)
    # Parameters (everything but the codebook buffers): 79.3 M, as published.
    n_params = sum(math.prod(s) for k, s in shapes.items() if "._codebook." not in k)
    assert n_params == 79_308_609
    assert sum(p.numel() for p in Mimi(cfg, max_slots=1, device="meta").parameters()) == n_params


def test_codebook_is_embedding_sum_over_clamped_usage() -> None:
    official = to_official(Mimi(CFG, max_slots=1).state_dict(), CFG)
    key = "quantizer.rvq_rest.vq.layers.2._codebook"
    embedding_sum = torch.randn(CFG.codebook_size, CFG.codebook_dim)
    usage = torch.rand(CFG.codebook_size) + 0.1
    usage[5] = 0.0
    official[f"{key}.embedding_sum"] = embedding_sum
    official[f"{key}.cluster_usage"] = usage
    books = from_official(official, CFG)["quantizer.codebooks"]
    expected = embedding_sum / usage.clamp(min=1e-5)[:, None]
    assert torch.equal(books[CFG.n_semantic + 2], expected)
    assert torch.equal(books[CFG.n_semantic + 2][5], embedding_sum[5] / 1e-5)


def test_from_official_errors_name_the_tensor() -> None:
    good = to_official(Mimi(CFG, max_slots=1).state_dict(), CFG)

    bad = dict(good)
    bad["decoder.model.5.convtr.convtr.weight"] = torch.zeros(3, 3, 3)
    name = r"decoder\.model\.5\.convtr\.convtr\.weight"
    with pytest.raises(CheckpointError, match=name + r".*\(3, 3, 3\).*expected \(32, 16, 12\)"):
        from_official(bad, CFG)

    missing = dict(good)
    del missing["encoder_transformer.transformer.layers.1.norm2.bias"]
    del missing["quantizer.rvq_rest.vq.layers.8._codebook.embedding_sum"]
    with pytest.raises(CheckpointError) as err:
        from_official(missing, CFG)
    assert "encoder_transformer.transformer.layers.1.norm2.bias" in str(err.value)
    assert "quantizer.rvq_rest.vq.layers.8._codebook.embedding_sum" in str(err.value)

    extra = dict(good)
    extra["encoder.model.15.conv.conv.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"unexpected.*encoder\.model\.15\.conv\.conv\.weight"):
        from_official(extra, CFG)


# ---- oracle: transformers' MimiModel ---------------------------------------------------------------------------


def test_streaming_encode_matches_hf_offline(official, hf) -> None:
    pcm = _signal(N_FRAMES, seed=11, batch=2)
    with torch.no_grad():
        expected = hf.encode(pcm[:, None, :], num_quantizers=CFG.num_codebooks).audio_codes  # [2, 8, F]
    assert expected.shape == (2, CFG.num_codebooks, N_FRAMES)
    # Non-degenerate weights: every level uses many different codes.
    for level in range(CFG.num_codebooks):
        assert expected[:, level].unique().numel() >= N_FRAMES // 2, level

    model = _ours(official, max_slots=2, cfg=HF_CFG)
    codes = torch.stack([_stream_encode(model, pcm[b], slot=b) for b in range(2)])
    assert torch.equal(codes, expected)
    assert torch.equal(model.encode(pcm), expected)


def test_streaming_decode_matches_hf_offline(official, hf) -> None:
    pcm = _signal(N_FRAMES, seed=12)
    g = torch.Generator().manual_seed(3)
    codes = torch.stack(
        [
            hf.encode(pcm[:, None, :], num_quantizers=CFG.num_codebooks).audio_codes[0],
            torch.randint(0, CFG.codebook_size, (CFG.num_codebooks, N_FRAMES), generator=g),
        ]
    )  # [2, 8, F]
    with torch.no_grad():
        expected = hf.decode(codes).audio_values[:, 0]  # [2, F * 1920]
    assert expected.shape == (2, N_FRAMES * FRAME)
    assert expected.std() > 1e-2

    model = _ours(official, max_slots=2, cfg=HF_CFG)
    streamed = torch.stack([_stream_decode(model, codes[b], slot=b) for b in range(2)])
    assert (streamed - expected).abs().max() <= 1e-4
    assert (model.decode(codes) - expected).abs().max() <= 1e-4


# ---- per-slot streaming -----------------------------------------------------------------------------------------


def test_slots_are_independent(official) -> None:
    """Slot 0 from frame 0, slot 1 joining at frame 5, slot 2 idle with garbage: each equals its run alone."""
    n = 12
    a, b = _signal(n, seed=21)[0], _signal(n, seed=22)[0]
    code_a = torch.randint(0, CFG.codebook_size, (CFG.num_codebooks, n), generator=torch.Generator().manual_seed(1))
    code_b = torch.randint(0, CFG.codebook_size, (CFG.num_codebooks, n), generator=torch.Generator().manual_seed(2))
    alone = _ours(official, max_slots=1)
    enc_a, enc_b = _stream_encode(alone, a), None
    alone.reset(torch.tensor([0]))
    enc_b = _stream_encode(alone, b[: (n - 5) * FRAME])
    alone.reset(torch.tensor([0]))
    dec_a = _stream_decode(alone, code_a)
    alone.reset(torch.tensor([0]))
    dec_b = _stream_decode(alone, code_b[:, : n - 5])

    model = _ours(official, max_slots=3)
    codes = torch.zeros(3, CFG.num_codebooks, n, dtype=torch.long)
    pcm = torch.zeros(3, n * FRAME)
    for f in range(n):
        active = torch.tensor([True, f >= 5, False])
        frame = torch.full((3, FRAME), float("nan"))
        frame[0] = a[f * FRAME : (f + 1) * FRAME]
        if f >= 5:
            frame[1] = b[(f - 5) * FRAME : (f - 4) * FRAME]
        codes[:, :, f] = model.encode_step(frame, active)
        step = torch.full((3, CFG.num_codebooks), -1, dtype=torch.long)
        step[0] = code_a[:, f]
        if f >= 5:
            step[1] = code_b[:, f - 5]
        pcm[:, f * FRAME : (f + 1) * FRAME] = model.decode_step(step, active)
    assert torch.equal(codes[0], enc_a)
    assert torch.equal(codes[1, :, 5:], enc_b)
    assert not codes[1, :, :5].any() and not codes[2].any()
    torch.testing.assert_close(pcm[0], dec_a, rtol=0, atol=1e-5)
    torch.testing.assert_close(pcm[1, 5 * FRAME :], dec_b, rtol=0, atol=1e-5)
    assert not pcm[2].any() and not pcm[1, : 5 * FRAME].any()
    for name, buf in _state(model).items():
        assert torch.isfinite(buf.float()).all(), name


def test_inactive_rows_keep_state_bit_for_bit(official) -> None:
    model = _ours(official, max_slots=3)
    everyone = torch.ones(3, dtype=torch.bool)
    pcm = _signal(4, seed=31, batch=3)
    for f in range(4):  # fill every state with non-trivial values
        model.encode_step(pcm[:, f * FRAME : (f + 1) * FRAME], everyone)
        model.decode_step(torch.randint(0, CFG.codebook_size, (3, CFG.num_codebooks)), everyone)
    before = _state(model)
    active = torch.tensor([True, False, True])
    frame = _signal(1, seed=32, batch=3)
    frame[1] = float("nan")
    model.encode_step(frame, active)
    model.decode_step(torch.tensor([[1] * 8, [-5] * 8, [7] * 8]), active)
    after = _state(model)
    changed = 0
    for name in before:
        assert torch.equal(after[name][1], before[name][1]), name
        changed += int(not torch.equal(after[name][0], before[name][0]))
    assert changed >= len(before) // 2  # the active rows did advance


def test_reset_one_slot_changes_no_other(official) -> None:
    model = _ours(official, max_slots=3)
    everyone = torch.ones(3, dtype=torch.bool)
    pcm = _signal(3, seed=41, batch=3)
    for f in range(3):
        model.encode_step(pcm[:, f * FRAME : (f + 1) * FRAME], everyone)
        model.decode_step(torch.randint(0, CFG.codebook_size, (3, CFG.num_codebooks)), everyone)
    fresh = _state(_ours(official, max_slots=3))
    for slots in (torch.tensor([1]), torch.tensor([False, True, False])):
        before = _state(model)
        model.reset(slots)
        after = _state(model)
        for name in before:
            assert torch.equal(after[name][0], before[name][0]), name
            assert torch.equal(after[name][2], before[name][2]), name
            assert torch.equal(after[name][1], fresh[name][1]), name

    # A reset slot starts over exactly like a new model.
    signal = _signal(4, seed=42)[0]
    assert torch.equal(_stream_encode(model, signal, slot=1), _stream_encode(_ours(official, 1), signal))


def test_encoder_and_decoder_states_are_separate(official) -> None:
    model = _ours(official, max_slots=2)
    everyone = torch.ones(2, dtype=torch.bool)
    model.encode_step(_signal(1, seed=51, batch=2), everyone)
    model.decode_step(torch.randint(0, CFG.codebook_size, (2, CFG.num_codebooks)), everyone)
    before = _state(model)
    model.reset_decoder(torch.tensor([0]))
    after = _state(model)
    for name in before:
        if name.startswith(("encoder", "downsample")):
            assert torch.equal(after[name], before[name]), name
        else:
            assert torch.equal(after[name][1], before[name][1]), name
    assert after["decoder_transformer.pos"].tolist() == [0, CFG.resample_stride]
    assert after["encoder_transformer.pos"].tolist() == [CFG.resample_stride] * 2


@pytest.mark.parametrize("side", ["encoder_transformer", "decoder_transformer"])
def test_transformers_attend_as_the_reference_ring(official, side) -> None:
    """Streaming two steps per frame, 3x past the context: each step sees exactly what the reference
    ring shows it (`ring_views`: the first step of a frame context - 2 steps, the second context - 1),
    and the whole-signal path applies the same rule frame by frame."""
    model = _ours(official, max_slots=2)
    transformer, C, stride = getattr(model, side), CFG.context, CFG.resample_stride
    steps = 3 * C
    x = torch.randn(1, steps, CFG.dimension, generator=torch.Generator().manual_seed(5))
    active = torch.tensor([False, True])
    views = ring_views(C, stride, steps)
    assert [int(views[q].sum()) for q in (2 * C, 2 * C + 1)] == [C - 2, C - 1]
    with torch.no_grad():
        streamed = torch.cat(
            [transformer(x[:, t : t + stride].expand(2, -1, -1), active)[1:] for t in range(0, steps, stride)], dim=1
        )
        pos = torch.arange(steps)[None]
        rope = rope_tables(pos, CFG.head_dim, CFG.max_period)

        def dense(visible: Tensor) -> Tensor:
            y = x
            for layer in transformer.layers:
                y = layer(y, pos, rope, visible, None)
            return y

        reference, window = dense(views), dense(training_window(steps, C))
        offline = transformer(x, None)
    torch.testing.assert_close(streamed, reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(offline, reference, rtol=0, atol=1e-5)
    assert (window[:, C:] - reference[:, C:]).abs().max() > 1e-3  # the rule matters past the window


def test_whole_clip_encode_and_decode_equal_streaming_past_the_context(official) -> None:
    """A voice prompt several contexts long encodes (and codes decode) as if streamed frame by frame."""
    model = _ours(official, max_slots=2)
    pcm = _signal(3 * CFG.context // CFG.resample_stride + 3, seed=21)  # 3 contexts and more
    codes = model.encode(pcm)
    assert torch.equal(codes[0], _stream_encode(model, pcm[0], slot=1))
    decoded = model.decode(codes)
    streamed = _stream_decode(model, codes[0], slot=0)
    assert (decoded[0] - streamed).abs().max() <= 1e-5


def test_meta_build_then_init_state(official) -> None:
    """Built on meta, materialised with to_empty (garbage state), loaded, init_state(): same as a normal build."""
    with torch.device("meta"):
        model = Mimi(CFG, max_slots=2)
    model.to_empty(device="cpu")
    model.load_state_dict(from_official(official, CFG), strict=True)
    model.init_state()
    assert model.device == torch.device("cpu")
    reference = _ours(official, max_slots=2)
    for name, buf in _state(reference).items():
        assert torch.equal(_state(model)[name], buf), name
    signal = _signal(3, seed=61)[0]
    assert torch.equal(_stream_encode(model, signal, slot=1), _stream_encode(reference, signal, slot=1))


def test_input_validation(official) -> None:
    model = _ours(official, max_slots=2)
    with pytest.raises(ValueError, match="multiple of 1920"):
        model.encode(torch.zeros(1, FRAME + 1))
    with pytest.raises(ValueError, match="active"):
        model.encode_step(torch.zeros(2, FRAME), torch.ones(2))
    with pytest.raises(ValueError, match="pcm"):
        model.encode_step(torch.zeros(2, FRAME - 1), torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="codes"):
        model.decode_step(torch.zeros(2, 7, dtype=torch.long), torch.ones(2, dtype=torch.bool))
