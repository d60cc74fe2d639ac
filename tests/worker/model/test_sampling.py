"""Per-row sampling with the counter-based RNG (app/worker/model/sampling.py)."""

import torch

from app.worker.model import sampling


def _lowbias32_reference(x: int) -> int:
    m = 0xFFFFFFFF
    x &= m
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    x ^= x >> 16
    return x


def test_hash32_is_exact_32bit_arithmetic():
    values = [0, 1, 2, 12345, 0x7FFFFFFF, 0x80000000, 0xDEADBEEF, 0xFFFFFFFF]
    got = sampling.hash32(torch.tensor(values, dtype=torch.long)).tolist()
    assert got == [_lowbias32_reference(v) for v in values]


def test_uniform_range_and_key_dependence():
    seed = torch.tensor([1, 1, 1, 2])
    offset = torch.tensor([5, 5, 6, 5])
    u = sampling.uniform(seed, offset, 0, 4096)
    assert u.dtype == torch.float32 and u.shape == (4, 4096)
    assert bool((u > 0).all()) and bool((u < 1).all())
    assert abs(float(u.mean()) - 0.5) < 0.02
    assert torch.equal(u[0], u[1])  # same key, same numbers
    assert not torch.equal(u[0], u[2])  # other offset
    assert not torch.equal(u[0], u[3])  # other seed
    other_stream = sampling.uniform(seed[:1], offset[:1], 3, 4096)
    assert not torch.equal(u[0], other_stream[0])


def test_greedy_when_temperature_not_positive():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    temp = torch.tensor([0.0, -1.0, 0.0, 1.0])
    top_k = torch.tensor([0, 5, 1, 0])
    seed = torch.arange(4)
    out = sampling.sample(logits, temp, top_k, seed, torch.zeros(4, dtype=torch.long), 0)
    assert out[:3].tolist() == logits[:3].argmax(-1).tolist()


def test_rows_independent_of_batch_composition():
    torch.manual_seed(1)
    logits = torch.randn(5, 300)
    temp = torch.tensor([0.8, 1.0, 0.7, 1.3, 0.9])
    top_k = torch.tensor([250, 0, 25, 3, 100])
    seed = torch.tensor([11, 22, 33, 44, 55])
    offset = torch.tensor([7, 1, 100, 3, 9])
    together = sampling.sample(logits, temp, top_k, seed, offset, 4)
    for i in range(5):
        alone = sampling.sample(logits[i : i + 1], temp[i : i + 1], top_k[i : i + 1], seed[i : i + 1], offset[i : i + 1], 4)
        assert int(alone) == int(together[i])
    # Changing other rows changes nothing for row 0.
    logits2 = logits.clone()
    logits2[1:] = torch.randn(4, 300)
    again = sampling.sample(logits2, temp, top_k, seed, offset, 4)
    assert int(again[0]) == int(together[0])


def test_top_k_is_respected():
    torch.manual_seed(2)
    logits = torch.randn(1, 64).expand(400, -1).contiguous()
    k = 5
    allowed = set(logits[0].topk(k).indices.tolist())
    out = sampling.sample(
        logits,
        torch.full((400,), 5.0),  # hot: without top-k, many tokens outside the top 5 would come up
        torch.full((400,), k),
        torch.full((400,), 3),
        torch.arange(400),
        1,
    )
    assert set(out.tolist()) <= allowed
    assert len(set(out.tolist())) == k


def test_distribution_matches_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    temp = 0.8
    n = 20000
    out = sampling.sample(
        logits.expand(n, -1),
        torch.full((n,), temp),
        torch.zeros(n, dtype=torch.long),
        torch.full((n,), 1234),
        torch.arange(n),
        0,
    )
    freq = torch.bincount(out, minlength=5).float() / n
    probs = torch.softmax(logits[0] / temp, dim=-1)
    assert float((freq - probs).abs().max()) < 0.015


def test_top_k_distribution_renormalised():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    n = 20000
    out = sampling.sample(
        logits.expand(n, -1),
        torch.ones(n),
        torch.full((n,), 2),
        torch.full((n,), 99),
        torch.arange(n),
        2,
    )
    freq = torch.bincount(out, minlength=4).float() / n
    probs = torch.softmax(logits[0, :2], dim=-1)
    assert float(freq[2:].sum()) == 0.0
    assert float((freq[:2] - probs).abs().max()) < 0.015


def test_top_k_bound_is_the_one_personas_and_the_protocol_accept():
    from app import protocol

    assert protocol.MAX_TOP_K == sampling.MAX_TOP_K


def test_top_k_up_to_the_bound_equals_a_full_sort():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 32000, generator=gen)
    top_k = torch.tensor([1, 25, 250, sampling.MAX_TOP_K, 0, 32000])
    kept = sampling.top_k_mask(logits, top_k)
    ranks = logits.argsort(dim=-1, descending=True).argsort(dim=-1)  # rank of each token in its row
    for row, k in enumerate(top_k.tolist()):
        expected = ranks[row] < k if 0 < k < 32000 else torch.ones(32000, dtype=torch.bool)
        assert torch.equal(kept[row], expected), k


