"""Exact nearest-code search: agreement with a float64 brute force, block planning, ties, autocast."""
from __future__ import annotations

import pytest
import torch

from stage1_tokenizer.quantizers import search
from stage1_tokenizer.quantizers.search import DEFAULT_MAX_BYTES, nearest_code, plan_blocks


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny budgets mean thousands of tiny GEMMs: with 2 OpenMP threads on a shared 2-core box each one
    can cost milliseconds of barrier spinning. One thread keeps these tests fast and deterministic."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def f64_distances(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Squared distances in float64 from the differences, sum_j (z_j - c_j)^2 (no ||z||^2 - 2 z.c + ||c||^2
    expansion): cdist's non-matmul mode is this formula, only much faster than broadcasting in Python."""
    return torch.cdist(z.double(), codebook.double(), compute_mode="donot_use_mm_for_euclid_dist").square()


def brute_force_f64(z: torch.Tensor, codebook: torch.Tensor, chunk: int = 512):
    """Per token: float64 (min, second min, argmin) over all codes, chunked over tokens."""
    best, second, arg = [], [], []
    for t0 in range(0, z.shape[0], chunk):
        d = f64_distances(z[t0:t0 + chunk], codebook)
        k = min(2, d.shape[1])
        vals, _ = d.topk(k, dim=1, largest=False)
        best.append(vals[:, 0])
        second.append(vals[:, k - 1])
        arg.append(d.argmin(1))  # argmin: first occurrence on exact ties
    return torch.cat(best), torch.cat(second), torch.cat(arg)


def test_reference_distance_is_the_literal_formula():
    g = torch.Generator().manual_seed(0)
    z, c = torch.randn(33, 5, generator=g), torch.randn(77, 5, generator=g)
    literal = ((z.double()[:, None] - c.double()[None]) ** 2).sum(-1)
    torch.testing.assert_close(f64_distances(z, c), literal, rtol=1e-13, atol=1e-13)


