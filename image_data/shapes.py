"""Shapes: a labelled image set the project draws itself, for trying a recipe on data nobody tuned it on.

    simvq draw-shapes out=runs/shapes32

One class per shape (circle, square, triangle, ...), each image one shape at a random position, size and colour
on a random background, drawn at 4x and downsampled (anti-aliased). Every shape is symmetric under a horizontal
flip, so `aug=flip` keeps its class. The same config gives the same pixels: each image's generator is seeded by
(seed, split, index). Written as an image folder (OUT/train/<class>/*.png, OUT/val/...), which every command
reads as `data=OUT`.
"""
from __future__ import annotations

import colorsys
import json
import math
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from simvq_common.errors import ConfigError
from simvq_common.io import write_json_atomic

from .config import DrawShapesConfig

SUPERSAMPLE = 4


def _star(cx: float, cy: float, r: float, points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    return [(cx + (r if i % 2 == 0 else r * inner) * math.sin(math.pi * i / points),
             cy - (r if i % 2 == 0 else r * inner) * math.cos(math.pi * i / points)) for i in range(2 * points)]


def _heart(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    ts = np.linspace(0, 2 * math.pi, 64, endpoint=False)  # the classic parametric heart, scaled to radius r
    x, y = 16 * np.sin(ts) ** 3, 13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts)
    return [(cx + r * a / 17, cy - r * b / 17 + r * 0.1) for a, b in zip(x, y)]


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple, back: tuple) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "ring":
        draw.ellipse(box, fill=fill)
        draw.ellipse((cx - 0.55 * r, cy - 0.55 * r, cx + 0.55 * r, cy + 0.55 * r), fill=back)
    elif shape == "square":
        draw.rectangle((cx - 0.8 * r, cy - 0.8 * r, cx + 0.8 * r, cy + 0.8 * r), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + 0.95 * r, cy + 0.75 * r), (cx - 0.95 * r, cy + 0.75 * r)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)], fill=fill)
    elif shape == "plus":
        w = 0.3 * r
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
    elif shape == "star":
        draw.polygon(_star(cx, cy, r), fill=fill)
    elif shape == "heart":
        draw.polygon(_heart(cx, cy, r), fill=fill)
    else:
        raise ConfigError(f"unknown shape {shape!r}: choose from {list(SHAPES)}")


SHAPES = ("circle", "ring", "square", "triangle", "diamond", "plus", "star", "heart")


def _colour(rng: np.random.Generator, lightness: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hls_to_rgb(rng.random(), lightness, 0.5 + 0.5 * rng.random())
    return round(255 * r), round(255 * g), round(255 * b)


def draw_image(shape: str, resolution: int, rng: np.random.Generator) -> Image.Image:
    """One image: a light shape on a dark ground or the reverse, radius 25-45% of the side, fully inside."""
    size = resolution * SUPERSAMPLE
    dark_ground = rng.random() < 0.5
    back = _colour(rng, 0.15 + 0.15 * rng.random() if dark_ground else 0.75 + 0.15 * rng.random())
    fill = _colour(rng, 0.6 + 0.2 * rng.random() if dark_ground else 0.2 + 0.2 * rng.random())
    r = size * (0.25 + 0.2 * rng.random())
    cx, cy = (r + (size - 2 * r) * rng.random() for _ in range(2))
    image = Image.new("RGB", (size, size), back)
    _draw(ImageDraw.Draw(image), shape, cx, cy, r, fill, back)
    return image.resize((resolution, resolution), Image.LANCZOS)


def draw_shapes(cfg: DrawShapesConfig) -> Path:
    """Writes cfg.out (train/ and val/, one folder per shape) and shapes.json; a finished folder with the same
    config is left as it is, one with another is refused (remove it first)."""
    if not cfg.out:
        raise ConfigError("set out=DIR, the folder to write (it gets train/ and val/)")
    unknown = sorted(set(cfg.shapes) - set(SHAPES))
    if unknown:
        raise ConfigError(f"shapes {unknown} are not drawn: choose from {list(SHAPES)}")
    out, record = Path(cfg.out), {"config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__ if k != "out"}}
    manifest = out / "shapes.json"
    if manifest.is_file():
        saved = json.loads(manifest.read_text())
        if saved["config"] != record["config"]:
            raise ConfigError(f"{out} holds shapes drawn with {saved['config']}, not {record['config']}: remove it "
                              f"or choose another out=")
        return out
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not a finished draw-shapes folder: remove it or choose another out=")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for split_id, (split, per_class) in enumerate((("train", cfg.train_per_class), ("val", cfg.val_per_class))):
        for class_id, shape in enumerate(cfg.shapes):
            folder = tmp / split / shape
            folder.mkdir(parents=True)
            for index in range(per_class):
                rng = np.random.default_rng([cfg.seed, split_id, class_id, index])
                draw_image(shape, cfg.resolution, rng).save(folder / f"{index:05d}.png")
    write_json_atomic(tmp / "shapes.json", record)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.rmdir()
    tmp.rename(out)  # the folder appears whole or not at all
    return out