def test_noise_of_several_streams_at_once_equals_one_stream_at_a_time():
    seed = torch.tensor([0, 7, 2**40 + 3])
    offset = torch.tensor([1, 55, 3000])
    streams = torch.arange(1, 9)
    together = sampling.gumbel(seed[:, None], offset[:, None], streams, 64)  # [3, 8, 64]
    for k in range(8):
        assert torch.equal(together[:, k], sampling.gumbel(seed, offset, 1 + k, 64))


def test_keys_kept_between_steps_give_the_same_noise_as_hashing_everything_each_step():
    """The LM keeps each row's seed key and the token-id hashes; the noise must not change."""
    seed = torch.tensor([0, 7, 2**40 + 3, 2**62 - 1])
    offset = torch.tensor([1, 55, 3000, 2**33 + 5])
    key = sampling.step_key(sampling.seed_key(seed), offset)
    text = sampling.gumbel_from_keys(sampling.stream_key(key, 0), sampling.token_hashes(500, "cpu"))
    assert torch.equal(text, sampling.gumbel(seed, offset, 0, 500))
    audio = sampling.gumbel_from_keys(sampling.stream_key(key[:, None], torch.arange(1, 9)),
                                      sampling.token_hashes(64, "cpu"))
    assert torch.equal(audio, sampling.gumbel(seed[:, None], offset[:, None], torch.arange(1, 9), 64))


def test_the_lm_seed_key_follows_every_seed_change():
    from app.worker.model.lm import LMConfig, PersonaPlexLM

    lm = PersonaPlexLM(LMConfig.tiny(), max_slots=3)
    assert torch.equal(lm.sampling.seed_key, sampling.seed_key(lm.sampling.seed))  # fresh random seeds at build
    lm.set_sampling([1], seed=12345)
    assert torch.equal(lm.sampling.seed_key, sampling.seed_key(lm.sampling.seed)) and int(lm.sampling.seed[1]) == 12345
    lm.reset([1])
    assert int(lm.sampling.seed[1]) != 12345 and torch.equal(lm.sampling.seed_key, sampling.seed_key(lm.sampling.seed))
    assert torch.equal(lm.sampling.text_token_hash, sampling.token_hashes(lm.cfg.text_vocab, "cpu"))


def test_candidate_sampling_draws_the_same_tokens_as_the_whole_vocabulary():
    """Noise only for the top-`width` candidates, same (key, id) -> same uniform: same tokens, for
    every row's own k <= width and temperature (greedy included), text and audio sized vocabularies."""
    gen = torch.Generator().manual_seed(11)
    for vocab, width in ((32000, 25), (2048, 250), (2048, 1)):
        n = 96
        logits = torch.randn(n, vocab, generator=gen) * 3
        top_k = torch.randint(1, width + 1, (n,), generator=gen)
        temperature = torch.rand(n, generator=gen) * 1.2
        temperature[::7] = 0.0  # greedy rows
        seed = torch.randint(0, 2**40, (n,), generator=gen)
        offset = torch.randint(1, 5000, (n,), generator=gen)
        hashes = sampling.token_hashes(vocab, "cpu")
        for stream in (0, 3):
            keys = sampling.row_keys(seed, offset, stream)
            full = sampling.sample(logits, temperature, top_k, seed, offset, stream)
            fast = sampling.sample_candidates(logits, temperature, top_k, keys, hashes, width)
            assert torch.equal(full, fast), (vocab, width, stream)


def test_candidate_width_is_the_largest_top_k_or_none_when_a_row_needs_every_token():
    assert sampling.candidate_width([25, 10, 25], 32000) == 25
    assert sampling.candidate_width([250, 0], 2048) is None  # top-k 0: no filter
    assert sampling.candidate_width([2048], 2048) is None  # k >= vocabulary: no filter
    assert sampling.candidate_width([], 2048) is None


def test_a_row_whose_top_k_does_not_fit_the_width_is_refused():
    import pytest

    from app.worker.model.lm import LMConfig
    from app.worker.model.lm_state import SamplingParams

    cfg = LMConfig.tiny()
    params = SamplingParams(cfg, 3)
    params.init_constants()
    params.reset_slots(torch.ones(3, dtype=torch.bool))
    params.set_widths(25, 250)
    mask = torch.tensor([False, True, False])
    params.set(mask, top_k_text=20, top_k_audio=250)
    assert params.top_k_text.tolist()[1] == 20
    for bad in ({"top_k_text": 26}, {"top_k_audio": 0}, {"top_k_text": torch.tensor([1, 99, 1])}):
        with pytest.raises(ValueError, match="sampling width"):
            params.set(mask, **bad)
    params.set(mask, top_k_text=torch.tensor([99, 5, 99]))  # only the masked rows must fit
    with pytest.raises(ValueError, match="width"):
        params.set_widths(cfg.text_vocab, 250)
