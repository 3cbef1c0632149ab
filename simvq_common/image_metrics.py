"""Per-image reconstruction metrics: PSNR and SSIM.

Both functions return one value per image, shape (B,); the caller averages (mean of per-image values).
The SimVQ reference code computes PSNR once over the whole batch (the MSE pooled over all images); that
number is not the mean of per-image PSNRs and depends on how the evaluation set is batched, so we don't.

Images are float tensors (B, C, H, W) (a single (C, H, W) image is accepted and treated as B=1), in the
model range [-1, 1] by default: `data_range` is max - min of the range the images live in (2.0 for
[-1, 1], 1.0 for [0, 1], 255.0 for [0, 255]). Computation is in float64 whatever the input dtype.

SSIM convention (Wang, Bovik, Sheikh, Simoncelli 2004, "Image quality assessment: from error visibility to
structural similarity"), chosen to match `skimage.metrics.structural_similarity(x, y, data_range=...,
channel_axis=0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`:

- local statistics from an 11x11 Gaussian window, sigma 1.5 (normalised to sum 1; skimage's truncate=3.5
  gives radius int(3.5 * 1.5 + 0.5) = 5, i.e. the same 11 taps);
- means mu_x, mu_y; population (biased, 1/N-weighted) variances and covariance
  sigma_x^2 = E_w[x^2] - mu_x^2, sigma_xy = E_w[xy] - mu_x mu_y;
- C1 = (0.01 * L)^2, C2 = (0.03 * L)^2 with L = data_range;
- SSIM map = ((2 mu_x mu_y + C1)(2 sigma_xy + C2)) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2));
- only "valid" window positions (the window lies fully inside the image, no padding): skimage filters
  with reflection padding and then crops (win_size - 1) // 2 pixels from every border before averaging,
  which is the same set of positions;
- each channel separately (no RGB->Y conversion), then the mean over channels and valid positions.

Images must be at least 11x11. Note that SSIM numbers in papers vary with these choices (uniform 7x7
window vs Gaussian 11x11, luminance channel vs RGB, downsampling first as in Wang's MATLAB code);
record the convention beside every number.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _as_batch(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.dim() == 3:
        x, y = x.unsqueeze(0), y.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"expected images (B, C, H, W) or (C, H, W), got shape {tuple(x.shape)}")
    return x.to(torch.float64), y.to(torch.float64)


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-image PSNR in dB, shape (B,): 10 log10(data_range^2 / MSE), MSE over C, H, W. inf where x == y."""
    x, y = _as_batch(x, y)
    mse = (x - y).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(torch.as_tensor(float(data_range) ** 2, dtype=torch.float64, device=mse.device) / mse)


def gaussian_window_1d(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Normalised 1-D Gaussian taps (float64); the 2-D window is their outer product."""
    half = (size - 1) / 2.0
    coords = torch.arange(size, dtype=torch.float64) - half
    taps = torch.exp(-0.5 * (coords / sigma) ** 2)
    return taps / taps.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-image SSIM, shape (B,), Gaussian 11x11 window (sigma 1.5), valid positions, mean over channels.

    See the module docstring for the exact convention (that of skimage's structural_similarity with
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False).
    """
    x, y = _as_batch(x, y)
    b, c, h, w = x.shape
    if h < SSIM_WINDOW or w < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {h}x{w}")
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    taps = gaussian_window_1d().to(x.device)
    # The five local moments of every channel, filtered at once by a separable valid convolution.
    maps = torch.cat([x, y, x * x, y * y, x * y], dim=1)  # (B, 5C, H, W)
    n = maps.shape[1]
    maps = F.conv2d(maps, taps.view(1, 1, -1, 1).expand(n, 1, -1, 1), groups=n)  # along H
    maps = F.conv2d(maps, taps.view(1, 1, 1, -1).expand(n, 1, 1, -1), groups=n)  # along W
    mu_x, mu_y, e_xx, e_yy, e_xy = maps.split(c, dim=1)
    var_x = e_xx - mu_x * mu_x
    var_y = e_yy - mu_y * mu_y
    cov_xy = e_xy - mu_x * mu_y
    numerator = (2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)
    denominator = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    return (numerator / denominator).flatten(1).mean(dim=1)

