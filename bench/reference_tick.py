"""Time one streaming step of NVIDIA's reference PersonaPlex code (the `moshi` package of
github.com/NVIDIA/personaplex) at batch B on the tiny config, for comparison with `callcenter bench`.

    git --git-dir=<mirror> archive HEAD | tar -x -C /tmp/personaplex
    pip install --target /tmp/refdeps einops==0.7.0          # the one dep missing from .venv
    PYTHONPATH=/tmp/refdeps .venv/bin/python bench/reference_tick.py --batch 32 --steps 60 --warmup 10

One step = what the reference server does per 80 ms frame (server.py, minus its `other_mimi`):
`mimi.encode` of one 1920-sample frame per row, `LMGen.step` of the resulting codes, `mimi.decode`
of the agent's 8 codebooks, all in streaming mode, torch.set_num_threads(1) (what our engine uses on
this 2-core box: cores - 1), torch.no_grad(). Prints one JSON line (p50/p99 ms).

Models are built with the reference's own classes and kwargs (`loaders._lm_kwargs`,
`_seanet_kwargs`, `_transformer_kwargs`, `_quantizer_kwargs`) with the widths of `LMConfig.tiny()` /
`MimiConfig.tiny()` substituted, in float32 (what our worker uses on CPU), and load the random
weights of `app.worker.model.tiny.make_tiny_checkpoint` with strict=True: no key mapping needed.
Sampling: the default persona's (text temp 0.7 top-k 25, audio temp 0.8 top-k 250).

The reference code is imported only from --reference-dir; the `sphn` import of its lm.py (used only
to read audio files) is stubbed. This script is a bench tool: nothing in app/ or tests/ imports it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def build_reference(ref_dir: Path, ckpt_dir: Path, lm_cfg, mimi_cfg, device: str = "cpu"):
    sys.path.insert(0, str(ref_dir))
    sys.modules.setdefault("sphn", types.ModuleType("sphn"))  # lm.py imports it for file I/O only
    from safetensors.torch import load_file
    from moshi.models import loaders
    from moshi.models.compression import MimiModel
    from moshi.models.lm import LMModel, LMGen
    from moshi.modules import SEANetDecoder, SEANetEncoder, transformer
    from moshi.quantization import SplitResidualVectorQuantizer

    import moshi
    assert Path(moshi.__file__).resolve().is_relative_to(ref_dir.resolve()), moshi.__file__

    seanet = dict(loaders._seanet_kwargs, dimension=mimi_cfg.dimension, n_filters=mimi_cfg.n_filters,
                  ratios=list(mimi_cfg.ratios))
    tr = dict(loaders._transformer_kwargs, d_model=mimi_cfg.dimension, num_heads=mimi_cfg.num_heads,
              num_layers=mimi_cfg.num_layers, dim_feedforward=mimi_cfg.dim_feedforward,
              context=mimi_cfg.context, input_dimension=mimi_cfg.dimension,
              output_dimensions=[mimi_cfg.dimension])
    qz = dict(loaders._quantizer_kwargs, dimension=mimi_cfg.codebook_dim, n_q=mimi_cfg.total_codebooks,
              bins=mimi_cfg.codebook_size, input_dimension=mimi_cfg.dimension,
              output_dimension=mimi_cfg.dimension)
    encoder = SEANetEncoder(**seanet)
    decoder = SEANetDecoder(**seanet)
    mimi = MimiModel(
        encoder, decoder, SplitResidualVectorQuantizer(**qz), channels=1,
        sample_rate=mimi_cfg.sample_rate, frame_rate=mimi_cfg.frame_rate,
        encoder_frame_rate=mimi_cfg.sample_rate / encoder.hop_length, causal=True, resample_method="conv",
        encoder_transformer=transformer.ProjectedTransformer(device=device, **tr),
        decoder_transformer=transformer.ProjectedTransformer(device=device, **tr),
    ).to(device)
    mimi.load_state_dict(load_file(str(ckpt_dir / "tokenizer-e351c8d8-checkpoint125.safetensors")), strict=True)
    mimi.eval()
    mimi.set_num_codebooks(mimi_cfg.num_codebooks)

    lm_kwargs = dict(
        loaders._lm_kwargs,
        dim=lm_cfg.dim, num_layers=lm_cfg.num_layers, num_heads=lm_cfg.num_heads,
        hidden_scale=lm_cfg.dim_feedforward / lm_cfg.dim,  # int(4.125 * 64) = 264
        context=lm_cfg.context, text_card=lm_cfg.text_card,
        existing_text_padding_id=lm_cfg.text_padding_id, n_q=lm_cfg.n_q, dep_q=lm_cfg.dep_q, card=lm_cfg.card,
        depformer_dim=lm_cfg.depformer_dim, depformer_num_layers=lm_cfg.depformer_num_layers,
        depformer_num_heads=lm_cfg.depformer_num_heads,
        depformer_dim_feedforward=lm_cfg.depformer_dim_feedforward, delays=list(lm_cfg.delays),
    )
    lm = LMModel(device=device, dtype=torch.float32, **lm_kwargs)
    sd = load_file(str(ckpt_dir / "model.safetensors"))
    lm.load_state_dict({k: v.to(torch.float32) for k, v in sd.items()}, strict=True)
    lm.eval()
    return mimi, lm, LMGen, lm_kwargs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference-dir", type=Path, default=Path("/tmp/personaplex/moshi"))
    p.add_argument("--checkpoint-dir", type=Path, default=None, help="a make_tiny_checkpoint dir (default: temp)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--depformer-steps", type=int, default=16,
                   help="16: the reference as shipped (all codebooks); 8: agent codebooks only, as our worker "
                   "(the other 8 are the user's, provided as input; the reference then pads them with 0)")
    args = p.parse_args()

    sys.path.insert(0, str(ROOT))
    from app.worker.model.lm import LMConfig
    from app.worker.model.mimi import MimiConfig
    lm_cfg, mimi_cfg = LMConfig.tiny(), MimiConfig.tiny()

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint_dir
        if ckpt is None:
            from app.worker.model.tiny import make_tiny_checkpoint
            ckpt = Path(tmp)
            make_tiny_checkpoint(ckpt, voices=("NATF2",))
        mimi, lm, LMGen, lm_kwargs = build_reference(args.reference_dir, ckpt, lm_cfg, mimi_cfg)

    gen = LMGen(lm, device="cpu", use_sampling=True,
                temp=lm_cfg.default_temperature_audio, temp_text=lm_cfg.default_temperature_text,
                top_k=lm_cfg.default_top_k_audio, top_k_text=lm_cfg.default_top_k_text,
                sample_rate=mimi_cfg.sample_rate, frame_rate=mimi_cfg.frame_rate)
    if args.depformer_steps != lm.dep_q:
        original = gen.depformer_step  # bound before streaming(): LMGen wraps it at state init

        def truncated(text_token, transformer_out, audio_tokens, audio_provided):
            full = lm.dep_q
            lm.dep_q = args.depformer_steps
            try:
                tokens = original(text_token, transformer_out, audio_tokens, audio_provided)
            finally:
                lm.dep_q = full
            return torch.cat([tokens, tokens.new_zeros(tokens.shape[0], full - tokens.shape[1])], dim=1)

        gen.depformer_step = truncated
    B, frame = args.batch, mimi_cfg.frame_size
    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    times: list[float] = []
    none_steps = 0
    with torch.no_grad(), mimi.streaming(B), gen.streaming(B):
        for t in range(args.warmup + args.steps):
            pcm = torch.from_numpy((0.1 * rng.standard_normal((B, 1, frame))).astype(np.float32))
            started = time.perf_counter()
            codes = mimi.encode(pcm)  # [B, 8, 1]
            for c in range(codes.shape[-1]):
                tokens = gen.step(codes[:, :, c:c + 1])
                if tokens is None:
                    none_steps += 1
                    continue
                out_pcm = mimi.decode(tokens[:, 1:9])
                assert out_pcm.shape == (B, 1, frame), out_pcm.shape
            elapsed = time.perf_counter() - started
            if t >= args.warmup:
                times.append(elapsed)
    assert none_steps <= args.warmup, "steps without output were measured"
    ms = np.array(times) * 1000
    print(json.dumps({
        "impl": "reference", "batch": B, "steps": len(times), "warmup": args.warmup, "threads": args.threads,
        "depformer_steps": args.depformer_steps,
        "step_p50_ms": round(float(np.percentile(ms, 50)), 3), "step_p99_ms": round(float(np.percentile(ms, 99)), 3),
        "step_mean_ms": round(float(ms.mean()), 3),
        "lm": {k: lm_kwargs[k] for k in ("dim", "num_layers", "num_heads", "hidden_scale", "context", "text_card",
                                         "dep_q", "depformer_dim", "depformer_num_layers", "depformer_context")},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
