"""Per-image reconstruction metrics, PSNR and SSIM (skimage's Gaussian convention); see docs/IMAGE_METRICS.md.

Images are float (B, C, H, W) or (C, H, W), in [-1, 1] unless `data_range` says otherwise; results are (B,).
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
    """Per-image SSIM, shape (B,): Gaussian 11x11 window (sigma 1.5), valid positions, mean over channels."""
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

