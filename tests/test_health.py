"""Codebook health statistics: counts, utilisation, dead codes, perplexity, the usage plot."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from stage1_tokenizer.quantizers import CodebookUsage


def test_counts_accumulate_like_bincount():
    k = 100
    rng = np.random.default_rng(0)
    usage = CodebookUsage(k)
    seen = []
    for shape in [(2, 4, 4), (3, 7, 5), (1, 1, 1), (0, 3, 3), (4, 16, 16)]:
        idx = rng.integers(0, 60, size=shape)  # codes 60..99 never used
        seen.append(idx.reshape(-1))
        usage.update(torch.from_numpy(idx))
    expected = np.bincount(np.concatenate(seen), minlength=k)
    assert usage.counts.dtype == torch.long
    assert np.array_equal(usage.counts.numpy(), expected)
    assert usage.total == int(expected.sum())
    assert usage.used == int((expected > 0).sum())
    assert usage.dead == k - usage.used
    assert usage.utilisation == usage.used / k
    assert usage.used <= 60 and usage.dead >= 40


def test_exact_used_dead_utilisation():
    usage = CodebookUsage(10)
    usage.update(torch.tensor([[[0, 0, 3], [3, 9, 0]]]))
    assert usage.counts.tolist() == [3, 0, 0, 2, 0, 0, 0, 0, 0, 1]
    assert (usage.total, usage.used, usage.dead) == (6, 3, 7)
    assert usage.utilisation == pytest.approx(0.3, abs=0)
    usage.update(torch.arange(10, dtype=torch.int32).view(1, 2, 5))  # int32 input works
    assert (usage.used, usage.dead, usage.utilisation) == (10, 0, 1.0)


@pytest.mark.parametrize("k", [2, 7, 1024, 65_536])
def test_perplexity_uniform_is_k(k):
    usage = CodebookUsage(k)
    usage.update(torch.arange(k).repeat(3))
    assert usage.perplexity == pytest.approx(k, rel=1e-9)


def test_perplexity_single_code_is_one():
    usage = CodebookUsage(512)
    usage.update(torch.full((4, 8, 8), 17))
    assert usage.perplexity == pytest.approx(1.0, abs=1e-12)
    assert (usage.used, usage.dead) == (1, 511)


def test_perplexity_random_distribution_matches_exp_entropy():
    rng = np.random.default_rng(1)
    k = 300
    p = rng.dirichlet(np.full(k, 0.3))
    idx = rng.choice(k, size=20_000, p=p)
    usage = CodebookUsage(k)
    for part in np.array_split(idx, 7):
        usage.update(torch.from_numpy(part))
    counts = np.bincount(idx, minlength=k).astype(np.float64)
    q = counts[counts > 0] / counts.sum()
    expected = math.exp(-float(np.sum(q * np.log(q))))
    assert usage.perplexity == pytest.approx(expected, rel=1e-12)
    assert 1 < usage.perplexity < usage.used


def test_perplexity_two_codes_by_hand():
    usage = CodebookUsage(4)
    usage.update(torch.tensor([0, 0, 0, 1]))  # p = (3/4, 1/4)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert usage.perplexity == pytest.approx(math.exp(h), rel=1e-12)


def test_empty_usage():
    usage = CodebookUsage(8)
    assert (usage.total, usage.used, usage.dead, usage.utilisation, usage.perplexity) == (0, 0, 8, 0.0, 0.0)
    usage.update(torch.zeros(0, dtype=torch.long))
    assert usage.total == 0


def test_summary_keys_and_values():
    usage = CodebookUsage(16)
    usage.update(torch.tensor([1, 1, 2, 5]))
    s = usage.summary()
    assert s == {"codebook_size": 16, "tokens": 4, "used": 3, "dead": 13, "utilisation": 3 / 16,
                 "perplexity": pytest.approx(math.exp(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))))}


def test_merged_without_process_group_is_a_copy():
    usage = CodebookUsage(8)
    usage.update(torch.tensor([1, 2, 2]))
    merged = usage.merged()
    assert merged is not usage and merged.counts is not usage.counts
    assert torch.equal(merged.counts, usage.counts)
    merged.counts += 1
    assert usage.counts.tolist() == [0, 1, 2, 0, 0, 0, 0, 0]


def test_save_plot_writes_png(tmp_path):
    usage = CodebookUsage(1000)
    rng = np.random.default_rng(2)
    usage.update(torch.from_numpy(rng.zipf(1.5, size=5000) % 700))
    path = usage.save_plot(tmp_path / "sub" / "usage.png", title="zipf")
    assert path == tmp_path / "sub" / "usage.png" and path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == (600, 350)  # figsize (6, 3.5) at dpi 100
        im.load()


def test_save_plot_handles_collapse_and_empty(tmp_path):
    usage = CodebookUsage(64)
    usage.update(torch.zeros(100, dtype=torch.long))
    with Image.open(usage.save_plot(tmp_path / "one.png")) as im:
        assert im.size == (600, 350)
    with Image.open(CodebookUsage(64).save_plot(tmp_path / "empty.png")) as im:
        assert im.size == (600, 350)
