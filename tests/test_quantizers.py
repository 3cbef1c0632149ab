"""SimVQ, plain VQ and EMA VQ: which term beta scales, where gradients go, EMA arithmetic, lookups, checks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stage1_tokenizer.quantizers import EMAVQ, QUANTIZERS, VQ, SimVQ

NAMES = sorted(QUANTIZERS)


def make(name: str, codebook_size: int = 64, dim: int = 8, seed: int = 0, **kwargs):
    cls = QUANTIZERS[name]
    if cls is VQ:
        torch.manual_seed(seed)  # VQ's codebook comes from the global RNG
        return cls(codebook_size=codebook_size, dim=dim, **kwargs)
    return cls(codebook_size=codebook_size, dim=dim, seed=seed, **kwargs)


def latents(dim=8, b=2, h=5, w=7, seed=0, scale=1.0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, dim, h, w, generator=g) * scale
    return z.requires_grad_(requires_grad)


def flat(x: torch.Tensor) -> torch.Tensor:
    """(B, d, h, w) -> (B*h*w, d) in the quantizer's token order."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def randomise(q, seed=1):
    """Move the trainable part away from its initialisation so the effective codebook is non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if isinstance(q, SimVQ):
            d = q.dim
            q.basis.weight.copy_(torch.eye(d) * 1.5 + 0.4 * torch.randn(d, d, generator=g))
            if q.basis.bias is not None:
                q.basis.bias.copy_(0.3 * torch.randn(d, generator=g))
        elif isinstance(q, VQ):
            q.embedding.weight.copy_(torch.randn(q.codebook_size, q.dim, generator=g) * 0.7)
    return q


def assert_nearest(z_flat, codebook, indices, min_clear_share=0.99):
    """indices are a float64-nearest code for every token, and exactly the float64 argmin
    wherever the best-vs-second gap is not a near tie."""
    z64, c64 = z_flat.double(), codebook.double()
    d = torch.cdist(z64, c64, compute_mode="donot_use_mm_for_euclid_dist") ** 2  # float64, from differences
    vals, _ = d.topk(2, dim=1, largest=False)
    best, second = vals[:, 0], vals[:, 1]
    arg = d.argmin(1)
    chosen = d.gather(1, indices.view(-1, 1)).squeeze(1)
    scale = z64.square().sum(1) + c64[arg].square().sum(1)
    assert torch.all(chosen - best <= 1e-5 * scale)
    clear = (second - best) > 1e-4 * scale
    assert clear.double().mean() >= min_clear_share
    assert torch.equal(indices[clear], arg[clear])


# ---------------------------------------------------------------- SimVQ codebook


def test_simvq_frozen_codebook_is_a_buffer():
    q = SimVQ(1024, 16)
    assert "frozen_codebook" in q.state_dict()
    assert "frozen_codebook" in dict(q.named_buffers())
    assert "frozen_codebook" not in dict(q.named_parameters())
    assert all(p is not q.frozen_codebook for p in q.parameters())
    assert not q.frozen_codebook.requires_grad
    assert sorted(n for n, _ in q.named_parameters()) == ["basis.bias", "basis.weight"]
    assert q.basis.weight.shape == (16, 16) and q.frozen_codebook.shape == (1024, 16)


@pytest.mark.parametrize("dim", [8, 64])
def test_simvq_codebook_std_is_dim_to_minus_half(dim):
    q = SimVQ(65_536, dim, seed=3)
    c = q.frozen_codebook.double()
    assert abs(float(c.std()) / dim ** -0.5 - 1) < 0.02
    assert abs(float(c.mean())) < 0.01 * dim ** -0.5
    # so every code has squared norm ~1 on average
    assert abs(float(c.square().sum(1).mean()) - 1) < 0.02


def test_simvq_codebook_deterministic_by_seed():
    torch.manual_seed(123)
    a = SimVQ(4096, 16, seed=7).frozen_codebook
    torch.manual_seed(999)  # the global RNG must not matter: every rank draws the same codebook
    b = SimVQ(4096, 16, seed=7).frozen_codebook
    c = SimVQ(4096, 16, seed=8).frozen_codebook
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # EMA VQ starts from the same codes as SimVQ (documented: a fair comparison)
    assert torch.equal(EMAVQ(4096, 16, seed=7).embedding, a)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("bias", [True, False])
def test_simvq_gradients_reach_basis_not_frozen_codebook(bias):
    q = randomise(SimVQ(256, 8, bias=bias))
    z = latents(requires_grad=True)
    q(z).loss.backward()
    assert q.frozen_codebook.grad is None and not q.frozen_codebook.requires_grad
    assert q.basis.weight.grad is not None and q.basis.weight.grad.abs().sum() > 0
    assert torch.isfinite(q.basis.weight.grad).all()
    if bias:
        assert q.basis.bias.grad is not None and q.basis.bias.grad.abs().sum() > 0
    else:
        assert q.basis.bias is None
        assert [n for n, _ in q.named_parameters()] == ["basis.weight"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("beta", [0.25, 1.0, 0.0])
def test_beta_scales_the_encoder_term(name, beta):
    """d/dz [beta * mean((z - sg(z_q))^2)] = 2 beta (z - z_q) / numel; the codebook term sends z nothing."""
    q = randomise(make(name, beta=beta))  # training mode: EMA VQ updates its codebook in forward
    z = latents(requires_grad=True, scale=0.8)
    codebook_used = q.codebook().detach().clone()
    out = q(z)
    out.loss.backward()
    z_q = codebook_used[out.indices].permute(0, 3, 1, 2)
    expected = 2 * beta * (z.detach() - z_q) / z.numel()
    torch.testing.assert_close(z.grad, expected, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("bias", [True, False])
def test_simvq_basis_gradient_is_codebook_term_only(bias):
    """dL/dW = sum_n (2/numel) (z_q - z)_n^T C[idx_n], dL/db = sum_n (2/numel)(z_q - z)_n: no beta anywhere."""
    z = latents(dim=8, b=3, h=4, w=6, seed=4, scale=0.7)
    grads = {}
    for beta in (0.25, 1.0, 3.0):
        q = randomise(SimVQ(128, 8, beta=beta, bias=bias))
        out = q(z.clone().requires_grad_(True))
        out.loss.backward()
        idx = out.indices.reshape(-1)
        c = q.frozen_codebook.double()[idx]
        w = q.basis.weight.detach().double()
        zq = c @ w.T + (q.basis.bias.detach().double() if bias else 0)
        g = 2 * (zq - flat(z).double()) / z.numel()
        torch.testing.assert_close(q.basis.weight.grad.double(), g.T @ c, rtol=1e-4, atol=1e-8)
        if bias:
            torch.testing.assert_close(q.basis.bias.grad.double(), g.sum(0), rtol=1e-4, atol=1e-8)
        grads[beta] = q.basis.weight.grad.clone()
        # and the loss value itself: beta * mse + mse, both terms having the same value
        mse = F.mse_loss(flat(z).double(), zq)
        torch.testing.assert_close(out.loss.double(), (1 + beta) * mse, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(grads[0.25], grads[1.0], rtol=1e-6, atol=0)
    torch.testing.assert_close(grads[0.25], grads[3.0], rtol=1e-6, atol=0)


def test_simvq_autograd_reference_graph():
    """Same W gradient as an independent autograd graph of mean((C[idx] W^T + b - sg z)^2)."""
    q = randomise(SimVQ(128, 8))
    z = latents(seed=9)
    out = q(z)
    out.loss.backward()
    w = q.basis.weight.detach().clone().requires_grad_(True)
    b = q.basis.bias.detach().clone().requires_grad_(True)
    zq = q.frozen_codebook[out.indices.reshape(-1)] @ w.T + b
    ((zq - flat(z)) ** 2).mean().backward()
    torch.testing.assert_close(q.basis.weight.grad, w.grad, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(q.basis.bias.grad, b.grad, rtol=1e-5, atol=1e-9)


def test_vq_codebook_gradient_only_at_selected_rows():
    q = randomise(VQ(64, 8, beta=0.25))
    z = latents(b=1, h=3, w=4, seed=2)  # 12 tokens: most of the 64 codes are not selected
    out = q(z)
    out.loss.backward()
    idx = out.indices.reshape(-1)
    grad = q.embedding.weight.grad
    selected = torch.zeros(64, dtype=torch.bool)
    selected[idx] = True
    assert 1 <= int(selected.sum()) <= 12
    assert torch.all(grad[~selected] == 0), "unselected codes must get exactly zero gradient"
    assert torch.all(grad[selected].abs().sum(1) > 0)
    # analytic: row k gets sum over its tokens of 2 (c_k - z_n) / numel (codebook term, no beta)
    c = q.embedding.weight.detach().double()
    expected = torch.zeros_like(c).index_add_(0, idx, 2 * (c[idx] - flat(z).double()) / z.numel())
    torch.testing.assert_close(grad.double(), expected, rtol=1e-5, atol=1e-9)


# ---------------------------------------------------------------- straight-through and lookups


@pytest.mark.parametrize("name", NAMES)
def test_straight_through_passes_gradient_unchanged(name):
    q = randomise(make(name)).eval()  # eval: EMA VQ's indices_to_codes then sees the codebook forward used
    z = latents(requires_grad=True)
    out = q(z)
    g = torch.randn(z.shape, generator=torch.Generator().manual_seed(5))
    (out.quantized * g).sum().backward()
    assert torch.equal(z.grad, g)
    # the output path sends nothing to the codebook side
    for p in q.parameters():
        assert p.grad is None or torch.all(p.grad == 0)
    assert out.quantized.shape == z.shape and out.indices.shape == (2, 5, 7)
    assert out.indices.dtype == torch.int64
    torch.testing.assert_close(out.quantized.detach(), q.indices_to_codes(out.indices), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_indices_to_codes_matches_effective_codebook(name):
    q = randomise(make(name))
    idx = torch.randint(0, 64, (3, 4, 5), generator=torch.Generator().manual_seed(0))
    codes = q.indices_to_codes(idx)
    assert codes.shape == (3, 8, 4, 5)
    expected = q.codebook().detach()[idx].permute(0, 3, 1, 2)
    torch.testing.assert_close(codes.detach(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bias", [True, False])
def test_simvq_indices_to_codes_goes_through_linear_layer(bias):
    """The original code's trap: decoding cached indices must apply W and b, not return C[idx]."""
    q = SimVQ(64, 8, bias=bias)
    with torch.no_grad():
        q.basis.weight.copy_(2 * torch.eye(8))
        if bias:
            q.basis.bias.fill_(1.0)
    idx = torch.randint(0, 64, (2, 3, 4), generator=torch.Generator().manual_seed(0))
    c = q.frozen_codebook[idx].permute(0, 3, 1, 2)
    expected = 2 * c + (1.0 if bias else 0.0)
    torch.testing.assert_close(q.indices_to_codes(idx).detach(), expected, rtol=0, atol=1e-6)
    # and forward's quantized values are the same transformed codes
    z = latents(scale=2.0)
    out = q(z)
    expected_fwd = 2 * q.frozen_codebook[out.indices].permute(0, 3, 1, 2) + (1.0 if bias else 0.0)
    torch.testing.assert_close(out.quantized.detach(), expected_fwd, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_indices_are_nearest_in_effective_codebook(name):
    q = randomise(make(name, codebook_size=512, dim=8))
    z = latents(b=4, h=8, w=8, seed=11)
    out = q.eval()(z)
    assert_nearest(flat(z), q.codebook().detach(), out.indices.reshape(-1))
    if name == "simvq":  # the search runs against C W^T + b, not the raw frozen codes
        raw = torch.cdist(flat(z), q.frozen_codebook).argmin(1)
        assert (raw != out.indices.reshape(-1)).float().mean() > 0.5


@pytest.mark.parametrize("name", NAMES)
def test_small_search_budget_gives_same_indices(name):
    q = randomise(make(name, codebook_size=512, dim=8))
    small = randomise(make(name, codebook_size=512, dim=8, search_max_bytes=4 * 7 * 13 * 5))
    small.load_state_dict(q.state_dict())
    z = latents(b=2, h=8, w=8, seed=12)
    q.eval(), small.eval()
    a, b = q(z).indices.reshape(-1), small(z).indices.reshape(-1)
    assert_nearest(flat(z), q.codebook().detach(), b)
    assert (a == b).float().mean() >= 0.99


# ---------------------------------------------------------------- state dict


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name):
    src = randomise(make(name, seed=0))
    if name == "ema_vq":  # move the EMA buffers away from their initial values
        src.train()
        for s in range(3):
            src(latents(seed=100 + s))
    dst = make(name, seed=1)
    assert not all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
    dst.load_state_dict(src.state_dict())
    for key, value in src.state_dict().items():
        assert torch.equal(dst.state_dict()[key], value), key
    src.eval(), dst.eval()
    z = latents(seed=3)
    a, b = src(z), dst(z)
    assert torch.equal(a.indices, b.indices)
    assert torch.equal(a.quantized, b.quantized)
    assert torch.equal(a.loss, b.loss)
    if name == "ema_vq":
        assert {"embedding", "cluster_size", "embedding_sum"} <= set(src.state_dict())
        # training continues identically from the restored buffers
        src.train(), dst.train()
        for s in range(2):
            src(latents(seed=200 + s)), dst(latents(seed=200 + s))
        for key in ("embedding", "cluster_size", "embedding_sum"):
            assert torch.equal(getattr(src, key), getattr(dst, key)), key


