"""Sampling: the KV cache against recomputation, guidance against hand-combined logits, seeds per sample
independent of the batch, the filters against brute force, and the inverse-CDF draw's distribution."""
import numpy as np
import pytest
import torch
from test_generator_model import condition_for, config, random_model

from stage2_generator.config import SamplingConfig
from stage2_generator.sampling import filter_logits, generate, guidance_at, pick_codes, sample_uniforms


def by_hand(model, condition, indices, cfg: SamplingConfig, scale_of=None):
    """The definition, one full uncached forward per code: l = l_u + s (l_c - l_u), then pick_codes."""
    n, length = len(indices), model.config.sequence_length
    uniforms = sample_uniforms(cfg.seed, indices, length)
    codes = torch.zeros(n, length, dtype=torch.long)
    null = model.condition.null(n, torch.device("cpu"))
    for t in range(length):
        cond = model.logits(codes, condition)[:, t]
        logits = cond
        if scale_of is not None:
            uncond = model.logits(codes, null)[:, t]
            logits = uncond + scale_of(t) * (cond - uncond)
        codes[:, t] = pick_codes(logits, uniforms[:, t], cfg)
    return codes


@pytest.mark.parametrize("conditioning", ["class", "text", "tokens", "none"])
@pytest.mark.parametrize("sampling", [SamplingConfig(seed=3), SamplingConfig(temperature=0.7, top_k=20, top_p=0.9),
                                      SamplingConfig(temperature=0)])
def test_cached_sampling_equals_recomputing_the_sequence(conditioning, sampling):
    cfg = config(conditioning)
    model = random_model(cfg)
    condition = condition_for(cfg, 4)
    cached = generate(model, condition, range(4), sampling)
    uncached = generate(model, condition, range(4), sampling, use_cache=False)
    assert torch.equal(cached, uncached)
    assert cached.min() >= 0 and cached.max() < cfg.codebook_size


def test_guidance_scale_1_is_plain_conditional_sampling():
    cfg = config("class")
    model = random_model(cfg)
    labels = torch.tensor([0, 3, 4])
    sampling = SamplingConfig(guidance_scale=1.0, seed=5)
    assert torch.equal(generate(model, labels, [7, 8, 9], sampling), by_hand(model, labels, [7, 8, 9], sampling))


@pytest.mark.parametrize("schedule", ["constant", "linear"])
@pytest.mark.parametrize("conditioning", ["class", "text", "tokens"])
def test_guided_sampling_combines_conditional_and_null_logits(schedule, conditioning):
    cfg = config(conditioning)
    model = random_model(cfg)
    condition = condition_for(cfg, 3)
    sampling = SamplingConfig(guidance_scale=3.0, guidance_schedule=schedule, seed=1)
    got = generate(model, condition, range(3), sampling)
    want = by_hand(model, condition, range(3), sampling, scale_of=lambda t: guidance_at(sampling, t, 12))
    assert torch.equal(got, want)
    assert not torch.equal(got, generate(model, condition, range(3), SamplingConfig(seed=1)))


def test_linear_schedule_rises_from_1_to_the_scale():
    s = SamplingConfig(guidance_scale=4.0, guidance_schedule="linear")
    assert [guidance_at(s, t, 4) for t in range(4)] == [1.0, 2.0, 3.0, 4.0]
    assert guidance_at(SamplingConfig(guidance_scale=4.0), 0, 4) == 4.0


def test_guidance_scale_0_samples_the_null_condition():
    cfg = config("class")
    model = random_model(cfg)
    labels = torch.tensor([0, 1])
    null = model.condition.null(2, torch.device("cpu"))
    s0 = generate(model, labels, [0, 1], SamplingConfig(guidance_scale=0.0, seed=2))
    assert torch.equal(s0, generate(model, null, [0, 1], SamplingConfig(seed=2)))


