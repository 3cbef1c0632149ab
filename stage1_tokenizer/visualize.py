"""Image grids as PNG."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from .data import to_uint8


def save_image_grid(images: torch.Tensor, path: str | Path, rows: int) -> Path:
    """images in [-1, 1] (N, 3, H, W), laid out row-major in `rows` rows, saved as PNG."""
    n, c, h, w = images.shape
    cols = -(-n // rows)
    canvas = torch.full((rows * cols, c, h, w), 255, dtype=torch.uint8)
    canvas[:n] = to_uint8(images.detach().float().cpu())
    grid = canvas.view(rows, cols, c, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, cols * w, c)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.numpy()).save(path)
    return path