# ---------------------------------------------------------------- EMA VQ


def ema_reference(cluster_size, embed_sum, z_flat, indices, decay, eps):
    k = cluster_size.shape[0]
    counts = torch.bincount(indices, minlength=k).double()
    sums = torch.zeros_like(embed_sum, dtype=torch.float64).index_add_(0, indices, z_flat.double())
    cs = decay * cluster_size.double() + (1 - decay) * counts
    es = decay * embed_sum.double() + (1 - decay) * sums
    n = cs.sum()
    smoothed = (cs + eps) / (n + k * eps) * n
    return cs, es, es / smoothed[:, None]


@pytest.mark.parametrize("decay", [0.99, 0.9, 0.0])
def test_ema_update_matches_hand_computation(decay):
    eps = 1e-5
    q = EMAVQ(32, 8, decay=decay, eps=eps, seed=4).train()
    init = q.embedding.clone()
    cs, es = torch.ones(32, dtype=torch.float64), init.double()
    for step in range(3):
        z = latents(b=2, h=6, w=5, seed=step, scale=0.5)
        before = q.embedding.clone()
        out = q(z)
        idx = out.indices.reshape(-1)
        # the search and the returned codes use the codebook from before this step's update
        # 60 tokens: allow a near tie; with decay 0 every unused code becomes exactly 0 (exact ties)
        assert_nearest(flat(z), before, idx, min_clear_share=0.95 if decay > 0 else 0.5)
        torch.testing.assert_close(out.quantized.detach(), before[out.indices].permute(0, 3, 1, 2), rtol=0, atol=1e-6)
        cs, es, emb = ema_reference(cs, es, flat(z), idx, decay, eps)
        torch.testing.assert_close(q.cluster_size.double(), cs, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(q.embedding_sum.double(), es, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(q.embedding.double(), emb, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(q.embedding, init)


def test_ema_first_step_explicit_numbers():
    """One step written out without any helper, straight from the definition."""
    d, eps, k = 0.9, 1e-5, 32
    q = EMAVQ(k, 8, decay=d, eps=eps, seed=2).train()
    init = q.embedding.clone().double()
    z = latents(b=1, h=4, w=4, seed=7, scale=0.5)
    idx = q(z).indices.reshape(-1)
    counts = torch.tensor([(idx == j).sum().item() for j in range(k)], dtype=torch.float64)
    sums = torch.stack([flat(z).double()[idx == j].sum(0) for j in range(k)])
    cluster_size = d * 1 + (1 - d) * counts
    embed_sum = d * init + (1 - d) * sums
    n = cluster_size.sum()
    smoothed = (cluster_size + eps) / (n + k * eps) * n
    torch.testing.assert_close(q.embedding.double(), embed_sum / smoothed[:, None], rtol=1e-5, atol=1e-7)
    assert abs(float(n) - (d * k + (1 - d) * 16)) < 1e-9


def test_ema_eval_mode_does_not_update():
    q = EMAVQ(32, 8, decay=0.5).eval()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q(latents())
    for key, value in q.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_ema_has_no_trainable_parameters_and_no_codebook_term():
    q = EMAVQ(32, 8, beta=0.25).eval()
    assert list(q.parameters()) == []
    z = latents(requires_grad=True)
    out = q(z)
    mse = F.mse_loss(z.detach(), q.indices_to_codes(out.indices))
    torch.testing.assert_close(out.loss, 0.25 * mse, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", ["simvq", "vq"])
@pytest.mark.parametrize("beta", [0.25, 1.0])
def test_gradient_quantizers_loss_value(name, beta):
    q = randomise(make(name, beta=beta))
    z = latents()
    out = q(z)
    mse = F.mse_loss(z, q.indices_to_codes(out.indices).detach())
    torch.testing.assert_close(out.loss.detach(), (1 + beta) * mse, rtol=1e-5, atol=0)


def test_ema_rejects_bad_decay():
    for decay in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"decay must lie in \[0, 1\)"):
            EMAVQ(16, 4, decay=decay)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", NAMES)
def test_bad_latents_rejected_with_clear_message(name):
    q = make(name, codebook_size=16, dim=8)
    with pytest.raises(ValueError, match=r"shape \(batch, 8, height, width\), got \(8, 5, 7\)"):
        q(torch.randn(8, 5, 7))
    with pytest.raises(ValueError, match=r"shape \(batch, 8, height, width\)"):
        q(torch.randn(2, 8, 5, 7, 1))
    with pytest.raises(ValueError, match=r"shape \(batch, 8, height, width\), got ndarray"):
        q(torch.randn(2, 8, 5, 7).numpy())
    with pytest.raises(ValueError, match=r"expected 8 latent channels.*got 4"):
        q(torch.randn(2, 4, 5, 7))
    for bad in (float("nan"), float("inf"), -float("inf")):
        z = torch.randn(2, 8, 5, 7)
        z[1, 3, 2, 2] = bad
        z[0, 0, 0, 0] = bad
        with pytest.raises(ValueError, match=r"2 non-finite values \(NaN or inf\)"):
            q(z)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", [1, 0, -3])
def test_codebook_size_below_two_rejected(name, size):
    with pytest.raises(ValueError, match=f"codebook_size must be at least 2, got {size}"):
        make(name, codebook_size=size, dim=8)


@pytest.mark.parametrize("name", NAMES)
def test_bad_dim_and_beta_rejected(name):
    with pytest.raises(ValueError, match="dim must be at least 1, got 0"):
        make(name, codebook_size=16, dim=0)
    with pytest.raises(ValueError, match="beta must be non-negative, got -0.1"):
        make(name, codebook_size=16, dim=8, beta=-0.1)


@pytest.mark.parametrize("name", NAMES)
def test_bad_indices_rejected(name):
    q = make(name, codebook_size=16, dim=8)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 16\), got range \[0, 16\]"):
        q.indices_to_codes(torch.tensor([[[0, 16]]]))
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 16\), got range \[-1, 3\]"):
        q.indices_to_codes(torch.tensor([[[-1, 3]]]))
    with pytest.raises(ValueError, match=r"expected integer indices of shape \(batch, height, width\), got torch.float32"):
        q.indices_to_codes(torch.tensor([[[0.0, 1.0]]]))
    with pytest.raises(ValueError, match=r"expected integer indices.*got torch.int64 \(2, 3\)"):
        q.indices_to_codes(torch.zeros(2, 3, dtype=torch.long))
    # int32 indices are fine and give the same codes
    idx = torch.tensor([[[0, 15], [3, 4]]])
    torch.testing.assert_close(q.indices_to_codes(idx.int()), q.indices_to_codes(idx), rtol=0, atol=0)
    # empty is fine
    assert q.indices_to_codes(torch.zeros(0, 2, 2, dtype=torch.long)).shape == (0, 8, 2, 2)


# ---------------------------------------------------------------- bf16 autocast


@pytest.mark.parametrize("name", NAMES)
def test_bf16_autocast_gives_fp32_indices(name):
    q = randomise(make(name, codebook_size=1024, dim=16)).eval()
    z = latents(dim=16, b=4, h=16, w=16, seed=21, scale=0.4)
    ref = q(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z)
    assert torch.isfinite(out.quantized).all() and torch.isfinite(out.loss)
    assert out.quantized.dtype == z.dtype
    mismatch = (out.indices != ref.indices).sum().item()
    assert mismatch == 0, f"{mismatch} of {ref.indices.numel()} indices differ from the fp32 forward under bf16 autocast"
    torch.testing.assert_close(out.quantized, ref.quantized, rtol=0, atol=1e-6)
