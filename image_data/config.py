"""Config schemas of the image-data commands (typed dataclasses; loaded with simvq_common.config.load_config)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DrawShapesConfig:
    """`simvq draw-shapes`: a labelled image folder of shapes the project draws itself (image_data.shapes)."""

    out: str = ""  # the new folder: OUT/train/<shape>/*.png, OUT/val/<shape>/*.png
    shapes: list[str] = field(default_factory=lambda: ["circle", "ring", "square", "triangle", "diamond", "plus",
                                                       "star", "heart"])
    train_per_class: int = 400
    val_per_class: int = 50
    resolution: int = 32
    seed: int = 0


@dataclass
class PackDataConfig:
    """`simvq pack-data`: a data source's splits written as captioned files (image_data.datasets.pack_data)."""

    data: str = "emoji"  # any source build_image_dataset reads
    out: str = ""  # the new folder: OUT/train, OUT/val, ...
    layout: str = "webdataset"  # webdataset (tars) | jsonl (PNGs + metadata.jsonl) | sidecar (PNGs + .txt)
    splits: list[str] = field(default_factory=lambda: ["train", "val"])
    resolution: int = 64  # images are written at this size (centre crop), losslessly
    samples_per_tar: int = 1000  # webdataset only