def f64_dist_of(z: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return ((z.double() - codebook.double()[indices]) ** 2).sum(-1)


def assert_exact_search(z, codebook, indices, min_clear_share=0.99):
    """The chosen code is a float64 nearest code (up to fp32 rounding of the expanded distance),
    and is exactly the float64 argmin wherever the float64 gap is not a near tie."""
    assert indices.dtype == torch.int64
    assert indices.shape == (z.shape[0],)
    assert int(indices.min()) >= 0 and int(indices.max()) < codebook.shape[0]
    best, second, arg = brute_force_f64(z, codebook)
    chosen = f64_dist_of(z, codebook, indices)
    # the natural scale of the fp32 error of ||c||^2 - 2 z.c (+ ||z||^2)
    scale = z.double().square().sum(1) + codebook.double()[arg].square().sum(1)
    assert torch.all(chosen >= best - 1e-12 * scale)
    excess = chosen - best
    assert torch.all(excess <= 1e-5 * scale), f"max excess/scale {float((excess / scale).max()):.3g}"
    clear = (second - best) > 1e-4 * scale
    assert clear.double().mean() >= min_clear_share, f"only {float(clear.double().mean()):.3f} clear tokens"
    mismatch = (indices != arg) & clear
    assert not mismatch.any(), f"{int(mismatch.sum())} clear tokens got a different index, first at " \
                               f"{mismatch.nonzero()[:5].flatten().tolist()}"


CASES = [
    # (N, K, d)
    (1, 2, 1),
    (7, 3, 5),
    (100, 1000, 8),
    (513, 1025, 7),     # odd, larger than one 1024-code block
    (2049, 1024, 4),    # one token past TOKEN_BLOCK
    (2500, 1237, 3),    # odd on both sides: 2 token blocks x 2 code blocks (2048 x 1024) at the default budget
    (300, 65_536, 16),  # K = 65,536
]


@pytest.mark.parametrize("n,k,d", CASES)
def test_matches_float64_brute_force(n, k, d):
    g = torch.Generator().manual_seed(n * 31 + k * 7 + d)
    z = torch.randn(n, d, generator=g)
    codebook = torch.randn(k, d, generator=g) * d ** -0.5
    assert_exact_search(z, codebook, nearest_code(z, codebook))


TINY = [4, 4 * 7, 4 * 7 * 13, 4 * 7 * 13 + 3, 4 * 1000 + 1, 4 * 1024 * 3 - 4, 4 * 2048 * 1024 + 4 * 1023]


@pytest.mark.parametrize("n,k,d,max_bytes",
                         [(37, 301, 6, mb) for mb in TINY] + [(257, 2051, 5, mb) for mb in TINY[2:]])
@pytest.mark.parametrize("host_sync", [True, False], ids=["cpu-merge", "gpu-merge"])
def test_tiny_budgets_force_token_and_code_chunking(n, k, d, max_bytes, host_sync):
    g = torch.Generator().manual_seed(max_bytes + n)
    z = torch.randn(n, d, generator=g)
    codebook = torch.randn(k, d, generator=g)
    indices = nearest_code(z, codebook, max_bytes=max_bytes, host_sync=host_sync)
    assert_exact_search(z, codebook, indices)


def test_tiny_budget_really_chunks_both_sides():
    # sanity check of the test above: these budgets do split both tokens and codes
    tb, cb = plan_blocks(37, 301, 4 * 7 * 13)
    assert tb < 37 and cb < 301
    tb, cb = plan_blocks(257, 2051, 4 * 1024 * 3 - 4)
    assert tb < 257 and cb < 2051


@pytest.mark.parametrize("host_sync", [True, False], ids=["cpu-merge", "gpu-merge"])
def test_k65536_with_small_budget_merges_many_blocks(host_sync):
    g = torch.Generator().manual_seed(5)
    z = torch.randn(300, 16, generator=g)
    codebook = torch.randn(65_536, 16, generator=g) * 0.25
    max_bytes = 4 * 7 * 13 * 97 + 2  # odd: 38 token blocks x 60 code blocks of odd width (8 x 1103)
    tb, cb = plan_blocks(300, 65_536, max_bytes)
    assert tb < 300 and 65_536 % cb != 0
    indices = nearest_code(z, codebook, max_bytes=max_bytes, host_sync=host_sync)
    assert_exact_search(z, codebook, indices)


GRID_TOKENS = [0, 1, 2, 5, 1023, 2047, 2048, 2049, 10_000]
GRID_CODES = [1, 2, 3, 1000, 1023, 1024, 1025, 65_536, 262_144, 1_000_003]
GRID_BYTES = [4, 5, 7, 4 * 7 * 13, 4095, 4096, 4097, 123_457, 2**20 + 3, DEFAULT_MAX_BYTES, 2**31 + 5]


def test_plan_blocks_within_budget_and_covering():
    for num_tokens in GRID_TOKENS:
        for num_codes in GRID_CODES:
            for max_bytes in GRID_BYTES:
                case = (num_tokens, num_codes, max_bytes)
                token_block, code_block = plan_blocks(num_tokens, num_codes, max_bytes)
                assert isinstance(token_block, int) and isinstance(code_block, int), case
                assert token_block >= 1 and code_block >= 1, case
                assert token_block * code_block * 4 <= max_bytes, case
                assert code_block <= num_codes and token_block <= max(num_tokens, 1), case
                # range(0, N, token_block) x range(0, K, code_block) covers every (token, code) exactly once
                tokens = [t for t0 in range(0, num_tokens, token_block)
                          for t in range(t0, min(t0 + token_block, num_tokens))] if num_tokens < 20_000 else None
                if tokens is not None:
                    assert tokens == list(range(num_tokens)), case
                assert len(range(0, num_codes, code_block)) == -(-num_codes // code_block), case
                assert (len(range(0, num_codes, code_block)) - 1) * code_block < num_codes, case


def test_plan_blocks_rejects_budget_below_one_distance():
    with pytest.raises(ValueError, match="max_bytes"):
        plan_blocks(10, 10, 3)
    with pytest.raises(ValueError, match="max_bytes"):
        nearest_code(torch.randn(3, 2), torch.randn(4, 2), max_bytes=0)


def test_plan_blocks_default_shape():
    # documented: ~2048 x 1024 distance blocks at the default 8 MiB budget
    assert plan_blocks(100_000, 65_536, DEFAULT_MAX_BYTES) == (2048, 1024)
    assert plan_blocks(10, 500, DEFAULT_MAX_BYTES) == (10, 500)


@pytest.mark.parametrize("max_bytes", [DEFAULT_MAX_BYTES, 4 * 3, 4 * 7 * 13, 4 * 1024 * 5 + 8])
def test_duplicate_codes_pick_one_of_the_duplicates(max_bytes):
    """Exact duplicates of a code, far apart (so in different blocks): the search picks one of them.

    Which one is not promised: BLAS may round the same dot product differently at different
    offsets (seen: one ulp apart for a single-row block), so only *equal computed* distances
    are guaranteed to resolve to the lowest index (next test).
    """
    g = torch.Generator().manual_seed(0)
    d = 6
    base = torch.randn(40, d, generator=g)
    filler = 3000 if max_bytes > 4 * 1024 else 300  # keep the loops over 3-distance blocks short
    codebook = torch.cat([base, base, base, base, torch.randn(filler, d, generator=g) + 50.0, base])
    sources = torch.randint(0, 40, (500,), generator=g)
    z = torch.cat([base[sources] + 1e-3 * torch.randn(500, d, generator=g), base])
    expected = torch.cat([sources, torch.arange(40)])
    indices = nearest_code(z, codebook, max_bytes=max_bytes)
    duplicate_of = torch.where(indices < 160, indices % 40, indices - 160 - filler)
    assert torch.equal(duplicate_of, expected)
    assert not ((indices >= 160) & (indices < 160 + filler)).any()  # never a filler code


def test_ties_with_exact_equal_distances_lowest_index():
    # z = 0, codes +e and -e are at exactly the same distance -> lowest index of the pair
    codebook = torch.tensor([[5.0, 0.0], [0.0, 1.0], [0.0, -1.0], [1.0, 0.0], [-1.0, 0.0]])
    z = torch.zeros(3, 2)
    for mb in (DEFAULT_MAX_BYTES, 4, 8, 12):
        for host_sync in (True, False):
            assert nearest_code(z, codebook, max_bytes=mb, host_sync=host_sync).tolist() == [1, 1, 1]


@pytest.mark.parametrize("max_bytes", [DEFAULT_MAX_BYTES, 4 * 7 * 13 * 11])
def test_autocast_bf16_gives_fp32_result(max_bytes):
    g = torch.Generator().manual_seed(3)
    z = torch.randn(700, 16, generator=g)
    codebook = torch.randn(4099, 16, generator=g) * 0.25
    ref = nearest_code(z, codebook, max_bytes)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = nearest_code(z, codebook, max_bytes)
    assert torch.equal(got, ref)

    # z in bf16: same answer as searching its exact fp32 value without autocast
    z_bf16 = z.bfloat16()
    ref_bf16 = nearest_code(z_bf16.float(), codebook, max_bytes)
    assert torch.equal(nearest_code(z_bf16, codebook, max_bytes), ref_bf16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_bf16 = nearest_code(z_bf16, codebook, max_bytes)
    assert torch.equal(got_bf16, ref_bf16)
    # and the bf16 codebook case too
    c_bf16 = codebook.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_c = nearest_code(z_bf16, c_bf16, max_bytes)
    assert torch.equal(got_c, nearest_code(z_bf16.float(), c_bf16.float(), max_bytes))


def test_autocast_distances_are_fp32(monkeypatch):
    seen = []
    real_mm = torch.mm

    def spy(*args, **kwargs):
        out = real_mm(*args, **kwargs)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(search.torch, "mm", spy)
    z = torch.randn(50, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nearest_code(z, torch.randn(300, 8), 4 * 7 * 13)
        nearest_code(z, torch.randn(300, 8))
    assert seen and all(dt == torch.float32 for dt in seen)


def test_empty_input():
    out = nearest_code(torch.empty(0, 8), torch.randn(10, 8))
    assert out.dtype == torch.int64 and out.shape == (0,)
    out = nearest_code(torch.empty(0, 8), torch.randn(10, 8), max_bytes=4)
    assert out.dtype == torch.int64 and out.shape == (0,)


def test_shape_mismatch_rejected():
    with pytest.raises(ValueError, match="same d"):
        nearest_code(torch.randn(4, 3), torch.randn(5, 4))
    with pytest.raises(ValueError, match=r"\(N, d\)"):
        nearest_code(torch.randn(4, 3, 1), torch.randn(5, 3))


def test_does_not_track_gradient():
    z = torch.randn(20, 4, requires_grad=True)
    c = torch.randn(30, 4, requires_grad=True)
    out = nearest_code(z, c)
    assert not out.requires_grad


@pytest.mark.parametrize("max_bytes", [4, 4 * 7 * 13, 4 * 7 * 13 + 3, 40_000, 4 * 1024 * 2049, DEFAULT_MAX_BYTES])
@pytest.mark.parametrize("n,k", [(3000, 5000), (100, 70_000), (2049, 1025)])
def test_distance_blocks_stay_within_budget(monkeypatch, n, k, max_bytes):
    largest = [0]
    real_mm = torch.mm

    def spy(*args, **kwargs):
        out = real_mm(*args, **kwargs)
        largest[0] = max(largest[0], out.numel())
        return out

    monkeypatch.setattr(search.torch, "mm", spy)
    if max_bytes < 4 * 1024:
        n, k = min(n, 40), min(k, 1500)  # keep the tiny-budget Python loops short; the bound is what matters
    g = torch.Generator().manual_seed(1)
    z = torch.randn(n, 4, generator=g)
    c = torch.randn(k, 4, generator=g)
    nearest_code(z, c, max_bytes=max_bytes)
    assert 0 < largest[0] <= max_bytes // 4
