"""PSNR and SSIM: closed forms, invariants, an independent brute-force SSIM, and behaviour on real images."""
import math

import pytest
import torch

from evaluation.image_metrics import psnr, ssim
from image_data.emoji import load_emoji
from image_data.transforms import to_model_range


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------- PSNR


def test_psnr_constant_offset_closed_form():
    # x - y = d everywhere -> MSE = d^2 -> PSNR = 10 log10(R^2 / d^2) = 20 log10(R / d)
    x = torch.rand(3, 3, 8, 8, generator=_gen(0)) * 1.5 - 1
    d = torch.tensor([0.5, 0.1, 0.02]).view(3, 1, 1, 1)
    got = psnr(x + d, x)
    want = torch.tensor([20 * math.log10(2.0 / v) for v in (0.5, 0.1, 0.02)], dtype=torch.float64)
    assert got.shape == (3,)
    assert torch.allclose(got, want, atol=1e-9)
    # data_range scales it: R = 255, offset 1 level -> 48.1308... dB
    assert psnr(torch.full((1, 1, 4, 4), 10.0), torch.full((1, 1, 4, 4), 11.0), data_range=255.0).item() == \
        pytest.approx(20 * math.log10(255.0), abs=1e-9)


def test_psnr_hand_made_mse_and_identity():
    # one pixel of 16 off by 1.0 in [-1, 1]: MSE = 1/16 -> PSNR = 10 log10(4 * 16)
    x = torch.zeros(1, 1, 4, 4)
    y = x.clone()
    y[0, 0, 1, 2] = 1.0
    assert psnr(x, y).item() == pytest.approx(10 * math.log10(64.0), abs=1e-9)
    assert psnr(x, y) == psnr(y, x)
    assert torch.isinf(psnr(x, x)).all()
    # per image, not pooled over the batch: the pair's mean differs from the pooled-MSE PSNR
    xb = torch.zeros(2, 1, 4, 4)
    yb = torch.stack([torch.full((1, 4, 4), 0.1), torch.full((1, 4, 4), 0.4)])
    per_image = psnr(xb, yb)
    assert torch.allclose(per_image, torch.tensor([20 * math.log10(20.0), 20 * math.log10(5.0)], dtype=torch.float64))
    pooled = 10 * math.log10(4.0 / ((0.01 + 0.16) / 2))
    assert abs(per_image.mean().item() - pooled) > 1.0


def test_psnr_accepts_single_image_and_rejects_mismatch():
    x = torch.rand(3, 16, 16)
    assert psnr(x, x * 0.9).shape == (1,)
    with pytest.raises(ValueError):
        psnr(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 9))


# ----------------------------------------------------------------------------------------------- SSIM


def _ssim_brute_force(x: torch.Tensor, y: torch.Tensor, data_range: float) -> float:
    """SSIM of one (C, H, W) image pair from the definition: explicit loops over channels and windows."""
    x = x.double()
    y = y.double()
    size, sigma = 11, 1.5
    g = [math.exp(-((i - 5) ** 2) / (2 * sigma ** 2)) for i in range(size)]
    w2 = torch.tensor([[a * b for b in g] for a in g], dtype=torch.float64)
    w2 = w2 / w2.sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    channels, height, width = x.shape
    values = []
    for c in range(channels):
        for i in range(height - size + 1):
            for j in range(width - size + 1):
                px = x[c, i:i + size, j:j + size]
                py = y[c, i:i + size, j:j + size]
                mx = (w2 * px).sum()
                my = (w2 * py).sum()
                vx = (w2 * (px - mx) ** 2).sum()
                vy = (w2 * (py - my) ** 2).sum()
                cxy = (w2 * (px - mx) * (py - my)).sum()
                values.append(((2 * mx * my + c1) * (2 * cxy + c2)) /
                              ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return torch.stack(values).mean().item()


@pytest.mark.parametrize("channels,height,width", [(1, 16, 16), (3, 16, 14), (2, 11, 13)])
def test_ssim_matches_brute_force(channels, height, width):
    x = torch.rand(2, channels, height, width, generator=_gen(channels)) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape, generator=_gen(10 + channels))).clamp(-1, 1)
    got = ssim(x, y)
    want = [_ssim_brute_force(a, b, 2.0) for a, b in zip(x, y)]
    assert got.shape == (2,)
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), atol=1e-12, rtol=0)
    # another data range: images in [0, 255]
    x255, y255 = (x + 1) * 127.5, (y + 1) * 127.5
    got255 = ssim(x255, y255, data_range=255.0)
    assert torch.allclose(got255, torch.tensor([_ssim_brute_force(x255[0], y255[0], 255.0),
                                                _ssim_brute_force(x255[1], y255[1], 255.0)],
                                               dtype=torch.float64), atol=1e-12, rtol=0)


def test_ssim_identity_symmetry_and_bounds():
    x = torch.rand(3, 3, 20, 20, generator=_gen(1)) * 2 - 1
    y = (x + 0.2 * torch.randn(x.shape, generator=_gen(2))).clamp(-1, 1)
    assert torch.allclose(ssim(x, x), torch.ones(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(ssim(x, y), ssim(y, x), atol=1e-14)
    s = ssim(x, y)
    assert ((s > -1) & (s < 1)).all()
    # a constant image against itself is 1 too (C1, C2 keep the ratio defined)
    flat = torch.full((1, 3, 12, 12), 0.25)
    assert ssim(flat, flat).item() == pytest.approx(1.0, abs=1e-12)


def test_ssim_input_checks():
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.rand(1, 3, 10, 32), torch.rand(1, 3, 10, 32))
    with pytest.raises(ValueError):
        ssim(torch.rand(1, 3, 16, 16), torch.rand(2, 3, 16, 16))
    assert ssim(torch.rand(3, 16, 16), torch.rand(3, 16, 16)).shape == (1,)


def test_metrics_monotone_in_noise_on_real_images():
    x = to_model_range(load_emoji("val", 64).images[:16])
    previous_ssim = torch.full((16,), 1.0, dtype=torch.float64) + 1e-9
    previous_psnr = torch.full((16,), math.inf, dtype=torch.float64)
    for k, sigma in enumerate((0.02, 0.05, 0.1, 0.2, 0.4)):
        noisy = (x + sigma * torch.randn(x.shape, generator=_gen(100 + k))).clamp(-1, 1)
        s, p = ssim(x, noisy), psnr(x, noisy)
        assert (s < previous_ssim).all(), sigma
        assert (p < previous_psnr).all(), sigma
        previous_ssim, previous_psnr = s, p
    assert previous_ssim.mean() < 0.5