def test_same_seed_gives_the_same_codes_at_batch_sizes_1_and_8():
    cfg = config("class")
    model = random_model(cfg)
    labels = torch.arange(8) % cfg.num_classes
    sampling = SamplingConfig(guidance_scale=2.0, top_p=0.95, seed=11)
    together = generate(model, labels, range(100, 108), sampling)
    alone = torch.cat([generate(model, labels[i:i + 1], [100 + i], sampling) for i in range(8)])
    assert torch.equal(together, alone)
    assert len({tuple(row.tolist()) for row in together}) == 8  # the samples differ from each other
    other_seed = generate(model, labels, range(100, 108), SamplingConfig(guidance_scale=2.0, top_p=0.95, seed=12))
    assert not torch.equal(together, other_seed)


def test_image_prefix_is_kept_and_the_rest_continues_it():
    cfg = config("class")
    model = random_model(cfg)
    labels, sampling = torch.tensor([1, 2]), SamplingConfig(seed=4)
    full = generate(model, labels, [0, 1], sampling)
    continued = generate(model, labels, [0, 1], sampling, prefix_codes=full[:, :4])
    assert torch.equal(continued, full)  # same prefix, same uniforms per position: same continuation
    other = generate(model, labels, [0, 1], sampling, prefix_codes=(full[:, :4] + 1) % cfg.codebook_size)
    assert torch.equal(other[:, :4], (full[:, :4] + 1) % cfg.codebook_size)


def test_top_k_and_top_p_keep_exactly_the_brute_force_sets():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 30, generator=g, dtype=torch.float64) * 2
    for k in (1, 5, 29):
        kept = torch.isfinite(filter_logits(logits, k, 1.0))
        for row, keep in zip(logits, kept):
            assert set(torch.nonzero(keep)[:, 0].tolist()) == set(torch.topk(row, k).indices.tolist())
    for p in (0.1, 0.5, 0.9, 0.999):
        kept = torch.isfinite(filter_logits(logits, 0, p))
        for row, keep in zip(logits, kept):
            probs = row.softmax(0)
            order = torch.argsort(probs, descending=True)
            # the smallest prefix of the sorted codes whose mass reaches p
            size = int(np.searchsorted(np.cumsum(probs[order].numpy()), p) + 1)
            assert set(torch.nonzero(keep)[:, 0].tolist()) == set(order[:size].tolist())


def test_inverse_cdf_draws_follow_the_filtered_distribution():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4, 1e-9]]))
    uniforms = torch.from_numpy(np.random.default_rng(0).random(40000))
    picks = torch.stack([pick_codes(logits, u[None], SamplingConfig()) for u in uniforms[:4000]])
    freq = torch.bincount(picks[:, 0], minlength=5).double() / 4000
    torch.testing.assert_close(freq[:4], torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64), atol=0.025, rtol=0)
    batch = pick_codes(logits.expand(40000, -1), uniforms, SamplingConfig(top_k=2))
    assert set(batch.tolist()) == {2, 3}  # codes outside the top 2 are never drawn
    assert abs((batch == 3).double().mean().item() - 4 / 7) < 0.01
    # u just below 1 and exactly 0 stay inside the kept set
    edge = pick_codes(logits.expand(2, -1), torch.tensor([1 - 1e-16, 0.0]), SamplingConfig(top_k=2))
    assert edge.tolist() == [3, 2]


def test_uniforms_depend_on_seed_and_index_only():
    a = sample_uniforms(3, [5, 9], 10)
    assert torch.equal(a[1], sample_uniforms(3, [9], 10)[0])
    assert not torch.equal(a[0], sample_uniforms(4, [5], 10)[0])


def test_bad_sampling_settings_are_refused():
    model = random_model(config("none"))
    with pytest.raises(ValueError, match="unconditional"):
        generate(model, None, [0], SamplingConfig(guidance_scale=2.0))
    cond = random_model(config("class"))
    for bad in (SamplingConfig(guidance_scale=-1), SamplingConfig(top_p=0.0), SamplingConfig(temperature=-1),
                SamplingConfig(guidance_schedule="cosine")):
        with pytest.raises(ValueError):
            generate(cond, torch.tensor([0]), [0], bad)
