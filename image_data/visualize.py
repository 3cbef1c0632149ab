"""Image grids as PNG."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .transforms import to_uint8


def grid_image(images, layout: list[list[int]]) -> np.ndarray:
    """uint8 (N, H, W, 3) images (anything indexable by position) at `layout`'s positions, row by row, on white."""
    h, w = images[0].shape[:2]
    canvas = np.full((len(layout) * h, max(map(len, layout)) * w, 3), 255, np.uint8)
    for r, row in enumerate(layout):
        for c, position in enumerate(row):
            canvas[r * h:(r + 1) * h, c * w:(c + 1) * w] = images[position]
    return canvas


def save_image_grid(images: torch.Tensor, path: str | Path, rows: int) -> Path:
    """images in [-1, 1] (N, 3, H, W), laid out row-major in `rows` rows, saved as PNG."""
    n = len(images)
    cols = -(-n // rows)
    pixels = to_uint8(images.detach().float().cpu()).permute(0, 2, 3, 1).numpy()
    layout = [list(range(start, min(start + cols, n))) for start in range(0, n, cols)]
    layout += [[]] * (rows - len(layout))  # rows asked for but left empty stay white
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid_image(pixels, layout)).save(path)
    return path
