"""Pixel transforms: the model's value range, any PIL image to RGB, the shorter-side resize and the crops."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .seeding import derived_rng

# PIL's bicubic resize is antialiased when downsampling (the filter support widens with the scale
# factor), i.e. the same numbers as torchvision's Resize(..., BICUBIC) on PIL images.
RESIZE_FILTER = Image.Resampling.BICUBIC
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], the range the autoencoder sees."""
    return images.float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255] (clamped)."""
    return images.add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)


def image_to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB; transparency composited on white, like the bundled emoji (docs/DATA.md)."""
    if img.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(img).astype(np.float64) / 257.0
        img = Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        values = np.asarray(img).astype(np.float64) * 255.0
        img = Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), "L")
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    """Scale so the shorter side is `size` px, keeping the aspect (longer side truncated, as torchvision)."""
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), RESIZE_FILTER)


def center_crop_offset(w: int, h: int, size: int) -> tuple[int, int]:
    """(left, top) of the centred size x size crop; torchvision's rounding."""
    return int(round((w - size) / 2.0)), int(round((h - size) / 2.0))


def random_crop_offset(w: int, h: int, size: int, seed: int, epoch: int, index: int) -> tuple[int, int]:
    """(left, top) of the random crop of item `index` in `epoch`: a pure function of its arguments."""
    rng = derived_rng("random-crop", seed, epoch, index)
    top = int(rng.integers(0, h - size + 1))
    left = int(rng.integers(0, w - size + 1))
    return left, top


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """The shorter side resized to `size`, then the centred size x size crop (every evaluation's view)."""
    img = resize_shorter_side(img, size)
    left, top = center_crop_offset(img.width, img.height, size)
    return img.crop((left, top, left + size, top + size))


def random_crop(img: Image.Image, size: int, seed: int, epoch: int, index: int) -> Image.Image:
    """The shorter side resized to `size`, then item `index`'s random size x size crop in `epoch`."""
    img = resize_shorter_side(img, size)
    left, top = random_crop_offset(img.width, img.height, size, seed, epoch, index)
    return img.crop((left, top, left + size, top + size))
